// The coordinator's rules, against fake launchers and a fake clock: no
// process, no sleep. Each test drives the loop by hand with Tick().
#include "server/coordinator.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/exit_codes.h"
#include "tests/server/fake_launcher.h"

namespace momentum::server {
namespace {

namespace fs = std::filesystem;
using ::momentum::server::testing::FakeClock;
using ::momentum::server::testing::FakeLauncher;

std::string MakeTempDir() {
  std::string pattern =
      (fs::temp_directory_path() / "coordinator_test.XXXXXX").string();
  EXPECT_NE(::mkdtemp(pattern.data()), nullptr);
  return pattern;
}

class CoordinatorTest : public ::testing::Test {
protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    Open();
  }
  void TearDown() override {
    coordinator_.reset();
    fs::remove_all(dir_);
  }

  // A coordinator on dir_ with one launcher of `slots` slots and `gpus`.
  void Open(int64_t slots = 2, std::vector<int> gpus = {}) {
    coordinator_.reset();
    CoordinatorOptions options;
    options.state_dir = dir_;
    options.grace_seconds = 0.5;
    options.clock = &clock_;
    auto created = Coordinator::Create(options);
    ASSERT_TRUE(created.ok()) << created.status();
    coordinator_ = *std::move(created);
    launcher_ = AddLauncher("local", slots, std::move(gpus));
  }

  std::shared_ptr<FakeLauncher> AddLauncher(const std::string &name,
                                            int64_t slots,
                                            std::vector<int> gpus = {}) {
    auto launcher =
        std::make_shared<FakeLauncher>(name, slots, std::move(gpus));
    launcher->set_events(coordinator_.get());
    // Stopped ranks end at once, as ranks that checkpoint quickly would.
    launcher->set_exit_on_stop(true);
    coordinator_->AddLauncher(launcher);
    return launcher;
  }

  // A job spec; `extra` is more YAML (flow style) under scheduling. Each
  // has an output_dir of its own: live jobs may not share one.
  static std::string Spec(int64_t nproc, const std::string &scheduling = "",
                          const std::string &device = "cpu") {
    static int specs = 0;
    return absl::StrCat("name: t\noutput_dir: out-", ++specs,
                        "\ndata: {path: /data}\n"
                        "optim: {batch_size: ",
                        16 * nproc, "}\nresources: {nproc: ", nproc,
                        ", device: ", device, "}\nscheduling: {", scheduling,
                        "}\n");
  }

  std::string Submit(const std::string &spec) {
    auto job = coordinator_->Submit(spec, {});
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? job->id() : "";
  }

  v1::Job Get(const std::string &id) {
    auto job = coordinator_->GetJob(id);
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? *job : v1::Job();
  }
  v1::JobState State(const std::string &id) { return Get(id).state(); }

