#include "server/coordinator.h"

#include <signal.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/job_spec.h"
#include "common/process.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/gpus.h"
#include "server/local_launcher.h"
#include "server/server_metrics.h"

namespace momentum::server {
namespace {

namespace fs = std::filesystem;

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void SetTime(int64_t ms, google::protobuf::Timestamp* t) {
  t->set_seconds(ms / 1000);
  t->set_nanos(static_cast<int32_t>((ms % 1000) * 1000000));
}

v1::WatchJobEvent NowEvent() {
  v1::WatchJobEvent event;
  SetTime(NowMs(), event.mutable_time());
  return event;
}

}  // namespace

// ---------------------------------------------------------------- Subscription

bool Subscription::Next(v1::WatchJobEvent* event,
                        std::chrono::milliseconds wait) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, wait, [&] { return !events_.empty() || closed_; });
  if (events_.empty()) return false;
  *event = std::move(events_.front());
  events_.pop_front();
  return true;
}

bool Subscription::Done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_ && events_.empty();
}

void Subscription::Push(v1::WatchJobEvent event) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    if (events_.size() >= kMaxBacklog && event.has_metric()) return;
    // A change committed between subscribing and reading the first snapshot
    // is already in it.
    if (event.has_state_change()) {
      if (event.state_change().to() == last_state_) return;
      last_state_ = event.state_change().to();
    } else if (event.has_job()) {
      last_state_ = event.job().state();
    }
    events_.push_back(std::move(event));
  }
  cv_.notify_all();
}

void Subscription::Close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

// ---------------------------------------------------------------- Coordinator

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Create(
    const CoordinatorOptions& options, ServerMetrics* metrics) {
  std::error_code ec;
  fs::create_directories(fs::path(options.state_dir) / "jobs", ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create the state directory ", options.state_dir,
                     ": ", ec.message()));
  }
  MOMENTUM_ASSIGN_OR_RETURN(
      std::unique_ptr<JobStore> store,
      JobStore::Open((fs::path(options.state_dir) / "jobs.db").string()));
  std::unique_ptr<Coordinator> c(
      new Coordinator(options, std::move(store), metrics));
  if (options.local_slots > 0 || !options.local_gpus.empty()) {
    c->AddLauncher(std::make_shared<LocalLauncher>(
        options.worker_binary, options.local_slots, options.local_gpus,
        (fs::path(options.state_dir) / "jobs").string(), c.get()));
  }
  // A previous coordinator's running jobs lost their supervisor: relaunch
  // them from their checkpoints.
  MOMENTUM_ASSIGN_OR_RETURN(std::vector<JobRecord> active, c->store_->Active());
  for (const JobRecord& job : active) {
    // Ranks it started here may outlive it: stop them first, so that the
    // job never runs twice.
    if (job.attempt > 0) {
      const int stopped = LocalLauncher::StopLeftoverRanks(
          (fs::path(c->JobDirOf(job.id)) /
           absl::StrCat("attempt-", job.attempt))
              .string(),
          options.grace_seconds);
      if (stopped > 0) {
        std::cerr << "momentum-server: stopped " << stopped << " rank(s) of "
                  << job.id << " left running by the previous coordinator\n";
      }
    }
    if (job.state == v1::JOB_STATE_RUNNING) {
      MOMENTUM_RETURN_IF_ERROR(
          c->store_
              ->Transition(job.id, v1::JOB_STATE_RESTARTING,
                           "the coordinator restarted; relaunching from the "
                           "newest checkpoint",
                           NowMs())
              .status());
    }
  }
  return c;
}

Coordinator::Coordinator(const CoordinatorOptions& options,
                         std::unique_ptr<JobStore> store,
                         ServerMetrics* metrics)
    : options_(options), store_(std::move(store)), metrics_(metrics) {}

Coordinator::~Coordinator() { Shutdown(); }

void Coordinator::SetReportAddress(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  report_address_ = address;
}

void Coordinator::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (loop_.joinable() || stopping_) return;
  // The jobs a predecessor left unfinished; later changes publish their own.
  if (auto active = store_->Active(); metrics_ != nullptr && active.ok()) {
    for (const JobRecord& job : *active) {
      metrics_->SetJobState(job.id, job.state);
    }
  }
  loop_ = std::thread(&Coordinator::Loop, this);
}

void Coordinator::Shutdown() {
  std::vector<std::shared_ptr<Launcher>> launchers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !loop_.joinable() && launchers_.empty()) return;
    stopping_ = true;
    for (auto& [id, run] : running_) {
      for (auto& [rank, slot] : run.ranks) {
        if (slot.running) {
          slot.launcher->Stop(id, run.attempt, options_.grace_seconds);
        }
      }
    }
  }
  cv_.notify_all();
  if (loop_.joinable()) loop_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    launchers = std::move(launchers_);
    launchers_.clear();
    for (auto& l : retired_launchers_) launchers.push_back(std::move(l));
    retired_launchers_.clear();
  }
  // The local launcher's destructor waits for (and if need be kills) its
  // ranks; the jobs stay RUNNING in the store and are relaunched by the next
  // coordinator.
  launchers.clear();
  std::lock_guard<std::mutex> lock(subs_mu_);
  for (auto& [id, list] : subs_) {
    for (auto& s : list) s->Close();
  }
  subs_.clear();
}

