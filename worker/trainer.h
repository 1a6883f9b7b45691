// The single-process MoCo trainer: builds the model, data loaders and
// optimiser from a JobSpec and trains until the first bound (epochs, steps or
// training time), evaluating with the kNN monitor, checkpointing, exporting
// the backbone and writing metrics.jsonl and summary.json into
// spec.output_dir. A run whose output folder holds a checkpoint resumes from
// it (checkpoint.resume), bit for bit.
//
// Usage:
//   auto trainer = Trainer::Create(spec);
//   if (!trainer.ok()) ...;
//   (*trainer)->SetReportCallback([](const StepReport& r) { ... });
//   absl::StatusOr<TrainSummary> summary = (*trainer)->Run();
#ifndef MOMENTUM_WORKER_TRAINER_H_
#define MOMENTUM_WORKER_TRAINER_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "common/job_spec.h"
#include "worker/checkpoint.h"
#include "worker/dataset.h"
#include "worker/device.h"
#include "worker/loader.h"
#include "worker/moco.h"
#include "worker/optim.h"
#include "worker/process_group.h"
#include "worker/step_report.h"

namespace momentum::worker {

// Where a training step's wall time goes, in seconds. communication is the
// time in collectives (waiting for slower ranks included) plus packing the
// gradients into buckets; forward excludes the key gathers inside it;
// optimizer holds the momentum update, SGD and the enqueue.
struct StepPhases {
  double data = 0;
  double forward = 0;
  double backward = 0;
  double communication = 0;
  double optimizer = 0;

  StepPhases& operator+=(const StepPhases& o);
  StepPhases operator/(double n) const;
};

struct TrainSummary {
  double knn_top1 = -1;  // final kNN top-1 in [0, 1]; -1 when not evaluated
  int64_t steps = 0;
  int64_t epochs_completed = 0;
  int64_t images_seen = 0;
  double train_seconds = 0;
  double wall_seconds = 0;
  std::string stop_reason;  // epochs | steps | time_budget | signal | limit
  std::string checkpoint;   // the last checkpoint written
  std::string export_path;  // the exported backbone ("" when stopped early)
  bool resumed = false;
  // Mean per step over the steps of this Run() call (this rank's clock).
  StepPhases phases;
};

class DeviceSeries;
class FaultGuard;
class RunLog;

// The state of one Trainer::Run() call, which its parts share: the step
// (Trainer), the run log (worker/run_log.h) and the fault guard
// (worker/fault_guard.h). Internal to the trainer.
struct RunState {
  // What a checkpoint holds; a roll-back replaces it with a checkpoint's.
  CheckpointState checkpoint;
  // resumed and the last checkpoint written so far; the rest at the end.
  TrainSummary summary;
  // The step of the checkpoint last written or loaded: a run that ends
  // there writes no second one.
  int64_t checkpoint_step = -1;
  int64_t steps_this_call = 0;
  double last_step_seconds = 0;  // for the learning rate's warm-up
  const std::chrono::steady_clock::time_point started =
      std::chrono::steady_clock::now();
};

// Owns the loaders' threads; one thread calls Run().
//
// Run() reads as the outline of a run; its parts are the step
// (Trainer::Step: one training step, never waiting for the device), the run
// log (worker/run_log.h: metrics.jsonl, summary.json, progress lines and
// reports) and the fault guard (worker/fault_guard.h: non-finite and
// collapse checks, roll-backs, the ranks' stop agreement).
class Trainer {
 public:
  // `dist` makes this trainer one rank of a group (world_size > 1): it joins
  // the group here, reads its shard of every global batch, shuffles
  // BatchNorm across the group, averages gradients and shares the queue;
  // rank 0 evaluates and writes checkpoints, metrics, summary and export.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(
      const JobSpec& spec, const DistOptions& dist = {});

  // Trains to the end of the run. Returns early, with a checkpoint written
  // and stop_reason "signal", when `stop` (if given) becomes true, or with
  // stop_reason "limit" after `max_steps_this_call` steps (> 0), as a run
  // that was stopped there would. Errors name the file or operation.
  absl::StatusOr<TrainSummary> Run(const std::atomic<bool>* stop = nullptr,
                                   int64_t max_steps_this_call = 0);

  // Called on the thread that runs Run(), on every rank: after each logging
  // window (this rank's window loss, the group's images per second, the
  // health of this rank's last batch), and after each kNN evaluation with
  // knn_top1 set and the other fields as of the last step (health, loss and
  // rates stay 0 when no step ran since this Run() began). Training waits
  // for it, so it should only queue the report (worker/reporter.h). Set it
  // before Run().
  using ReportCallback = std::function<void(const StepReport&)>;
  void SetReportCallback(ReportCallback callback) {
    report_callback_ = std::move(callback);
  }

