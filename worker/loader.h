// Loaders: threads that decode and augment ahead of the training thread.
//
// TrainLoader yields, per step, the two augmented views of this rank's slice
// of the global batch. The epoch order is a seeded permutation of the train
// set; step s of an epoch covers positions [s*G, (s+1)*G) of it (G the global
// batch) and rank r takes [s*G + r*B, s*G + (r+1)*B) (B = G / world). The
// last partial global batch is dropped, so every rank runs the same steps.
//
// EvalLoader yields un-augmented views of a dataset in order, for kNN.
//
// Both build batches on their own threads, ahead of the consumer, and hand
// them out in order; a batch is a pure function of (seed, epoch, step, rank),
// so the output does not depend on the number of threads.
//
// Usage:
//   TrainLoader loader(train.get(), options);
//   loader.StartEpoch(epoch, /*first_step=*/0);
//   for (;;) {
//     absl::StatusOr<TrainBatch> batch = loader.Next();
//     if (absl::IsOutOfRange(batch.status())) break;  // epoch done
//     if (!batch.ok()) return batch.status();         // names the file
//     ...
//   }
#ifndef MOMENTUM_WORKER_LOADER_H_
#define MOMENTUM_WORKER_LOADER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "common/job_spec.h"
#include "worker/augment.h"
#include "worker/dataset.h"

namespace momentum::worker {

struct TrainBatch {
  // The views, normalised: [B, C, S, S] float32. Undefined with
  // LoaderOptions::photometric_on_device, which gives the fields below.
  at::Tensor query;
  at::Tensor key;
  // The views' crops, [B, T, S, S] uint8 (T: the dataset's channels), and
  // their photometric choices, [B, kPhotometricWidth] float32
  // (worker/device_augment.h), for PhotometricOnDevice.
  at::Tensor query_bytes, key_bytes;
  at::Tensor query_params, key_params;
  at::Tensor index;  // [B] int64, dataset indices
  at::Tensor label;  // [B] int64
  int64_t epoch = 0;
  int64_t step_in_epoch = 0;
};

struct LoaderOptions {
  int64_t global_batch = 256;
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t threads = 1;   // decode/augment threads
  int64_t prefetch = 4;  // batches ready ahead
  uint64_t seed = 0;
  AugmentSpec augment;
  ViewFormat format;
  // Batches in page-locked host memory (for asynchronous copies to a GPU;
  // needs a CUDA build and a GPU).
  bool pin_memory = false;
  // Decode JPEG files at the smallest DCT scale (n/8) at which both views'
  // crops still have format.size pixels a side (data.scaled_decode).
  bool scaled_decode = false;
  // Only decode and crop here; the photometric steps run batched where the
  // batch goes (data.augment_on device).
  bool photometric_on_device = false;
};

// The permutation of [0, n) used as the order of `epoch`: Fisher-Yates with
// the seeded Rng of augment.h, identical on every platform.
std::vector<int64_t> EpochPermutation(int64_t n, uint64_t seed, int64_t epoch);

// Owns `threads` threads that decode and augment up to `prefetch` batches
// ahead; Shutdown() (idempotent, also run by the destructor) stops and joins
// them. StartEpoch and Next are called from one thread. The options must
// satisfy 0 <= rank < world_size and global_batch % world_size == 0
// (TORCH_CHECK).
class TrainLoader {
 public:
  TrainLoader(const Dataset* dataset, LoaderOptions options);
  ~TrainLoader();
  TrainLoader(const TrainLoader&) = delete;
  TrainLoader& operator=(const TrainLoader&) = delete;

  int64_t steps_per_epoch() const;
  // Starts producing the batches of `epoch` from `first_step` on; discards
  // whatever was prepared before.
  void StartEpoch(int64_t epoch, int64_t first_step);
  // Blocks for the next batch of the epoch. OUT_OF_RANGE after its last
  // step; FAILED_PRECONDITION before the first StartEpoch; the dataset's
  // error (naming the file) when an image fails, after which the loader is
  // stopped and every call returns that error; CANCELLED after Shutdown.
  absl::StatusOr<TrainBatch> Next();
  void Shutdown();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

struct EvalBatch {
  at::Tensor images;  // [b, C, S, S] float32
  at::Tensor label;   // [b] int64
};

// Starts its `threads` threads in the constructor; the destructor stops and
// joins them. Next is called from one thread.
class EvalLoader {
 public:
  // Covers indices [0, min(limit, size)) (limit 0: all), in order, in
  // batches of batch_size (the last one may be smaller).
  EvalLoader(const Dataset* dataset, ViewFormat format, int64_t batch_size,
             int64_t threads, int64_t limit = 0);
  ~EvalLoader();
  // Blocks for the next batch; std::nullopt after the last one, or the
  // dataset's error (after which every call returns it).
  absl::StatusOr<std::optional<EvalBatch>> Next();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_LOADER_H_
