// LaunchLocal with /bin/sh scripts as the ranks: the environment each rank
// gets, a failing rank stopping the gang, SIGKILL after the grace, and
// SIGINT/SIGTERM forwarded from the launcher's process. Every script bounds
// its own run (at most 20 s), so a launcher that fails to stop a rank makes a
// test fail slowly instead of hang.
#include "worker/launcher.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tests/proc_util.h"

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Far beyond what any test needs; far below the scripts' own 20 s bound.
constexpr std::chrono::seconds kWaitTimeout{10};

// A rank that does nothing for at most 20 s; `exec` so that signals reach
// sleep itself and no grandchild outlives the rank.
constexpr char kSleep[] = "exec sleep 20";

// A new empty folder for one test.
std::string TempDir(const std::string& name) {
  std::string pattern =
      (fs::temp_directory_path() / ("momentum-" + name + "-XXXXXX")).string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp " << pattern;
  }
  return pattern;
}

using ::momentum::testing::ReadFile;

// The command for `script` run by /bin/sh with $1 = dir and $2, ... = args.
std::vector<std::string> Sh(const std::string& script, const std::string& dir,
                            const std::vector<std::string>& args = {}) {
  std::vector<std::string> argv = {"/bin/sh", "-c", script, "sh", dir};
  argv.insert(argv.end(), args.begin(), args.end());
  return argv;
}

