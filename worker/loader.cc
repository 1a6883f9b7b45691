#include "worker/loader.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "worker/device_augment.h"

namespace momentum::worker {
namespace {

constexpr int64_t kNoFailure = std::numeric_limits<int64_t>::max();

// What a pipeline builds: item k of a run (a step of an epoch, a batch of an
// evaluation pass). Make is called from several threads at once.
template <typename T>
class Plan {
 public:
  virtual ~Plan() = default;
  virtual absl::StatusOr<T> Make(int64_t item) const = 0;
};

// `threads` threads build items [first, end) of a plan, at most `window`
// items beyond the next one the consumer takes, and hand them out in item
// order whichever thread finished first: a reorder buffer over a shared claim
// counter. Since an item is a pure function of the plan and its number, the
// output does not depend on the number of threads or their timing.
//
// Thread-safety: Reset, Next and Shutdown are called from the owner's thread;
// the worker threads only touch state under mu_. Lifecycle: the threads start
// in the constructor, idle until Reset, and stop in Shutdown (idempotent,
// also run by the destructor).
template <typename T>
class OrderedPipeline {
 public:
  OrderedPipeline(int64_t threads, int64_t window)
      : window_(std::max<int64_t>(window, 1)) {
    const int64_t n = std::max<int64_t>(threads, 1);
    threads_.reserve(n);
    for (int64_t i = 0; i < n; ++i) threads_.emplace_back([this] { Run(); });
  }
  ~OrderedPipeline() { Shutdown(); }
  OrderedPipeline(const OrderedPipeline&) = delete;
  OrderedPipeline& operator=(const OrderedPipeline&) = delete;

  // Switches to items [first, end) of `plan`, dropping everything built or
  // being built for the previous one.
  void Reset(std::shared_ptr<const Plan<T>> plan, int64_t first, int64_t end) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++generation_;
      plan_ = std::move(plan);
      next_claim_ = first;
      next_out_ = first;
      end_ = end;
      ready_.clear();
      failed_item_ = kNoFailure;
      failure_ = absl::OkStatus();
    }
    work_cv_.notify_all();
  }

  // Blocks for the next item. std::nullopt after the last one; the error of
  // the first failing item once every item before it has been handed out;
  // CANCELLED after Shutdown.
  absl::StatusOr<std::optional<T>> Next() {
    std::unique_lock<std::mutex> lock(mu_);
    if (!stopped_ && next_out_ >= end_) return std::optional<T>();
    ready_cv_.wait(lock, [this] {
      return stopped_ || failed_item_ == next_out_ ||
             ready_.count(next_out_) > 0;
    });
    if (stopped_) return absl::CancelledError("loader was shut down");
    if (failed_item_ == next_out_) return failure_;
    auto node = ready_.extract(next_out_);
    ++next_out_;
    lock.unlock();
    work_cv_.notify_all();  // the window moved
    return std::optional<T>(std::move(node.mapped()));
  }

  void Shutdown() {
    std::lock_guard<std::mutex> join_lock(join_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopped_ = true;
    }
    work_cv_.notify_all();
    ready_cv_.notify_all();
    for (std::thread& thread : threads_) {
      if (thread.joinable()) thread.join();
    }
    threads_.clear();
  }

 private:
  bool CanClaimLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return plan_ != nullptr && next_claim_ < end_ &&
           next_claim_ < next_out_ + window_ && next_claim_ < failed_item_;
  }

  static absl::StatusOr<T> MakeSafely(const Plan<T>& plan, int64_t item) {
    try {
      return plan.Make(item);
    } catch (const std::exception& e) {
      return absl::InternalError(
          absl::StrCat("loader item ", item, ": ", e.what()));
    }
  }

  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      work_cv_.wait(lock, [this] { return stopped_ || CanClaimLocked(); });
      if (stopped_) return;
      const int64_t item = next_claim_++;
      const uint64_t generation = generation_;
      std::shared_ptr<const Plan<T>> plan = plan_;
      lock.unlock();
      absl::StatusOr<T> result = MakeSafely(*plan, item);
      plan.reset();
      lock.lock();
      if (generation != generation_) continue;  // Reset while building
      if (result.ok()) {
        ready_.emplace(item, *std::move(result));
      } else if (item < failed_item_) {
        // Items after the failure are not claimed any more; those before it
        // finish and are handed out first.
        failed_item_ = item;
        failure_ = result.status();
      }
      ready_cv_.notify_all();
    }
  }

  const int64_t window_;
  std::mutex join_mu_;  // serialises Shutdown
  std::vector<std::thread> threads_;

  std::mutex mu_;
  std::condition_variable work_cv_;   // workers wait for claimable items
  std::condition_variable ready_cv_;  // the consumer waits for its item
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  std::shared_ptr<const Plan<T>> plan_ ABSL_GUARDED_BY(mu_);
  int64_t next_claim_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_out_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t end_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int64_t, T> ready_ ABSL_GUARDED_BY(mu_);
  int64_t failed_item_ ABSL_GUARDED_BY(mu_) = kNoFailure;
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
};

