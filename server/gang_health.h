// Whether a running gang is healthy, from what its ranks report: a rank
// that has reported and then falls silent, or stays at one step, for the
// spec's scheduling.hang_timeout_s is hung; a rank whose compute time per
// step stays above straggler_factor times the other ranks' median for three
// reports in a row is a straggler. Time comes from an injected Clock.
//
//   GangHealth health(&clock);
//   health.Begin("job-3", /*attempt=*/1, {.world_size = 2, ...});
//   auto notice = health.OnSample("job-3", 1, sample);   // report threads
//   for (const auto& hang : health.FindHangs()) ...       // the loop
#ifndef MOMENTUM_SERVER_GANG_HEALTH_H_
#define MOMENTUM_SERVER_GANG_HEALTH_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "momentum/v1/jobs.pb.h"
#include "server/clock.h"

namespace momentum::server {

// Thread-safe (one mutex); owns no thread and never calls out.
class GangHealth {
 public:
  struct Rules {
    int64_t world_size = 1;
    double hang_timeout_s = 0;    // 0: no hang check
    double straggler_factor = 0;  // 0: no straggler check
  };
  struct Hang {
    std::string job_id;
    int64_t attempt = 0;
    std::string reason;  // "rank 1 is hung: no report for 30 s"
  };

  explicit GangHealth(const Clock* clock) : clock_(clock) {}

  // A gang was launched (replaces the job's earlier one).
  void Begin(const std::string& job_id, int64_t attempt, const Rules& rules);
  // The gang is gone.
  void End(const std::string& job_id);
  // A rank of it ended: it is no longer checked.
  void RankEnded(const std::string& job_id, int64_t attempt, int64_t rank);

  // A rank's heartbeat (alive, whatever its progress). Reports of other
  // attempts than the current one are ignored.
  void OnHeartbeat(const std::string& job_id, int64_t attempt, int64_t rank);
  // A metric sample of the rank in sample.rank(); returns a notice when the
  // rank starts or stops straggling.
  std::optional<v1::Notice> OnSample(const std::string& job_id, int64_t attempt,
                                     const v1::MetricSample& sample);

  // Gangs with a hung rank, each reported once per attempt. A silent rank
  // is named before a stuck one: the ranks waiting for it in a collective
  // still report, stuck at one step, and are not the cause.
  std::vector<Hang> FindHangs();

 private:
  struct RankHealth {
    Clock::TimePoint last_report, step_changed;
    int64_t step = -1;
    double compute_seconds = -1;  // per step, without communication
    int strikes = 0;              // reports in a row above the limit
    bool straggler = false;
    bool ended = false;
  };
  struct Gang {
    int64_t attempt = 0;
    Rules rules;
    bool hang_reported = false;
    std::map<int64_t, RankHealth> ranks;  // from each rank's first report
  };
  // The rank's entry when `attempt` is the job's current one.
  RankHealth* FindLocked(const std::string& job_id, int64_t attempt,
                         int64_t rank, bool* added)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::optional<v1::Notice> CheckStragglerLocked(Gang& gang, int64_t rank)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Clock* const clock_;
  absl::Mutex mu_;
  std::map<std::string, Gang> gangs_ ABSL_GUARDED_BY(mu_);
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_GANG_HEALTH_H_