std::string Coordinator::JobDirOf(const std::string& id) const {
  return (fs::path(options_.state_dir) / "jobs" / id).string();
}

std::string Coordinator::OutputDirOf(const JobRecord& job) const {
  if (job.output_dir.empty()) return JobDirOf(job.id);
  fs::path p(job.output_dir);
  if (p.is_absolute()) return p.lexically_normal().string();
  return (fs::path(JobDirOf(job.id)) / p).lexically_normal().string();
}

// ---------------------------------------------------------------- job API

absl::StatusOr<v1::Job> Coordinator::Submit(
    const std::string& spec_yaml, const std::vector<std::string>& overrides,
    const std::string& owner) {
  MOMENTUM_ASSIGN_OR_RETURN(JobSpec spec,
                            ParseJobSpec(spec_yaml, overrides, "spec"));
  MOMENTUM_RETURN_IF_ERROR(CheckLimits(spec));
  // Ranks and `get` see cuda or cpu, decided once, here.
  MOMENTUM_RETURN_IF_ERROR(ResolveDevice(ClusterGpus(), &spec));
  JobRecord job;
  job.name = spec.name;
  job.priority = spec.scheduling.priority;
  job.world_size = spec.resources.nproc;
  job.output_dir = spec.output_dir;
  job.spec_yaml = JobSpecToYaml(spec);
  job.owner = owner;
  MOMENTUM_ASSIGN_OR_RETURN(
      job, store_->Insert(job, NowMs(), options_.max_queued_jobs_per_user));
  if (metrics_ != nullptr) metrics_->SetJobState(job.id, job.state);
  {
    std::lock_guard<std::mutex> lock(mu_);
    wake_ = true;
    UpdateMetricsLocked();
  }
  cv_.notify_all();
  return ToProto(job);
}

namespace {

// `path` with symlinks resolved as far as it exists.
fs::path Resolved(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(path), ec);
  return ec ? fs::absolute(path).lexically_normal() : p;
}

bool Under(const fs::path& path, const fs::path& root) {
  auto [r, p] =
      std::mismatch(root.begin(), root.end(), path.begin(), path.end());
  return r == root.end();
}

absl::Status CheckUnderRoots(const std::string& field, const std::string& path,
                             const std::vector<std::string>& roots) {
  if (roots.empty()) return absl::OkStatus();
  const fs::path resolved = Resolved(path);
  for (const std::string& root : roots) {
    if (Under(resolved, Resolved(root))) return absl::OkStatus();
  }
  std::string list;
  for (const std::string& root : roots) {
    absl::StrAppend(&list, list.empty() ? "" : ", ", root);
  }
  return absl::PermissionDeniedError(absl::StrCat(
      field, " must lie under one of the server's roots (", list, "), got ",
      path, resolved.string() != path ? " (" + resolved.string() + ")" : ""));
}

}  // namespace

