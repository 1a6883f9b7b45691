#include "server/coordinator.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <iostream>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "common/exit_codes.h"
#include "common/job_id.h"
#include "common/job_spec.h"
#include "common/process.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "server/gpus.h"
#include "server/local_launcher.h"
#include "server/server_metrics.h"

namespace momentum::server {
namespace {

namespace fs = std::filesystem;

v1::WatchJobEvent EventAt(int64_t ms) {
  v1::WatchJobEvent event;
  SetTimestamp(ms, event.mutable_time());
  return event;
}

std::string Ranks(int64_t n) {
  return absl::StrCat(n, n == 1 ? " rank" : " ranks");
}

// Locks <state_dir>/server.lock for this process's lifetime (the lock goes
// with the process, however it ends) and writes our pid into it.
absl::StatusOr<int> LockStateDir(const std::string& state_dir) {
  const std::string path = (fs::path(state_dir) / "server.lock").string();
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[32] = {};
    const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
    ::close(fd);
    std::string holder(buf, n > 0 ? static_cast<size_t>(n) : 0);
    holder = std::string(absl::StripAsciiWhitespace(holder));
    if (err == EWOULDBLOCK) {
      return absl::FailedPreconditionError(
          absl::StrCat("the state directory ", state_dir,
                       " is in use by another momentum-server",
                       holder.empty() ? "" : " (pid " + holder + ")",
                       "; stop it or pick another --state-dir"));
    }
    return absl::FailedPreconditionError(
        absl::StrCat("cannot lock ", path, ": ", std::strerror(err)));
  }
  const std::string pid = absl::StrCat(::getpid(), "\n");
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) !=
                                     static_cast<ssize_t>(pid.size())) {
    // The lock holds regardless; the pid is only for the message above.
  }
  return fd;
}

CoordinatorOptions WithDefaults(CoordinatorOptions options) {
  if (options.admission.output_root.empty()) {
    options.admission.output_root =
        (fs::path(options.state_dir) / "outputs").string();
  }
  return options;
}

absl::Status CheckJobId(const std::string& id) {
  if (IsJobId(id)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "job_id must be job-<n>, got \"", absl::CHexEscape(id.substr(0, 64)),
      id.size() > 64 ? "...\"" : "\""));
}

}  // namespace

// ---------------------------------------------------------------- lifecycle

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Create(
    const CoordinatorOptions& options, ServerMetrics* metrics) {
  std::error_code ec;
  fs::create_directories(fs::path(options.state_dir) / "jobs", ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create the state directory ", options.state_dir,
                     ": ", ec.message()));
  }
  MOMENTUM_ASSIGN_OR_RETURN(int lock_fd, LockStateDir(options.state_dir));
  absl::StatusOr<std::unique_ptr<JobStore>> store =
      JobStore::Open((fs::path(options.state_dir) / "jobs.db").string());
  if (!store.ok()) {
    ::close(lock_fd);
    return store.status();
  }
  std::unique_ptr<Coordinator> c(
      new Coordinator(options, *std::move(store), metrics, lock_fd));
  // A previous coordinator's running jobs lost their supervisor: they are
  // relaunched from their checkpoints once Start() stopped what it left.
  MOMENTUM_ASSIGN_OR_RETURN(std::vector<JobRecord> active, c->store_->Active());
  for (const JobRecord& job : active) {
    if (job.state != v1::JOB_STATE_RUNNING) continue;
    MOMENTUM_RETURN_IF_ERROR(
        c->store_
            ->Transition(job.id, v1::JOB_STATE_RESTARTING,
                         "the coordinator restarted; relaunching from the "
                         "newest checkpoint",
                         c->clock_.WallMs())
            .status());
  }
  return c;
}

Coordinator::Coordinator(const CoordinatorOptions& options,
                         std::unique_ptr<JobStore> store,
                         ServerMetrics* metrics, int lock_fd)
    : options_(WithDefaults(options)),
      clock_(options.clock != nullptr ? *options.clock : Clock::Real()),
      admission_(options_.admission),
      store_(std::move(store)),
      metrics_(metrics),
      lock_fd_(lock_fd),
      health_(&clock_),
      logs_((fs::path(options.state_dir) / "jobs").string()),
      watchers_(WatchHub::Options{options.max_watch_streams, 10000,
                                  options.max_watch_streams_per_user}),
      log_rate_(options.log_rate) {}

Coordinator::~Coordinator() {
  Shutdown();
  ::close(lock_fd_);
}

void Coordinator::SetReportAddress(const std::string& address) {
  absl::MutexLock lock(&mu_);
  report_address_ = address;
}

void Coordinator::Start() {
  {
    absl::MutexLock lock(&mu_);
    if (started_ || stopping_) return;
    started_ = true;
  }
  Recover();
  // Under the lock, so that a Shutdown() meanwhile either sees the thread
  // (and joins it) or keeps it from starting.
  absl::MutexLock lock(&mu_);
  if (!stopping_) loop_ = std::thread(&Coordinator::Loop, this);
}

