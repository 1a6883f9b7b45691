// End to end: the Trainer trains MoCo on an ImageFolder dataset written as
// PNG and JPEG files of varying sizes, evaluates with the kNN monitor and
// writes its outputs; a truncated image fails the run naming the file, and
// the evaluation set is read from val/ or test/.
#include <gtest/gtest.h>
#include <png.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tests/worker/image_fixtures.h"
#include "worker/trainer.h"

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;
using ::momentum::worker::testing::ReadFile;
using ::momentum::worker::testing::ScopedTempDir;
using ::momentum::worker::testing::WriteFile;
using ::momentum::worker::testing::WriteJpeg;
using ::momentum::worker::testing::WritePng;

constexpr int kClasses = 3;
constexpr int kTrainPerClass = 16;  // 48 train images
constexpr int kValPerClass = 5;     // 15 evaluation images
constexpr int64_t kBatch = 12;
constexpr int64_t kEpochs = 2;

// An RGB image whose colour is set by its class (red, green or blue
// dominant), with a little noise so no two images are alike.
std::vector<uint8_t> ClassImage(int label, int width, int height,
                                std::mt19937* rng) {
  static const uint8_t kColours[kClasses][3] = {
      {200, 40, 40}, {40, 200, 40}, {40, 40, 200}};
  std::uniform_int_distribution<int> noise(-20, 20);
  std::vector<uint8_t> out;
  out.reserve(static_cast<size_t>(width) * height * 3);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      for (int c = 0; c < 3; ++c) {
        const int v = kColours[label][c] + (x + y) % 8 + noise(*rng);
        out.push_back(static_cast<uint8_t>(std::clamp(v, 0, 255)));
      }
    }
  }
  return out;
}

std::string ClassName(int label) {
  return std::string("class_") + static_cast<char>('a' + label);
}

// Writes `root`/train/<class>/ (PNG and JPEG alternating) and
// `root`/<eval_folder>/<class>/ (PNG) with sizes cycling through 20x24,
// 32x32 and 40x30. An empty `eval_folder` writes no evaluation set.
void WriteImageFolder(const std::string& root, const std::string& eval_folder) {
  static const int kSizes[][2] = {{20, 24}, {32, 32}, {40, 30}};
  std::mt19937 rng(11);
  for (int label = 0; label < kClasses; ++label) {
    for (int i = 0; i < kTrainPerClass; ++i) {
      const int w = kSizes[i % 3][0], h = kSizes[i % 3][1];
      const std::vector<uint8_t> rgb = ClassImage(label, w, h, &rng);
      char name[32];
      std::snprintf(name, sizeof(name), "img_%02d", i);
      const std::string base = root + "/train/" + ClassName(label) + "/" + name;
      if (i % 2 == 0) {
        WritePng(base + ".png", w, h, PNG_FORMAT_RGB, rgb);
      } else {
        WriteJpeg(base + ".jpg", w, h, 3, rgb, /*quality=*/90);
      }
    }
    if (eval_folder.empty()) continue;
    for (int i = 0; i < kValPerClass; ++i) {
      const int w = kSizes[(i + 1) % 3][0], h = kSizes[(i + 1) % 3][1];
      char name[32];
      std::snprintf(name, sizeof(name), "val_%02d.png", i);
      WritePng(root + "/" + eval_folder + "/" + ClassName(label) + "/" + name,
               w, h, PNG_FORMAT_RGB, ClassImage(label, w, h, &rng));
    }
  }
}

JobSpec Spec(const std::string& data, const std::string& out) {
  JobSpec s;
  s.name = "image-folder-training-test";
  s.seed = 3;
  s.output_dir = out;
  s.model.in_channels = 3;
  s.model.width = 4;
  s.model.small_stem = true;
  s.moco.dim = 8;
  s.moco.queue_size = 20;
  s.moco.bn = "split";
  s.moco.bn_groups = 2;
  s.data.format = "image-folder";
  s.data.path = data;
  s.data.image_size = 16;
  s.data.loader_threads = 2;
  s.data.prefetch = 2;
  s.optim.batch_size = kBatch;
  s.optim.epochs = kEpochs;
  s.optim.lr = 0.1;
  s.eval.every_epochs = 1;
  s.eval.knn_k = 5;
  s.logging.every_steps = 1;
  s.resources.threads = 1;
  return s;
}

bool Contains(const absl::Status& status, const std::string& text) {
  return std::string(status.message()).find(text) != std::string::npos;
}

