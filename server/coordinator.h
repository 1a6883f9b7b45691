// The coordinator's core, behind the gRPC services: stores jobs, schedules
// them onto launchers' slots (CPU jobs) or GPUs (CUDA jobs, one GPU per rank)
// as whole gangs, launches and supervises their ranks, keeps their logs and
// progress, and feeds watchers. Knows nothing of gRPC transport; the
// services in server/*_service.cc are thin.
//
// Every change of a job's state is committed to the JobStore, with its
// reason, before it is acted on (ranks launched or stopped) or published.
#ifndef MOMENTUM_SERVER_COORDINATOR_H_
#define MOMENTUM_SERVER_COORDINATOR_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/job_spec.h"
#include "momentum/v1/jobs.pb.h"
#include "server/job_store.h"
#include "server/launcher.h"

namespace momentum::server {

class ServerMetrics;

struct CoordinatorOptions {
  // Holds jobs.db and, per job, jobs/<id>/ (logs, attempts, and the output
  // of a spec whose output_dir is relative).
  std::string state_dir;
  // momentum-worker, for the local launcher.
  std::string worker_binary;
  // CPU ranks the coordinator may run as its own children; 0: none.
  int64_t local_slots = 1;
  // GPUs of its own machine, by CUDA index (gpus.h): each rank of a CUDA job
  // that runs here owns one, and takes no slot. Without slots and GPUs the
  // coordinator runs no ranks itself (agents only).
  std::vector<int> local_gpus;
  // How long a stopped rank has between SIGTERM and SIGKILL.
  double grace_seconds = 10;
  // When not empty, a spec's data.path and an absolute output_dir must lie
  // under one of these (symlinks resolved); else PERMISSION_DENIED.
  std::vector<std::string> data_roots;
  std::vector<std::string> output_roots;
  // Most ranks one job may ask for; 0: no limit beyond the slots.
  int64_t max_ranks_per_job = 0;
  // Most PENDING jobs one owner may have; 0: no limit. Further submissions
  // are refused with RESOURCE_EXHAUSTED.
  int64_t max_queued_jobs_per_user = 0;
  // Given to every rank (MOMENTUM_TOKEN) to report its metrics with.
  std::string worker_token;
};

// The events of one WatchJob or GetJobLogs stream, in order. Thread-safe.
class Subscription {
 public:
  Subscription(std::string job_id, bool metrics, bool logs)
      : job_id_(std::move(job_id)), metrics_(metrics), logs_(logs) {}

  const std::string& job_id() const { return job_id_; }
  bool wants_metrics() const { return metrics_; }
  bool wants_logs() const { return logs_; }

  // Waits up to `wait` for the next event; false when there is none (yet).
  bool Next(v1::WatchJobEvent* event, std::chrono::milliseconds wait);
  // True once closed and drained: the stream is over.
  bool Done() const;

  void Push(v1::WatchJobEvent event);
  void Close();

 private:
  const std::string job_id_;
  const bool metrics_, logs_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<v1::WatchJobEvent> events_;
  bool closed_ = false;
  v1::JobState last_state_ = v1::JOB_STATE_UNSPECIFIED;
  // Bounds a slow reader's backlog: past it, metric samples are dropped.
  static constexpr size_t kMaxBacklog = 10000;
};

class Coordinator : public LaunchEvents {
 public:
  // Opens (or creates) the store under options.state_dir and adds the local
  // launcher. Jobs that were RUNNING when a previous coordinator stopped are
  // moved to RESTARTING and relaunched from their checkpoints by Start().
  static absl::StatusOr<std::unique_ptr<Coordinator>> Create(
      const CoordinatorOptions& options, ServerMetrics* metrics = nullptr);
  ~Coordinator() override;

  // The address ranks report metrics to (host:port of the internal
  // service); set before Start().
  void SetReportAddress(const std::string& address);
  // Starts scheduling.
  void Start();
  // Stops scheduling and the local ranks (SIGTERM, then SIGKILL after the
  // grace), and ends every watch stream.
  void Shutdown();

  // The job API. Errors are canonical: INVALID_ARGUMENT naming the spec
  // field, NOT_FOUND naming the job, ... `owner` is who submits (for
  // per-user limits; "" when unknown). Submit stores the spec with
  // resources.device resolved (never auto: cuda when the launchers offer
  // GPUs now, else cpu) and refuses a CUDA job with more ranks than the
  // launchers have GPUs, used or free.
  absl::StatusOr<v1::Job> Submit(const std::string& spec_yaml,
                                 const std::vector<std::string>& overrides,
                                 const std::string& owner = "");
  absl::StatusOr<v1::Job> GetJob(const std::string& id);
  absl::StatusOr<v1::ListJobsResponse> ListJobs(
      const v1::ListJobsRequest& request);
  absl::StatusOr<v1::Job> Cancel(const std::string& id,
                                 const std::string& reason);

  // A stream of the job's events: first a snapshot of the job, then its
  // state changes (and metric samples and log lines if asked), closed after
  // the job reached a final state and a last snapshot.
  absl::StatusOr<std::shared_ptr<Subscription>> Watch(const std::string& id,
                                                      bool metrics, bool logs);
  void Unwatch(const std::shared_ptr<Subscription>& subscription);

  // Stored output lines of the job (rank >= 0: that rank only) from line
  // `from_line` of each rank, in rank then line order.
  absl::StatusOr<std::vector<v1::LogLine>> ReadLogs(const std::string& id,
                                                    int64_t rank,
                                                    int64_t from_line);

  // A metric sample from a rank of the job's current attempt (samples of
  // older attempts are ignored).
  void OnMetric(const std::string& job_id, int64_t attempt,
                const v1::MetricSample& sample);
  // A rank's heartbeat: it lives, whether or not it makes progress.
  void OnHeartbeat(const std::string& job_id, int64_t attempt, int64_t rank);

