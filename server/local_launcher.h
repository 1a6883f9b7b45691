// Ranks as child processes of the coordinator on its own machine: the
// embedded default. Each rank runs `momentum-worker --config spec.yaml` in a
// process group of its own, with torchrun's variables (RANK, WORLD_SIZE,
// LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), the GPU it owns as
// CUDA_VISIBLE_DEVICES (empty for a CPU rank: it sees no GPU) and the
// request's extra environment; its stdout and stderr come back line by line.
#ifndef MOMENTUM_SERVER_LOCAL_LAUNCHER_H_
#define MOMENTUM_SERVER_LOCAL_LAUNCHER_H_

#include <sys/types.h>

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/launcher.h"

namespace momentum::server {

// Thread-safe. Owns one thread per rank (it reads the rank's output, then
// reaps it) and one per Stop() (SIGKILL after the grace); the destructor
// kills what still runs and joins them all. It calls LaunchEvents from those
// threads, and from Launch() for a rank it cannot start, never under its
// own lock; one mutex, a leaf.
class LocalLauncher : public Launcher {
 public:
  // `work_dir`: each launch gets `<work_dir>/<job_id>/attempt-<n>/` with the
  // spec the ranks read; it is their working directory. `gpus`: the CUDA
  // indices it offers (gpus.h). `events` outlives the launcher.
  LocalLauncher(std::string worker_binary, int64_t slots, std::vector<int> gpus,
                std::string work_dir, LaunchEvents* events);
  // Kills (SIGKILL) whatever still runs and joins its threads.
  ~LocalLauncher() override;

  std::string Name() const override { return "local"; }
  std::string Address() const override { return "127.0.0.1"; }
  int64_t Slots() const override { return slots_; }
  std::vector<int> Gpus() const override { return gpus_; }
  absl::Status Launch(const LaunchRequest& request) override;
  void Stop(const std::string& job_id, int64_t attempt,
            double grace_seconds) override;
  // StopLeftoverRanks() on the attempt's folder.
  int StopLeftovers(const std::string& job_id, int64_t attempt,
                    double grace_seconds) override;
  // Every rank still running in an attempt's folder under the work
  // directory (found by its working directory and MOMENTUM_JOB_ID), of any
  // job: what a coordinator killed before it could stop them left there
  // (a cancelled job's ranks, say). Stopped as StopLeftoverRanks() does.
  int StopEveryLeftover(double grace_seconds) override;

  // A rank's line longer than this comes back in pieces of this size.
  static constexpr size_t kMaxOutputLineBytes = 16 * 1024;

  // Every running rank: SIGTERM (a rank checkpoints and exits), SIGKILL to
  // those left after `grace_seconds`; returns once all are gone.
  void StopAll(double grace_seconds);

  // Process ids of the ranks still running, for tests and diagnostics.
  std::vector<pid_t> RunningPids() const;

  // Ranks a previous coordinator started in `attempt_dir` and that still
  // run (it died without stopping them): SIGTERM to each one's process
  // group, SIGKILL after `grace_seconds`, and returns once they are gone,
  // with how many there were. Each rank's pid and start time are in
  // rank-<r>.pid there while it runs, so a reused pid is left alone; a rank
  // without one (its coordinator was killed between the spawn and the
  // file's write) is found by its working directory and its
  // MOMENTUM_JOB_ID (the folder above `attempt_dir`).
  static int StopLeftoverRanks(const std::string& attempt_dir,
                               double grace_seconds);

 private:
  struct Process {
    std::string pid_file;
    std::string job_id;
    int64_t attempt = 0;
    int64_t rank = 0;
    pid_t pid = -1;
    bool running = true;
  };
  struct Thread {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  void Supervise(std::shared_ptr<Process> process, int read_fd);
  void KillAfter(std::string job_id, int64_t attempt, double grace_seconds);
  // Starts fn on a thread of its own, after joining the threads that ended
  // and forgetting the processes that were reaped. Call with mu_ held.
  template <typename Fn>
  void StartThreadLocked(Fn fn) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string worker_binary_;
  const int64_t slots_;
  const std::vector<int> gpus_;
  const std::string work_dir_;
  LaunchEvents* const events_;

  // Whether a rank (of the job's attempt; of any job when `job_id` is
  // null) still runs.
  bool RunningLocked(const std::string* job_id, int64_t attempt) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  // Guards the fields below and each Process's `running`.
  mutable absl::Mutex mu_;
  absl::CondVar shutdown_cv_;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::shared_ptr<Process>> processes_ ABSL_GUARDED_BY(mu_);
  std::vector<Thread> threads_ ABSL_GUARDED_BY(mu_);
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_LOCAL_LAUNCHER_H_
