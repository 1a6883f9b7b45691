#include "worker/reporter.h"

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "momentum/v1/internal.grpc.pb.h"
#include "momentum/v1/jobs.pb.h"
#include "tests/worker/fake_coordinator.h"

namespace momentum::worker {
namespace {

using std::chrono::milliseconds;
using testing::CountMetrics;
using testing::FakeCoordinator;
using testing::Metrics;

// Long enough for a loaded machine; every wait ends as soon as its
// condition holds.
constexpr std::chrono::seconds kWait{20};

// A port held by this test until Release(). Bound but not listening, it
// refuses connections; after Listen(), it accepts each connection and closes
// it at once (a coordinator that is down), counting them.
class ReservedPort {
 public:
  ReservedPort() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    // Inherited by the accepted connections, so that their TIME_WAIT and
    // FIN_WAIT states do not keep the real server from binding the port.
    const int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    socklen_t len = sizeof(addr);
    if (fd_ >= 0 &&
        ::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
      port_ = ntohs(addr.sin_port);
    }
  }
  ~ReservedPort() { Release(); }

  void Listen() {
    ASSERT_EQ(::listen(fd_, 16), 0);
    acceptor_ = std::thread([this] {
      while (true) {
        const int conn = ::accept(fd_, nullptr, nullptr);
        if (conn < 0) return;  // Release() shut the socket down
        ::close(conn);
        std::lock_guard<std::mutex> lock(mu_);
        ++accepted_;
        cv_.notify_all();
      }
    });
  }
  // Waits until `n` connections were refused this way.
  bool WaitForAttempts(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, kWait, [&] { return accepted_ >= n; });
  }
  void Release() {
    if (fd_ < 0) return;
    ::shutdown(fd_, SHUT_RDWR);  // wakes accept()
    if (acceptor_.joinable()) acceptor_.join();
    ::close(fd_);
    fd_ = -1;
  }
  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::thread acceptor_;
  std::mutex mu_;
  std::condition_variable cv_;
  int accepted_ = 0;
};

MetricsReporterOptions Options(const std::string& address) {
  MetricsReporterOptions o;
  o.coordinator = address;
  o.job_id = "job-42";
  o.attempt = 3;
  o.rank = 1;
  // No heartbeat in the way of the samples unless a test asks for them.
  o.heartbeat_interval = milliseconds(60000);
  o.initial_backoff = milliseconds(20);
  o.max_backoff = milliseconds(100);
  o.close_timeout = milliseconds(5000);
  return o;
}

// Distinct values in every field.
StepReport Sample(int64_t step) {
  StepReport r;
  r.rank = 1;
  r.step = step;
  r.epoch = 0.25 * step;
  r.fraction = 0.001 * step;
  r.loss = 9.5 - 0.01 * step;
  r.learning_rate = 0.03 + step;
  r.images_per_second = 1234.5 + step;
  r.data_seconds = 0.011;
  r.forward_seconds = 0.022;
  r.backward_seconds = 0.033;
  r.communication_seconds = 0.044;
  r.optimizer_seconds = 0.055;
  r.positive_logit_mean = 0.61;
  r.negative_logit_mean = -0.02;
  r.feature_std_mean = 0.088;
  r.feature_std_min = 0.017;
  r.queue_staleness_steps = 7 + step;
  r.knn_top1 = step % 2 == 0 ? 0.75 : -1;
  r.eta_seconds = 100.0 / step;
  return r;
}

