#include "worker/reporter.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/time/time.h"
#include "common/grpc_security.h"
#include "momentum/v1/internal.grpc.pb.h"
#include "momentum/v1/jobs.pb.h"

namespace momentum::worker {
namespace {

using Clock = std::chrono::steady_clock;

// A stream that stays up this long has ended an outage: the back-off starts
// over and the recovery is logged. Shorter streams (a coordinator that
// accepts the connection and rejects the call) keep backing off and stay
// one outage in the log.
constexpr std::chrono::seconds kHealthyAfter{1};

// Waits on `cv` for at most `d` (absl takes its own durations).
void WaitFor(absl::CondVar& cv, absl::Mutex* mu, Clock::duration d) {
  if (d <= Clock::duration::zero()) return;
  cv.WaitWithTimeout(
      mu, absl::FromChrono(
              std::chrono::duration_cast<std::chrono::nanoseconds>(d)));
}

void SetNow(google::protobuf::Timestamp* t) {
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const auto ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(now).count();
  t->set_seconds(ns / 1000000000);
  t->set_nanos(static_cast<int32_t>(ns % 1000000000));
}

const char* Env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

}  // namespace

absl::StatusOr<std::optional<MetricsReporterOptions>>
MetricsReporterOptionsFromEnv(int64_t rank) {
  const char* names[] = {"MOMENTUM_COORDINATOR", "MOMENTUM_JOB_ID",
                         "MOMENTUM_ATTEMPT"};
  const char* set = nullptr;
  const char* unset = nullptr;
  for (const char* name : names) {
    (Env(name) != nullptr ? set : unset) = name;
  }
  if (set == nullptr) return std::nullopt;
  if (unset != nullptr) {
    return absl::InvalidArgumentError(
        std::string(unset) + " is unset but " + set +
        " is set: the coordinator sets MOMENTUM_COORDINATOR, "
        "MOMENTUM_JOB_ID and MOMENTUM_ATTEMPT together");
  }
  MetricsReporterOptions options;
  options.coordinator = Env("MOMENTUM_COORDINATOR");
  options.job_id = Env("MOMENTUM_JOB_ID");
  const std::string attempt = Env("MOMENTUM_ATTEMPT");
  if (!absl::SimpleAtoi(attempt, &options.attempt) || options.attempt < 0) {
    return absl::InvalidArgumentError(
        "MOMENTUM_ATTEMPT must be a non-negative integer, got \"" + attempt +
        "\"");
  }
  options.rank = static_cast<int32_t>(rank);
  return options;
}

v1::MetricSample ToMetricSample(const StepReport& r) {
  v1::MetricSample s;
  s.set_rank(static_cast<int32_t>(r.rank));
  s.set_step(r.step);
  s.set_epoch(r.epoch);
  s.set_fraction(r.fraction);
  s.set_loss(r.loss);
  s.set_learning_rate(r.learning_rate);
  s.set_images_per_second(r.images_per_second);
  s.set_data_seconds(r.data_seconds);
  s.set_forward_seconds(r.forward_seconds);
  s.set_backward_seconds(r.backward_seconds);
  s.set_communication_seconds(r.communication_seconds);
  s.set_optimizer_seconds(r.optimizer_seconds);
  s.set_positive_logit_mean(r.positive_logit_mean);
  s.set_negative_logit_mean(r.negative_logit_mean);
  s.set_feature_std_mean(r.feature_std_mean);
  s.set_feature_std_min(r.feature_std_min);
  s.set_queue_staleness_steps(r.queue_staleness_steps);
  s.set_knn_top1(r.knn_top1);
  s.set_eta_seconds(r.eta_seconds);
  return s;
}

MetricsReporter::MetricsReporter(MetricsReporterOptions options)
    : options_(std::move(options)) {
  grpc::ChannelArguments args;
  // gRPC's own reconnection back-off (1 s, growing to 120 s) would keep a
  // restarted coordinator waiting long after Loop() retries; make it follow
  // ours.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
              static_cast<int>(options_.initial_backoff.count()));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS,
              static_cast<int>(options_.initial_backoff.count()));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
              static_cast<int>(options_.max_backoff.count()));
  // TLS and the token as the coordinator's environment hands them down
  // (MOMENTUM_TLS_CA/CERT/KEY, MOMENTUM_TOKEN); a file that cannot be read
  // leaves the stream failing, and the reason in the log.
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      grpc::InsecureChannelCredentials();
  if (auto tls = ClientCredentials(ClientTlsFromEnv({})); tls.ok()) {
    credentials = *tls;
  } else {
    spdlog::warn("metrics reporter: {}", std::string(tls.status().message()));
  }
  if (auto token = ClientToken(""); token.ok()) token_ = *token;
  channel_ = grpc::CreateCustomChannel(options_.coordinator, credentials, args);
  thread_ = std::thread([this] { Loop(); });
}