absl::Status Coordinator::CheckLimits(const JobSpec& spec) const {
  if (options_.max_ranks_per_job > 0 &&
      spec.resources.nproc > options_.max_ranks_per_job) {
    return absl::InvalidArgumentError(
        absl::StrCat("resources.nproc must be <= ", options_.max_ranks_per_job,
                     " on this server, got ", spec.resources.nproc));
  }
  MOMENTUM_RETURN_IF_ERROR(
      CheckUnderRoots("data.path", spec.data.path, options_.data_roots));
  if (fs::path(spec.output_dir).is_absolute()) {
    MOMENTUM_RETURN_IF_ERROR(
        CheckUnderRoots("output_dir", spec.output_dir, options_.output_roots));
  } else if (fs::path(spec.output_dir)
                 .lexically_normal()
                 .string()
                 .rfind("..", 0) == 0) {
    return absl::PermissionDeniedError(absl::StrCat(
        "output_dir must stay inside the job's folder, got ", spec.output_dir));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Job> Coordinator::GetJob(const std::string& id) {
  MOMENTUM_ASSIGN_OR_RETURN(JobRecord job, store_->Get(id));
  return ToProto(job);
}

absl::StatusOr<v1::ListJobsResponse> Coordinator::ListJobs(
    const v1::ListJobsRequest& request) {
  JobFilter filter;
  for (int s : request.states()) {
    filter.states.push_back(static_cast<JobState>(s));
  }
  filter.name_contains = request.name_contains();
  int64_t page_size = request.page_size() == 0 ? 50 : request.page_size();
  if (page_size < 0 || page_size > 1000) {
    return absl::InvalidArgumentError(absl::StrCat(
        "page_size must be in [0, 1000], got ", request.page_size()));
  }
  int64_t offset = 0;
  if (!request.page_token().empty() &&
      (!absl::SimpleAtoi(request.page_token(), &offset) || offset < 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_token is not a token this server gave out: \"",
                     request.page_token(), "\""));
  }
  int64_t total = 0;
  MOMENTUM_ASSIGN_OR_RETURN(std::vector<JobRecord> jobs,
                            store_->List(filter, offset, page_size, &total));
  v1::ListJobsResponse response;
  for (const JobRecord& job : jobs) *response.add_jobs() = ToProto(job);
  response.set_total_size(static_cast<int32_t>(total));
  if (offset + static_cast<int64_t>(jobs.size()) < total) {
    response.set_next_page_token(absl::StrCat(offset + jobs.size()));
  }
  return response;
}

absl::StatusOr<v1::Job> Coordinator::Cancel(const std::string& id,
                                            const std::string& reason) {
  std::unique_lock<std::mutex> lock(mu_);
  MOMENTUM_ASSIGN_OR_RETURN(JobRecord before, store_->Get(id));
  if (IsFinal(before.state)) return ToProto(before);
  const std::string why = reason.empty() ? "cancelled by request" : reason;
  MOMENTUM_ASSIGN_OR_RETURN(
      JobRecord after,
      store_->Transition(id, v1::JOB_STATE_CANCELLED, why, NowMs()));
  auto it = running_.find(id);
  if (it != running_.end()) StopRanksLocked(id, it->second);
  wake_ = true;
  UpdateMetricsLocked();
  lock.unlock();
  cv_.notify_all();
  PublishChange(before, after);
  return ToProto(after);
}

absl::StatusOr<std::shared_ptr<Subscription>> Coordinator::Watch(
    const std::string& id, bool metrics, bool logs) {
  auto subscription = std::make_shared<Subscription>(id, metrics, logs);
  {
    // Subscribed before the snapshot is read: no change falls in between.
    std::lock_guard<std::mutex> lock(subs_mu_);
    subs_[id].push_back(subscription);
  }
  absl::StatusOr<JobRecord> job = store_->Get(id);
  if (!job.ok()) {
    Unwatch(subscription);
    return job.status();
  }
  v1::WatchJobEvent snapshot = NowEvent();
  *snapshot.mutable_job() = ToProto(*job);
  subscription->Push(snapshot);
  if (IsFinal(job->state)) {
    subscription->Close();
    Unwatch(subscription);
  }
  return subscription;
}

void Coordinator::Unwatch(const std::shared_ptr<Subscription>& subscription) {
  std::lock_guard<std::mutex> lock(subs_mu_);
  auto it = subs_.find(subscription->job_id());
  if (it == subs_.end()) return;
  auto& list = it->second;
  list.erase(std::remove(list.begin(), list.end(), subscription), list.end());
  if (list.empty()) subs_.erase(it);
}

absl::StatusOr<std::vector<v1::LogLine>> Coordinator::ReadLogs(
    const std::string& id, int64_t rank, int64_t from_line) {
  MOMENTUM_ASSIGN_OR_RETURN(JobRecord job, store_->Get(id));
  std::vector<v1::LogLine> lines;
  const fs::path dir = fs::path(JobDirOf(id)) / "logs";
  for (int64_t r = 0; r < job.world_size; ++r) {
    if (rank >= 0 && r != rank) continue;
    std::ifstream in(dir / absl::StrCat("rank-", r, ".log"));
    std::string text;
    int64_t n = 0;
    while (std::getline(in, text)) {
      ++n;
      if (n < from_line) continue;
      v1::LogLine line;
      line.set_rank(static_cast<int32_t>(r));
      line.set_line_number(n);
      line.set_text(text);
      lines.push_back(std::move(line));
    }
  }
  return lines;
}

// ---------------------------------------------------------------- events

void Coordinator::OnRankOutput(const std::string& job_id, int64_t attempt,
                               int64_t rank, const std::string& line) {
  (void)attempt;
  v1::WatchJobEvent event = NowEvent();
  {
    std::lock_guard<std::mutex> lock(logs_mu_);
    LogFile& log = logs_[{job_id, rank}];
    if (!log.out.is_open()) {
      const fs::path dir = fs::path(JobDirOf(job_id)) / "logs";
      std::error_code ec;
      fs::create_directories(dir, ec);
      const fs::path path = dir / absl::StrCat("rank-", rank, ".log");
      // Lines of earlier attempts (and coordinators) count.
      std::ifstream existing(path);
      std::string skip;
      while (std::getline(existing, skip)) ++log.lines;
      log.out.open(path, std::ios::app);
    }
    log.out << line << '\n';
    log.out.flush();
    ++log.lines;
    v1::LogLine* l = event.mutable_log();
    l->set_rank(static_cast<int32_t>(rank));
    l->set_line_number(log.lines);
    l->set_text(line);
    *l->mutable_time() = event.time();
  }
  Publish(job_id, event, /*is_metric=*/false, /*is_log=*/true);
}

void Coordinator::OnRankExited(const std::string& job_id, int64_t attempt,
                               int64_t rank, int exit_code, int signal,
                               const std::string& description) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    exits_.push_back({job_id, attempt, rank, exit_code, signal, description});
  }
  cv_.notify_all();
}

