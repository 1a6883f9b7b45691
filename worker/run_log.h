// The run log: what a training run writes and reports. metrics.jsonl (a
// line per logging window, per kNN evaluation and per roll-back),
// summary.json at the end, the progress lines on stderr and the report
// callback (Trainer::SetReportCallback), with the logging window they
// describe: its steps, images, time, phases and the series of its last step.
// Part of Trainer::Run() (worker/trainer.h), beside the step and the fault
// guard (worker/fault_guard.h).
//
// Usage, as Trainer::Run() does:
//   RunLog log(spec, rank, world_size, steps_per_epoch, report_callback);
//   log.Open(resumed_from, position, written_by);
//   ... each step:    log.AddStep(phases, seconds, position, lr, staleness);
//   ... each window:  log.CloseWindow(position, rank_loss, loss, mean_loss);
//   ... at the end:   log.WriteSummary(summary, knn_history, threads, yaml);
#ifndef MOMENTUM_WORKER_RUN_LOG_H_
#define MOMENTUM_WORKER_RUN_LOG_H_

#include <chrono>
#include <cstdint>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "common/job_spec.h"
#include "worker/checkpoint.h"
#include "worker/moco.h"
#include "worker/step_report.h"
#include "worker/trainer.h"

namespace momentum::worker {

// Trainer::Run() makes one per call on every rank and uses it on the thread
// that runs Run() only (it is not thread-safe); the FaultGuard of the same
// call adds the device's waits to it and tells it of roll-backs. Rank 0
// alone writes files and progress lines; every rank calls the report
// callback. Each line of metrics.jsonl is flushed as it is written, so the
// file holds all a crashed run logged. Owns no thread.
class RunLog {
 public:
  using ReportCallback = std::function<void(const StepReport&)>;

  // `spec` must outlive the log; `report` may be empty.
  RunLog(const JobSpec& spec, int64_t rank, int64_t world_size,
         int64_t steps_per_epoch, ReportCallback report);
  RunLog(const RunLog&) = delete;
  RunLog& operator=(const RunLog&) = delete;

  // Rank 0 starts metrics.jsonl: empty for a fresh run; for one resumed from
  // `resumed_from` at `pos`, with its lines up to pos.global_step only (the
  // steps after the checkpoint are repeated) and a resume line on stderr,
  // warning when `written_by` ranks wrote the checkpoint and this run has
  // another number.
  void Open(const std::optional<std::string>& resumed_from,
            const RunPosition& pos, int64_t written_by);

  // A step done, taking `seconds` by the host's clock, split as `phases`,
  // with learning rate `lr`; `pos` is after it and `queue_staleness` the
  // queue's (Moco::QueueStaleness()).
  void AddStep(const StepPhases& phases, double seconds, const RunPosition& pos,
               double lr, int64_t queue_staleness);
  // Seconds the host waited for the device's work of the steps
  // (FaultGuard::Settle()): they count as the optimizer's phase, the one
  // whose work the device finishes last.
  void AddDeviceWait(double seconds);
  // The health of the last step, as read back from the device.
  void SetHealth(const BatchHealth& health);

  int64_t window_steps() const { return window_steps_; }
  // The sum of the steps' phases over this Run() call.
  const StepPhases& run_phases() const { return run_phases_; }

  // Ends the logging window at `pos`: reports this rank's mean loss
  // `rank_loss`; rank 0 logs a progress line and writes a metrics line with
  // the group's last-step loss `step_loss` and mean loss `mean_loss`. The
  // next window starts empty.
  void CloseWindow(const RunPosition& pos, double rank_loss, double step_loss,
                   double mean_loss);
  // A kNN evaluation that began at `start` found `top1` at `pos`, `epochs`
  // into the run: reported with the series of the last step; rank 0 logs it
  // and writes a metrics line.
  void Evaluated(const RunPosition& pos, double epochs, double top1,
                 int64_t queue_staleness,
                 std::chrono::steady_clock::time_point start);
  // The run rolled back from `from_step` to `checkpoint` (`state` as loaded,
  // with the new learning-rate scale) because of `reason`: the window starts
  // anew; rank 0 drops the metrics lines after the checkpoint's step, writes
  // a rollback line with `values` (what triggered it) and warns.
  void RolledBack(const std::string& reason,
                  const std::vector<std::pair<std::string, double>>& values,
                  int64_t from_step, const std::string& checkpoint,
                  const CheckpointState& state);

  // Rank 0 writes summary.json (atomically) for a run that finished.
  // Errors name the file.
  absl::Status WriteSummary(const TrainSummary& summary,
                            const std::vector<KnnRecord>& knn_history,
                            int64_t threads,
                            const std::string& spec_yaml) const;

 private:
  bool lead() const { return rank_ == 0; }
  void Report(const StepReport& report) const {
    if (report_) report_(report);
  }
  void ResetWindow();

  const JobSpec& spec_;
  const int64_t rank_;
  const int64_t world_size_;
  const int64_t steps_per_epoch_;
  const ReportCallback report_;
  const std::string metrics_path_;
  std::ofstream metrics_;  // rank 0's, appending
  // The series as of the last step of this Run() call, for the reports.
  StepReport last_report_;
  // The logging window so far.
  double window_seconds_ = 0;
  int64_t window_images_ = 0;
  int64_t window_steps_ = 0;
  StepPhases window_phases_;
  StepPhases run_phases_;
};

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_RUN_LOG_H_
