#include "server/gang_health.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace momentum::server {

void GangHealth::Begin(const std::string& job_id, int64_t attempt,
                       const Rules& rules) {
  absl::MutexLock lock(&mu_);
  Gang& gang = gangs_[job_id];
  gang = Gang();
  gang.attempt = attempt;
  gang.rules = rules;
}

void GangHealth::End(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  gangs_.erase(job_id);
}

void GangHealth::RankEnded(const std::string& job_id, int64_t attempt,
                           int64_t rank) {
  absl::MutexLock lock(&mu_);
  bool added = false;
  if (RankHealth* h = FindLocked(job_id, attempt, rank, &added)) {
    h->ended = true;
  }
}

GangHealth::RankHealth* GangHealth::FindLocked(const std::string& job_id,
                                               int64_t attempt, int64_t rank,
                                               bool* added) {
  auto it = gangs_.find(job_id);
  if (it == gangs_.end() || it->second.attempt != attempt || rank < 0 ||
      rank >= it->second.rules.world_size) {
    return nullptr;
  }
  auto [h, inserted] = it->second.ranks.try_emplace(rank);
  *added = inserted;
  return &h->second;
}

void GangHealth::OnHeartbeat(const std::string& job_id, int64_t attempt,
                             int64_t rank) {
  absl::MutexLock lock(&mu_);
  bool added = false;
  RankHealth* h = FindLocked(job_id, attempt, rank, &added);
  if (h == nullptr) return;
  const Clock::TimePoint now = clock_->Now();
  h->last_report = now;
  if (added) h->step_changed = now;
}

std::optional<v1::Notice> GangHealth::OnSample(const std::string& job_id,
                                               int64_t attempt,
                                               const v1::MetricSample& sample) {
  absl::MutexLock lock(&mu_);
  bool added = false;
  RankHealth* h = FindLocked(job_id, attempt, sample.rank(), &added);
  if (h == nullptr) return std::nullopt;
  const Clock::TimePoint now = clock_->Now();
  h->last_report = now;
  if (added || sample.step() != h->step) {
    h->step = sample.step();
    h->step_changed = now;
  }
  // An evaluation's sample repeats the last step's times.
  if (sample.knn_top1() >= 0) return std::nullopt;
  h->compute_seconds = sample.data_seconds() + sample.forward_seconds() +
                       sample.backward_seconds() + sample.optimizer_seconds();
  return CheckStragglerLocked(gangs_.at(job_id), sample.rank());
}

std::optional<v1::Notice> GangHealth::CheckStragglerLocked(Gang& gang,
                                                           int64_t rank) {
  const Rules& rules = gang.rules;
  if (rules.straggler_factor <= 0 || rules.world_size < 2) return std::nullopt;
  std::vector<double> others;
  for (const auto& [r, h] : gang.ranks) {
    if (r != rank && h.compute_seconds > 0) others.push_back(h.compute_seconds);
  }
  RankHealth& h = gang.ranks[rank];
  if (others.empty() || h.compute_seconds <= 0) return std::nullopt;
  std::sort(others.begin(), others.end());
  const size_t n = others.size();
  const double median =
      n % 2 == 1 ? others[n / 2] : 0.5 * (others[n / 2 - 1] + others[n / 2]);
  const bool above = h.compute_seconds > rules.straggler_factor * median;
  h.strikes = above ? h.strikes + 1 : 0;
  v1::Notice notice;
  notice.set_rank(static_cast<int32_t>(rank));
  if (!h.straggler && h.strikes >= 3) {
    h.straggler = true;
    notice.set_kind("straggler");
    notice.set_message(absl::StrFormat(
        "rank %d is a straggler: %.1f ms of compute per step against a median "
        "of %.1f ms on the other ranks (limit x%g)",
        rank, 1000 * h.compute_seconds, 1000 * median, rules.straggler_factor));
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

std::vector<GangHealth::Hang> GangHealth::FindHangs() {
  absl::MutexLock lock(&mu_);
  const Clock::TimePoint now = clock_->Now();
  std::vector<Hang> hangs;
  for (auto& [id, gang] : gangs_) {
    if (gang.hang_reported || gang.rules.hang_timeout_s <= 0) continue;
    const auto limit = Seconds(gang.rules.hang_timeout_s);
    std::string why;
    for (const auto& [rank, h] : gang.ranks) {
      if (!h.ended && now - h.last_report > limit) {
        why = absl::StrFormat("rank %d is hung: no report for %.0f s", rank,
                              gang.rules.hang_timeout_s);
        break;
      }
    }
    for (const auto& [rank, h] : gang.ranks) {
      if (!why.empty()) break;
      if (!h.ended && now - h.step_changed > limit) {
        why =
            absl::StrFormat("rank %d is hung: its step stayed at %d for %.0f s",
                            rank, h.step, gang.rules.hang_timeout_s);
      }
    }
    if (why.empty()) continue;
    gang.hang_reported = true;
    hangs.push_back({id, gang.attempt, why});
  }
  return hangs;
}

}  // namespace momentum::server