void Coordinator::Recover() {
  // Ranks an earlier coordinator started may outlive it: they are stopped
  // before anything is scheduled, so that no job ever runs twice.
  absl::StatusOr<std::vector<JobRecord>> active = store_->Active();
  if (!active.ok()) return;
  for (const JobRecord& job : *active) {
    if (metrics_ != nullptr) metrics_->SetJobState(job.id, job.state);
    if (job.attempt == 0) continue;
    for (const auto& launcher : Launchers()) {
      const int stopped =
          launcher->StopLeftovers(job.id, job.attempt, options_.grace_seconds);
      if (stopped > 0) {
        std::cerr << "momentum-server: stopped " << stopped << " rank(s) of "
                  << job.id << " left running by the previous coordinator\n";
      }
    }
  }
  // Then those of jobs that are no longer unfinished (a cancel committed
  // just before the previous coordinator died, before it stopped them).
  for (const auto& launcher : Launchers()) {
    const int stopped = launcher->StopEveryLeftover(options_.grace_seconds);
    if (stopped > 0) {
      std::cerr << "momentum-server: stopped " << stopped
                << " more rank(s) left running by the previous coordinator on "
                << launcher->Name() << "\n";
    }
  }
}

void Coordinator::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    wake_cv_.SignalAll();
  }
  if (loop_.joinable()) loop_.join();
  // The loop has ended: its state is ours. Every rank gets the grace to
  // checkpoint; the jobs stay RUNNING in the store and the next
  // coordinator relaunches them.
  LoopState& state = loop_state_;
  for (auto& [id, run] : state.running) {
    run.stopping = false;  // StopGang stops each gang once
    StopGang(id, run);
  }
  const auto deadline = std::chrono::steady_clock::now() +
                        Seconds(options_.grace_seconds) +
                        std::chrono::seconds(2);
  auto any_running = [&] {
    for (const auto& [id, run] : state.running) {
      for (const auto& [rank, slot] : run.ranks) {
        if (slot.running) return true;
      }
    }
    return false;
  };
  while (any_running() && std::chrono::steady_clock::now() < deadline) {
    std::deque<Exit> exits;
    {
      absl::MutexLock lock(&mu_);
      if (exits_.empty()) {
        wake_cv_.WaitWithTimeout(&mu_, absl::Milliseconds(50));
      }
      exits.swap(exits_);
    }
    for (const Exit& exit : exits) {
      auto it = state.running.find(exit.job_id);
      if (it == state.running.end() || it->second.attempt != exit.attempt) {
        continue;
      }
      auto slot = it->second.ranks.find(exit.rank);
      if (slot != it->second.ranks.end()) slot->second.running = false;
    }
  }
  // Launchers go now, while the coordinator they report to still exists; a
  // local launcher kills (SIGKILL) what outlived the grace.
  std::vector<std::shared_ptr<Launcher>> launchers;
  {
    absl::MutexLock lock(&mu_);
    launchers.swap(launchers_);
    live_gangs_.clear();
  }
  credentials_.RevokeAll();
  state.running.clear();
  launchers.clear();
  watchers_.CloseAll();
}

std::vector<std::shared_ptr<Launcher>> Coordinator::Launchers() {
  absl::MutexLock lock(&mu_);
  return launchers_;
}

std::string Coordinator::JobDirOf(const std::string& id) const {
  return (fs::path(options_.state_dir) / "jobs" / id).string();
}

std::string Coordinator::OutputDirOf(const JobRecord& job) const {
  if (!job.output_path.empty()) return job.output_path;
  // Stored before outputs were confined: where it has always written.
  if (job.output_dir.empty()) return JobDirOf(job.id);
  fs::path p(job.output_dir);
  if (p.is_absolute()) return p.lexically_normal().string();
  return (fs::path(JobDirOf(job.id)) / p).lexically_normal().string();
}

// ---------------------------------------------------------------- job API

