// ExportBackbone against torchvision: the exported file is loaded by
// tests/reference/export_check.py, a real Python subprocess, into
// torchvision's ResNet (or the same structure at another width or stem).
// Checkpoints load in Python too, with plain torch.load
// (tests/reference/checkpoint_check.py).
#include "worker/export.h"

#include <ATen/core/Dict.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/wait.h>
#include <torch/serialize.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "nlohmann/json.hpp"
#include "tests/proc_util.h"
#include "tests/worker/test_data.h"
#include "worker/checkpoint.h"
#include "worker/moco.h"
#include "worker/optim.h"

extern char** environ;

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;

std::string Env(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? "" : value;
}

using ::momentum::testing::ReadFile;

struct ProcessResult {
  int exit_code = -1;  // -1 when killed by a signal or timed out
  bool timed_out = false;
  std::string output;  // stdout and stderr together
};

// Runs `argv` (argv[0] an absolute path) with stdout and stderr in one file
// under `dir`, killing it with SIGKILL after `timeout`. Polls waitpid: the
// process is the only one this test starts.
ProcessResult Run(const std::vector<std::string>& argv, const std::string& dir,
                  std::chrono::seconds timeout) {
  const std::string log = dir + "/subprocess.log";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int err =
      posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ProcessResult result;
  if (err != 0) {
    result.output = "posix_spawn " + argv[0] + ": " + std::strerror(err);
    return result;
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      result.timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!result.timed_out && WIFEXITED(status)) {
    result.exit_code = WEXITSTATUS(status);
  }
  result.output = ReadFile(log);
  return result;
}

struct ExportCase {
  std::string arch;
  int64_t width;
  int64_t in_channels;
  bool small_stem;
  bool mlp;
};

// Moves every weight and buffer away from its initial value, so that none
// equals what a fresh torchvision model holds (BatchNorm's ones and zeros,
// num_batches_tracked 0). Small and multiplicative, so running_var stays
// positive and the forward pass in export_check stays finite.
void Perturb(ResNet& net) {
  torch::NoGradGuard no_grad;
  at::manual_seed(11);
  for (auto& [name, tensor] : StateOf(*net)) {
    if (tensor.is_floating_point()) {
      tensor.mul_(1 + 0.05 * at::rand_like(tensor))
          .add_(0.01 * at::rand_like(tensor));
    } else {
      tensor.fill_(static_cast<int64_t>(name.size()));
    }
  }
}

// Exports a perturbed `c` model, reads the file back, and has export_check.py
// load it into torchvision's structure.
void ExpectLoadsIntoTorchvision(const ExportCase& c) {
  ResNetOptions o;
  o.arch = c.arch;
  o.width = c.width;
  o.in_channels = c.in_channels;
  o.small_stem = c.small_stem;
  o.out_dim = 16;
  o.mlp = c.mlp;
  ResNet net(o);
  Perturb(net);

  const std::string dir = testing::TempDir("export-" + c.arch);
  const std::string file = dir + "/backbone.pt";
  absl::Status status = ExportBackbone(net, file);
  ASSERT_TRUE(status.ok()) << status;

  // Read back here: exactly the non-fc tensors, bit for bit (export_check
  // below compares what torchvision loaded with the file, not with us).
  std::map<std::string, at::Tensor> want;
  const auto all = StateOf(*net);
  for (const auto& [name, tensor] : all) {
    if (name.rfind("fc.", 0) != 0) want[name] = tensor;
  }
  ASSERT_EQ(all.size() - want.size(), c.mlp ? 4u : 2u) << "fc.* tensors";
  const std::string bytes = ReadFile(file);
  c10::IValue value =
      torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  ASSERT_TRUE(value.isGenericDict());
  auto dict = value.toGenericDict();
  EXPECT_EQ(dict.size(), want.size());
  for (const auto& entry : dict) {
    const std::string name = entry.key().toStringRef();
    auto it = want.find(name);
    ASSERT_NE(it, want.end()) << "unexpected entry " << name;
    ASSERT_TRUE(entry.value().isTensor()) << name;
    const at::Tensor got = entry.value().toTensor();
    EXPECT_EQ(got.scalar_type(), it->second.scalar_type()) << name;
    EXPECT_TRUE(at::equal(got, it->second)) << name;
  }

  const std::string python = Env("MOMENTUM_PYTHON");
  const std::string source = Env("MOMENTUM_SOURCE_DIR");
  ASSERT_FALSE(python.empty() || source.empty())
      << "run through ctest: MOMENTUM_PYTHON and MOMENTUM_SOURCE_DIR unset";
  std::vector<std::string> argv = {
      python, source + "/tests/reference/export_check.py", file, c.arch};
  if (c.width != 64) {
    argv.insert(argv.end(), {"--width", std::to_string(c.width)});
  }
  if (c.in_channels != 3) {
    argv.insert(argv.end(), {"--in-channels", std::to_string(c.in_channels)});
  }
  if (c.small_stem) argv.push_back("--small-stem");
  ProcessResult r = Run(argv, dir, std::chrono::seconds(180));
  EXPECT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("OK:"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

TEST(ExportTest, ResNet18WithMlpHeadLoadsIntoTorchvisionResNet18) {
  ExpectLoadsIntoTorchvision({"resnet18", 64, 3, false, true});
}

TEST(ExportTest, ResNet50WithMlpHeadLoadsIntoTorchvisionResNet50) {
  ExpectLoadsIntoTorchvision({"resnet50", 64, 3, false, true});
}

TEST(ExportTest, SmallStemWidth16GrayResNet18LoadsIntoSameStructure) {
  ExpectLoadsIntoTorchvision({"resnet18", 16, 1, true, true});
}

TEST(ExportTest, SmallStemWidth16GrayResNet50WithLinearHeadLoads) {
  ExpectLoadsIntoTorchvision({"resnet50", 16, 1, true, false});
}

ResNet SmallNet() {
  ResNetOptions o;
  o.width = 4;
  o.in_channels = 1;
  o.small_stem = true;
  o.out_dim = 8;
  return ResNet(o);
}

TEST(ExportTest, MissingDirectoryNamesPathAndLeavesNoTemporaryFile) {
  const std::string dir = testing::TempDir("export-missing");
  const std::string file = dir + "/no-such-dir/backbone.pt";
  absl::Status status = ExportBackbone(SmallNet(), file);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find(file), std::string::npos) << status;
  EXPECT_FALSE(fs::exists(dir + "/no-such-dir"));
  EXPECT_TRUE(fs::is_empty(dir));
  fs::remove_all(dir);
}

TEST(ExportTest, UnrenamableTargetNamesPathAndLeavesNoTemporaryFile) {
  // The target is a non-empty directory: the temporary file is written next
  // to it, and the final rename fails.
  const std::string dir = testing::TempDir("export-rename");
  const std::string file = dir + "/backbone.pt";
  fs::create_directories(file + "/occupied");
  absl::Status status = ExportBackbone(SmallNet(), file);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find(file), std::string::npos) << status;
  std::vector<std::string> left;
  for (const auto& entry : fs::directory_iterator(dir)) {
    left.push_back(entry.path().filename().string());
  }
  EXPECT_EQ(left, std::vector<std::string>{"backbone.pt"});
  fs::remove_all(dir);
}

