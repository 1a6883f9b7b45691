#include "worker/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/utils.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "worker/device_augment.h"
#include "worker/export.h"
#include "worker/knn.h"
#include "worker/log.h"

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

StepPhases& StepPhases::operator+=(const StepPhases& o) {
  data += o.data;
  forward += o.forward;
  backward += o.backward;
  communication += o.communication;
  optimizer += o.optimizer;
  return *this;
}

StepPhases StepPhases::operator/(double n) const {
  return {data / n, forward / n, backward / n, communication / n,
          optimizer / n};
}

Trainer::Trainer(const JobSpec& spec, const DistOptions& dist)
    : spec_(spec), dist_(dist) {}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(
    const JobSpec& spec, const DistOptions& dist) {
  absl::Status valid = ValidateJobSpec(spec);
  if (!valid.ok()) return valid;
  const int64_t world = dist.world_size;
  if (spec.optim.batch_size % world != 0) {
    return absl::InvalidArgumentError(
        "optim.batch_size must be divisible by the number of ranks, got " +
        std::to_string(spec.optim.batch_size) + " and " +
        std::to_string(world));
  }
  auto where = ResolveRankDevice(spec.resources, dist.local_rank);
  if (!where.ok()) return where.status();
  std::unique_ptr<Trainer> trainer(new Trainer(spec, dist));
  trainer->where_ = *where;
  if (const char* step = std::getenv("MOMENTUM_FAULT_NAN_STEP")) {
    trainer->inject_nan_step_ = std::atoll(step);
  }
  absl::Status status = trainer->Init();
  if (!status.ok()) return status;
  return trainer;
}

absl::Status Trainer::Init() {
  spec_yaml_ = JobSpecToYaml(spec_);
  const int64_t world = dist_.world_size;
  // Default: the machine's cores shared by the ranks on it (all of them, as
  // far as this process knows: the launcher starts its ranks on one host).
  int64_t local_ranks = world;
  if (const char* v = std::getenv("LOCAL_WORLD_SIZE")) {
    local_ranks = std::max<int64_t>(1, std::atoll(v));
  }
  threads_ = spec_.resources.threads > 0
                 ? spec_.resources.threads
                 : std::max<int64_t>(
                       1, std::thread::hardware_concurrency() / local_ranks);
  // All threads go to LibTorch's intra-op pool. Running the key encoder on a
  // thread of its own beside the query encoder (MocoOptions::concurrent_key)
  // measured slower here: 649 against 1010 images/s with two threads
  // (bench/trainer_bench).
  at::set_num_threads(static_cast<int>(threads_));

  auto data = OpenDatasets(spec_.data);
  if (!data.ok()) return data.status();
  data_ = std::move(*data);

  format_ =
      ResolveViewFormat(spec_.data, *data_.train, spec_.model.in_channels);

  PrepareDevice(where_);
  if (world > 1) {
    DistOptions options = dist_;
    options.timeout = std::chrono::milliseconds(
        static_cast<int64_t>(spec_.resources.timeout_s * 1000));
    options.backend = where_.backend;
    if (where_.device.is_cuda()) options.cuda_device = where_.device.index();
    auto group = ProcessGroup::Create(options);
    if (!group.ok()) return group.status();
    group_ = std::move(*group);
  }

  LoaderOptions lo;
  lo.global_batch = spec_.optim.batch_size;
  lo.rank = dist_.rank;
  lo.world_size = world;
  lo.threads = spec_.data.loader_threads;
  lo.prefetch = spec_.data.prefetch;
  lo.seed = spec_.seed;
  lo.augment = spec_.data.augment;
  lo.format = format_;
  // Page-locked batches copy to the GPU without the host waiting.
  lo.pin_memory = where_.device.is_cuda();
  lo.scaled_decode = spec_.data.scaled_decode;
  lo.photometric_on_device =
      spec_.data.augment_on == "device" ||
      (spec_.data.augment_on == "auto" && where_.device.is_cuda());
  blur_radius_ = MaxBlurRadius(spec_.data.augment, format_);
  loader_ = std::make_unique<TrainLoader>(data_.train.get(), lo);
  steps_per_epoch_ = loader_->steps_per_epoch();
  if (steps_per_epoch_ == 0) {
    return absl::InvalidArgumentError(
        "optim.batch_size " + std::to_string(spec_.optim.batch_size) +
        " is larger than the train set (" +
        std::to_string(data_.train->size()) + " images)");
  }

  torch::manual_seed(spec_.seed);
  at::Generator init_rng = at::make_generator<at::CPUGeneratorImpl>(spec_.seed);
  MocoOptions mo = MocoOptionsFromSpec(spec_, world);
  model_ = std::make_unique<Moco>(mo, init_rng);
  // Initialised on the CPU (the same values on every device), then moved.
  model_->To(where_);
  model_->SetProcessGroup(group_.get());
  sgd_ = std::make_unique<Sgd>(model_->encoder_q()->parameters(),
                               spec_.optim.momentum, spec_.optim.weight_decay);
  // The BatchNorm shuffle draws from its own generator, seeded from the job.
  shuffle_rng_ =
      at::make_generator<at::CPUGeneratorImpl>(spec_.seed ^ 0x5EEDBA7C4ULL);
  return absl::OkStatus();
}

