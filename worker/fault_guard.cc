#include "worker/fault_guard.h"

#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"

namespace momentum::worker {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

at::TensorOptions Doubles(const c10::Device& device) {
  return at::TensorOptions().dtype(at::kDouble).device(device);
}

}  // namespace

DeviceSeries::DeviceSeries(const c10::Device& device)
    : found_inf(
          at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(device))),
      unit_scale(at::ones({1}, found_inf.options())),
      first_bad(at::full({2}, -1.0, Doubles(device))),
      window_loss_sum(at::zeros({1}, Doubles(device))),
      last_loss(at::zeros({1}, Doubles(device))),
      last_health(at::zeros({4}, Doubles(device))) {}

void DeviceSeries::Record(int64_t step, const at::Tensor& loss,
                          const at::Tensor& health) {
  window_loss_sum.add_(loss);
  last_loss.copy_(loss);
  last_health.copy_(health);
  const at::Tensor first =
      found_inf.ne(0).logical_and(first_bad.narrow(0, 0, 1).lt(0));
  first_bad.copy_(at::where(
      first,
      at::cat({at::full({1}, static_cast<double>(step), first_bad.options()),
               loss}),
      first_bad));
}

FaultGuard::FaultGuard(const JobSpec& spec, const RankDevice& where,
                       int64_t rank, ProcessGroup* group, RunState* run,
                       RunLog* log, TrainLoader* loader, Restore restore)
    : spec_(spec),
      rank_(rank),
      group_(group),
      agree_each_step_(where.backend != "nccl"),
      run_(run),
      log_(log),
      loader_(loader),
      restore_(std::move(restore)),
      series_(where.device) {}

absl::StatusOr<FaultGuard::StopVote> FaultGuard::AgreeOnStop(
    const std::atomic<bool>* stop) {
  RunPosition& pos = run_->checkpoint.position;
  StopVote vote;
  // Time and signals count only where every rank sees the same values.
  vote.agreed = group_ == nullptr || agree_each_step_ ||
                pos.global_step % spec_.logging.every_steps == 0;
  vote.stop = vote.agreed && stop != nullptr && stop->load();
  if (group_ != nullptr && vote.agreed) {
    // The ranks agree on the training time (their mean; it drives the time
    // bound and the schedule) and stop together when any was asked to.
    std::vector<at::Tensor> shared = {
        at::tensor({pos.train_seconds, vote.stop ? 1.0 : 0.0}, at::kDouble)};
    MOMENTUM_RETURN_IF_ERROR(group_->AllReduceMean(shared));
    pos.train_seconds = shared[0][0].item<double>();
    vote.stop = shared[0][1].item<double>() > 0;
  }
  return vote;
}

absl::StatusOr<bool> FaultGuard::Settle() {
  const auto begin = Clock::now();
  const at::Tensor host = at::cat({series_.first_bad, series_.window_loss_sum,
                                   series_.last_loss, series_.last_health})
                              .to(at::kCPU);
  // The device's work of the steps, which their host clocks did not see
  // (on CUDA the phases time the host).
  const double waited = Seconds(begin, Clock::now());
  run_->checkpoint.position.train_seconds += waited;
  log_->AddDeviceWait(waited);
  const double* v = host.data_ptr<double>();
  window_loss_ = v[2];
  last_loss_ = v[3];
  health_ = {v[4], v[5], v[6], v[7]};
  log_->SetHealth(health_);
  if (v[0] < 0) return false;
  const int64_t bad_step = static_cast<int64_t>(v[0]);
  const std::string what =
      absl::StrCat("the gradients of step ", bad_step,
                   " are not finite (loss on rank ", rank_, ": ", v[1], ")");
  if (spec_.faults.on_nonfinite == "fail") {
    return absl::InternalError(what + "; learning rate too high?");
  }
  MOMENTUM_RETURN_IF_ERROR(RollBack(what, {{"loss", v[1]}}, bad_step));
  return true;
}

