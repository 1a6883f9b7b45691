// Tests of client/format.h: every expected string is written out by hand.
#include "client/format.h"

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace momentum::client {
namespace {

// 2024-05-01T12:00:00Z.
constexpr int64_t kNoon = 1714564800;

google::protobuf::Timestamp At(int64_t seconds) {
  google::protobuf::Timestamp time;
  time.set_seconds(seconds);
  return time;
}

v1::Job RunningJob() {
  v1::Job job;
  job.set_id("job-3");
  job.set_name("fashion-mnist");
  job.set_state(v1::JOB_STATE_RUNNING);
  job.set_state_reason("launched 2 ranks");
  job.set_priority(5);
  job.set_world_size(2);
  *job.mutable_submit_time() = At(kNoon);
  *job.mutable_start_time() = At(kNoon + 10);
  v1::JobProgress& progress = *job.mutable_progress();
  progress.set_epoch(3.26);
  progress.set_step(700);
  progress.set_fraction(0.326);
  progress.set_loss(4.8149);
  progress.set_learning_rate(0.03);
  progress.set_images_per_second(1250.4);
  progress.set_eta_seconds(185);
  progress.set_knn_top1(0.7134);
  return job;
}

TEST(StateNameTest, NamesEveryState) {
  EXPECT_EQ(StateName(v1::JOB_STATE_PENDING), "PENDING");
  EXPECT_EQ(StateName(v1::JOB_STATE_RUNNING), "RUNNING");
  EXPECT_EQ(StateName(v1::JOB_STATE_RESTARTING), "RESTARTING");
  EXPECT_EQ(StateName(v1::JOB_STATE_SUCCEEDED), "SUCCEEDED");
  EXPECT_EQ(StateName(v1::JOB_STATE_FAILED), "FAILED");
  EXPECT_EQ(StateName(v1::JOB_STATE_CANCELLED), "CANCELLED");
  EXPECT_EQ(StateName(v1::JOB_STATE_UNSPECIFIED), "UNSPECIFIED");
  EXPECT_EQ(StateName(static_cast<v1::JobState>(42)), "UNSPECIFIED");
}

TEST(ParseStateTest, IgnoresCaseAndPrefix) {
  EXPECT_EQ(ParseState("running"), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(ParseState("RUNNING"), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(ParseState("Pending"), v1::JOB_STATE_PENDING);
  EXPECT_EQ(ParseState("job_state_restarting"), v1::JOB_STATE_RESTARTING);
  EXPECT_EQ(ParseState("JOB_STATE_SUCCEEDED"), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(ParseState(" failed "), v1::JOB_STATE_FAILED);
  EXPECT_EQ(ParseState("cancelled"), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(ParseState("canceled"), v1::JOB_STATE_CANCELLED);
}

TEST(ParseStateTest, RejectsUnknownNamesAndUnspecified) {
  EXPECT_EQ(ParseState(""), std::nullopt);
  EXPECT_EQ(ParseState("run"), std::nullopt);
  EXPECT_EQ(ParseState("runningx"), std::nullopt);
  EXPECT_EQ(ParseState("unspecified"), std::nullopt);
  EXPECT_EQ(ParseState("JOB_STATE_UNSPECIFIED"), std::nullopt);
  EXPECT_EQ(ParseState("job_state_"), std::nullopt);
  EXPECT_EQ(ParseState("2"), std::nullopt);
}

TEST(StateNamesForHelpTest, ListsUserStatesInLifecycleOrder) {
  EXPECT_EQ(StateNamesForHelp(),
            "pending, running, restarting, succeeded, failed, cancelled");
}

TEST(IsFinalStateTest, OnlySucceededFailedCancelled) {
  EXPECT_FALSE(IsFinalState(v1::JOB_STATE_UNSPECIFIED));
  EXPECT_FALSE(IsFinalState(v1::JOB_STATE_PENDING));
  EXPECT_FALSE(IsFinalState(v1::JOB_STATE_RUNNING));
  EXPECT_FALSE(IsFinalState(v1::JOB_STATE_RESTARTING));
  EXPECT_TRUE(IsFinalState(v1::JOB_STATE_SUCCEEDED));
  EXPECT_TRUE(IsFinalState(v1::JOB_STATE_FAILED));
  EXPECT_TRUE(IsFinalState(v1::JOB_STATE_CANCELLED));
}

TEST(FormatDurationTest, SecondsOnlyBelowAMinute) {
  EXPECT_EQ(FormatDuration(0), "0s");
  EXPECT_EQ(FormatDuration(0.4), "0s");
  EXPECT_EQ(FormatDuration(12), "12s");
  EXPECT_EQ(FormatDuration(59.9), "59s");
}

TEST(FormatDurationTest, MinutesAndPaddedSeconds) {
  EXPECT_EQ(FormatDuration(60), "1m00s");
  EXPECT_EQ(FormatDuration(185), "3m05s");
  EXPECT_EQ(FormatDuration(3599), "59m59s");
}

TEST(FormatDurationTest, HoursAndPaddedMinutes) {
  EXPECT_EQ(FormatDuration(3600), "1h00m");
  EXPECT_EQ(FormatDuration(3720), "1h02m");
  EXPECT_EQ(FormatDuration(3779), "1h02m");
  EXPECT_EQ(FormatDuration(86399), "23h59m");
}

TEST(FormatDurationTest, DaysAndPaddedHours) {
  EXPECT_EQ(FormatDuration(86400), "1d00h");
  EXPECT_EQ(FormatDuration(86400 + 3 * 3600 + 59 * 60), "1d03h");
  EXPECT_EQ(FormatDuration(12 * 86400 + 23 * 3600), "12d23h");
}

TEST(FormatDurationTest, NegativeAndNonFiniteAreUnknown) {
  EXPECT_EQ(FormatDuration(-1), "-");
  EXPECT_EQ(FormatDuration(-0.001), "-");
  EXPECT_EQ(FormatDuration(std::nan("")), "-");
  EXPECT_EQ(FormatDuration(std::numeric_limits<double>::infinity()), "-");
  EXPECT_EQ(FormatDuration(1e300), "-");
}

TEST(FormatPercentTest, OneDecimal) {
  EXPECT_EQ(FormatPercent(0.7134), "71.3%");
  EXPECT_EQ(FormatPercent(0.7136), "71.4%");
  EXPECT_EQ(FormatPercent(0), "0.0%");
  EXPECT_EQ(FormatPercent(1), "100.0%");
}

TEST(FormatPercentTest, NegativeIsNotMeasured) {
  EXPECT_EQ(FormatPercent(-1), "-");
  EXPECT_EQ(FormatPercent(std::nan("")), "-");
}

TEST(FormatTimestampTest, UtcToTheSecond) {
  google::protobuf::Timestamp time = At(kNoon + 3);
  time.set_nanos(999999999);
  EXPECT_EQ(FormatTimestamp(time), "2024-05-01T12:00:03Z");
  EXPECT_EQ(FormatTimestamp(google::protobuf::Timestamp()), "-");
}

TEST(ToTimeTest, UnsetIsNullopt) {
  EXPECT_EQ(ToTime(google::protobuf::Timestamp()), std::nullopt);
  google::protobuf::Timestamp time = At(kNoon);
  time.set_nanos(500000000);
  EXPECT_EQ(ToTime(time), absl::FromUnixMillis(kNoon * 1000 + 500));
}

TEST(FormatProgressTest, EpochStepLoss) {
  EXPECT_EQ(FormatProgress(RunningJob().progress()),
            "epoch 3.2 step 700 loss 4.81");
}

TEST(FormatProgressTest, EpochIsRoundedDown) {
  v1::JobProgress progress;
  progress.set_epoch(3.96);
  progress.set_step(1);
  progress.set_loss(10.006);
  EXPECT_EQ(FormatProgress(progress), "epoch 3.9 step 1 loss 10.01");
  progress.set_epoch(0.3);
  EXPECT_EQ(FormatProgress(progress), "epoch 0.3 step 1 loss 10.01");
}

TEST(FormatProgressTest, DashBeforeFirstReport) {
  EXPECT_EQ(FormatProgress(v1::JobProgress()), "-");
}

TEST(FormatProgressLineTest, EverythingKnown) {
  EXPECT_EQ(FormatProgressLine(RunningJob()),
            "RUNNING 32%  epoch 3.2 step 700 loss 4.81  1250 img/s  "
            "ETA 3m05s  kNN 71.3%");
}

TEST(FormatProgressLineTest, LeavesOutUnknownEtaAndKnn) {
  v1::Job job = RunningJob();
  job.mutable_progress()->set_eta_seconds(-1);
  job.mutable_progress()->set_knn_top1(-1);
  job.mutable_progress()->set_fraction(0.29);
  EXPECT_EQ(FormatProgressLine(job),
            "RUNNING 29%  epoch 3.2 step 700 loss 4.81  1250 img/s");
}

TEST(FormatProgressLineTest, NoEtaOnceEnded) {
  v1::Job job = RunningJob();
  job.set_state(v1::JOB_STATE_SUCCEEDED);
  job.mutable_progress()->set_fraction(1.0);
  EXPECT_EQ(FormatProgressLine(job),
            "SUCCEEDED 100%  epoch 3.2 step 700 loss 4.81  1250 img/s  "
            "kNN 71.3%");
}

TEST(FormatProgressLineTest, BeforeFirstReport) {
  v1::Job job;
  job.set_id("job-4");
  job.set_state(v1::JOB_STATE_PENDING);
  job.set_queue_position(2);
  EXPECT_EQ(FormatProgressLine(job), "PENDING  queue position 2");
  job.set_queue_position(0);
  EXPECT_EQ(FormatProgressLine(job), "PENDING");
  job.set_state(v1::JOB_STATE_RUNNING);
  EXPECT_EQ(FormatProgressLine(job), "RUNNING  waiting for the first report");
  job.set_state(v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(FormatProgressLine(job), "CANCELLED");
}

TEST(FormatAgeOrDurationTest, AgeSinceSubmissionWhileActive) {
  v1::Job job = RunningJob();
  EXPECT_EQ(FormatAgeOrDuration(job, absl::FromUnixSeconds(kNoon + 65)),
            "1m05s");
  // A client clock behind the server's.
  EXPECT_EQ(FormatAgeOrDuration(job, absl::FromUnixSeconds(kNoon - 5)), "0s");
  job.clear_submit_time();
  EXPECT_EQ(FormatAgeOrDuration(job, absl::FromUnixSeconds(kNoon)), "-");
}

TEST(FormatAgeOrDurationTest, RunTimeOnceEnded) {
  v1::Job job = RunningJob();
  job.set_state(v1::JOB_STATE_SUCCEEDED);
  *job.mutable_end_time() = At(kNoon + 10 + 3725);
  // Whatever the time now.
  EXPECT_EQ(FormatAgeOrDuration(job, absl::FromUnixSeconds(kNoon + 99999)),
            "1h02m");
  EXPECT_EQ(FormatWallTime(job), "1h02m");
}

TEST(FormatAgeOrDurationTest, FromSubmissionWhenNeverStarted) {
  v1::Job job;
  job.set_state(v1::JOB_STATE_CANCELLED);
  *job.mutable_submit_time() = At(kNoon);
  *job.mutable_end_time() = At(kNoon + 42);
  EXPECT_EQ(FormatAgeOrDuration(job, absl::FromUnixSeconds(kNoon + 999)),
            "42s");
  job.clear_end_time();
  EXPECT_EQ(FormatWallTime(job), "-");
}

TEST(RenderTableTest, AlignsColumnsWithTwoSpaces) {
  EXPECT_EQ(RenderTable({"A", "LONGER", "C"},
                        {{"xxxx", "1", "end"}, {"y", "22", "e"}}),
            "A     LONGER  C\n"
            "xxxx  1       end\n"
            "y     22      e\n");
}

TEST(RenderTableTest, NoTrailingSpacesAndShortRowsPadded) {
  EXPECT_EQ(RenderTable({"ID", "NAME"}, {{"job-1", ""}, {"job-10"}}),
            "ID      NAME\n"
            "job-1\n"
            "job-10\n");
}

TEST(RenderTableTest, CountsCodePointsNotBytes) {
  EXPECT_EQ(RenderTable({"NAME", "X"}, {{"caf\xc3\xa9s", "1"}, {"ab", "2"}}),
            "NAME   X\n"
            "caf\xc3\xa9s  1\n"
            "ab     2\n");
}

TEST(RenderTableTest, HeaderOnly) {
  EXPECT_EQ(RenderTable({"ID", "NAME"}, {}), "ID  NAME\n");
}

TEST(RenderTableTest, JobRows) {
  v1::Job running = RunningJob();
  v1::Job pending;
  pending.set_id("job-12");
  pending.set_name("r50");
  pending.set_state(v1::JOB_STATE_PENDING);
  pending.set_world_size(8);
  pending.set_queue_position(1);
  *pending.mutable_submit_time() = At(kNoon + 3600);
  pending.mutable_progress()->set_knn_top1(-1);
  v1::Job failed;
  failed.set_id("job-1");
  failed.set_state(v1::JOB_STATE_FAILED);
  failed.set_priority(-1);
  failed.set_world_size(1);
  *failed.mutable_submit_time() = At(kNoon - 100);
  *failed.mutable_start_time() = At(kNoon - 90);
  *failed.mutable_end_time() = At(kNoon - 78);
  failed.mutable_progress()->set_epoch(0.01);
  failed.mutable_progress()->set_step(3);
  failed.mutable_progress()->set_loss(9.2);
  failed.mutable_progress()->set_knn_top1(-1);

  const absl::Time now = absl::FromUnixSeconds(kNoon + 2 * 3600 + 5 * 60);
  EXPECT_EQ(
      RenderTable(JobTableHeader(), {JobRow(pending, now), JobRow(running, now),
                                     JobRow(failed, now)}),
      "ID      NAME           STATE    PRIORITY  RANKS  QUEUE  PROGRESS      "
      "                KNN    AGE/DURATION\n"
      "job-12  r50            PENDING  0         8      1      -             "
      "                -      1h05m\n"
      "job-3   fashion-mnist  RUNNING  5         2      -      epoch 3.2 step "
      "700 loss 4.81  71.3%  2h05m\n"
      "job-1   -              FAILED   -1        1      -      epoch 0.0 step "
      "3 loss 9.20    -      12s\n");
}

TEST(RenderKeyValuesTest, AlignsValuesAfterLongestKey) {
  EXPECT_EQ(RenderKeyValues({{"id", "job-3"}, {"state_reason", "x"}}),
            "id:           job-3\n"
            "state_reason: x\n");
  EXPECT_EQ(RenderKeyValues({{"a", "1"}, {"bcd", ""}}, "  "),
            "  a:   1\n"
            "  bcd:\n");
}

TEST(JobFieldsTest, EveryFieldButTheSpec) {
  v1::Job job = RunningJob();
  job.set_output_dir("/var/lib/momentum/jobs/job-3");
  job.set_spec_yaml("name: fashion-mnist\n");
  job.set_restarts(1);
  job.set_owner("alice");
  EXPECT_EQ(RenderKeyValues(JobFields(job)),
            "id:                         job-3\n"
            "name:                       fashion-mnist\n"
            "owner:                      alice\n"
            "state:                      RUNNING\n"
            "state_reason:               launched 2 ranks\n"
            "priority:                   5\n"
            "world_size:                 2\n"
            "queue_position:             -\n"
            "output_dir:                 /var/lib/momentum/jobs/job-3\n"
            "submit_time:                2024-05-01T12:00:00Z\n"
            "start_time:                 2024-05-01T12:00:10Z\n"
            "end_time:                   -\n"
            "restarts:                   1\n"
            "progress.epoch:             3.26\n"
            "progress.step:              700\n"
            "progress.fraction:          32.6%\n"
            "progress.loss:              4.8149\n"
            "progress.learning_rate:     0.03\n"
            "progress.images_per_second: 1250.4\n"
            "progress.eta_seconds:       3m05s\n"
            "progress.knn_top1:          71.3%\n"
            "export_path:                -\n");
}

TEST(FormatSubmittedTest, IdNameStateQueuePosition) {
  v1::Job job;
  job.set_id("job-3");
  job.set_name("fashion-mnist");
  job.set_state(v1::JOB_STATE_PENDING);
  job.set_queue_position(1);
  EXPECT_EQ(FormatSubmitted(job),
            "submitted job-3 (fashion-mnist), PENDING, queue position 1");
  job.set_state(v1::JOB_STATE_RUNNING);
  job.set_queue_position(0);
  job.clear_name();
  EXPECT_EQ(FormatSubmitted(job), "submitted job-3, RUNNING");
}

TEST(FormatStateLineTest, IdStateReasonOnOneLine) {
  v1::Job job;
  job.set_id("job-3");
  job.set_state(v1::JOB_STATE_FAILED);
  job.set_state_reason("rank 1 exited with code 1:\nout of memory\n");
  EXPECT_EQ(FormatStateLine(job),
            "job-3 FAILED: rank 1 exited with code 1:; out of memory");
  job.clear_state_reason();
  EXPECT_EQ(FormatStateLine(job), "job-3 FAILED");
}

TEST(FormatSummaryTest, StepsKnnExportWallTime) {
  v1::Job job = RunningJob();
  job.set_state(v1::JOB_STATE_SUCCEEDED);
  job.set_export_path("/runs/job-3/backbone.pt");
  *job.mutable_end_time() = At(kNoon + 10 + 725);
  EXPECT_EQ(FormatSummary(job),
            "  steps:     700\n"
            "  kNN top-1: 71.3%\n"
            "  export:    /runs/job-3/backbone.pt\n"
            "  wall time: 12m05s\n");
  job.set_restarts(2);
  job.clear_export_path();
  job.mutable_progress()->set_knn_top1(-1);
  EXPECT_EQ(FormatSummary(job),
            "  steps:     700\n"
            "  kNN top-1: -\n"
            "  export:    -\n"
            "  wall time: 12m05s\n"
            "  restarts:  2\n");
}

TEST(OneLineTest, JoinsLinesAndTrims) {
  EXPECT_EQ(OneLine("a\nb\r\nc\n"), "a; b; c");
  EXPECT_EQ(OneLine("  single  "), "single");
  EXPECT_EQ(OneLine(""), "");
}

TEST(ToJsonTest, OneLineWithProtoNamesAndDefaults) {
  v1::Job job;
  job.set_id("job-3");
  job.set_state(v1::JOB_STATE_RUNNING);
  job.mutable_progress()->set_step(700);
  const std::string json = ToJson(job);
  EXPECT_EQ(json.find('\n'), std::string::npos) << json;
  EXPECT_NE(json.find("\"id\":\"job-3\""), std::string::npos) << json;
  EXPECT_NE(json.find("\"state\":\"JOB_STATE_RUNNING\""), std::string::npos)
      << json;
  // Defaults are written, under the proto's field names.
  EXPECT_NE(json.find("\"queue_position\":0"), std::string::npos) << json;
  EXPECT_NE(json.find("\"state_reason\":\"\""), std::string::npos) << json;
  // int64 is a string in protobuf's JSON mapping.
  EXPECT_NE(json.find("\"step\":\"700\""), std::string::npos) << json;
}

TEST(ToJsonTest, ListResponseShape) {
  v1::ListJobsResponse response;
  response.add_jobs()->set_id("job-1");
  response.set_total_size(7);
  EXPECT_EQ(ToJson(response).substr(0, 8), "{\"jobs\":");
  EXPECT_NE(ToJson(response).find("\"next_page_token\":\"\""),
            std::string::npos);
  EXPECT_NE(ToJson(response).find("\"total_size\":7"), std::string::npos);
}

TEST(EscapeForTerminalTest, ControlCharactersBecomeVisible) {
  EXPECT_EQ(EscapeForTerminal("a\x1b[2Jb"), "a\\x1b[2Jb");
  EXPECT_EQ(EscapeForTerminal(std::string("nul\0end", 7)), "nul\\x00end");
  EXPECT_EQ(EscapeForTerminal("bell\a cr\r lf\n del\x7f"),
            "bell\\x07 cr\\x0d lf\\x0a del\\x7f");
  EXPECT_EQ(EscapeForTerminal("tab\tkept"), "tab\tkept");
  EXPECT_EQ(EscapeForTerminal(""), "");
}

TEST(EscapeForTerminalTest, KeepsPrintableUtf8) {
  EXPECT_EQ(EscapeForTerminal("caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac "
                              "\xf0\x9f\x99\x82 a\\b"),
            "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x99\x82 a\\b");
}

TEST(EscapeForTerminalTest, C1AndBidiControlsBecomeCodePoints) {
  // U+009B (CSI, C2 9B in UTF-8) and U+0085 (NEL, C2 85).
  EXPECT_EQ(EscapeForTerminal("x\xc2\x9b"
                              "2Jy\xc2\x85z"),
            "x\\u009b2Jy\\u0085z");
  // U+202E, right-to-left override (E2 80 AE), and U+2066 (E2 81 A6).
  EXPECT_EQ(EscapeForTerminal("abc\xe2\x80\xae"
                              "txt.exe\xe2\x81\xa6"),
            "abc\\u202etxt.exe\\u2066");
}

TEST(EscapeForTerminalTest, InvalidUtf8BytesAreEscapedOneByOne) {
  // A lone 0x9B (CSI on 8-bit terminals), a cut sequence, an overlong '/'
  // (C0 AF), a surrogate (ED A0 80), a code point past U+10FFFF (F4 90 80
  // 80).
  EXPECT_EQ(EscapeForTerminal("a\x9b"
                              "b"),
            "a\\x9bb");
  EXPECT_EQ(EscapeForTerminal("\xe6\x97"), "\\xe6\\x97");
  EXPECT_EQ(EscapeForTerminal("\xc0\xaf"), "\\xc0\\xaf");
  EXPECT_EQ(EscapeForTerminal("\xed\xa0\x80"), "\\xed\\xa0\\x80");
  EXPECT_EQ(EscapeForTerminal("\xf4\x90\x80\x80"), "\\xf4\\x90\\x80\\x80");
}

TEST(FormatTest, TextFromOthersIsEscaped) {
  v1::Job job = RunningJob();
  job.set_name("evil\x1b]0;owned\a");
  job.set_owner("mallory\x1b[31m");
  job.set_state_reason("rank 0: \x1b[2Jgone\nnext");
  job.set_output_dir("/runs/\x1b[8m");
  job.set_export_path(
      "/exports/\xc2\x9b"
      "1m");
  EXPECT_EQ(FormatStateLine(job), "job-3 RUNNING: rank 0: \\x1b[2Jgone; next");
  EXPECT_EQ(FormatSubmitted(job),
            "submitted job-3 (evil\\x1b]0;owned\\x07), RUNNING");
  EXPECT_EQ(JobRow(job, absl::FromUnixSeconds(kNoon + 70))[1],
            "evil\\x1b]0;owned\\x07");
  std::map<std::string, std::string> fields;
  for (const auto& [key, value] : JobFields(job)) fields[key] = value;
  EXPECT_EQ(fields["name"], "evil\\x1b]0;owned\\x07");
  EXPECT_EQ(fields["owner"], "mallory\\x1b[31m");
  EXPECT_EQ(fields["state_reason"], "rank 0: \\x1b[2Jgone; next");
  EXPECT_EQ(fields["output_dir"], "/runs/\\x1b[8m");
  EXPECT_EQ(fields["export_path"], "/exports/\\u009b1m");
  EXPECT_EQ(FormatSummary(job),
            "  steps:     700\n"
            "  kNN top-1: 71.3%\n"
            "  export:    /exports/\\u009b1m\n"
            "  wall time: -\n");
}

}  // namespace
}  // namespace momentum::client