  // Launchers: the local one is added by Create(); agents come and go.
  void AddLauncher(std::shared_ptr<Launcher> launcher);
  void RemoveLauncher(const Launcher* launcher);

  // LaunchEvents.
  void OnRankOutput(const std::string& job_id, int64_t attempt, int64_t rank,
                    const std::string& line) override;
  void OnRankExited(const std::string& job_id, int64_t attempt, int64_t rank,
                    int exit_code, int signal,
                    const std::string& description) override;

  // The folder where the job's ranks write (its spec's output_dir, made
  // absolute under the job's folder when relative).
  std::string OutputDirOf(const JobRecord& job) const;
  std::string JobDirOf(const std::string& id) const;

 private:
  Coordinator(const CoordinatorOptions& options,
              std::unique_ptr<JobStore> store, ServerMetrics* metrics);

  // A launched gang.
  struct RankSlot {
    Launcher* launcher = nullptr;
    bool running = true;
    int gpu = -1;  // the GPU it owns on `launcher`; -1: a CPU rank (a slot)
  };
  // Ranks of a gang on one launcher, for a CUDA job with the GPU each owns
  // (same order; empty for a CPU job).
  struct Placement {
    Launcher* launcher = nullptr;
    std::vector<int64_t> ranks;
    std::vector<int> gpus;
  };
  struct RunningJob {
    int64_t attempt = 0;
    int64_t world_size = 0;
    std::map<int64_t, RankSlot> ranks;
    bool stopping = false;  // failed or cancelled: waiting for the ranks
    std::string first_failure;
    int64_t max_restarts = 0;
    double restart_backoff_s = 0;
    double hang_timeout_s = 0;
    // What each rank last reported, from its first report on.
    struct Health {
      std::chrono::steady_clock::time_point last_report, step_changed;
      int64_t step = -1;
      double compute_seconds = -1;  // per step, without communication
      int strikes = 0;              // reports in a row above the limit
      bool straggler = false;
    };
    double straggler_factor = 0;
    std::map<int64_t, Health> health;
  };
  struct Exit {
    std::string job_id;
    int64_t attempt;
    int64_t rank;
    int exit_code;
    int signal;
    std::string description;
  };

  void Loop();
  // The server's limits and path roots on a parsed spec.
  absl::Status CheckLimits(const JobSpec& spec) const;
  void HandleExit(const Exit& exit);
  // Stops the gang for `reason` and commits RESTARTING (restarts left) or
  // FAILED first.
  void FailGangLocked(const JobRecord& before, RunningJob& run,
                      std::string reason);
  // A rank that has reported before and has now been silent, or stuck at
  // one step, for the spec's scheduling.hang_timeout_s is hung.
  void CheckHangsLocked();
  // Compares `rank`'s compute time with the other ranks' median; returns a
  // notice to publish when the rank starts or stops straggling.
  std::optional<v1::Notice> CheckStragglerLocked(RunningJob& run, int64_t rank);
  void Schedule();
  // Places `world_size` ranks on launchers with free slots, or for a CUDA
  // job (`cuda`) free GPUs, one per rank; empty when they do not all fit now.
  std::vector<Placement> Place(int64_t world_size, bool cuda);
  // Commits RUNNING and starts the gang of `queued` (whose stored spec is
  // `spec`) where `placement` says.
  void LaunchLocked(const JobRecord& queued, JobSpec spec,
                    const std::vector<Placement>& placement);
  // Commits FAILED for a queued job that cannot be launched at all.
  void FailUnlaunchableLocked(const JobRecord& queued,
                              const std::string& reason);
  void StopRanksLocked(const std::string& job_id, RunningJob& run);
  int64_t FreeSlotsLocked(const Launcher* launcher) const;
  // The launcher's GPUs that no rank owns, in the order it offers them.
  std::vector<int> FreeGpusLocked(const Launcher* launcher) const;
  // GPUs of all launchers, used or free.
  int64_t ClusterGpus();

  v1::Job ToProto(const JobRecord& job);
  void Publish(const std::string& job_id, const v1::WatchJobEvent& event,
               bool is_metric = false, bool is_log = false);
  void PublishChange(const JobRecord& before, const JobRecord& after);
  void CloseSubscriptions(const std::string& job_id);
  std::string LastLines(const std::string& job_id, int64_t rank, int n);
  void UpdateMetricsLocked();

  const CoordinatorOptions options_;
  std::unique_ptr<JobStore> store_;
  ServerMetrics* const metrics_;
  std::string report_address_;

  // Scheduling state.
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool wake_ = false;
  std::vector<std::shared_ptr<Launcher>> launchers_;
  std::vector<std::shared_ptr<Launcher>> retired_launchers_;
  std::map<const Launcher*, int64_t> used_slots_;
  // GPUs owned by running ranks (of CUDA jobs), per launcher.
  std::map<const Launcher*, std::set<int>> used_gpus_;
  std::map<std::string, RunningJob> running_;
  std::deque<Exit> exits_;
  // A restarting job is relaunched no sooner than this.
  std::map<std::string, std::chrono::steady_clock::time_point> not_before_;
  std::thread loop_;

  // Rank 0's last reported progress per job.
  std::mutex progress_mu_;
  std::map<std::string, v1::JobProgress> progress_;

  // Watchers.
  std::mutex subs_mu_;
  std::map<std::string, std::vector<std::shared_ptr<Subscription>>> subs_;

  // Logs: one file per job and rank, and its line count.
  std::mutex logs_mu_;
  struct LogFile {
    std::ofstream out;
    int64_t lines = 0;
  };
  std::map<std::pair<std::string, int64_t>, LogFile> logs_;
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_COORDINATOR_H_
