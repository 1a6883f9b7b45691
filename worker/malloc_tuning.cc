#include "worker/malloc_tuning.h"

#include <malloc.h>

namespace momentum::worker {

bool TuneMallocForTraining() {
  // 32 MiB is glibc's largest mmap threshold on 64-bit systems.
  constexpr int kMmapThreshold = 32 << 20;
  constexpr int kTrimThreshold = 1 << 30;
  const bool mmap_ok = mallopt(M_MMAP_THRESHOLD, kMmapThreshold) == 1;
  const bool trim_ok = mallopt(M_TRIM_THRESHOLD, kTrimThreshold) == 1;
  return mmap_ok && trim_ok;
}

}  // namespace momentum::worker
