#include "worker/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <caffe2/serialize/inline_container.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "common/file_util.h"
#include "tests/worker/test_data.h"

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;

MocoOptions Small(int64_t width = 4) {
  MocoOptions o;
  o.encoder.width = width;
  o.encoder.in_channels = 1;
  o.encoder.small_stem = true;
  o.encoder.out_dim = 8;
  o.queue_size = 12;
  o.bn_groups = 2;
  return o;
}

at::Generator Gen(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

// Takes one real step so that BatchNorm statistics, momentum buffers, queue
// and pointer all differ from a fresh model.
void TrainOneStep(Moco& model, Sgd& sgd) {
  model.MomentumUpdate();
  auto out = model.Forward(at::randn({4, 1, 8, 8}), at::randn({4, 1, 8, 8}),
                           at::randperm(4, Gen(3), at::kLong));
  sgd.ZeroGrad();
  out.loss.backward();
  sgd.Step(0.1);
  model.Enqueue(out.all_keys);
}

void ExpectSameState(const torch::nn::Module& a, const torch::nn::Module& b) {
  auto sa = StateOf(a), sb = StateOf(b);
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) {
    EXPECT_TRUE(at::equal(sa[i].second, sb[i].second)) << sa[i].first;
  }
}

// Loads `path` into a fresh model of other weights and a fresh optimiser,
// and checks that both encoders and the momentum buffers are `model`'s and
// `sgd`'s again.
struct Reloaded {
  std::unique_ptr<Moco> model;
  std::unique_ptr<Sgd> sgd;
  absl::StatusOr<CheckpointState> state;
};
Reloaded ReloadAndCompare(const std::string& path, Moco& model, Sgd& sgd) {
  torch::manual_seed(2);
  Reloaded r;
  r.model = std::make_unique<Moco>(Small(), Gen(2));
  r.sgd = std::make_unique<Sgd>(r.model->encoder_q()->parameters(), 0.9, 1e-4);
  r.state = LoadCheckpoint(path, *r.model, *r.sgd);
  EXPECT_TRUE(r.state.ok()) << r.state.status();
  if (!r.state.ok()) return r;
  ExpectSameState(*model.encoder_q(), *r.model->encoder_q());
  ExpectSameState(*model.encoder_k(), *r.model->encoder_k());
  for (size_t i = 0; i < sgd.momentum_buffers().size(); ++i) {
    EXPECT_TRUE(
        at::equal(sgd.momentum_buffers()[i], r.sgd->momentum_buffers()[i]));
  }
  return r;
}

// What a GPU run keeps (channels_last weights, as Moco::To lays them out on
// CUDA) is written as dense host tensors, and loads into a model in the
// default layout with the same values: a checkpoint does not depend on the
// device or the layout that wrote it.
TEST(CheckpointTest, WritesDenseHostTensorsWhateverTheLayout) {
  const std::string dir = testing::TempDir("ckpt-layout");
  torch::manual_seed(1);
  Moco model(Small(), Gen(1));
  {
    at::NoGradGuard no_grad;
    for (auto* encoder : {&model.encoder_q(), &model.encoder_k()}) {
      for (at::Tensor& p : (*encoder)->parameters()) {
        if (p.dim() == 4) {
          p.set_data(p.data().contiguous(at::MemoryFormat::ChannelsLast));
        }
      }
    }
  }
  Sgd sgd(model.encoder_q()->parameters(), 0.9, 1e-4);
  TrainOneStep(model, sgd);
  // A convolution of several input channels (with one, both layouts agree).
  const auto params = model.encoder_q()->parameters();
  size_t conv = 0;
  while (params[conv].dim() != 4 || params[conv].size(1) == 1) ++conv;
  ASSERT_FALSE(params[conv].is_contiguous());
  ASSERT_FALSE(sgd.momentum_buffers()[conv].is_contiguous());
  CheckpointState state;
  state.spec_yaml = "name: x\n";
  state.shuffle_rng_state = Gen(7).get_state();
  state.position = {0, 1, 1, 4, 0.1};  // after TrainOneStep
  auto path = SaveCheckpoint(dir, model, sgd, state, 3);
  ASSERT_TRUE(path.ok()) << path.status();

  absl::StatusOr<std::string> text = ReadWholeFile(*path);
  ASSERT_TRUE(text.ok()) << text.status();
  const std::vector<char> bytes(text->begin(), text->end());
  int64_t tensors = 0;
  std::vector<c10::IValue> pending = {torch::pickle_load(bytes)};
  while (!pending.empty()) {
    c10::IValue v = pending.back();
    pending.pop_back();
    if (v.isTensor()) {
      EXPECT_TRUE(v.toTensor().device().is_cpu());
      EXPECT_TRUE(v.toTensor().is_contiguous());
      ++tensors;
    } else if (v.isGenericDict()) {
      for (const auto& e : v.toGenericDict()) pending.push_back(e.value());
    } else if (v.isList()) {
      for (const c10::IValue& e : v.toListRef()) pending.push_back(e);
    }
  }
  EXPECT_GT(tensors, 20);

  Reloaded other = ReloadAndCompare(*path, model, sgd);
  ASSERT_TRUE(other.state.ok());
  for (size_t i = 0; i < sgd.momentum_buffers().size(); ++i) {
    // In the loading model's layout.
    EXPECT_EQ(other.sgd->momentum_buffers()[i].strides(),
              other.sgd->params()[i].strides());
  }
  fs::remove_all(dir);
}

