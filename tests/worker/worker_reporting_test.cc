// momentum-worker as the coordinator launches it: with MOMENTUM_COORDINATOR,
// MOMENTUM_JOB_ID and MOMENTUM_ATTEMPT set it streams its reports to the
// coordinator (here a fake one on 127.0.0.1). Runs the binary as a
// subprocess on a tiny fake Fashion-MNIST; no LibTorch in the test itself.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "tests/proc_util.h"
#include "tests/worker/fake_coordinator.h"
#include "tests/worker/test_data.h"

extern char** environ;

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;
using testing::FakeCoordinator;
using testing::Metrics;

using ::momentum::testing::ReadFile;

struct Result {
  int exit_code = -1;
  std::string err;
};

// Runs momentum-worker with `args` and this process's environment changed
// by `env` (an empty value unsets the variable); kills it after two minutes.
Result RunWorker(const std::vector<std::string>& args,
                 const std::map<std::string, std::string>& env,
                 const std::string& dir) {
  const char* bin = std::getenv("MOMENTUM_BINARY_DIR");
  const std::string worker =
      std::string(bin == nullptr ? "" : bin) + "/worker/momentum-worker";
  std::vector<std::string> argv = {worker};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> c_argv;
  for (auto& a : argv) c_argv.push_back(a.data());
  c_argv.push_back(nullptr);
  std::vector<std::string> vars;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string var = *e;
    if (env.count(var.substr(0, var.find('='))) == 0) vars.push_back(var);
  }
  for (const auto& [name, value] : env) {
    if (!value.empty()) vars.push_back(name + "=" + value);
  }
  std::vector<char*> c_env;
  for (auto& v : vars) c_env.push_back(v.data());
  c_env.push_back(nullptr);

  const std::string err_path = dir + "/worker.stderr";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO,
                                   (dir + "/worker.stdout").c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = -1;
  Result r;
  const int err = posix_spawn(&pid, worker.c_str(), &actions, nullptr,
                              c_argv.data(), c_env.data());
  posix_spawn_file_actions_destroy(&actions);
  if (err != 0) {
    r.err = "posix_spawn " + worker + ": " + std::strerror(err);
    return r;
  }
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::minutes(2);
  int status = 0;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  r.err = ReadFile(err_path);
  return r;
}

class WorkerReportingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempDir("worker-reporting");
    // 96 / 16 = 6 steps per epoch.
    testing::WriteFakeFashionMnist(dir_ + "/data", 96, 40, 12);
    spec_ = dir_ + "/job.yaml";
    std::ofstream(spec_) << "name: reporting-test\n"
                            "seed: 3\n"
                            "output_dir: "
                         << dir_ << "/unused\n"
                         << "model: {arch: resnet18, width: 4, in_channels: 1, "
                            "small_stem: true}\n"
                            "moco: {dim: 8, queue_size: 40, bn: split, "
                            "bn_groups: 2}\n"
                            "data:\n"
                            "  format: fashion-mnist\n"
                            "  path: "
                         << dir_ << "/data\n"
                         << "  loader_threads: 1\n"
                            "optim: {batch_size: 16, epochs: 1, lr: 0.06}\n"
                            "eval: {knn_k: 10}\n"
                            "logging: {every_steps: 2}\n"
                            "resources: {threads: 1}\n";
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }

  std::string dir_;
  std::string spec_;
};

TEST_F(WorkerReportingTest, StreamsHelloAndEveryReportToTheCoordinator) {
  FakeCoordinator coordinator;
  ASSERT_TRUE(coordinator.ok());
  // As the coordinator launches it: the spec as stored, and where to write.
  Result r = RunWorker({"--config", spec_, "--output-dir", dir_ + "/run"},
                       {{"MOMENTUM_COORDINATOR", coordinator.address()},
                        {"MOMENTUM_JOB_ID", "job-e2e"},
                        {"MOMENTUM_ATTEMPT", "2"}},
                       dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(fs::exists(dir_ + "/unused"));
  // The worker closed its stream before it exited.
  ASSERT_TRUE(coordinator.service().WaitFor(
      [](const auto&, int finished) { return finished >= 1; }));
  auto streams = coordinator.service().streams();
  ASSERT_EQ(streams.size(), 1u);
  ASSERT_FALSE(streams[0].empty());
  ASSERT_EQ(streams[0][0].report_case(), v1::WorkerReport::kHello);
  EXPECT_EQ(streams[0][0].hello().job_id(), "job-e2e");
  EXPECT_EQ(streams[0][0].hello().attempt(), 2);
  EXPECT_EQ(streams[0][0].hello().rank(), 0);

  // Windows after steps 2, 4 and 6, then the final evaluation.
  auto metrics = Metrics(streams[0]);
  ASSERT_EQ(metrics.size(), 4u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(metrics[i].step(), 2 * (i + 1));
    EXPECT_EQ(metrics[i].rank(), 0);
    EXPECT_LT(metrics[i].knn_top1(), 0);
    EXPECT_GT(metrics[i].loss(), 0);
    EXPECT_GT(metrics[i].feature_std_mean(), 0);
    // 16 keys a step into 40 slots: at most two steps old once full.
    EXPECT_EQ(metrics[i].queue_staleness_steps(), 2);
  }
  EXPECT_EQ(metrics[3].step(), 6);
  auto summary = nlohmann::json::parse(ReadFile(dir_ + "/run/summary.json"));
  EXPECT_DOUBLE_EQ(metrics[3].knn_top1(), summary["knn_top1"].get<double>());
  // Last on the stream, the run's account: what summary.json says, so the
  // coordinator needs no access to this disk.
  const v1::WorkerReport& last = streams[0].back();
  ASSERT_EQ(last.report_case(), v1::WorkerReport::kSummary);
  EXPECT_EQ(last.summary().steps(), summary["steps"].get<int64_t>());
  EXPECT_EQ(last.summary().images_seen(),
            summary["images_seen"].get<int64_t>());
  EXPECT_DOUBLE_EQ(last.summary().knn_top1(),
                   summary["knn_top1"].get<double>());
  EXPECT_EQ(last.summary().export_path(), summary["export"].get<std::string>());
  EXPECT_EQ(last.summary().stop_reason(), "epochs");
  EXPECT_EQ(last.summary().steps(), 6);

  // metrics.jsonl has the same health values for rank 0.
  std::ifstream lines(dir_ + "/run/metrics.jsonl");
  std::string line;
  int windows = 0;
  while (std::getline(lines, line)) {
    auto j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;
    ASSERT_LT(windows, 3);
    const auto& m = metrics[windows++];
    EXPECT_EQ(j["step"].get<int64_t>(), m.step());
    EXPECT_DOUBLE_EQ(j["positive_logit_mean"].get<double>(),
                     m.positive_logit_mean());
    EXPECT_DOUBLE_EQ(j["feature_std_min"].get<double>(), m.feature_std_min());
  }
  EXPECT_EQ(windows, 3);
}

TEST_F(WorkerReportingTest, PartialCoordinatorEnvironmentIsRejected) {
  Result r = RunWorker({"--config", spec_},
                       {{"MOMENTUM_COORDINATOR", "127.0.0.1:1"},
                        {"MOMENTUM_JOB_ID", "job-e2e"},
                        {"MOMENTUM_ATTEMPT", ""}},
                       dir_);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("MOMENTUM_ATTEMPT"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ + "/run"));
}

}  // namespace
}  // namespace momentum::worker
