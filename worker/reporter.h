// The worker's gRPC edge: streams one rank's StepReports to the coordinator
// (InternalService.ReportMetrics, proto/momentum/v1/internal.proto) without
// ever making training wait for the network. Free of LibTorch and of gRPC
// headers, so that the trainer's translation units stay as they are.
//
// Usage:
//   auto options = MetricsReporterOptionsFromEnv(rank);  // the coordinator's
//   if (!options.ok()) ...;                              // MOMENTUM_* vars
//   std::unique_ptr<MetricsReporter> reporter;
//   if (*options) reporter = std::make_unique<MetricsReporter>(**options);
//   trainer->SetReportCallback(
//       [&](const StepReport& r) { reporter->Report(r); });
//   ... train ...
//   reporter->Close();  // flushes what is queued, within close_timeout
#ifndef MOMENTUM_WORKER_REPORTER_H_
#define MOMENTUM_WORKER_REPORTER_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <variant>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "worker/step_report.h"

namespace grpc {
class Channel;
class ClientContext;
}  // namespace grpc

namespace momentum::v1 {
class MetricSample;
}  // namespace momentum::v1

namespace momentum::worker {

struct MetricsReporterOptions {
  std::string coordinator;  // host:port serving InternalService
  std::string job_id;
  int32_t attempt = 0;
  int32_t rank = 0;
  // Reports held while the stream is down or slow; when full, the oldest
  // is dropped. 1024 windows cover a long outage at any sensible
  // logging.every_steps.
  size_t max_queued = 1024;
  // A heartbeat goes out whenever nothing else was sent for this long.
  std::chrono::milliseconds heartbeat_interval{2000};
  // Waits between connection attempts: doubling from initial to max, back to
  // initial once a stream has stayed up for a second.
  std::chrono::milliseconds initial_backoff{100};
  std::chrono::milliseconds max_backoff{5000};
  // How long Close() waits for the queue to drain and the stream to finish.
  std::chrono::milliseconds close_timeout{5000};
};

// Reads what the coordinator sets when it launches a rank: MOMENTUM_COORDINATOR
// (host:port), MOMENTUM_JOB_ID and MOMENTUM_ATTEMPT (a non-negative integer).
// Returns std::nullopt when none is set (a run without the service), options
// for `rank` when all are, and INVALID_ARGUMENT naming the variable when only
// some are set or MOMENTUM_ATTEMPT is malformed.
absl::StatusOr<std::optional<MetricsReporterOptions>>
MetricsReporterOptionsFromEnv(int64_t rank);

// The sample the coordinator receives for `report`, field by field.
v1::MetricSample ToMetricSample(const StepReport& report);

// A rank's final account of a run that ended well, as the coordinator
// records it for the job (v1::RunSummary, field by field).
struct RunAccount {
  int64_t steps = 0;
  int64_t images_seen = 0;
  double epochs_completed = 0;
  double knn_top1 = -1;  // -1: no evaluation ran
  std::string export_path;
  std::string stop_reason;
  double train_seconds = 0;
};

// Streams reports to the coordinator. Thread-safe: any thread may call
// Report() and the counters; one owner calls Close().
//
// Lifecycle: the constructor starts one background thread that connects,
// sends WorkerHello, then the queued reports as MetricSamples in order, and a
// heartbeat whenever it has sent nothing for heartbeat_interval. When the
// stream breaks (or cannot be opened) it logs once per outage, backs off,
// reconnects and says hello again; reports queued meanwhile follow. A report
// in flight when a connection dies may be lost; metrics are best effort.
// Close() (or the destructor) drains the queue, finishes the stream and
// joins the thread within close_timeout, then cancels whatever is left.
//
// The stream has no deadline, as it lasts as long as training; Close()
// cancels it, and the coordinator notices a silent rank by its missing
// heartbeats.
class MetricsReporter {
 public:
  explicit MetricsReporter(MetricsReporterOptions options);
  ~MetricsReporter();

  MetricsReporter(const MetricsReporter&) = delete;
  MetricsReporter& operator=(const MetricsReporter&) = delete;

  // Queues `report` and returns at once; never waits for the network. When
  // the queue is full the oldest report is dropped (counted in dropped()).
  // Ignored after Close().
  void Report(const StepReport& report);
  // Queues the run's final account, sent after every report queued before
  // it; call it once, before Close(). Ignored after Close().
  void ReportFinal(const RunAccount& account);

  // Sends what is queued, finishes the stream and stops the thread. Blocks
  // for at most about close_timeout; reports still queued then are dropped.
  // Idempotent.
  void Close();

  // Reports dropped because the queue was full or Close() timed out.
  int64_t dropped() const;
  // Reports written to a stream.
  int64_t sent() const;

 private:
  void Loop();
  // Waits until the channel is connected (true), or `backoff` has passed or
  // there is no more need to (false: Close() gave up, or began with nothing
  // left to send).
  bool WaitForChannel(std::chrono::milliseconds backoff);
  // Waits `backoff`, ending early in the same cases.
  void Sleep(std::chrono::milliseconds backoff);

  const MetricsReporterOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::string token_;  // bearer token, "" for none

  mutable absl::Mutex mu_;
  absl::CondVar cv_;  // signalled on any change of the fields below
  // Step reports, and the final account last.
  using Item = std::variant<StepReport, RunAccount>;
  void PushLocked(Item item) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::deque<Item> queue_ ABSL_GUARDED_BY(mu_);
  int64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t sent_ ABSL_GUARDED_BY(mu_) = 0;
  // Close() began: drain the queue, then finish the stream.
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  // Close() timed out: cancel the stream and stop at once.
  bool abort_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;  // the thread has finished
  // The open stream's context, for Close() to cancel.
  grpc::ClientContext* active_ ABSL_GUARDED_BY(mu_) = nullptr;

  std::thread thread_;  // Loop(); joined by Close()
};

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_REPORTER_H_
