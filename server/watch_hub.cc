#include "server/watch_hub.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace momentum::server {

bool Subscription::Next(v1::WatchJobEvent* event,
                        std::chrono::milliseconds wait) {
  absl::MutexLock lock(&mu_);
  const absl::Time deadline = absl::Now() + absl::FromChrono(wait);
  while (events_.empty() && !closed_ && dropped_ == dropped_told_) {
    if (cv_.WaitWithDeadline(&mu_, deadline)) break;
  }
  // Caught up after a loss (half the backlog drained): the reader hears of
  // it before what follows.
  if (dropped_ > dropped_told_ && events_.size() <= max_backlog_ / 2) {
    const absl::Duration since_epoch = absl::Now() - absl::UnixEpoch();
    event->Clear();
    event->mutable_time()->set_seconds(absl::ToInt64Seconds(since_epoch));
    event->mutable_notice()->set_kind("events_dropped");
    event->mutable_notice()->set_rank(-1);
    event->mutable_notice()->set_message(absl::StrCat(
        dropped_ - dropped_told_,
        " metric samples and log lines were dropped: this stream fell ",
        max_backlog_, " events behind"));
    dropped_told_ = dropped_;
    return true;
  }
  if (events_.empty()) return false;
  *event = std::move(events_.front());
  events_.pop_front();
  return true;
}

bool Subscription::Done() const {
  absl::MutexLock lock(&mu_);
  return closed_ && events_.empty();
}

int64_t Subscription::dropped() const {
  absl::MutexLock lock(&mu_);
  return dropped_;
}

void Subscription::Push(v1::WatchJobEvent event) {
  absl::MutexLock lock(&mu_);
  if (closed_) return;
  if (events_.size() >= max_backlog_ &&
      (event.has_metric() || event.has_log())) {
    ++dropped_;
    return;
  }
  // A change committed between subscribing and reading the first snapshot
  // is already in it.
  if (event.has_state_change()) {
    if (event.state_change().to() == last_state_) return;
    last_state_ = event.state_change().to();
  } else if (event.has_job()) {
    last_state_ = event.job().state();
  }
  events_.push_back(std::move(event));
  cv_.SignalAll();
}

void Subscription::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
  cv_.SignalAll();
}

absl::StatusOr<std::shared_ptr<Subscription>> WatchHub::Subscribe(
    const std::string& job_id, bool metrics, bool logs,
    const std::string& caller) {
  absl::MutexLock lock(&mu_);
  if (count_ >= options_.max_streams) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the server has ", count_,
        " watch and log streams open, its limit (--max-watch-streams); "
        "close one or try again later"));
  }
  size_t& mine = per_caller_[caller];
  if (mine >= options_.max_streams_per_caller) {
    return absl::ResourceExhaustedError(absl::StrCat(
        caller.empty() ? std::string("anonymous callers")
                       : absl::StrCat("\"", absl::CHexEscape(caller), "\""),
        " already have ", mine,
        " watch and log streams open, the limit per user "
        "(--max-watch-streams-per-user); close one or try again later"));
  }
  auto subscription = std::make_shared<Subscription>(
      job_id, metrics, logs, options_.max_backlog, caller);
  subs_[job_id].push_back(subscription);
  ++count_;
  ++mine;
  return subscription;
}

void WatchHub::ReleaseLocked(const Subscription& subscription) {
  auto it = per_caller_.find(subscription.caller());
  if (it == per_caller_.end()) return;
  if (--it->second == 0) per_caller_.erase(it);
}

void WatchHub::Unsubscribe(const std::shared_ptr<Subscription>& subscription) {
  absl::MutexLock lock(&mu_);
  auto it = subs_.find(subscription->job_id());
  if (it == subs_.end()) return;
  auto& list = it->second;
  const auto end = std::remove(list.begin(), list.end(), subscription);
  count_ -= static_cast<size_t>(list.end() - end);
  if (end != list.end()) ReleaseLocked(*subscription);
  list.erase(end, list.end());
  if (list.empty()) subs_.erase(it);
}

void WatchHub::Publish(const std::string& job_id,
                       const v1::WatchJobEvent& event, Kind kind) {
  std::vector<std::shared_ptr<Subscription>> targets;
  {
    absl::MutexLock lock(&mu_);
    auto it = subs_.find(job_id);
    if (it == subs_.end()) return;
    targets = it->second;
  }
  for (auto& s : targets) {
    if (kind == Kind::kMetric && !s->wants_metrics()) continue;
    if (kind == Kind::kLog && !s->wants_logs()) continue;
    s->Push(event);
  }
}

void WatchHub::Close(const std::string& job_id) {
  std::vector<std::shared_ptr<Subscription>> list;
  {
    absl::MutexLock lock(&mu_);
    auto it = subs_.find(job_id);
    if (it == subs_.end()) return;
    list = std::move(it->second);
    count_ -= list.size();
    for (const auto& s : list) ReleaseLocked(*s);
    subs_.erase(it);
  }
  for (auto& s : list) s->Close();
}

void WatchHub::CloseAll() {
  std::map<std::string, std::vector<std::shared_ptr<Subscription>>> all;
  {
    absl::MutexLock lock(&mu_);
    all = std::move(subs_);
    subs_.clear();
    count_ = 0;
    per_caller_.clear();
  }
  for (auto& [id, list] : all) {
    for (auto& s : list) s->Close();
  }
}

size_t WatchHub::open_streams() const {
  absl::MutexLock lock(&mu_);
  return count_;
}

size_t WatchHub::open_streams_of(const std::string& caller) const {
  absl::MutexLock lock(&mu_);
  auto it = per_caller_.find(caller);
  return it == per_caller_.end() ? 0 : it->second;
}

}  // namespace momentum::server
