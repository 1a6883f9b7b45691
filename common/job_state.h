// Job states (momentum.v1.JobState) and the moves between them, in one place
// for the coordinator's store, the server's metrics and the client:
//
//   PENDING -> RUNNING -> (RESTARTING -> RUNNING)* -> SUCCEEDED
//   PENDING | RUNNING | RESTARTING -> FAILED | CANCELLED
//
// Header-only, on the generated API alone: the server's job store and the
// client's formatting both link momentum_proto and nothing else in common.
//
// Usage:
//   if (!IsAllowedTransition(job.state, to)) {
//     return absl::FailedPreconditionError(
//         job.id + " is " + StateName(job.state) + "; cannot move to " +
//         StateName(to));
//   }
//   std::optional<v1::JobState> state = ParseState("running");  // RUNNING
#ifndef MOMENTUM_COMMON_JOB_STATE_H_
#define MOMENTUM_COMMON_JOB_STATE_H_

#include <array>
#include <cctype>
#include <optional>
#include <string>
#include <string_view>

#include "momentum/v1/jobs.pb.h"

namespace momentum {

// The states a job can be in, in lifecycle order (UNSPECIFIED is none).
inline constexpr std::array<v1::JobState, 6> kJobStates = {
    v1::JOB_STATE_PENDING,   v1::JOB_STATE_RUNNING, v1::JOB_STATE_RESTARTING,
    v1::JOB_STATE_SUCCEEDED, v1::JOB_STATE_FAILED,  v1::JOB_STATE_CANCELLED,
};

// The state's name as users see it: "PENDING", "RUNNING", ..., "CANCELLED";
// "UNSPECIFIED" for 0 and for values this build does not know (a newer API,
// a corrupt row).
inline std::string StateName(v1::JobState state) {
  switch (state) {
    case v1::JOB_STATE_PENDING:
      return "PENDING";
    case v1::JOB_STATE_RUNNING:
      return "RUNNING";
    case v1::JOB_STATE_RESTARTING:
      return "RESTARTING";
    case v1::JOB_STATE_SUCCEEDED:
      return "SUCCEEDED";
    case v1::JOB_STATE_FAILED:
      return "FAILED";
    case v1::JOB_STATE_CANCELLED:
      return "CANCELLED";
    default:
      return "UNSPECIFIED";
  }
}

// True for SUCCEEDED, FAILED and CANCELLED: nothing moves a job out of them.
inline bool IsFinal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

// Whether a job may move from `from` to `to` (DESIGN.md, "Job states"):
// exactly the moves of this table. None to the same state, none out of a
// final state or UNSPECIFIED.
inline bool IsAllowedTransition(v1::JobState from, v1::JobState to) {
  struct Move {
    v1::JobState from;
    v1::JobState to;
  };
  static constexpr Move kMoves[] = {
      {v1::JOB_STATE_PENDING, v1::JOB_STATE_RUNNING},
      {v1::JOB_STATE_PENDING, v1::JOB_STATE_FAILED},
      {v1::JOB_STATE_PENDING, v1::JOB_STATE_CANCELLED},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_RESTARTING},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_SUCCEEDED},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_FAILED},
      {v1::JOB_STATE_RUNNING, v1::JOB_STATE_CANCELLED},
      {v1::JOB_STATE_RESTARTING, v1::JOB_STATE_RUNNING},
      {v1::JOB_STATE_RESTARTING, v1::JOB_STATE_FAILED},
      {v1::JOB_STATE_RESTARTING, v1::JOB_STATE_CANCELLED},
  };
  for (const Move& move : kMoves) {
    if (move.from == from && move.to == to) return true;
  }
  return false;
}

// Parses a state's name as a user types it, ignoring case, surrounding
// spaces and an optional "JOB_STATE_" prefix: "running", "RUNNING",
// "job_state_running". Also takes "canceled". Nullopt for anything else,
// UNSPECIFIED included.
inline std::optional<v1::JobState> ParseState(std::string_view text) {
  constexpr std::string_view kSpaces = " \t\n\v\f\r";
  const size_t begin = text.find_first_not_of(kSpaces);
  if (begin == std::string_view::npos) return std::nullopt;
  text = text.substr(begin, text.find_last_not_of(kSpaces) - begin + 1);
  std::string name;
  for (char c : text) {
    name.push_back(
        static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  }
  constexpr std::string_view kPrefix = "JOB_STATE_";
  if (name.compare(0, kPrefix.size(), kPrefix) == 0) {
    name.erase(0, kPrefix.size());
  }
  if (name == "CANCELED") return v1::JOB_STATE_CANCELLED;
  for (v1::JobState state : kJobStates) {
    if (name == StateName(state)) return state;
  }
  return std::nullopt;
}

}  // namespace momentum

#endif  // MOMENTUM_COMMON_JOB_STATE_H_
