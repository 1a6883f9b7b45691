// A fake coordinator for the worker's reporter: a real gRPC server on
// 127.0.0.1 whose InternalService.ReportMetrics records every message of
// every stream, and waits on what it has received. No LibTorch.
#ifndef MOMENTUM_TESTS_WORKER_FAKE_COORDINATOR_H_
#define MOMENTUM_TESTS_WORKER_FAKE_COORDINATOR_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "momentum/v1/internal.grpc.pb.h"
#include "momentum/v1/jobs.pb.h"

namespace momentum::worker::testing {

using ReportStreams = std::vector<std::vector<v1::WorkerReport>>;

// InternalService.ReportMetrics recording every message of every stream.
class RecordingService final : public v1::InternalService::Service {
 public:
  grpc::Status ReportMetrics(grpc::ServerContext*,
                             grpc::ServerReader<v1::WorkerReport>* reader,
                             v1::WorkerReportAck*) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      streams_.emplace_back();
    }
    v1::WorkerReport report;
    while (reader->Read(&report)) {
      std::lock_guard<std::mutex> lock(mu_);
      streams_.back().push_back(report);
      cv_.notify_all();
    }
    std::lock_guard<std::mutex> lock(mu_);
    ++finished_;
    cv_.notify_all();
    return grpc::Status::OK;
  }

  // Waits until `done(streams, finished streams)` holds, at most `timeout`
  // (false then).
  bool WaitFor(const std::function<bool(const ReportStreams&, int)>& done,
               std::chrono::seconds timeout = std::chrono::seconds(20)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout,
                        [&] { return done(streams_, finished_); });
  }

  ReportStreams streams() {
    std::lock_guard<std::mutex> lock(mu_);
    return streams_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  ReportStreams streams_;
  int finished_ = 0;
};

// The server, on a port the OS picks (port 0) or the one given.
class FakeCoordinator {
 public:
  explicit FakeCoordinator(int port = 0) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:" + std::to_string(port),
                             grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
  }
  ~FakeCoordinator() { Shutdown(); }
  void Shutdown() {
    if (server_ == nullptr) return;
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(200));
    server_->Wait();
    server_.reset();
  }
  bool ok() const { return server_ != nullptr && port_ > 0; }
  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  RecordingService& service() { return service_; }

 private:
  RecordingService service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

// The metric samples of a stream, in order.
inline std::vector<v1::MetricSample> Metrics(
    const std::vector<v1::WorkerReport>& stream) {
  std::vector<v1::MetricSample> out;
  for (const auto& m : stream) {
    if (m.report_case() == v1::WorkerReport::kMetric) out.push_back(m.metric());
  }
  return out;
}

inline size_t CountMetrics(const ReportStreams& streams) {
  size_t n = 0;
  for (const auto& s : streams) n += Metrics(s).size();
  return n;
}

}  // namespace momentum::worker::testing

#endif  // MOMENTUM_TESTS_WORKER_FAKE_COORDINATOR_H_