absl::StatusOr<v1::Job> Coordinator::Submit(
    const std::string& spec_yaml, const std::vector<std::string>& overrides,
    const std::string& owner, bool owner_is_admin) {
  MOMENTUM_RETURN_IF_ERROR(CheckSubmit(spec_yaml, overrides, options_.limits));
  MOMENTUM_ASSIGN_OR_RETURN(JobSpec spec,
                            ParseJobSpec(spec_yaml, overrides, "spec"));
  MOMENTUM_RETURN_IF_ERROR(admission_.Check(spec));
  MOMENTUM_ASSIGN_OR_RETURN(
      const std::string output_path,
      admission_.ResolveOutputDir(spec.output_dir, owner, owner_is_admin));
  // Ranks and `get` see cuda or cpu, decided once, here.
  int64_t gpus = 0, slots = 0;
  bool local_only = true;
  const std::vector<std::shared_ptr<Launcher>> launchers = Launchers();
  for (const auto& launcher : launchers) {
    gpus += launcher->Gpus().size();
    slots += launcher->Slots();
    local_only = local_only &&
                 dynamic_cast<const LocalLauncher*>(launcher.get()) != nullptr;
  }
  MOMENTUM_RETURN_IF_ERROR(ResolveDevice(gpus, &spec));
  // A CPU job larger than this machine while no agent is connected: the
  // cluster that exists cannot hold it, and the user learns it now rather
  // than from a job that stays PENDING. Where agents are connected, or the
  // server has no slots of its own (it waits for agents), a larger job
  // waits for more agents to join instead: they come and go.
  if (spec.resources.device == "cpu" && local_only && !launchers.empty() &&
      spec.resources.nproc > slots) {
    return absl::InvalidArgumentError(
        absl::StrCat("resources.nproc ", spec.resources.nproc, " asks for ",
                     spec.resources.nproc, " CPU slots, but this server has ",
                     slots, " (--slots) and no agent is connected"));
  }
  JobRecord job;
  job.name = spec.name;
  job.priority = spec.scheduling.priority;
  job.world_size = spec.resources.nproc;
  job.output_dir = spec.output_dir;
  job.spec_yaml = JobSpecToYaml(spec);
  job.owner = owner;
  job.output_path = output_path;
  job.owner_is_admin = owner_is_admin;
  // The store refuses an output path in use in the inserting transaction.
  MOMENTUM_ASSIGN_OR_RETURN(
      job,
      store_->Insert(job, clock_.WallMs(), options_.max_queued_jobs_per_user));
  if (metrics_ != nullptr) metrics_->SetJobState(job.id, job.state);
  {
    absl::MutexLock lock(&mu_);
    wake_ = true;
    wake_cv_.SignalAll();
  }
  return ToProto(job);
}

absl::StatusOr<v1::Job> Coordinator::GetJob(const std::string& id) {
  MOMENTUM_RETURN_IF_ERROR(CheckJobId(id));
  MOMENTUM_ASSIGN_OR_RETURN(JobRecord job, store_->Get(id));
  return ToProto(job);
}

absl::StatusOr<v1::ListJobsResponse> Coordinator::ListJobs(
    const v1::ListJobsRequest& request,
    const std::optional<std::string>& owner) {
  JobFilter filter;
  filter.owner = owner;
  for (int s : request.states()) {
    filter.states.push_back(static_cast<JobState>(s));
  }
  filter.name_contains = request.name_contains();
  const RequestLimits& limits = options_.limits;
  if (static_cast<int64_t>(filter.name_contains.size()) >
      limits.max_name_filter_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "name_contains must have at most ", limits.max_name_filter_bytes,
        " bytes, got ", filter.name_contains.size()));
  }
  int64_t page_size = request.page_size() == 0
                          ? std::min<int64_t>(50, limits.max_page_size)
                          : request.page_size();
  if (page_size < 0 || page_size > limits.max_page_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size must be in [0, ", limits.max_page_size,
                     "], got ", request.page_size()));
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
  // The page ends early rather than outgrow the response budget; the
  // token says where the next one starts.
  int64_t listed = 0;
  size_t bytes = 0;
  for (const JobRecord& job : jobs) {
    v1::Job proto = ToProto(job);
    bytes += proto.ByteSizeLong();
    if (listed > 0 &&
        static_cast<int64_t>(bytes) > limits.max_list_response_bytes) {
      break;
    }
    *response.add_jobs() = std::move(proto);
    ++listed;
  }
  response.set_total_size(static_cast<int32_t>(total));
  if (offset + listed < total) {
    response.set_next_page_token(absl::StrCat(offset + listed));
  }
  return response;
}

absl::StatusOr<v1::Job> Coordinator::Cancel(const std::string& id,
                                            const std::string& reason) {
  MOMENTUM_RETURN_IF_ERROR(CheckJobId(id));
  if (static_cast<int64_t>(reason.size()) > options_.limits.max_reason_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "reason must have at most ", options_.limits.max_reason_bytes,
        " bytes, got ", reason.size()));
  }
  MOMENTUM_ASSIGN_OR_RETURN(JobRecord before, store_->Get(id));
  if (IsFinal(before.state)) return ToProto(before);
  const std::string why = reason.empty() ? "cancelled by request" : reason;
  absl::StatusOr<JobRecord> after =
      store_->Transition(id, v1::JOB_STATE_CANCELLED, why, clock_.WallMs());
  if (!after.ok()) {
    // It reached a final state meanwhile.
    MOMENTUM_ASSIGN_OR_RETURN(JobRecord now, store_->Get(id));
    if (IsFinal(now.state)) return ToProto(now);
    return after.status();
  }
  {
    absl::MutexLock lock(&mu_);
    cancelled_.push_back(id);
    wake_ = true;
    wake_cv_.SignalAll();
  }
  PublishChange(before, *after);
  return ToProto(*after);
}