  Moco& model() { return *model_; }
  const JobSpec& spec() const { return spec_; }
  int64_t steps_per_epoch() const { return steps_per_epoch_; }
  const RankDevice& where() const { return where_; }

 private:
  Trainer(const JobSpec& spec, const DistOptions& dist);
  bool lead() const { return dist_.rank == 0; }
  // Makes every rank hold rank 0's model (no-op with one rank).
  absl::Status BroadcastModel();
  absl::Status Init();
  // Binds this rank to its share of the machine's CPUs (resources.
  // cpu_affinity, cpu_affinity.h) and sets threads_; logs which CPUs it
  // runs on, or why it is not bound.
  absl::Status PlaceOnCpus(int64_t local_ranks);
  double CommSeconds() const;

  // The parts of Run(), in the order of a run; all run on the thread that
  // runs Run().
  //
  // Creates output_dir, loads the newest checkpoint when the spec says to
  // resume, opens `log` from there (or from scratch) and gives every rank
  // rank 0's model.
  absl::Status Begin(RunState* run, RunLog* log);
  // Why the run stops at the position of `run` ("" to go on): epochs,
  // steps, or with `timed` also time_budget.
  std::string BoundReached(const RunState& run, bool timed) const;
  // What a step did: its learning rate, host time and phases.
  struct StepDone {
    double lr = 0;
    double seconds = 0;
    StepPhases phases;
  };
  // One training step at the position of `run`: the next batch to the
  // device, the momentum update, forward, backward, the gradients' average
  // and the optimiser, recording into `series`. It never waits for the
  // device; the fault guard reads `series` back. `comm_at_top`: the
  // collective seconds at the top of the iteration (the stop vote's count
  // as the step's communication).
  absl::StatusOr<StepDone> Step(const RunState& run, double comm_at_top,
                                DeviceSeries* series);
  // Moves the position of `run` past `step` and adds it to `log`.
  void Advance(const StepDone& step, RunState* run, RunLog* log);
  // At a logging step: settles, checks and logs the window, then acts on a
  // collapse. True when the run rolled back.
  static absl::StatusOr<bool> EndWindow(const RunState& run, FaultGuard* guard,
                                        RunLog* log);
  // At the end of an epoch: evaluates and checkpoints when due, and starts
  // the next epoch.
  absl::Status EndEpoch(RunState* run, RunLog* log);
  // Evaluates with the kNN monitor, adds the result to the kNN history and
  // logs it.
  absl::Status Evaluate(CheckpointState* state, RunLog* log);
  // Checkpoints `run` (rank 0 writes) and records it as the last one.
  absl::Status CheckpointRun(RunState* run);
  // The end of a run stopped for `reason`: the final evaluation and
  // checkpoint, and, when it finished, the export and summary.json.
  absl::StatusOr<TrainSummary> Finish(const std::string& reason, RunState* run,
                                      RunLog* log);

  // Rank 0 writes a checkpoint of `state` and keeps the best by kNN as
  // checkpoints/best.pt: its path ("" on the other ranks).
  absl::StatusOr<std::string> Checkpoint(CheckpointState* state);
  // Loads the newest checkpoint in `dir` that loads (corrupt ones are
  // skipped with a warning) into the model, the optimiser, the generators
  // and `state` (all but its world_size; `written_by` gets the ranks that
  // wrote it). Its path, or nullopt when there is none.
  absl::StatusOr<std::optional<std::string>> RestoreNewest(
      const std::string& dir, CheckpointState* state, int64_t* written_by);
  std::string checkpoint_dir() const;

  JobSpec spec_;
  DistOptions dist_;
  RankDevice where_;  // the rank's device, backend and precision
  std::unique_ptr<ProcessGroup> group_;
  std::string spec_yaml_;
  DatasetPair data_;
  ViewFormat format_;
  int64_t blur_radius_ = 0;  // MaxBlurRadius of the views
  std::unique_ptr<Moco> model_;
  std::unique_ptr<Sgd> sgd_;
  std::unique_ptr<TrainLoader> loader_;
  at::Generator shuffle_rng_;
  int64_t steps_per_epoch_ = 0;
  int64_t threads_ = 1;
  ReportCallback report_callback_;
  // MOMENTUM_FAULT_NAN_STEP: a fault-injection hook for tests. Rank 0 makes
  // the loss of this global step NaN, once per run (before any roll-back).
  int64_t inject_nan_step_ = -1;
};

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_TRAINER_H_
