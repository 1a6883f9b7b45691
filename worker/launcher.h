// The local launcher behind `momentum-worker --nproc N`, as
// `torchrun --standalone --nproc-per-node N`: starts N copies of a command on
// this machine, one per rank, hands each the variables torchrun sets (RANK,
// LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and
// waits for them as one gang. When a rank fails, the others are stopped; a
// SIGINT or SIGTERM sent to the launcher is passed on to every rank. Plain
// POSIX: no LibTorch.
//
// Usage:
//   LaunchOptions options;
//   options.argv = {"/proc/self/exe", "--config", "job.yaml"};
//   options.nproc = 4;
//   absl::StatusOr<LaunchResult> result = LaunchLocal(options);
//   if (!result.ok()) return 1;  // a rank could not be started
//   if (result->exit_code != 0) std::cerr << result->message << "\n";
//   return result->exit_code;
#ifndef MOMENTUM_WORKER_LAUNCHER_H_
#define MOMENTUM_WORKER_LAUNCHER_H_

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace momentum::worker {

struct LaunchOptions {
  // The command every rank runs. argv[0] is the program: a path, or a name
  // looked up in PATH when it holds no slash.
  std::vector<std::string> argv;
  int64_t nproc = 1;
  std::string master_addr = "127.0.0.1";
  // 0: pick a free loopback port. The port is free when it is picked and
  // rank 0 binds it moments later; another process could take it in between,
  // as with torchrun --standalone, and rank 0's rendezvous then fails.
  int64_t master_port = 0;
  // After SIGTERM, how long a rank has to exit before it gets SIGKILL. The
  // worker writes a checkpoint when it is told to stop, hence seconds.
  std::chrono::milliseconds grace{10000};
  // Splits the CPUs this process may run on among the ranks (contiguous
  // shares in rank order, worker/cpu_affinity.h) and hands each its share
  // in MOMENTUM_CPUS, which it binds its threads to (resources.cpu_affinity
  // auto). Nothing is handed out with one rank or fewer CPUs than ranks.
  bool split_cpus = false;
};

struct LaunchResult {
  // 0 when every rank exited with 0. When a rank failed: its exit code, or 1
  // when it was killed by a signal. Otherwise, when the launcher received
  // SIGTERM: 143; SIGINT: 130.
  int exit_code = 0;
  int64_t failed_rank = -1;  // the first rank that failed; -1 when none did
  // What happened, e.g. "rank 1 exited with code 3", "rank 0 was killed by
  // signal 9", "stopped by SIGTERM", "all 4 ranks exited with code 0"; ranks
  // that did not stop within the grace are named after a "; ".
  std::string message;
};

// Starts options.nproc child processes running options.argv, each with its
// RANK and LOCAL_RANK (0 .. nproc-1), WORLD_SIZE and LOCAL_WORLD_SIZE (nproc),
// MASTER_ADDR and MASTER_PORT, and the rest of this process's environment;
// they share its stdin, stdout, stderr and process group. Blocks until every
// rank has ended and has been reaped: it returns no sooner and leaves no
// child behind.
//
// The first rank that exits with a non-zero code or dies by a signal fails the
// gang: the others get SIGTERM and, `grace` later, SIGKILL; the result names
// that rank and how it ended. A rank that exits with 0 leaves the others
// running.
//
// While it waits, LaunchLocal catches SIGINT and SIGTERM for the whole
// process (its handlers only record the signal; the previous ones are
// restored on return) and forwards every one it receives to each rank still
// running; the ranks then have `grace` to exit. After a forwarded signal a
// rank that exits with 0, 130 or 143 or dies by SIGINT, SIGTERM or the
// launcher's SIGKILL ends as expected, and the result is 143 (130 for SIGINT);
// any other ending fails the gang as above. Threads that block these signals
// do not receive them; if every thread blocks them, nothing is forwarded.
//
// Returns INVALID_ARGUMENT for bad options, FAILED_PRECONDITION when another
// LaunchLocal is running in this process (the handlers are per process), an
// error for the errno of posix_spawn when a rank cannot be started (NOT_FOUND
// for a missing program; the ranks started before it are killed and reaped),
// UNAVAILABLE when no free port can be picked.
absl::StatusOr<LaunchResult> LaunchLocal(const LaunchOptions& options);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_LAUNCHER_H_
