// The coordinator's /metrics: series per job and rank from samples, and the
// removal of a finished job's series after the retention period.
#include "server/server_metrics.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "tests/http_get.h"

namespace momentum::server {
namespace {

using ::momentum::testing::HttpGet;

v1::MetricSample Sample(int rank, double loss) {
  v1::MetricSample s;
  s.set_rank(rank);
  s.set_step(7);
  s.set_loss(loss);
  s.set_forward_seconds(0.25);
  s.set_knn_top1(-1);
  s.set_eta_seconds(-1);
  return s;
}

std::string Scrape(const ServerMetrics& m) {
  auto body = HttpGet(m.port(), "/metrics");
  EXPECT_TRUE(body.has_value());
  return body.value_or("");
}

TEST(ServerMetricsTest, SeriesPerJobAndRankWithTheSampledValues) {
  auto m = ServerMetrics::Create("127.0.0.1:0", std::chrono::seconds(300));
  ASSERT_TRUE(m.ok()) << m.status();
  (*m)->OnSample("job-1", Sample(0, 4.5));
  (*m)->OnSample("job-1", Sample(1, 3.25));
  const std::string text = Scrape(**m);
  EXPECT_NE(text.find("momentum_train_loss{job_id=\"job-1\",rank=\"0\"} 4.5"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("momentum_train_loss{job_id=\"job-1\",rank=\"1\"} 3.25"),
            std::string::npos);
  EXPECT_NE(text.find("momentum_train_step_phase_seconds{job_id=\"job-1\","
                      "phase=\"forward\",rank=\"1\"} 0.25"),
            std::string::npos)
      << text;
  // No kNN value yet (negative means none) and no ETA: no series.
  EXPECT_EQ(text.find("momentum_train_knn_top1_ratio{"), std::string::npos);
  EXPECT_EQ(text.find("momentum_train_eta_seconds{"), std::string::npos);
}

TEST(ServerMetricsTest, FinishedJobsSeriesGoAfterTheRetention) {
  auto m = ServerMetrics::Create("127.0.0.1:0", std::chrono::seconds(1));
  ASSERT_TRUE(m.ok()) << m.status();
  (*m)->OnSample("job-1", Sample(0, 4.5));
  (*m)->OnSample("job-2", Sample(0, 2.0));
  (*m)->JobEnded("job-1");
  EXPECT_NE(Scrape(**m).find("job_id=\"job-1\""), std::string::npos);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  (*m)->SetSlots(0, 2);  // any update expires what is due
  const std::string text = Scrape(**m);
  EXPECT_EQ(text.find("job_id=\"job-1\""), std::string::npos) << text;
  EXPECT_NE(text.find("momentum_train_loss{job_id=\"job-2\",rank=\"0\"} 2"),
            std::string::npos)
      << text;
}

// One state series per job: the current state at 1; PENDING after a later
// state is a late report of the submission and changes nothing; a final
// state starts the retention period.
TEST(ServerMetricsTest, JobStateIsOneSeriesForTheCurrentState) {
  auto m = ServerMetrics::Create("127.0.0.1:0", std::chrono::seconds(1));
  ASSERT_TRUE(m.ok()) << m.status();
  (*m)->SetJobState("job-1", v1::JOB_STATE_PENDING);
  EXPECT_NE(Scrape(**m).find(
                "momentum_job_state{job_id=\"job-1\",state=\"PENDING\"} 1"),
            std::string::npos);
  (*m)->SetJobState("job-1", v1::JOB_STATE_RUNNING);
  (*m)->SetJobState("job-1", v1::JOB_STATE_PENDING);
  std::string text = Scrape(**m);
  EXPECT_NE(
      text.find("momentum_job_state{job_id=\"job-1\",state=\"RUNNING\"} 1"),
      std::string::npos)
      << text;
  EXPECT_EQ(text.find("state=\"PENDING\"} 1\nmomentum_job_state"),
            std::string::npos);
  size_t series = 0;
  for (size_t at = text.find("momentum_job_state{"); at != std::string::npos;
       at = text.find("momentum_job_state{", at + 1)) {
    ++series;
  }
  EXPECT_EQ(series, 1u) << text;
  (*m)->SetJobState("job-1", v1::JOB_STATE_SUCCEEDED);
  EXPECT_NE(Scrape(**m).find("momentum_job_state{job_id=\"job-1\",state="
                             "\"SUCCEEDED\"} 1"),
            std::string::npos);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  (*m)->SetSlots(0, 2);
  EXPECT_EQ(Scrape(**m).find("momentum_job_state{"), std::string::npos);
}

// Slots and GPUs are each a used and a free series, at 0 from the start (a
// coordinator without GPUs shows 0 and 0), then as set.
TEST(ServerMetricsTest, SlotsAndGpusAreUsedAndFreeSeries) {
  auto m = ServerMetrics::Create("127.0.0.1:0", std::chrono::seconds(300));
  ASSERT_TRUE(m.ok()) << m.status();
  std::string text = Scrape(**m);
  for (const char* series : {"momentum_worker_slots{state=\"used\"} 0\n",
                             "momentum_worker_slots{state=\"free\"} 0\n",
                             "momentum_worker_gpus{state=\"used\"} 0\n",
                             "momentum_worker_gpus{state=\"free\"} 0\n"}) {
    EXPECT_NE(text.find(series), std::string::npos) << series << text;
  }
  (*m)->SetSlots(3, 1);
  (*m)->SetGpus(2, 6);
  text = Scrape(**m);
  for (const char* series : {"momentum_worker_slots{state=\"used\"} 3\n",
                             "momentum_worker_slots{state=\"free\"} 1\n",
                             "momentum_worker_gpus{state=\"used\"} 2\n",
                             "momentum_worker_gpus{state=\"free\"} 6\n"}) {
    EXPECT_NE(text.find(series), std::string::npos) << series << text;
  }
}

// Every method's request counter (code OK) and latency histogram exist
// before any call, at 0.
TEST(ServerMetricsTest, RpcSeriesExistBeforeTheFirstCall) {
  auto m = ServerMetrics::Create("127.0.0.1:0", std::chrono::seconds(300));
  ASSERT_TRUE(m.ok()) << m.status();
  const std::string text = Scrape(**m);
  for (const char* method :
       {"SubmitJob", "GetJob", "ListJobs", "CancelJob", "WatchJob",
        "GetJobLogs", "ReportMetrics", "AgentSession"}) {
    EXPECT_NE(text.find(absl::StrCat("momentum_rpc_requests_total{code=\"OK\","
                                     "method=\"",
                                     method, "\"} 0")),
              std::string::npos)
        << method << "\n"
        << text;
    EXPECT_NE(text.find(absl::StrCat("momentum_rpc_duration_seconds_count{"
                                     "method=\"",
                                     method, "\"} 0")),
              std::string::npos)
        << method;
  }
}

}  // namespace
}  // namespace momentum::server