// Step s of one epoch for one rank.
class TrainPlan : public Plan<TrainBatch> {
 public:
  TrainPlan(const Dataset* dataset, const LoaderOptions* options, int64_t epoch,
            std::vector<int64_t> permutation)
      : dataset_(dataset),
        options_(options),
        epoch_(epoch),
        permutation_(std::move(permutation)) {}

  absl::StatusOr<TrainBatch> Make(int64_t step) const override {
    const LoaderOptions& o = *options_;
    const int64_t per_rank = o.global_batch / o.world_size;
    const int64_t channels = o.format.channels;
    const int64_t size = o.format.size;
    const int64_t view = channels * size * size;
    TrainBatch batch;
    batch.epoch = epoch_;
    batch.step_in_epoch = step;
    // Raw buffers filled here; no ATen operator (and so no intra-op thread
    // pool) runs on a loader thread.
    const bool bytes_out = o.photometric_on_device;
    const int64_t transport = dataset_->channels();
    const int64_t plane = size * size;
    if (bytes_out) {
      const at::TensorOptions u8 =
          at::TensorOptions().dtype(at::kByte).pinned_memory(o.pin_memory);
      const at::TensorOptions f32 =
          at::TensorOptions().dtype(at::kFloat).pinned_memory(o.pin_memory);
      batch.query_bytes = at::empty({per_rank, transport, size, size}, u8);
      batch.key_bytes = at::empty({per_rank, transport, size, size}, u8);
      batch.query_params = at::empty({per_rank, kPhotometricWidth}, f32);
      batch.key_params = at::empty({per_rank, kPhotometricWidth}, f32);
    } else {
      const at::TensorOptions views =
          at::TensorOptions().dtype(at::kFloat).pinned_memory(o.pin_memory);
      batch.query = at::empty({per_rank, channels, size, size}, views);
      batch.key = at::empty({per_rank, channels, size, size}, views);
    }
    batch.index = at::empty({per_rank}, at::kLong);
    batch.label = at::empty({per_rank}, at::kLong);
    int64_t* index = batch.index.data_ptr<int64_t>();
    int64_t* label = batch.label.data_ptr<int64_t>();
    const int64_t first = step * o.global_batch + o.rank * per_rank;
    for (int64_t i = 0; i < per_rank; ++i) {
      const int64_t item = permutation_[first + i];
      const uint64_t seeds[2] = {ViewSeed(o.seed, epoch_, item, /*view=*/0),
                                 ViewSeed(o.seed, epoch_, item, /*view=*/1)};
      CropBox boxes[2];
      absl::StatusOr<Image> image = DecodeForCrops(item, seeds, boxes);
      if (!image.ok()) return image.status();
      for (int v = 0; v < 2; ++v) {
        if (bytes_out) {
          at::Tensor& bytes = v == 0 ? batch.query_bytes : batch.key_bytes;
          at::Tensor& params = v == 0 ? batch.query_params : batch.key_params;
          CropViewBytes(*image, boxes[v], o.format, transport,
                        bytes.data_ptr<uint8_t>() + i * transport * plane);
          PackPhotometric(DrawPhotometric(o.augment, seeds[v], image->channels),
                          params.data_ptr<float>() + i * kPhotometricWidth);
        } else {
          at::Tensor& views = v == 0 ? batch.query : batch.key;
          AugmentViewInBox(*image, boxes[v], o.augment, o.format, seeds[v],
                           views.data_ptr<float>() + i * view);
        }
      }
      index[i] = item;
      label[i] = dataset_->Label(item);
    }
    return batch;
  }

