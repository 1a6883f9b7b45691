// The sizes the server accepts in requests, beyond what the spec's own rules
// bound (common/job_spec.h): the spec's text and its overrides, list pages,
// a cancel's reason, and what an agent says of itself. Each refusal names
// the field, the limit and the value, with INVALID_ARGUMENT. Pure.
//
//   RequestLimits limits;   // the defaults of momentum-server's flags
//   MOMENTUM_RETURN_IF_ERROR(CheckSubmit(yaml, overrides, limits));
#ifndef MOMENTUM_SERVER_REQUEST_LIMITS_H_
#define MOMENTUM_SERVER_REQUEST_LIMITS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "momentum/v1/internal.pb.h"

namespace momentum::server {

struct RequestLimits {
  // A spec is a page of YAML (the example is 2 KiB); the stored spec is the
  // parsed one written out again, whatever the text was.
  int64_t max_spec_bytes = 64 * 1024;
  int64_t max_overrides = 64;
  int64_t max_override_bytes = 4096;
  // Jobs per ListJobs page; a page also stops before its response reaches
  // max_list_response_bytes (at least one job is sent), well under the
  // client's receive limit.
  int64_t max_page_size = 1000;
  int64_t max_list_response_bytes = 4 << 20;
  // A filter, not a name: as long as the longest name.
  int64_t max_name_filter_bytes = 128;
  // A cancel's reason becomes the job's state reason, shown to everyone
  // who may read the job.
  int64_t max_reason_bytes = 1024;
};

// INVALID_ARGUMENT naming spec_yaml, overrides or overrides[i].
absl::Status CheckSubmit(const std::string& spec_yaml,
                         const std::vector<std::string>& overrides,
                         const RequestLimits& limits);

// What an agent says of itself ends up in names and reasons users read, and
// its counts in every placement: hostname (a DNS name, at most 253 bytes,
// [A-Za-z0-9.-_]), advertise_address (host:port, at most 261 bytes, no
// control characters or spaces), agent_id (at most 128 bytes,
// [A-Za-z0-9.-_]), slots (at most kMaxRanks) and gpus (at most 1024).
// INVALID_ARGUMENT naming the AgentHello field.
absl::Status CheckAgentHello(const v1::AgentHello& hello);

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_REQUEST_LIMITS_H_
