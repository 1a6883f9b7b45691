// Allocator settings for training processes.
//
// glibc serves blocks above a dynamic threshold (128 KiB at first) with mmap
// and returns them with munmap, and trims the heap top when it frees; a
// training step frees and re-allocates the same activation buffers every
// step, so each step paid for fresh zeroed pages in page faults (about 30% of
// the CPU time measured here). Keeping blocks up to 32 MiB on the heap and
// never trimming it lets the buffers be reused: bench/trainer_bench measured
// 657 -> 1010 images/s with two threads (ResNet-18 width 16, batch 256) on
// Debian's LibTorch 1.13 and an Intel Xeon, and 413 -> 465 images/s
// (--no-malloc-tuning against the default) on torch 2.11.0 and an AMD EPYC.
// jemalloc (LD_PRELOAD) was slower on the first (353 images/s).
#ifndef MOMENTUM_WORKER_MALLOC_TUNING_H_
#define MOMENTUM_WORKER_MALLOC_TUNING_H_

namespace momentum::worker {

// Applies the settings above to this process; call before the first large
// allocation. Idempotent. Returns false if glibc refused them.
bool TuneMallocForTraining();

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_MALLOC_TUNING_H_
