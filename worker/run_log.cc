#include "worker/run_log.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "worker/log.h"
#include "worker/optim.h"

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

nlohmann::json PhasesMs(const StepPhases& p) {
  return {{"data", 1000 * p.data},
          {"forward", 1000 * p.forward},
          {"backward", 1000 * p.backward},
          {"communication", 1000 * p.communication},
          {"optimizer", 1000 * p.optimizer}};
}

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm",
                  static_cast<long long>(s / 3600),
                  static_cast<long long>(s / 60 % 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%lldm%02llds",
                  static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  }
  return buf;
}

// Keeps the lines of metrics.jsonl up to `step`: a resumed run repeats the
// steps after its checkpoint and must not list them twice.
void TruncateMetrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::vector<std::string> kept;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
        j["step"].get<int64_t>() <= step) {
      kept.push_back(line);
    }
  }
  in.close();
  std::ofstream out(path, std::ios::trunc);
  for (const auto& l : kept) out << l << "\n";
}

}  // namespace

RunLog::RunLog(const JobSpec& spec, int64_t rank, int64_t world_size,
               int64_t steps_per_epoch, ReportCallback report)
    : spec_(spec),
      rank_(rank),
      world_size_(world_size),
      steps_per_epoch_(steps_per_epoch),
      report_(std::move(report)),
      metrics_path_((fs::path(spec.output_dir) / "metrics.jsonl").string()) {
  last_report_.rank = rank;
}

void RunLog::Open(const std::optional<std::string>& resumed_from,
                  const RunPosition& pos, int64_t written_by) {
  if (!lead()) return;
  if (resumed_from) {
    TruncateMetrics(metrics_path_, pos.global_step);
    LogInfo("resuming from %s at epoch %d step %d", *resumed_from, pos.epoch,
            pos.global_step);
    if (written_by != world_size_) {
      LogWarn(
          "the checkpoint was written by %d ranks, this run has %d: the "
          "global batch stays %d (%d per rank)",
          written_by, world_size_, spec_.optim.batch_size,
          spec_.optim.batch_size / world_size_);
    }
  } else {
    std::ofstream(metrics_path_, std::ios::trunc);
  }
  metrics_.open(metrics_path_, std::ios::app);
}

void RunLog::AddStep(const StepPhases& phases, double seconds,
                     const RunPosition& pos, double lr,
                     int64_t queue_staleness) {
  window_phases_ += phases;
  run_phases_ += phases;
  window_seconds_ += seconds;
  window_images_ += spec_.optim.batch_size;
  ++window_steps_;
  // The series of the last step (worker/step_report.h); the window's
  // fields follow when the window closes.
  last_report_.step = pos.global_step;
  last_report_.epoch =
      pos.epoch + static_cast<double>(pos.step_in_epoch) / steps_per_epoch_;
  last_report_.learning_rate = lr;
  last_report_.queue_staleness_steps = queue_staleness;
}

void RunLog::AddDeviceWait(double seconds) {
  window_seconds_ += seconds;
  window_phases_.optimizer += seconds;
  run_phases_.optimizer += seconds;
}

void RunLog::SetHealth(const BatchHealth& health) {
  last_report_.positive_logit_mean = health.positive_logit_mean;
  last_report_.negative_logit_mean = health.negative_logit_mean;
  last_report_.feature_std_mean = health.feature_std_mean;
  last_report_.feature_std_min = health.feature_std_min;
}

void RunLog::ResetWindow() {
  window_seconds_ = 0;
  window_images_ = 0;
  window_steps_ = 0;
  window_phases_ = StepPhases();
}

