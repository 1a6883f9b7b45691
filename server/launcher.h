// Where the coordinator starts ranks: local processes on its own machine, or
// the machines of node agents. Both are a Launcher; the coordinator places
// ranks on launchers with free slots (CPU jobs) or free GPUs (CUDA jobs) and
// hears back through LaunchEvents.
#ifndef MOMENTUM_SERVER_LAUNCHER_H_
#define MOMENTUM_SERVER_LAUNCHER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace momentum::server {

// One launch of some of a job's ranks on one launcher.
struct LaunchRequest {
  std::string job_id;
  int64_t attempt = 1;  // 1 for the first launch, +1 per restart
  int64_t world_size = 1;
  std::vector<int64_t> ranks;  // the ranks to start here
  // A CUDA job's: the GPU each rank of `ranks` owns (same order), one of the
  // launcher's Gpus(); the rank runs with CUDA_VISIBLE_DEVICES=<gpu>. Empty
  // for a CPU job, whose ranks run with CUDA_VISIBLE_DEVICES empty.
  std::vector<int> gpus;
  // The spec as stored (resolved), unchanged, and the folder the ranks
  // write to (absolute), which replaces its output_dir (--output-dir).
  std::string spec_yaml;
  std::string output_dir;
  // Where rank 0 serves the c10d store.
  std::string master_addr;
  int64_t master_port = 0;
  // Extra environment for the ranks ("NAME=value").
  std::vector<std::string> env;
  // Each rank's own credential (same order as `ranks`), which it gets as
  // MOMENTUM_TOKEN to report with; empty when none is given.
  std::vector<std::string> credentials;
};

// What happens to launched ranks. Called from the launchers' own threads;
// implementations lock what they touch.
class LaunchEvents {
 public:
  virtual ~LaunchEvents() = default;
  // One line the rank wrote (stdout and stderr), without its newline.
  virtual void OnRankOutput(const std::string& job_id, int64_t attempt,
                            int64_t rank, const std::string& line) = 0;
  // The rank ended: exit_code >= 0 when it exited, else -1 and the signal.
  // `description` says how ("exited with code 1", "was killed by signal 9
  // (SIGKILL)").
  virtual void OnRankExited(const std::string& job_id, int64_t attempt,
                            int64_t rank, int exit_code, int signal,
                            const std::string& description) = 0;
};

class Launcher {
 public:
  virtual ~Launcher() = default;
  // For people: "local", "agent node-2 (10.0.0.2)".
  virtual std::string Name() const = 0;
  // The address other machines reach this launcher's ranks at (the store
  // address when rank 0 runs here).
  virtual std::string Address() const = 0;
  // CPU ranks it may run at once; 0 when it is gone.
  virtual int64_t Slots() const = 0;
  // The GPUs it offers, by CUDA index on its machine; empty when it has none
  // or is gone. A rank of a CUDA job takes one of these instead of a slot.
  virtual std::vector<int> Gpus() const = 0;
  // Starts the ranks and returns; OnRankExited follows for every rank it
  // started, and for every rank it could not start. An error (nothing
  // started) is for the caller to report for every rank.
  virtual absl::Status Launch(const LaunchRequest& request) = 0;
  // Sends SIGTERM to the ranks of the job's launch, then SIGKILL after
  // `grace_seconds` to those still running. Returns at once.
  virtual void Stop(const std::string& job_id, int64_t attempt,
                    double grace_seconds) = 0;
  // Ranks of the job's `attempt` that an earlier coordinator started here
  // and that may still run (it died without stopping them): stops them,
  // returns once they are gone, and says how many there were. Blocks up to
  // `grace_seconds` and a little more.
  virtual int StopLeftovers(const std::string& job_id, int64_t attempt,
                            double grace_seconds) {
    (void)job_id, (void)attempt, (void)grace_seconds;
    return 0;
  }
  // Ranks of any job that an earlier coordinator started here and that
  // still run, including those of jobs that ended in the store meanwhile
  // (cancelled just before that coordinator died): stops them all, blocks
  // as StopLeftovers does, and says how many there were. Called once the
  // unfinished jobs' leftovers are stopped, before anything is launched.
  virtual int StopEveryLeftover(double grace_seconds) {
    (void)grace_seconds;
    return 0;
  }
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_LAUNCHER_H_
