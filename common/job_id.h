// Job ids, as the coordinator's store gives them out: "job-" and the
// submission's sequence number in decimal. Every id that arrives from a peer
// (a client's request, an agent's message, a rank's hello) is checked with
// IsJobId() before it names a folder or a row: nothing else may, so an id
// can never climb out of the state directory ("job-1/../x") or name
// another job's files.
//
// Header-only, so that the server, the agent, the worker and the client
// share the one definition without linking anything.
//
//   if (!IsJobId(request.job_id())) {
//     return absl::InvalidArgumentError("job_id must be job-<n>, got ...");
//   }
#ifndef MOMENTUM_COMMON_JOB_ID_H_
#define MOMENTUM_COMMON_JOB_ID_H_

#include <algorithm>
#include <string_view>

namespace momentum {

// True for "job-" followed by 1 to 20 decimal digits (an int64 has at most
// 19), and for nothing else.
inline bool IsJobId(std::string_view id) {
  constexpr std::string_view kPrefix = "job-";
  if (id.size() <= kPrefix.size() || id.size() > kPrefix.size() + 20 ||
      id.substr(0, kPrefix.size()) != kPrefix) {
    return false;
  }
  return std::all_of(id.begin() + kPrefix.size(), id.end(),
                     [](char c) { return c >= '0' && c <= '9'; });
}

}  // namespace momentum

#endif  // MOMENTUM_COMMON_JOB_ID_H_
