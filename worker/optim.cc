#include "worker/optim.h"

#include <algorithm>
#include <cmath>
#include <optional>

namespace momentum::worker {

Sgd::Sgd(std::vector<at::Tensor> params, double momentum, double weight_decay)
    : params_(std::move(params)),
      buffers_(params_.size()),
      momentum_(momentum),
      weight_decay_(weight_decay) {}

void Sgd::ZeroGrad() {
  for (auto& p : params_) {
    if (p.mutable_grad().defined()) p.mutable_grad().zero_();
  }
}

void Sgd::Step(double lr, const at::Tensor& found_inf) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> params, grads, buffers;
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& grad = params_[i].grad();
    if (!grad.defined()) continue;
    params.push_back(params_[i]);
    grads.push_back(grad);
    if (momentum_ != 0) {
      if (!buffers_[i].defined()) buffers_[i] = at::zeros_like(params_[i]);
      buffers.push_back(buffers_[i]);
    }
  }
  if (params.empty()) return;
  std::optional<at::Tensor> skip;
  if (found_inf.defined()) skip = found_inf;
  at::_fused_sgd_(params, grads, buffers, weight_decay_, momentum_, lr,
                  /*dampening=*/0, /*nesterov=*/false, /*maximize=*/false,
                  /*is_first_step=*/false, /*grad_scale=*/std::nullopt, skip);
}

double RunFraction(const OptimSpec& spec, const Progress& progress, bool end) {
  const double steps_done = static_cast<double>(progress.step + (end ? 1 : 0));
  double fraction = 0;
  if (spec.steps > 0) {
    fraction = std::max(fraction, steps_done / spec.steps);
  }
  if (spec.epochs > 0) {
    fraction =
        std::max(fraction, steps_done / (static_cast<double>(spec.epochs) *
                                         progress.steps_per_epoch));
  }
  if (spec.time_budget_s > 0) {
    const double t =
        progress.train_seconds + (end ? progress.step_seconds : 0.0);
    fraction = std::max(fraction, t / spec.time_budget_s);
  }
  return std::min(fraction, 1.0);
}

double LearningRate(const OptimSpec& spec, const Progress& progress) {
  const double base = spec.lr * static_cast<double>(spec.batch_size) / 256.0;
  const double p = RunFraction(spec, progress, /*end=*/false);
  double factor = 1.0;
  if (spec.schedule == "cosine") {
    factor = 0.5 * (1.0 + std::cos(M_PI * p));
  } else if (spec.schedule == "step") {
    for (double milestone : spec.milestones) {
      if (p >= milestone) factor *= spec.gamma;
    }
  }
  if (spec.warmup > 0) {
    const double p_end = RunFraction(spec, progress, /*end=*/true);
    factor *= std::min(1.0, p_end / spec.warmup);
  }
  return base * factor;
}

}  // namespace momentum::worker