absl::StatusOr<std::shared_ptr<Subscription>> Coordinator::Watch(
    const std::string& id, bool metrics, bool logs, const std::string& caller) {
  MOMENTUM_RETURN_IF_ERROR(CheckJobId(id));
  // Subscribed before the snapshot is read: no change falls in between.
  MOMENTUM_ASSIGN_OR_RETURN(std::shared_ptr<Subscription> subscription,
                            watchers_.Subscribe(id, metrics, logs, caller));
  absl::StatusOr<JobRecord> job = store_->Get(id);
  if (!job.ok()) {
    watchers_.Unsubscribe(subscription);
    return job.status();
  }
  v1::WatchJobEvent snapshot = EventAt(clock_.WallMs());
  *snapshot.mutable_job() = ToProto(*job);
  subscription->Push(snapshot);
  if (IsFinal(job->state)) {
    subscription->Close();
    watchers_.Unsubscribe(subscription);
  }
  return subscription;
}

void Coordinator::Unwatch(const std::shared_ptr<Subscription>& subscription) {
  watchers_.Unsubscribe(subscription);
}

absl::StatusOr<std::vector<v1::LogLine>> Coordinator::ReadLogs(
    const std::string& id, int64_t rank, int64_t from_line) {
  MOMENTUM_RETURN_IF_ERROR(CheckJobId(id));
  MOMENTUM_RETURN_IF_ERROR(store_->Get(id).status());
  return logs_.Read(id, rank, from_line);
}

// ---------------------------------------------------------------- events

void Coordinator::OnRankOutput(const std::string& job_id, int64_t attempt,
                               int64_t rank, const std::string& line) {
  if (!IsJobId(job_id)) {
    std::cerr << "momentum-server: output of a rank of \""
              << absl::CHexEscape(job_id.substr(0, 64))
              << "\", which is not a job id; dropped\n";
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    auto gang = live_gangs_.find({job_id, attempt});
    if (gang == live_gangs_.end() || rank < 0 || rank >= gang->second) return;
  }
  // Log lines are proto strings, which must be UTF-8 (a message with other
  // bytes does not serialize: `logs` and `watch` would break on it), so
  // the rank's bytes are made valid and cut into pieces that end between
  // characters.
  const std::string text = ToValidUtf8(line);
  std::string_view rest = text;
  do {
    const size_t n = Utf8CutPoint(rest, JobLogs::kMaxLineBytes);
    const LogRateLimiter::Verdict verdict =
        log_rate_.Admit(job_id, rank, n, clock_.Now());
    if (verdict.dropped_before > 0) {
      StoreDroppedNotice(job_id, rank, verdict.dropped_before);
    }
    if (verdict.keep) StoreOutput(job_id, rank, std::string(rest.substr(0, n)));
    rest.remove_prefix(n);
  } while (!rest.empty());
}

void Coordinator::StoreDroppedNotice(const std::string& job_id, int64_t rank,
                                     int64_t dropped) {
  const LogRateLimiter::Options& rate = log_rate_.options();
  StoreOutput(job_id, rank,
              absl::StrFormat("momentum-server: dropped %d %s of rank %d: over "
                              "the log rate limit (%.15g lines/s, %.15g "
                              "bytes/s, bursts of %.15g s)",
                              dropped, dropped == 1 ? "line" : "lines", rank,
                              rate.lines_per_second, rate.bytes_per_second,
                              rate.burst_seconds));
}

void Coordinator::StoreOutput(const std::string& job_id, int64_t rank,
                              const std::string& line) {
  absl::StatusOr<std::vector<int64_t>> numbers =
      logs_.Append(job_id, rank, line);
  if (!numbers.ok()) return;
  const int64_t now = clock_.WallMs();
  for (size_t i = 0; i < numbers->size(); ++i) {
    v1::WatchJobEvent event = EventAt(now);
    v1::LogLine* l = event.mutable_log();
    l->set_rank(static_cast<int32_t>(rank));
    l->set_line_number((*numbers)[i]);
    l->set_text(
        line.substr(i * JobLogs::kMaxLineBytes, JobLogs::kMaxLineBytes));
    *l->mutable_time() = event.time();
    watchers_.Publish(job_id, event, WatchHub::Kind::kLog);
  }
}

void Coordinator::OnRankExited(const std::string& job_id, int64_t attempt,
                               int64_t rank, int exit_code, int signal,
                               const std::string& description) {
  if (!IsJobId(job_id)) {
    std::cerr << "momentum-server: the end of a rank of \""
              << absl::CHexEscape(job_id.substr(0, 64))
              << "\", which is not a job id; ignored\n";
    return;
  }
  PushExit({job_id, attempt, rank, exit_code, signal, description});
}

void Coordinator::PushExit(Exit exit) {
  absl::MutexLock lock(&mu_);
  exits_.push_back(std::move(exit));
  wake_cv_.SignalAll();
}

