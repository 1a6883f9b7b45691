// What clients see of a job: the stored record as a v1::Job, with the
// progress its ranks reported. ProgressBoard keeps that progress per job.
//
//   ProgressBoard board;
//   board.Fold("job-3", sample);                       // report threads
//   v1::Job job = JobToProto(record, output_dir, board.Get("job-3"), 0);
#ifndef MOMENTUM_SERVER_JOB_VIEW_H_
#define MOMENTUM_SERVER_JOB_VIEW_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "momentum/v1/internal.pb.h"
#include "momentum/v1/jobs.pb.h"
#include "server/job_store.h"

namespace momentum::server {

// The record as clients see it. `queue_position`: 1-based among PENDING
// jobs, 0 when not pending. A stored final kNN result wins over a reported
// one.
v1::Job JobToProto(const JobRecord& job, const std::string& output_dir,
                   const v1::JobProgress& progress, int64_t queue_position);

// Milliseconds since the epoch into a Timestamp.
void SetTimestamp(int64_t ms, google::protobuf::Timestamp* t);

// Latest progress per job (common/job_progress.h's fold). Thread-safe; owns
// no thread.
class ProgressBoard {
 public:
  void Fold(const std::string& job_id, const v1::MetricSample& sample);
  // Rank 0's final account of the job's `attempt`.
  void SetAccount(const std::string& job_id, int64_t attempt,
                  const v1::RunSummary& summary);
  std::optional<v1::RunSummary> Account(const std::string& job_id,
                                        int64_t attempt) const;
  // The job ended well with `summary`: its progress is complete.
  void Finish(const std::string& job_id, const v1::RunSummary& summary);
  // EmptyProgress() for a job without reports.
  v1::JobProgress Get(const std::string& job_id) const;

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, v1::JobProgress> progress_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::pair<int64_t, v1::RunSummary>> accounts_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_JOB_VIEW_H_