MetricsReporter::~MetricsReporter() { Close(); }

void MetricsReporter::Report(const StepReport& report) {
  absl::MutexLock lock(&mu_);
  PushLocked(report);
}

void MetricsReporter::ReportFinal(const RunAccount& account) {
  absl::MutexLock lock(&mu_);
  PushLocked(account);
}

void MetricsReporter::PushLocked(Item item) {
  if (closing_) return;
  if (queue_.size() >= std::max<size_t>(options_.max_queued, 1)) {
    queue_.pop_front();
    ++dropped_;
  }
  queue_.push_back(std::move(item));
  cv_.SignalAll();
}

int64_t MetricsReporter::dropped() const {
  absl::MutexLock lock(&mu_);
  return dropped_;
}

int64_t MetricsReporter::sent() const {
  absl::MutexLock lock(&mu_);
  return sent_;
}

void MetricsReporter::Close() {
  if (!thread_.joinable()) return;
  const auto deadline = Clock::now() + options_.close_timeout;
  {
    absl::MutexLock lock(&mu_);
    closing_ = true;
    cv_.SignalAll();
    while (!done_ && Clock::now() < deadline) {
      WaitFor(cv_, &mu_, deadline - Clock::now());
    }
    if (!done_) {
      // The coordinator is down or not reading: give up on the rest.
      abort_ = true;
      if (active_ != nullptr) active_->TryCancel();
      cv_.SignalAll();
    }
  }
  thread_.join();
  absl::MutexLock lock(&mu_);
  if (!queue_.empty()) {
    dropped_ += static_cast<int64_t>(queue_.size());
    spdlog::warn("metrics: rank {} dropped {} reports it could not send to {}",
                 options_.rank, queue_.size(), options_.coordinator);
    queue_.clear();
  }
}

bool MetricsReporter::WaitForChannel(std::chrono::milliseconds backoff) {
  const auto deadline = Clock::now() + backoff;
  // In slices, so that Close() need not wait out a whole back-off.
  constexpr std::chrono::milliseconds kSlice{50};
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (abort_ || (closing_ && queue_.empty())) return false;
    }
    const auto now = Clock::now();
    if (now >= deadline) return false;
    if (channel_->WaitForConnected(
            std::chrono::system_clock::now() +
            std::min<Clock::duration>(kSlice, deadline - now))) {
      return true;
    }
  }
}

void MetricsReporter::Sleep(std::chrono::milliseconds backoff) {
  const auto deadline = Clock::now() + backoff;
  absl::MutexLock lock(&mu_);
  while (!abort_ && !(closing_ && queue_.empty()) && Clock::now() < deadline) {
    WaitFor(cv_, &mu_, deadline - Clock::now());
  }
}

