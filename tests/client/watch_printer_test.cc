// Tests of client/watch_printer.h: the text of `momentum watch` for a pipe
// and for a terminal, from hand-made event streams.
#include "client/watch_printer.h"

#include <sstream>
#include <string>

#include "gtest/gtest.h"

namespace momentum::client {
namespace {

namespace v1 = ::momentum::v1;

// 2024-05-01T12:00:00Z.
constexpr int64_t kNoon = 1714564800;

absl::Time T(double seconds) {
  return absl::FromUnixSeconds(kNoon) + absl::Seconds(seconds);
}

v1::WatchJobEvent Snapshot(v1::JobState state, const std::string& reason) {
  v1::WatchJobEvent event;
  v1::Job& job = *event.mutable_job();
  job.set_id("job-3");
  job.set_name("fashion-mnist");
  job.set_state(state);
  job.set_state_reason(reason);
  job.set_world_size(2);
  job.mutable_submit_time()->set_seconds(kNoon);
  job.mutable_progress()->set_eta_seconds(-1);
  job.mutable_progress()->set_knn_top1(-1);
  return event;
}

v1::WatchJobEvent Change(v1::JobState from, v1::JobState to,
                         const std::string& reason) {
  v1::WatchJobEvent event;
  event.mutable_state_change()->set_from(from);
  event.mutable_state_change()->set_to(to);
  event.mutable_state_change()->set_reason(reason);
  return event;
}

v1::WatchJobEvent Metric(int rank, int64_t step, double loss, double knn = -1) {
  v1::WatchJobEvent event;
  v1::MetricSample& sample = *event.mutable_metric();
  sample.set_rank(rank);
  sample.set_step(step);
  sample.set_epoch(step / 100.0);
  sample.set_fraction(step / 1000.0);
  sample.set_loss(loss);
  sample.set_images_per_second(500);
  sample.set_eta_seconds(1000 - step);
  sample.set_knn_top1(knn);
  return event;
}

v1::WatchJobEvent FinalSnapshot(v1::JobState state, const std::string& reason,
                                int64_t steps, double knn) {
  v1::WatchJobEvent event = Snapshot(state, reason);
  v1::Job& job = *event.mutable_job();
  job.mutable_start_time()->set_seconds(kNoon + 5);
  job.mutable_end_time()->set_seconds(kNoon + 5 + 3725);
  job.mutable_progress()->set_step(steps);
  job.mutable_progress()->set_epoch(steps / 100.0);
  job.mutable_progress()->set_fraction(1);
  job.mutable_progress()->set_knn_top1(knn);
  if (state == v1::JOB_STATE_SUCCEEDED) {
    job.set_export_path("/runs/job-3/backbone.pt");
  }
  return event;
}

TEST(WatchPrinterTest, PipeGetsStateLinesAndPacedProgress) {
  std::ostringstream out;
  WatchPrinter printer(out, WatchPrinterOptions());
  printer.OnEvent(Snapshot(v1::JOB_STATE_PENDING, "waiting for 2 slots"), T(0));
  printer.OnEvent(
      Change(v1::JOB_STATE_PENDING, v1::JOB_STATE_RUNNING, "launched 2 ranks"),
      T(1));
  printer.OnEvent(Metric(0, 100, 6.5), T(2));  // the first: printed
  printer.OnEvent(Metric(1, 100, 6.7), T(2));  // rank 1: not a progress line
  printer.OnEvent(Metric(0, 110, 6.4), T(3));  // within 5 s: not printed
  printer.OnEvent(Metric(0, 150, 6.1), T(6.9));
  printer.OnEvent(Metric(0, 160, 6.0, 0.25), T(7));  // 5 s after the first
  printer.OnEvent(Change(v1::JOB_STATE_RUNNING, v1::JOB_STATE_RESTARTING,
                         "rank 1 exited with code 1"),
                  T(8));
  printer.OnEvent(Change(v1::JOB_STATE_RESTARTING, v1::JOB_STATE_RUNNING,
                         "relaunched from step 100"),
                  T(9));
  printer.OnEvent(Metric(0, 200, 5.5), T(12.5));  // 5.5 s after the last
  EXPECT_FALSE(printer.Finished());
  printer.OnEvent(Change(v1::JOB_STATE_RUNNING, v1::JOB_STATE_SUCCEEDED,
                         "trained 10 epochs"),
                  T(13));
  EXPECT_TRUE(printer.Finished());
  printer.OnEvent(
      FinalSnapshot(v1::JOB_STATE_SUCCEEDED, "trained 10 epochs", 1000, 0.7134),
      T(13));
  printer.PrintSummary();

  EXPECT_EQ(out.str(),
            "job-3 PENDING: waiting for 2 slots\n"
            "job-3 PENDING -> RUNNING: launched 2 ranks\n"
            "RUNNING 10%  epoch 1.0 step 100 loss 6.50  500 img/s  ETA 15m00s\n"
            "RUNNING 16%  epoch 1.6 step 160 loss 6.00  500 img/s  ETA 14m00s"
            "  kNN 25.0%\n"
            "job-3 RUNNING -> RESTARTING: rank 1 exited with code 1\n"
            "job-3 RESTARTING -> RUNNING: relaunched from step 100\n"
            "RUNNING 20%  epoch 2.0 step 200 loss 5.50  500 img/s  ETA 13m20s"
            "  kNN 25.0%\n"
            "job-3 SUCCEEDED: trained 10 epochs\n"
            "  steps:     1000\n"
            "  kNN top-1: 71.3%\n"
            "  export:    /runs/job-3/backbone.pt\n"
            "  wall time: 1h02m\n");
}

TEST(WatchPrinterTest, KnnFromAnyRankButProgressFromRankZero) {
  std::ostringstream out;
  WatchPrinter printer(out, WatchPrinterOptions());
  printer.OnEvent(Snapshot(v1::JOB_STATE_RUNNING, ""), T(0));
  printer.OnEvent(Metric(1, 300, 5.0, 0.5), T(1));
  EXPECT_EQ(printer.job().progress().knn_top1(), 0.5);
  EXPECT_EQ(printer.job().progress().step(), 0);
  printer.OnEvent(Metric(0, 300, 4.0), T(2));
  EXPECT_EQ(printer.job().progress().step(), 300);
  EXPECT_EQ(printer.job().progress().loss(), 4.0);
  // A later sample without an evaluation keeps the last kNN.
  EXPECT_EQ(printer.job().progress().knn_top1(), 0.5);
  EXPECT_EQ(out.str(),
            "job-3 RUNNING\n"
            "RUNNING 30%  epoch 3.0 step 300 loss 4.00  500 img/s  ETA 11m40s"
            "  kNN 50.0%\n");
}

TEST(WatchPrinterTest, FailedJobEndsWithReason) {
  std::ostringstream out;
  WatchPrinter printer(out, WatchPrinterOptions());
  printer.OnEvent(Snapshot(v1::JOB_STATE_RUNNING, "launched 2 ranks"), T(0));
  printer.OnEvent(Change(v1::JOB_STATE_RUNNING, v1::JOB_STATE_FAILED,
                         "rank 1 exited with code 1: out of memory"),
                  T(1));
  printer.OnEvent(
      FinalSnapshot(v1::JOB_STATE_FAILED,
                    "rank 1 exited with code 1: out of memory", 40, -1),
      T(1));
  ASSERT_TRUE(printer.Finished());
  printer.PrintSummary();
  EXPECT_EQ(out.str(),
            "job-3 RUNNING: launched 2 ranks\n"
            "job-3 FAILED: rank 1 exited with code 1: out of memory\n"
            "  steps:     40\n"
            "  kNN top-1: -\n"
            "  export:    -\n"
            "  wall time: 1h02m\n");
}

TEST(WatchPrinterTest, JobThatHadEndedPrintsOnlyTheSummary) {
  std::ostringstream out;
  WatchPrinter printer(out, WatchPrinterOptions());
  printer.OnEvent(
      FinalSnapshot(v1::JOB_STATE_CANCELLED, "cancelled by request", 0, -1),
      T(0));
  ASSERT_TRUE(printer.Finished());
  printer.PrintSummary();
  EXPECT_EQ(out.str(),
            "job-3 CANCELLED: cancelled by request\n"
            "  steps:     0\n"
            "  kNN top-1: -\n"
            "  export:    -\n"
            "  wall time: 1h02m\n");
}

TEST(WatchPrinterTest, TerminalRedrawsOneLine) {
  std::ostringstream out;
  WatchPrinterOptions options;
  options.rewrite = true;
  WatchPrinter printer(out, options);
  printer.OnEvent(Snapshot(v1::JOB_STATE_RUNNING, "launched"), T(0));
  printer.OnEvent(Metric(0, 100, 6.5), T(0.1));
  printer.OnEvent(Metric(1, 100, 6.6), T(0.1));  // nothing changes
  printer.OnEvent(Metric(0, 110, 6.4), T(0.2));  // redrawn at once
  printer.OnEvent(
      Change(v1::JOB_STATE_RUNNING, v1::JOB_STATE_RESTARTING, "rank 1 lost"),
      T(1));
  printer.OnEvent(
      Change(v1::JOB_STATE_RESTARTING, v1::JOB_STATE_SUCCEEDED, "done"), T(2));
  printer.OnEvent(FinalSnapshot(v1::JOB_STATE_SUCCEEDED, "done", 110, 0.5),
                  T(2));
  printer.PrintSummary();
  EXPECT_EQ(out.str(),
            "job-3 RUNNING: launched\n"
            "\rRUNNING  waiting for the first report\x1b[K"
            "\rRUNNING 10%  epoch 1.0 step 100 loss 6.50  500 img/s  "
            "ETA 15m00s\x1b[K"
            "\rRUNNING 11%  epoch 1.1 step 110 loss 6.40  500 img/s  "
            "ETA 14m50s\x1b[K"
            // The state line replaces the progress line, which comes back
            // under it.
            "\r\x1b[Kjob-3 RUNNING -> RESTARTING: rank 1 lost\n"
            "\rRESTARTING 11%  epoch 1.1 step 110 loss 6.40  500 img/s  "
            "ETA 14m50s\x1b[K"
            // The last line stays, with the final state, then the summary.
            "\rSUCCEEDED 100%  epoch 1.1 step 110 loss 0.00  kNN 50.0%\x1b[K\n"
            "job-3 SUCCEEDED: done\n"
            "  steps:     110\n"
            "  kNN top-1: 50.0%\n"
            "  export:    /runs/job-3/backbone.pt\n"
            "  wall time: 1h02m\n");
}

TEST(WatchPrinterTest, TerminalLineIsCutToTheWidth) {
  std::ostringstream out;
  WatchPrinterOptions options;
  options.rewrite = true;
  options.width = 20;
  WatchPrinter printer(out, options);
  printer.OnEvent(Snapshot(v1::JOB_STATE_RUNNING, ""), T(0));
  printer.OnEvent(Metric(0, 100, 6.5), T(1));
  EXPECT_EQ(out.str(),
            "job-3 RUNNING\n"
            "\rRUNNING  waiting fo\x1b[K"
            "\rRUNNING 10%  epoch \x1b[K");
}

TEST(WatchPrinterTest, EndLineFinishesOnlyADrawnLine) {
  std::ostringstream out;
  WatchPrinterOptions options;
  options.rewrite = true;
  WatchPrinter printer(out, options);
  printer.EndLine();
  EXPECT_EQ(out.str(), "");
  printer.OnEvent(Snapshot(v1::JOB_STATE_PENDING, ""), T(0));
  printer.EndLine();
  printer.EndLine();
  EXPECT_EQ(out.str(), "job-3 PENDING\n\rPENDING\x1b[K\n");

  std::ostringstream pipe;
  WatchPrinter pipe_printer(pipe, WatchPrinterOptions());
  pipe_printer.OnEvent(Snapshot(v1::JOB_STATE_PENDING, ""), T(0));
  pipe_printer.EndLine();
  EXPECT_EQ(pipe.str(), "job-3 PENDING\n");
}

// Reasons and notices come from ranks and other users: their control
// characters are printed as visible escapes, never sent to the terminal.
TEST(WatchPrinterTest, ReasonsAndNoticesAreEscaped) {
  std::ostringstream out;
  WatchPrinter printer(out, WatchPrinterOptions());
  printer.OnEvent(Snapshot(v1::JOB_STATE_PENDING, "waiting \x1b[2J"), T(0));
  printer.OnEvent(Change(v1::JOB_STATE_PENDING, v1::JOB_STATE_RUNNING,
                         "launched\x1b]0;owned\a"),
                  T(1));
  v1::WatchJobEvent notice;
  notice.mutable_notice()->set_kind("straggler");
  notice.mutable_notice()->set_rank(1);
  notice.mutable_notice()->set_message("rank 1 \x1b[5mslow\x9b");
  printer.OnEvent(notice, T(2));
  EXPECT_EQ(out.str(),
            "job-3 PENDING: waiting \\x1b[2J\n"
            "job-3 PENDING -> RUNNING: launched\\x1b]0;owned\\x07\n"
            "job-3 rank 1 \\x1b[5mslow\\x9b\n");
}

TEST(WatchPrinterTest, LogEventsAreIgnored) {
  std::ostringstream out;
  WatchPrinter printer(out, WatchPrinterOptions());
  v1::WatchJobEvent log;
  log.mutable_log()->set_text("hello");
  printer.OnEvent(log, T(0));
  EXPECT_EQ(out.str(), "");
  EXPECT_FALSE(printer.Finished());
}

}  // namespace
}  // namespace momentum::client
