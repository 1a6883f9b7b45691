// Starting and describing child processes, shared by the worker's local
// launcher and the coordinator's launchers. Plain POSIX.
#ifndef MOMENTUM_COMMON_PROCESS_H_
#define MOMENTUM_COMMON_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace momentum {

// A TCP port on the loopback interface that is free at the moment of the
// call (the OS picks it). Another process could take it before the caller
// binds it; UNAVAILABLE when no socket can be bound.
absl::StatusOr<int64_t> PickFreePort();

struct SpawnOptions {
  // argv[0] is the program: a path, or a name looked up in PATH when it
  // holds no slash.
  std::vector<std::string> argv;
  // The whole environment, "NAME=value" each.
  std::vector<std::string> env;
  // Working directory of the child; this process's when empty.
  std::string cwd;
  // When >= 0, the child's stdout and stderr (stdin becomes /dev/null).
  int output_fd = -1;
  // Puts the child in a new process group of its own (its pid), so that
  // kill(-pid, sig) reaches it and everything it starts.
  bool new_process_group = false;
};

// Starts a child with no signals blocked. The error names the program and
// the errno (NOT_FOUND for a missing program).
absl::StatusOr<pid_t> Spawn(const SpawnOptions& options);

// This process's environment without the variables named in `drop`.
std::vector<std::string> EnvironmentWithout(
    const std::vector<std::string>& drop);

// The program `name` installed next to this one, or in the build tree's
// `build_subdir` beside this binary's folder (e.g. server/ -> worker/);
// else `name` itself, for PATH to find.
std::string FindSiblingBinary(const std::string& name,
                              const std::string& build_subdir);

// "exited with code 3", "was killed by signal 9 (SIGKILL)".
std::string DescribeWaitStatus(int status);

}  // namespace momentum

#endif  // MOMENTUM_COMMON_PROCESS_H_
