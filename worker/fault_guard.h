// The fault guard of a training run: reads back what the steps left on the
// device (Settle()), detects non-finite gradients, a non-finite loss and
// collapsed features, rolls the run back to its last good checkpoint with a
// smaller learning rate (faults.*) or fails it, and has the ranks agree on
// the training time and on stopping. Part of Trainer::Run()
// (worker/trainer.h), beside the step and the run log (worker/run_log.h).
//
// Usage, as Trainer::Run() does:
//   FaultGuard guard(spec, where, rank, group, &run, &log, loader, restore);
//   while (true) {
//     auto vote = guard.AgreeOnStop(stop);            // every iteration
//     ... the step writes into guard.series() ...
//     auto rolled_back = guard.Settle();  // before anything is kept
//     if (*rolled_back) continue;         // `run` is the checkpoint's now
//   }
#ifndef MOMENTUM_WORKER_FAULT_GUARD_H_
#define MOMENTUM_WORKER_FAULT_GUARD_H_

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/job_spec.h"
#include "worker/checkpoint.h"
#include "worker/device.h"
#include "worker/loader.h"
#include "worker/moco.h"
#include "worker/process_group.h"
#include "worker/run_log.h"
#include "worker/trainer.h"

namespace momentum::worker {

// What the training steps leave on the device between two
// FaultGuard::Settle() calls: the step writes them and never waits for the
// device; Settle() reads them back in one copy.
struct DeviceSeries {
  // Allocates the tensors on `device`.
  explicit DeviceSeries(const c10::Device& device);

  // Records a step's `loss` ([1], double) and `health` (Moco::Output) after
  // its optimiser update: adds the loss to the window's sum, and marks
  // `step` as the first non-finite one when found_inf says so and none was
  // marked since the last Settle().
  void Record(int64_t step, const at::Tensor& loss, const at::Tensor& health);

  // [1] float: the last step's gradients were not finite (the optimiser and
  // the enqueue skip it on the device).
  at::Tensor found_inf;
  at::Tensor unit_scale;  // [1] float ones: the check without unscaling
  // [2] double: the first non-finite step since the last Settle() and its
  // loss; -1: none.
  at::Tensor first_bad;
  at::Tensor window_loss_sum;  // [1] double: the logging window's summed loss
  at::Tensor last_loss;        // [1] double: the last step's loss
  at::Tensor last_health;      // [4] double: the last step's BatchHealth
};

// Trainer::Run() makes one per call on every rank, after its RunLog, and
// uses it on the thread that runs Run() only (it is not thread-safe; it owns
// no thread). Every rank holds the same averaged gradients and the group's
// means, so every rank decides alike and rolls back together. A roll-back
// reloads the newest checkpoint through `restore` into `run`, tells `log`
// and restarts `loader` at the checkpoint's position.
class FaultGuard {
 public:
  // Loads the newest checkpoint that loads into the model, the optimiser,
  // the generators and `state`: its path, or nullopt when there is none.
  using Restore = std::function<absl::StatusOr<std::optional<std::string>>(
      CheckpointState* state)>;

  // `spec`, `run`, `log` and `loader` must outlive the guard; `group` is
  // null with one rank.
  FaultGuard(const JobSpec& spec, const RankDevice& where, int64_t rank,
             ProcessGroup* group, RunState* run, RunLog* log,
             TrainLoader* loader, Restore restore);
  FaultGuard(const FaultGuard&) = delete;
  FaultGuard& operator=(const FaultGuard&) = delete;

  // What the steps write into.
  DeviceSeries& series() { return series_; }

  struct StopVote {
    // Whether the ranks compared their time and stop flags at this step:
    // every step with Gloo, logging steps only with NCCL (where the vote is
    // a host value and waits for the device).
    bool agreed = true;
    bool stop = false;  // a rank was asked to stop (`stop` was true)
  };
  // At the top of every iteration of the run. Where the ranks agree, they
  // take the mean of their training time (it drives the time bound and the
  // schedule) and stop together when any was asked to. Blocks on one
  // collective; its error otherwise.
  absl::StatusOr<StopVote> AgreeOnStop(const std::atomic<bool>* stop);

  // Waits for the device and reads what the steps since the last call left
  // there; the wait counts as training time. A non-finite step among them
  // fails the run (faults.on_nonfinite fail: an error) or rolls it back
  // (true). Called where the run logs, checkpoints, evaluates or ends,
  // before anything of a skipped step could be kept.
  absl::StatusOr<bool> Settle();

  // The checks of a logging window, after Settle().
  struct Window {
    double rank_loss = 0;  // this rank's mean loss over the window
    double step_loss = 0;  // the group's loss of the last step
    double mean_loss = 0;  // the group's mean loss over the window
    double group_std = 0;  // the group's mean feature standard deviation
    double std_ratio = 0;  // group_std * sqrt(moco.dim): about 1 if healthy
    // Why the features count as collapsed; "" when they do not.
    std::string collapse;
  };
  // Closes the window on the guard's side: a non-finite loss fails the run;
  // the group's losses and feature spread (one collective, shared with the
  // log) are judged for collapse, and the device's loss sum restarts.
  absl::StatusOr<Window> CloseWindow();
  // Acts on the collapse CloseWindow() found, once the window is logged:
  // fails the run (faults.on_collapse fail: an error) or rolls it back
  // (true). False when there was none.
  absl::StatusOr<bool> ActOnCollapse(const Window& window);

 private:
  // Rolls back to the newest checkpoint that loads, with the learning rate
  // scaled down, after a step every rank judged bad alike (`what`, with the
  // `values` that triggered it, at `bad_step`); errors when it may not
  // (faults.max_rollbacks) or cannot (no checkpoint).
  absl::Status RollBack(
      const std::string& what,
      const std::vector<std::pair<std::string, double>>& values,
      int64_t bad_step);

  const JobSpec& spec_;
  const int64_t rank_;
  ProcessGroup* const group_;
  // With NCCL the ranks agree on the time and on stopping at logging steps
  // only: the agreement is a host value, and each one waits for the device.
  const bool agree_each_step_;
  RunState* const run_;
  RunLog* const log_;
  TrainLoader* const loader_;
  const Restore restore_;
  DeviceSeries series_;
  // Their values as of the last Settle().
  double window_loss_ = 0;
  double last_loss_ = 0;
  BatchHealth health_;
  // Logging steps in a row whose features looked collapsed.
  int64_t collapsed_checks_ = 0;
};

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_FAULT_GUARD_H_
