// The coordinator's Prometheus metrics (prometheus-cpp), served on /metrics:
// training series per job and rank from the workers' samples, and service
// series (jobs by state, slots, GPUs, restarts, RPCs). docs/metrics.md lists
// every series. Series of a finished job are removed after a retention period,
// so memory stays bounded however many jobs run.
#ifndef MOMENTUM_SERVER_SERVER_METRICS_H_
#define MOMENTUM_SERVER_SERVER_METRICS_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "momentum/v1/jobs.pb.h"

namespace prometheus {
class Exposer;
class Registry;
class Gauge;
class Counter;
class Histogram;
template <typename T>
class Family;
}  // namespace prometheus

namespace momentum::server {

class ServerMetrics {
 public:
  // Serves /metrics on `listen` (host:port; port 0 lets the OS choose).
  static absl::StatusOr<std::unique_ptr<ServerMetrics>> Create(
      const std::string& listen, std::chrono::seconds retention);
  ~ServerMetrics();

  // The port /metrics is served on.
  int port() const { return port_; }

  void OnSample(const std::string& job_id, const v1::MetricSample& sample);
  // Jobs by state, all states given (absent ones 0).
  void SetJobs(const std::map<v1::JobState, int64_t>& by_state);
  // momentum_worker_slots{state}: CPU slots of all launchers.
  void SetSlots(int64_t used, int64_t free);
  // momentum_worker_gpus{state}: GPUs of all launchers (ranks of CUDA jobs
  // own one each).
  void SetGpus(int64_t used, int64_t free);
  void AddRestart(const std::string& reason);
  // momentum_train_straggler{job_id, rank}: 1 while the rank straggles.
  void SetStraggler(const std::string& job_id, int64_t rank, bool straggling);
  // momentum_job_state{job_id, state} = 1 for the job's current state (one
  // series per job). A final state also starts the retention period.
  void SetJobState(const std::string& job_id, v1::JobState state);
  // A job reached a final state: its series go after the retention period.
  void JobEnded(const std::string& job_id);
  void OnRpc(const std::string& method, const std::string& code,
             double seconds);

 private:
  ServerMetrics() = default;
  void ExpireLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  prometheus::Histogram* RpcHistogramLocked(const std::string& method)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
  std::chrono::seconds retention_{300};

  absl::Mutex mu_;
  struct Families;
  std::unique_ptr<Families> f_ ABSL_GUARDED_BY(mu_);
  // Per job: every training series it added, to remove them together.
  struct JobSeries {
    prometheus::Gauge* state = nullptr;  // in gauges too
    std::vector<
        std::pair<prometheus::Family<prometheus::Gauge>*, prometheus::Gauge*>>
        gauges;
    std::map<std::string, prometheus::Gauge*> by_key;
    std::chrono::steady_clock::time_point ended{};
    bool has_ended = false;
  };
  std::map<std::string, JobSeries> jobs_ ABSL_GUARDED_BY(mu_);
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_SERVER_METRICS_H_
