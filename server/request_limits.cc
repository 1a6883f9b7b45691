#include "server/request_limits.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/job_spec.h"

namespace momentum::server {
namespace {

absl::Status TooLong(absl::string_view field, int64_t max, size_t got) {
  return absl::InvalidArgumentError(
      absl::StrCat(field, " must have at most ", max, " bytes, got ", got));
}

// [A-Za-z0-9._-]+, the characters of host names and ids.
bool IsNameText(const std::string& text) {
  return std::all_of(text.begin(), text.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' ||
           c == '_' || c == '-';
  });
}

// Printable ASCII but space: a host:port, [v6]:port or DNS name.
bool IsAddressText(const std::string& text) {
  return std::all_of(text.begin(), text.end(),
                     [](char c) { return c > ' ' && c < 0x7f; });
}

std::string Shown(const std::string& text) {
  return absl::StrCat("\"", absl::CHexEscape(text.substr(0, 64)),
                      text.size() > 64 ? "\"..." : "\"");
}

constexpr int64_t kMaxHostnameBytes = 253;  // a DNS name
constexpr int64_t kMaxAddressBytes = 261;   // a DNS name, ':' and a port
constexpr int64_t kMaxAgentIdBytes = 128;
constexpr int64_t kMaxAgentGpus = 1024;

}  // namespace

absl::Status CheckSubmit(const std::string& spec_yaml,
                         const std::vector<std::string>& overrides,
                         const RequestLimits& limits) {
  if (static_cast<int64_t>(spec_yaml.size()) > limits.max_spec_bytes) {
    return TooLong("spec_yaml", limits.max_spec_bytes, spec_yaml.size());
  }
  if (static_cast<int64_t>(overrides.size()) > limits.max_overrides) {
    return absl::InvalidArgumentError(
        absl::StrCat("overrides must have at most ", limits.max_overrides,
                     " entries, got ", overrides.size()));
  }
  for (size_t i = 0; i < overrides.size(); ++i) {
    if (static_cast<int64_t>(overrides[i].size()) > limits.max_override_bytes) {
      return TooLong(absl::StrCat("overrides[", i, "]"),
                     limits.max_override_bytes, overrides[i].size());
    }
  }
  return absl::OkStatus();
}

absl::Status CheckAgentHello(const v1::AgentHello& hello) {
  if (static_cast<int64_t>(hello.hostname().size()) > kMaxHostnameBytes) {
    return TooLong("AgentHello.hostname", kMaxHostnameBytes,
                   hello.hostname().size());
  }
  if (!IsNameText(hello.hostname())) {
    return absl::InvalidArgumentError(
        absl::StrCat("AgentHello.hostname must match [A-Za-z0-9._-]*, got ",
                     Shown(hello.hostname())));
  }
  if (static_cast<int64_t>(hello.advertise_address().size()) >
      kMaxAddressBytes) {
    return TooLong("AgentHello.advertise_address", kMaxAddressBytes,
                   hello.advertise_address().size());
  }
  if (!IsAddressText(hello.advertise_address())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AgentHello.advertise_address must be printable ASCII without "
        "spaces, got ",
        Shown(hello.advertise_address())));
  }
  if (static_cast<int64_t>(hello.agent_id().size()) > kMaxAgentIdBytes) {
    return TooLong("AgentHello.agent_id", kMaxAgentIdBytes,
                   hello.agent_id().size());
  }
  if (!IsNameText(hello.agent_id())) {
    return absl::InvalidArgumentError(
        absl::StrCat("AgentHello.agent_id must match [A-Za-z0-9._-]*, got ",
                     Shown(hello.agent_id())));
  }
  if (hello.slots() > kMaxRanks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AgentHello.slots must be <= ", kMaxRanks, ", got ", hello.slots()));
  }
  if (hello.gpus_size() > kMaxAgentGpus) {
    return absl::InvalidArgumentError(
        absl::StrCat("AgentHello.gpus must have at most ", kMaxAgentGpus,
                     " entries, got ", hello.gpus_size()));
  }
  return absl::OkStatus();
}

}  // namespace momentum::server