TEST(CheckpointTest, RoundTripRestoresEverything) {
  const std::string dir = testing::TempDir("ckpt-roundtrip");
  torch::manual_seed(1);
  Moco model(Small(), Gen(1));
  Sgd sgd(model.encoder_q()->parameters(), 0.9, 1e-4);
  TrainOneStep(model, sgd);
  CheckpointState state;
  state.position = {2, 5, 17, 17 * 4, 12.5};
  at::Generator rng = Gen(99);
  at::randperm(10, rng, at::kLong);
  state.shuffle_rng_state = rng.get_state();
  at::Generator torch_rng = Gen(1234);
  state.torch_rng_state = torch_rng.get_state();
  state.knn_history = {{1, 8, 0.5}, {2, 16, 0.625}};
  state.spec_yaml = "name: x\n";
  auto path = SaveCheckpoint(dir, model, sgd, state, 3);
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(fs::path(*path).filename(), "checkpoint-000000017.pt");

  Reloaded reloaded = ReloadAndCompare(*path, model, sgd);
  ASSERT_TRUE(reloaded.state.ok());
  Moco& other = *reloaded.model;
  auto& loaded = reloaded.state;
  EXPECT_TRUE(at::equal(model.queue(), other.queue()));
  EXPECT_EQ(model.queue_ptr(), other.queue_ptr());
  EXPECT_EQ(other.queue_slot_steps(), model.queue_slot_steps());
  EXPECT_EQ(other.enqueued_steps(), 17);  // the position's global step
  EXPECT_EQ(loaded->position.epoch, 2);
  EXPECT_EQ(loaded->position.step_in_epoch, 5);
  EXPECT_EQ(loaded->position.global_step, 17);
  EXPECT_EQ(loaded->position.images_seen, 68);
  EXPECT_DOUBLE_EQ(loaded->position.train_seconds, 12.5);
  ASSERT_EQ(loaded->knn_history.size(), 2u);
  EXPECT_DOUBLE_EQ(loaded->knn_history[1].top1, 0.625);
  EXPECT_EQ(loaded->spec_yaml, "name: x\n");
  // The restored generator continues exactly where the saved one was.
  at::Generator restored = Gen(0);
  restored.set_state(loaded->shuffle_rng_state);
  EXPECT_TRUE(at::equal(at::randperm(10, rng, at::kLong),
                        at::randperm(10, restored, at::kLong)));
  ASSERT_TRUE(loaded->torch_rng_state.defined());
  EXPECT_TRUE(at::equal(loaded->torch_rng_state, state.torch_rng_state));
  fs::remove_all(dir);
}

TEST(CheckpointTest, KeepsTheNewestAndLeavesNoTemporaryFiles) {
  const std::string dir = testing::TempDir("ckpt-keep");
  Moco model(Small(), Gen(1));
  Sgd sgd(model.encoder_q()->parameters(), 0.9, 1e-4);
  CheckpointState state;
  state.shuffle_rng_state = Gen(1).get_state();
  for (int64_t step : {3, 10, 7, 12}) {
    state.position.global_step = step;
    ASSERT_TRUE(SaveCheckpoint(dir, model, sgd, state, 2).ok());
  }
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) {
    names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"checkpoint-000000010.pt",
                                             "checkpoint-000000012.pt"}));
  EXPECT_EQ(fs::path(*LatestCheckpoint(dir)).filename(),
            "checkpoint-000000012.pt");
  EXPECT_FALSE(LatestCheckpoint(dir + "/none").has_value());
  fs::remove_all(dir);
}

TEST(CheckpointTest, TruncatedFileIsAnErrorNamingIt) {
  const std::string dir = testing::TempDir("ckpt-corrupt");
  Moco model(Small(), Gen(1));
  Sgd sgd(model.encoder_q()->parameters(), 0.9, 1e-4);
  CheckpointState state;
  state.shuffle_rng_state = Gen(1).get_state();
  auto path = SaveCheckpoint(dir, model, sgd, state, 2);
  ASSERT_TRUE(path.ok());
  fs::resize_file(*path, fs::file_size(*path) / 2);
  auto loaded = LoadCheckpoint(*path, model, sgd);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(loaded.status().message().find(*path), std::string::npos)
      << loaded.status();
  std::ofstream(dir + "/garbage.pt") << "not a checkpoint";
  auto garbage = LoadCheckpoint(dir + "/garbage.pt", model, sgd);
  ASSERT_FALSE(garbage.ok());
  EXPECT_NE(garbage.status().message().find("garbage.pt"), std::string::npos);
  fs::remove_all(dir);
}

