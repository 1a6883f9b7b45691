// The commands of the `momentum` CLI, one function each: call the
// coordinator through a JobClient, print to the given streams and return the
// process exit code. main.cc parses the flags into the option structs below
// and calls one of them.
//
// Usage:
//   JobClient client(client_options);
//   CommandContext context{client, OutputFormat::kTable, std::cout, std::cerr};
//   ListOptions list;
//   list.states = {v1::JOB_STATE_RUNNING};
//   return RunList(context, list);
//
// Exit codes: kExitOk; kExitFailure when a call fails (one line on `err`:
// "momentum: GetJob: NOT_FOUND: no job job-9"), when a file cannot be read or
// when a watched job ends FAILED or CANCELLED. Usage errors (kExitUsage) are
// main.cc's.
#ifndef MOMENTUM_CLIENT_COMMANDS_H_
#define MOMENTUM_CLIENT_COMMANDS_H_

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "momentum/v1/jobs.pb.h"

namespace momentum::client {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

enum class OutputFormat { kTable, kJson };

struct CommandContext {
  JobClient& client;
  OutputFormat output = OutputFormat::kTable;
  std::ostream& out;
  std::ostream& err;
  // stdout is a terminal: `watch` redraws its progress line in place.
  bool terminal = false;
  // Columns of that terminal; 0 when unknown.
  int terminal_width = 0;
  // The clock, for ages and the pace of progress lines.
  std::function<absl::Time()> now = [] { return absl::Now(); };
};

struct SubmitOptions {
  std::string file;                    // the job spec (YAML)
  std::vector<std::string> overrides;  // "dotted.key=value"
  bool wait = false;                   // then watch the job
};

struct ListOptions {
  std::vector<::momentum::v1::JobState> states;  // any state when empty
  std::string name_contains;
  int limit = 0;  // page size; 0: the server's default (50)
  bool all_pages = false;
};

struct GetOptions {
  std::string job_id;
  bool spec = false;  // also print the resolved spec (table output)
};

struct CancelOptions {
  std::string job_id;
  std::string reason;
};

struct LogsOptions {
  std::string job_id;
  bool follow = false;
  int rank = -1;          // all ranks when negative
  int64_t from_line = 0;  // first line number of each rank; 0 means 1
};

// Each blocks until its calls are done (`watch`, `submit --wait` and
// `logs --follow` until the job ends) and returns the exit code.
int RunSubmit(const CommandContext& context, const SubmitOptions& options);
int RunList(const CommandContext& context, const ListOptions& options);
int RunGet(const CommandContext& context, const GetOptions& options);
int RunWatch(const CommandContext& context, const std::string& job_id);
int RunCancel(const CommandContext& context, const CancelOptions& options);
int RunLogs(const CommandContext& context, const LogsOptions& options);

}  // namespace momentum::client

#endif  // MOMENTUM_CLIENT_COMMANDS_H_
