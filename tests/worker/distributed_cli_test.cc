// momentum-worker as a group of real processes: --nproc starts local ranks
// that rendezvous over a TCPStore on loopback and train with Gloo.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "tests/proc_util.h"
#include "tests/worker/test_data.h"

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;
using momentum::testing::ReadFile;

struct WorkerRun {
  int exit_code = -1;
  std::string output;
};

// Runs the worker with a time limit (coreutils timeout), output captured.
WorkerRun RunWorker(const std::string& args, const std::string& dir) {
  const char* bin = std::getenv("MOMENTUM_BINARY_DIR");
  const std::string worker =
      std::string(bin ? bin : ".") + "/worker/momentum-worker";
  const std::string log = dir + "/worker.log";
  const std::string cmd =
      "timeout -k 5 180 " + worker + " " + args + " > " + log + " 2>&1";
  const int status = std::system(cmd.c_str());
  WorkerRun run;
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  run.output = ReadFile(log);
  return run;
}

class DistributedCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempDir("distributed-cli");
    testing::WriteFakeFashionMnist(dir_ + "/data", 96, 40, 12);
    std::ofstream(dir_ + "/job.yaml") << R"(name: dist
seed: 3
output_dir: )" << dir_ + "/out"
                                      << R"(
model: {width: 4, in_channels: 1, small_stem: true}
moco: {dim: 8, queue_size: 40, bn: shuffle}
data: {path: )" << dir_ + "/data"
                                      << R"(, loader_threads: 1}
optim: {batch_size: 16, epochs: 2, lr: 0.1}
eval: {every_epochs: 1, knn_k: 10}
checkpoint: {every_steps: 2, keep: 2}
logging: {every_steps: 2}
resources: {threads: 1, timeout_s: 60}
)";
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string dir_;
};

TEST_F(DistributedCliTest, TwoLocalRanksTrainTogether) {
  WorkerRun run = RunWorker("--nproc 2 --config " + dir_ + "/job.yaml", dir_);
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("kNN top-1"), std::string::npos) << run.output;
  auto summary =
      nlohmann::json::parse(std::ifstream(dir_ + "/out/summary.json"));
  EXPECT_EQ(summary["world_size"].get<int64_t>(), 2);
  // The batch in the spec is the global batch: 96 / 16 = 6 steps per epoch.
  EXPECT_EQ(summary["steps"].get<int64_t>(), 12);
  EXPECT_EQ(summary["images_seen"].get<int64_t>(), 12 * 16);
  EXPECT_EQ(summary["knn_curve"].size(), 2u);
  EXPECT_TRUE(fs::exists(dir_ + "/out/backbone.pt"));
}

TEST_F(DistributedCliTest, ResumesAGroupRunFromRankZerosCheckpoint) {
  WorkerRun first = RunWorker(
      "--nproc 2 --config " + dir_ + "/job.yaml --set optim.steps=4", dir_);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  WorkerRun second =
      RunWorker("--nproc 2 --config " + dir_ + "/job.yaml", dir_);
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("resuming from"), std::string::npos)
      << second.output;
  auto summary =
      nlohmann::json::parse(std::ifstream(dir_ + "/out/summary.json"));
  EXPECT_EQ(summary["steps"].get<int64_t>(), 12);
  EXPECT_TRUE(summary["resumed"].get<bool>());
}

TEST_F(DistributedCliTest, OneProcessResumesATwoRankRunKeepingTheBatch) {
  WorkerRun first = RunWorker(
      "--nproc 2 --config " + dir_ + "/job.yaml --set optim.steps=4", dir_);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  WorkerRun second = RunWorker("--config " + dir_ + "/job.yaml", dir_);
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("written by 2 ranks, this run has 1: the "
                               "global batch stays 16"),
            std::string::npos)
      << second.output;
  auto summary =
      nlohmann::json::parse(std::ifstream(dir_ + "/out/summary.json"));
  EXPECT_EQ(summary["steps"].get<int64_t>(), 12);
  EXPECT_EQ(summary["world_size"].get<int64_t>(), 1);
}

TEST_F(DistributedCliTest, FourRanksResumeATwoRankRunKeepingTheBatch) {
  WorkerRun first = RunWorker(
      "--nproc 2 --config " + dir_ + "/job.yaml --set optim.steps=4", dir_);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  WorkerRun second =
      RunWorker("--nproc 4 --config " + dir_ + "/job.yaml", dir_);
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("written by 2 ranks, this run has 4: the "
                               "global batch stays 16"),
            std::string::npos)
      << second.output;
  auto summary =
      nlohmann::json::parse(std::ifstream(dir_ + "/out/summary.json"));
  EXPECT_EQ(summary["steps"].get<int64_t>(), 12);
  EXPECT_EQ(summary["world_size"].get<int64_t>(), 4);
  EXPECT_EQ(summary["images_seen"].get<int64_t>(), 12 * 16);
}

