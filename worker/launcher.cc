#include "worker/launcher.h"

#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <optional>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/process.h"
#include "worker/cpu_affinity.h"

namespace momentum::worker {
namespace {

using Clock = std::chrono::steady_clock;

// The wait loop polls: waitpid(WNOHANG) on each rank, then the recorded
// signals. Blocking alternatives (sigtimedwait, signalfd) need SIGCHLD,
// SIGINT and SIGTERM blocked in every thread of the process, which a library
// cannot arrange. 10 ms is quick enough for a gang to stop together and costs
// nothing next to a training step.
constexpr std::chrono::milliseconds kPollInterval{10};

// The signals LaunchLocal forwards to the ranks.
constexpr int kForwardedSignals[] = {SIGINT, SIGTERM};

// Signals received while LaunchLocal runs, one bit per signal number. Written
// only by the handler, read and cleared only by the wait loop; a lock-free
// atomic is safe to touch in a signal handler.
std::atomic<uint32_t> g_pending_signals{0};
static_assert(std::atomic<uint32_t>::is_always_lock_free);
static_assert(SIGINT < 32 && SIGTERM < 32);

// Set while a LaunchLocal runs: the handlers are per process.
std::atomic<bool> g_launch_running{false};

void RecordSignal(int sig) {
  g_pending_signals.fetch_or(uint32_t{1} << sig, std::memory_order_relaxed);
}

// Records SIGINT and SIGTERM into g_pending_signals for its lifetime and
// restores the previous handlers when destroyed.
class ScopedSignalCapture {
 public:
  ScopedSignalCapture() {
    g_pending_signals.store(0);
    struct sigaction action = {};
    action.sa_handler = RecordSignal;
    sigemptyset(&action.sa_mask);
    // Other threads' blocking calls resume instead of failing with EINTR.
    action.sa_flags = SA_RESTART;
    for (size_t i = 0; i < std::size(kForwardedSignals); ++i) {
      if (::sigaction(kForwardedSignals[i], &action, &previous_[i]) != 0) {
        std::perror("momentum launcher: sigaction");
        std::abort();
      }
    }
  }
  ~ScopedSignalCapture() {
    for (size_t i = 0; i < std::size(kForwardedSignals); ++i) {
      ::sigaction(kForwardedSignals[i], &previous_[i], nullptr);
    }
  }
  ScopedSignalCapture(const ScopedSignalCapture&) = delete;
  ScopedSignalCapture& operator=(const ScopedSignalCapture&) = delete;

  // The signals received since the last call, one bit per signal number.
  uint32_t Take() { return g_pending_signals.exchange(0); }