absl::Status Trainer::BroadcastModel() {
  if (group_ == nullptr) return absl::OkStatus();
  at::NoGradGuard no_grad;
  for (Moco* m : {model_.get()}) {
    for (auto* encoder : {&m->encoder_q(), &m->encoder_k()}) {
      for (auto& [name, tensor] : StateOf(**encoder)) {
        absl::Status s = group_->Broadcast(tensor, 0);
        if (!s.ok()) return s;
      }
    }
    absl::Status s = group_->Broadcast(m->queue(), 0);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status Trainer::Evaluate(CheckpointState* state,
                               int64_t* last_eval_step) {
  const auto start = Clock::now();
  // Each rank's BatchNorm statistics come from its own batches; the group
  // evaluates (and rank 0 saves) rank 0's, as DistributedDataParallel
  // broadcasts its buffers. Every rank encodes a shard of the images.
  if (group_ != nullptr) {
    for (auto* encoder : {&model_->encoder_q(), &model_->encoder_k()}) {
      for (at::Tensor& buffer : (*encoder)->buffers()) {
        absl::Status s = group_->Broadcast(buffer, 0);
        if (!s.ok()) return s;
      }
    }
  }
  auto measured =
      KnnTop1(model_->encoder_q(), *data_.train, *data_.test, format_,
              spec_.eval, spec_.data.loader_threads, group_.get());
  if (!measured.ok()) return measured.status();
  const double top1 = *measured;
  const RunPosition& pos = state->position;
  const double epochs = static_cast<double>(pos.global_step) /
                        static_cast<double>(steps_per_epoch_);
  state->knn_history.push_back({epochs, pos.global_step, top1});
  *last_eval_step = pos.global_step;
  // Every rank reports the evaluation, with the series of its last step.
  StepReport report = last_report_;
  report.step = pos.global_step;
  report.epoch = epochs;
  Progress progress;
  progress.step = pos.global_step;
  progress.steps_per_epoch = steps_per_epoch_;
  progress.train_seconds = pos.train_seconds;
  report.fraction = RunFraction(spec_.optim, progress, /*end=*/false);
  report.queue_staleness_steps = model_->QueueStaleness();
  report.knn_top1 = top1;
  Report(report);
  if (!lead()) return absl::OkStatus();
  LogInfo("kNN top-1 %.2f%% after %.2f epochs, step %d (%.1f s)", 100 * top1,
          epochs, pos.global_step, Seconds(start, Clock::now()));
  std::ofstream metrics(fs::path(spec_.output_dir) / "metrics.jsonl",
                        std::ios::app);
  metrics << nlohmann::json{{"step", pos.global_step},
                            {"epoch", pos.epoch},
                            {"epochs_completed", epochs},
                            {"knn_top1", top1},
                            {"train_seconds", pos.train_seconds}}
                 .dump()
          << "\n";
  return absl::OkStatus();
}

absl::StatusOr<std::string> Trainer::Checkpoint(CheckpointState* state) {
  if (!lead()) return std::string();  // rank 0 writes for the group
  state->shuffle_rng_state = shuffle_rng_.get_state();
  state->torch_rng_state = at::detail::getDefaultCPUGenerator().get_state();
  const fs::path dir = fs::path(spec_.output_dir) / "checkpoints";
  absl::StatusOr<std::string> path = SaveCheckpoint(
      dir.string(), *model_, *sgd_, *state, spec_.checkpoint.keep);
  if (!path.ok()) return path;
  // The best by kNN stays as checkpoints/best.pt (a hard link, so pruning
  // the newest N does not take it) with best.json saying what it is.
  const std::vector<KnnRecord>& h = state->knn_history;
  if (!h.empty() && h.back().step == state->position.global_step) {
    bool best = true;
    for (size_t i = 0; i + 1 < h.size(); ++i) {
      best = best && h[i].top1 < h.back().top1;
    }
    if (best) {
      const fs::path tmp = dir / "best.pt.tmp";
      std::error_code ec;
      fs::remove(tmp, ec);
      fs::create_hard_link(*path, tmp, ec);
      if (!ec) fs::rename(tmp, dir / "best.pt", ec);
      if (ec) {
        return absl::InternalError("keeping the best checkpoint as " +
                                   (dir / "best.pt").string() + ": " +
                                   ec.message());
      }
      const std::string text = nlohmann::json{{"checkpoint", *path},
                                              {"step", h.back().step},
                                              {"epochs", h.back().epochs},
                                              {"knn_top1", h.back().top1}}
                                   .dump(2) +
                               "\n";
      absl::Status written =
          WriteFileAtomically((dir / "best.json").string(),
                              std::vector<char>(text.begin(), text.end()));
      if (!written.ok()) return written;
    }
  }
  return path;
}

absl::StatusOr<std::optional<std::string>> Trainer::RestoreNewest(
    const std::string& dir, CheckpointState* state, int64_t* written_by) {
  // A corrupt or truncated checkpoint (a crash during a copy, a full disk)
  // is skipped for the one before. A checkpoint of another model is an
  // error, and so is a folder of corrupt ones only: the model may be half
  // overwritten by then.
  absl::Status last = absl::OkStatus();
  for (const std::string& path : CheckpointsNewestFirst(dir)) {
    absl::StatusOr<CheckpointState> restored =
        LoadCheckpoint(path, *model_, *sgd_);
    if (!restored.ok()) {
      if (restored.status().code() != absl::StatusCode::kDataLoss) {
        return restored.status();
      }
      LogWarn("skipping checkpoint %s: %s", path, restored.status().message());
      last = restored.status();
      continue;
    }
    state->position = restored->position;
    state->knn_history = restored->knn_history;
    state->lr_scale = restored->lr_scale;
    state->rollbacks = restored->rollbacks;
    *written_by = restored->world_size;
    shuffle_rng_.set_state(restored->shuffle_rng_state);
    if (restored->torch_rng_state.defined()) {
      at::Generator global = at::detail::getDefaultCPUGenerator();
      global.set_state(restored->torch_rng_state);
    }
    return std::optional<std::string>(path);
  }
  if (!last.ok()) return last;
  return std::optional<std::string>();
}

absl::StatusOr<TrainSummary> Trainer::Run(const std::atomic<bool>* stop,
                                          int64_t max_steps_this_call) {
  const auto wall_start = Clock::now();
  std::error_code ec;
  fs::create_directories(spec_.output_dir, ec);
  if (ec) {
    return absl::InternalError("cannot create output_dir " + spec_.output_dir +
                               ": " + ec.message());
  }
  const std::string ckpt_dir =
      (fs::path(spec_.output_dir) / "checkpoints").string();
  const std::string metrics_path =
      (fs::path(spec_.output_dir) / "metrics.jsonl").string();

  TrainSummary summary;
  CheckpointState state;
  state.spec_yaml = spec_yaml_;
  state.world_size = dist_.world_size;
  std::optional<std::string> latest;
  int64_t written_by = dist_.world_size;
  if (spec_.checkpoint.resume) {
    auto restored = RestoreNewest(ckpt_dir, &state, &written_by);
    if (!restored.ok()) return restored.status();
    latest = *restored;
  }
  if (latest) {
    summary.resumed = true;
    summary.checkpoint = *latest;
    if (lead()) {
      TruncateMetrics(metrics_path, state.position.global_step);
      LogInfo("resuming from %s at epoch %d step %d", *latest,
              state.position.epoch, state.position.global_step);
      if (written_by != dist_.world_size) {
        LogWarn(
            "the checkpoint was written by %d ranks, this run has %d: the "
            "global batch stays %d (%d per rank)",
            written_by, dist_.world_size, spec_.optim.batch_size,
            spec_.optim.batch_size / dist_.world_size);
      }
    }
  } else if (lead()) {
    std::ofstream(metrics_path, std::ios::trunc);
  }
  // Every rank starts from rank 0's model, as DistributedDataParallel does.
  if (absl::Status s = BroadcastModel(); !s.ok()) return s;
  RunPosition& pos = state.position;
  last_report_ = StepReport();
  last_report_.rank = dist_.rank;
  const OptimSpec& optim = spec_.optim;
  const int64_t batch = optim.batch_size;
  const bool shuffle = model_->options().bn_groups > 0;
  int64_t last_eval_step =
      state.knn_history.empty() ? -1 : state.knn_history.back().step;
  int64_t last_ckpt_step = summary.resumed ? pos.global_step : -1;
  std::ofstream metrics;
  if (lead()) metrics.open(metrics_path, std::ios::app);

  // `timed`: the time bound counts too.
  auto bound_reached = [&](bool timed) -> std::string {
    if (optim.epochs > 0 && pos.epoch >= optim.epochs) return "epochs";
    if (optim.steps > 0 && pos.global_step >= optim.steps) return "steps";
    if (timed && optim.time_budget_s > 0 &&
        pos.train_seconds >= optim.time_budget_s) {
      return "time_budget";
    }
    return "";
  };

  loader_->StartEpoch(pos.epoch, pos.step_in_epoch);
  int64_t steps_this_call = 0;
  double window_seconds = 0, last_step_seconds = 0;
  int64_t window_images = 0;
  int64_t window_steps = 0;
  // What the steps leave on the device, read by settle() only: the step
  // never waits for the device. found_inf: the last step's gradients were
  // not finite (the optimiser and the enqueue skip it on the device);
  // first_bad: the first such step since the last settle() and its loss (-1:
  // none); the window's summed loss, the last step's loss and health.
  const at::TensorOptions doubles =
      at::TensorOptions().dtype(at::kDouble).device(where_.device);
  at::Tensor found_inf = at::zeros(
      {1}, at::TensorOptions().dtype(at::kFloat).device(where_.device));
  const at::Tensor unit_scale = at::ones({1}, found_inf.options());
  at::Tensor first_bad = at::full({2}, -1.0, doubles);
  at::Tensor window_loss_sum = at::zeros({1}, doubles);
  at::Tensor last_loss = at::zeros({1}, doubles);
  at::Tensor last_health = at::zeros({4}, doubles);
  // Their values as of the last settle().
  double window_loss = 0, loss_value = 0;
  BatchHealth health;
  StepPhases window_phases, run_phases;
  auto comm_seconds = [this] {
    return group_ != nullptr ? group_->collective_seconds() : 0.0;
  };
  // Logging steps in a row whose features looked collapsed.
  int64_t collapsed_checks = 0;
  // Reloads the newest checkpoint that loads, with the learning rate scaled
  // down, after a step every rank judged bad alike (non-finite gradients,
  // collapsed features); errors when it may not or cannot.
  auto roll_back = [&](const std::string& what, const nlohmann::json& values,
                       int64_t bad_step) -> absl::Status {
    if (state.rollbacks >= spec_.faults.max_rollbacks) {
      return absl::InternalError(
          absl::StrCat(what, "; rolled back ", state.rollbacks,
                       " times already (faults.max_rollbacks)"));
    }
    int64_t written_by = 0;
    auto back = RestoreNewest(ckpt_dir, &state, &written_by);
    if (!back.ok()) return back.status();
    if (!back->has_value()) {
      return absl::InternalError(what + "; no checkpoint to roll back to");
    }
    state.lr_scale *= spec_.faults.rollback_lr_factor;
    state.rollbacks += 1;
    collapsed_checks = 0;
    last_eval_step =
        state.knn_history.empty() ? -1 : state.knn_history.back().step;
    last_ckpt_step = pos.global_step;
    window_seconds = 0;
    window_images = 0;
    window_steps = 0;
    window_loss_sum.zero_();
    first_bad.fill_(-1);
    window_phases = StepPhases();
    if (lead()) {
      TruncateMetrics(metrics_path, pos.global_step);
      nlohmann::json event{
          {"event", "rollback"},         {"reason", what},
          {"from_step", bad_step},       {"to_step", pos.global_step},
          {"checkpoint", **back},        {"lr_scale", state.lr_scale},
          {"rollbacks", state.rollbacks}};
      // The values that triggered it.
      for (const auto& [key, value] : values.items()) event[key] = value;
      metrics << event.dump() << "\n";
      metrics.flush();
      LogWarn("%s: rolled back to %s (step %d); the learning rate is now x%g",
              what, **back, pos.global_step, state.lr_scale);
    }
    loader_->StartEpoch(pos.epoch, pos.step_in_epoch);
    return absl::OkStatus();
  };
  // Waits for the device and reads what the steps since the last call left
  // there. A non-finite step among them fails the run
  // (faults.on_nonfinite fail) or rolls it back: true. Every rank holds the
  // same averaged gradients, so every rank decides alike. Called where the
  // run logs, checkpoints, evaluates or ends, before anything of a skipped
  // step could be kept.
  auto settle = [&]() -> absl::StatusOr<bool> {
    const auto begin = Clock::now();
    const at::Tensor host =
        at::cat({first_bad, window_loss_sum, last_loss, last_health})
            .to(at::kCPU);
    // The device's work of the steps, which their host clocks did not see
    // (on CUDA the phases time the host); it counts as the optimizer's, the
    // phase whose work the device finishes last.
    const double waited = Seconds(begin, Clock::now());
    pos.train_seconds += waited;
    window_seconds += waited;
    window_phases.optimizer += waited;
    run_phases.optimizer += waited;
    const double* v = host.data_ptr<double>();
    window_loss = v[2];
    loss_value = v[3];
    health = {v[4], v[5], v[6], v[7]};
    last_report_.positive_logit_mean = health.positive_logit_mean;
    last_report_.negative_logit_mean = health.negative_logit_mean;
    last_report_.feature_std_mean = health.feature_std_mean;
    last_report_.feature_std_min = health.feature_std_min;
    if (v[0] < 0) return false;
    const int64_t bad_step = static_cast<int64_t>(v[0]);
    const std::string what = absl::StrCat("the gradients of step ", bad_step,
                                          " are not finite (loss on rank ",
                                          dist_.rank, ": ", v[1], ")");
    if (spec_.faults.on_nonfinite == "fail") {
      return absl::InternalError(what + "; learning rate too high?");
    }
    absl::Status s = roll_back(what, {{"loss", v[1]}}, bad_step);
    if (!s.ok()) return s;
    return true;
  };
  // With NCCL the ranks agree on the time and on stopping at logging steps
  // only: the agreement is a host value, and each one waits for the device.
  const bool agree_each_step = where_.backend != "nccl";
  std::string reason;
  while (true) {
    const double comm_at_top = comm_seconds();
    // Time and signals count only where every rank sees the same values.
    const bool agreed = group_ == nullptr || agree_each_step ||
                        pos.global_step % spec_.logging.every_steps == 0;
    bool stop_requested = agreed && stop != nullptr && stop->load();
    if (group_ != nullptr && agreed) {
      // The ranks agree on the training time (their mean; it drives the time
      // bound and the schedule) and stop together when any was asked to.
      std::vector<at::Tensor> shared = {at::tensor(
          {pos.train_seconds, stop_requested ? 1.0 : 0.0}, at::kDouble)};
      absl::Status s = group_->AllReduceMean(shared);
      if (!s.ok()) return s;
      pos.train_seconds = shared[0][0].item<double>();
      stop_requested = shared[0][1].item<double>() > 0;
    }
    reason = bound_reached(agreed);
    if (reason.empty() && stop_requested) reason = "signal";
    if (reason.empty() && max_steps_this_call > 0 &&
        steps_this_call >= max_steps_this_call) {
      reason = "limit";
    }
    if (!reason.empty() || pos.step_in_epoch == steps_per_epoch_) {
      // The run ends, evaluates or checkpoints: only after good steps.
      auto rolled_back = settle();
      if (!rolled_back.ok()) return rolled_back.status();
      if (*rolled_back) continue;
      if (!reason.empty()) break;
    }
    if (pos.step_in_epoch == steps_per_epoch_) {
      // Epoch end: evaluate if due, then move on and checkpoint the new
      // position, so a resume never repeats this.
      const int64_t done = pos.epoch + 1;
      const bool last = optim.epochs > 0 && done >= optim.epochs;
      if (!last && spec_.eval.every_epochs > 0 &&
          done % spec_.eval.every_epochs == 0) {
        absl::Status s = Evaluate(&state, &last_eval_step);
        if (!s.ok()) return s;
      }
      pos.epoch = done;
      pos.step_in_epoch = 0;
      if (!last && spec_.checkpoint.every_epochs > 0 &&
          done % spec_.checkpoint.every_epochs == 0) {
        auto path = Checkpoint(&state);
        if (!path.ok()) return path.status();
        summary.checkpoint = *path;
        last_ckpt_step = pos.global_step;
      }
      loader_->StartEpoch(pos.epoch, 0);
      continue;
    }

    const auto step_start = Clock::now();
    const double comm_at_start = comm_seconds();
    auto batch_or = loader_->Next();
    if (!batch_or.ok()) return batch_or.status();
    TrainBatch& b = *batch_or;
    // Asynchronous from page-locked memory on CUDA; a no-op on the CPU.
    at::Tensor x_q, x_k;
    if (b.query_bytes.defined()) {
      // The loader cropped; colour, blur, flip and normalisation run here,
      // batched, on the device (data.augment_on).
      auto on_device = [&](const at::Tensor& t) {
        return t.to(where_.device, /*non_blocking=*/true);
      };
      x_q =
          PhotometricOnDevice(on_device(b.query_bytes),
                              on_device(b.query_params), format_, blur_radius_);
      x_k = PhotometricOnDevice(on_device(b.key_bytes), on_device(b.key_params),
                                format_, blur_radius_);
    } else {
      x_q = b.query.to(where_.device, /*non_blocking=*/true);
      x_k = b.key.to(where_.device, /*non_blocking=*/true);
    }
    const auto data_done = Clock::now();
    Clock::time_point momentum_done, forward_done, backward_done, averaged_done;
    double comm_before_forward = 0, comm_after_forward = 0;
    Progress progress;
    progress.step = pos.global_step;
    progress.steps_per_epoch = steps_per_epoch_;
    progress.train_seconds = pos.train_seconds;
    progress.step_seconds = last_step_seconds;
    const double lr = LearningRate(optim, progress) * state.lr_scale;

    try {
      model_->MomentumUpdate();
      momentum_done = Clock::now();
      comm_before_forward = comm_seconds();
      at::Tensor perm;
      if (shuffle) {
        // One permutation of the group's batch drawn on rank 0 (moco.bn
        // shuffle), or of each rank's own batch (split).
        const bool across = model_->options().shuffle_across_ranks;
        // Drawn on the host generator, the same on every device, and
        // copied without waiting (a blocking copy to a GPU waits for all the
        // work queued there).
        perm = at::randperm(across ? batch : b.key.size(0), shuffle_rng_,
                            at::kLong)
                   .to(where_.device, /*non_blocking=*/true);
        if (across && group_ != nullptr) {
          absl::Status s = group_->Broadcast(perm, 0);
          if (!s.ok()) return s;
        }
      }
      Moco::Output out = model_->Forward(x_q, x_k, perm);
      forward_done = Clock::now();
      comm_after_forward = comm_seconds();
      if (pos.global_step == inject_nan_step_ && state.rollbacks == 0 &&
          dist_.rank == 0) {
        out.loss = out.loss * std::numeric_limits<double>::quiet_NaN();
      }
      sgd_->ZeroGrad();
      out.loss.backward();
      backward_done = Clock::now();
      absl::Status averaged = model_->AverageGradients();
      if (!averaged.ok()) return averaged;
      averaged_done = Clock::now();
      // Every rank holds the same averaged gradients: one test, one decision
      // on all ranks, made on the device before anything is updated.
      std::vector<at::Tensor> grads;
      for (const at::Tensor& p : model_->encoder_q()->parameters()) {
        if (p.grad().defined()) grads.push_back(p.grad());
      }
      found_inf.zero_();
      at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf,
                                                     unit_scale);
      sgd_->Step(lr, found_inf);
      model_->Enqueue(out.all_keys, found_inf);
      const at::Tensor loss = out.loss.detach().to(at::kDouble).reshape({1});
      window_loss_sum.add_(loss);
      last_loss.copy_(loss);
      last_health.copy_(out.health);
      const at::Tensor first =
          found_inf.ne(0).logical_and(first_bad.narrow(0, 0, 1).lt(0));
      first_bad.copy_(at::where(
          first,
          at::cat({at::full({1}, static_cast<double>(pos.global_step), doubles),
                   loss}),
          first_bad));
    } catch (const c10::Error& e) {
      return absl::InternalError("training step " +
                                 std::to_string(pos.global_step) + ": " +
                                 e.what_without_backtrace());
    }
    const auto step_done = Clock::now();
    last_step_seconds = Seconds(step_start, step_done);
    StepPhases phases;
    const double comm_in_forward = comm_after_forward - comm_before_forward;
    phases.data = Seconds(step_start, data_done);
    phases.forward = Seconds(momentum_done, forward_done) - comm_in_forward;
    phases.backward = Seconds(forward_done, backward_done);
    phases.communication = (comm_at_start - comm_at_top) + comm_in_forward;
    phases.optimizer =
        Seconds(data_done, momentum_done) + Seconds(averaged_done, step_done);
    // Averaging the gradients: packing buckets and all-reduces; a no-op
    // with one rank.
    (group_ != nullptr ? phases.communication : phases.optimizer) +=
        Seconds(backward_done, averaged_done);
    window_phases += phases;
    run_phases += phases;
    pos.train_seconds += last_step_seconds;
    pos.global_step += 1;
    pos.step_in_epoch += 1;
    pos.images_seen += batch;
    ++steps_this_call;
    window_seconds += last_step_seconds;
    window_images += batch;
    ++window_steps;
    // The series of the last step (worker/step_report.h); the window's
    // fields follow when the window closes.
    last_report_.step = pos.global_step;
    last_report_.epoch =
        pos.epoch + static_cast<double>(pos.step_in_epoch) / steps_per_epoch_;
    last_report_.learning_rate = lr;
    last_report_.queue_staleness_steps = model_->QueueStaleness();

    if (pos.global_step % spec_.logging.every_steps == 0) {
      auto rolled_back = settle();
      if (!rolled_back.ok()) return rolled_back.status();
      if (*rolled_back) continue;
      const double rank_loss = window_loss / window_steps;
      if (!std::isfinite(rank_loss)) {
        return absl::InternalError(
            absl::StrCat("loss is ", rank_loss, " over steps ",
                         pos.global_step - window_steps, " to ",
                         pos.global_step - 1, " (learning rate too high?)"));
      }
      double step_loss = loss_value, mean_loss = rank_loss;
      double group_std = health.feature_std_mean;
      if (group_ != nullptr) {
        // The group's loss and feature spread: the means over the ranks'
        // shards, so every rank judges collapse alike.
        std::vector<at::Tensor> shared = {
            at::tensor({step_loss, mean_loss, group_std}, at::kDouble)};
        absl::Status s = group_->AllReduceMean(shared);
        if (!s.ok()) return s;
        step_loss = shared[0][0].item<double>();
        mean_loss = shared[0][1].item<double>();
        group_std = shared[0][2].item<double>();
      }
      // Healthy features spread over the sphere: a per-dimension standard
      // deviation of about 1/sqrt(dim).
      const double std_ratio =
          group_std * std::sqrt(static_cast<double>(spec_.moco.dim));
      collapsed_checks = spec_.faults.collapse_std_ratio > 0 &&
                                 std_ratio < spec_.faults.collapse_std_ratio
                             ? collapsed_checks + 1
                             : 0;
      const std::string collapse =
          collapsed_checks >= spec_.faults.collapse_patience
              ? absl::StrFormat(
                    "feature collapse at step %d: the features' "
                    "standard deviation is %.4g, %.3g of the "
                    "healthy 1/sqrt(%d), below "
                    "faults.collapse_std_ratio %g at %d logging steps "
                    "in a row",
                    pos.global_step, group_std, std_ratio, spec_.moco.dim,
                    spec_.faults.collapse_std_ratio, collapsed_checks)
              : "";
      const nlohmann::json collapse_values = {{"feature_std_mean", group_std},
                                              {"feature_std_ratio", std_ratio}};
      const double ips = window_images / std::max(window_seconds, 1e-9);
      progress.step = pos.global_step;
      progress.train_seconds = pos.train_seconds;
      const double fraction = RunFraction(optim, progress, /*end=*/false);
      const double eta =
          fraction > 0 ? pos.train_seconds * (1 - fraction) / fraction : NAN;
      const StepPhases mean_phases = window_phases / window_steps;
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
                pos.epoch + 1, pos.step_in_epoch, steps_per_epoch_,
                pos.global_step, mean_loss, lr, ips, FormatDuration(eta));
        metrics << nlohmann::json{{"step", pos.global_step},
                                  {"epoch", pos.epoch},
                                  {"loss", step_loss},
                                  {"loss_mean", mean_loss},
                                  {"lr", lr},
                                  {"images_per_s", ips},
                                  {"step_ms", PhasesMs(mean_phases)},
                                  {"train_seconds", pos.train_seconds},
                                  {"positive_logit_mean",
                                   report.positive_logit_mean},
                                  {"negative_logit_mean",
                                   report.negative_logit_mean},
                                  {"feature_std_mean", report.feature_std_mean},
                                  {"feature_std_min", report.feature_std_min},
                                  {"queue_staleness_steps",
                                   report.queue_staleness_steps}}
                       .dump()
                << "\n";
        metrics.flush();
      }
      Report(report);
      window_seconds = 0;
      window_images = 0;
      window_loss_sum.zero_();
      window_steps = 0;
      window_phases = StepPhases();
      if (!collapse.empty()) {
        if (spec_.faults.on_collapse == "fail") {
          return absl::InternalError(collapse + " (faults.on_collapse: fail)");
        }
        absl::Status s = roll_back(collapse, collapse_values, pos.global_step);
        if (!s.ok()) return s;
        continue;
      }
    }
    if (spec_.checkpoint.every_steps > 0 &&
        pos.global_step % spec_.checkpoint.every_steps == 0) {
      auto rolled_back = settle();
      if (!rolled_back.ok()) return rolled_back.status();
      if (*rolled_back) continue;
      auto path = Checkpoint(&state);
      if (!path.ok()) return path.status();
      summary.checkpoint = *path;
      last_ckpt_step = pos.global_step;
    }
  }

  const bool finished = reason != "signal" && reason != "limit";
  bool evaluated = false;
  if (finished && last_eval_step != pos.global_step) {
    absl::Status s = Evaluate(&state, &last_eval_step);
    if (!s.ok()) return s;
    evaluated = true;
  }
  if (evaluated || last_ckpt_step != pos.global_step) {
    auto path = Checkpoint(&state);
    if (!path.ok()) return path.status();
    summary.checkpoint = *path;
  }
  summary.stop_reason = reason;
  summary.steps = pos.global_step;
  summary.epochs_completed = pos.epoch;
  summary.images_seen = pos.images_seen;
  summary.train_seconds = pos.train_seconds;
  if (steps_this_call > 0) summary.phases = run_phases / steps_this_call;
  if (!finished) {
    summary.wall_seconds = Seconds(wall_start, Clock::now());
    return summary;
  }

  // The end of the run: export and summary.
  summary.knn_top1 = state.knn_history.back().top1;
  if (!lead()) {
    summary.wall_seconds = Seconds(wall_start, Clock::now());
    return summary;
  }
  summary.export_path = (fs::path(spec_.output_dir) / "backbone.pt").string();
  absl::Status exported =
      ExportBackbone(model_->encoder_q(), summary.export_path);
  if (!exported.ok()) return exported;
  summary.wall_seconds = Seconds(wall_start, Clock::now());

  nlohmann::json curve = nlohmann::json::array();
  for (const KnnRecord& r : state.knn_history) {
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
                   {"threads", threads_},
                   {"world_size", dist_.world_size},
                   {"export", summary.export_path},
                   {"checkpoint", summary.checkpoint},
                   {"spec", spec_yaml_}};
  std::string text = j.dump(2) + "\n";
  absl::Status written = WriteFileAtomically(
      (fs::path(spec_.output_dir) / "summary.json").string(),
      std::vector<char>(text.begin(), text.end()));
  if (!written.ok()) return written;
  return summary;
}

}  // namespace momentum::worker