TEST_F(DistributedCliTest, FailingRankStopsTheGroupAndIsNamed) {
  // Truncated data: every rank fails while loading; the launcher reports
  // the first failure with its rank and exits non-zero.
  const std::string images = dir_ + "/data/train-images-idx3-ubyte.gz";
  fs::resize_file(images, fs::file_size(images) / 2);
  WorkerRun run = RunWorker("--nproc 2 --config " + dir_ + "/job.yaml", dir_);
  EXPECT_NE(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("rank "), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("train-images-idx3-ubyte.gz"), std::string::npos)
      << run.output;
}

// Collapse is judged on the ranks' mean spread: both ranks fire at the same
// step with the same values and the group ends together. A threshold above
// any spread (0.999 of the healthy one) makes it fire at the first check.
TEST_F(DistributedCliTest, CollapseIsJudgedAlikeOnEveryRank) {
  WorkerRun run =
      RunWorker("--nproc 2 --config " + dir_ +
                    "/job.yaml --set faults.collapse_std_ratio=0.999 --set "
                    "faults.collapse_patience=1 --set faults.on_collapse=fail",
                dir_);
  EXPECT_NE(run.exit_code, 0) << run.output;
  // One message per rank, word for word the same.
  std::vector<std::string> messages;
  std::istringstream lines(run.output);
  for (std::string line; std::getline(lines, line);) {
    const size_t at = line.find("feature collapse at step");
    if (at != std::string::npos) messages.push_back(line.substr(at));
  }
  ASSERT_GE(messages.size(), 2u) << run.output;
  for (const std::string& m : messages) {
    EXPECT_EQ(m.substr(0, m.find(" (faults.on_collapse")),
              messages[0].substr(0, messages[0].find(" (faults.on_collapse")))
        << run.output;
  }
  EXPECT_NE(messages[0].find("feature collapse at step 2:"), std::string::npos)
      << run.output;
}

using momentum::testing::ChildrenOf;
using momentum::testing::StopAndReap;

// Starts `momentum-worker --nproc 2` on the job with its output in `log`.
pid_t SpawnLauncher(const std::string& config, const std::string& log,
                    const std::vector<std::string>& extra) {
  const char* bin = std::getenv("MOMENTUM_BINARY_DIR");
  const std::string worker =
      std::string(bin ? bin : ".") + "/worker/momentum-worker";
  std::vector<std::string> args = {worker, "--nproc", "2", "--config", config};
  args.insert(args.end(), extra.begin(), extra.end());
  fs::remove(log);
  return momentum::testing::SpawnLogged(args, log);
}

// Waits for `pid` until `deadline`; kills it then. Returns the wait status,
// or -1 when it had to be killed.
int WaitUntil(pid_t pid, std::chrono::steady_clock::time_point deadline) {
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return status;
}

class DistributedFaultTest : public DistributedCliTest {
 protected:
  // Starts a long group run and waits until it trains (a checkpoint exists).
  void StartTraining(std::vector<std::string> extra = {}) {
    log_ = dir_ + "/fault.log";
    extra.insert(extra.begin(), {"--set", "optim.epochs=1000", "--set",
                                 "resources.timeout_s=5"});
    launcher_ = SpawnLauncher(dir_ + "/job.yaml", log_, extra);
    ASSERT_GT(launcher_, 0);
    deadline_ = std::chrono::steady_clock::now() + std::chrono::seconds(90);
    while (!fs::exists(dir_ + "/out/checkpoints") ||
           fs::is_empty(dir_ + "/out/checkpoints")) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline_) << ReadFile(log_);
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  pid_t launcher_ = -1;
  std::string log_;
  std::chrono::steady_clock::time_point deadline_;
};