void Coordinator::OnMetric(const std::string& job_id, int64_t attempt,
                           const v1::MetricSample& sample) {
  std::optional<v1::Notice> notice;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = running_.find(job_id);
    if (it == running_.end() || it->second.attempt != attempt) return;
    auto [h, added] = it->second.health.try_emplace(sample.rank());
    const auto now = std::chrono::steady_clock::now();
    h->second.last_report = now;
    if (added || sample.step() != h->second.step) {
      h->second.step = sample.step();
      h->second.step_changed = now;
    }
    // An evaluation's sample repeats the last step's times.
    if (sample.knn_top1() < 0) {
      h->second.compute_seconds =
          sample.data_seconds() + sample.forward_seconds() +
          sample.backward_seconds() + sample.optimizer_seconds();
      notice = CheckStragglerLocked(it->second, sample.rank());
    }
  }
  if (notice) {
    if (metrics_ != nullptr) {
      metrics_->SetStraggler(job_id, notice->rank(),
                             notice->kind() == "straggler");
    }
    OnRankOutput(job_id, attempt, notice->rank(),
                 "momentum-server: " + notice->message());
    v1::WatchJobEvent event = NowEvent();
    *event.mutable_notice() = *notice;
    Publish(job_id, event);
  }
  if (sample.rank() == 0) {
    std::lock_guard<std::mutex> lock(progress_mu_);
    auto [it, added] = progress_.try_emplace(job_id);
    v1::JobProgress& p = it->second;
    if (added) p.set_knn_top1(-1);
    p.set_epoch(sample.epoch());
    p.set_step(sample.step());
    p.set_fraction(sample.fraction());
    p.set_loss(sample.loss());
    p.set_learning_rate(sample.learning_rate());
    p.set_images_per_second(sample.images_per_second());
    p.set_eta_seconds(sample.eta_seconds());
    if (sample.knn_top1() >= 0) p.set_knn_top1(sample.knn_top1());
  }
  if (metrics_ != nullptr) metrics_->OnSample(job_id, sample);
  v1::WatchJobEvent event = NowEvent();
  *event.mutable_metric() = sample;
  Publish(job_id, event, /*is_metric=*/true, /*is_log=*/false);
}

void Coordinator::AddLauncher(std::shared_ptr<Launcher> launcher) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    used_slots_[launcher.get()] = 0;
    used_gpus_[launcher.get()].clear();
    launchers_.push_back(std::move(launcher));
    wake_ = true;
    UpdateMetricsLocked();
  }
  cv_.notify_all();
}

void Coordinator::RemoveLauncher(const Launcher* launcher) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = launchers_.begin(); it != launchers_.end(); ++it) {
      if (it->get() != launcher) continue;
      // Running jobs may still name it; it stays alive, without slots.
      retired_launchers_.push_back(*it);
      launchers_.erase(it);
      break;
    }
    // Its ranks are lost with it.
    for (const auto& [id, run] : running_) {
      for (const auto& [rank, slot] : run.ranks) {
        if (slot.running && slot.launcher == launcher) {
          exits_.push_back({id, run.attempt, rank, -1, SIGKILL,
                            "was lost: " + launcher->Name() + " disconnected"});
        }
      }
    }
    UpdateMetricsLocked();
  }
  cv_.notify_all();
}

// ---------------------------------------------------------------- scheduling

void Coordinator::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    cv_.wait_for(lock, std::chrono::seconds(1),
                 [&] { return stopping_ || wake_ || !exits_.empty(); });
    if (stopping_) break;
    wake_ = false;
    while (!exits_.empty()) {
      Exit exit = std::move(exits_.front());
      exits_.pop_front();
      HandleExit(exit);
    }
    CheckHangsLocked();
    Schedule();
    UpdateMetricsLocked();
  }
}

int64_t Coordinator::FreeSlotsLocked(const Launcher* launcher) const {
  auto it = used_slots_.find(launcher);
  const int64_t used = it == used_slots_.end() ? 0 : it->second;
  return std::max<int64_t>(0, launcher->Slots() - used);
}

std::vector<int> Coordinator::FreeGpusLocked(const Launcher* launcher) const {
  auto it = used_gpus_.find(launcher);
  std::vector<int> free;
  for (int gpu : launcher->Gpus()) {
    if (it == used_gpus_.end() || !it->second.count(gpu)) free.push_back(gpu);
  }
  return free;
}

int64_t Coordinator::ClusterGpus() {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t total = 0;
  for (const auto& l : launchers_) total += l->Gpus().size();
  return total;
}