// Waits until every file exists; false after kWaitTimeout.
bool WaitForFiles(const std::vector<std::string>& paths) {
  const auto deadline = Clock::now() + kWaitTimeout;
  for (const std::string& path : paths) {
    while (!fs::exists(path)) {
      if (Clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  return true;
}

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

class LauncherWorldTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(LauncherWorldTest, EveryRankSeesItsRankAndTheSharedRendezvous) {
  const int64_t nproc = GetParam();
  const std::string dir = TempDir("launcher-env-" + std::to_string(nproc));
  // Inherited variables reach the ranks; stale rank variables do not.
  ASSERT_EQ(::setenv("MOMENTUM_LAUNCHER_TEST_INHERITED", "yes", 1), 0);
  ASSERT_EQ(::setenv("RANK", "77", 1), 0);
  LaunchOptions options;
  options.argv =
      Sh("printf '%s %s %s %s %s %s %s %s\\n' \"$RANK\" \"$LOCAL_RANK\" "
         "\"$WORLD_SIZE\" \"$LOCAL_WORLD_SIZE\" \"$MASTER_ADDR\" "
         "\"$MASTER_PORT\" \"$MOMENTUM_LAUNCHER_TEST_INHERITED\" "
         "\"$(env | grep -c '^RANK=')\" > \"$1/env.$RANK\"",
         dir);
  options.nproc = nproc;
  options.master_port = 0;
  absl::StatusOr<LaunchResult> result = LaunchLocal(options);
  ::unsetenv("MOMENTUM_LAUNCHER_TEST_INHERITED");
  ::unsetenv("RANK");
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0) << result->message;
  EXPECT_EQ(result->failed_rank, -1);
  EXPECT_EQ(result->message,
            "all " + std::to_string(nproc) + " ranks exited with code 0");

  std::string port;
  for (int64_t rank = 0; rank < nproc; ++rank) {
    std::istringstream line(ReadFile(dir + "/env." + std::to_string(rank)));
    std::string r, local, world, local_world, addr, p, inherited, count;
    line >> r >> local >> world >> local_world >> addr >> p >> inherited >>
        count;
    EXPECT_EQ(r, std::to_string(rank));
    EXPECT_EQ(local, std::to_string(rank));
    EXPECT_EQ(world, std::to_string(nproc));
    EXPECT_EQ(local_world, std::to_string(nproc));
    EXPECT_EQ(addr, "127.0.0.1");
    EXPECT_EQ(inherited, "yes") << "rank " << rank;
    EXPECT_EQ(count, "1") << "rank " << rank << ": RANK set twice";
    ASSERT_FALSE(p.empty()) << "rank " << rank;
    EXPECT_GT(std::stoi(p), 0);
    EXPECT_LE(std::stoi(p), 65535);
    if (rank == 0) port = p;
    EXPECT_EQ(p, port) << "rank " << rank;
  }
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Worlds, LauncherWorldTest, ::testing::Values(1, 2, 4),
                         [](const auto& info) {
                           return "nproc" + std::to_string(info.param);
                         });

TEST(LauncherTest, PassesAGivenAddressAndPortOn) {
  const std::string dir = TempDir("launcher-port");
  LaunchOptions options;
  options.argv =
      Sh("echo \"$MASTER_ADDR:$MASTER_PORT\" > \"$1/addr.$RANK\"", dir);
  options.nproc = 2;
  options.master_addr = "10.1.2.3";
  options.master_port = 29517;
  absl::StatusOr<LaunchResult> result = LaunchLocal(options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0) << result->message;
  EXPECT_EQ(ReadFile(dir + "/addr.0"), "10.1.2.3:29517\n");
  EXPECT_EQ(ReadFile(dir + "/addr.1"), "10.1.2.3:29517\n");
  fs::remove_all(dir);
}

TEST(LauncherTest, StopsTheOtherRanksWhenOneExitsWithAnError) {
  const std::string dir = TempDir("launcher-fail");
  LaunchOptions options;
  options.argv =
      Sh(std::string("if [ \"$RANK\" = 1 ]; then exit 3; fi; ") + kSleep, dir);
  options.nproc = 3;
  const auto start = Clock::now();
  absl::StatusOr<LaunchResult> result = LaunchLocal(options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_LT(SecondsSince(start), 5.0) << "the sleepers were not stopped";
  EXPECT_EQ(result->exit_code, 3);
  EXPECT_EQ(result->failed_rank, 1);
  EXPECT_EQ(result->message, "rank 1 exited with code 3");
  fs::remove_all(dir);
}

TEST(LauncherTest, KillsARankThatIgnoresSigtermAfterTheGrace) {
  const std::string dir = TempDir("launcher-grace");
  LaunchOptions options;
  // Rank 1 fails only once rank 0 ignores SIGTERM, so that the SIGTERM does
  // not reach rank 0 before its trap.
  options.argv = Sh(
      "if [ \"$RANK\" = 0 ]; then trap '' TERM; touch \"$1/ready\"; exec sleep "
      "20; fi; i=0; while [ ! -e \"$1/ready\" ] && [ $i -lt 2000 ]; do sleep "
      "0.01; i=$((i+1)); done; exit 1",
      dir);
  options.nproc = 2;
  options.grace = std::chrono::milliseconds(500);
  const auto start = Clock::now();
  absl::StatusOr<LaunchResult> result = LaunchLocal(options);
  ASSERT_TRUE(result.ok()) << result.status();
  const double seconds = SecondsSince(start);
  EXPECT_GE(seconds, 0.5);
  EXPECT_LT(seconds, 5.0) << "rank 0 was not killed after the grace";
  EXPECT_EQ(result->exit_code, 1);
  EXPECT_EQ(result->failed_rank, 1);
  EXPECT_EQ(result->message,
            "rank 1 exited with code 1; SIGKILL after the 500 ms grace: "
            "rank 0");
  fs::remove_all(dir);
}

TEST(LauncherTest, ReportsARankKilledByASignal) {
  const std::string dir = TempDir("launcher-killed");
  LaunchOptions options;
  options.argv = Sh(
      std::string("if [ \"$RANK\" = 0 ]; then kill -9 $$; fi; ") + kSleep, dir);
  options.nproc = 2;
  const auto start = Clock::now();
  absl::StatusOr<LaunchResult> result = LaunchLocal(options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_LT(SecondsSince(start), 5.0);
  EXPECT_EQ(result->exit_code, 1);
  EXPECT_EQ(result->failed_rank, 0);
  EXPECT_EQ(result->message, "rank 0 was killed by signal 9");
  fs::remove_all(dir);
}

TEST(LauncherTest, RanksExitingWithZeroLeaveTheOthersRunning) {
  const std::string dir = TempDir("launcher-staggered");
  LaunchOptions options;
  // Rank 0 ends at once; rank 1 only after that, and then writes a file.
  options.argv =
      Sh("if [ \"$RANK\" = 0 ]; then exit 0; fi; sleep 0.3; touch \"$1/done\"",
         dir);
  options.nproc = 2;
  absl::StatusOr<LaunchResult> result = LaunchLocal(options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0) << result->message;
  EXPECT_TRUE(fs::exists(dir + "/done"));
  fs::remove_all(dir);
}

// (signal, its name for trap, the launcher's exit code)
class LauncherSignalTest
    : public ::testing::TestWithParam<std::tuple<int, std::string, int>> {};

TEST_P(LauncherSignalTest, ForwardsTheSignalToEveryRank) {
  const auto [sig, name, exit_code] = GetParam();
  const std::string dir = TempDir("launcher-forward-" + name);
  constexpr int64_t kRanks = 3;
  LaunchOptions options;
  // Each rank records the signal and exits 143 as the worker does (for SIGINT
  // too). The short sleeps let the trap run within 50 ms; exit 5 after 20 s.
  options.argv = Sh(
      "trap 'touch \"$1/got.$RANK\"; exit 143' $2; touch \"$1/ready.$RANK\"; "
      "i=0; while [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; exit 5",
      dir, {name});
  options.nproc = kRanks;
  options.grace = std::chrono::milliseconds(5000);
  std::future<absl::StatusOr<LaunchResult>> launch = std::async(
      std::launch::async, [&options] { return LaunchLocal(options); });
  std::vector<std::string> ready, got;
  for (int64_t rank = 0; rank < kRanks; ++rank) {
    ready.push_back(dir + "/ready." + std::to_string(rank));
    got.push_back(dir + "/got." + std::to_string(rank));
  }
  // The handlers are in place before the first rank starts.
  ASSERT_TRUE(WaitForFiles(ready));
  const auto start = Clock::now();
  ASSERT_EQ(::kill(::getpid(), sig), 0);
  ASSERT_EQ(launch.wait_for(kWaitTimeout), std::future_status::ready);
  EXPECT_LT(SecondsSince(start), 4.0) << "waited for the grace";
  absl::StatusOr<LaunchResult> result = launch.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, exit_code) << result->message;
  EXPECT_EQ(result->failed_rank, -1) << result->message;
  EXPECT_EQ(result->message, "stopped by SIG" + name);
  for (const std::string& path : got) {
    EXPECT_TRUE(fs::exists(path)) << path;
  }
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(
    Signals, LauncherSignalTest,
    ::testing::Values(std::make_tuple(SIGTERM, std::string("TERM"), 143),
                      std::make_tuple(SIGINT, std::string("INT"), 130)),
    [](const auto& info) { return std::get<1>(info.param); });

int g_test_handler_calls = 0;
void TestHandler(int) { ++g_test_handler_calls; }

TEST(LauncherTest, RestoresTheSignalHandlersItReplaced) {
  struct sigaction mine = {};
  mine.sa_handler = TestHandler;
  sigemptyset(&mine.sa_mask);
  struct sigaction old_term, old_int;
  ASSERT_EQ(::sigaction(SIGTERM, &mine, &old_term), 0);
  ASSERT_EQ(::sigaction(SIGINT, &mine, &old_int), 0);
  LaunchOptions options;
  options.argv = {"/bin/sh", "-c", "exit 0"};
  absl::StatusOr<LaunchResult> result = LaunchLocal(options);
  struct sigaction term_after, int_after;
  ::sigaction(SIGTERM, &old_term, &term_after);
  ::sigaction(SIGINT, &old_int, &int_after);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0);
  EXPECT_EQ(term_after.sa_handler, &TestHandler);
  EXPECT_EQ(int_after.sa_handler, &TestHandler);
}

TEST(LauncherTest, RefusesASecondLaunchWhileOneRuns) {
  const std::string dir = TempDir("launcher-busy");
  LaunchOptions options;
  options.argv = Sh(
      "touch \"$1/ready\"; i=0; while [ ! -e \"$1/go\" ] && [ $i -lt 2000 ]; "
      "do sleep 0.01; i=$((i+1)); done",
      dir);
  std::future<absl::StatusOr<LaunchResult>> first = std::async(
      std::launch::async, [&options] { return LaunchLocal(options); });
  ASSERT_TRUE(WaitForFiles({dir + "/ready"}));
  absl::StatusOr<LaunchResult> second = LaunchLocal(options);
  std::ofstream(dir + "/go").put('\n');
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition)
      << second.status();
  ASSERT_EQ(first.wait_for(kWaitTimeout), std::future_status::ready);
  absl::StatusOr<LaunchResult> result = first.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_code, 0) << result->message;
  fs::remove_all(dir);
}

TEST(LauncherTest, FailsWhenTheProgramCannotBeStarted) {
  LaunchOptions options;
  options.argv = {"/nonexistent/momentum-launcher-test"};
  options.nproc = 2;
  absl::StatusOr<LaunchResult> result = LaunchLocal(options);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kNotFound)
      << result.status();
  EXPECT_NE(result.status().message().find(
                "cannot start rank 0 (/nonexistent/momentum-launcher-test)"),
            absl::string_view::npos)
      << result.status();
}

TEST(LauncherTest, RejectsBadOptions) {
  LaunchOptions empty;
  EXPECT_EQ(LaunchLocal(empty).status().code(),
            absl::StatusCode::kInvalidArgument);
  LaunchOptions no_ranks;
  no_ranks.argv = {"/bin/true"};
  no_ranks.nproc = 0;
  EXPECT_EQ(LaunchLocal(no_ranks).status().code(),
            absl::StatusCode::kInvalidArgument);
  LaunchOptions bad_port;
  bad_port.argv = {"/bin/true"};
  bad_port.master_port = 70000;
  EXPECT_EQ(LaunchLocal(bad_port).status().code(),
            absl::StatusCode::kInvalidArgument);
  LaunchOptions bad_grace;
  bad_grace.argv = {"/bin/true"};
  bad_grace.grace = std::chrono::milliseconds(-1);
  EXPECT_EQ(LaunchLocal(bad_grace).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace momentum::worker
