// Averages a model's gradients over the ranks of a process group while the
// backward pass still runs, as DistributedDataParallel's reducer does: the
// parameters are split into buckets in reverse order (the order in which the
// backward pass finishes their gradients), and a hook on each parameter
// starts its bucket's all-reduce as soon as the last gradient of the bucket
// has been accumulated. The backend's threads sum the bucket while the
// backward pass goes on through the layers below; Finish() starts what is
// left, waits for all of it and writes the means back into the gradients.
//
// Buckets start strictly in order (a ready bucket waits for the ones before
// it), so every rank starts the same collectives in the same order whatever
// order its gradients finish in. A parameter that got no gradient keeps none;
// its slot in the bucket is summed as zeros (every rank must agree on which
// parameters have gradients, as with ProcessGroup::AllReduceMean).
//
// The means equal ProcessGroup::AllReduceMean's bit for bit (each element is
// divided by the rank count, then summed, by the same backend); only the
// grouping into buckets differs, which does not change a sum of two ranks and
// changes the order of a sum of three or more only as the backend's ring
// order over the buffer does.
//
// Usage, one rank (the hooks live as long as the averager):
//   GradientAverager averager(group, model->parameters());
//   loss.backward();  // buckets start on the way
//   MOMENTUM_RETURN_IF_ERROR(averager.Finish());
#ifndef MOMENTUM_WORKER_GRAD_AVERAGER_H_
#define MOMENTUM_WORKER_GRAD_AVERAGER_H_

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "worker/process_group.h"

namespace momentum::worker {

// Thread-compatible: the hooks run on the thread that runs the backward pass
// (the caller's on the CPU, autograd's device thread on a GPU, while the
// caller waits in backward()), Finish() after it. Neither copyable nor
// movable: the hooks point at it.
class GradientAverager {
 public:
  // Buckets of at most 4 MiB: the last bucket (the first layers' gradients,
  // started only when the backward pass is over) then holds a small share of
  // the model. The ResNet-18 of width 64 with the MLP head (46.0 MB of
  // float32) makes 12 buckets, the last 2.1 MB (layer2.1 down to the stem);
  // DistributedDataParallel's 25 MiB would make two, the last 25.3 MB
  // (layer4.0.conv2 down), more than half of the model after the backward.
  static constexpr int64_t kDefaultBucketBytes = int64_t{4} << 20;

  // Hooks every parameter in `params` (floating point; the gradients of
  // these are averaged) and splits them into buckets of at most
  // `bucket_bytes` (> 0; a larger tensor is a bucket of its own) of one
  // dtype and device, in reverse order. `group` is not owned and must
  // outlive the averager.
  GradientAverager(ProcessGroup* group, std::vector<at::Tensor> params,
                   int64_t bucket_bytes = kDefaultBucketBytes);
  GradientAverager(const GradientAverager&) = delete;
  GradientAverager& operator=(const GradientAverager&) = delete;
  // Removes the hooks. Collectives still in flight run to their end on the
  // backend's threads.
  ~GradientAverager();

  // Call once after each backward pass, on every rank: starts the buckets
  // that have not started (all of them if no hook ran), waits for all, and
  // replaces each defined gradient by its mean over the ranks. Returns the
  // group's error (ProcessGroup::Wait) or FAILED_PRECONDITION when a
  // gradient was accumulated twice since the last Finish() (two backward
  // passes per average are not supported: the first would have started its
  // bucket); after an error the gradients hold unspecified values. Resets
  // for the next backward pass either way.
  absl::Status Finish();

  int64_t bucket_count() const { return static_cast<int64_t>(buckets_.size()); }
  // How many buckets the backward pass before the last Finish() started
  // (the rest Finish() started): the share of the averaging that overlapped
  // the backward pass.
  int64_t started_in_backward() const { return started_in_backward_; }

 private:
  class ReadyHook;
  struct Bucket {
    std::vector<size_t> params;  // indices into params_
    size_t ready = 0;            // how many have their gradient
    std::optional<PendingAllReduce> pending;
    // What was packed: the gradients, zeros for those never accumulated.
    std::vector<at::Tensor> packed;
  };

  // The hook of params_[index]: its gradient is complete.
  void OnReady(size_t index);
  // Starts buckets from next_ on while they are complete.
  void StartReadyBuckets();
  absl::Status StartBucket(Bucket& bucket);

  ProcessGroup* group_;
  std::vector<at::Tensor> params_;
  std::vector<size_t> bucket_of_;  // per parameter
  std::vector<bool> ready_;        // per parameter, since the last Finish()
  std::vector<Bucket> buckets_;
  size_t next_ = 0;  // the first bucket not started
  absl::Status error_;
  int64_t started_now_ = 0;  // buckets the hooks started since Finish()
  int64_t started_in_backward_ = 0;
};

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_GRAD_AVERAGER_H_