std::vector<Coordinator::Placement> Coordinator::Place(int64_t world_size,
                                                       bool cuda) {
  // A rank of a CUDA job takes a GPU and no slot: the GPU is what it
  // computes on, and its host threads only feed it, so a node's CPU jobs
  // and GPU jobs do not wait for each other.
  auto free_of = [&](const Launcher* l) {
    return cuda ? static_cast<int64_t>(FreeGpusLocked(l).size())
                : FreeSlotsLocked(l);
  };
  std::vector<Placement> placement;
  // One launcher that holds the whole gang, the first added (local) first.
  for (const auto& l : launchers_) {
    if (free_of(l.get()) >= world_size) {
      Placement all{l.get(), {}, {}};
      for (int64_t r = 0; r < world_size; ++r) all.ranks.push_back(r);
      placement.push_back(std::move(all));
      break;
    }
  }
  if (placement.empty()) {
    // Else spread it, largest free first; rank 0 where most ranks run.
    std::vector<std::pair<int64_t, Launcher*>> free;
    int64_t total = 0;
    for (const auto& l : launchers_) {
      const int64_t f = free_of(l.get());
      if (f > 0) free.emplace_back(f, l.get());
      total += f;
    }
    if (total < world_size) return {};
    std::stable_sort(
        free.begin(), free.end(),
        [](const auto& a, const auto& b) { return a.first > b.first; });
    int64_t next = 0;
    for (const auto& [f, l] : free) {
      Placement part{l, {}, {}};
      for (int64_t i = 0; i < f && next < world_size; ++i)
        part.ranks.push_back(next++);
      if (!part.ranks.empty()) placement.push_back(std::move(part));
      if (next == world_size) break;
    }
  }
  if (cuda) {
    for (Placement& part : placement) {
      const std::vector<int> free = FreeGpusLocked(part.launcher);
      part.gpus.assign(free.begin(), free.begin() + part.ranks.size());
    }
  }
  return placement;
}

void Coordinator::Schedule() {
  // Relaunches first (their gang was already admitted once), then the
  // queue by priority and submission order. A job that does not fit stops
  // the queue: later, smaller jobs do not overtake it (whether they want
  // slots or GPUs).
  absl::StatusOr<std::vector<JobRecord>> active = store_->Active();
  absl::StatusOr<std::vector<JobRecord>> pending = store_->Pending();
  if (!active.ok() || !pending.ok()) return;
  std::vector<JobRecord> queue;
  for (const JobRecord& job : *active) {
    if (job.state == v1::JOB_STATE_RESTARTING && !running_.count(job.id)) {
      queue.push_back(job);
    }
  }
  queue.insert(queue.end(), pending->begin(), pending->end());
  const auto now = std::chrono::steady_clock::now();
  for (const JobRecord& job : queue) {
    auto wait = not_before_.find(job.id);
    if (wait != not_before_.end()) {
      if (now < wait->second) continue;  // backing off; the queue moves on
      not_before_.erase(wait);
    }
    absl::StatusOr<JobSpec> spec = ParseJobSpec(job.spec_yaml, {}, job.id);
    if (!spec.ok()) {
      FailUnlaunchableLocked(job,
                             absl::StrCat("the stored spec no longer parses: ",
                                          spec.status().message()));
      continue;
    }
    // The device was resolved at submission: auto is not stored.
    const std::vector<Placement> placement =
        Place(job.world_size, spec->resources.device == "cuda");
    if (placement.empty()) break;
    LaunchLocked(job, *std::move(spec), placement);
  }
}

void Coordinator::FailUnlaunchableLocked(const JobRecord& queued,
                                         const std::string& reason) {
  absl::StatusOr<JobRecord> after =
      store_->Transition(queued.id, v1::JOB_STATE_FAILED, reason, NowMs());
  if (after.ok()) PublishChange(queued, *after);
}

void Coordinator::LaunchLocked(const JobRecord& queued, JobSpec spec,
                               const std::vector<Placement>& placement) {
  absl::StatusOr<int64_t> port = PickFreePort();
  if (!port.ok()) {
    FailUnlaunchableLocked(queued, std::string(port.status().message()));
    return;
  }
  spec.output_dir = OutputDirOf(queued);
  const std::string spec_yaml = JobSpecToYaml(spec);

  std::string where;
  for (const Placement& part : placement) {
    absl::StrAppend(&where, where.empty() ? "" : ", ", part.ranks.size(),
                    " on ", part.launcher->Name());
    if (!part.gpus.empty()) {
      absl::StrAppend(&where,
                      part.gpus.size() == 1 ? " with GPU " : " with GPUs ",
                      GpuList(part.gpus));
    }
  }
  // Committed before anything starts.
  absl::StatusOr<JobRecord> after = store_->Transition(
      queued.id, v1::JOB_STATE_RUNNING,
      absl::StrCat(queued.world_size,
                   queued.world_size == 1 ? " rank" : " ranks", " launched (",
                   where, ")"),
      NowMs());
  if (!after.ok()) return;  // cancelled meanwhile
  JobRecord job = *after;
  job.attempt = queued.attempt + 1;
  if (queued.state == v1::JOB_STATE_RESTARTING)
    job.restarts = queued.restarts + 1;
  (void)store_->UpdateRun(job);

  RunningJob& run = running_[job.id];
  run = RunningJob();
  run.attempt = job.attempt;
  run.world_size = job.world_size;
  run.max_restarts = spec.scheduling.max_restarts;
  run.restart_backoff_s = spec.scheduling.restart_backoff_s;
  run.hang_timeout_s = spec.scheduling.hang_timeout_s;
  run.straggler_factor = spec.scheduling.straggler_factor;
  const std::string master_addr = placement.front().launcher->Address();
  for (const Placement& part : placement) {
    // A CUDA rank owns its GPU instead of a slot (Place).
    if (part.gpus.empty()) {
      used_slots_[part.launcher] += static_cast<int64_t>(part.ranks.size());
    }
    for (size_t i = 0; i < part.ranks.size(); ++i) {
      const int gpu = part.gpus.empty() ? -1 : part.gpus[i];
      if (gpu >= 0) used_gpus_[part.launcher].insert(gpu);
      run.ranks[part.ranks[i]] = RankSlot{part.launcher, true, gpu};
    }
  }
  for (const Placement& part : placement) {
    LaunchRequest request;
    request.job_id = job.id;
    request.attempt = job.attempt;
    request.world_size = job.world_size;
    request.ranks = part.ranks;
    request.gpus = part.gpus;
    request.spec_yaml = spec_yaml;
    request.master_addr = master_addr;
    request.master_port = *port;
    request.env = {absl::StrCat("MOMENTUM_JOB_ID=", job.id),
                   absl::StrCat("MOMENTUM_ATTEMPT=", job.attempt)};
    if (!options_.worker_token.empty()) {
      request.env.push_back("MOMENTUM_TOKEN=" + options_.worker_token);
    }
    if (!report_address_.empty()) {
      request.env.push_back("MOMENTUM_COORDINATOR=" + report_address_);
    }
    absl::Status launched = part.launcher->Launch(request);
    if (!launched.ok()) {
      for (int64_t r : part.ranks) {
        exits_.push_back(
            {job.id, job.attempt, r, 1, 0,
             absl::StrCat("could not be launched on ", part.launcher->Name(),
                          ": ", launched.message())});
      }
      wake_ = true;
    }
  }
  PublishChange(queued, job);
}

