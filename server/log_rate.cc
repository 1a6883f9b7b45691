#include "server/log_rate.h"

#include <algorithm>
#include <chrono>

namespace momentum::server {

LogRateLimiter::Verdict LogRateLimiter::Admit(const std::string& job_id,
                                              int64_t rank, size_t bytes,
                                              Clock::TimePoint now) {
  if (options_.lines_per_second <= 0 && options_.bytes_per_second <= 0) {
    return {};
  }
  const double max_lines = options_.lines_per_second * options_.burst_seconds;
  const double max_bytes = options_.bytes_per_second * options_.burst_seconds;
  absl::MutexLock lock(&mu_);
  auto [it, fresh] = buckets_.try_emplace({job_id, rank});
  Bucket& b = it->second;
  if (fresh) {
    b.lines = max_lines;
    b.bytes = max_bytes;
  } else if (now > b.last) {
    const double elapsed = std::chrono::duration<double>(now - b.last).count();
    b.lines =
        std::min(max_lines, b.lines + elapsed * options_.lines_per_second);
    b.bytes =
        std::min(max_bytes, b.bytes + elapsed * options_.bytes_per_second);
  }
  b.last = std::max(b.last, now);
  const bool limit_lines = options_.lines_per_second > 0;
  const bool limit_bytes = options_.bytes_per_second > 0;
  if (b.dropping) {
    const bool refilled = (!limit_lines || b.lines >= max_lines / 2) &&
                          (!limit_bytes || b.bytes >= max_bytes / 2);
    if (!refilled) {
      ++b.dropped;
      return {false, 0};
    }
    b.dropping = false;
  }
  // A line longer than half the byte burst costs half of it: after a pause
  // it still goes through (the logs cut it into pieces anyway).
  const double cost = std::min(static_cast<double>(bytes), max_bytes / 2);
  if ((limit_lines && b.lines < 1) || (limit_bytes && b.bytes < cost)) {
    b.dropping = true;
    ++b.dropped;
    return {false, 0};
  }
  if (limit_lines) b.lines -= 1;
  if (limit_bytes) b.bytes -= cost;
  const int64_t told = b.dropped;
  b.dropped = 0;
  return {true, told};
}

int64_t LogRateLimiter::TakeDropped(const std::string& job_id, int64_t rank) {
  absl::MutexLock lock(&mu_);
  auto it = buckets_.find({job_id, rank});
  if (it == buckets_.end()) return 0;
  return std::exchange(it->second.dropped, 0);
}

void LogRateLimiter::Forget(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  buckets_.erase(buckets_.lower_bound({job_id, INT64_MIN}),
                 buckets_.lower_bound({job_id + '\0', INT64_MIN}));
}

}  // namespace momentum::server
