// The momentum-worker binary end to end: runs it as a subprocess on a tiny
// fake Fashion-MNIST and checks exit codes, messages and the files it writes,
// SIGTERM and resume included.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "tests/proc_util.h"
#include "tests/worker/test_data.h"

extern char** environ;

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Every run of the worker here takes seconds; this bounds a hung one.
constexpr std::chrono::seconds kRunTimeout{120};

using ::momentum::testing::ReadFile;

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

struct Result {
  int exit_code = -1;  // WEXITSTATUS; -1 when killed by a signal
  int signal = 0;      // the signal that ended it, 0 when it exited
  bool timed_out = false;
  std::string out;
  std::string err;

  std::string Describe() const {
    return "exit " + std::to_string(exit_code) + ", signal " +
           std::to_string(signal) + (timed_out ? " (timed out)" : "") +
           "\n--- stdout ---\n" + out + "--- stderr ---\n" + err;
  }
};

// One momentum-worker process, its stdout and stderr in files under `dir`
// (files, not pipes: nothing to drain while it runs). The destructor kills
// it if it still runs, so a failed assertion never leaves it behind.
class WorkerProcess {
 public:
  WorkerProcess(const std::vector<std::string>& args, const std::string& dir,
                const std::string& tag)
      : out_path_(dir + "/" + tag + ".stdout"),
        err_path_(dir + "/" + tag + ".stderr") {
    const char* bin = std::getenv("MOMENTUM_BINARY_DIR");
    const std::string worker =
        std::string(bin == nullptr ? "" : bin) + "/worker/momentum-worker";
    std::vector<std::string> argv = {worker};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> c_argv;
    for (auto& a : argv) c_argv.push_back(a.data());
    c_argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_path_.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path_.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err = posix_spawn(&pid_, worker.c_str(), &actions, nullptr,
                                c_argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (err != 0) {
      pid_ = -1;
      spawn_error_ = "posix_spawn " + worker + ": " + std::strerror(err);
    }
  }
  ~WorkerProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

  bool running() const { return pid_ > 0; }
  void Signal(int sig) const {
    if (pid_ > 0) ::kill(pid_, sig);
  }

  // Waits for the exit, killing the process at `timeout`.
  Result Wait(std::chrono::seconds timeout = kRunTimeout) {
    Result r;
    if (pid_ <= 0) {
      r.err = spawn_error_;
      return r;
    }
    const auto deadline = Clock::now() + timeout;
    int status = 0;
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
      if (Clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        r.timed_out = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    pid_ = -1;
    if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
    r.out = ReadFile(out_path_);
    r.err = ReadFile(err_path_);
    return r;
  }

 private:
  std::string out_path_, err_path_;
  std::string spawn_error_;
  pid_t pid_ = -1;
};

// Newest checkpoint-<step>.pt in `dir` by step; "" when there is none
// (temporary files, checkpoint-<step>.pt.tmp.<pid>, do not count).
std::string NewestCheckpoint(const std::string& dir) {
  static const std::regex kName(R"(checkpoint-(\d+)\.pt)");
  std::string newest;
  long long newest_step = -1;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, m, kName) && std::stoll(m[1]) > newest_step) {
      newest_step = std::stoll(m[1]);
      newest = entry.path().string();
    }
  }
  return newest;
}

class WorkerCliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    data_dir_ = new std::string(testing::TempDir("worker-cli-data"));
    // 96 / 16 = 6 steps per epoch.
    testing::WriteFakeFashionMnist(*data_dir_, 96, 40, 12);
  }
  static void TearDownTestSuite() {
    fs::remove_all(*data_dir_);
    delete data_dir_;
  }

  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = testing::TempDir(std::string("worker-cli-") + info->name());
    out_ = dir_ + "/run";
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }

  // Writes a valid spec of a tiny model to `name` in the test's folder;
  // `moco_extra` is added to the moco section (indented YAML lines).
  std::string WriteSpec(const std::string& name,
                        const std::string& moco_extra = "",
                        const std::string& data_dir = "") {
    const std::string path = dir_ + "/" + name;
    std::ofstream f(path);
    f << "name: cli-test\n"
         "seed: 3\n"
         "output_dir: "
      << out_
      << "\n"
         "model: {arch: resnet18, width: 4, in_channels: 1, "
         "small_stem: true}\n"
         "moco:\n"
         "  dim: 8\n"
         "  queue_size: 40\n"
         "  bn: split\n"
         "  bn_groups: 2\n"
      << moco_extra
      << "data:\n"
         "  format: fashion-mnist\n"
         "  path: "
      << (data_dir.empty() ? *data_dir_ : data_dir)
      << "\n"
         "  loader_threads: 1\n"
         "  prefetch: 2\n"
         "optim: {batch_size: 16, epochs: 2, lr: 0.06}\n"
         "eval: {knn_k: 10}\n"
         "checkpoint: {keep: 2}\n"
         "logging: {every_steps: 2}\n"
         "resources: {threads: 1}\n";
    return path;
  }

  Result RunWorker(const std::vector<std::string>& args,
                   const std::string& tag) {
    WorkerProcess p(args, dir_, tag);
    return p.Wait();
  }

  static std::string* data_dir_;
  std::string dir_;
  std::string out_;
};
std::string* WorkerCliTest::data_dir_ = nullptr;