 private:
  // Image `item` and both views' crop boxes in its pixels: drawn from the
  // full size, then (LoaderOptions::scaled_decode) the image decoded at the
  // smallest DCT scale that still covers both and the boxes scaled to it.
  absl::StatusOr<Image> DecodeForCrops(int64_t item, const uint64_t seeds[2],
                                       CropBox boxes[2]) const {
    const LoaderOptions& o = *options_;
    if (!o.scaled_decode) {
      absl::StatusOr<Image> image = dataset_->Get(item);
      if (!image.ok()) return image;
      for (int v = 0; v < 2; ++v) {
        boxes[v] =
            SampleCropBox(image->height, image->width, o.augment, seeds[v]);
      }
      return image;
    }
    auto eighths = [&](int64_t height, int64_t width) {
      for (int v = 0; v < 2; ++v) {
        boxes[v] = SampleCropBox(height, width, o.augment, seeds[v]);
      }
      return DecodeEighths(boxes, 2, o.format.size);
    };
    Image full;
    absl::StatusOr<Image> image = dataset_->GetScaled(item, eighths, &full);
    if (!image.ok()) return image;
    // Drawn again from the full size: a dataset that cannot scale never
    // calls `eighths`.
    for (int v = 0; v < 2; ++v) {
      boxes[v] = SampleCropBox(full.height, full.width, o.augment, seeds[v]);
      if (image->height != full.height || image->width != full.width) {
        boxes[v] = ScaleCropBox(boxes[v], full.height, full.width,
                                image->height, image->width);
      }
    }
    return image;
  }

  const Dataset* dataset_;
  const LoaderOptions* options_;
  const int64_t epoch_;
  const std::vector<int64_t> permutation_;
};

// Batch k of an evaluation pass over [0, count).
class EvalPlan : public Plan<EvalBatch> {
 public:
  EvalPlan(const Dataset* dataset, ViewFormat format, int64_t batch_size,
           int64_t count)
      : dataset_(dataset),
        format_(std::move(format)),
        batch_size_(batch_size),
        count_(count) {}

  absl::StatusOr<EvalBatch> Make(int64_t k) const override {
    const int64_t first = k * batch_size_;
    const int64_t n = std::min(batch_size_, count_ - first);
    const int64_t channels = format_.channels;
    const int64_t size = format_.size;
    const int64_t view = channels * size * size;
    EvalBatch batch;
    batch.images = at::empty({n, channels, size, size}, at::kFloat);
    batch.label = at::empty({n}, at::kLong);
    float* images = batch.images.data_ptr<float>();
    int64_t* label = batch.label.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      absl::StatusOr<Image> image = dataset_->Get(first + i);
      if (!image.ok()) return image.status();
      EvalView(*image, format_, images + i * view);
      label[i] = dataset_->Label(first + i);
    }
    return batch;
  }

 private:
  const Dataset* dataset_;
  const ViewFormat format_;
  const int64_t batch_size_;
  const int64_t count_;
};

}  // namespace

std::vector<int64_t> EpochPermutation(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> permutation(std::max<int64_t>(n, 0));
  std::iota(permutation.begin(), permutation.end(), int64_t{0});
  // Fisher-Yates with our own generator: std::shuffle's algorithm is
  // unspecified, so it could differ between standard libraries.
  Rng rng(Mix64(Mix64(seed ^ 0x5045524D55544531ULL) ^  // "PERMUTE1"
                static_cast<uint64_t>(epoch)));
  for (int64_t i = n - 1; i > 0; --i) {
    std::swap(permutation[i],
              permutation[rng.Below(static_cast<uint64_t>(i) + 1)]);
  }
  return permutation;
}

class TrainLoader::Impl {
 public:
  Impl(const Dataset* dataset, LoaderOptions options)
      : dataset_(dataset),
        options_(std::move(options)),
        pipeline_(options_.threads, options_.prefetch) {
    TORCH_CHECK(dataset_ != nullptr, "TrainLoader needs a dataset");
    TORCH_CHECK(options_.world_size > 0 && options_.rank >= 0 &&
                    options_.rank < options_.world_size,
                "TrainLoader: rank ", options_.rank, " not in world of ",
                options_.world_size);
    TORCH_CHECK(options_.global_batch > 0 &&
                    options_.global_batch % options_.world_size == 0,
                "TrainLoader: global batch ", options_.global_batch,
                " must be a positive multiple of the world size ",
                options_.world_size);
  }