void Coordinator::OnMetric(const std::string& job_id, int64_t attempt,
                           const v1::MetricSample& sample) {
  {
    absl::MutexLock lock(&mu_);
    auto gang = live_gangs_.find({job_id, attempt});
    if (gang == live_gangs_.end() || sample.rank() < 0 ||
        sample.rank() >= gang->second) {
      return;
    }
  }
  if (std::optional<v1::Notice> notice =
          health_.OnSample(job_id, attempt, sample)) {
    if (metrics_ != nullptr) {
      metrics_->SetStraggler(job_id, notice->rank(),
                             notice->kind() == "straggler");
    }
    // The server's own line: past the rank's log rate limit.
    StoreOutput(job_id, notice->rank(),
                "momentum-server: " + notice->message());
    v1::WatchJobEvent event = EventAt(clock_.WallMs());
    *event.mutable_notice() = *notice;
    watchers_.Publish(job_id, event, WatchHub::Kind::kState);
  }
  progress_.Fold(job_id, sample);
  if (metrics_ != nullptr) metrics_->OnSample(job_id, sample);
  v1::WatchJobEvent event = EventAt(clock_.WallMs());
  *event.mutable_metric() = sample;
  watchers_.Publish(job_id, event, WatchHub::Kind::kMetric);
}

void Coordinator::OnHeartbeat(const std::string& job_id, int64_t attempt,
                              int64_t rank) {
  health_.OnHeartbeat(job_id, attempt, rank);
}

void Coordinator::OnSummary(const std::string& job_id, int64_t attempt,
                            int64_t rank, const v1::RunSummary& summary) {
  health_.OnHeartbeat(job_id, attempt, rank);
  if (rank != 0) return;
  {
    absl::MutexLock lock(&mu_);
    if (!live_gangs_.count({job_id, attempt})) return;
  }
  progress_.SetAccount(job_id, attempt, summary);
}

void Coordinator::AddLauncher(std::shared_ptr<Launcher> launcher) {
  absl::MutexLock lock(&mu_);
  launchers_.push_back(std::move(launcher));
  wake_ = true;
  wake_cv_.SignalAll();
}

void Coordinator::RemoveLauncher(const Launcher* launcher) {
  absl::MutexLock lock(&mu_);
  for (auto it = launchers_.begin(); it != launchers_.end(); ++it) {
    if (it->get() == launcher) {
      launchers_.erase(it);
      break;
    }
  }
  lost_.push_back(launcher);
  wake_cv_.SignalAll();
}

// ---------------------------------------------------------------- the loop

void Coordinator::Loop() {
  while (true) {
    // Woken by work; else once a second, or at the next restart's time.
    absl::Duration wait = absl::Seconds(1);
    for (const auto& [id, at] : loop_state_.not_before) {
      wait = std::min(
          wait, absl::FromChrono(at - clock_.Now()) + absl::Milliseconds(1));
    }
    {
      absl::MutexLock lock(&mu_);
      if (!stopping_ && !wake_ && exits_.empty() && cancelled_.empty() &&
          lost_.empty() && wait > absl::ZeroDuration()) {
        wake_cv_.WaitWithTimeout(&mu_, wait);
      }
      if (stopping_) return;
    }
    Tick();
  }
}

void Coordinator::Tick() {
  std::deque<Exit> exits;
  std::vector<std::string> cancelled;
  std::vector<const Launcher*> lost;
  std::vector<std::shared_ptr<Launcher>> launchers;
  {
    absl::MutexLock lock(&mu_);
    exits.swap(exits_);
    cancelled.swap(cancelled_);
    lost.swap(lost_);
    launchers = launchers_;
    wake_ = false;
  }
  // Losses first: they happened before what the inbox holds.
  for (const Launcher* l : lost) {
    const std::vector<Exit> gone = LostRanks(l);
    exits.insert(exits.begin(), gone.begin(), gone.end());
  }
  for (const std::string& id : cancelled) HandleCancel(id);
  for (const Exit& exit : exits) HandleExit(exit);
  for (const GangHealth::Hang& hang : health_.FindHangs()) {
    auto it = loop_state_.running.find(hang.job_id);
    if (it == loop_state_.running.end() || it->second.attempt != hang.attempt ||
        it->second.stopping) {
      continue;
    }
    absl::StatusOr<JobRecord> before = store_->Get(hang.job_id);
    if (before.ok() && !IsFinal(before->state)) {
      FailGang(*before, it->second, hang.reason, /*retry=*/true);
    }
  }
  Schedule(launchers);
  UpdateGauges(launchers);
}

std::vector<Coordinator::Exit> Coordinator::LostRanks(
    const Launcher* launcher) {
  std::vector<Exit> exits;
  for (const auto& [id, run] : loop_state_.running) {
    for (const auto& [rank, slot] : run.ranks) {
      if (slot.running && slot.launcher.get() == launcher) {
        exits.push_back({id, run.attempt, rank, -1, SIGKILL,
                         "was lost: " + launcher->Name() + " disconnected"});
      }
    }
  }
  return exits;
}

void Coordinator::HandleCancel(const std::string& job_id) {
  loop_state_.not_before.erase(job_id);
  auto it = loop_state_.running.find(job_id);
  if (it != loop_state_.running.end() && !it->second.stopping) {
    StopGang(job_id, it->second);
  }
}

void Coordinator::ReleaseRank(RankSlot& slot) {
  slot.running = false;
  if (slot.gpu >= 0) {
    loop_state_.used_gpus[slot.launcher.get()].erase(slot.gpu);
  } else {
    loop_state_.used_slots[slot.launcher.get()] -= 1;
  }
}

