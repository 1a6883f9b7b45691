#include "worker/cpu_affinity.h"

#include <dirent.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace momentum::worker {
namespace {

// A mask large enough for any CPU number the kernel may report.
constexpr int kMaxCpus = 8192;

struct CpuMask {
  CpuMask() : set(CPU_ALLOC(kMaxCpus)), size(CPU_ALLOC_SIZE(kMaxCpus)) {
    CPU_ZERO_S(size, set);
  }
  ~CpuMask() { CPU_FREE(set); }
  CpuMask(const CpuMask&) = delete;
  CpuMask& operator=(const CpuMask&) = delete;
  cpu_set_t* set;
  size_t size;
};

absl::Status ErrnoStatus(const std::string& what, int err) {
  return absl::Status(absl::ErrnoToStatusCode(err),
                      absl::StrCat(what, ": ", std::strerror(err)));
}

}  // namespace

absl::StatusOr<std::vector<int>> AllowedCpus() {
  CpuMask mask;
  if (sched_getaffinity(0, mask.size, mask.set) != 0) {
    return ErrnoStatus("sched_getaffinity", errno);
  }
  std::vector<int> cpus;
  for (int cpu = 0; cpu < kMaxCpus; ++cpu) {
    if (CPU_ISSET_S(cpu, mask.size, mask.set)) cpus.push_back(cpu);
  }
  return cpus;
}

std::vector<int> CpuShare(const std::vector<int>& cpus, int64_t local_rank,
                          int64_t local_ranks) {
  const int64_t n = static_cast<int64_t>(cpus.size());
  if (local_ranks < 1 || local_rank < 0 || local_rank >= local_ranks ||
      n < local_ranks) {
    return {};
  }
  const int64_t base = n / local_ranks, extra = n % local_ranks;
  const int64_t begin =
      local_rank * base + (local_rank < extra ? local_rank : extra);
  const int64_t size = base + (local_rank < extra ? 1 : 0);
  return std::vector<int>(cpus.begin() + begin, cpus.begin() + begin + size);
}

absl::Status BindProcess(const std::vector<int>& cpus) {
  if (cpus.empty()) {
    return absl::InvalidArgumentError("BindProcess needs at least one CPU");
  }
  CpuMask mask;
  for (int cpu : cpus) {
    if (cpu < 0 || cpu >= kMaxCpus) {
      return absl::InvalidArgumentError(
          absl::StrCat("BindProcess: no CPU ", cpu));
    }
    CPU_SET_S(cpu, mask.size, mask.set);
  }
  // This thread first, so that what it starts from now on inherits the
  // mask; then the threads already running.
  if (sched_setaffinity(0, mask.size, mask.set) != 0) {
    return ErrnoStatus("sched_setaffinity", errno);
  }
  DIR* tasks = opendir("/proc/self/task");
  if (tasks == nullptr) return ErrnoStatus("/proc/self/task", errno);
  absl::Status status;
  while (const dirent* entry = readdir(tasks)) {
    if (entry->d_name[0] == '.') continue;
    const pid_t tid = static_cast<pid_t>(std::atol(entry->d_name));
    if (sched_setaffinity(tid, mask.size, mask.set) != 0 && errno != ESRCH) {
      status =
          ErrnoStatus(absl::StrCat("sched_setaffinity of thread ", tid), errno);
      break;
    }
  }
  closedir(tasks);
  return status;
}

std::string CpuListString(const std::vector<int>& cpus) {
  std::string out;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += std::to_string(cpus[i]);
    if (j > i) absl::StrAppend(&out, "-", cpus[j]);
    i = j + 1;
  }
  return out;
}

absl::StatusOr<std::vector<int>> ParseCpuList(const std::string& text,
                                              const std::string& name) {
  auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " must be CPU numbers and ranges like 0-3,8 (CPUs ",
                     "0 to ", kMaxCpus - 1, "), got \"", text, "\""));
  };
  std::set<int> cpus;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    std::vector<absl::string_view> ends = absl::StrSplit(part, '-');
    int low = 0, high = 0;
    if (ends.size() > 2 || ends[0].empty() ||
        ends[0].find_first_not_of("0123456789") != absl::string_view::npos ||
        !absl::SimpleAtoi(ends[0], &low)) {
      return bad();
    }
    high = low;
    if (ends.size() == 2 &&
        (ends[1].empty() ||
         ends[1].find_first_not_of("0123456789") != absl::string_view::npos ||
         !absl::SimpleAtoi(ends[1], &high))) {
      return bad();
    }
    if (high < low || high >= kMaxCpus) return bad();
    for (int cpu = low; cpu <= high; ++cpu) cpus.insert(cpu);
  }
  return std::vector<int>(cpus.begin(), cpus.end());
}

}  // namespace momentum::worker