  int64_t steps_per_epoch() const {
    return dataset_->size() / options_.global_batch;
  }

  void StartEpoch(int64_t epoch, int64_t first_step) {
    TORCH_CHECK(first_step >= 0, "TrainLoader: first_step ", first_step,
                " < 0");
    if (!error_.ok()) return;  // stopped for good
    epoch_ = epoch;
    started_ = true;
    auto plan = std::make_shared<TrainPlan>(
        dataset_, &options_, epoch,
        EpochPermutation(dataset_->size(), options_.seed, epoch));
    const int64_t steps = steps_per_epoch();
    pipeline_.Reset(std::move(plan), first_step, std::max(first_step, steps));
  }

  absl::StatusOr<TrainBatch> Next() {
    if (!error_.ok()) return error_;
    if (!started_) {
      return absl::FailedPreconditionError(
          "TrainLoader::Next before StartEpoch");
    }
    absl::StatusOr<std::optional<TrainBatch>> batch = pipeline_.Next();
    if (!batch.ok()) {
      error_ = batch.status();
      pipeline_.Shutdown();
      return error_;
    }
    if (!batch->has_value()) {
      return absl::OutOfRangeError(absl::StrCat(
          "epoch ", epoch_, " ended after ", steps_per_epoch(), " steps"));
    }
    return **std::move(batch);
  }

  void Shutdown() { pipeline_.Shutdown(); }

 private:
  const Dataset* const dataset_;
  const LoaderOptions options_;
  // Touched only by the owner's thread.
  int64_t epoch_ = 0;
  bool started_ = false;
  absl::Status error_;
  // Last: its threads stop before the members they read are destroyed.
  OrderedPipeline<TrainBatch> pipeline_;
};

TrainLoader::TrainLoader(const Dataset* dataset, LoaderOptions options)
    : impl_(std::make_unique<Impl>(dataset, std::move(options))) {}

TrainLoader::~TrainLoader() { Shutdown(); }

int64_t TrainLoader::steps_per_epoch() const {
  return impl_->steps_per_epoch();
}

void TrainLoader::StartEpoch(int64_t epoch, int64_t first_step) {
  impl_->StartEpoch(epoch, first_step);
}

absl::StatusOr<TrainBatch> TrainLoader::Next() { return impl_->Next(); }

void TrainLoader::Shutdown() { impl_->Shutdown(); }

class EvalLoader::Impl {
 public:
  Impl(const Dataset* dataset, ViewFormat format, int64_t batch_size,
       int64_t threads, int64_t limit)
      // Two batches per thread ahead keep every thread busy while the
      // consumer works on the previous batch.
      : pipeline_(threads, 2 * std::max<int64_t>(threads, 1)) {
    TORCH_CHECK(dataset != nullptr, "EvalLoader needs a dataset");
    TORCH_CHECK(batch_size > 0, "EvalLoader: batch size ", batch_size,
                " must be > 0");
    const int64_t count =
        limit > 0 ? std::min(limit, dataset->size()) : dataset->size();
    const int64_t batches = (count + batch_size - 1) / batch_size;
    pipeline_.Reset(std::make_shared<EvalPlan>(dataset, std::move(format),
                                               batch_size, count),
                    0, batches);
  }

  absl::StatusOr<std::optional<EvalBatch>> Next() {
    if (!error_.ok()) return error_;
    absl::StatusOr<std::optional<EvalBatch>> batch = pipeline_.Next();
    if (!batch.ok()) {
      error_ = batch.status();
      pipeline_.Shutdown();
    }
    return batch;
  }

 private:
  absl::Status error_;
  OrderedPipeline<EvalBatch> pipeline_;
};

EvalLoader::EvalLoader(const Dataset* dataset, ViewFormat format,
                       int64_t batch_size, int64_t threads, int64_t limit)
    : impl_(std::make_unique<Impl>(dataset, std::move(format), batch_size,
                                   threads, limit)) {}

EvalLoader::~EvalLoader() = default;

absl::StatusOr<std::optional<EvalBatch>> EvalLoader::Next() {
  return impl_->Next();
}

}  // namespace momentum::worker