void ExpectSample(const v1::MetricSample& s, const StepReport& r) {
  EXPECT_EQ(s.rank(), r.rank);
  EXPECT_EQ(s.step(), r.step);
  EXPECT_EQ(s.epoch(), r.epoch);
  EXPECT_EQ(s.fraction(), r.fraction);
  EXPECT_EQ(s.loss(), r.loss);
  EXPECT_EQ(s.learning_rate(), r.learning_rate);
  EXPECT_EQ(s.images_per_second(), r.images_per_second);
  EXPECT_EQ(s.data_seconds(), r.data_seconds);
  EXPECT_EQ(s.forward_seconds(), r.forward_seconds);
  EXPECT_EQ(s.backward_seconds(), r.backward_seconds);
  EXPECT_EQ(s.communication_seconds(), r.communication_seconds);
  EXPECT_EQ(s.optimizer_seconds(), r.optimizer_seconds);
  EXPECT_EQ(s.positive_logit_mean(), r.positive_logit_mean);
  EXPECT_EQ(s.negative_logit_mean(), r.negative_logit_mean);
  EXPECT_EQ(s.feature_std_mean(), r.feature_std_mean);
  EXPECT_EQ(s.feature_std_min(), r.feature_std_min);
  EXPECT_EQ(s.queue_staleness_steps(), r.queue_staleness_steps);
  EXPECT_EQ(s.knn_top1(), r.knn_top1);
  EXPECT_EQ(s.eta_seconds(), r.eta_seconds);
}

void ExpectHello(const v1::WorkerReport& m) {
  ASSERT_EQ(m.report_case(), v1::WorkerReport::kHello);
  EXPECT_EQ(m.hello().job_id(), "job-42");
  EXPECT_EQ(m.hello().attempt(), 3);
  EXPECT_EQ(m.hello().rank(), 1);
}

TEST(MetricsReporterTest, SendsHelloThenEachReportFieldByField) {
  FakeCoordinator server;
  ASSERT_TRUE(server.ok());
  MetricsReporter reporter(Options(server.address()));
  const std::vector<StepReport> sent = {Sample(1), Sample(2), Sample(3)};
  for (const auto& r : sent) reporter.Report(r);
  ASSERT_TRUE(server.service().WaitFor(
      [](const auto& streams, int) { return CountMetrics(streams) >= 3; }));
  auto streams = server.service().streams();
  ASSERT_EQ(streams.size(), 1u);
  ExpectHello(streams[0][0]);
  auto metrics = Metrics(streams[0]);
  ASSERT_EQ(metrics.size(), 3u);
  for (size_t i = 0; i < sent.size(); ++i) {
    SCOPED_TRACE(i);
    ExpectSample(metrics[i], sent[i]);
  }
  reporter.Close();
  EXPECT_EQ(reporter.sent(), 3);
  EXPECT_EQ(reporter.dropped(), 0);
}

TEST(MetricsReporterTest, ConvertsEveryFieldOfAStepReport) {
  ExpectSample(ToMetricSample(Sample(5)), Sample(5));
  StepReport defaults;
  v1::MetricSample s = ToMetricSample(defaults);
  EXPECT_EQ(s.knn_top1(), -1);
  EXPECT_EQ(s.eta_seconds(), -1);
}

TEST(MetricsReporterTest, SendsHeartbeatsWhenIdle) {
  FakeCoordinator server;
  ASSERT_TRUE(server.ok());
  MetricsReporterOptions o = Options(server.address());
  o.heartbeat_interval = milliseconds(30);
  const auto before = std::chrono::system_clock::now();
  MetricsReporter reporter(o);
  ASSERT_TRUE(server.service().WaitFor([](const auto& streams, int) {
    return !streams.empty() && streams[0].size() >= 4;
  }));
  auto stream = server.service().streams()[0];
  ExpectHello(stream[0]);
  int64_t last_ns = 0;
  for (size_t i = 1; i < 4; ++i) {
    ASSERT_EQ(stream[i].report_case(), v1::WorkerReport::kHeartbeat);
    const auto& t = stream[i].heartbeat();
    const int64_t ns = t.seconds() * 1000000000 + t.nanos();
    EXPECT_GE(ns, std::chrono::duration_cast<std::chrono::nanoseconds>(
                      before.time_since_epoch())
                      .count());
    EXPECT_GT(ns, last_ns);
    last_ns = ns;
  }
}