void Coordinator::HandleExit(const Exit& exit) {
  auto it = loop_state_.running.find(exit.job_id);
  if (it == loop_state_.running.end() || it->second.attempt != exit.attempt) {
    return;
  }
  RunningJob& run = it->second;
  auto slot = run.ranks.find(exit.rank);
  if (slot == run.ranks.end() || !slot->second.running) return;
  ReleaseRank(slot->second);
  health_.RankEnded(exit.job_id, exit.attempt, exit.rank);

  if (exit.exit_code != 0 && !run.stopping) {
    absl::StatusOr<JobRecord> before = store_->Get(exit.job_id);
    if (before.ok() && !IsFinal(before->state)) {
      // Bad input fails the same way every time: no restart.
      const bool bad_input = exit.exit_code == kExitBadInput;
      std::string reason =
          absl::StrCat("rank ", exit.rank, " ", exit.description);
      if (bad_input) absl::StrAppend(&reason, " (bad input: not retried)");
      // Its cut may fall inside a character.
      const std::string tail =
          ToValidUtf8(logs_.LastLine(exit.job_id, exit.rank));
      if (!tail.empty()) absl::StrAppend(&reason, ": ", tail);
      FailGang(*before, run, reason, /*retry=*/!bad_input);
    }
  }
  // A rank that ended in a flood: its drops are told after the reason read
  // its last line.
  if (const int64_t dropped = log_rate_.TakeDropped(exit.job_id, exit.rank);
      dropped > 0) {
    StoreDroppedNotice(exit.job_id, exit.rank, dropped);
  }
  if (exit.exit_code != 0) run.failed = true;
  for (const auto& [rank, s] : run.ranks) {
    if (s.running) return;
  }

  // The whole gang has ended.
  absl::StatusOr<JobRecord> now = store_->Get(exit.job_id);
  if (!run.failed && !run.stopping && now.ok() &&
      now->state == v1::JOB_STATE_RUNNING) {
    JobRecord job = *now;
    std::string reason =
        absl::StrCat("all ", Ranks(run.world_size), " exited with code 0");
    // The result, from rank 0's own account on the metrics stream.
    if (std::optional<v1::RunSummary> account =
            progress_.Account(job.id, exit.attempt)) {
      job.knn_top1 = account->knn_top1();
      job.export_path = account->export_path();
      progress_.Finish(job.id, *account);
      absl::StrAppend(&reason, "; ", account->steps(), " steps, ",
                      account->images_seen(), " images");
    } else {
      job.knn_top1 = progress_.Get(job.id).knn_top1();
    }
    if (job.knn_top1 >= 0) {
      absl::StrAppend(
          &reason, absl::StrFormat("; kNN top-1 %.2f%%", 100 * job.knn_top1));
    }
    (void)store_->UpdateRun(job);
    absl::StatusOr<JobRecord> after = store_->Transition(
        job.id, v1::JOB_STATE_SUCCEEDED, reason, clock_.WallMs());
    if (after.ok()) PublishChange(*now, *after);
  }
  health_.End(exit.job_id);
  logs_.CloseJob(exit.job_id);
  log_rate_.Forget(exit.job_id);
  // The gang's credentials die with it: a leftover rank cannot report.
  credentials_.Revoke(exit.job_id, exit.attempt);
  {
    absl::MutexLock lock(&mu_);
    live_gangs_.erase({exit.job_id, exit.attempt});
  }
  loop_state_.running.erase(it);
}

void Coordinator::StopGang(const std::string& job_id, RunningJob& run) {
  if (run.stopping) return;
  run.stopping = true;
  std::set<Launcher*> launchers;
  for (auto& [rank, slot] : run.ranks) {
    if (slot.running) launchers.insert(slot.launcher.get());
  }
  for (Launcher* l : launchers) {
    l->Stop(job_id, run.attempt, options_.grace_seconds);
  }
}

void Coordinator::FailGang(const JobRecord& before, RunningJob& run,
                           std::string reason, bool retry) {
  // The whole gang goes; it comes back from the newest checkpoint while
  // restarts are left, after a back-off that doubles each time.
  const int64_t done = before.restarts;
  JobState to = v1::JOB_STATE_FAILED;
  if (retry && done < run.max_restarts) {
    to = v1::JOB_STATE_RESTARTING;
    absl::StrAppend(&reason, "; restart ", done + 1, " of ", run.max_restarts,
                    " from the newest checkpoint");
    const double backoff =
        std::min(60.0, run.restart_backoff_s * std::pow(2.0, done));
    loop_state_.not_before[before.id] = clock_.Now() + Seconds(backoff);
    if (metrics_ != nullptr) metrics_->AddRestart(reason);
  } else if (retry && run.max_restarts > 0) {
    absl::StrAppend(&reason, " (no restarts left of ", run.max_restarts, ")");
  }
  run.failed = true;
  // Committed before the ranks are stopped.
  absl::StatusOr<JobRecord> after =
      store_->Transition(before.id, to, reason, clock_.WallMs());
  StopGang(before.id, run);
  if (after.ok()) PublishChange(before, *after);
}

