#include "worker/grad_averager.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace momentum::worker {
class GradientAverager::ReadyHook
    : public torch::autograd::PostAccumulateGradHook {
 public:
  ReadyHook(GradientAverager* owner, size_t index)
      : owner_(owner), index_(index) {}
  void operator()(const torch::autograd::Variable& /*param*/) override {
    owner_->OnReady(index_);
  }

 private:
  GradientAverager* owner_;
  size_t index_;
};

GradientAverager::GradientAverager(ProcessGroup* group,
                                   std::vector<at::Tensor> params,
                                   int64_t bucket_bytes)
    : group_(group), params_(std::move(params)) {
  TORCH_CHECK(group_ != nullptr, "GradientAverager needs a process group");
  TORCH_CHECK(bucket_bytes > 0,
              "GradientAverager bucket_bytes must be > 0, got ", bucket_bytes);
  bucket_of_.resize(params_.size());
  ready_.assign(params_.size(), false);
  int64_t bytes = 0;
  for (size_t k = params_.size(); k-- > 0;) {
    const at::Tensor& p = params_[k];
    TORCH_CHECK(p.defined() && at::isFloatingType(p.scalar_type()),
                "GradientAverager: parameter ", k,
                " is not a floating-point tensor");
    const int64_t size = p.numel() * p.element_size();
    const bool fits =
        !buckets_.empty() && bytes + size <= bucket_bytes &&
        params_[buckets_.back().params.back()].scalar_type() ==
            p.scalar_type() &&
        params_[buckets_.back().params.back()].device() == p.device();
    if (!fits) {
      buckets_.emplace_back();
      bytes = 0;
    }
    buckets_.back().params.push_back(k);
    bytes += size;
    bucket_of_[k] = buckets_.size() - 1;
  }
  for (size_t k = 0; k < params_.size(); ++k) {
    torch::autograd::impl::set_post_acc_grad_hooks(
        params_[k], std::make_unique<ReadyHook>(this, k));
  }
}

GradientAverager::~GradientAverager() {
  for (const at::Tensor& p : params_) {
    torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  }
}

void GradientAverager::OnReady(size_t index) {
  if (!error_.ok()) return;
  if (ready_[index]) {
    error_ = absl::FailedPreconditionError(absl::StrCat(
        "averaging the gradients: the gradient of parameter ", index,
        " was accumulated twice since the last average (one backward pass "
        "per average: its bucket had started)"));
    return;
  }
  ready_[index] = true;
  Bucket& bucket = buckets_[bucket_of_[index]];
  if (++bucket.ready == bucket.params.size()) StartReadyBuckets();
}

void GradientAverager::StartReadyBuckets() {
  while (error_.ok() && next_ < buckets_.size() &&
         buckets_[next_].ready == buckets_[next_].params.size()) {
    error_ = StartBucket(buckets_[next_++]);
    ++started_now_;
  }
}

absl::Status GradientAverager::StartBucket(Bucket& bucket) {
  at::NoGradGuard no_grad;
  bucket.packed.clear();
  for (size_t k : bucket.params) {
    const at::Tensor& grad = params_[k].grad();
    bucket.packed.push_back(
        grad.defined() ? grad
                       : at::zeros({params_[k].numel()}, params_[k].options()));
  }
  MOMENTUM_ASSIGN_OR_RETURN(
      PendingAllReduce pending,
      group_->StartAllReduceMean(PackBucket(bucket.packed)));
  bucket.pending = std::move(pending);
  return absl::OkStatus();
}

absl::Status GradientAverager::Finish() {
  started_in_backward_ = started_now_;
  absl::Status status = error_;
  // What the hooks did not start (gradients never accumulated, or all of
  // them when no hook ran), in order.
  while (status.ok() && next_ < buckets_.size()) {
    status = StartBucket(buckets_[next_++]);
  }
  for (Bucket& bucket : buckets_) {
    if (!bucket.pending.has_value()) continue;
    if (status.ok()) {
      status = group_->Wait(*bucket.pending);
      if (status.ok()) {
        at::NoGradGuard no_grad;
        UnpackBucket(bucket.pending->buffer(), bucket.packed);
      }
    }
  }
  for (Bucket& bucket : buckets_) {
    bucket.ready = 0;
    bucket.pending.reset();
    bucket.packed.clear();
  }
  ready_.assign(params_.size(), false);
  next_ = 0;
  error_ = absl::OkStatus();
  started_now_ = 0;
  return status;
}

}  // namespace momentum::worker
