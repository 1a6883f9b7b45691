// The coordinator's core, behind the gRPC services: the job lifecycle, the
// job API, the scheduling loop, launch and exit handling. It stores jobs,
// places them whole (server/placement.h) on launchers' slots (CPU jobs) or
// GPUs (CUDA jobs, one GPU per rank), launches and supervises their ranks,
// and restarts or fails their gangs. The pieces it delegates to live in
// their own units: admission (server/admission.h), gang health
// (server/gang_health.h), job logs (server/job_logs.h), watchers
// (server/watch_hub.h) and the job view (server/job_view.h).
//
// Every change of a job's state is committed to the JobStore, with its
// reason, before it is acted on (ranks launched or stopped) or published.
//
// Threads and locks. The coordinator owns one thread, the loop, which runs
// Tick(): it alone launches and stops ranks, handles their exits, checks
// hangs and schedules, so launches and stops happen in the order they were
// decided (a cancel that lands while a gang is being launched stops it right
// after). Everything the loop decides from lives in LoopState, which only
// the loop touches and which no lock guards. Other threads (gRPC handlers,
// launchers' threads) hand it work through the inbox under `mu_`, which is
// held only to move items in and out: no launcher, store call, callback or
// publication ever runs under it, so nothing can call back into the
// coordinator under its own lock. The units above lock only themselves and
// call nothing back. Lock order: `mu_` is a leaf; so are the units' locks.
//
// Usage (server/main.cc):
//   auto c = Coordinator::Create(options, metrics);
//   (*c)->AddLauncher(std::make_shared<LocalLauncher>(..., c->get()));
//   (*c)->SetReportAddress("10.0.0.1:50051");
//   (*c)->Start();
//   ...
//   (*c)->Shutdown();   // also done by the destructor
#ifndef MOMENTUM_SERVER_COORDINATOR_H_
#define MOMENTUM_SERVER_COORDINATOR_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/job_spec.h"
#include "momentum/v1/internal.pb.h"
#include "momentum/v1/jobs.pb.h"
#include "server/admission.h"
#include "server/clock.h"
#include "server/gang_health.h"
#include "server/job_logs.h"
#include "server/job_store.h"
#include "server/job_view.h"
#include "server/launcher.h"
#include "server/log_rate.h"
#include "server/placement.h"
#include "server/rank_credentials.h"
#include "server/request_limits.h"
#include "server/watch_hub.h"

namespace momentum::server {

class ServerMetrics;

struct CoordinatorOptions {
  // Holds jobs.db, the lock file, per job jobs/<id>/ (logs), and
  // outputs/, the default output root (admission.output_root).
  std::string state_dir;
  // How long a stopped rank has between SIGTERM and SIGKILL, on cancel,
  // failure and shutdown alike.
  double grace_seconds = 10;
  // Limits and path roots; an empty admission.output_root is
  // <state_dir>/outputs.
  AdmissionOptions admission;
  // Most PENDING jobs one owner may have; 0: no limit. Further submissions
  // are refused with RESOURCE_EXHAUSTED.
  int64_t max_queued_jobs_per_user = 0;
  // Open WatchJob and GetJobLogs streams at most, in all and per caller.
  size_t max_watch_streams = 512;
  size_t max_watch_streams_per_user = 128;
  // Sizes of requests (spec text, overrides, pages, reasons).
  RequestLimits limits;
  // How many lines and bytes a rank may log (per second, and at once); the
  // excess is dropped with a notice.
  LogRateLimiter::Options log_rate;
  // Time; Clock::Real() when null. Tests pass a fake one.
  const Clock* clock = nullptr;
};

class Coordinator : public LaunchEvents {
 public:
  // Locks the state directory (FAILED_PRECONDITION naming the directory and
  // the holder's pid when another server has it), opens (or creates) the
  // store and moves the jobs that were RUNNING when a previous coordinator
  // stopped to RESTARTING. Adds no launcher.
  static absl::StatusOr<std::unique_ptr<Coordinator>> Create(
      const CoordinatorOptions& options, ServerMetrics* metrics = nullptr);
  ~Coordinator() override;