TEST(MetricsReporterTest, CloseFlushesTheQueueAndFinishesTheStream) {
  FakeCoordinator server;
  ASSERT_TRUE(server.ok());
  MetricsReporter reporter(Options(server.address()));
  for (int64_t step = 1; step <= 20; ++step) reporter.Report(Sample(step));
  reporter.Close();
  // Close() returned after the stream ended: everything is there.
  ASSERT_TRUE(server.service().WaitFor(
      [](const auto&, int finished) { return finished == 1; }));
  auto streams = server.service().streams();
  ASSERT_EQ(streams.size(), 1u);
  auto metrics = Metrics(streams[0]);
  ASSERT_EQ(metrics.size(), 20u);
  for (int64_t step = 1; step <= 20; ++step) {
    EXPECT_EQ(metrics[step - 1].step(), step);
  }
  EXPECT_EQ(reporter.sent(), 20);
  reporter.Close();             // idempotent
  reporter.Report(Sample(21));  // ignored after Close()
  EXPECT_EQ(reporter.sent(), 20);
}

// Reporting to a coordinator that is down returns at once and keeps the
// newest reports; once it comes up (on a port reserved beforehand), the
// reporter connects and delivers them.
TEST(MetricsReporterTest, DoesNotBlockWhileDownAndDeliversOnceUp) {
  ReservedPort port;
  ASSERT_GT(port.port(), 0);
  port.Listen();
  MetricsReporterOptions o = Options(port.address());
  o.max_queued = 8;
  MetricsReporter reporter(o);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t step = 1; step <= 1000; ++step) reporter.Report(Sample(step));
  const auto took = std::chrono::steady_clock::now() - start;
  // 1000 queue operations; a blocking one would wait for a connection.
  EXPECT_LT(took, std::chrono::seconds(1));
  // The reporter has tried and failed, and retried.
  ASSERT_TRUE(port.WaitForAttempts(2));
  EXPECT_EQ(reporter.dropped(), 1000 - 8);
  EXPECT_EQ(reporter.sent(), 0);

  port.Release();
  FakeCoordinator server(port.port());
  ASSERT_TRUE(server.ok());
  ASSERT_EQ(server.port(), port.port());
  ASSERT_TRUE(server.service().WaitFor(
      [](const auto& streams, int) { return CountMetrics(streams) >= 8; }));
  auto streams = server.service().streams();
  ASSERT_EQ(streams.size(), 1u);
  ExpectHello(streams[0][0]);
  auto metrics = Metrics(streams[0]);
  ASSERT_EQ(metrics.size(), 8u);
  for (int64_t i = 0; i < 8; ++i) {
    ExpectSample(metrics[i], Sample(993 + i));  // the newest eight
  }
  reporter.Close();
  EXPECT_EQ(reporter.sent(), 8);
}

// When the stream breaks the reporter notices (its heartbeats fail),
// reconnects, says hello again and goes on. (Reports written just before a
// break can be lost: the stream has no acknowledgements. Those queued while
// no stream is open are not; see DoesNotBlockWhileDownAndDeliversOnceUp.)
TEST(MetricsReporterTest, ReconnectsWithHelloAfterTheCoordinatorRestarts) {
  auto first = std::make_unique<FakeCoordinator>();
  ASSERT_TRUE(first->ok());
  const int port = first->port();
  MetricsReporterOptions o = Options(first->address());
  o.heartbeat_interval = milliseconds(20);
  MetricsReporter reporter(o);
  reporter.Report(Sample(1));
  ASSERT_TRUE(first->service().WaitFor(
      [](const auto& streams, int) { return CountMetrics(streams) == 1; }));
  first->Shutdown();
  first.reset();

  FakeCoordinator second(port);
  ASSERT_TRUE(second.ok());
  ASSERT_TRUE(second.service().WaitFor([](const auto& streams, int) {
    return !streams.empty() && !streams[0].empty();
  }));
  for (int64_t step = 2; step <= 4; ++step) reporter.Report(Sample(step));
  ASSERT_TRUE(second.service().WaitFor(
      [](const auto& streams, int) { return CountMetrics(streams) >= 3; }));
  reporter.Close();
  auto streams = second.service().streams();
  ASSERT_EQ(streams.size(), 1u);
  ExpectHello(streams[0][0]);
  std::vector<int64_t> steps;
  for (const auto& m : Metrics(streams[0])) steps.push_back(m.step());
  EXPECT_EQ(steps, (std::vector<int64_t>{2, 3, 4}));
}