void MetricsReporter::Loop() {
  std::unique_ptr<v1::InternalService::Stub> stub =
      v1::InternalService::NewStub(channel_);
  std::chrono::milliseconds backoff = options_.initial_backoff;
  bool outage = false;  // logged and not over yet
  auto note_outage = [&](const std::string& why) {
    if (!outage) {
      spdlog::warn(
          "metrics: rank {} cannot report to the coordinator at {} ({}); "
          "training goes on, reports are queued and the stream retried",
          options_.rank, options_.coordinator, why);
    }
    outage = true;
  };
  auto grow = [&] { backoff = std::min(backoff * 2, options_.max_backoff); };

  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (abort_ || (closing_ && queue_.empty())) break;
    }
    if (!WaitForChannel(backoff)) {
      note_outage("not connected");
      grow();
      continue;
    }

    grpc::ClientContext context;
    AddToken(&context, token_);
    v1::WorkerReportAck ack;
    {
      absl::MutexLock lock(&mu_);
      if (abort_) break;
      active_ = &context;
    }
    const auto opened = Clock::now();
    std::unique_ptr<grpc::ClientWriter<v1::WorkerReport>> writer =
        stub->ReportMetrics(&context, &ack);
    v1::WorkerReport hello;
    hello.mutable_hello()->set_job_id(options_.job_id);
    hello.mutable_hello()->set_attempt(options_.attempt);
    hello.mutable_hello()->set_rank(options_.rank);
    bool ok = writer->Write(hello);
    auto last_write = Clock::now();
    bool drained = false;  // Close() began and the queue is empty
    while (ok) {
      std::optional<Item> next;
      {
        absl::MutexLock lock(&mu_);
        const auto due = last_write + options_.heartbeat_interval;
        while (queue_.empty() && !closing_ && !abort_ && Clock::now() < due) {
          WaitFor(cv_, &mu_, due - Clock::now());
        }
        if (abort_) break;
        if (!queue_.empty()) {
          next = std::move(queue_.front());
          queue_.pop_front();
        } else if (closing_) {
          drained = true;
          break;
        }
      }
      v1::WorkerReport message;
      if (next && std::holds_alternative<StepReport>(*next)) {
        *message.mutable_metric() = ToMetricSample(std::get<StepReport>(*next));
      } else if (next) {
        const RunAccount& a = std::get<RunAccount>(*next);
        v1::RunSummary* summary = message.mutable_summary();
        summary->set_steps(a.steps);
        summary->set_images_seen(a.images_seen);
        summary->set_epochs_completed(a.epochs_completed);
        summary->set_knn_top1(a.knn_top1);
        summary->set_export_path(a.export_path);
        summary->set_stop_reason(a.stop_reason);
        summary->set_train_seconds(a.train_seconds);
      } else {
        SetNow(message.mutable_heartbeat());
      }
      ok = writer->Write(message);
      if (ok) {
        last_write = Clock::now();
        if (last_write - opened >= kHealthyAfter) {
          if (outage) {
            spdlog::info("metrics: rank {} reports to {} again", options_.rank,
                         options_.coordinator);
          }
          outage = false;
          backoff = options_.initial_backoff;
        }
      }
      absl::MutexLock lock(&mu_);
      if (ok && next) {
        ++sent_;
      } else if (next) {
        // Not sent: it goes first on the next stream, unless newer reports
        // have filled the queue meanwhile.
        if (queue_.size() < std::max<size_t>(options_.max_queued, 1)) {
          queue_.push_front(std::move(*next));
        } else {
          ++dropped_;
        }
        cv_.SignalAll();
      }
    }

    if (drained) writer->WritesDone();
    const grpc::Status status = writer->Finish();
    bool aborted;
    {
      absl::MutexLock lock(&mu_);
      active_ = nullptr;
      aborted = abort_;
    }
    if (aborted) break;
    if (drained) {
      if (!status.ok()) {
        spdlog::warn(
            "metrics: rank {}: the coordinator at {} ended the "
            "report stream with {}",
            options_.rank, options_.coordinator, status.error_message());
      }
      break;
    }
    note_outage(status.ok() ? std::string("stream ended")
                            : status.error_message());
    Sleep(backoff);
    grow();
  }
  absl::MutexLock lock(&mu_);
  done_ = true;
  cv_.SignalAll();
}

}  // namespace momentum::worker