  // The address ranks report metrics to (host:port of the internal
  // service); set before Start().
  void SetReportAddress(const std::string& address);
  // Recover(), then starts the loop thread.
  void Start();
  // Stops what earlier coordinators left running of the unfinished jobs on
  // the launchers added so far (blocks up to the grace per launcher that
  // had some). Start() does it; tests that never Start() call it.
  void Recover();
  // One pass of the loop: inbox, exits, hangs, queue. The loop thread runs
  // it; tests that never Start() call it instead. Not reentrant.
  void Tick();
  // Stops the loop, then the ranks: SIGTERM, and SIGKILL to those still
  // running after the grace (they checkpoint meanwhile; their jobs stay
  // RUNNING in the store for the next coordinator to relaunch); ends every
  // watch stream. Blocks up to the grace and a little more. Idempotent.
  void Shutdown();

  // The job API. Errors are canonical: INVALID_ARGUMENT naming the spec
  // field (or job_id when it is not a job id), NOT_FOUND naming the job,
  // ... `owner` is who submits (for per-user limits and output folders; ""
  // when unknown), `owner_is_admin` whether as an admin (anonymous callers
  // of a server that knows nobody are). Submit stores the spec with
  // resources.device resolved (never auto: cuda when the launchers offer
  // GPUs now, else cpu) and refuses a CUDA job with more ranks than the
  // launchers have GPUs, used or free, and a CPU job with more ranks than
  // the server's own slots while no agent is connected (see Submit). The
  // request's sizes are checked first (options.limits). It resolves and
  // confines output_dir (Admission::ResolveOutputDir; PERMISSION_DENIED)
  // and refuses one that overlaps another job's output
  // (JobStore::CheckOutputFree; FAILED_PRECONDITION). None of them blocks
  // on the loop.
  absl::StatusOr<v1::Job> Submit(const std::string& spec_yaml,
                                 const std::vector<std::string>& overrides,
                                 const std::string& owner = "",
                                 bool owner_is_admin = true);
  absl::StatusOr<v1::Job> GetJob(const std::string& id);
  // `owner`: only the jobs this owner submitted.
  absl::StatusOr<v1::ListJobsResponse> ListJobs(
      const v1::ListJobsRequest& request,
      const std::optional<std::string>& owner = std::nullopt);
  // Commits CANCELLED at once; the loop stops the ranks right after.
  // INVALID_ARGUMENT for a reason longer than options.limits allows.
  absl::StatusOr<v1::Job> Cancel(const std::string& id,
                                 const std::string& reason);

  // A stream of the job's events: first a snapshot of the job, then its
  // state changes (and metric samples and log lines if asked), closed after
  // the job reached a final state and a last snapshot. RESOURCE_EXHAUSTED
  // past options.max_watch_streams, or max_watch_streams_per_user streams
  // of `caller` ("" for anonymous callers, who share one count).
  absl::StatusOr<std::shared_ptr<Subscription>> Watch(
      const std::string& id, bool metrics, bool logs,
      const std::string& caller = "");
  void Unwatch(const std::shared_ptr<Subscription>& subscription);

  // Stored output lines of the job (rank >= 0: that rank only) from line
  // `from_line` of each rank, in rank then line order.
  absl::StatusOr<std::vector<v1::LogLine>> ReadLogs(const std::string& id,
                                                    int64_t rank,
                                                    int64_t from_line);

  // A metric sample or heartbeat from a rank of the job's current attempt
  // (reports of other attempts, jobs or ranks are ignored).
  // Whom a rank's credential (MOMENTUM_TOKEN, issued per launch and rank)
  // speaks for; nullopt when it is unknown or its gang has ended.
  std::optional<RankKey> RankOf(const std::string& token) const {
    return credentials_.Find(token);
  }

  void OnMetric(const std::string& job_id, int64_t attempt,
                const v1::MetricSample& sample);
  void OnHeartbeat(const std::string& job_id, int64_t attempt, int64_t rank);
  // A rank's final account; rank 0's becomes the job's result (kNN, export
  // path, steps, images) when its gang ends well.
  void OnSummary(const std::string& job_id, int64_t attempt, int64_t rank,
                 const v1::RunSummary& summary);

  // Launchers come and go (agents); a removed launcher's ranks are lost.
  void AddLauncher(std::shared_ptr<Launcher> launcher);
  void RemoveLauncher(const Launcher* launcher);

  // LaunchEvents; any thread, including from inside Launch(). Output of a
  // rank that is not one of a running gang is dropped, and so is (with a
  // line on stderr) an event whose job_id is not a job id.
  void OnRankOutput(const std::string& job_id, int64_t attempt, int64_t rank,
                    const std::string& line) override;
  void OnRankExited(const std::string& job_id, int64_t attempt, int64_t rank,
                    int exit_code, int signal,
                    const std::string& description) override;