// ---------------------------------------------------------------- scheduling

void Coordinator::Schedule(
    const std::vector<std::shared_ptr<Launcher>>& launchers) {
  // Relaunches first (their gang was admitted once), then the queue by
  // priority and submission order. A job that does not fit now stops the
  // queue: later, smaller jobs do not overtake it (whether they want slots
  // or GPUs). A job that could not fit even on an idle cluster does not
  // stop it: it waits for launchers to join.
  absl::StatusOr<std::vector<JobRecord>> active = store_->Active();
  absl::StatusOr<std::vector<JobRecord>> pending = store_->Pending();
  if (!active.ok() || !pending.ok()) return;
  std::vector<JobRecord> queue;
  for (const JobRecord& job : *active) {
    if (job.state == v1::JOB_STATE_RESTARTING &&
        !loop_state_.running.count(job.id)) {
      queue.push_back(job);
    }
  }
  queue.insert(queue.end(), pending->begin(), pending->end());
  int64_t total_slots = 0, total_gpus = 0;
  for (const auto& l : launchers) {
    total_slots += l->Slots();
    total_gpus += static_cast<int64_t>(l->Gpus().size());
  }
  const Clock::TimePoint now = clock_.Now();
  for (const JobRecord& job : queue) {
    auto wait = loop_state_.not_before.find(job.id);
    if (wait != loop_state_.not_before.end()) {
      if (now < wait->second) continue;  // backing off; the queue moves on
      loop_state_.not_before.erase(wait);
    }
    absl::StatusOr<JobSpec> spec = ParseJobSpec(job.spec_yaml, {}, job.id);
    if (!spec.ok()) {
      FailUnlaunchable(job, absl::StrCat("the stored spec no longer parses: ",
                                         spec.status().message()));
      continue;
    }
    // The device was resolved at submission: auto is not stored.
    const bool cuda = spec->resources.device == "cuda";
    if (!CouldEverFit(total_slots, total_gpus, job.world_size, cuda)) continue;
    std::vector<Capacity> capacity;
    for (const auto& l : launchers) {
      Capacity c{l, 0, {}};
      c.free_slots =
          std::max<int64_t>(0, l->Slots() - loop_state_.used_slots[l.get()]);
      const std::set<int>& used = loop_state_.used_gpus[l.get()];
      for (int gpu : l->Gpus()) {
        if (!used.count(gpu)) c.free_gpus.push_back(gpu);
      }
      capacity.push_back(std::move(c));
    }
    const std::vector<Placement> placement =
        Place(capacity, job.world_size, cuda);
    if (placement.empty()) break;
    Launch(job, *spec, placement);
  }
}

void Coordinator::FailUnlaunchable(const JobRecord& queued,
                                   const std::string& reason) {
  absl::StatusOr<JobRecord> after = store_->Transition(
      queued.id, v1::JOB_STATE_FAILED, reason, clock_.WallMs());
  if (after.ok()) PublishChange(queued, *after);
}

absl::StatusOr<std::string> Coordinator::OutputPathAtLaunch(
    const JobRecord& job) const {
  // Admitted before outputs were confined: as it was.
  if (job.output_path.empty()) return OutputDirOf(job);
  MOMENTUM_ASSIGN_OR_RETURN(
      std::string path, admission_.ResolveOutputDir(job.output_path, job.owner,
                                                    job.owner_is_admin));
  MOMENTUM_RETURN_IF_ERROR(store_->CheckOutputFree(path, job.owner, job.id));
  return path;
}