TEST_F(WorkerCliTest, RejectsNonPositiveTemperatureInFileWithExitCode2) {
  const std::string spec = WriteSpec("job.yaml", "  temperature: -1\n");
  Result r = RunWorker({"--config", spec}, "run");
  EXPECT_EQ(r.exit_code, 2) << r.Describe();
  EXPECT_TRUE(Contains(r.err, "moco.temperature must be > 0, got -1"))
      << r.Describe();
  EXPECT_TRUE(Contains(r.err, "job.yaml")) << r.Describe();
  EXPECT_FALSE(fs::exists(out_));
}

TEST_F(WorkerCliTest, RejectsUnknownFieldNamingItWithExitCode2) {
  const std::string spec = WriteSpec("job.yaml", "  temprature: 0.1\n");
  Result r = RunWorker({"--config", spec}, "run");
  EXPECT_EQ(r.exit_code, 2) << r.Describe();
  EXPECT_TRUE(Contains(r.err, "moco.temprature")) << r.Describe();
}

TEST_F(WorkerCliTest, RejectsNonPositiveTemperatureOverrideWithExitCode2) {
  const std::string spec = WriteSpec("job.yaml");
  Result r =
      RunWorker({"--config", spec, "--set", "moco.temperature=-1"}, "run");
  EXPECT_EQ(r.exit_code, 2) << r.Describe();
  EXPECT_TRUE(Contains(r.err, "moco.temperature must be > 0, got -1"))
      << r.Describe();
  EXPECT_FALSE(fs::exists(out_));
}

TEST_F(WorkerCliTest, MissingConfigFileFailsNamingIt) {
  const std::string spec = dir_ + "/absent.yaml";
  Result r = RunWorker({"--config", spec}, "run");
  EXPECT_NE(r.exit_code, 0) << r.Describe();
  EXPECT_EQ(r.signal, 0) << r.Describe();
  EXPECT_TRUE(Contains(r.err, spec)) << r.Describe();
}

TEST_F(WorkerCliTest, PrintSpecPrintsResolvedYamlAndExits) {
  const std::string spec = WriteSpec("job.yaml");
  Result r = RunWorker({"--config", spec, "--print-spec"}, "run");
  EXPECT_EQ(r.exit_code, 0) << r.Describe();
  EXPECT_TRUE(Contains(r.out, "temperature:")) << r.Describe();
  EXPECT_TRUE(Contains(r.out, "queue_size: 40")) << r.Describe();
  EXPECT_FALSE(fs::exists(out_)) << "--print-spec must not train";
}

