// Which CPUs a rank runs on (resources.cpu_affinity). A launcher that owns
// the machine (momentum-worker --nproc N) splits the CPUs it may run on (its
// affinity mask, as a container's cpuset or taskset leave it) into
// contiguous shares, one per local rank in order, and hands each rank its
// share in MOMENTUM_CPUS; the rank binds all its threads to it. The intra-op
// pool, the loader and the collectives' threads of one rank then stay on its
// cores and caches, and two ranks' compute threads never queue on one core
// while another idles. A launcher that shares the machine with other jobs
// hands out nothing, and its ranks stay unbound. Plain POSIX (Linux): no
// LibTorch.
//
// Usage:
//   // the launcher, per rank
//   MOMENTUM_ASSIGN_OR_RETURN(std::vector<int> cpus, AllowedCpus());
//   env.push_back("MOMENTUM_CPUS=" +
//                 CpuListString(CpuShare(cpus, local_rank, local_ranks)));
//   // the rank, before its thread pools start
//   MOMENTUM_ASSIGN_OR_RETURN(std::vector<int> mine, ParseCpuList(value));
//   MOMENTUM_RETURN_IF_ERROR(BindProcess(mine));
#ifndef MOMENTUM_WORKER_CPU_AFFINITY_H_
#define MOMENTUM_WORKER_CPU_AFFINITY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace momentum::worker {

// The CPUs the calling thread may run on, ascending.
absl::StatusOr<std::vector<int>> AllowedCpus();

// Local rank `local_rank`'s share of `cpus` among `local_ranks` ranks:
// contiguous slices in order whose sizes differ by at most one, the larger
// first (7 CPUs, 3 ranks: 3, 2, 2). Empty when there are fewer CPUs than
// ranks or the rank is out of range.
std::vector<int> CpuShare(const std::vector<int>& cpus, int64_t local_rank,
                          int64_t local_ranks);

// Binds every thread of this process, and so every thread it starts later,
// to `cpus`. INVALID_ARGUMENT for an empty list; the errno of
// sched_setaffinity otherwise (a thread that ends meanwhile is skipped).
absl::Status BindProcess(const std::vector<int>& cpus);

// "0-3,8,10-11", as taskset -c and /proc/self/status write them.
std::string CpuListString(const std::vector<int>& cpus);

// The CPUs of such a list, ascending and without repeats. INVALID_ARGUMENT
// naming `name` and the rule for anything else than comma-separated CPU
// numbers and ranges low-high in [0, 8191], e.g.
//   MOMENTUM_CPUS must be CPU numbers and ranges like 0-3,8, got "3-1"
absl::StatusOr<std::vector<int>> ParseCpuList(const std::string& text,
                                              const std::string& name);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_CPU_AFFINITY_H_
