// libFuzzer target: the server's token file (TokenTable::Load) on arbitrary
// contents. Properties beyond "no crash, leak or sanitizer report": a
// refusal is INVALID_ARGUMENT naming the file; a table that loads has only
// lines of three fields with tokens of 16 characters or more, finds each
// token with the name of its first line, and finds nothing else.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "common/grpc_security.h"

namespace {

// Never destroyed: the exit handler that removes the file runs after the
// destructors of statics made before it was registered.
const std::string& TempPath() {
  static const std::string* path = [] {
    char pattern[] = "/tmp/token_file_fuzz.XXXXXX";
    const int fd = ::mkstemp(pattern);
    if (fd < 0) std::abort();
    ::close(fd);
    std::atexit([] { std::remove(TempPath().c_str()); });
    return new std::string(pattern);
  }();
  return *path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const std::string path = TempPath();
  {
    std::ofstream file(path, std::ios::binary | std::ios::trunc);
    file << text;
  }
  absl::StatusOr<momentum::TokenTable> table = momentum::TokenTable::Load(path);
  if (!table.ok()) {
    if (table.status().code() != absl::StatusCode::kInvalidArgument ||
        table.status().message().find(path) == absl::string_view::npos) {
      std::abort();
    }
    return 0;
  }
  // Every token of a line is found with the name of its first line; its
  // prefix and its extensions are found only when they are tokens too.
  std::map<std::string, std::string> names;  // token -> first name
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = line.substr(0, line.find('#'));
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (fields.empty()) continue;
    if (fields.size() != 3 || fields[0].size() < 16) std::abort();
    names.emplace(std::string(fields[0]), std::string(fields[1]));
  }
  for (const auto& [token, name] : names) {
    std::optional<momentum::Identity> found = table->Find(token);
    if (!found || found->name != name) std::abort();
    for (const std::string& other :
         {token.substr(0, token.size() - 1), token + "x", token + '\0'}) {
      if (table->Find(other).has_value() != (names.count(other) == 1)) {
        std::abort();
      }
    }
  }
  if (table->Find("")) std::abort();
  return 0;
}
