// The ranks' output, kept by the coordinator: one file per job and rank,
// <jobs_dir>/<job id>/logs/rank-<r>.log, numbered from line 1 across
// attempts and coordinator restarts.
//
//   JobLogs logs(state_dir + "/jobs");
//   absl::StatusOr<int64_t> n = logs.Append("job-3", 0, "epoch 1 ...");
//   logs.CloseJob("job-3");   // the job ended: its files are closed
#ifndef MOMENTUM_SERVER_JOB_LOGS_H_
#define MOMENTUM_SERVER_JOB_LOGS_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/job_id.h"
#include "momentum/v1/jobs.pb.h"

namespace momentum::server {

// Nothing but a job id (common/job_id.h) names a folder under the state
// directory.
using ::momentum::IsJobId;

// Thread-safe; owns no thread. Files are opened close-on-exec, so ranks
// started later never inherit them, and closed when their job ends.
class JobLogs {
 public:
  // Longest line kept; a longer one is cut into pieces of this size.
  static constexpr size_t kMaxLineBytes = 16 * 1024;
  // Most ranks whose logs one job may have (resources.nproc's limit).
  explicit JobLogs(std::string jobs_dir) : jobs_dir_(std::move(jobs_dir)) {}
  ~JobLogs();

  // Appends `line` (without its newline) to the rank's file; returns the
  // numbers of the lines written (more than one when it was cut).
  // INVALID_ARGUMENT for an id that is not a job id or a negative rank.
  absl::StatusOr<std::vector<int64_t>> Append(const std::string& job_id,
                                              int64_t rank,
                                              const std::string& line);
  // Closes the job's files (they reopen if a line comes after all).
  void CloseJob(const std::string& job_id);

  // Stored lines from line `from_line` of each rank (rank >= 0: that rank
  // only), in rank then line order. Reads the files that exist, whatever
  // the job's size.
  absl::StatusOr<std::vector<v1::LogLine>> Read(const std::string& job_id,
                                                int64_t rank,
                                                int64_t from_line) const;
  // The rank's last non-empty line, at most `max_bytes` of its end; "" when
  // there is none.
  std::string LastLine(const std::string& job_id, int64_t rank,
                       size_t max_bytes = 512) const;
  // Files open now (for tests and /metrics).
  size_t open_files() const;

 private:
  struct File {
    int fd = -1;
    int64_t lines = 0;
  };
  std::string PathOf(const std::string& job_id, int64_t rank) const;

  const std::string jobs_dir_;
  mutable absl::Mutex mu_;
  std::map<std::pair<std::string, int64_t>, File> files_ ABSL_GUARDED_BY(mu_);
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_JOB_LOGS_H_