void Coordinator::StopRanksLocked(const std::string& job_id, RunningJob& run) {
  run.stopping = true;
  std::set<Launcher*> launchers;
  for (auto& [rank, slot] : run.ranks) {
    if (slot.running) launchers.insert(slot.launcher);
  }
  for (Launcher* l : launchers) {
    l->Stop(job_id, run.attempt, options_.grace_seconds);
  }
}

void Coordinator::FailGangLocked(const JobRecord& before, RunningJob& run,
                                 std::string reason) {
  run.first_failure = reason;
  // The whole gang goes; it comes back from the newest checkpoint while
  // restarts are left, after a back-off that doubles each time.
  const int64_t done = before.restarts;
  JobState to = v1::JOB_STATE_FAILED;
  if (done < run.max_restarts) {
    to = v1::JOB_STATE_RESTARTING;
    absl::StrAppend(&reason, "; restart ", done + 1, " of ", run.max_restarts,
                    " from the newest checkpoint");
    const double backoff =
        std::min(60.0, run.restart_backoff_s * std::pow(2.0, done));
    not_before_[before.id] =
        std::chrono::steady_clock::now() +
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(backoff));
    if (metrics_ != nullptr) metrics_->AddRestart(reason);
  } else if (run.max_restarts > 0) {
    absl::StrAppend(&reason, " (no restarts left of ", run.max_restarts, ")");
  }
  // Committed before the ranks are stopped.
  absl::StatusOr<JobRecord> after =
      store_->Transition(before.id, to, reason, NowMs());
  StopRanksLocked(before.id, run);
  if (after.ok()) PublishChange(before, *after);
}

void Coordinator::CheckHangsLocked() {
  const auto now = std::chrono::steady_clock::now();
  for (auto& [id, run] : running_) {
    if (run.stopping || run.hang_timeout_s <= 0) continue;
    const auto limit =
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(run.hang_timeout_s));
    // A silent rank first: the ranks waiting for it in a collective still
    // report, stuck at one step, and are not the cause.
    std::string why;
    for (const auto& [rank, health] : run.health) {
      if (!run.ranks.count(rank) || !run.ranks.at(rank).running) continue;
      if (now - health.last_report > limit) {
        why = absl::StrFormat("rank %d is hung: no report for %.0f s", rank,
                              run.hang_timeout_s);
        break;
      }
    }
    for (const auto& [rank, health] : run.health) {
      if (!why.empty()) break;
      if (!run.ranks.count(rank) || !run.ranks.at(rank).running) continue;
      if (now - health.step_changed > limit) {
        why =
            absl::StrFormat("rank %d is hung: its step stayed at %d for %.0f s",
                            rank, health.step, run.hang_timeout_s);
      }
    }
    if (why.empty()) continue;
    absl::StatusOr<JobRecord> before = store_->Get(id);
    if (before.ok() && !IsFinal(before->state)) {
      FailGangLocked(*before, run, why);
    }
  }
}