void Coordinator::Launch(const JobRecord& queued, const JobSpec& spec,
                         const std::vector<Placement>& placement) {
  // Checked again now, before anything is written: the folders on the way
  // may have changed since submission.
  absl::StatusOr<std::string> output_path = OutputPathAtLaunch(queued);
  if (!output_path.ok()) {
    FailUnlaunchable(queued,
                     absl::StrCat("not launched (bad input: not retried): ",
                                  output_path.status().message()));
    return;
  }
  absl::StatusOr<int64_t> port = PickFreePort();
  if (!port.ok()) {
    FailUnlaunchable(queued, std::string(port.status().message()));
    return;
  }

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
      absl::StrCat(Ranks(queued.world_size), " launched (", where, ")"),
      clock_.WallMs());
  if (!after.ok()) return;  // cancelled meanwhile
  JobRecord job = *after;
  job.attempt = queued.attempt + 1;
  if (!queued.output_path.empty()) job.output_path = *output_path;
  if (queued.state == v1::JOB_STATE_RESTARTING) {
    job.restarts = queued.restarts + 1;
  }
  (void)store_->UpdateRun(job);

  RunningJob& run = loop_state_.running[job.id];
  run = RunningJob();
  run.attempt = job.attempt;
  run.world_size = job.world_size;
  run.max_restarts = spec.scheduling.max_restarts;
  run.restart_backoff_s = spec.scheduling.restart_backoff_s;
  for (const Placement& part : placement) {
    // A CUDA rank owns its GPU instead of a slot (placement.h).
    if (part.gpus.empty()) {
      loop_state_.used_slots[part.launcher.get()] +=
          static_cast<int64_t>(part.ranks.size());
    }
    for (size_t i = 0; i < part.ranks.size(); ++i) {
      const int gpu = part.gpus.empty() ? -1 : part.gpus[i];
      if (gpu >= 0) loop_state_.used_gpus[part.launcher.get()].insert(gpu);
      run.ranks[part.ranks[i]] = RankSlot{part.launcher, true, gpu};
    }
  }
  health_.Begin(job.id, job.attempt,
                {job.world_size, spec.scheduling.hang_timeout_s,
                 spec.scheduling.straggler_factor});
  std::string report_address;
  {
    absl::MutexLock lock(&mu_);
    live_gangs_[{job.id, job.attempt}] = job.world_size;
    report_address = report_address_;
  }
  PublishChange(queued, job);
  // One credential per rank, for this launch only (rank_credentials.h).
  absl::StatusOr<std::vector<std::string>> credentials =
      credentials_.Issue(job.id, job.attempt, job.world_size);
  if (!credentials.ok()) {
    for (const Placement& part : placement) {
      for (int64_t r : part.ranks) {
        PushExit({job.id, job.attempt, r, kExitFailed, 0,
                  absl::StrCat("could not be given a credential: ",
                               credentials.status().message())});
      }
    }
    return;
  }
  const std::string master_addr = placement.front().launcher->Address();
  for (const Placement& part : placement) {
    LaunchRequest request;
    request.job_id = job.id;
    request.attempt = job.attempt;
    request.world_size = job.world_size;
    request.ranks = part.ranks;
    request.gpus = part.gpus;
    // The spec travels as stored; where to write is a parameter.
    request.spec_yaml = queued.spec_yaml;
    request.output_dir = OutputDirOf(job);
    request.master_addr = master_addr;
    request.master_port = *port;
    request.env = {absl::StrCat("MOMENTUM_JOB_ID=", job.id),
                   absl::StrCat("MOMENTUM_ATTEMPT=", job.attempt)};
    for (int64_t r : part.ranks) {
      request.credentials.push_back((*credentials)[static_cast<size_t>(r)]);
    }
    if (!report_address.empty()) {
      request.env.push_back("MOMENTUM_COORDINATOR=" + report_address);
    }
    // Launch() may report exits from inside (a rank that cannot start): they
    // go to the inbox, handled on the next pass.
    absl::Status launched = part.launcher->Launch(request);
    if (!launched.ok()) {
      // A launcher that refuses for a reason of its own setup or the
      // request's (no worker binary, a GPU it lacks) refuses every time.
      const bool permanent =
          launched.code() == absl::StatusCode::kFailedPrecondition ||
          launched.code() == absl::StatusCode::kInvalidArgument;
      for (int64_t r : part.ranks) {
        PushExit(
            {job.id, job.attempt, r, permanent ? kExitBadInput : kExitFailed, 0,
             absl::StrCat("could not be launched on ", part.launcher->Name(),
                          ": ", launched.message())});
      }
    }
  }
}

void Coordinator::UpdateGauges(
    const std::vector<std::shared_ptr<Launcher>>& launchers) {
  if (metrics_ == nullptr) return;
  int64_t slots = 0, used_slots = 0, gpus = 0, used_gpus = 0;
  for (const auto& l : launchers) {
    slots += l->Slots();
    gpus += static_cast<int64_t>(l->Gpus().size());
    used_slots += loop_state_.used_slots[l.get()];
    used_gpus += static_cast<int64_t>(loop_state_.used_gpus[l.get()].size());
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

// ---------------------------------------------------------------- the view

v1::Job Coordinator::ToProto(const JobRecord& job) {
  int64_t position = 0;
  if (job.state == v1::JOB_STATE_PENDING) {
    absl::StatusOr<std::vector<JobRecord>> pending = store_->Pending();
    if (pending.ok()) {
      for (size_t i = 0; i < pending->size(); ++i) {
        if ((*pending)[i].id == job.id) position = static_cast<int64_t>(i) + 1;
      }
    }
  }
  return JobToProto(job, OutputDirOf(job), progress_.Get(job.id), position);
}

void Coordinator::PublishChange(const JobRecord& before,
                                const JobRecord& after) {
  v1::WatchJobEvent event = EventAt(clock_.WallMs());
  v1::StateChange* change = event.mutable_state_change();
  change->set_from(before.state);
  change->set_to(after.state);
  change->set_reason(after.state_reason);
  watchers_.Publish(after.id, event, WatchHub::Kind::kState);
  if (metrics_ != nullptr) metrics_->SetJobState(after.id, after.state);
  if (!IsFinal(after.state)) return;
  if (metrics_ != nullptr) metrics_->JobEnded(after.id);
  v1::WatchJobEvent snapshot = EventAt(clock_.WallMs());
  *snapshot.mutable_job() = ToProto(after);
  watchers_.Publish(after.id, snapshot, WatchHub::Kind::kState);
  // The streams end after a final state and the last snapshot.
  watchers_.Close(after.id);
}

}  // namespace momentum::server
