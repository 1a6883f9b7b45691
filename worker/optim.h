// Optimisation: SGD with momentum and weight decay (PyTorch's torch.optim.SGD
// with dampening 0, not Nesterov), and the learning-rate schedule.
//
// The learning rate in the spec is per 256 images: the rate used is
// lr * batch_size / 256 (the linear scaling rule; MoCo's 0.03 is for batch
// 256). Schedules are functions of the run's progress p in [0, 1], the
// largest of step/steps, epoch/epochs and time/time_budget over the bounds
// that are set, so one schedule fits whichever bound ends the run:
//   warm-up:  factor min(1, p_end / warmup), p_end the progress after the step
//   cosine:   0.5 * (1 + cos(pi * p))
//   step:     gamma ^ (number of milestones <= p)
//   constant: 1
#ifndef MOMENTUM_WORKER_OPTIM_H_
#define MOMENTUM_WORKER_OPTIM_H_

#include <ATen/ATen.h>

#include <vector>

#include "common/job_spec.h"

namespace momentum::worker {

// Not thread-safe. The momentum buffers are created on the first Step(), as
// zeros: with dampening 0, buf ← momentum·0 + d is the first step's buf = d,
// bit for bit.
class Sgd {
 public:
  Sgd(std::vector<at::Tensor> params, double momentum, double weight_decay);

  void ZeroGrad();
  // p ← p − lr·buf, buf ← momentum·buf + (grad + wd·p) (buf = grad + wd·p on
  // the first step). Parameters without a gradient are skipped. One fused
  // kernel per device and dtype (torch.optim.SGD's fused=True), which
  // equals the per-tensor update bit for bit on the CPU. With `found_inf`
  // (a one-element float tensor on the parameters' device) the update,
  // momentum included, happens only where it holds 0, decided on the device
  // without waiting for it.
  void Step(double lr, const at::Tensor& found_inf = at::Tensor());

  const std::vector<at::Tensor>& params() const { return params_; }
  // One per parameter; undefined until the parameter's first step.
  std::vector<at::Tensor>& momentum_buffers() { return buffers_; }

 private:
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> buffers_;
  double momentum_;
  double weight_decay_;
};

// Where the run stands, in [0, 1].
struct Progress {
  int64_t step = 0;             // global steps done before this one
  int64_t steps_per_epoch = 1;  // for the epochs bound
  double train_seconds = 0;     // training time so far
  double step_seconds = 0;      // duration of the last step (for warm-up)
};

// The fraction of the run done before the step (`end`: after it).
double RunFraction(const OptimSpec& spec, const Progress& progress, bool end);

// The learning rate of the step that starts at `progress`.
double LearningRate(const OptimSpec& spec, const Progress& progress);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_OPTIM_H_
