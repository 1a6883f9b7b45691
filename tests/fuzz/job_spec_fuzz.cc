// libFuzzer target: the job-spec parser and validator on arbitrary text.
// Properties beyond "no crash, leak or sanitizer report": a spec that parses
// serialises to YAML that parses back into the same YAML (a round trip), and
// every refusal is INVALID_ARGUMENT with a message.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/job_spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  // A first line "--set a.b=c" becomes an override, so they are fuzzed too.
  std::vector<std::string> overrides;
  std::string yaml = text;
  if (text.rfind("--set ", 0) == 0) {
    const size_t nl = text.find('\n');
    overrides.push_back(
        text.substr(6, nl == std::string::npos ? std::string::npos : nl - 6));
    yaml = nl == std::string::npos ? "" : text.substr(nl + 1);
  }
  absl::StatusOr<momentum::JobSpec> spec =
      momentum::ParseJobSpec(yaml, overrides, "fuzz");
  if (!spec.ok()) {
    if (spec.status().code() != absl::StatusCode::kInvalidArgument ||
        spec.status().message().empty()) {
      std::abort();
    }
    return 0;
  }
  const std::string once = momentum::JobSpecToYaml(*spec);
  absl::StatusOr<momentum::JobSpec> again =
      momentum::ParseJobSpec(once, {}, "round trip");
  if (!again.ok() || momentum::JobSpecToYaml(*again) != once) std::abort();
  return 0;
}
