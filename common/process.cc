#include "common/process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

extern char** environ;

namespace momentum {
namespace {

std::vector<char*> CStrings(std::vector<std::string>& strings) {
  std::vector<char*> c_strings;
  c_strings.reserve(strings.size() + 1);
  for (std::string& s : strings) c_strings.push_back(s.data());
  c_strings.push_back(nullptr);
  return c_strings;
}

}  // namespace

absl::StatusOr<int64_t> PickFreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot pick a free port: socket: ", std::strerror(errno)));
  }
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::UnavailableError(
        absl::StrCat("cannot pick a free port: ", std::strerror(err)));
  }
  ::close(fd);
  return int64_t{ntohs(addr.sin_port)};
}

absl::StatusOr<pid_t> Spawn(const SpawnOptions& options) {
  if (options.argv.empty()) {
    return absl::InvalidArgumentError("Spawn: empty argv");
  }
  std::vector<std::string> argv = options.argv;
  std::vector<std::string> env = options.env;
  std::vector<char*> c_argv = CStrings(argv);
  std::vector<char*> c_env = CStrings(env);

  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // The calling thread may block signals (a program that sigwait()s does);
  // a child that inherited that mask would never see SIGTERM.
  sigset_t no_signals;
  sigemptyset(&no_signals);
  posix_spawnattr_setsigmask(&attr, &no_signals);
  short flags = POSIX_SPAWN_SETSIGMASK;
  if (options.new_process_group) {
    posix_spawnattr_setpgroup(&attr, 0);
    flags |= POSIX_SPAWN_SETPGROUP;
  }
  posix_spawnattr_setflags(&attr, flags);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (options.output_fd >= 0) {
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, options.output_fd, 1);
    posix_spawn_file_actions_adddup2(&actions, options.output_fd, 2);
  }
  if (!options.cwd.empty()) {
    posix_spawn_file_actions_addchdir_np(&actions, options.cwd.c_str());
  }
  pid_t pid = -1;
  const int err = ::posix_spawnp(&pid, c_argv[0], &actions, &attr,
                                 c_argv.data(), c_env.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (err != 0) {
    return absl::ErrnoToStatus(err,
                               absl::StrCat("cannot start ", options.argv[0]));
  }
  return pid;
}

const char* const kRankAllowList[] = {
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*",
    "TZ", "TMPDIR", "LD_LIBRARY_PATH", "OMP_*", "MKL_*", "KMP_*", "OPENBLAS_*",
    "MALLOC_*", "CUDA_*", "NCCL_*", "GLOO_*", "TORCH_*", "PYTORCH_*",
    "MOMENTUM_TLS_*",
    // Fault injection (MOMENTUM_FAULT_NAN_STEP), which the tests set on
    // the server to reach its ranks.
    "MOMENTUM_FAULT_*", nullptr};

bool RankMayInherit(const std::string& name) {
  for (const char* const* allowed = kRankAllowList; *allowed != nullptr;
       ++allowed) {
    const absl::string_view pattern(*allowed);
    if (absl::EndsWith(pattern, "*")) {
      if (absl::StartsWith(name, pattern.substr(0, pattern.size() - 1))) {
        return true;
      }
    } else if (name == pattern) {
      return true;
    }
  }
  return false;
}

std::vector<std::string> RankEnvironment(
    const RankPlace& place, const std::vector<std::string>& extra) {
  std::vector<std::string> drop = {
      "RANK",        "LOCAL_RANK",  "WORLD_SIZE", "LOCAL_WORLD_SIZE",
      "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "ROLE_RANK"};
  if (place.cuda_visible_devices) drop.push_back("CUDA_VISIBLE_DEVICES");
  if (place.cpus) drop.push_back("MOMENTUM_CPUS");
  std::vector<std::string> env = extra;
  for (std::string& var : EnvironmentWithout(drop)) {
    if (place.inherit_all || RankMayInherit(var.substr(0, var.find('=')))) {
      env.push_back(std::move(var));
    }
  }
  env.push_back(absl::StrCat("RANK=", place.rank));
  env.push_back(absl::StrCat("LOCAL_RANK=", place.local_rank));
  env.push_back(absl::StrCat("WORLD_SIZE=", place.world_size));
  env.push_back(absl::StrCat("LOCAL_WORLD_SIZE=", place.local_world_size));
  env.push_back(absl::StrCat("MASTER_ADDR=", place.master_addr));
  env.push_back(absl::StrCat("MASTER_PORT=", place.master_port));
  if (place.cuda_visible_devices) {
    env.push_back("CUDA_VISIBLE_DEVICES=" + *place.cuda_visible_devices);
  }
  if (place.cpus) env.push_back("MOMENTUM_CPUS=" + *place.cpus);
  return env;
}

std::vector<std::string> EnvironmentWithout(
    const std::vector<std::string>& drop) {
  std::vector<std::string> env;
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    const absl::string_view var(*entry);
    const absl::string_view name = var.substr(0, var.find('='));
    bool dropped = false;
    for (const std::string& d : drop) dropped = dropped || name == d;
    if (!dropped) env.emplace_back(var);
  }
  return env;
}

std::string FindSiblingBinary(const std::string& name,
                              const std::string& build_subdir) {
  std::error_code ec;
  const std::filesystem::path self =
      std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (const std::filesystem::path& candidate :
         {self.parent_path() / name,
          self.parent_path().parent_path() / build_subdir / name}) {
      if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
    }
  }
  return name;
}

std::string DescribeWaitStatus(int status) {
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* name = sigabbrev_np(sig);
    return absl::StrCat(
        "was killed by signal ", sig,
        name != nullptr ? absl::StrCat(" (SIG", name, ")") : std::string());
  }
  return absl::StrCat("exited with code ", WEXITSTATUS(status));
}

}  // namespace momentum
