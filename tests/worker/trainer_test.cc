#include "worker/trainer.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tests/worker/test_data.h"

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;

class TrainerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    data_dir_ = new std::string(testing::TempDir("trainer-data"));
    testing::WriteFakeFashionMnist(*data_dir_, 96, 40, 12);
  }
  static void TearDownTestSuite() {
    fs::remove_all(*data_dir_);
    delete data_dir_;
  }

  JobSpec Spec(const std::string& out) {
    JobSpec s;
    s.name = "trainer-test";
    s.seed = 5;
    s.output_dir = out;
    s.model.width = 4;
    s.model.in_channels = 1;
    s.model.small_stem = true;
    s.moco.dim = 8;
    s.moco.queue_size = 40;  // not a multiple of the batch: wraps around
    s.moco.bn = "split";
    s.moco.bn_groups = 2;
    s.data.path = *data_dir_;
    s.data.loader_threads = 2;
    s.data.prefetch = 2;
    s.optim.batch_size = 16;  // 6 steps per epoch
    s.optim.epochs = 3;
    s.optim.lr = 0.5;
    s.optim.warmup = 0.1;
    s.eval.every_epochs = 1;
    s.eval.knn_k = 10;
    s.checkpoint.every_steps = 1;
    s.checkpoint.keep = 2;
    s.logging.every_steps = 2;
    s.resources.threads = 2;
    return s;
  }

  static std::string* data_dir_;
};
std::string* TrainerTest::data_dir_ = nullptr;

void ExpectSameModel(Moco& a, Moco& b) {
  for (auto [ea, eb] : {std::make_pair(a.encoder_q(), b.encoder_q()),
                        std::make_pair(a.encoder_k(), b.encoder_k())}) {
    auto sa = StateOf(*ea), sb = StateOf(*eb);
    ASSERT_EQ(sa.size(), sb.size());
    for (size_t i = 0; i < sa.size(); ++i) {
      EXPECT_TRUE(at::equal(sa[i].second, sb[i].second)) << sa[i].first;
    }
  }
  EXPECT_TRUE(at::equal(a.queue(), b.queue()));
  EXPECT_EQ(a.queue_ptr(), b.queue_ptr());
}

TEST_F(TrainerTest, WritesMetricsSummaryCheckpointsAndExport) {
  const std::string out = testing::TempDir("trainer-outputs");
  auto trainer = Trainer::Create(Spec(out));
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  auto summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->stop_reason, "epochs");
  EXPECT_EQ(summary->steps, 18);
  EXPECT_EQ(summary->images_seen, 18 * 16);
  EXPECT_GE(summary->knn_top1, 0.0);
  EXPECT_LE(summary->knn_top1, 1.0);
  EXPECT_TRUE(fs::exists(out + "/backbone.pt"));
  // With one rank the phases split the step time (timed on its own) whole.
  const StepPhases& p = summary->phases;
  EXPECT_EQ(p.communication, 0.0);
  EXPECT_GT(p.forward, 0.0);
  EXPECT_GT(p.backward, 0.0);
  EXPECT_NEAR(
      (p.data + p.forward + p.backward + p.communication + p.optimizer) *
          summary->steps,
      summary->train_seconds, 1e-9 * summary->train_seconds + 1e-12);

  std::ifstream metrics(out + "/metrics.jsonl");
  std::string line;
  int loss_lines = 0, knn_lines = 0;
  while (std::getline(metrics, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) {
      ++loss_lines;
      EXPECT_TRUE(j.contains("lr") && j.contains("images_per_s"));
      EXPECT_TRUE(std::isfinite(j["loss"].get<double>()));
      for (const char* phase :
           {"data", "forward", "backward", "communication", "optimizer"}) {
        EXPECT_GE(j["step_ms"][phase].get<double>(), 0.0) << phase;
      }
    }
    if (j.contains("knn_top1")) ++knn_lines;
  }
  EXPECT_EQ(loss_lines, 9);  // every 2 steps
  EXPECT_EQ(knn_lines, 3);   // after epochs 1 and 2, and at the end
  auto summary_json =
      nlohmann::json::parse(std::ifstream(out + "/summary.json"));
  EXPECT_DOUBLE_EQ(summary_json["knn_top1"].get<double>(), summary->knn_top1);
  EXPECT_EQ(summary_json["images_seen"].get<int64_t>(), 288);
  EXPECT_EQ(summary_json["knn_curve"].size(), 3u);
  int checkpoints = 0;
  for (const auto& e : fs::directory_iterator(out + "/checkpoints")) {
    (void)e;
    ++checkpoints;
  }
  EXPECT_EQ(checkpoints, 2);  // checkpoint.keep
  fs::remove_all(out);
}

class TrainerResumeTest : public TrainerTest,
                          public ::testing::WithParamInterface<int64_t> {};

// A run stopped after any step and resumed ends bit for bit where a run that
// was never stopped does.
TEST_P(TrainerResumeTest, ResumedRunEqualsUninterruptedRun) {
  const int64_t stop_after = GetParam();
  const std::string straight = testing::TempDir("resume-straight");
  const std::string broken = testing::TempDir("resume-broken");
  auto a = Trainer::Create(Spec(straight));
  ASSERT_TRUE(a.ok()) << a.status();
  auto sa = (*a)->Run();
  ASSERT_TRUE(sa.ok()) << sa.status();
  EXPECT_FALSE(sa->resumed);

  {
    auto b = Trainer::Create(Spec(broken));
    ASSERT_TRUE(b.ok());
    auto first = (*b)->Run(nullptr, stop_after);
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(first->stop_reason, "limit");
    EXPECT_EQ(first->steps, stop_after);
  }
  auto c = Trainer::Create(Spec(broken));
  ASSERT_TRUE(c.ok());
  auto sc = (*c)->Run();
  ASSERT_TRUE(sc.ok()) << sc.status();
  EXPECT_TRUE(sc->resumed);
  EXPECT_EQ(sc->steps, sa->steps);
  ExpectSameModel((*a)->model(), (*c)->model());
  EXPECT_DOUBLE_EQ(sc->knn_top1, sa->knn_top1);
  fs::remove_all(straight);
  fs::remove_all(broken);
}

INSTANTIATE_TEST_SUITE_P(StopPoints, TrainerResumeTest,
                         ::testing::Values(1, 6, 7, 17));

TEST_F(TrainerTest, StopFlagCheckpointsAndReturns) {
  const std::string out = testing::TempDir("trainer-stop");
  auto trainer = Trainer::Create(Spec(out));
  ASSERT_TRUE(trainer.ok());
  std::atomic<bool> stop{true};
  auto summary = (*trainer)->Run(&stop);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->stop_reason, "signal");
  EXPECT_TRUE(fs::exists(summary->checkpoint)) << summary->checkpoint;
  EXPECT_FALSE(fs::exists(out + "/backbone.pt"));
  fs::remove_all(out);
}

TEST_F(TrainerTest, BatchLargerThanTrainSetIsRejected) {
  JobSpec s = Spec(testing::TempDir("trainer-big-batch"));
  s.optim.batch_size = 128;
  s.moco.bn_groups = 2;
  auto trainer = Trainer::Create(s);
  ASSERT_FALSE(trainer.ok());
  EXPECT_NE(trainer.status().message().find("optim.batch_size"),
            std::string::npos);
}

}  // namespace
}  // namespace momentum::worker