// A checkpoint file whose data.pkl is `pickle`, written by LibTorch's own
// zip writer.
void WritePickleArchive(const std::string& path, const std::string& pickle) {
  std::vector<char> zip;
  {
    caffe2::serialize::PyTorchStreamWriter writer(
        [&](const void* data, size_t size) {
          const char* bytes = static_cast<const char*>(data);
          zip.insert(zip.end(), bytes, bytes + size);
          return size;
        });
    writer.writeRecord("data.pkl", pickle.data(), pickle.size());
    writer.writeEndOfFile();
  }
  std::ofstream(path, std::ios::binary).write(zip.data(), zip.size());
}

// Found by the checkpoint fuzz target: LibTorch's unpickler allocated what
// these numbers ask for (a memo of 2^31 entries, 32 GB; a string of 2^59
// bytes) before any check of ours ran, and threw std::bad_alloc, which
// LoadCheckpoint did not catch.
TEST(CheckpointTest, PickleAskingForHugeAllocationsIsAnError) {
  const std::string dir = testing::TempDir("ckpt-huge");
  const std::string path = dir + "/huge.pt";
  Moco model(Small(), Gen(1));
  Sgd sgd(model.encoder_q()->parameters(), 0.9, 1e-4);
  const struct {
    std::string pickle;
    std::string error;
  } cases[] = {
      // PROTO 2, EMPTY_DICT, LONG_BINPUT 0x7fffffff, STOP.
      {std::string("\x80\x02}r\xff\xff\xff\x7f.", 8),
       "memo entry 2147483647 after 0"},
      // PROTO 2, BINUNICODE8 of 2^59 bytes, STOP.
      {std::string("\x80\x02\x8d\0\0\0\0\0\0\0\x08.", 12),
       "argument of 576460752303423488 bytes where 1 are left"},
  };
  for (const auto& c : cases) {
    WritePickleArchive(path, c.pickle);
    auto loaded = LoadCheckpoint(path, model, sgd);
    ASSERT_FALSE(loaded.ok());
    EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_NE(loaded.status().message().find(c.error), std::string::npos)
        << loaded.status();
  }
  fs::remove_all(dir);
}

TEST(CheckpointTest, OtherArchitectureIsRejected) {
  const std::string dir = testing::TempDir("ckpt-arch");
  Moco model(Small(4), Gen(1));
  Sgd sgd(model.encoder_q()->parameters(), 0.9, 1e-4);
  CheckpointState state;
  state.shuffle_rng_state = Gen(1).get_state();
  auto path = SaveCheckpoint(dir, model, sgd, state, 2);
  ASSERT_TRUE(path.ok());
  Moco wider(Small(8), Gen(1));
  Sgd wider_sgd(wider.encoder_q()->parameters(), 0.9, 1e-4);
  auto loaded = LoadCheckpoint(*path, wider, wider_sgd);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(loaded.status().message().find("conv1.weight"), std::string::npos)
      << loaded.status();
  fs::remove_all(dir);
}

// Checkpoints written before the queue's ages were kept still load; the ages
// are rebuilt from the position and the pointer.
TEST(CheckpointTest, CheckpointWithoutQueueAgesRebuildsThem) {
  const std::string dir = testing::TempDir("ckpt-ages");
  torch::manual_seed(3);
  Moco model(Small(), Gen(1));  // K 12
  Sgd sgd(model.encoder_q()->parameters(), 0.9, 1e-4);
  for (int i = 0; i < 5; ++i) TrainOneStep(model, sgd);  // 20 keys of 4
  CheckpointState state;
  state.position = {0, 5, 5, 5 * 4, 1.0};
  state.shuffle_rng_state = Gen(1).get_state();
  auto path = SaveCheckpoint(dir, model, sgd, state, 2);
  ASSERT_TRUE(path.ok()) << path.status();
  {
    absl::StatusOr<std::string> text = ReadWholeFile(*path);
    ASSERT_TRUE(text.ok()) << text.status();
    auto root =
        torch::pickle_load(std::vector<char>(text->begin(), text->end()))
            .toGenericDict();
    ASSERT_EQ(root.erase("queue_steps"), 1u);
    std::vector<char> old = torch::pickle_save(c10::IValue(root));
    std::ofstream(*path, std::ios::binary | std::ios::trunc)
        .write(old.data(), static_cast<std::streamsize>(old.size()));
  }
  Moco other(Small(), Gen(2));
  Sgd other_sgd(other.encoder_q()->parameters(), 0.9, 1e-4);
  auto loaded = LoadCheckpoint(*path, other, other_sgd);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(other.enqueued_steps(), 5);
  EXPECT_EQ(other.queue_slot_steps(), model.queue_slot_steps());
  // Keys 8..19 survive; key 8 came from step 3, two steps ago.
  EXPECT_EQ(other.QueueStaleness(), 2);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace momentum::worker