  std::string dir_;
  FakeClock clock_;
  std::unique_ptr<Coordinator> coordinator_;
  std::shared_ptr<FakeLauncher> launcher_;
};

TEST_F(CoordinatorTest, GangIsLaunchedWholeWhenItFits) {
  const std::string id = Submit(Spec(2));
  coordinator_->Tick();
  EXPECT_EQ(State(id), v1::JOB_STATE_RUNNING);
  ASSERT_EQ(launcher_->launches().size(), 1u);
  const LaunchRequest request = launcher_->launches()[0];
  EXPECT_EQ(request.job_id, id);
  EXPECT_EQ(request.attempt, 1);
  EXPECT_EQ(request.world_size, 2);
  EXPECT_EQ(request.ranks, (std::vector<int64_t>{0, 1}));
  EXPECT_TRUE(request.gpus.empty());
  EXPECT_EQ(request.master_addr, "10.0.0.1");
  EXPECT_TRUE(absl::StrContains(Get(id).state_reason(), "2 ranks launched"));
}

TEST_F(CoordinatorTest, GangSpreadsOverLaunchersMostFreeFirst) {
  Open(1);
  auto big = AddLauncher("agent a", 2);
  const std::string id = Submit(Spec(3));
  coordinator_->Tick();
  EXPECT_EQ(State(id), v1::JOB_STATE_RUNNING);
  ASSERT_EQ(big->launches().size(), 1u);
  ASSERT_EQ(launcher_->launches().size(), 1u);
  // Rank 0 where most ranks run, and the store address is its launcher's.
  EXPECT_EQ(big->launches()[0].ranks, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(launcher_->launches()[0].ranks, (std::vector<int64_t>{2}));
}

TEST_F(CoordinatorTest, QueueRunsByPriorityThenSubmission) {
  Open(1);
  const std::string a = Submit(Spec(1));
  coordinator_->Tick();
  ASSERT_EQ(State(a), v1::JOB_STATE_RUNNING);
  const std::string b = Submit(Spec(1));
  const std::string c = Submit(Spec(1, "priority: 5"));
  const std::string d = Submit(Spec(1));
  coordinator_->Tick();
  EXPECT_EQ(Get(c).queue_position(), 1);
  EXPECT_EQ(Get(b).queue_position(), 2);
  EXPECT_EQ(Get(d).queue_position(), 3);
  EXPECT_EQ(Get(a).queue_position(), 0);

  std::vector<std::string> order;
  for (int i = 0; i < 4; ++i) {
    for (const LaunchRequest &r : launcher_->launches()) {
      if (order.empty() || order.back() != r.job_id) {
        if (std::find(order.begin(), order.end(), r.job_id) == order.end()) {
          order.push_back(r.job_id);
        }
      }
    }
    launcher_->ExitAll(order.back(), 0);
    coordinator_->Tick();
  }
  EXPECT_EQ(order, (std::vector<std::string>{a, c, b, d}));
  for (const std::string &id : order) {
    EXPECT_EQ(State(id), v1::JOB_STATE_SUCCEEDED) << id;
  }
}

TEST_F(CoordinatorTest, JobThatDoesNotFitNowIsNotOvertaken) {
  const std::string a = Submit(Spec(1));
  coordinator_->Tick();
  const std::string wide = Submit(Spec(2));
  const std::string small = Submit(Spec(1));
  coordinator_->Tick();
  // One slot is free: the small job would fit, but the wide one is first.
  EXPECT_EQ(State(wide), v1::JOB_STATE_PENDING);
  EXPECT_EQ(State(small), v1::JOB_STATE_PENDING);
  launcher_->ExitAll(a, 0);
  coordinator_->Tick();
  EXPECT_EQ(State(wide), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(State(small), v1::JOB_STATE_PENDING);
}

TEST_F(CoordinatorTest, JobLargerThanTheClusterDoesNotBlockTheQueue) {
  const std::string huge = Submit(Spec(64, "priority: 1000"));
  const std::string small = Submit(Spec(1));
  coordinator_->Tick();
  EXPECT_EQ(State(huge), v1::JOB_STATE_PENDING);
  EXPECT_EQ(State(small), v1::JOB_STATE_RUNNING);
  // It starts once the cluster has room for it.
  launcher_->ExitAll(small, 0);
  AddLauncher("agent big", 64);
  coordinator_->Tick();
  EXPECT_EQ(State(huge), v1::JOB_STATE_RUNNING);
}

TEST_F(CoordinatorTest, AbsurdSizesAreRefusedNamingTheField) {
  auto job = coordinator_->Submit(
      "name: t\ndata: {path: /data}\noptim: {batch_size: "
      "4611686018427387904}\nresources: {nproc: 4611686018427387904}\n",
      {});
  ASSERT_FALSE(job.ok());
  EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(job.status().message(),
                                "resources.nproc must be in [1, 65536]"))
      << job.status();
  EXPECT_TRUE(absl::StrContains(job.status().message(),
                                "optim.batch_size must be in [1, 16777216]"))
      << job.status();
  v1::ListJobsRequest list;
  auto listed = coordinator_->ListJobs(list);
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->total_size(), 0);
}

TEST_F(CoordinatorTest, RestartsBackOffDoublingUntilNoneAreLeft) {
  const std::string id =
      Submit(Spec(2, "max_restarts: 3, restart_backoff_s: 2"));
  coordinator_->Tick();
  double backoff = 2;
  for (int restart = 1; restart <= 3; ++restart) {
    launcher_->Exit(id, restart, 1, kExitFailed);
    launcher_->Exit(id, restart, 0, kExitStopped);
    coordinator_->Tick();
    v1::Job job = Get(id);
    ASSERT_EQ(job.state(), v1::JOB_STATE_RESTARTING) << job.state_reason();
    EXPECT_TRUE(absl::StrContains(
        job.state_reason(),
        absl::StrCat("rank 1 exited with code 1; restart ", restart, " of 3")))
        << job.state_reason();
    clock_.Advance(backoff - 0.01);
    coordinator_->Tick();
    EXPECT_EQ(State(id), v1::JOB_STATE_RESTARTING) << "restart " << restart;
    clock_.Advance(0.01);
    coordinator_->Tick();
    ASSERT_EQ(State(id), v1::JOB_STATE_RUNNING) << "restart " << restart;
    EXPECT_EQ(Get(id).restarts(), restart);
    EXPECT_EQ(launcher_->launches().back().attempt, restart + 1);
    backoff *= 2;
  }
  launcher_->Exit(id, 4, 0, kExitFailed);
  coordinator_->Tick();
  v1::Job job = Get(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_TRUE(absl::StrContains(job.state_reason(), "no restarts left of 3"))
      << job.state_reason();
  // The other rank was told to stop, after the failure was committed.
  EXPECT_EQ(launcher_->stops().back().job_id, id);
  EXPECT_EQ(launcher_->stops().back().attempt, 4);
  EXPECT_DOUBLE_EQ(launcher_->stops().back().grace_seconds, 0.5);
}

// Each launch gives each rank a credential of its own, good for its job,
// attempt and rank while the gang runs; a restart gets new ones.
TEST_F(CoordinatorTest, EachLaunchGivesEachRankItsOwnCredential) {
  Open(1);
  auto other = AddLauncher("agent a", 1);
  const std::string id = Submit(Spec(2, "max_restarts: 1"));
  coordinator_->Tick();
  ASSERT_EQ(launcher_->launches().size(), 1u);
  ASSERT_EQ(other->launches().size(), 1u);
  // A launcher gets the credentials of the ranks it runs, and only those.
  std::map<int64_t, std::string> first;
  for (const auto& l : {launcher_, other}) {
    const LaunchRequest request = l->launches()[0];
    ASSERT_EQ(request.credentials.size(), 1u);
    first[request.ranks[0]] = request.credentials[0];
    for (const std::string& env : request.env) {
      EXPECT_FALSE(absl::StartsWith(env, "MOMENTUM_TOKEN=")) << env;
    }
  }
  ASSERT_EQ(first.size(), 2u);
  EXPECT_NE(first[0], first[1]);
  for (const auto& [rank, token] : first) {
    EXPECT_EQ(coordinator_->RankOf(token), (RankKey{id, 1, rank}));
  }
  // The gang fails and is restarted: the old credentials are revoked.
  launcher_->ExitAll(id, kExitFailed);
  other->ExitAll(id, kExitFailed);
  coordinator_->Tick();
  ASSERT_EQ(State(id), v1::JOB_STATE_RESTARTING);
  for (const auto& [rank, token] : first) {
    EXPECT_FALSE(coordinator_->RankOf(token).has_value()) << rank;
  }
  clock_.Advance(60);
  coordinator_->Tick();
  ASSERT_EQ(State(id), v1::JOB_STATE_RUNNING);
  const LaunchRequest again = launcher_->launches().back();
  ASSERT_EQ(again.attempt, 2);
  ASSERT_EQ(again.credentials.size(), 1u);
  EXPECT_NE(again.credentials[0], first[again.ranks[0]]);
  EXPECT_EQ(coordinator_->RankOf(again.credentials[0]),
            (RankKey{id, 2, again.ranks[0]}));
  // Cancelled: revoked once its ranks are gone.
  ASSERT_TRUE(coordinator_->Cancel(id, "test").ok());
  coordinator_->Tick();
  coordinator_->Tick();
  EXPECT_FALSE(coordinator_->RankOf(again.credentials[0]).has_value());
}

TEST_F(CoordinatorTest, BackOffIsCappedAtAMinute) {
  const std::string id =
      Submit(Spec(1, "max_restarts: 10, restart_backoff_s: 40"));
  coordinator_->Tick();
  launcher_->Exit(id, 1, 0, kExitFailed);
  coordinator_->Tick();
  clock_.Advance(40);
  coordinator_->Tick();
  launcher_->Exit(id, 2, 0, kExitFailed);
  coordinator_->Tick();
  clock_.Advance(59.9); // 80 s doubled, but at most 60
  coordinator_->Tick();
  EXPECT_EQ(State(id), v1::JOB_STATE_RESTARTING);
  clock_.Advance(0.1);
  coordinator_->Tick();
  EXPECT_EQ(State(id), v1::JOB_STATE_RUNNING);
}

TEST_F(CoordinatorTest, BadInputExitFailsTheJobWithoutRestarts) {
  const std::string id = Submit(Spec(1, "max_restarts: 3"));
  coordinator_->Tick();
  launcher_->Exit(id, 1, 0, kExitBadInput);
  coordinator_->Tick();
  v1::Job job = Get(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_TRUE(absl::StrContains(job.state_reason(),
                                "rank 0 exited with code 2 (bad input: not "
                                "retried)"))
      << job.state_reason();
  clock_.Advance(120);
  coordinator_->Tick();
  EXPECT_EQ(launcher_->launches().size(), 1u);
}

TEST_F(CoordinatorTest, SpawnFailureInsideLaunchFailsTheJobAtOnce) {
  // LocalLauncher reports a rank it cannot start from inside Launch(); the
  // coordinator must hold no lock of its own there.
  launcher_->set_spawn_fails(true);
  const std::string id = Submit(Spec(2));
  std::thread loop([&] { coordinator_->Tick(); });
  loop.join();
  coordinator_->Tick();
  v1::Job job = Get(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_TRUE(absl::StrContains(job.state_reason(),
                                "could not be started: cannot start "
                                "/nonexistent"))
      << job.state_reason();
  // Its slots are free again: the next job launches.
  launcher_->set_spawn_fails(false);
  const std::string next = Submit(Spec(2));
  coordinator_->Tick();
  EXPECT_EQ(State(next), v1::JOB_STATE_RUNNING);
}

TEST_F(CoordinatorTest, LauncherRefusalOfItsOwnSetupIsNotRetried) {
  launcher_->set_launch_error(
      absl::FailedPreconditionError("GPU 3 is not one this launcher offers"));
  const std::string id = Submit(Spec(1, "max_restarts: 3"));
  coordinator_->Tick();
  coordinator_->Tick();
  EXPECT_EQ(State(id), v1::JOB_STATE_FAILED);
  launcher_->set_launch_error(absl::UnavailableError("agent is gone"));
  const std::string other = Submit(Spec(1, "max_restarts: 3"));
  coordinator_->Tick();
  coordinator_->Tick();
  EXPECT_EQ(State(other), v1::JOB_STATE_RESTARTING);
}

TEST_F(CoordinatorTest, SilentRankIsHungAndTheGangRestarted) {
  const std::string id = Submit(Spec(2, "hang_timeout_s: 30"));
  coordinator_->Tick();
  coordinator_->OnHeartbeat(id, 1, 0);
  coordinator_->OnHeartbeat(id, 1, 1);
  for (int i = 0; i < 3; ++i) {
    clock_.Advance(10);
    v1::MetricSample sample;
    sample.set_rank(0);
    sample.set_step(i + 1);
    sample.set_knn_top1(-1);
    coordinator_->OnMetric(id, 1, sample);
    coordinator_->Tick();
    ASSERT_EQ(State(id), v1::JOB_STATE_RUNNING) << "after " << 10 * (i + 1);
  }
  clock_.Advance(0.5); // rank 1 silent for 30.5 s
  coordinator_->Tick();
  v1::Job job = Get(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_RESTARTING);
  EXPECT_TRUE(absl::StrContains(job.state_reason(),
                                "rank 1 is hung: no report for 30 s"))
      << job.state_reason();
  ASSERT_FALSE(launcher_->stops().empty());
  EXPECT_EQ(launcher_->stops().back().job_id, id);
}

TEST_F(CoordinatorTest, RankStuckAtOneStepIsHung) {
  const std::string id = Submit(Spec(1, "hang_timeout_s: 30"));
  coordinator_->Tick();
  v1::MetricSample sample;
  sample.set_rank(0);
  sample.set_step(7);
  sample.set_knn_top1(-1);
  for (int i = 0; i < 6; ++i) {
    coordinator_->OnMetric(id, 1, sample); // alive, but at step 7
    clock_.Advance(5);
    coordinator_->Tick();
    ASSERT_EQ(State(id), v1::JOB_STATE_RUNNING) << "after " << 5 * (i + 1);
  }
  coordinator_->OnMetric(id, 1, sample);
  clock_.Advance(0.5); // at step 7 for 30.5 s
  coordinator_->Tick();
  v1::Job job = Get(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_RESTARTING);
  EXPECT_TRUE(absl::StrContains(job.state_reason(),
                                "rank 0 is hung: its step stayed at 7"))
      << job.state_reason();
}

TEST_F(CoordinatorTest, SlowRankIsReportedAsAStragglerOnTheWatchStream) {
  const std::string id = Submit(Spec(2, "straggler_factor: 2"));
  coordinator_->Tick();
  auto watch = coordinator_->Watch(id, false, false);
  ASSERT_TRUE(watch.ok());
  auto report = [&](int64_t rank, int64_t step, double seconds) {
    v1::MetricSample sample;
    sample.set_rank(rank);
    sample.set_step(step);
    sample.set_knn_top1(-1);
    sample.set_forward_seconds(seconds);
    coordinator_->OnMetric(id, 1, sample);
  };
  std::vector<v1::Notice> notices;
  auto drain = [&] {
    v1::WatchJobEvent event;
    while ((*watch)->Next(&event, std::chrono::milliseconds(0))) {
      if (event.has_notice())
        notices.push_back(event.notice());
    }
  };
  for (int step = 1; step <= 2; ++step) {
    report(0, step, 0.1);
    report(1, step, 0.25); // 2.5x the median
  }
  drain();
  EXPECT_TRUE(notices.empty()); // two strikes
  report(0, 3, 0.1);
  report(1, 3, 0.25);
  drain();
  ASSERT_EQ(notices.size(), 1u);
  EXPECT_EQ(notices[0].kind(), "straggler");
  EXPECT_EQ(notices[0].rank(), 1);
  EXPECT_TRUE(absl::StrContains(notices[0].message(),
                                "250.0 ms of compute per step against a "
                                "median of 100.0 ms"))
      << notices[0].message();
  report(1, 4, 0.15);
  drain();
  ASSERT_EQ(notices.size(), 2u);
  EXPECT_EQ(notices[1].kind(), "straggler_recovered");
  // Also in the job's log, under the rank.
  auto logs = coordinator_->ReadLogs(id, 1, 0);
  ASSERT_TRUE(logs.ok());
  ASSERT_EQ(logs->size(), 2u);
  EXPECT_TRUE(absl::StartsWith((*logs)[0].text(),
                               "momentum-server: rank 1 is a straggler"));
}

TEST_F(CoordinatorTest, CancelLandingDuringLaunchStopsTheGangRightAfter) {
  std::string id;
  launcher_->set_on_launch([&](const LaunchRequest &request) {
    // A client cancels while the loop is inside Launch().
    auto cancelled = coordinator_->Cancel(request.job_id, "");
    EXPECT_TRUE(cancelled.ok()) << cancelled.status();
  });
  id = Submit(Spec(2));
  coordinator_->Tick();
  EXPECT_EQ(State(id), v1::JOB_STATE_CANCELLED);
  coordinator_->Tick();
  EXPECT_EQ(
      launcher_->calls(),
      (std::vector<std::string>{"launch " + id + " 1", "stop " + id + " 1"}));
  // The ranks end; the job stays CANCELLED and its slots come back.
  launcher_->ExitAll(id, kExitStopped);
  launcher_->set_on_launch(nullptr);
  coordinator_->Tick();
  EXPECT_EQ(State(id), v1::JOB_STATE_CANCELLED);
  const std::string next = Submit(Spec(2));
  coordinator_->Tick();
  EXPECT_EQ(State(next), v1::JOB_STATE_RUNNING);
}

TEST_F(CoordinatorTest, CancelBeforeTheLaunchCommitsNothingElse) {
  const std::string id = Submit(Spec(1));
  ASSERT_TRUE(coordinator_->Cancel(id, "not needed").ok());
  coordinator_->Tick();
  v1::Job job = Get(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(job.state_reason(), "not needed");
  EXPECT_TRUE(launcher_->launches().empty());
}

TEST_F(CoordinatorTest, CancelRacingWithTheLastExitWins) {
  const std::string id = Submit(Spec(2));
  coordinator_->Tick();
  // Both ranks exit 0, and a cancel is committed before the loop sees them.
  launcher_->ExitAll(id, 0);
  ASSERT_TRUE(coordinator_->Cancel(id, "").ok());
  coordinator_->Tick();
  EXPECT_EQ(State(id), v1::JOB_STATE_CANCELLED);
  // A cancel after the job ended changes nothing.
  const std::string done = Submit(Spec(2));
  coordinator_->Tick();
  launcher_->ExitAll(done, 0);
  coordinator_->Tick();
  ASSERT_EQ(State(done), v1::JOB_STATE_SUCCEEDED);
  auto after = coordinator_->Cancel(done, "");
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->state(), v1::JOB_STATE_SUCCEEDED);
}

TEST_F(CoordinatorTest, StopThatReportsExitsFromInsideIsHandled) {
  launcher_->set_exit_on_stop(true);
  const std::string id = Submit(Spec(2));
  coordinator_->Tick();
  ASSERT_TRUE(coordinator_->Cancel(id, "").ok());
  coordinator_->Tick(); // Stop() calls back into OnRankExited
  coordinator_->Tick();
  EXPECT_EQ(launcher_->running(), 0u);
  const std::string next = Submit(Spec(2));
  coordinator_->Tick();
  EXPECT_EQ(State(next), v1::JOB_STATE_RUNNING);
}

TEST_F(CoordinatorTest, LostLauncherRestartsItsGangs) {
  const std::string id = Submit(Spec(1, "restart_backoff_s: 1"));
  coordinator_->Tick();
  coordinator_->RemoveLauncher(launcher_.get());
  auto other = AddLauncher("agent b", 1);
  coordinator_->Tick();
  v1::Job job = Get(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_RESTARTING);
  EXPECT_TRUE(absl::StrContains(job.state_reason(),
                                "rank 0 was lost: local disconnected"))
      << job.state_reason();
  clock_.Advance(1);
  coordinator_->Tick();
  EXPECT_EQ(State(id), v1::JOB_STATE_RUNNING);
  ASSERT_EQ(other->launches().size(), 1u);
  EXPECT_EQ(other->launches()[0].attempt, 2);
}

TEST_F(CoordinatorTest, RecoveryRelaunchesRunningJobsAfterStoppingLeftovers) {
  const std::string id = Submit(Spec(2));
  coordinator_->Tick();
  ASSERT_EQ(State(id), v1::JOB_STATE_RUNNING);
  // The coordinator goes; a new one opens the same state directory.
  launcher_->set_exit_on_stop(true);
  Open();
  EXPECT_EQ(State(id), v1::JOB_STATE_RESTARTING);
  EXPECT_TRUE(
      absl::StrContains(Get(id).state_reason(), "the coordinator restarted"));
  coordinator_->Recover();
  coordinator_->Tick();
  EXPECT_EQ(launcher_->calls(),
            (std::vector<std::string>{"leftovers " + id + " 1",
                                      "launch " + id + " 2"}));
  EXPECT_EQ(State(id), v1::JOB_STATE_RUNNING);
}

TEST_F(CoordinatorTest, SecondCoordinatorOnTheStateDirectoryIsRefused) {
  CoordinatorOptions options;
  options.state_dir = dir_;
  auto second = Coordinator::Create(options);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(
      second.status().message(),
      absl::StrCat("is in use by another momentum-server (pid ", ::getpid(),
                   ")")))
      << second.status();
  // Once the first is gone, the directory is free.
  coordinator_.reset();
  EXPECT_TRUE(Coordinator::Create(options).ok());
}

TEST_F(CoordinatorTest, OutputOfRanksThatAreNotRunningIsDropped) {
  const std::string id = Submit(Spec(1));
  coordinator_->Tick();
  coordinator_->OnRankOutput("/tmp/x", 1, 0, "escape");
  coordinator_->OnRankOutput("../../x", 1, 0, "escape");
  coordinator_->OnRankOutput(id, 7, 0, "other attempt");
  coordinator_->OnRankOutput(id, 1, 5, "no such rank");
  coordinator_->OnRankOutput(id, 1, 0, "kept");
  EXPECT_FALSE(fs::exists("/tmp/x/logs"));
  auto logs = coordinator_->ReadLogs(id, -1, 0);
  ASSERT_TRUE(logs.ok());
  ASSERT_EQ(logs->size(), 1u);
  EXPECT_EQ((*logs)[0].text(), "kept");
  // Not a job id: refused before it touches the store or a folder.
  EXPECT_EQ(coordinator_->ReadLogs("/tmp/x", -1, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Output folders are checked again at launch, on the filesystem as it is
// then: a folder swapped for a symlink into another user's folder, or onto
// a live job's output, fails the job before anything starts.
TEST_F(CoordinatorTest, OutputSwappedForASymlinkFailsAtLaunch) {
  Open(1);
  const std::string outputs = dir_ + "/outputs";
  auto submit = [&](const std::string &out, const std::string &owner) {
    absl::StatusOr<v1::Job> job = coordinator_->Submit(
        Spec(1), {"output_dir=" + out}, owner, /*owner_is_admin=*/false);
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? *job : v1::Job();
  };
  const v1::Job first = submit("first", "alice");
  coordinator_->Tick();
  ASSERT_EQ(State(first.id()), v1::JOB_STATE_RUNNING);
  const v1::Job queued = submit("b", "alice");
  EXPECT_EQ(queued.output_dir(), outputs + "/alice/b");
  // Meanwhile alice's b becomes a link into bob's folder.
  fs::create_directories(outputs + "/bob/b");
  fs::create_directories(outputs + "/alice");
  fs::create_directory_symlink(outputs + "/bob/b", outputs + "/alice/b");
  launcher_->ExitAll(first.id(), 0);
  coordinator_->Tick();
  const v1::Job failed = Get(queued.id());
  EXPECT_EQ(failed.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(failed.state_reason(),
            "not launched (bad input: not retried): output_dir must lie "
            "under " +
                outputs + "/alice for alice, got " + outputs +
                "/alice/b (which resolves to " + outputs + "/bob/b)");
  EXPECT_EQ(failed.restarts(), 0);
  ASSERT_EQ(launcher_->launches().size(), 1u); // the first job's only
  EXPECT_TRUE(fs::is_empty(outputs + "/bob/b"));

  // Two jobs of alice's; before they launch, d becomes a link to c. c
  // launches first (it is RUNNING when d is checked).
  Open(2);
  const v1::Job c = submit("c", "alice");
  const v1::Job d = submit("d", "alice");
  fs::create_directories(outputs + "/alice/c");
  fs::create_directory_symlink(outputs + "/alice/c", outputs + "/alice/d");
  coordinator_->Tick();
  EXPECT_EQ(State(c.id()), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(Get(d.id()).state_reason(),
            "not launched (bad input: not retried): output_dir " + outputs +
                "/alice/c is the output of " + c.id() +
                " (RUNNING): a job may not write into another job's output; "
                "pick another output_dir");
  EXPECT_EQ(State(d.id()), v1::JOB_STATE_FAILED);
  ASSERT_EQ(launcher_->launches().size(), 1u);
  EXPECT_EQ(launcher_->launches()[0].output_dir, outputs + "/alice/c");
}

// Ids come from peers (clients, agents, ranks): only job ids reach the
// store or a folder.
TEST_F(CoordinatorTest, JobIdsThatAreNotJobIdsAreRefused) {
  const std::string id = Submit(Spec(1));
  ASSERT_EQ(id, "job-1");
  EXPECT_EQ(coordinator_->GetJob("job-1/../x").status().message(),
            "job_id must be job-<n>, got \"job-1/../x\"");
  EXPECT_EQ(coordinator_->Cancel("../job-1", "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(coordinator_->Watch("job-1\n", false, false).status().message(),
            "job_id must be job-<n>, got \"job-1\\n\"");
  EXPECT_EQ(coordinator_->ReadLogs("", -1, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(State(id), v1::JOB_STATE_PENDING);
}

// Descriptors of this process that point at a rank's log file.
std::vector<int> RankLogFds() {
  std::vector<int> fds;
  for (const auto &entry : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const fs::path target = fs::read_symlink(entry.path(), ec);
    if (!ec && absl::StrContains(target.string(), "/logs/rank-")) {
      fds.push_back(std::stoi(entry.path().filename().string()));
    }
  }
  return fds;
}

TEST_F(CoordinatorTest, LogFilesAreCloseOnExecAndClosedWhenTheGangEnds) {
  const std::string id = Submit(Spec(2));
  coordinator_->Tick();
  coordinator_->OnRankOutput(id, 1, 0, "a");
  coordinator_->OnRankOutput(id, 1, 1, "b");
  const std::vector<int> open = RankLogFds();
  ASSERT_EQ(open.size(), 2u);
  for (int fd : open) {
    EXPECT_TRUE(::fcntl(fd, F_GETFD) & FD_CLOEXEC) << "fd " << fd;
  }
  launcher_->ExitAll(id, 0);
  coordinator_->Tick();
  EXPECT_EQ(State(id), v1::JOB_STATE_SUCCEEDED);
  EXPECT_TRUE(RankLogFds().empty());
}

TEST_F(CoordinatorTest, LongLinesAreCutAndTheFailureReasonBounded) {
  const std::string id = Submit(Spec(1, "max_restarts: 0"));
  coordinator_->Tick();
  const std::string huge(3 * JobLogs::kMaxLineBytes + 10, 'x');
  coordinator_->OnRankOutput(id, 1, 0, huge);
  auto logs = coordinator_->ReadLogs(id, 0, 0);
  ASSERT_TRUE(logs.ok());
  ASSERT_EQ(logs->size(), 4u);
  EXPECT_EQ((*logs)[3].text(), std::string(10, 'x'));
  EXPECT_EQ((*logs)[3].line_number(), 4);
  launcher_->Exit(id, 1, 0, kExitFailed);
  coordinator_->Tick();
  v1::Job job = Get(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_LT(job.state_reason().size(), 1024u) << job.state_reason().size();
}

// Log lines are proto strings, which must be UTF-8: a byte that is not
// becomes U+FFFD (EF BF BD), and pieces of a long line end between
// characters. 6000 x U+65E5 (E6 97 A5, 3 bytes) = 18000 bytes: the first
// piece holds floor(16384 / 3) = 5461 characters (16383 bytes), the second
// the other 539 (1617 bytes).
TEST_F(CoordinatorTest, LogLinesAreValidUtf8AndCutBetweenCharacters) {
  const std::string id = Submit(Spec(1, "max_restarts: 0"));
  coordinator_->Tick();
  coordinator_->OnRankOutput(id, 1, 0, "bad \xff byte, cut \xe6\x97");
  std::string wide;
  for (int i = 0; i < 6000; ++i) wide += "\xe6\x97\xa5";
  coordinator_->OnRankOutput(id, 1, 0, wide);
  auto logs = coordinator_->ReadLogs(id, 0, 0);
  ASSERT_TRUE(logs.ok());
  ASSERT_EQ(logs->size(), 3u);
  EXPECT_EQ((*logs)[0].text(),
            "bad \xef\xbf\xbd byte, cut \xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_EQ((*logs)[1].text().size(), 16383u);
  EXPECT_EQ((*logs)[2].text().size(), 1617u);
  EXPECT_EQ((*logs)[1].text() + (*logs)[2].text(), wide);
  // Every line serializes (a proto string with other bytes would not).
  for (const v1::LogLine& line : *logs) {
    std::string bytes;
    EXPECT_TRUE(line.SerializeToString(&bytes));
  }
}

TEST_F(CoordinatorTest, ResultComesFromRankZerosAccountOnTheStream) {
  const std::string id = Submit(Spec(2));
  coordinator_->Tick();
  v1::RunSummary account;
  account.set_steps(120);
  account.set_images_seen(1920);
  account.set_epochs_completed(2);
  account.set_knn_top1(0.8125);
  account.set_export_path("/out/backbone.pt");
  v1::RunSummary other = account;
  other.set_export_path("/wrong");
  coordinator_->OnSummary(id, 1, 1, other); // not rank 0
  coordinator_->OnSummary(id, 7, 0, other); // not this attempt
  coordinator_->OnSummary(id, 1, 0, account);
  launcher_->ExitAll(id, 0);
  coordinator_->Tick();
  v1::Job job = Get(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(job.export_path(), "/out/backbone.pt");
  EXPECT_DOUBLE_EQ(job.progress().knn_top1(), 0.8125);
  EXPECT_EQ(job.progress().step(), 120);
  EXPECT_EQ(job.progress().fraction(), 1.0);
  EXPECT_EQ(job.state_reason(),
            "all 2 ranks exited with code 0; 120 steps, 1920 images; kNN "
            "top-1 81.25%");
  // The spec went out as stored, the output folder as a parameter.
  const LaunchRequest request = launcher_->launches()[0];
  EXPECT_EQ(request.spec_yaml, job.spec_yaml());
  EXPECT_EQ(request.output_dir, job.output_dir());
  // A relative output_dir of an anonymous caller: in _anonymous/ under
  // the default output root.
  EXPECT_TRUE(
      absl::StartsWith(request.output_dir, dir_ + "/outputs/_anonymous/out-"))
      << request.output_dir;
}

TEST_F(CoordinatorTest, CudaRanksTakeFreeGpusNotSlots) {
  Open(1, {0, 1});
  const std::string gpu_job = Submit(Spec(2, "", "cuda"));
  const std::string cpu_job = Submit(Spec(1));
  coordinator_->Tick();
  EXPECT_EQ(State(gpu_job), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(State(cpu_job), v1::JOB_STATE_RUNNING);
  ASSERT_EQ(launcher_->launches().size(), 2u);
  EXPECT_EQ(launcher_->launches()[0].gpus, (std::vector<int>{0, 1}));
  EXPECT_TRUE(launcher_->launches()[1].gpus.empty());
  // A third CUDA job asks for more GPUs than exist: refused at submission.
  auto refused = coordinator_->Submit(Spec(3, "", "cuda"), {});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CoordinatorTest, WatchStreamsAreLimited) {
  coordinator_.reset();
  CoordinatorOptions options;
  options.state_dir = dir_;
  options.clock = &clock_;
  options.max_watch_streams = 2;
  auto created = Coordinator::Create(options);
  ASSERT_TRUE(created.ok());
  coordinator_ = *std::move(created);
  const std::string id = Submit(Spec(1));
  auto a = coordinator_->Watch(id, true, true);
  auto b = coordinator_->Watch(id, true, true);
  ASSERT_TRUE(a.ok() && b.ok());
  auto c = coordinator_->Watch(id, true, true);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(c.status().message(), "--max-watch-streams"));
  coordinator_->Unwatch(*a);
  EXPECT_TRUE(coordinator_->Watch(id, true, true).ok());
}

TEST_F(CoordinatorTest, WatchStreamsArePerUser) {
  coordinator_.reset();
  CoordinatorOptions options;
  options.state_dir = dir_;
  options.clock = &clock_;
  options.max_watch_streams_per_user = 2;
  auto created = Coordinator::Create(options);
  ASSERT_TRUE(created.ok());
  coordinator_ = *std::move(created);
  const std::string id = Submit(Spec(1));
  auto a = coordinator_->Watch(id, true, true, "alice");
  auto b = coordinator_->Watch(id, false, true, "alice");
  ASSERT_TRUE(a.ok() && b.ok());
  auto c = coordinator_->Watch(id, true, true, "alice");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(c.status().message(),
            "\"alice\" already have 2 watch and log streams open, the limit "
            "per user (--max-watch-streams-per-user); close one or try again "
            "later");
  // Bob has places of his own; alice gets one back when she closes one.
  EXPECT_TRUE(coordinator_->Watch(id, true, true, "bob").ok());
  coordinator_->Unwatch(*a);
  EXPECT_TRUE(coordinator_->Watch(id, true, true, "alice").ok());
}

TEST_F(CoordinatorTest, RequestSizesAreRefusedNamingTheLimitAndStoreNothing) {
  coordinator_.reset();
  CoordinatorOptions options;
  options.state_dir = dir_;
  options.clock = &clock_;
  options.limits.max_spec_bytes = 200;
  options.limits.max_overrides = 2;
  options.limits.max_override_bytes = 16;
  options.limits.max_page_size = 3;
  options.limits.max_reason_bytes = 10;
  auto created = Coordinator::Create(options);
  ASSERT_TRUE(created.ok());
  coordinator_ = *std::move(created);
  launcher_ = AddLauncher("local", 2);

  auto refused = [&](const std::string& spec,
                     const std::vector<std::string>& overrides) {
    auto job = coordinator_->Submit(spec, overrides);
    EXPECT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(job.status().message());
  };
  EXPECT_EQ(refused(std::string(201, '#'), {}),
            "spec_yaml must have at most 200 bytes, got 201");
  EXPECT_EQ(refused(Spec(1), {"seed=1", "seed=2", "seed=3"}),
            "overrides must have at most 2 entries, got 3");
  EXPECT_EQ(refused(Spec(1), {"seed=1", "optim.epochs=1000"}),
            "overrides[1] must have at most 16 bytes, got 17");
  v1::ListJobsRequest list;
  EXPECT_EQ(coordinator_->ListJobs(list)->total_size(), 0);

  // Pages: at most 3 jobs, the default page too.
  for (int i = 0; i < 4; ++i) Submit(Spec(1));
  list.set_page_size(4);
  EXPECT_EQ(coordinator_->ListJobs(list).status().message(),
            "page_size must be in [0, 3], got 4");
  list.set_page_size(0);
  auto page = coordinator_->ListJobs(list);
  ASSERT_TRUE(page.ok());
  EXPECT_EQ(page->jobs_size(), 3);
  EXPECT_EQ(page->next_page_token(), "3");
  list.set_name_contains(std::string(129, 't'));
  EXPECT_EQ(coordinator_->ListJobs(list).status().message(),
            "name_contains must have at most 128 bytes, got 129");

  // A cancel's reason: 11 bytes are refused and the job stays as it was.
  const std::string id = Get(page->jobs(0).id()).id();
  auto cancelled = coordinator_->Cancel(id, "0123456789a");
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cancelled.status().message(),
            "reason must have at most 10 bytes, got 11");
  EXPECT_EQ(State(id), v1::JOB_STATE_PENDING);
  EXPECT_TRUE(coordinator_->Cancel(id, "0123456789").ok());
}

TEST_F(CoordinatorTest, ListPageEndsBeforeItsResponseBudget) {
  coordinator_.reset();
  CoordinatorOptions options;
  options.state_dir = dir_;
  options.clock = &clock_;
  // Less than any one job: every page holds one job, never none.
  options.limits.max_list_response_bytes = 1;
  auto created = Coordinator::Create(options);
  ASSERT_TRUE(created.ok());
  coordinator_ = *std::move(created);
  for (int i = 0; i < 3; ++i) Submit(Spec(1));
  v1::ListJobsRequest list;
  std::vector<std::string> seen;
  for (int page = 0; page < 3; ++page) {
    auto listed = coordinator_->ListJobs(list);
    ASSERT_TRUE(listed.ok());
    ASSERT_EQ(listed->jobs_size(), 1);
    EXPECT_EQ(listed->total_size(), 3);
    seen.push_back(listed->jobs(0).id());
    list.set_page_token(listed->next_page_token());
  }
  EXPECT_EQ(list.page_token(), "");
  EXPECT_EQ(seen.size(), 3u);
  EXPECT_NE(seen[0], seen[1]);
  EXPECT_NE(seen[1], seen[2]);
}

// 10 lines/s in bursts of 1 s: the bucket holds 10 lines and resumes when
// half full (5). The clock is the fake one, so the counts are exact.
TEST_F(CoordinatorTest, FloodingRankIsCutWithOneNoticePerBurst) {
  coordinator_.reset();
  CoordinatorOptions options;
  options.state_dir = dir_;
  options.clock = &clock_;
  options.log_rate = {10, 0, 1};
  auto created = Coordinator::Create(options);
  ASSERT_TRUE(created.ok());
  coordinator_ = *std::move(created);
  launcher_ = AddLauncher("local", 2);
  const std::string id = Submit(Spec(1));
  coordinator_->Tick();
  int n = 0;
  auto say = [&](int lines) {
    for (int i = 0; i < lines; ++i) {
      coordinator_->OnRankOutput(id, 1, 0, absl::StrCat("line ", ++n));
    }
  };
  say(25);               // lines 1-10 kept, 11-25 dropped (15)
  clock_.Advance(0.3);   // 3 lines back: still under half
  say(1);                // line 26 dropped (16)
  clock_.Advance(0.35);  // 6.5 lines: past half, resumes
  say(7);                // notice; lines 27-32 kept (6.5 -> 0.5); 33 dropped
  launcher_->ExitAll(id, 0);
  coordinator_->Tick();  // the rank ended in a flood: its notice
  EXPECT_EQ(State(id), v1::JOB_STATE_SUCCEEDED);

  auto logs = coordinator_->ReadLogs(id, 0, 0);
  ASSERT_TRUE(logs.ok());
  std::vector<std::string> texts;
  for (const v1::LogLine& line : *logs) texts.push_back(line.text());
  std::vector<std::string> expected;
  for (int i = 1; i <= 10; ++i) expected.push_back(absl::StrCat("line ", i));
  const std::string limit =
      " of rank 0: over the log rate limit (10 lines/s, 0 bytes/s, bursts "
      "of 1 s)";
  expected.push_back("momentum-server: dropped 16 lines" + limit);
  for (int i = 27; i <= 32; ++i) expected.push_back(absl::StrCat("line ", i));
  expected.push_back("momentum-server: dropped 1 line" + limit);
  EXPECT_EQ(texts, expected);
}

TEST_F(CoordinatorTest, RunningLoopThreadSchedulesAndShutsDownWithTheGrace) {
  launcher_->set_exit_on_stop(true);
  coordinator_->Start();
  const std::string id = Submit(Spec(2));
  for (int i = 0; i < 200 && State(id) != v1::JOB_STATE_RUNNING; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(State(id), v1::JOB_STATE_RUNNING);
  coordinator_->Shutdown();
  ASSERT_FALSE(launcher_->stops().empty());
  EXPECT_DOUBLE_EQ(launcher_->stops().back().grace_seconds, 0.5);
  // Stays RUNNING for the next coordinator to relaunch.
  EXPECT_EQ(State(id), v1::JOB_STATE_RUNNING);
}

} // namespace
} // namespace momentum::server