// A group stopped by SIGTERM mid-run (each rank checkpoints where it is)
// and resumed on as many ranks ends bit for bit where an uninterrupted run
// of the same spec ends: the same exported backbone, byte for byte, and the
// same kNN curve.
TEST_F(DistributedCliTest, SigtermAndResumeOnAsManyRanksIsBitExact) {
  const std::string straight = dir_ + "/straight", broken = dir_ + "/broken";
  const std::string epochs = "optim.epochs=20";
  WorkerRun whole =
      RunWorker("--nproc 2 --config " + dir_ + "/job.yaml --set " + epochs +
                    " --set output_dir=" + straight,
                dir_);
  ASSERT_EQ(whole.exit_code, 0) << whole.output;

  const std::string log = dir_ + "/interrupted.log";
  const pid_t launcher =
      SpawnLauncher(dir_ + "/job.yaml", log,
                    {"--set", epochs, "--set", "output_dir=" + broken});
  ASSERT_GT(launcher, 0);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(90);
  while (!fs::exists(broken + "/checkpoints") ||
         fs::is_empty(broken + "/checkpoints")) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << ReadFile(log);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(kill(launcher, SIGTERM), 0);
  const int status = WaitUntil(launcher, deadline);
  ASSERT_TRUE(WIFEXITED(status)) << ReadFile(log);
  // Stopped before the end (not a run that happened to finish first).
  ASSERT_NE(WEXITSTATUS(status), 0) << ReadFile(log);
  ASSERT_FALSE(fs::exists(broken + "/backbone.pt")) << ReadFile(log);

  WorkerRun rest = RunWorker("--nproc 2 --config " + dir_ + "/job.yaml --set " +
                                 epochs + " --set output_dir=" + broken,
                             dir_);
  ASSERT_EQ(rest.exit_code, 0) << rest.output;
  EXPECT_NE(rest.output.find("resuming from"), std::string::npos)
      << rest.output;
  const std::string a = ReadFile(straight + "/backbone.pt");
  const std::string b = ReadFile(broken + "/backbone.pt");
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b) << "the exported backbones differ";
  auto sa = nlohmann::json::parse(std::ifstream(straight + "/summary.json"));
  auto sb = nlohmann::json::parse(std::ifstream(broken + "/summary.json"));
  EXPECT_EQ(sa["steps"], sb["steps"]);
  EXPECT_EQ(sa["knn_curve"].dump(), sb["knn_curve"].dump());
  EXPECT_TRUE(sb["resumed"].get<bool>());
}

// A rank killed in the middle of training: the launcher notices, stops the
// other rank and exits non-zero naming the rank.
TEST_F(DistributedFaultTest, KilledRankStopsTheGroupAndIsNamed) {
  StartTraining();
  const pid_t rank1 = momentum::testing::RankChild(launcher_, 1);
  ASSERT_GT(rank1, 0);
  ASSERT_EQ(kill(rank1, SIGKILL), 0);
  const int status = WaitUntil(launcher_, deadline_);
  ASSERT_NE(status, -1) << "the launcher did not end after a rank was killed";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0);
  EXPECT_NE(ReadFile(log_).find("rank 1 was killed by signal 9"),
            std::string::npos)
      << ReadFile(log_);
  EXPECT_TRUE(ChildrenOf(launcher_).empty());
}

// A rank that hangs (stopped): the other rank's next collective times out
// after resources.timeout_s and it exits naming the operation; the launcher
// then ends the hung rank and exits non-zero.
TEST_F(DistributedFaultTest, HungRankTimesOutTheGroup) {
  StartTraining();
  const pid_t rank1 = momentum::testing::RankChild(launcher_, 1);
  ASSERT_GT(rank1, 0);
  ASSERT_EQ(kill(rank1, SIGSTOP), 0);
  const int status = WaitUntil(launcher_, deadline_);
  ASSERT_NE(status, -1) << "the group hung: " << ReadFile(log_);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0);
  const std::string output = ReadFile(log_);
  EXPECT_NE(output.find("rank 0"), std::string::npos) << output;
  EXPECT_NE(output.find("(rank 0 of 2)"), std::string::npos) << output;
  EXPECT_TRUE(ChildrenOf(launcher_).empty());
}

// The Cpus_allowed_list of a /proc status file, as the kernel writes it
// ("0-1", "0,2").
std::string CpusAllowedList(const fs::path& status_file) {
  std::ifstream status(status_file);
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("Cpus_allowed_list:", 0) == 0) {
      return line.substr(line.find_first_not_of(" \t", 18));
    }
  }
  return "";
}

// The Cpus_allowed_list of every thread of each rank of `launcher`, by
// LOCAL_RANK.
std::map<int, std::set<std::string>> RankCpuLists(pid_t launcher) {
  std::map<int, std::set<std::string>> out;
  for (pid_t pid : ChildrenOf(launcher)) {
    const std::string proc = "/proc/" + std::to_string(pid);
    std::ifstream env(proc + "/environ");
    int local_rank = -1;
    for (std::string var; std::getline(env, var, '\0');) {
      if (var.rfind("LOCAL_RANK=", 0) == 0)
        local_rank = std::stoi(var.substr(11));
    }
    std::error_code ec;
    for (const auto& task : fs::directory_iterator(proc + "/task", ec)) {
      out[local_rank].insert(CpusAllowedList(task.path() / "status"));
    }
  }
  return out;
}

