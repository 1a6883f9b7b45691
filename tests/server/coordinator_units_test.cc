// The coordinator's units on their own: placement, the watch hub, job logs,
// admission, the report address and the progress fold.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/job_progress.h"
#include "common/process.h"
#include "server/admission.h"
#include "server/job_logs.h"
#include "server/local_launcher.h"
#include "server/log_rate.h"
#include "server/placement.h"
#include "server/rank_credentials.h"
#include "server/report_address.h"
#include "server/request_limits.h"
#include "server/watch_hub.h"
#include "tests/server/fake_launcher.h"

namespace momentum::server {
namespace {

namespace fs = std::filesystem;
using ::momentum::server::testing::FakeLauncher;

std::shared_ptr<Launcher> L(const std::string& name) {
  return std::make_shared<FakeLauncher>(name, 0);
}

TEST(PlacementTest, WholeGangOnTheFirstLauncherThatHoldsIt) {
  auto a = L("a"), b = L("b");
  auto p = Place({{a, 1, {}}, {b, 4, {}}}, 3, false);
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].launcher, b);
  EXPECT_EQ(p[0].ranks, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_TRUE(p[0].gpus.empty());
}

TEST(PlacementTest, SpreadMostFreeFirstOrNothing) {
  auto a = L("a"), b = L("b"), c = L("c");
  auto p = Place({{a, 1, {}}, {b, 2, {}}, {c, 2, {}}}, 4, false);
  ASSERT_EQ(p.size(), 2u);
  EXPECT_EQ(p[0].launcher, b);  // stable among equals
  EXPECT_EQ(p[0].ranks, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(p[1].launcher, c);
  EXPECT_EQ(p[1].ranks, (std::vector<int64_t>{2, 3}));
  EXPECT_TRUE(Place({{a, 1, {}}, {b, 2, {}}}, 4, false).empty());
  EXPECT_TRUE(Place({}, 1, false).empty());
  EXPECT_TRUE(Place({{a, 4, {}}}, 0, false).empty());
}

TEST(PlacementTest, CudaRanksTakeFreeGpusAndNoSlots) {
  auto a = L("a"), b = L("b");
  auto p = Place({{a, 0, {3}}, {b, 0, {0, 2}}}, 3, true);
  ASSERT_EQ(p.size(), 2u);
  EXPECT_EQ(p[0].launcher, b);
  EXPECT_EQ(p[0].gpus, (std::vector<int>{0, 2}));
  EXPECT_EQ(p[1].gpus, (std::vector<int>{3}));
  EXPECT_EQ(p[1].ranks, (std::vector<int64_t>{2}));
  EXPECT_TRUE(Place({{a, 8, {}}}, 1, true).empty());
  EXPECT_TRUE(CouldEverFit(4, 0, 4, false));
  EXPECT_FALSE(CouldEverFit(4, 0, 5, false));
  EXPECT_FALSE(CouldEverFit(4, 2, 3, true));
}

v1::WatchJobEvent Metric(int64_t step) {
  v1::WatchJobEvent event;
  event.mutable_metric()->set_step(step);
  return event;
}

TEST(WatchHubTest, SlowReaderLosesSamplesButNoStateAndIsTold) {
  WatchHub hub(WatchHub::Options{4, 3});
  auto sub = hub.Subscribe("job-1", true, false);
  ASSERT_TRUE(sub.ok());
  for (int i = 0; i < 5; ++i)
    hub.Publish("job-1", Metric(i), WatchHub::Kind::kMetric);
  v1::WatchJobEvent change;
  change.mutable_state_change()->set_to(v1::JOB_STATE_RUNNING);
  hub.Publish("job-1", change, WatchHub::Kind::kState);
  // Logs are not asked for by this stream.
  v1::WatchJobEvent log;
  log.mutable_log()->set_text("x");
  hub.Publish("job-1", log, WatchHub::Kind::kLog);
  EXPECT_EQ((*sub)->dropped(), 2);
  std::vector<v1::WatchJobEvent> got;
  v1::WatchJobEvent event;
  while ((*sub)->Next(&event, std::chrono::milliseconds(0)))
    got.push_back(event);
  ASSERT_EQ(got.size(), 5u);
  EXPECT_EQ(got[0].metric().step(), 0);
  EXPECT_EQ(got[2].metric().step(), 2);
  // Told once half the backlog drained, before what followed.
  EXPECT_EQ(got[3].notice().kind(), "events_dropped");
  EXPECT_TRUE(absl::StartsWith(got[3].notice().message(), "2 metric samples"))
      << got[3].notice().message();
  EXPECT_TRUE(got[4].has_state_change());
}

TEST(WatchHubTest, StreamsAreCountedAndClosed) {
  WatchHub hub(WatchHub::Options{2, 10});
  auto a = hub.Subscribe("job-1", false, false);
  auto b = hub.Subscribe("job-2", false, false);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(hub.Subscribe("job-3", false, false).status().code(),
            absl::StatusCode::kResourceExhausted);
  hub.Close("job-1");
  EXPECT_TRUE((*a)->Done());
  EXPECT_FALSE((*b)->Done());
  EXPECT_EQ(hub.open_streams(), 1u);
  hub.Unsubscribe(*a);  // after Close: counted once
  EXPECT_EQ(hub.open_streams(), 1u);
  EXPECT_TRUE(hub.Subscribe("job-3", false, false).ok());
}

TEST(JobLogsTest, OnlyJobIdsNameFolders) {
  EXPECT_TRUE(IsJobId("job-1"));
  EXPECT_TRUE(IsJobId("job-123456"));
  for (const char* bad : {"", "job-", "job-1/../x", "/tmp/x", "../job-1",
                          "job-1a", "JOB-1", "job--1"}) {
    EXPECT_FALSE(IsJobId(bad)) << bad;
  }
}

TEST(JobLogsTest, NumbersContinueAcrossInstancesAndLastLineIsBounded) {
  char pattern[] = "/tmp/job-logs-test-XXXXXX";
  const std::string dir = ::mkdtemp(pattern);
  {
    JobLogs logs(dir);
    EXPECT_EQ(*logs.Append("job-1", 0, "one"), (std::vector<int64_t>{1}));
    EXPECT_EQ(*logs.Append("job-1", 0, "two"), (std::vector<int64_t>{2}));
    EXPECT_EQ(logs.Append("/x", 0, "no").status().code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(logs.Append("job-1", -1, "no").status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  JobLogs logs(dir);
  EXPECT_EQ(*logs.Append("job-1", 0, ""), (std::vector<int64_t>{3}));
  EXPECT_EQ(*logs.Append("job-1", 2, "other rank"), (std::vector<int64_t>{1}));
  EXPECT_EQ(logs.open_files(), 2u);
  logs.CloseJob("job-1");
  EXPECT_EQ(logs.open_files(), 0u);
  // The last non-empty line.
  EXPECT_EQ(logs.LastLine("job-1", 0), "two");
  EXPECT_EQ(logs.LastLine("job-1", 1), "");
  ASSERT_TRUE(logs.Append("job-1", 0, std::string(2000, 'y') + "end").ok());
  const std::string last = logs.LastLine("job-1", 0, 100);
  EXPECT_EQ(last, "..." + std::string(97, 'y') + "end");
  auto read = logs.Read("job-1", -1, 2);
  ASSERT_TRUE(read.ok());
  ASSERT_EQ(read->size(), 3u);  // rank 0's lines 2 to 4; rank 2 has only 1
  EXPECT_EQ((*read)[0].text(), "two");
  EXPECT_EQ((*read)[0].line_number(), 2);
  fs::remove_all(dir);
}

TEST(AdmissionTest, LimitsAndRootsNameTheField) {
  char pattern[] = "/tmp/admission-test-XXXXXX";
  const std::string dir = ::mkdtemp(pattern);
  fs::create_directories(dir + "/data/set");
  fs::create_directories(dir + "/elsewhere");
  fs::create_directory_symlink(dir + "/elsewhere", dir + "/data/link");
  AdmissionOptions options;
  options.max_ranks_per_job = 2;
  options.data_roots = {dir + "/data"};
  Admission admission(options);
  JobSpec spec;
  spec.data.path = dir + "/data/set";
  spec.resources.nproc = 2;
  EXPECT_TRUE(admission.Check(spec).ok());
  spec.resources.nproc = 3;
  EXPECT_EQ(admission.Check(spec).message(),
            "resources.nproc must be <= 2 on this server, got 3");
  spec.resources.nproc = 1;
  spec.data.path = dir + "/data/link/x";  // resolves outside
  EXPECT_EQ(admission.Check(spec).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(absl::StartsWith(admission.Check(spec).message(), "data.path"));
  fs::remove_all(dir);
}

TEST(OwnerFolderTest, EveryNameIsOneSafeComponentOfItsOwn) {
  EXPECT_EQ(*OwnerFolder("alice"), "alice");
  EXPECT_EQ(*OwnerFolder("ci-bot@example.org"), "ci-bot@example.org");
  EXPECT_EQ(*OwnerFolder("a.b_c"), "a.b_c");
  EXPECT_EQ(*OwnerFolder(""), "_anonymous");
  // '_' (0x5F) and '.' (0x2E) only inside a name; '/' is 0x2F, ' ' 0x20,
  // '%' 0x25.
  EXPECT_EQ(*OwnerFolder("_anonymous"), "%5Fanonymous");
  EXPECT_EQ(*OwnerFolder("."), "%2E");
  EXPECT_EQ(*OwnerFolder(".."), "%2E.");
  EXPECT_EQ(*OwnerFolder("../x"), "%2E.%2Fx");
  EXPECT_EQ(*OwnerFolder("a/b"), "a%2Fb");
  EXPECT_EQ(*OwnerFolder("Alice Smith"), "Alice%20Smith");
  EXPECT_EQ(*OwnerFolder("50%"), "50%25");
  EXPECT_EQ(*OwnerFolder("\xC3\xA9"), "%C3%A9");  // é in UTF-8
  EXPECT_EQ(OwnerFolder(std::string(86, '/')).status().code(),
            absl::StatusCode::kPermissionDenied);  // 258 bytes encoded
  EXPECT_EQ(OwnerFolder(std::string(85, '/'))->size(), 255u);
}

class OutputConfinementTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/confinement-test-XXXXXX";
    dir_ = ::mkdtemp(pattern);
    fs::create_directories(dir_ + "/out/alice/runs");
    fs::create_directories(dir_ + "/out/bob/runs");
    fs::create_directories(dir_ + "/scratch/alice");
    fs::create_directories(dir_ + "/scratch/bob");
    AdmissionOptions options;
    options.output_root = dir_ + "/out/";  // a trailing '/' changes nothing
    options.user_output_roots = {{"alice", dir_ + "/scratch/alice"},
                                 {"bob", dir_ + "/scratch/bob"}};
    admission_ = std::make_unique<Admission>(options);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Resolve(const std::string& output_dir, const std::string& owner,
                      bool admin = false) {
    absl::StatusOr<std::string> path =
        admission_->ResolveOutputDir(output_dir, owner, admin);
    return path.ok() ? *path
                     : "refused: " + std::string(path.status().message());
  }

  std::string dir_;
  std::unique_ptr<Admission> admission_;
};

TEST_F(OutputConfinementTest, RelativeDirsLiveInTheOwnersFolder) {
  EXPECT_EQ(Resolve("runs/x", "alice"), dir_ + "/out/alice/runs/x");
  EXPECT_EQ(Resolve("runs/x", "bob"), dir_ + "/out/bob/runs/x");
  EXPECT_EQ(Resolve("./runs//x/", "alice"), dir_ + "/out/alice/runs/x");
  EXPECT_EQ(Resolve("runs/../y", "alice"), dir_ + "/out/alice/y");
  EXPECT_EQ(Resolve(".", "alice"), dir_ + "/out/alice");
  EXPECT_EQ(Resolve("runs/x", ""), dir_ + "/out/_anonymous/runs/x");
  EXPECT_EQ(Resolve("x", "a/b"), dir_ + "/out/a%2Fb/x");
  EXPECT_EQ(Resolve("x", ".."), dir_ + "/out/%2E./x");
  EXPECT_EQ(Resolve("../bob/runs", "alice"),
            "refused: output_dir must stay inside the submitter's folder " +
                dir_ +
                "/out/alice (a relative output_dir may not climb out with "
                "\"..\"), got ../bob/runs");
  EXPECT_EQ(Resolve("runs/../../bob", "alice").substr(0, 52),
            "refused: output_dir must stay inside the submitter's");
  EXPECT_EQ(Resolve("", "alice"), "refused: output_dir must not be empty");
}

TEST_F(OutputConfinementTest, AbsoluteDirsLieUnderTheOwnersRoots) {
  EXPECT_EQ(Resolve(dir_ + "/out/alice/runs/x", "alice"),
            dir_ + "/out/alice/runs/x");
  EXPECT_EQ(Resolve(dir_ + "/scratch/alice/x", "alice"),
            dir_ + "/scratch/alice/x");
  EXPECT_EQ(Resolve(dir_ + "/out/alice/runs/x", "bob"),
            "refused: output_dir must lie under one of " + dir_ + "/out/bob, " +
                dir_ + "/scratch/bob for bob, got " + dir_ +
                "/out/alice/runs/x");
  EXPECT_EQ(Resolve(dir_ + "/scratch/alice/x", "bob").substr(0, 41),
            "refused: output_dir must lie under one of");
  EXPECT_EQ(Resolve(dir_ + "/out/bob/../alice/x", "bob"),
            "refused: output_dir must lie under one of " + dir_ + "/out/bob, " +
                dir_ + "/scratch/bob for bob, got " + dir_ +
                "/out/bob/../alice/x (which resolves to " + dir_ +
                "/out/alice/x)");
  // No user root of its own: the own folder alone.
  EXPECT_EQ(Resolve("/etc", "carol"), "refused: output_dir must lie under " +
                                          dir_ + "/out/carol for carol, got " +
                                          "/etc");
  // A sibling whose name starts alike is not inside.
  EXPECT_EQ(Resolve(dir_ + "/out/alice2/x", "alice").substr(0, 41),
            "refused: output_dir must lie under one of");
  // Admins: anywhere under the output root or any user root, nowhere else.
  EXPECT_EQ(Resolve(dir_ + "/out/bob/runs/x", "root", true),
            dir_ + "/out/bob/runs/x");
  EXPECT_EQ(Resolve(dir_ + "/scratch/bob/x", "root", true),
            dir_ + "/scratch/bob/x");
  EXPECT_EQ(Resolve("/etc", "", true),
            "refused: output_dir must lie under one of " + dir_ + "/out, " +
                dir_ + "/scratch/alice, " + dir_ +
                "/scratch/bob for anonymous callers, got /etc");
}

TEST_F(OutputConfinementTest, SymlinksAreResolvedBeforeTheCheck) {
  // A link in alice's folder into bob's, and one that stays in hers.
  fs::create_directory_symlink(dir_ + "/out/bob/runs",
                               dir_ + "/out/alice/to-bob");
  fs::create_directory_symlink(dir_ + "/out/alice/runs",
                               dir_ + "/out/alice/mine");
  EXPECT_EQ(Resolve("to-bob/x", "alice"),
            "refused: output_dir must lie under one of " + dir_ +
                "/out/alice, " + dir_ + "/scratch/alice for alice, got " +
                "to-bob/x (which resolves to " + dir_ + "/out/bob/runs/x)");
  EXPECT_EQ(Resolve(dir_ + "/out/alice/to-bob", "alice").substr(0, 41),
            "refused: output_dir must lie under one of");
  EXPECT_EQ(Resolve("mine/x", "alice"), dir_ + "/out/alice/runs/x");
  // A dangling link is followed too: its target may exist by launch.
  fs::create_directory_symlink(dir_ + "/out/bob/not-yet",
                               dir_ + "/out/alice/later");
  EXPECT_EQ(Resolve("later/x", "alice"),
            "refused: output_dir must lie under one of " + dir_ +
                "/out/alice, " + dir_ + "/scratch/alice for alice, got " +
                "later/x (which resolves to " + dir_ + "/out/bob/not-yet/x)");
  // ".." after a link goes up from where the link points, as open() does.
  fs::create_directory_symlink(dir_ + "/out/bob/runs",
                               dir_ + "/out/alice/deep");
  EXPECT_EQ(Resolve(dir_ + "/out/alice/deep/../x", "alice"),
            "refused: output_dir must lie under one of " + dir_ +
                "/out/alice, " + dir_ + "/scratch/alice for alice, got " +
                dir_ + "/out/alice/deep/../x (which resolves to " + dir_ +
                "/out/bob/x)");
  // A loop resolves to nothing.
  fs::create_directory_symlink(dir_ + "/out/alice/loop",
                               dir_ + "/out/alice/loop");
  EXPECT_EQ(Resolve("loop/x", "alice"),
            "refused: output_dir must resolve to a folder, got " + dir_ +
                "/out/alice/loop/x (too many levels of symlinks)");
  // Relative links resolve from the link's folder.
  fs::create_directory_symlink("../bob/runs", dir_ + "/out/alice/rel");
  EXPECT_EQ(Resolve("rel", "alice").substr(0, 41),
            "refused: output_dir must lie under one of");
  // The owner's folder itself a link elsewhere: what it points to is not
  // the owner's.
  fs::create_directory_symlink(dir_ + "/out/bob", dir_ + "/out/mallory");
  EXPECT_EQ(Resolve("runs", "mallory"),
            "refused: output_dir must lie under " + dir_ +
                "/out/mallory for mallory, got runs (which resolves to " +
                dir_ + "/out/bob/runs)");
  // The output root may be reached through a link: it is resolved.
  fs::create_directory_symlink(dir_ + "/out", dir_ + "/out-link");
  AdmissionOptions options;
  options.output_root = dir_ + "/out-link";
  EXPECT_EQ(*Admission(options).ResolveOutputDir("x", "alice", false),
            dir_ + "/out/alice/x");
}

TEST(RankCredentialsTest, EachSpeaksForOneRankOfOneLaunchUntilRevoked) {
  RankCredentials credentials;
  absl::StatusOr<std::vector<std::string>> first =
      credentials.Issue("job-1", 1, 3);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->size(), 3u);
  absl::StatusOr<std::vector<std::string>> second =
      credentials.Issue("job-2", 1, 1);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(credentials.size(), 4u);
  for (int64_t r = 0; r < 3; ++r) {
    const std::string& token = (*first)[static_cast<size_t>(r)];
    // "rank." + 16 hex digits + "." + 64 hex digits.
    EXPECT_EQ(token.size(), 5u + 16 + 1 + 64) << token;
    EXPECT_TRUE(RankCredentials::LooksLikeOne(token)) << token;
    EXPECT_EQ(credentials.Find(token), (RankKey{"job-1", 1, r}));
  }
  EXPECT_NE((*first)[0], (*first)[1]);
  // A wrong secret behind a right id, a cut or padded token: nobody.
  std::string forged = (*first)[0];
  forged.back() = forged.back() == '0' ? '1' : '0';
  EXPECT_FALSE(credentials.Find(forged).has_value());
  EXPECT_FALSE(credentials.Find((*first)[0].substr(0, 80)).has_value());
  EXPECT_FALSE(credentials.Find((*first)[0] + "0").has_value());
  EXPECT_FALSE(credentials.Find("").has_value());
  EXPECT_FALSE(RankCredentials::LooksLikeOne("alice-token-0123456789abcdef"));
  // Revoking one launch leaves the others.
  credentials.Revoke("job-1", 1);
  EXPECT_FALSE(credentials.Find((*first)[2]).has_value());
  EXPECT_EQ(credentials.Find((*second)[0]), (RankKey{"job-2", 1, 0}));
  EXPECT_EQ(credentials.size(), 1u);
  credentials.RevokeAll();
  EXPECT_EQ(credentials.size(), 0u);
  EXPECT_FALSE(credentials.Find((*second)[0]).has_value());
}

TEST(RankCredentialsTest, ReportsOnlyAsTheRankItWasIssuedFor) {
  const RankKey key{"job-3", 2, 1};
  EXPECT_TRUE(MayReportAs(key, "job-3", 2, 1).ok());
  for (const auto& [job, attempt, rank] :
       std::vector<std::tuple<std::string, int64_t, int64_t>>{
           {"job-3", 2, 0}, {"job-3", 1, 1}, {"job-4", 2, 1}}) {
    const absl::Status s = MayReportAs(key, job, attempt, rank);
    EXPECT_TRUE(absl::IsPermissionDenied(s)) << s;
    EXPECT_EQ(s.message(),
              absl::StrCat("this credential is for rank 1 of job-3 (attempt "
                           "2); it may not report for rank ",
                           rank, " of \"", job, "\" (attempt ", attempt, ")"));
  }
}

// Bytes only: 100 bytes/s in bursts of 1 s, so the bucket holds 100 bytes,
// resumes at 50, and no line costs more than 50.
TEST(LogRateLimiterTest, ByteBucketDropsThenTellsHowManyOnceRefilled) {
  LogRateLimiter limiter({/*lines_per_second=*/0, /*bytes_per_second=*/100,
                          /*burst_seconds=*/1});
  const Clock::TimePoint t0 = Clock::TimePoint() + std::chrono::hours(1);
  auto admit = [&](size_t bytes, double at, const std::string& job = "job-1") {
    return limiter.Admit(job, 0, bytes, t0 + Seconds(at));
  };
  EXPECT_TRUE(admit(40, 0).keep);               // 60 left
  EXPECT_TRUE(admit(40, 0).keep);               // 20 left
  EXPECT_FALSE(admit(40, 0).keep);              // dropped (1)
  EXPECT_FALSE(admit(1, 0.2).keep);             // 40 < 50: still dropping (2)
  LogRateLimiter::Verdict v = admit(40, 0.35);  // 55: resumes
  EXPECT_TRUE(v.keep);
  EXPECT_EQ(v.dropped_before, 2);  // 15 left
  v = admit(1000, 1.5);            // 100, and the line costs 50
  EXPECT_TRUE(v.keep);
  EXPECT_EQ(v.dropped_before, 0);
  EXPECT_TRUE(admit(50, 1.5).keep);  // 0 left
  EXPECT_FALSE(admit(1, 1.5).keep);  // dropped, not yet told
  EXPECT_EQ(limiter.TakeDropped("job-1", 0), 1);
  EXPECT_EQ(limiter.TakeDropped("job-1", 0), 0);
  // Another job has a bucket of its own; a forgotten job starts full.
  EXPECT_TRUE(admit(100, 1.5, "job-2").keep);  // costs 50: 50 left
  EXPECT_TRUE(admit(100, 1.5, "job-2").keep);  // 0 left
  limiter.Forget("job-1");
  EXPECT_TRUE(admit(50, 1.5).keep);
  EXPECT_FALSE(admit(1, 1.5, "job-2").keep);
}

TEST(RequestLimitsTest, AgentHelloIsBoundedNamingTheField) {
  v1::AgentHello hello;
  hello.set_hostname("node-1.example.org");
  hello.set_advertise_address("[fd00::1]:7000");
  hello.set_agent_id("node-1");
  hello.set_slots(65536);
  for (int i = 0; i < 1024; ++i) hello.add_gpus(i);
  EXPECT_TRUE(CheckAgentHello(hello).ok()) << CheckAgentHello(hello);

  auto refused = [](const v1::AgentHello& bad) {
    const absl::Status status = CheckAgentHello(bad);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    return std::string(status.message());
  };
  v1::AgentHello bad = hello;
  bad.set_hostname(std::string(254, 'h'));
  EXPECT_EQ(refused(bad),
            "AgentHello.hostname must have at most 253 bytes, got 254");
  bad = hello;
  bad.set_hostname("node\x1b[2J");
  EXPECT_EQ(refused(bad),
            "AgentHello.hostname must match [A-Za-z0-9._-]*, got "
            "\"node\\x1b[2J\"");
  bad = hello;
  bad.set_advertise_address(std::string(262, 'a'));
  EXPECT_EQ(refused(bad),
            "AgentHello.advertise_address must have at most 261 bytes, got "
            "262");
  bad = hello;
  bad.set_advertise_address("10.0.0.1 :7000");
  EXPECT_EQ(refused(bad),
            "AgentHello.advertise_address must be printable ASCII without "
            "spaces, got \"10.0.0.1 :7000\"");
  bad = hello;
  bad.set_agent_id(std::string(129, 'i'));
  EXPECT_EQ(refused(bad),
            "AgentHello.agent_id must have at most 128 bytes, got 129");
  bad = hello;
  bad.set_agent_id("a/b");
  EXPECT_EQ(refused(bad),
            "AgentHello.agent_id must match [A-Za-z0-9._-]*, got \"a/b\"");
  bad = hello;
  bad.set_slots(65537);
  EXPECT_EQ(refused(bad), "AgentHello.slots must be <= 65536, got 65537");
  bad = hello;
  bad.add_gpus(1024);
  EXPECT_EQ(refused(bad),
            "AgentHello.gpus must have at most 1024 entries, got 1025");
  bad = hello;
  bad.set_slots(0);
  EXPECT_EQ(refused(bad), "AgentHello.slots must be >= 1, got 0");
  bad = hello;
  bad.clear_advertise_address();
  EXPECT_EQ(refused(bad), "AgentHello.advertise_address is empty");
  bad = hello;
  bad.set_gpus(3, 2);
  EXPECT_TRUE(absl::StrContains(refused(bad), "AgentHello.gpus"));
}

// A stand-in rank: `sleep 300` in `cwd` (made first) with MOMENTUM_JOB_ID
// `job`, leading a process group of its own as ranks do; -1 on failure.
pid_t SpawnRankIn(const fs::path& cwd, const std::string& job) {
  fs::create_directories(cwd);
  SpawnOptions options;
  options.argv = {"sleep", "300"};
  options.env = {"PATH=/usr/bin:/bin", "MOMENTUM_JOB_ID=" + job};
  options.cwd = cwd.string();
  options.new_process_group = true;
  absl::StatusOr<pid_t> pid = Spawn(options);
  EXPECT_TRUE(pid.ok()) << pid.status();
  return pid.ok() ? *pid : -1;
}

// Runs `stop` (which should stop `rank`, a child of this test, and say 1)
// while reaping `rank` as init reaps an orphan; then checks that SIGTERM
// ended it and that `spared` still runs, and kills `spared`.
void ExpectStopsOnly(pid_t rank, pid_t spared,
                     const std::function<int()>& stop) {
  int status = 0;
  std::thread reaper([&] { ::waitpid(rank, &status, 0); });
  const int stopped = stop();
  EXPECT_EQ(stopped, 1);
  if (stopped == 0) ::kill(rank, SIGKILL);  // not found: the reaper waits
  reaper.join();
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << status;
  EXPECT_EQ(::waitpid(spared, &status, WNOHANG), 0);  // still runs
  ::kill(spared, SIGKILL);
  ::waitpid(spared, &status, 0);
}

// Was: a coordinator killed between spawning a rank and writing its pid
// file left the rank running under the next one (service_chaos_test saw
// two attempts of one job alive). The rank is found by where it runs.
TEST(LocalLauncherTest, LeftoverWithoutPidFileIsFoundByWhereItRuns) {
  char pattern[] = "/tmp/momentum-leftover-XXXXXX";
  const fs::path dir = ::mkdtemp(pattern);
  const fs::path attempt = dir / "job-7" / "attempt-2";
  const pid_t rank = SpawnRankIn(attempt, "job-7");
  const pid_t stranger = SpawnRankIn(attempt, "job-8");  // another job's
  ASSERT_GT(rank, 0);
  ASSERT_GT(stranger, 0);
  ExpectStopsOnly(rank, stranger, [&] {
    return LocalLauncher::StopLeftoverRanks(attempt.string(), 5);
  });
  fs::remove_all(dir);
}

// Was: a job cancelled just before its coordinator died is no longer
// unfinished, so the next coordinator never stopped its ranks. At start it
// now stops every rank left in an attempt's folder, of any job.
TEST(LocalLauncherTest, EveryLeftoverOfAnyJobIsStoppedAtStart) {
  char pattern[] = "/tmp/momentum-leftover-XXXXXX";
  const fs::path dir = ::mkdtemp(pattern);
  struct NoEvents : LaunchEvents {
    void OnRankOutput(const std::string&, int64_t, int64_t,
                      const std::string&) override {}
    void OnRankExited(const std::string&, int64_t, int64_t, int, int,
                      const std::string&) override {}
  } events;
  LocalLauncher launcher("/bin/false", 1, {}, dir.string(), &events);
  const pid_t leftover = SpawnRankIn(dir / "job-9" / "attempt-3", "job-9");
  // Not an attempt's folder: left alone.
  const pid_t elsewhere = SpawnRankIn(dir / "job-9", "job-9");
  ASSERT_GT(leftover, 0);
  ASSERT_GT(elsewhere, 0);
  ExpectStopsOnly(leftover, elsewhere,
                  [&] { return launcher.StopEveryLeftover(5); });
  fs::remove_all(dir);
}

TEST(ReportAddressTest, WildcardHostsBecomeTheHostname) {
  EXPECT_EQ(ReportAddress("127.0.0.1", 50051, "", "node-1"), "127.0.0.1:50051");
  EXPECT_EQ(ReportAddress("0.0.0.0", 50051, "", "node-1"), "node-1:50051");
  EXPECT_EQ(ReportAddress("[::]", 7, "", "node-1"), "node-1:7");
  EXPECT_EQ(ReportAddress("0.0.0.0", 7, "10.0.0.5", "node-1"), "10.0.0.5:7");
  EXPECT_EQ(ReportAddress("0.0.0.0", 7, "lb.example:443", "n"),
            "lb.example:443");
  EXPECT_EQ(ReportAddress("0.0.0.0", 7, "[fd00::1]", "n"), "[fd00::1]:7");
  EXPECT_EQ(HostOf("0.0.0.0:50051"), "0.0.0.0");
  EXPECT_EQ(HostOf("[::]:50051"), "[::]");
  EXPECT_EQ(HostOf("localhost"), "localhost");
}

TEST(JobProgressTest, RankZeroStandsForTheGroupAndKnnComesFromAnyRank) {
  v1::JobProgress progress = EmptyProgress();
  EXPECT_EQ(progress.knn_top1(), -1);
  EXPECT_EQ(progress.eta_seconds(), -1);
  v1::MetricSample zero;
  zero.set_rank(0);
  zero.set_step(10);
  zero.set_loss(5.5);
  zero.set_knn_top1(-1);
  zero.set_eta_seconds(30);
  FoldSample(zero, &progress);
  v1::MetricSample one;
  one.set_rank(1);
  one.set_step(11);
  one.set_loss(9.0);
  one.set_knn_top1(0.42);
  FoldSample(one, &progress);
  EXPECT_EQ(progress.step(), 10);
  EXPECT_EQ(progress.loss(), 5.5);
  EXPECT_EQ(progress.eta_seconds(), 30);
  EXPECT_DOUBLE_EQ(progress.knn_top1(), 0.42);
}

}  // namespace
}  // namespace momentum::server