 private:
  struct sigaction previous_[std::size(kForwardedSignals)];
};

const char* SignalName(int sig) { return sig == SIGINT ? "SIGINT" : "SIGTERM"; }

std::vector<std::string> RankEnvironment(const LaunchOptions& options,
                                         int64_t port, int64_t rank) {
  momentum::RankPlace place;
  if (options.split_cpus && options.nproc > 1) {
    const absl::StatusOr<std::vector<int>> allowed = AllowedCpus();
    const std::vector<int> share = allowed.ok()
                                       ? CpuShare(*allowed, rank, options.nproc)
                                       : std::vector<int>();
    if (!share.empty()) place.cpus = CpuListString(share);
  }
  place.rank = rank;
  place.local_rank = rank;
  place.world_size = options.nproc;
  place.local_world_size = options.nproc;
  place.master_addr = options.master_addr;
  place.master_port = port;
  return momentum::RankEnvironment(place);
}

using momentum::SpawnOptions;

absl::StatusOr<pid_t> SpawnRank(const LaunchOptions& options, int64_t port,
                                int64_t rank) {
  SpawnOptions spawn;
  spawn.argv = options.argv;
  spawn.env = RankEnvironment(options, port, rank);
  absl::StatusOr<pid_t> pid = momentum::Spawn(spawn);
  if (!pid.ok()) {
    return absl::Status(
        pid.status().code(),
        absl::StrCat("cannot start rank ", rank, " (", options.argv[0],
                     "): ", pid.status().message()));
  }
  return pid;
}

// One started rank, from spawn until it has been reaped.
struct Rank {
  pid_t pid = -1;
  bool running = false;
  bool got_sigkill = false;  // the launcher SIGKILLed it after the grace
  // The wait status once reaped; nullopt when it was reaped elsewhere (e.g.
  // SIGCHLD ignored by the process) and its status is lost.
  std::optional<int> status;
};

std::string DescribeEnd(int64_t rank, const std::optional<int>& status) {
  if (!status.has_value()) {
    return absl::StrCat("rank ", rank,
                        " ended but its exit status was lost (reaped "
                        "elsewhere; is SIGCHLD ignored?)");
  }
  if (WIFSIGNALED(*status)) {
    return absl::StrCat("rank ", rank, " was killed by signal ",
                        WTERMSIG(*status));
  }
  return absl::StrCat("rank ", rank, " exited with code ",
                      WEXITSTATUS(*status));
}

// Whether a rank's end fails the gang. Before the launcher forwards a signal
// only exit code 0 is a success; after, also the ends that the signal (or the
// SIGKILL after the grace) explains: exit codes 130 and 143 (the worker's
// "stopped after a checkpoint"), death by SIGINT, SIGTERM or our SIGKILL.
bool EndFails(const Rank& rank, bool signal_forwarded) {
  if (!rank.status.has_value()) return true;
  const int status = *rank.status;
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return false;
  if (!signal_forwarded) return true;
  if (WIFEXITED(status)) {
    return WEXITSTATUS(status) != 130 && WEXITSTATUS(status) != 143;
  }
  const int sig = WTERMSIG(status);
  return !(sig == SIGINT || sig == SIGTERM ||
           (sig == SIGKILL && rank.got_sigkill));
}

void SignalRunning(std::vector<Rank>& ranks, int sig) {
  for (Rank& rank : ranks) {
    // Only ranks not yet reaped: their pids cannot have been reused.
    if (rank.running) ::kill(rank.pid, sig);
  }
}

// For a failed start: the ranks already running have done nothing yet.
void KillAndReap(std::vector<Rank>& ranks) {
  SignalRunning(ranks, SIGKILL);
  for (Rank& rank : ranks) {
    if (!rank.running) continue;
    while (::waitpid(rank.pid, nullptr, 0) < 0 && errno == EINTR) {
    }
    rank.running = false;
  }
}

// Waits until every rank has been reaped, stopping the gang on the first
// failure or on a signal, as LaunchLocal describes.
LaunchResult Supervise(std::vector<Rank>& ranks,
                       std::chrono::milliseconds grace,
                       ScopedSignalCapture& signals) {
  int64_t running = static_cast<int64_t>(ranks.size());
  int64_t failed_rank = -1;
  int first_signal = 0;                      // the first signal forwarded
  std::optional<Clock::time_point> kill_at;  // set once the gang is stopping
  bool sigkill_sent = false;
  std::vector<int64_t> ended;
  while (running > 0) {
    // Reap first, then look at the signals: a rank that died of the same
    // Ctrl-C as the launcher ended after the launcher's handler ran, so its
    // end is judged with that signal known.
    ended.clear();
    for (size_t i = 0; i < ranks.size(); ++i) {
      Rank& rank = ranks[i];
      if (!rank.running) continue;
      int status = 0;
      const pid_t r = ::waitpid(rank.pid, &status, WNOHANG);
      if (r == 0 || (r < 0 && errno == EINTR)) continue;
      rank.running = false;
      if (r == rank.pid) rank.status = status;
      ended.push_back(static_cast<int64_t>(i));
      --running;
    }
    const uint32_t pending = signals.Take();
    for (int sig : kForwardedSignals) {
      if ((pending & (uint32_t{1} << sig)) == 0) continue;
      if (first_signal == 0) first_signal = sig;
      SignalRunning(ranks, sig);
      if (!kill_at.has_value()) kill_at = Clock::now() + grace;
    }
    for (int64_t i : ended) {
      if (failed_rank < 0 && EndFails(ranks[i], first_signal != 0)) {
        failed_rank = i;
        SignalRunning(ranks, SIGTERM);
        if (!kill_at.has_value()) kill_at = Clock::now() + grace;
      }
    }
    if (kill_at.has_value() && !sigkill_sent && Clock::now() >= *kill_at) {
      for (Rank& rank : ranks) rank.got_sigkill = rank.running;
      SignalRunning(ranks, SIGKILL);
      sigkill_sent = true;
    }
    if (running > 0) std::this_thread::sleep_for(kPollInterval);
  }

  LaunchResult result;
  result.failed_rank = failed_rank;
  if (failed_rank >= 0) {
    const std::optional<int>& status = ranks[failed_rank].status;
    result.exit_code =
        status.has_value() && WIFEXITED(*status) ? WEXITSTATUS(*status) : 1;
    result.message = DescribeEnd(failed_rank, status);
  } else if (first_signal != 0) {
    result.exit_code = 128 + first_signal;
    result.message = absl::StrCat("stopped by ", SignalName(first_signal));
  } else {
    result.exit_code = 0;
    result.message =
        absl::StrCat("all ", ranks.size(), " ranks exited with code 0");
  }
  std::vector<std::string> killed;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (ranks[i].got_sigkill) killed.push_back(absl::StrCat("rank ", i));
  }
  if (!killed.empty()) {
    absl::StrAppend(&result.message, "; SIGKILL after the ", grace.count(),
                    " ms grace: ", absl::StrJoin(killed, ", "));
  }
  return result;
}

}  // namespace

absl::StatusOr<LaunchResult> LaunchLocal(const LaunchOptions& options) {
  if (options.argv.empty() || options.argv[0].empty()) {
    return absl::InvalidArgumentError("launcher: argv must name a program");
  }
  if (options.nproc < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("launcher: nproc must be >= 1, got ", options.nproc));
  }
  if (options.master_port < 0 || options.master_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("launcher: master_port must be in [0, 65535], got ",
                     options.master_port));
  }
  if (options.grace.count() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "launcher: grace must be >= 0 ms, got ", options.grace.count()));
  }
  if (g_launch_running.exchange(true)) {
    return absl::FailedPreconditionError(
        "launcher: another LaunchLocal is running in this process");
  }
  struct ReleaseOnReturn {
    ~ReleaseOnReturn() { g_launch_running.store(false); }
  } release;

  int64_t port = options.master_port;
  if (port == 0) {
    absl::StatusOr<int64_t> picked = momentum::PickFreePort();
    if (!picked.ok()) return picked.status();
    port = *picked;
  }

  // Capture before the first spawn: from then on a signal reaches the ranks.
  ScopedSignalCapture signals;
  std::vector<Rank> ranks(options.nproc);
  for (int64_t i = 0; i < options.nproc; ++i) {
    absl::StatusOr<pid_t> pid = SpawnRank(options, port, i);
    if (!pid.ok()) {
      KillAndReap(ranks);
      return pid.status();
    }
    ranks[i].pid = *pid;
    ranks[i].running = true;
  }
  return Supervise(ranks, options.grace, signals);
}

}  // namespace momentum::worker