TEST(MetricsReporterTest, CloseGivesUpWithinItsTimeoutWhenTheServerIsDown) {
  ReservedPort port;  // refuses connections
  ASSERT_GT(port.port(), 0);
  MetricsReporterOptions o = Options(port.address());
  o.close_timeout = milliseconds(200);
  MetricsReporter reporter(o);
  reporter.Report(Sample(1));
  reporter.Report(Sample(2));
  const auto start = std::chrono::steady_clock::now();
  reporter.Close();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
  EXPECT_EQ(reporter.dropped(), 2);
  EXPECT_EQ(reporter.sent(), 0);
}

TEST(MetricsReporterTest, CloseWithNothingQueuedDoesNotWaitOutTheBackoff) {
  ReservedPort port;  // refuses connections
  ASSERT_GT(port.port(), 0);
  MetricsReporterOptions o = Options(port.address());
  o.initial_backoff = milliseconds(10000);
  o.max_backoff = milliseconds(10000);
  o.close_timeout = milliseconds(10000);
  MetricsReporter reporter(o);
  const auto start = std::chrono::steady_clock::now();
  reporter.Close();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  EXPECT_EQ(reporter.dropped(), 0);
}

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value != nullptr) {
      ::setenv(name, value, 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_.has_value()) {
      ::setenv(name_, old_->c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(MetricsReporterTest, OptionsFromEnvNeedAllThreeVariables) {
  {
    ScopedEnv a("MOMENTUM_COORDINATOR", nullptr);
    ScopedEnv b("MOMENTUM_JOB_ID", nullptr);
    ScopedEnv c("MOMENTUM_ATTEMPT", nullptr);
    auto none = MetricsReporterOptionsFromEnv(0);
    ASSERT_TRUE(none.ok()) << none.status();
    EXPECT_FALSE(none->has_value());
  }
  {
    ScopedEnv a("MOMENTUM_COORDINATOR", "10.1.2.3:7070");
    ScopedEnv b("MOMENTUM_JOB_ID", "j-7");
    ScopedEnv c("MOMENTUM_ATTEMPT", "2");
    auto all = MetricsReporterOptionsFromEnv(5);
    ASSERT_TRUE(all.ok()) << all.status();
    ASSERT_TRUE(all->has_value());
    EXPECT_EQ((*all)->coordinator, "10.1.2.3:7070");
    EXPECT_EQ((*all)->job_id, "j-7");
    EXPECT_EQ((*all)->attempt, 2);
    EXPECT_EQ((*all)->rank, 5);
  }
  {
    ScopedEnv a("MOMENTUM_COORDINATOR", "10.1.2.3:7070");
    ScopedEnv b("MOMENTUM_JOB_ID", nullptr);
    ScopedEnv c("MOMENTUM_ATTEMPT", "2");
    auto partial = MetricsReporterOptionsFromEnv(0);
    ASSERT_FALSE(partial.ok());
    EXPECT_EQ(partial.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(partial.status().message().find("MOMENTUM_JOB_ID"),
              std::string::npos)
        << partial.status();
  }
  {
    ScopedEnv a("MOMENTUM_COORDINATOR", "10.1.2.3:7070");
    ScopedEnv b("MOMENTUM_JOB_ID", "j-7");
    ScopedEnv c("MOMENTUM_ATTEMPT", "two");
    auto bad = MetricsReporterOptionsFromEnv(0);
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.status().message().find("MOMENTUM_ATTEMPT"),
              std::string::npos)
        << bad.status();
  }
}

}  // namespace
}  // namespace momentum::worker
