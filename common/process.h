// Starting and describing child processes, shared by the worker's local
// launcher and the coordinator's launchers. Plain POSIX.
#ifndef MOMENTUM_COMMON_PROCESS_H_
#define MOMENTUM_COMMON_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <optional>
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

// Where one rank of a group sits, as torchrun's variables say it.
struct RankPlace {
  int64_t rank = 0;
  int64_t local_rank = 0;
  int64_t world_size = 1;
  int64_t local_world_size = 1;
  std::string master_addr;
  int64_t master_port = 0;
  // CUDA_VISIBLE_DEVICES for the rank: its one GPU, or "" to hide every
  // GPU; unset (nullopt) leaves the inherited value alone.
  std::optional<std::string> cuda_visible_devices;
  // MOMENTUM_CPUS for the rank: the CPUs it binds its threads to
  // (worker/cpu_affinity.h); unset (nullopt) passes none.
  std::optional<std::string> cpus;
  // Which of this process's variables the rank inherits: all of them (a
  // user's own `momentum-worker --nproc`), or only kRankAllowList (ranks
  // the coordinator or an agent starts: none of their secrets).
  bool inherit_all = true;
};

// What a rank started by the coordinator or an agent inherits from it: the
// system's basics (PATH, HOME, USER, LANG, LC_*, TZ, TMPDIR,
// LD_LIBRARY_PATH), the threading, allocator, CUDA, NCCL, Gloo and torch
// settings (OMP_*, MKL_*, KMP_*, OPENBLAS_*, MALLOC_*, CUDA_*, NCCL_*,
// GLOO_*, TORCH_*, PYTORCH_*), the TLS files ranks report with
// (MOMENTUM_TLS_*) and fault injection (MOMENTUM_FAULT_*). A name ending in
// '*' is a prefix.
extern const char* const kRankAllowList[];

// Whether `name` is on kRankAllowList.
bool RankMayInherit(const std::string& name);

// The one definition of a rank's environment, for every launcher (the
// coordinator's, an agent's, momentum-worker --nproc): `extra` first
// (getenv() takes the first of a name, so a caller may pin LOCAL_RANK and
// the like), then this process's environment without the rank variables,
// then RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT and, when set, CUDA_VISIBLE_DEVICES.
std::vector<std::string> RankEnvironment(
    const RankPlace& place, const std::vector<std::string>& extra = {});

// The program `name` installed next to this one, or in the build tree's
// `build_subdir` beside this binary's folder (e.g. server/ -> worker/);
// else `name` itself, for PATH to find.
std::string FindSiblingBinary(const std::string& name,
                              const std::string& build_subdir);

// "exited with code 3", "was killed by signal 9 (SIGKILL)".
std::string DescribeWaitStatus(int status);

}  // namespace momentum

#endif  // MOMENTUM_COMMON_PROCESS_H_
