#include "server/agent_launcher.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace momentum::server {

int64_t AgentLauncher::Slots() const {
  absl::MutexLock lock(&mu_);
  return closed_ ? 0 : slots_;
}

std::vector<int> AgentLauncher::Gpus() const {
  absl::MutexLock lock(&mu_);
  return closed_ ? std::vector<int>() : gpus_;
}

absl::Status AgentLauncher::Launch(const LaunchRequest& request) {
  if (closed()) {
    return absl::UnavailableError(absl::StrCat(Name(), " is gone"));
  }
  const int64_t local_world = static_cast<int64_t>(request.ranks.size());
  {
    absl::MutexLock lock(&mu_);
    for (int64_t rank : request.ranks) {
      ranks_.emplace(request.job_id, request.attempt, rank);
    }
  }
  for (size_t i = 0; i < request.ranks.size(); ++i) {
    v1::AgentCommand command;
    v1::LaunchRank* launch = command.mutable_launch();
    launch->set_job_id(request.job_id);
    launch->set_attempt(static_cast<int32_t>(request.attempt));
    launch->set_rank(static_cast<int32_t>(request.ranks[i]));
    launch->set_world_size(static_cast<int32_t>(request.world_size));
    launch->set_local_rank(static_cast<int32_t>(i));
    launch->set_local_world_size(static_cast<int32_t>(local_world));
    launch->set_master_addr(request.master_addr);
    launch->set_master_port(static_cast<int32_t>(request.master_port));
    launch->set_spec_yaml(request.spec_yaml);
    launch->set_output_dir(request.output_dir);
    for (const std::string& e : request.env) launch->add_env(e);
    // The rank's own credential goes to its agent only.
    if (i < request.credentials.size()) {
      launch->add_env("MOMENTUM_TOKEN=" + request.credentials[i]);
    }
    if (!request.gpus.empty()) launch->set_gpu(request.gpus[i]);
    Push(std::move(command));
  }
  return absl::OkStatus();
}

void AgentLauncher::Stop(const std::string& job_id, int64_t attempt,
                         double grace_seconds) {
  v1::AgentCommand command;
  v1::StopRanks* stop = command.mutable_stop();
  stop->set_job_id(job_id);
  stop->set_attempt(static_cast<int32_t>(attempt));
  stop->set_grace_seconds(grace_seconds);
  Push(std::move(command));
}

void AgentLauncher::Push(v1::AgentCommand command) {
  absl::MutexLock lock(&mu_);
  if (closed_) return;
  commands_.push_back(std::move(command));
  cv_.SignalAll();
}

bool AgentLauncher::NextCommand(v1::AgentCommand* command,
                                std::chrono::milliseconds wait) {
  absl::MutexLock lock(&mu_);
  const absl::Time deadline = absl::Now() + absl::FromChrono(wait);
  while (!closed_ && commands_.empty()) {
    if (cv_.WaitWithDeadline(&mu_, deadline)) break;
  }
  if (closed_ || commands_.empty()) return false;
  *command = std::move(commands_.front());
  commands_.pop_front();
  return true;
}

void AgentLauncher::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
  commands_.clear();
  cv_.SignalAll();
}

bool AgentLauncher::Runs(const std::string& job_id, int64_t attempt,
                         int64_t rank) const {
  absl::MutexLock lock(&mu_);
  return ranks_.count({job_id, attempt, rank}) > 0;
}

bool AgentLauncher::Ended(const std::string& job_id, int64_t attempt,
                          int64_t rank) {
  absl::MutexLock lock(&mu_);
  return ranks_.erase({job_id, attempt, rank}) > 0;
}

bool AgentLauncher::closed() const {
  absl::MutexLock lock(&mu_);
  return closed_;
}

}  // namespace momentum::server
