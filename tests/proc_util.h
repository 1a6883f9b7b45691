// Processes seen through /proc, for tests that check what is left running.
#ifndef MOMENTUM_TESTS_PROC_UTIL_H_
#define MOMENTUM_TESTS_PROC_UTIL_H_

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/types.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/file_util.h"

extern char** environ;

namespace momentum::testing {

// Where CTest put the binaries (MOMENTUM_BINARY_DIR), else ".".
inline std::string BinaryDir() {
  const char* bin = std::getenv("MOMENTUM_BINARY_DIR");
  return bin ? bin : ".";
}

// The whole text of `path` ("" when it cannot be read).
inline std::string ReadFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  return text.ok() ? *std::move(text) : std::string();
}

// Children of `parent`, from /proc.
inline std::vector<pid_t> ChildrenOf(pid_t parent) {
  std::vector<pid_t> out;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(entry.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;
    // pid (comm) state ppid ...: comm may hold spaces, so parse after ')'.
    std::istringstream rest(line.substr(line.rfind(')') + 2));
    std::string state;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid == parent) out.push_back(std::stoi(name));
  }
  return out;
}

// The child of `parent` whose environment says RANK=`rank`; 0 if none.
inline pid_t RankChild(pid_t parent, int rank) {
  for (pid_t pid : ChildrenOf(parent)) {
    std::ifstream env("/proc/" + std::to_string(pid) + "/environ");
    std::string var;
    while (std::getline(env, var, '\0')) {
      if (var == "RANK=" + std::to_string(rank)) return pid;
    }
  }
  return 0;
}

// Starts args[0] with its stdout and stderr appended to `log`; -1 on error.
inline pid_t SpawnLogged(std::vector<std::string> args,
                         const std::string& log) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(),
                                   O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = -1;
  if (posix_spawn(&pid, args[0].c_str(), &actions, nullptr, argv.data(),
                  environ) != 0) {
    pid = -1;
  }
  posix_spawn_file_actions_destroy(&actions);
  return pid;
}

// Sends `signal` (SIGTERM: a clean stop; SIGKILL: a crash that stops
// nothing) and waits for the process to end.
inline void StopAndReap(pid_t pid, int signal = SIGTERM) {
  if (pid <= 0) return;
  ::kill(pid, signal);
  int status = 0;
  ::waitpid(pid, &status, 0);
}

// Polls `done` until it holds (true) or `limit` passes (false). The limit
// only ends a broken run; nothing is asserted about time.
template <typename Done>
bool Eventually(Done done,
                std::chrono::milliseconds limit = std::chrono::seconds(60)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return done();
}

// A process (momentum-server, momentum-agent) with its output in `log`;
// SIGTERM and reaped by the destructor.
class Process {
 public:
  Process(std::vector<std::string> args, std::string log)
      : log_(std::move(log)), pid_(SpawnLogged(std::move(args), log_)) {}
  // SIGTERM, and SIGKILL if it is still there after a minute (a server that
  // no longer stops must not hang the test).
  ~Process() { SignalAndWait(SIGTERM, std::chrono::seconds(60)); }
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  // SIGTERM by default; SIGKILL: it dies without stopping anything.
  void Stop(int signal = SIGTERM) {
    StopAndReap(pid_, signal);
    pid_ = -1;
  }
  // Its exit status once it ended by itself (-1 if it did not, or was
  // killed by a signal).
  int WaitForExit() {
    int status = 0;
    if (pid_ <= 0 || ::waitpid(pid_, &status, 0) != pid_) return -1;
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  // Sends `signal` and waits up to `limit` for the exit; its status as
  // WaitForExit() says, or -2 when it is still running (then it is killed).
  int SignalAndWait(int signal, std::chrono::milliseconds limit) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, signal);
    int status = 0;
    const bool ended = Eventually(
        [&] { return ::waitpid(pid_, &status, WNOHANG) == pid_; }, limit);
    if (!ended) {
      Stop(SIGKILL);
      return -2;
    }
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  pid_t pid() const { return pid_; }
  std::string log() const { return ReadFile(log_); }

 private:
  std::string log_;
  pid_t pid_;
};

}  // namespace momentum::testing

#endif  // MOMENTUM_TESTS_PROC_UTIL_H_