std::optional<v1::Notice> Coordinator::CheckStragglerLocked(RunningJob& run,
                                                            int64_t rank) {
  if (run.straggler_factor <= 0 || run.world_size < 2) return std::nullopt;
  std::vector<double> others;
  for (const auto& [r, h] : run.health) {
    if (r != rank && h.compute_seconds > 0) others.push_back(h.compute_seconds);
  }
  RunningJob::Health& h = run.health[rank];
  if (others.empty() || h.compute_seconds <= 0) return std::nullopt;
  std::sort(others.begin(), others.end());
  const size_t n = others.size();
  const double median =
      n % 2 == 1 ? others[n / 2] : 0.5 * (others[n / 2 - 1] + others[n / 2]);
  const bool above = h.compute_seconds > run.straggler_factor * median;
  h.strikes = above ? h.strikes + 1 : 0;
  v1::Notice notice;
  notice.set_rank(static_cast<int32_t>(rank));
  if (!h.straggler && h.strikes >= 3) {
    h.straggler = true;
    notice.set_kind("straggler");
    notice.set_message(absl::StrFormat(
        "rank %d is a straggler: %.1f ms of compute per step against a median "
        "of %.1f ms on the other ranks (limit x%g)",
        rank, 1000 * h.compute_seconds, 1000 * median, run.straggler_factor));
    return notice;
  }
  if (h.straggler && !above) {
    h.straggler = false;
    notice.set_kind("straggler_recovered");
    notice.set_message(absl::StrFormat(
        "rank %d is no longer a straggler: %.1f ms of compute per step "
        "against a median of %.1f ms",
        rank, 1000 * h.compute_seconds, 1000 * median));
    return notice;
  }
  return std::nullopt;
}

void Coordinator::OnHeartbeat(const std::string& job_id, int64_t attempt,
                              int64_t rank) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = running_.find(job_id);
  if (it == running_.end() || it->second.attempt != attempt) return;
  auto [h, added] = it->second.health.try_emplace(rank);
  const auto now = std::chrono::steady_clock::now();
  h->second.last_report = now;
  if (added) h->second.step_changed = now;
}

void Coordinator::HandleExit(const Exit& exit) {
  auto it = running_.find(exit.job_id);
  if (it == running_.end() || it->second.attempt != exit.attempt) return;
  RunningJob& run = it->second;
  auto slot = run.ranks.find(exit.rank);
  if (slot == run.ranks.end() || !slot->second.running) return;
  slot->second.running = false;
  // Its slot or GPU is free again.
  if (slot->second.gpu >= 0) {
    used_gpus_[slot->second.launcher].erase(slot->second.gpu);
  } else {
    auto used = used_slots_.find(slot->second.launcher);
    if (used != used_slots_.end()) used->second -= 1;
  }

  bool all_ended = true, all_zero = true;
  for (const auto& [rank, s] : run.ranks) all_ended = all_ended && !s.running;

  absl::StatusOr<JobRecord> before = store_->Get(exit.job_id);
  if (!before.ok()) return;
  if (exit.exit_code != 0 && !run.stopping && !IsFinal(before->state)) {
    std::string reason =
        absl::StrCat("rank ", exit.rank, " ", exit.description);
    const std::string tail = LastLines(exit.job_id, exit.rank, 1);
    if (!tail.empty()) absl::StrAppend(&reason, ": ", tail);
    FailGangLocked(*before, run, reason);
  }
  if (exit.exit_code != 0) all_zero = false;
  if (!all_ended) return;

  // The whole gang has ended.
  absl::StatusOr<JobRecord> now = store_->Get(exit.job_id);
  const bool finished_well = all_zero && run.first_failure.empty() &&
                             !run.stopping && now.ok() &&
                             now->state == v1::JOB_STATE_RUNNING;
  if (finished_well) {
    JobRecord job = *now;
    std::string reason = absl::StrCat("all ", run.world_size,
                                      run.world_size == 1 ? " rank" : " ranks",
                                      " exited with code 0");
    std::ifstream in(fs::path(OutputDirOf(job)) / "summary.json");
    nlohmann::json summary = nlohmann::json::parse(in, nullptr, false);
    if (!summary.is_discarded() && summary.is_object()) {
      job.knn_top1 = summary.value("knn_top1", -1.0);
      job.export_path = summary.value("export", std::string());
      // The final progress, from the worker's own account.
      std::lock_guard<std::mutex> lock(progress_mu_);
      v1::JobProgress& p = progress_[job.id];
      p.set_step(summary.value("steps", int64_t{0}));
      p.set_epoch(summary.value("epochs_completed", 0.0));
      p.set_fraction(1.0);
      p.set_eta_seconds(0);
      p.set_knn_top1(job.knn_top1);
    } else {
      std::lock_guard<std::mutex> lock(progress_mu_);
      auto p = progress_.find(job.id);
      if (p != progress_.end()) job.knn_top1 = p->second.knn_top1();
    }
    if (job.knn_top1 >= 0) {
      absl::StrAppend(
          &reason, absl::StrFormat("; kNN top-1 %.2f%%", 100 * job.knn_top1));
    }
    (void)store_->UpdateRun(job);
    absl::StatusOr<JobRecord> after =
        store_->Transition(job.id, v1::JOB_STATE_SUCCEEDED, reason, NowMs());
    if (after.ok()) PublishChange(*now, *after);
  }
  running_.erase(it);
  wake_ = true;
}

// ---------------------------------------------------------------- helpers

