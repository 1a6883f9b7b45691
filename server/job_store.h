// The coordinator's durable job store: one SQLite file in WAL mode holding
// every job and every change of its state. A write returns only after its
// transaction committed, so the coordinator acknowledges (or acts on) nothing
// the store could lose in a crash.
//
// Usage:
//   MOMENTUM_ASSIGN_OR_RETURN(auto store, JobStore::Open(dir + "/jobs.db"));
//   JobRecord job;  // name, priority, world_size, spec_yaml, output_dir set
//   MOMENTUM_ASSIGN_OR_RETURN(job, store->Insert(job, now_ms));   // PENDING
//   MOMENTUM_RETURN_IF_ERROR(store->Transition(job.id, v1::JOB_STATE_RUNNING,
//                                              "2 ranks launched", now)
//                                .status());
#ifndef MOMENTUM_SERVER_JOB_STORE_H_
#define MOMENTUM_SERVER_JOB_STORE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/job_state.h"
#include "momentum/v1/jobs.pb.h"

struct sqlite3;

namespace momentum::server {

using v1::JobState;

// The job states' names and moves (common/job_state.h), as the server's
// code has always called them.
using ::momentum::IsAllowedTransition;
using ::momentum::IsFinal;
using ::momentum::StateName;

// One job row. Times are milliseconds since the Unix epoch; 0 means unset.
struct JobRecord {
  int64_t seq = 0;  // submission order, from 1; assigned by Insert()
  std::string id;   // "job-<seq>"; assigned by Insert()
  std::string name;
  int64_t priority = 0;
  int64_t world_size = 1;
  JobState state = v1::JOB_STATE_PENDING;
  std::string state_reason;
  std::string spec_yaml;   // the resolved spec
  std::string output_dir;  // as in the spec (relative: under the job's folder)
  int64_t submit_ms = 0;
  int64_t start_ms = 0;  // first entry into RUNNING
  int64_t end_ms = 0;    // entry into a final state
  int64_t restarts = 0;
  int64_t attempt = 0;  // launches so far (1 after the first)
  std::string export_path;
  double knn_top1 = -1;  // the final (or latest known) kNN top-1
  std::string owner;     // who submitted it ("" when unknown)
  // Where its ranks write: output_dir resolved and confined at submission
  // (server/admission.h), absolute. "" for jobs stored before outputs were
  // confined: theirs is derived from output_dir as it was then.
  std::string output_path;
  bool owner_is_admin = false;  // the owner submitted it as an admin
};

// True when one path is the other or lies inside it: "/o/a" and "/o/a/b"
// overlap, "/o/a" and "/o/ab" do not. Both absolute and lexically normal.
bool OutputPathsOverlap(const std::string& a, const std::string& b);

// One committed change of state.
struct JobEvent {
  int64_t seq = 0;  // order of all events in the store, from 1
  std::string job_id;
  int64_t time_ms = 0;
  JobState from = v1::JOB_STATE_UNSPECIFIED;  // UNSPECIFIED for submission
  JobState to = v1::JOB_STATE_PENDING;
  std::string reason;
};

struct JobFilter {
  std::vector<JobState> states;      // any of these; all when empty
  std::string name_contains;         // substring of the name; all when empty
  std::optional<std::string> owner;  // submitted by exactly this owner
};

// Thread-safe: one connection behind a mutex.
class JobStore {
 public:
  // Opens or creates the store at `path` (its folder must exist), in WAL
  // mode with synchronous=FULL, and creates the schema if missing.
  // Errors name the file.
  static absl::StatusOr<std::unique_ptr<JobStore>> Open(
      const std::string& path);
  ~JobStore();

  // Stores a new PENDING job (seq, id, state, submit_ms set here, the
  // submission event recorded with reason "submitted") in one transaction
  // and returns the stored record. With `max_pending_per_owner` > 0, refuses
  // (RESOURCE_EXHAUSTED) when job.owner already has that many PENDING jobs.
  // With job.output_path set, refuses as CheckOutputFree() does, in the
  // same transaction: two submissions cannot both take one folder.
  absl::StatusOr<JobRecord> Insert(JobRecord job, int64_t now_ms,
                                   int64_t max_pending_per_owner = 0);

  // FAILED_PRECONDITION, naming `output_path` and the other job, when
  // `output_path` overlaps (OutputPathsOverlap) the output_path of another
  // job than `self_id` that is not final, or of any job of another owner
  // than `owner`: a job never writes into another's output, and an owner
  // resumes only from its own finished jobs' outputs.
  absl::Status CheckOutputFree(const std::string& output_path,
                               const std::string& owner,
                               const std::string& self_id) const;

  // NOT_FOUND names the id.
  absl::StatusOr<JobRecord> Get(const std::string& id) const;

  // Jobs that match, newest submission first, skipping `offset`, at most
  // `limit` (all when 0); `total` (if given) receives the count of all
  // matches.
  absl::StatusOr<std::vector<JobRecord>> List(const JobFilter& filter,
                                              int64_t offset, int64_t limit,
                                              int64_t* total = nullptr) const;

  // PENDING jobs in scheduling order: priority descending, then seq.
  absl::StatusOr<std::vector<JobRecord>> Pending() const;

  // Jobs not in a final state (PENDING, RUNNING, RESTARTING), by seq.
  absl::StatusOr<std::vector<JobRecord>> Active() const;

  // Moves a job to `to` with `reason`, recording the event, in one
  // transaction. Sets start_ms on the first entry into RUNNING and end_ms on
  // entry into a final state. FAILED_PRECONDITION (naming both states) when
  // the job is already final, or when the move is not one of
  //   PENDING -> RUNNING | FAILED | CANCELLED
  //   RUNNING -> RESTARTING | SUCCEEDED | FAILED | CANCELLED
  //   RESTARTING -> RUNNING | FAILED | CANCELLED
  // Returns the updated record.
  absl::StatusOr<JobRecord> Transition(const std::string& id, JobState to,
                                       const std::string& reason,
                                       int64_t now_ms);

  // Updates the bookkeeping fields that are not states: attempt, restarts,
  // export_path, knn_top1 and output_path of the stored row (id from
  // `job`).
  absl::Status UpdateRun(const JobRecord& job);

  // The job's events in order.
  absl::StatusOr<std::vector<JobEvent>> Events(const std::string& id) const;

 private:
  explicit JobStore(sqlite3* db, std::string path);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_JOB_STORE_H_