absl::StatusOr<FaultGuard::Window> FaultGuard::CloseWindow() {
  const RunPosition& pos = run_->checkpoint.position;
  const int64_t window_steps = log_->window_steps();
  Window w;
  w.rank_loss = window_loss_ / window_steps;
  if (!std::isfinite(w.rank_loss)) {
    return absl::InternalError(absl::StrCat(
        "loss is ", w.rank_loss, " over steps ", pos.global_step - window_steps,
        " to ", pos.global_step - 1, " (learning rate too high?)"));
  }
  w.step_loss = last_loss_;
  w.mean_loss = w.rank_loss;
  w.group_std = health_.feature_std_mean;
  if (group_ != nullptr) {
    // The group's loss and feature spread: the means over the ranks'
    // shards, so every rank judges collapse alike.
    std::vector<at::Tensor> shared = {
        at::tensor({w.step_loss, w.mean_loss, w.group_std}, at::kDouble)};
    MOMENTUM_RETURN_IF_ERROR(group_->AllReduceMean(shared));
    w.step_loss = shared[0][0].item<double>();
    w.mean_loss = shared[0][1].item<double>();
    w.group_std = shared[0][2].item<double>();
  }
  // Healthy features spread over the sphere: a per-dimension standard
  // deviation of about 1/sqrt(dim).
  w.std_ratio = w.group_std * std::sqrt(static_cast<double>(spec_.moco.dim));
  collapsed_checks_ = spec_.faults.collapse_std_ratio > 0 &&
                              w.std_ratio < spec_.faults.collapse_std_ratio
                          ? collapsed_checks_ + 1
                          : 0;
  if (collapsed_checks_ >= spec_.faults.collapse_patience) {
    w.collapse = absl::StrFormat(
        "feature collapse at step %d: the features' standard deviation is "
        "%.4g, %.3g of the healthy 1/sqrt(%d), below "
        "faults.collapse_std_ratio %g at %d logging steps in a row",
        pos.global_step, w.group_std, w.std_ratio, spec_.moco.dim,
        spec_.faults.collapse_std_ratio, collapsed_checks_);
  }
  series_.window_loss_sum.zero_();
  return w;
}

absl::StatusOr<bool> FaultGuard::ActOnCollapse(const Window& window) {
  if (window.collapse.empty()) return false;
  if (spec_.faults.on_collapse == "fail") {
    return absl::InternalError(window.collapse + " (faults.on_collapse: fail)");
  }
  MOMENTUM_RETURN_IF_ERROR(RollBack(window.collapse,
                                    {{"feature_std_mean", window.group_std},
                                     {"feature_std_ratio", window.std_ratio}},
                                    run_->checkpoint.position.global_step));
  return true;
}

absl::Status FaultGuard::RollBack(
    const std::string& what,
    const std::vector<std::pair<std::string, double>>& values,
    int64_t bad_step) {
  CheckpointState& state = run_->checkpoint;
  if (state.rollbacks >= spec_.faults.max_rollbacks) {
    return absl::InternalError(
        absl::StrCat(what, "; rolled back ", state.rollbacks,
                     " times already (faults.max_rollbacks)"));
  }
  absl::StatusOr<std::optional<std::string>> back = restore_(&state);
  if (!back.ok()) return back.status();
  if (!back->has_value()) {
    return absl::InternalError(what + "; no checkpoint to roll back to");
  }
  const RunPosition& pos = state.position;
  state.lr_scale *= spec_.faults.rollback_lr_factor;
  state.rollbacks += 1;
  collapsed_checks_ = 0;
  // The run is at the checkpoint's step: ending there writes no other.
  run_->checkpoint_step = pos.global_step;
  series_.window_loss_sum.zero_();
  series_.first_bad.fill_(-1);
  log_->RolledBack(what, values, bad_step, **back, state);
  loader_->StartEpoch(pos.epoch, pos.step_in_epoch);
  return absl::OkStatus();
}

}  // namespace momentum::worker