TEST_F(WorkerCliTest, TrainsTwoEpochsAndWritesOutputs) {
  const std::string spec = WriteSpec("job.yaml");
  Result r = RunWorker({"--config", spec}, "run");
  ASSERT_EQ(r.exit_code, 0) << r.Describe();
  EXPECT_TRUE(Contains(r.out + r.err, "kNN top-1")) << r.Describe();

  const std::string summary_text = ReadFile(out_ + "/summary.json");
  auto summary = nlohmann::json::parse(summary_text, nullptr, false);
  ASSERT_TRUE(summary.is_object()) << summary_text;
  ASSERT_TRUE(summary["knn_top1"].is_number()) << summary_text;
  const double top1 = summary["knn_top1"].get<double>();
  EXPECT_GE(top1, 0.0);
  EXPECT_LE(top1, 1.0);
  EXPECT_EQ(summary["images_seen"], 2 * 6 * 16) << summary_text;
  EXPECT_EQ(summary["steps"], 2 * 6) << summary_text;
  EXPECT_EQ(summary["stop_reason"], "epochs") << summary_text;
  EXPECT_EQ(summary["resumed"], false) << summary_text;

  // metrics.jsonl: every line a JSON object; losses every 2 steps, kNN once
  // per epoch.
  std::ifstream metrics(out_ + "/metrics.jsonl");
  ASSERT_TRUE(metrics) << "no metrics.jsonl";
  int losses = 0, evaluations = 0;
  std::string line;
  while (std::getline(metrics, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    ASSERT_TRUE(j.is_object()) << line;
    losses += j.contains("loss");
    evaluations += j.contains("knn_top1");
  }
  EXPECT_EQ(losses, 6);
  EXPECT_EQ(evaluations, 2);

  EXPECT_GT(fs::file_size(out_ + "/backbone.pt"), 0u);
  EXPECT_FALSE(NewestCheckpoint(out_ + "/checkpoints").empty());
}

TEST_F(WorkerCliTest, SigtermWritesCheckpointExits143AndRunResumes) {
  const std::string spec = WriteSpec("job.yaml");
  const std::string ckpt_dir = out_ + "/checkpoints";
  int64_t stopped_step = -1;
  {
    WorkerProcess p({"--config", spec, "--set", "optim.epochs=1000", "--set",
                     "checkpoint.every_steps=1"},
                    dir_, "first");
    ASSERT_TRUE(p.running());
    // The signal handlers are installed before training starts, so once a
    // checkpoint exists SIGTERM must be handled.
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    while (NewestCheckpoint(ckpt_dir).empty() && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ASSERT_FALSE(NewestCheckpoint(ckpt_dir).empty())
        << "no checkpoint within 60 s\n"
        << p.Wait(std::chrono::seconds(1)).Describe();
    p.Signal(SIGTERM);
    Result r = p.Wait();
    EXPECT_EQ(r.signal, 0) << r.Describe();
    EXPECT_EQ(r.exit_code, 143) << r.Describe();
    std::smatch m;
    const std::string log = r.out + r.err;
    ASSERT_TRUE(std::regex_search(log, m,
                                  std::regex(R"(stopped at step (\d+); )"
                                             R"(checkpoint (\S+\.pt))")))
        << r.Describe();
    stopped_step = std::stoll(m[1].str());
    EXPECT_GE(stopped_step, 1);
    EXPECT_TRUE(fs::exists(m[2].str())) << m[2].str();
    EXPECT_EQ(NewestCheckpoint(ckpt_dir), m[2].str());
    EXPECT_FALSE(fs::exists(out_ + "/summary.json"));
  }

  // A shorter run from the same output folder: the schedule changes, the
  // model, queue and position are taken from the checkpoint.
  Result r = RunWorker({"--config", spec, "--set", "optim.epochs=2"}, "second");
  ASSERT_EQ(r.exit_code, 0) << r.Describe();
  EXPECT_TRUE(Contains(r.out + r.err, "resuming from")) << r.Describe();
  auto summary =
      nlohmann::json::parse(ReadFile(out_ + "/summary.json"), nullptr, false);
  ASSERT_TRUE(summary.is_object());
  EXPECT_EQ(summary["resumed"], true);
  // Stopped within the first two epochs (12 steps) it trains to their end;
  // stopped later, the bound is already reached and it ends where it was.
  EXPECT_EQ(summary["images_seen"], 16 * std::max<int64_t>(12, stopped_step));
  EXPECT_TRUE(fs::exists(out_ + "/backbone.pt"));
}

TEST_F(WorkerCliTest, TruncatedTrainImagesFailWithExitCode1NamingTheFile) {
  const std::string data = dir_ + "/data";
  testing::WriteFakeFashionMnist(data, 96, 40, 12);
  const std::string images = data + "/train-images-idx3-ubyte.gz";
  fs::resize_file(images, fs::file_size(images) / 2);
  const std::string spec = WriteSpec("job.yaml", "", data);
  Result r = RunWorker({"--config", spec}, "run");
  EXPECT_EQ(r.exit_code, 1) << r.Describe();
  EXPECT_TRUE(Contains(r.err, "train-images-idx3-ubyte.gz")) << r.Describe();
}

}  // namespace
}  // namespace momentum::worker
