// The open WatchJob and GetJobLogs streams and what is published to them:
// state changes, job snapshots, notices, metric samples and log lines, per
// job. Each stream has a Subscription, a bounded queue its gRPC thread
// drains.
//
//   auto sub = hub.Subscribe("job-3", /*metrics=*/true, /*logs=*/false);
//   hub.Publish("job-3", event, WatchHub::Kind::kMetric);   // any thread
//   while ((*sub)->Next(&event, 200ms) || !(*sub)->Done()) ...
//   hub.Unsubscribe(*sub);
#ifndef MOMENTUM_SERVER_WATCH_HUB_H_
#define MOMENTUM_SERVER_WATCH_HUB_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "momentum/v1/jobs.pb.h"

namespace momentum::server {

// The events of one stream, in order. Thread-safe: the hub pushes from any
// thread, one reader calls Next(). A reader that falls `max_backlog` events
// behind loses metric samples and log lines (counted, and said in a notice
// once it catches up); state changes, snapshots and notices are never
// dropped, and there are few of them.
class Subscription {
 public:
  // `caller`: who opened the stream (the token's name; "" when unknown).
  Subscription(std::string job_id, bool metrics, bool logs, size_t max_backlog,
               std::string caller = "")
      : job_id_(std::move(job_id)),
        caller_(std::move(caller)),
        metrics_(metrics),
        logs_(logs),
        max_backlog_(max_backlog) {}

  const std::string& job_id() const { return job_id_; }
  const std::string& caller() const { return caller_; }
  bool wants_metrics() const { return metrics_; }
  bool wants_logs() const { return logs_; }

  // Blocks up to `wait` for the next event; false when there is none (yet).
  bool Next(v1::WatchJobEvent* event, std::chrono::milliseconds wait);
  // True once closed and drained: the stream is over.
  bool Done() const;
  // Metric samples and log lines dropped so far for a slow reader.
  int64_t dropped() const;

  void Push(v1::WatchJobEvent event);
  void Close();

 private:
  const std::string job_id_;
  const std::string caller_;
  const bool metrics_, logs_;
  const size_t max_backlog_;
  mutable absl::Mutex mu_;
  absl::CondVar cv_;
  std::deque<v1::WatchJobEvent> events_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  int64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t dropped_told_ ABSL_GUARDED_BY(mu_) = 0;
  v1::JobState last_state_ ABSL_GUARDED_BY(mu_) = v1::JOB_STATE_UNSPECIFIED;
};

// Thread-safe; owns no thread. Each open stream pins one gRPC thread (the
// synchronous API), so their number is limited: past `max_streams`,
// Subscribe() is refused with RESOURCE_EXHAUSTED instead of starving the
// server of threads; past `max_streams_per_caller` of one caller too, so
// that one user cannot take them all (anonymous callers share one count).
class WatchHub {
 public:
  enum class Kind { kState, kMetric, kLog };
  struct Options {
    size_t max_streams = 512;
    size_t max_backlog = 10000;  // events per stream; see Subscription
    size_t max_streams_per_caller = 128;
  };
  WatchHub() : WatchHub(Options()) {}
  explicit WatchHub(Options options) : options_(options) {}

  absl::StatusOr<std::shared_ptr<Subscription>> Subscribe(
      const std::string& job_id, bool metrics, bool logs,
      const std::string& caller = "");
  void Unsubscribe(const std::shared_ptr<Subscription>& subscription);
  // To the job's streams that want it. Never blocks on a reader.
  void Publish(const std::string& job_id, const v1::WatchJobEvent& event,
               Kind kind);
  // Ends the job's streams (they drain first).
  void Close(const std::string& job_id);
  void CloseAll();
  size_t open_streams() const;
  size_t open_streams_of(const std::string& caller) const;

 private:
  // The subscription no longer counts against its caller.
  void ReleaseLocked(const Subscription& subscription)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::vector<std::shared_ptr<Subscription>>> subs_
      ABSL_GUARDED_BY(mu_);
  size_t count_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, size_t> per_caller_ ABSL_GUARDED_BY(mu_);
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_WATCH_HUB_H_
