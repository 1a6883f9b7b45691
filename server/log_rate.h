// How much output one rank may put into the coordinator's logs: a token
// bucket of lines and one of bytes per rank, refilled at a steady rate and
// holding a burst. A rank that floods loses the excess; the coordinator
// writes one notice per burst saying how many lines were dropped, so the
// stored log stays bounded and says it is not whole.
//
//   LogRateLimiter limiter({.lines_per_second = 1000});
//   LogRateLimiter::Verdict v = limiter.Admit("job-3", 0, line.size(), now);
//   if (v.dropped_before > 0) Append(notice(v.dropped_before));
//   if (v.keep) Append(line);
#ifndef MOMENTUM_SERVER_LOG_RATE_H_
#define MOMENTUM_SERVER_LOG_RATE_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/clock.h"

namespace momentum::server {

// Thread-safe; owns no thread. Keeps one bucket per (job, rank) that sent a
// line, until Forget().
class LogRateLimiter {
 public:
  struct Options {
    // Steady rates per rank; 0 turns the limit off.
    double lines_per_second = 1000;
    double bytes_per_second = 1 << 20;
    // The buckets hold this many seconds of the rates: a rank may write
    // that much at once.
    double burst_seconds = 5;
  };
  struct Verdict {
    bool keep = true;
    // Lines dropped since the last one kept (or told), to be told in a
    // notice before this one; 0 when none were.
    int64_t dropped_before = 0;
  };

  LogRateLimiter() : LogRateLimiter(Options()) {}
  explicit LogRateLimiter(Options options) : options_(options) {}

  // Whether a line of `bytes` bytes of the rank is kept. Once a bucket runs
  // dry the rank's lines are dropped until both buckets are half full
  // again, so a steady flood yields one notice per half a burst, not one
  // per kept line.
  Verdict Admit(const std::string& job_id, int64_t rank, size_t bytes,
                Clock::TimePoint now);
  // Lines dropped and not yet told (the rank ended in a flood); resets them.
  int64_t TakeDropped(const std::string& job_id, int64_t rank);
  // The job ended: its buckets go.
  void Forget(const std::string& job_id);

  const Options& options() const { return options_; }

 private:
  struct Bucket {
    double lines = 0;
    double bytes = 0;
    Clock::TimePoint last;
    bool dropping = false;
    int64_t dropped = 0;
  };

  const Options options_;
  absl::Mutex mu_;
  std::map<std::pair<std::string, int64_t>, Bucket> buckets_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_LOG_RATE_H_