  // The folder where the job's ranks write: its output_path, resolved at
  // submission (for jobs stored before that: output_dir, under the job's
  // folder when relative).
  std::string OutputDirOf(const JobRecord& job) const;
  std::string JobDirOf(const std::string& id) const;

 private:
  Coordinator(const CoordinatorOptions& options,
              std::unique_ptr<JobStore> store, ServerMetrics* metrics,
              int lock_fd);

  struct Exit {
    std::string job_id;
    int64_t attempt = 0;
    int64_t rank = 0;
    int exit_code = 0;
    int signal = 0;
    std::string description;
  };
  // A rank of a launched gang.
  struct RankSlot {
    std::shared_ptr<Launcher> launcher;
    bool running = true;
    int gpu = -1;  // the GPU it owns on `launcher`; -1: a CPU rank (a slot)
  };
  struct RunningJob {
    int64_t attempt = 0;
    int64_t world_size = 0;
    std::map<int64_t, RankSlot> ranks;
    bool stopping = false;  // failed or cancelled: waiting for the ranks
    bool failed = false;
    int64_t max_restarts = 0;
    double restart_backoff_s = 0;
  };
  // What only the loop touches (Tick, and Shutdown after the loop ended).
  struct LoopState {
    std::map<std::string, RunningJob> running;
    std::map<const Launcher*, int64_t> used_slots;
    std::map<const Launcher*, std::set<int>> used_gpus;
    // A restarting job is relaunched no sooner than this.
    std::map<std::string, Clock::TimePoint> not_before;
  };

  void Loop();
  void HandleExit(const Exit& exit);
  void HandleCancel(const std::string& job_id);
  // The exits of the launcher's running ranks, which are lost with it.
  std::vector<Exit> LostRanks(const Launcher* launcher);
  // Commits RESTARTING (restarts left, unless `retry` is false) or FAILED
  // for `reason`, then stops the gang.
  void FailGang(const JobRecord& before, RunningJob& run, std::string reason,
                bool retry);
  void StopGang(const std::string& job_id, RunningJob& run);
  void Schedule(const std::vector<std::shared_ptr<Launcher>>& launchers);
  // Commits RUNNING and starts the gang of `queued` where `placement` says.
  void Launch(const JobRecord& queued, const JobSpec& spec,
              const std::vector<Placement>& placement);
  void FailUnlaunchable(const JobRecord& queued, const std::string& reason);
  // The job's output path checked again as at submission, on the
  // filesystem as it is now (a folder may have become a symlink since):
  // the path to launch with, or why the job may not be launched.
  absl::StatusOr<std::string> OutputPathAtLaunch(const JobRecord& job) const;
  void ReleaseRank(RankSlot& slot);
  void UpdateGauges(const std::vector<std::shared_ptr<Launcher>>& launchers);

  // Stores a line of the rank's output and publishes it to log watchers,
  // unchecked (OnRankOutput checks the gang and the rank's log rate).
  void StoreOutput(const std::string& job_id, int64_t rank,
                   const std::string& line);
  // The notice of `dropped` lines of the rank lost to its log rate limit.
  void StoreDroppedNotice(const std::string& job_id, int64_t rank,
                          int64_t dropped);
  v1::Job ToProto(const JobRecord& job);
  void PublishChange(const JobRecord& before, const JobRecord& after);
  void PushExit(Exit exit);
  std::vector<std::shared_ptr<Launcher>> Launchers();

  const CoordinatorOptions options_;
  const Clock& clock_;
  const Admission admission_;
  std::unique_ptr<JobStore> store_;
  ServerMetrics* const metrics_;
  const int lock_fd_;  // holds the state directory's lock
  GangHealth health_;
  JobLogs logs_;
  WatchHub watchers_;
  LogRateLimiter log_rate_;
  ProgressBoard progress_;
  RankCredentials credentials_;

  LoopState loop_state_;  // the loop thread's only
  std::thread loop_;

  // The inbox, and what other threads read.
  absl::Mutex mu_;
  absl::CondVar wake_cv_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  std::string report_address_ ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<Launcher>> launchers_ ABSL_GUARDED_BY(mu_);
  std::deque<Exit> exits_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> cancelled_ ABSL_GUARDED_BY(mu_);
  std::vector<const Launcher*> lost_ ABSL_GUARDED_BY(mu_);
  // (job, attempt) of the gangs launched and not yet ended: a rank's output
  // is kept only for these.
  // Their world size, to check reported ranks against.
  std::map<std::pair<std::string, int64_t>, int64_t> live_gangs_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_COORDINATOR_H_