TEST(ImageFolderTrainingTest, TrainsEvaluatesAndWritesOutputs) {
  ScopedTempDir dir("image_folder_run");
  const std::string data = dir.path() + "/data";
  const std::string out = dir.path() + "/out";
  WriteImageFolder(data, "val");

  auto trainer = Trainer::Create(Spec(data, out));
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  EXPECT_EQ((*trainer)->steps_per_epoch(), kClasses * kTrainPerClass / kBatch);
  auto summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  const int64_t steps = kEpochs * (kClasses * kTrainPerClass / kBatch);
  EXPECT_EQ(summary->stop_reason, "epochs");
  EXPECT_EQ(summary->steps, steps);
  EXPECT_EQ(summary->epochs_completed, kEpochs);
  EXPECT_EQ(summary->images_seen, steps * kBatch);
  EXPECT_GE(summary->knn_top1, 0.0);
  EXPECT_LE(summary->knn_top1, 1.0);
  EXPECT_FALSE(summary->resumed);
  EXPECT_EQ(summary->export_path, out + "/backbone.pt");
  EXPECT_TRUE(fs::exists(out + "/backbone.pt"));
  ASSERT_TRUE(fs::exists(out + "/summary.json"));

  auto j = nlohmann::json::parse(std::ifstream(out + "/summary.json"));
  EXPECT_EQ(j["stop_reason"].get<std::string>(), "epochs");
  EXPECT_EQ(j["steps"].get<int64_t>(), steps);
  EXPECT_EQ(j["images_seen"].get<int64_t>(), steps * kBatch);
  EXPECT_DOUBLE_EQ(j["knn_top1"].get<double>(), summary->knn_top1);
  EXPECT_EQ(j["knn_curve"].size(), 2u);  // after epoch 1 and at the end
  for (const auto& point : j["knn_curve"]) {
    EXPECT_GE(point["knn_top1"].get<double>(), 0.0);
    EXPECT_LE(point["knn_top1"].get<double>(), 1.0);
  }

  std::ifstream metrics(out + "/metrics.jsonl");
  std::string line;
  int loss_lines = 0;
  while (std::getline(metrics, line)) {
    auto m = nlohmann::json::parse(line);
    if (m.contains("loss")) {
      ++loss_lines;
      EXPECT_TRUE(std::isfinite(m["loss"].get<double>())) << line;
    }
  }
  EXPECT_EQ(loss_lines, steps);  // logging.every_steps 1
}

TEST(ImageFolderTrainingTest, TruncatedJpegFailsTheRunNamingTheFile) {
  ScopedTempDir dir("image_folder_run");
  const std::string data = dir.path() + "/data";
  const std::string out = dir.path() + "/out";
  WriteImageFolder(data, "val");
  // Not the first file of its class, whose header is read when the folder
  // is opened: the failure comes from the loader threads during training.
  const std::string cut = data + "/train/" + ClassName(1) + "/img_07.jpg";
  std::vector<uint8_t> bytes = ReadFile(cut);
  ASSERT_GT(bytes.size(), 200u);
  bytes.resize(bytes.size() / 2);
  WriteFile(cut, bytes);

  absl::Status status;
  auto trainer = Trainer::Create(Spec(data, out));
  if (!trainer.ok()) {
    status = trainer.status();
  } else {
    auto summary = (*trainer)->Run();
    ASSERT_FALSE(summary.ok()) << "trained " << summary->steps << " steps";
    status = summary.status();
  }
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_TRUE(Contains(status, "img_07.jpg")) << status;
  EXPECT_TRUE(Contains(status, cut)) << status;
  EXPECT_FALSE(fs::exists(out + "/summary.json"));
  EXPECT_FALSE(fs::exists(out + "/backbone.pt"));
}

TEST(ImageFolderTrainingTest, TestFolderServesAsEvaluationSet) {
  ScopedTempDir dir("image_folder_run");
  const std::string data = dir.path() + "/data";
  const std::string out = dir.path() + "/out";
  WriteImageFolder(data, "test");
  ASSERT_FALSE(fs::exists(data + "/val"));

  JobSpec spec = Spec(data, out);
  spec.optim.epochs = 1;
  auto trainer = Trainer::Create(spec);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  auto summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->stop_reason, "epochs");
  EXPECT_EQ(summary->steps, kClasses * kTrainPerClass / kBatch);
  EXPECT_GE(summary->knn_top1, 0.0);
  EXPECT_LE(summary->knn_top1, 1.0);
  EXPECT_TRUE(fs::exists(out + "/summary.json"));
  EXPECT_TRUE(fs::exists(out + "/backbone.pt"));
}

TEST(ImageFolderTrainingTest, MissingEvaluationFolderIsNamed) {
  ScopedTempDir dir("image_folder_run");
  const std::string data = dir.path() + "/data";
  const std::string out = dir.path() + "/out";
  WriteImageFolder(data, /*eval_folder=*/"");

  auto trainer = Trainer::Create(Spec(data, out));
  ASSERT_FALSE(trainer.ok());
  EXPECT_EQ(trainer.status().code(), absl::StatusCode::kNotFound)
      << trainer.status();
  EXPECT_TRUE(Contains(trainer.status(), data)) << trainer.status();
  // The folder names must appear outside the data path itself.
  std::string rest(trainer.status().message());
  rest.erase(0, rest.find(data) + data.size());
  EXPECT_NE(rest.find("val"), std::string::npos) << trainer.status();
  EXPECT_NE(rest.find("test"), std::string::npos) << trainer.status();
  EXPECT_FALSE(fs::exists(out + "/summary.json"));
}

TEST(ImageFolderTrainingTest, MissingTrainFolderIsNamed) {
  ScopedTempDir dir("image_folder_run");
  const std::string data = dir.path() + "/data";
  WriteImageFolder(data, "val");
  fs::remove_all(data + "/train");

  auto trainer = Trainer::Create(Spec(data, dir.path() + "/out"));
  ASSERT_FALSE(trainer.ok());
  EXPECT_EQ(trainer.status().code(), absl::StatusCode::kNotFound)
      << trainer.status();
  EXPECT_TRUE(Contains(trainer.status(), data + "/train")) << trainer.status();
}

}  // namespace
}  // namespace momentum::worker