void RunLog::CloseWindow(const RunPosition& pos, double rank_loss,
                         double step_loss, double mean_loss) {
  const double ips = window_images_ / std::max(window_seconds_, 1e-9);
  Progress progress;
  progress.step = pos.global_step;
  progress.steps_per_epoch = steps_per_epoch_;
  progress.train_seconds = pos.train_seconds;
  const double fraction = RunFraction(spec_.optim, progress, /*end=*/false);
  const double eta =
      fraction > 0 ? pos.train_seconds * (1 - fraction) / fraction : NAN;
  const StepPhases mean_phases = window_phases_ / window_steps_;
  const double lr = last_report_.learning_rate;  // of the window's last step
  StepReport& report = last_report_;
  report.fraction = fraction;
  report.loss = rank_loss;
  report.images_per_second = ips;
  report.data_seconds = mean_phases.data;
  report.forward_seconds = mean_phases.forward;
  report.backward_seconds = mean_phases.backward;
  report.communication_seconds = mean_phases.communication;
  report.optimizer_seconds = mean_phases.optimizer;
  report.eta_seconds = std::isfinite(eta) ? eta : -1;
  report.knn_top1 = -1;
  if (lead()) {
    LogInfo("epoch %d step %d/%d (%d) loss %.4f lr %.4g %.0f img/s ETA %s",
            pos.epoch + 1, pos.step_in_epoch, steps_per_epoch_, pos.global_step,
            mean_loss, lr, ips, FormatDuration(eta));
    metrics_
        << nlohmann::json{{"step", pos.global_step},
                          {"epoch", pos.epoch},
                          {"loss", step_loss},
                          {"loss_mean", mean_loss},
                          {"lr", lr},
                          {"images_per_s", ips},
                          {"step_ms", PhasesMs(mean_phases)},
                          {"train_seconds", pos.train_seconds},
                          {"positive_logit_mean", report.positive_logit_mean},
                          {"negative_logit_mean", report.negative_logit_mean},
                          {"feature_std_mean", report.feature_std_mean},
                          {"feature_std_min", report.feature_std_min},
                          {"queue_staleness_steps",
                           report.queue_staleness_steps}}
               .dump()
        << "\n";
    metrics_.flush();
  }
  Report(report);
  ResetWindow();
}

void RunLog::Evaluated(const RunPosition& pos, double epochs, double top1,
                       int64_t queue_staleness,
                       std::chrono::steady_clock::time_point start) {
  // Every rank reports the evaluation, with the series of its last step.
  StepReport report = last_report_;
  report.step = pos.global_step;
  report.epoch = epochs;
  Progress progress;
  progress.step = pos.global_step;
  progress.steps_per_epoch = steps_per_epoch_;
  progress.train_seconds = pos.train_seconds;
  report.fraction = RunFraction(spec_.optim, progress, /*end=*/false);
  report.queue_staleness_steps = queue_staleness;
  report.knn_top1 = top1;
  Report(report);
  if (!lead()) return;
  LogInfo("kNN top-1 %.2f%% after %.2f epochs, step %d (%.1f s)", 100 * top1,
          epochs, pos.global_step, Seconds(start, Clock::now()));
  metrics_ << nlohmann::json{{"step", pos.global_step},
                             {"epoch", pos.epoch},
                             {"epochs_completed", epochs},
                             {"knn_top1", top1},
                             {"train_seconds", pos.train_seconds}}
                  .dump()
           << "\n";
  metrics_.flush();
}

void RunLog::RolledBack(
    const std::string& reason,
    const std::vector<std::pair<std::string, double>>& values,
    int64_t from_step, const std::string& checkpoint,
    const CheckpointState& state) {
  ResetWindow();
  if (!lead()) return;
  const RunPosition& pos = state.position;
  TruncateMetrics(metrics_path_, pos.global_step);
  nlohmann::json event{
      {"event", "rollback"},         {"reason", reason},
      {"from_step", from_step},      {"to_step", pos.global_step},
      {"checkpoint", checkpoint},    {"lr_scale", state.lr_scale},
      {"rollbacks", state.rollbacks}};
  // The values that triggered it.
  for (const auto& [key, value] : values) event[key] = value;
  metrics_ << event.dump() << "\n";
  metrics_.flush();
  LogWarn("%s: rolled back to %s (step %d); the learning rate is now x%g",
          reason, checkpoint, pos.global_step, state.lr_scale);
}

absl::Status RunLog::WriteSummary(const TrainSummary& summary,
                                  const std::vector<KnnRecord>& knn_history,
                                  int64_t threads,
                                  const std::string& spec_yaml) const {
  nlohmann::json curve = nlohmann::json::array();
  for (const KnnRecord& r : knn_history) {
    curve.push_back(
        {{"epochs", r.epochs}, {"step", r.step}, {"knn_top1", r.top1}});
  }
  nlohmann::json j{{"knn_top1", summary.knn_top1},
                   {"knn_curve", curve},
                   {"steps", summary.steps},
                   {"epochs_completed", summary.epochs_completed},
                   {"images_seen", summary.images_seen},
                   {"train_seconds", summary.train_seconds},
                   {"wall_seconds", summary.wall_seconds},
                   {"step_ms", PhasesMs(summary.phases)},
                   {"stop_reason", summary.stop_reason},
                   {"resumed", summary.resumed},
                   {"threads", threads},
                   {"world_size", world_size_},
                   {"export", summary.export_path},
                   {"checkpoint", summary.checkpoint},
                   {"spec", spec_yaml}};
  std::string text = j.dump(2) + "\n";
  return WriteFileAtomically(
      (fs::path(spec_.output_dir) / "summary.json").string(),
      std::vector<char>(text.begin(), text.end()));
}

}  // namespace momentum::worker