v1::Job Coordinator::ToProto(const JobRecord& job) {
  v1::Job out;
  out.set_id(job.id);
  out.set_name(job.name);
  out.set_state(job.state);
  out.set_state_reason(job.state_reason);
  out.set_priority(static_cast<int32_t>(job.priority));
  out.set_world_size(static_cast<int32_t>(job.world_size));
  out.set_spec_yaml(job.spec_yaml);
  out.set_output_dir(OutputDirOf(job));
  if (job.submit_ms > 0) SetTime(job.submit_ms, out.mutable_submit_time());
  if (job.start_ms > 0) SetTime(job.start_ms, out.mutable_start_time());
  if (job.end_ms > 0) SetTime(job.end_ms, out.mutable_end_time());
  out.set_restarts(static_cast<int32_t>(job.restarts));
  out.set_export_path(job.export_path);
  out.set_owner(job.owner);
  if (job.state == v1::JOB_STATE_PENDING) {
    absl::StatusOr<std::vector<JobRecord>> pending = store_->Pending();
    if (pending.ok()) {
      for (size_t i = 0; i < pending->size(); ++i) {
        if ((*pending)[i].id == job.id) out.set_queue_position(i + 1);
      }
    }
  }
  v1::JobProgress* p = out.mutable_progress();
  p->set_knn_top1(-1);
  p->set_eta_seconds(-1);
  {
    std::lock_guard<std::mutex> lock(progress_mu_);
    auto it = progress_.find(job.id);
    if (it != progress_.end()) *p = it->second;
  }
  if (job.knn_top1 >= 0) p->set_knn_top1(job.knn_top1);
  return out;
}

void Coordinator::Publish(const std::string& job_id,
                          const v1::WatchJobEvent& event, bool is_metric,
                          bool is_log) {
  std::lock_guard<std::mutex> lock(subs_mu_);
  auto it = subs_.find(job_id);
  if (it == subs_.end()) return;
  for (auto& s : it->second) {
    if (is_metric && !s->wants_metrics()) continue;
    if (is_log && !s->wants_logs()) continue;
    s->Push(event);
  }
}

void Coordinator::PublishChange(const JobRecord& before,
                                const JobRecord& after) {
  v1::WatchJobEvent event = NowEvent();
  v1::StateChange* change = event.mutable_state_change();
  change->set_from(before.state);
  change->set_to(after.state);
  change->set_reason(after.state_reason);
  Publish(after.id, event);
  if (metrics_ != nullptr) metrics_->SetJobState(after.id, after.state);
  if (metrics_ != nullptr && IsFinal(after.state)) metrics_->JobEnded(after.id);
  if (IsFinal(after.state)) {
    v1::WatchJobEvent snapshot = NowEvent();
    *snapshot.mutable_job() = ToProto(after);
    Publish(after.id, snapshot);
    // The streams end after a final state and the last snapshot.
    CloseSubscriptions(after.id);
  }
}

void Coordinator::CloseSubscriptions(const std::string& job_id) {
  std::vector<std::shared_ptr<Subscription>> list;
  {
    std::lock_guard<std::mutex> lock(subs_mu_);
    auto it = subs_.find(job_id);
    if (it == subs_.end()) return;
    list = std::move(it->second);
    subs_.erase(it);
  }
  for (auto& s : list) s->Close();
}

std::string Coordinator::LastLines(const std::string& job_id, int64_t rank,
                                   int n) {
  std::ifstream in(fs::path(JobDirOf(job_id)) / "logs" /
                   absl::StrCat("rank-", rank, ".log"));
  std::deque<std::string> last;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    last.push_back(line);
    if (static_cast<int>(last.size()) > n) last.pop_front();
  }
  std::string out;
  for (const std::string& l : last)
    absl::StrAppend(&out, out.empty() ? "" : " | ", l);
  return out;
}

void Coordinator::UpdateMetricsLocked() {
  if (metrics_ == nullptr) return;
  int64_t slots = 0, used_slots = 0, gpus = 0, used_gpus = 0;
  for (const auto& l : launchers_) {
    slots += l->Slots();
    gpus += l->Gpus().size();
    auto it = used_slots_.find(l.get());
    if (it != used_slots_.end()) used_slots += it->second;
    auto owned = used_gpus_.find(l.get());
    if (owned != used_gpus_.end()) used_gpus += owned->second.size();
  }
  metrics_->SetSlots(used_slots, std::max<int64_t>(0, slots - used_slots));
  metrics_->SetGpus(used_gpus, std::max<int64_t>(0, gpus - used_gpus));
  std::map<v1::JobState, int64_t> by_state;
  for (JobState s : {v1::JOB_STATE_PENDING, v1::JOB_STATE_RUNNING,
                     v1::JOB_STATE_RESTARTING, v1::JOB_STATE_SUCCEEDED,
                     v1::JOB_STATE_FAILED, v1::JOB_STATE_CANCELLED}) {
    JobFilter filter;
    filter.states = {s};
    int64_t n = 0;
    if (store_->List(filter, 0, 1, &n).ok()) by_state[s] = n;
  }
  metrics_->SetJobs(by_state);
}

}  // namespace momentum::server
