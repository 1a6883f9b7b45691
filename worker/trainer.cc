#include "worker/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/utils.h>

#include <chrono>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "common/status_macros.h"
#include "worker/cpu_affinity.h"
#include "worker/device_augment.h"
#include "worker/export.h"
#include "worker/fault_guard.h"
#include "worker/knn.h"
#include "worker/log.h"
#include "worker/run_log.h"

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The step of the newest kNN evaluation in `state`; -1 when none.
int64_t LastEvalStep(const CheckpointState& state) {
  return state.knn_history.empty() ? -1 : state.knn_history.back().step;
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

absl::Status Trainer::PlaceOnCpus(int64_t local_ranks) {
  MOMENTUM_ASSIGN_OR_RETURN(const std::vector<int> allowed, AllowedCpus());
  const int64_t threads = spec_.resources.threads;
  const char* handed = std::getenv("MOMENTUM_CPUS");
  std::vector<int> cpus = allowed;
  std::string why_not;
  if (spec_.resources.cpu_affinity == "none") {
    why_not = "resources.cpu_affinity is none";
  } else if (!where_.device.is_cpu()) {
    why_not = "the rank trains on " + where_.device.str();
  } else if (handed == nullptr || *handed == '\0') {
    why_not =
        local_ranks < 2 ? std::string("one rank on this machine")
        : static_cast<int64_t>(allowed.size()) < local_ranks
            ? absl::StrCat(allowed.size(), " CPUs for ", local_ranks, " ranks")
            : std::string(
                  "its launcher handed it no CPUs "
                  "(MOMENTUM_CPUS)");
  } else {
    MOMENTUM_ASSIGN_OR_RETURN(const std::vector<int> share,
                              ParseCpuList(handed, "MOMENTUM_CPUS"));
    if (threads > static_cast<int64_t>(share.size())) {
      why_not = absl::StrCat("resources.threads ", threads, " > its ",
                             share.size(), " CPUs");
    } else {
      const absl::Status bound = BindProcess(share);
      if (!bound.ok()) {
        return absl::Status(
            bound.code(),
            absl::StrCat("binding the rank to MOMENTUM_CPUS=", handed,
                         " (it may run on CPUs ", CpuListString(allowed),
                         "): ", bound.message()));
      }
      MOMENTUM_ASSIGN_OR_RETURN(cpus, AllowedCpus());  // what holds now
    }
  }
  // Default: the CPUs this rank runs on; unbound, the ones it may run on
  // shared with the other ranks on the machine.
  const int64_t unbound_share =
      static_cast<int64_t>(allowed.size()) / local_ranks;
  threads_ = threads > 0
                 ? threads
                 : std::max<int64_t>(1, why_not.empty()
                                            ? static_cast<int64_t>(cpus.size())
                                            : unbound_share);
  if (why_not.empty()) {
    LogInfo("rank %d: bound to CPUs %s of %s, %d intra-op threads", dist_.rank,
            CpuListString(cpus), CpuListString(allowed), threads_);
  } else {
    LogInfo("rank %d: CPUs %s, not bound (%s), %d intra-op threads", dist_.rank,
            CpuListString(allowed), why_not, threads_);
  }
  return absl::OkStatus();
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
  MOMENTUM_RETURN_IF_ERROR(PlaceOnCpus(local_ranks));
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

double Trainer::CommSeconds() const {
  return group_ != nullptr ? group_->collective_seconds() : 0.0;
}

std::string Trainer::checkpoint_dir() const {
  return (fs::path(spec_.output_dir) / "checkpoints").string();
}

absl::Status Trainer::Evaluate(CheckpointState* state, RunLog* log) {
  const auto start = Clock::now();
  // Each rank's BatchNorm statistics come from its own batches; the group
  // evaluates (and rank 0 saves) rank 0's, as DistributedDataParallel
  // broadcasts its buffers. Every rank encodes a shard of the images.
  if (group_ != nullptr) {
    for (auto* encoder : {&model_->encoder_q(), &model_->encoder_k()}) {
      for (at::Tensor& buffer : (*encoder)->buffers()) {
        MOMENTUM_RETURN_IF_ERROR(group_->Broadcast(buffer, 0));
      }
    }
  }
  MOMENTUM_ASSIGN_OR_RETURN(
      const double top1,
      KnnTop1(model_->encoder_q(), *data_.train, *data_.test, format_,
              spec_.eval, spec_.data.loader_threads, group_.get()));
  const RunPosition& pos = state->position;
  const double epochs = static_cast<double>(pos.global_step) /
                        static_cast<double>(steps_per_epoch_);
  state->knn_history.push_back({epochs, pos.global_step, top1});
  log->Evaluated(pos, epochs, top1, model_->QueueStaleness(), start);
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
  // Resume or start, train step by step until a bound, a signal or the
  // call's limit, logging each window and checkpointing as the spec says;
  // the fault guard checks the steps before anything of them is kept.
  RunState run;
  RunLog log(spec_, dist_.rank, dist_.world_size, steps_per_epoch_,
             report_callback_);
  MOMENTUM_RETURN_IF_ERROR(Begin(&run, &log));
  RunPosition& pos = run.checkpoint.position;
  loader_->StartEpoch(pos.epoch, pos.step_in_epoch);
  FaultGuard guard(spec_, where_, dist_.rank, group_.get(), &run, &log,
                   loader_.get(), [this](CheckpointState* state) {
                     int64_t written_by = 0;
                     return RestoreNewest(checkpoint_dir(), state, &written_by);
                   });
  std::string reason;
  while (true) {
    const double comm_at_top = CommSeconds();
    MOMENTUM_ASSIGN_OR_RETURN(const FaultGuard::StopVote vote,
                              guard.AgreeOnStop(stop));
    reason = BoundReached(run, /*timed=*/vote.agreed);
    if (reason.empty() && vote.stop) reason = "signal";
    if (reason.empty() && max_steps_this_call > 0 &&
        run.steps_this_call >= max_steps_this_call) {
      reason = "limit";
    }
    const bool epoch_end = pos.step_in_epoch == steps_per_epoch_;
    if (!reason.empty() || epoch_end) {
      // The run ends, evaluates or checkpoints: only after good steps.
      MOMENTUM_ASSIGN_OR_RETURN(const bool rolled_back, guard.Settle());
      if (rolled_back) continue;
      if (!reason.empty()) break;
    }
    if (epoch_end) {
      MOMENTUM_RETURN_IF_ERROR(EndEpoch(&run, &log));
      continue;
    }

    MOMENTUM_ASSIGN_OR_RETURN(const StepDone step,
                              Step(run, comm_at_top, &guard.series()));
    Advance(step, &run, &log);
    if (pos.global_step % spec_.logging.every_steps == 0) {
      MOMENTUM_ASSIGN_OR_RETURN(const bool rolled_back,
                                EndWindow(run, &guard, &log));
      if (rolled_back) continue;
    }
    if (spec_.checkpoint.every_steps > 0 &&
        pos.global_step % spec_.checkpoint.every_steps == 0) {
      MOMENTUM_ASSIGN_OR_RETURN(const bool rolled_back, guard.Settle());
      if (rolled_back) continue;
      MOMENTUM_RETURN_IF_ERROR(CheckpointRun(&run));
    }
  }
  return Finish(reason, &run, &log);
}

absl::Status Trainer::Begin(RunState* run, RunLog* log) {
  std::error_code ec;
  fs::create_directories(spec_.output_dir, ec);
  if (ec) {
    return absl::InternalError("cannot create output_dir " + spec_.output_dir +
                               ": " + ec.message());
  }
  CheckpointState& state = run->checkpoint;
  state.spec_yaml = spec_yaml_;
  state.world_size = dist_.world_size;
  std::optional<std::string> latest;
  int64_t written_by = dist_.world_size;
  if (spec_.checkpoint.resume) {
    MOMENTUM_ASSIGN_OR_RETURN(
        latest, RestoreNewest(checkpoint_dir(), &state, &written_by));
  }
  if (latest) {
    run->summary.resumed = true;
    run->summary.checkpoint = *latest;
    run->checkpoint_step = state.position.global_step;
  }
  log->Open(latest, state.position, written_by);
  // Every rank starts from rank 0's model, as DistributedDataParallel does.
  return BroadcastModel();
}

std::string Trainer::BoundReached(const RunState& run, bool timed) const {
  const OptimSpec& optim = spec_.optim;
  const RunPosition& pos = run.checkpoint.position;
  if (optim.epochs > 0 && pos.epoch >= optim.epochs) return "epochs";
  if (optim.steps > 0 && pos.global_step >= optim.steps) return "steps";
  if (timed && optim.time_budget_s > 0 &&
      pos.train_seconds >= optim.time_budget_s) {
    return "time_budget";
  }
  return "";
}

absl::StatusOr<Trainer::StepDone> Trainer::Step(const RunState& run,
                                                double comm_at_top,
                                                DeviceSeries* series) {
  const RunPosition& pos = run.checkpoint.position;
  const int64_t batch = spec_.optim.batch_size;
  const bool shuffle = model_->options().bn_groups > 0;
  const auto step_start = Clock::now();
  const double comm_at_start = CommSeconds();
  MOMENTUM_ASSIGN_OR_RETURN(TrainBatch b, loader_->Next());
  // Asynchronous from page-locked memory on CUDA; a no-op on the CPU.
  at::Tensor x_q, x_k;
  if (b.query_bytes.defined()) {
    // The loader cropped; colour, blur, flip and normalisation run here,
    // batched, on the device (data.augment_on).
    auto on_device = [&](const at::Tensor& t) {
      return t.to(where_.device, /*non_blocking=*/true);
    };
    x_q = PhotometricOnDevice(on_device(b.query_bytes),
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
  progress.step_seconds = run.last_step_seconds;
  StepDone done;
  done.lr = LearningRate(spec_.optim, progress) * run.checkpoint.lr_scale;

  try {
    model_->MomentumUpdate();
    momentum_done = Clock::now();
    comm_before_forward = CommSeconds();
    at::Tensor perm;
    if (shuffle) {
      // One permutation of the group's batch drawn on rank 0 (moco.bn
      // shuffle), or of each rank's own batch (split).
      const bool across = model_->options().shuffle_across_ranks;
      // Drawn on the host generator, the same on every device, and
      // copied without waiting (a blocking copy to a GPU waits for all the
      // work queued there).
      perm =
          at::randperm(across ? batch : b.key.size(0), shuffle_rng_, at::kLong)
              .to(where_.device, /*non_blocking=*/true);
      if (across && group_ != nullptr) {
        MOMENTUM_RETURN_IF_ERROR(group_->Broadcast(perm, 0));
      }
    }
    Moco::Output out = model_->Forward(x_q, x_k, perm);
    forward_done = Clock::now();
    comm_after_forward = CommSeconds();
    if (pos.global_step == inject_nan_step_ && run.checkpoint.rollbacks == 0 &&
        dist_.rank == 0) {
      out.loss = out.loss * std::numeric_limits<double>::quiet_NaN();
    }
    sgd_->ZeroGrad();
    out.loss.backward();
    backward_done = Clock::now();
    MOMENTUM_RETURN_IF_ERROR(model_->AverageGradients());
    averaged_done = Clock::now();
    // Every rank holds the same averaged gradients: one test, one decision
    // on all ranks, made on the device before anything is updated.
    std::vector<at::Tensor> grads;
    for (const at::Tensor& p : model_->encoder_q()->parameters()) {
      if (p.grad().defined()) grads.push_back(p.grad());
    }
    series->found_inf.zero_();
    at::_amp_foreach_non_finite_check_and_unscale_(grads, series->found_inf,
                                                   series->unit_scale);
    sgd_->Step(done.lr, series->found_inf);
    model_->Enqueue(out.all_keys, series->found_inf);
    series->Record(pos.global_step,
                   out.loss.detach().to(at::kDouble).reshape({1}), out.health);
  } catch (const c10::Error& e) {
    return absl::InternalError("training step " +
                               std::to_string(pos.global_step) + ": " +
                               e.what_without_backtrace());
  }
  const auto step_done = Clock::now();
  done.seconds = Seconds(step_start, step_done);
  StepPhases& phases = done.phases;
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
  return done;
}

void Trainer::Advance(const StepDone& step, RunState* run, RunLog* log) {
  RunPosition& pos = run->checkpoint.position;
  run->last_step_seconds = step.seconds;
  pos.train_seconds += step.seconds;
  pos.global_step += 1;
  pos.step_in_epoch += 1;
  pos.images_seen += spec_.optim.batch_size;
  ++run->steps_this_call;
  log->AddStep(step.phases, step.seconds, pos, step.lr,
               model_->QueueStaleness());
}

absl::StatusOr<bool> Trainer::EndWindow(const RunState& run, FaultGuard* guard,
                                        RunLog* log) {
  MOMENTUM_ASSIGN_OR_RETURN(const bool rolled_back, guard->Settle());
  if (rolled_back) return true;
  MOMENTUM_ASSIGN_OR_RETURN(const FaultGuard::Window window,
                            guard->CloseWindow());
  log->CloseWindow(run.checkpoint.position, window.rank_loss, window.step_loss,
                   window.mean_loss);
  return guard->ActOnCollapse(window);
}

absl::Status Trainer::EndEpoch(RunState* run, RunLog* log) {
  // Evaluate if due, then move on and checkpoint the new position, so a
  // resume never repeats this.
  RunPosition& pos = run->checkpoint.position;
  const int64_t done = pos.epoch + 1;
  const bool last = spec_.optim.epochs > 0 && done >= spec_.optim.epochs;
  if (!last && spec_.eval.every_epochs > 0 &&
      done % spec_.eval.every_epochs == 0) {
    MOMENTUM_RETURN_IF_ERROR(Evaluate(&run->checkpoint, log));
  }
  pos.epoch = done;
  pos.step_in_epoch = 0;
  if (!last && spec_.checkpoint.every_epochs > 0 &&
      done % spec_.checkpoint.every_epochs == 0) {
    MOMENTUM_RETURN_IF_ERROR(CheckpointRun(run));
  }
  loader_->StartEpoch(pos.epoch, 0);
  return absl::OkStatus();
}

absl::Status Trainer::CheckpointRun(RunState* run) {
  MOMENTUM_ASSIGN_OR_RETURN(run->summary.checkpoint,
                            Checkpoint(&run->checkpoint));
  run->checkpoint_step = run->checkpoint.position.global_step;
  return absl::OkStatus();
}

absl::StatusOr<TrainSummary> Trainer::Finish(const std::string& reason,
                                             RunState* run, RunLog* log) {
  const CheckpointState& state = run->checkpoint;
  const RunPosition& pos = state.position;
  const bool finished = reason != "signal" && reason != "limit";
  bool evaluated = false;
  if (finished && LastEvalStep(state) != pos.global_step) {
    MOMENTUM_RETURN_IF_ERROR(Evaluate(&run->checkpoint, log));
    evaluated = true;
  }
  if (evaluated || run->checkpoint_step != pos.global_step) {
    MOMENTUM_RETURN_IF_ERROR(CheckpointRun(run));
  }
  TrainSummary& summary = run->summary;
  summary.stop_reason = reason;
  summary.steps = pos.global_step;
  summary.epochs_completed = pos.epoch;
  summary.images_seen = pos.images_seen;
  summary.train_seconds = pos.train_seconds;
  if (run->steps_this_call > 0) {
    summary.phases = log->run_phases() / run->steps_this_call;
  }
  if (!finished) {
    summary.wall_seconds = Seconds(run->started, Clock::now());
    return summary;
  }

  // The end of the run: export and summary.
  summary.knn_top1 = state.knn_history.back().top1;
  if (!lead()) {
    summary.wall_seconds = Seconds(run->started, Clock::now());
    return summary;
  }
  summary.export_path = (fs::path(spec_.output_dir) / "backbone.pt").string();
  MOMENTUM_RETURN_IF_ERROR(
      ExportBackbone(model_->encoder_q(), summary.export_path));
  summary.wall_seconds = Seconds(run->started, Clock::now());
  MOMENTUM_RETURN_IF_ERROR(
      log->WriteSummary(summary, state.knn_history, threads_, spec_yaml_));
  return summary;
}

}  // namespace momentum::worker
