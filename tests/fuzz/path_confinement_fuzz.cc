// libFuzzer target: the server's path confinement (Admission::Check) of a
// spec's data.path and output_dir, over a folder tree with symlinks that
// point in, out and in circles:
//   base/data/a/          a data root's folder
//   base/data/a/in   ->   ../a         a link that stays inside
//   base/data/a/out  ->   ../../outside  a link that leaves
//   base/data/loop   ->   loop
//   base/out/             the output root
//   base/out/escape  ->   ../outside
//   base/outside/secret
// Input: data.path, a newline, output_dir. A data.path not starting with
// '/' is taken under base; an output_dir starting with '@' is made absolute
// under base (otherwise it is used as given, relative to the job's folder).
// Properties: a refusal is PERMISSION_DENIED naming the field; an accepted
// path that exists resolves (realpath(3), not the code's own resolution)
// to its root or below; an accepted relative output_dir stays inside the
// job's folder.
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "common/job_spec.h"
#include "server/admission.h"

namespace {

namespace fs = std::filesystem;

struct Tree {
  std::string base;
  momentum::server::Admission admission{{}};
};

const Tree& TheTree() {
  static const Tree* tree = [] {
    char pattern[] = "/tmp/path_confinement_fuzz.XXXXXX";
    if (::mkdtemp(pattern) == nullptr) std::abort();
    const fs::path base = pattern;
    std::atexit([] { fs::remove_all(TheTree().base); });
    fs::create_directories(base / "data/a");
    fs::create_directories(base / "out");
    fs::create_directories(base / "outside");
    fs::create_symlink("../a", base / "data/a/in");
    fs::create_symlink("../../outside", base / "data/a/out");
    fs::create_symlink("loop", base / "data/loop");
    fs::create_symlink("../outside", base / "out/escape");
    {
      FILE* f = std::fopen((base / "outside/secret").c_str(), "w");
      if (f != nullptr) std::fclose(f);
    }
    momentum::server::AdmissionOptions options;
    options.data_roots = {(base / "data").string()};
    options.output_roots = {(base / "out").string()};
    return new Tree{base.string(), momentum::server::Admission(options)};
  }();
  return *tree;
}

// Whether `path`, when it exists, resolves under `root` (which does).
bool ExistingUnder(const std::string& path, const std::string& root) {
  char resolved[PATH_MAX], resolved_root[PATH_MAX];
  if (::realpath(path.c_str(), resolved) == nullptr) return true;  // absent
  if (::realpath(root.c_str(), resolved_root) == nullptr) std::abort();
  const std::string p = resolved, r = resolved_root;
  return p == r || p.rfind(r + "/", 0) == 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Tree& tree = TheTree();
  const std::string text(reinterpret_cast<const char*>(data), size);
  const size_t nl = text.find('\n');
  std::string data_path = text.substr(0, nl);
  std::string output_dir = nl == std::string::npos ? "" : text.substr(nl + 1);
  if (data_path.empty() || data_path[0] != '/') {
    data_path = tree.base + "/" + data_path;
  }
  if (!output_dir.empty() && output_dir[0] == '@') {
    output_dir = tree.base + "/" + output_dir.substr(1);
  }
  momentum::JobSpec spec;
  spec.data.path = data_path;
  spec.output_dir = output_dir;
  const absl::Status status = tree.admission.Check(spec);
  if (!status.ok()) {
    if (status.code() != absl::StatusCode::kPermissionDenied ||
        (status.message().find("data.path") == absl::string_view::npos &&
         status.message().find("output_dir") == absl::string_view::npos)) {
      std::abort();
    }
    return 0;
  }
  if (!ExistingUnder(data_path, tree.base + "/data")) std::abort();
  if (fs::path(output_dir).is_absolute()) {
    if (!ExistingUnder(output_dir, tree.base + "/out")) std::abort();
  } else {
    const fs::path job = "/job";
    const std::string inside = (job / output_dir).lexically_normal().string();
    if (inside != "/job" && inside != "/job/" &&
        inside.rfind("/job/", 0) != 0) {
      std::abort();
    }
  }
  return 0;
}