// This process, and what it starts, on `cpus` until the end of the scope.
class CpusScope {
 public:
  explicit CpusScope(const std::vector<int>& cpus) {
    sched_getaffinity(0, sizeof(saved_), &saved_);
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int cpu : cpus) CPU_SET(cpu, &set);
    ok_ = sched_setaffinity(0, sizeof(set), &set) == 0;
  }
  ~CpusScope() { sched_setaffinity(0, sizeof(saved_), &saved_); }
  bool ok() const { return ok_; }
  // This thread's list.
  static std::string Own() {
    return CpusAllowedList("/proc/thread-self/status");
  }

 private:
  cpu_set_t saved_;
  bool ok_ = false;
};

std::vector<int> TwoCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  sched_getaffinity(0, sizeof(set), &set);
  std::vector<int> cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE && cpus.size() < 2; ++cpu) {
    if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  }
  return cpus;
}

// resources.cpu_affinity auto: on two CPUs, each of two ranks runs every
// thread (intra-op, loader, Gloo, store) on its own CPU, rank 0 on the
// first; none, or one CPU for the two: every thread may run on all of them.
TEST_F(DistributedFaultTest, RanksSplitTheCpusTheyMayRunOn) {
  const std::vector<int> two = TwoCpus();
  if (two.size() < 2) GTEST_SKIP() << "needs two CPUs";
  {
    CpusScope scope(two);
    ASSERT_TRUE(scope.ok());
    StartTraining();
    const auto lists = RankCpuLists(launcher_);
    StopAndReap(launcher_);
    EXPECT_EQ(lists, (std::map<int, std::set<std::string>>{
                         {0, {std::to_string(two[0])}},
                         {1, {std::to_string(two[1])}}}))
        << ReadFile(log_);
    const std::string expected_line = "rank 0: bound to CPUs " +
                                      std::to_string(two[0]) + " of " +
                                      CpusScope::Own() + ", 1 intra-op threads";
    EXPECT_NE(ReadFile(log_).find(expected_line), std::string::npos)
        << expected_line << "\n"
        << ReadFile(log_);
  }
  {
    CpusScope scope(two);
    fs::remove_all(dir_ + "/out");
    StartTraining({"--set", "resources.cpu_affinity=none"});
    const auto lists = RankCpuLists(launcher_);
    StopAndReap(launcher_);
    const std::string both = CpusScope::Own();
    EXPECT_EQ(lists,
              (std::map<int, std::set<std::string>>{{0, {both}}, {1, {both}}}))
        << ReadFile(log_);
    EXPECT_NE(ReadFile(log_).find("not bound (resources.cpu_affinity is none)"),
              std::string::npos)
        << ReadFile(log_);
  }
  {
    CpusScope scope({two[0]});
    fs::remove_all(dir_ + "/out");
    StartTraining();
    const auto lists = RankCpuLists(launcher_);
    StopAndReap(launcher_);
    const std::string one = std::to_string(two[0]);
    EXPECT_EQ(lists,
              (std::map<int, std::set<std::string>>{{0, {one}}, {1, {one}}}))
        << ReadFile(log_);
    EXPECT_NE(ReadFile(log_).find("not bound (1 CPUs for 2 ranks)"),
              std::string::npos)
        << ReadFile(log_);
  }
}

// A rank binds to the CPUs its launcher hands it in MOMENTUM_CPUS; a list
// it cannot parse, or CPUs it may not run on, fail it as bad input (exit 2)
// naming the variable.
TEST_F(DistributedCliTest, BadMomentumCpusFailsTheRankNamingIt) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"0-", "MOMENTUM_CPUS must be CPU numbers and ranges like 0-3,8"},
      {"8000", "binding the rank to MOMENTUM_CPUS=8000 (it may run on CPUs "},
  };
  for (const auto& [value, message] : cases) {
    setenv("MOMENTUM_CPUS", value.c_str(), 1);
    WorkerRun run = RunWorker("--config " + dir_ + "/job.yaml", dir_);
    unsetenv("MOMENTUM_CPUS");
    EXPECT_EQ(run.exit_code, 2) << run.output;  // bad input
    EXPECT_NE(run.output.find(message), std::string::npos) << value << "\n"
                                                           << run.output;
  }
}

TEST_F(DistributedCliTest, BatchNotDivisibleByRanksIsRejected) {
  WorkerRun run = RunWorker("--nproc 3 --config " + dir_ + "/job.yaml", dir_);
  EXPECT_NE(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("optim.batch_size must be divisible"),
            std::string::npos)
      << run.output;
}

}  // namespace
}  // namespace momentum::worker