// A user reads a checkpoint with Python's plain torch.load, whose default
// since torch 2.6 is weights_only=True: it refuses the torch.jit._pickle
// globals that torch::pickle_save writes for typed dicts and lists. The
// values Python reads are those of the model that wrote the file.
TEST(ExportTest, CheckpointLoadsWithPlainTorchLoadInPython) {
  const std::string dir = testing::TempDir("checkpoint-torch-load");
  MocoOptions options;
  options.encoder.width = 4;
  options.encoder.in_channels = 1;
  options.encoder.small_stem = true;
  options.encoder.out_dim = 8;
  options.queue_size = 12;
  options.bn_groups = 2;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  Moco model(options, gen);
  Sgd sgd(model.encoder_q()->parameters(), 0.9, 1e-4);
  model.MomentumUpdate();
  auto out = model.Forward(at::randn({4, 1, 8, 8}), at::randn({4, 1, 8, 8}),
                           at::randperm(4, gen, at::kLong));
  sgd.ZeroGrad();
  out.loss.backward();
  sgd.Step(0.1);
  model.Enqueue(out.all_keys);
  CheckpointState state;
  state.position = {0, 1, 1, 4, 0.5};
  state.shuffle_rng_state = gen.get_state();
  state.knn_history = {{0.5, 1, 0.25}};
  state.spec_yaml = "seed: 5\n";
  auto path = SaveCheckpoint(dir, model, sgd, state, 1);
  ASSERT_TRUE(path.ok()) << path.status();

  const std::string python = Env("MOMENTUM_PYTHON");
  const std::string source = Env("MOMENTUM_SOURCE_DIR");
  ASSERT_FALSE(python.empty() || source.empty())
      << "run through ctest: MOMENTUM_PYTHON and MOMENTUM_SOURCE_DIR unset";
  ProcessResult r = worker::Run(
      {python, source + "/tests/reference/checkpoint_check.py", *path}, dir,
      std::chrono::seconds(120));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // The JSON line is the last line printed.
  const std::string line =
      r.output.substr(r.output.rfind('{', r.output.find("\"format\"")));
  const auto json = nlohmann::json::parse(line, nullptr,
                                          /*allow_exceptions=*/false);
  ASSERT_FALSE(json.is_discarded()) << r.output;
  EXPECT_EQ(json["global_step"], 1);
  EXPECT_EQ(json["queue_ptr"], model.queue_ptr());
  EXPECT_EQ(json["queue_shape"], (std::vector<int64_t>{8, 12}));
  EXPECT_DOUBLE_EQ(json["queue_sum"].get<double>(),
                   model.queue().to(at::kDouble).sum().item<double>());
  const auto params = StateOf(*model.encoder_q());
  EXPECT_EQ(json["encoder_q"].size(), params.size());
  for (const auto& [name, tensor] : params) {
    ASSERT_TRUE(json["encoder_q"].contains(name)) << name;
    EXPECT_DOUBLE_EQ(json["encoder_q"][name].get<double>(),
                     tensor.to(at::kDouble).sum().item<double>())
        << name;
  }
  EXPECT_EQ(json["sgd_momentum"], model.encoder_q()->parameters().size());
  EXPECT_EQ(json["knn_history"],
            (std::vector<std::vector<double>>{{0.5, 1, 0.25}}));
  EXPECT_EQ(json["spec"], "seed: 5\n");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace momentum::worker
