#include "worker/trainer.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
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
    // scripts/gpu-check.sh runs these tests once more on the GPU.
    const char* device = std::getenv("MOMENTUM_TEST_DEVICE");
    s.resources.device = device != nullptr ? device : "cpu";
    return s;
  }

  static std::string* data_dir_;
};
std::string* TrainerTest::data_dir_ = nullptr;

// Bit for bit, wherever each model lives.
void ExpectSameModel(Moco& a, Moco& b) {
  for (auto [ea, eb] : {std::make_pair(a.encoder_q(), b.encoder_q()),
                        std::make_pair(a.encoder_k(), b.encoder_k())}) {
    auto sa = StateOf(*ea), sb = StateOf(*eb);
    ASSERT_EQ(sa.size(), sb.size());
    for (size_t i = 0; i < sa.size(); ++i) {
      EXPECT_TRUE(at::equal(sa[i].second.cpu(), sb[i].second.cpu()))
          << sa[i].first;
    }
  }
  EXPECT_TRUE(at::equal(a.queue().cpu(), b.queue().cpu()));
  EXPECT_EQ(a.queue_ptr(), b.queue_ptr());
}

// resources.precision bf16 (here on the CPU): the encoders compute in
// bfloat16, so the first loss differs a little from float32's, while the
// logits, the loss, the queue and the weights stay float32; the run learns
// as the float32 run does.
TEST_F(TrainerTest, Bf16AutocastsTheEncodersOnly) {
  const std::string out32 = testing::TempDir("bf16-off");
  const std::string out16 = testing::TempDir("bf16-on");
  JobSpec spec16 = Spec(out16);
  spec16.resources.precision = "bf16";
  auto fp32 = Trainer::Create(Spec(out32));
  auto bf16 = Trainer::Create(spec16);
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_FALSE((*fp32)->where().bf16);
  EXPECT_TRUE((*bf16)->where().bf16);
  torch::manual_seed(3);
  const at::Tensor x_q = at::randn({16, 1, 28, 28});
  const at::Tensor x_k = at::randn({16, 1, 28, 28});
  const at::Tensor perm = at::randperm(16, at::kLong);
  Moco::Output a = (*fp32)->model().Forward(x_q, x_k, perm);
  Moco::Output b = (*bf16)->model().Forward(x_q, x_k, perm);
  EXPECT_EQ(b.logits.scalar_type(), at::kFloat);
  EXPECT_EQ(b.loss.scalar_type(), at::kFloat);
  EXPECT_EQ(b.keys.scalar_type(), at::kFloat);
  const double la = a.loss.item<double>(), lb = b.loss.item<double>();
  EXPECT_NE(la, lb);
  EXPECT_NEAR(lb, la, 0.05 * std::abs(la));
  b.loss.backward();
  for (const at::Tensor& p : (*bf16)->model().encoder_q()->parameters()) {
    EXPECT_EQ(p.scalar_type(), at::kFloat);
    EXPECT_EQ(p.grad().scalar_type(), at::kFloat);
  }

  auto s32 = (*fp32)->Run();
  auto s16 = (*bf16)->Run();
  ASSERT_TRUE(s32.ok()) << s32.status();
  ASSERT_TRUE(s16.ok()) << s16.status();
  EXPECT_EQ((*bf16)->model().queue().scalar_type(), at::kFloat);
  EXPECT_GT(s16->knn_top1, s32->knn_top1 - 0.15);
  fs::remove_all(out32);
  fs::remove_all(out16);
}

// A checkpoint written on the GPU resumes on the CPU and one written on the
// CPU resumes on the GPU: the resuming trainer holds exactly what was
// written, and trains on to the end. Runs where a GPU is visible
// (scripts/gpu-check.sh).
TEST_F(TrainerTest, CheckpointsMoveBetweenGpuAndCpu) {
  if (VisibleCudaDevices() == 0) GTEST_SKIP() << "no GPU visible";
  for (auto [from, to] :
       {std::make_pair("cuda", "cpu"), std::make_pair("cpu", "cuda")}) {
    SCOPED_TRACE(absl::StrCat(from, " to ", to));
    const std::string out = testing::TempDir("across-devices");
    JobSpec first_spec = Spec(out);
    first_spec.resources.device = from;
    auto first = Trainer::Create(first_spec);
    ASSERT_TRUE(first.ok()) << first.status();
    auto stopped = (*first)->Run(nullptr, /*max_steps_this_call=*/5);
    ASSERT_TRUE(stopped.ok()) << stopped.status();
    ASSERT_EQ(stopped->stop_reason, "limit");

    JobSpec second_spec = Spec(out);
    second_spec.resources.device = to;
    auto second = Trainer::Create(second_spec);
    ASSERT_TRUE(second.ok()) << second.status();
    EXPECT_EQ((*second)->where().device.is_cuda(), std::string(to) == "cuda");
    // Asked to stop at once: it resumes, and stops before any step.
    const std::atomic<bool> stop{true};
    auto resumed = (*second)->Run(&stop);
    ASSERT_TRUE(resumed.ok()) << resumed.status();
    EXPECT_TRUE(resumed->resumed);
    EXPECT_EQ(resumed->steps, 5);
    ExpectSameModel((*second)->model(), (*first)->model());
    auto finished = (*second)->Run();
    ASSERT_TRUE(finished.ok()) << finished.status();
    EXPECT_EQ(finished->steps, 18);
    EXPECT_GT(finished->knn_top1, 0.3);
    fs::remove_all(out);
  }
}

// data.augment_on device (here on the CPU): the same job trains from the
// loader's bytes and choices, applied to whole batches, and learns as the
// host-augmented run does.
TEST_F(TrainerTest, AugmentOnTheDeviceTrainsAsOnTheHost) {
  const std::string host_out = testing::TempDir("augment-host");
  const std::string device_out = testing::TempDir("augment-device");
  JobSpec host = Spec(host_out);
  host.data.augment_on = "host";
  host.logging.every_steps = 1;
  JobSpec device = host;
  device.output_dir = device_out;
  device.data.augment_on = "device";
  auto a = Trainer::Create(host);
  auto b = Trainer::Create(device);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  auto sa = (*a)->Run();
  auto sb = (*b)->Run();
  ASSERT_TRUE(sa.ok()) << sa.status();
  ASSERT_TRUE(sb.ok()) << sb.status();
  EXPECT_EQ(sb->steps, sa->steps);
  // The losses of step 1 see nearly the same views; a 40-image
  // kNN after 18 steps is too coarse to compare beyond "it learned".
  auto first_loss = [](const std::string& out) {
    std::ifstream in(out + "/metrics.jsonl");
    std::string line;
    std::getline(in, line);
    return nlohmann::json::parse(line)["loss"].get<double>();
  };
  const double host_loss = first_loss(host_out);
  EXPECT_NEAR(first_loss(device_out), host_loss, 0.03 * host_loss);
  EXPECT_GT(sb->knn_top1, 0.4);
  fs::remove_all(host_out);
  fs::remove_all(device_out);
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
  EXPECT_EQ(checkpoints, 4);  // checkpoint.keep, best.pt and best.json
  // best.pt is the checkpoint of the best kNN of the curve.
  size_t best = 0;
  for (size_t i = 0; i < summary_json["knn_curve"].size(); ++i) {
    if (summary_json["knn_curve"][i]["knn_top1"].get<double>() >
        summary_json["knn_curve"][best]["knn_top1"].get<double>()) {
      best = i;
    }
  }
  auto best_json =
      nlohmann::json::parse(std::ifstream(out + "/checkpoints/best.json"));
  EXPECT_DOUBLE_EQ(best_json["knn_top1"].get<double>(),
                   summary_json["knn_curve"][best]["knn_top1"].get<double>());
  EXPECT_EQ(best_json["step"], summary_json["knn_curve"][best]["step"]);
  auto fresh = Trainer::Create(Spec(testing::TempDir("best-load")));
  ASSERT_TRUE(fresh.ok());
  Sgd sgd((*fresh)->model().encoder_q()->parameters(), 0.9, 1e-4);
  auto loaded =
      LoadCheckpoint(out + "/checkpoints/best.pt", (*fresh)->model(), sgd);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->position.global_step, best_json["step"].get<int64_t>());
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

// A truncated newest checkpoint is skipped for the one before it; the run
// resumes there and still ends bit for bit where an uninterrupted run does.
TEST_F(TrainerTest, CorruptNewestCheckpointIsSkippedForThePreviousOne) {
  const std::string straight = testing::TempDir("corrupt-straight");
  const std::string broken = testing::TempDir("corrupt-broken");
  auto a = Trainer::Create(Spec(straight));
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE((*a)->Run().ok());
  {
    auto b = Trainer::Create(Spec(broken));
    ASSERT_TRUE(b.ok());
    ASSERT_TRUE((*b)->Run(nullptr, 8).ok());
  }
  const auto checkpoints = CheckpointsNewestFirst(broken + "/checkpoints");
  ASSERT_EQ(checkpoints.size(), 2u);  // steps 8 and 7
  fs::resize_file(checkpoints[0], fs::file_size(checkpoints[0]) / 2);
  auto c = Trainer::Create(Spec(broken));
  ASSERT_TRUE(c.ok());
  auto sc = (*c)->Run();
  ASSERT_TRUE(sc.ok()) << sc.status();
  EXPECT_TRUE(sc->resumed);
  ExpectSameModel((*a)->model(), (*c)->model());
  // Every checkpoint corrupt: an error naming a file, not a fresh start.
  for (const std::string& path :
       CheckpointsNewestFirst(broken + "/checkpoints")) {
    fs::resize_file(path, 10);
  }
  auto d = Trainer::Create(Spec(broken));
  ASSERT_TRUE(d.ok());
  auto sd = (*d)->Run();
  ASSERT_FALSE(sd.ok());
  EXPECT_EQ(sd.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(sd.status().message().find("checkpoint-"), std::string::npos)
      << sd.status();
  fs::remove_all(straight);
  fs::remove_all(broken);
}

// The lr of the metrics line logged at `step`.
double LrAtStep(const std::string& out, int64_t step) {
  std::ifstream in(out + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("lr") && j["step"].get<int64_t>() == step) {
      return j["lr"].get<double>();
    }
  }
  return -1;
}

// A NaN loss (injected at step 5): the update is skipped, the run rolls
// back to the newest checkpoint with half the learning rate, records the
// event and finishes; with faults.on_nonfinite "fail" it ends with an error.
TEST_F(TrainerTest, NonFiniteStepRollsBackWithALowerLearningRate) {
  const std::string straight = testing::TempDir("nan-straight");
  const std::string rolled = testing::TempDir("nan-rolled");
  auto a = Trainer::Create(Spec(straight));
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE((*a)->Run().ok());

  ::setenv("MOMENTUM_FAULT_NAN_STEP", "5", 1);
  auto b = Trainer::Create(Spec(rolled));
  ASSERT_TRUE(b.ok());
  auto sb = (*b)->Run();
  ASSERT_TRUE(sb.ok()) << sb.status();
  EXPECT_EQ(sb->steps, 18);
  std::ifstream in(rolled + "/metrics.jsonl");
  std::string line;
  int rollbacks = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.value("event", "") != "rollback") continue;
    ++rollbacks;
    EXPECT_EQ(j["from_step"].get<int64_t>(), 5);
    EXPECT_EQ(j["to_step"].get<int64_t>(), 5);
    EXPECT_DOUBLE_EQ(j["lr_scale"].get<double>(), 0.5);
    EXPECT_NE(j["reason"].get<std::string>().find("not finite"),
              std::string::npos);
  }
  EXPECT_EQ(rollbacks, 1);
  EXPECT_DOUBLE_EQ(LrAtStep(rolled, 6), 0.5 * LrAtStep(straight, 6));
  EXPECT_DOUBLE_EQ(LrAtStep(rolled, 4), LrAtStep(straight, 4));

  JobSpec failing = Spec(testing::TempDir("nan-fail"));
  failing.faults.on_nonfinite = "fail";
  auto c = Trainer::Create(failing);
  ASSERT_TRUE(c.ok());
  auto sc = (*c)->Run();
  ::unsetenv("MOMENTUM_FAULT_NAN_STEP");
  ASSERT_FALSE(sc.ok());
  EXPECT_NE(sc.status().message().find("gradients of step 5 are not finite"),
            std::string::npos)
      << sc.status();
  fs::remove_all(straight);
  fs::remove_all(rolled);
  fs::remove_all(failing.output_dir);
}

// The lines of metrics.jsonl, in order.
std::vector<nlohmann::json> MetricsLines(const std::string& out) {
  std::ifstream in(out + "/metrics.jsonl");
  std::vector<nlohmann::json> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

// Feature collapse: a threshold just above the spread a healthy run logs at
// two logging steps in a row makes the check fire at the second of them.
// The step, the values and the roll-back follow from the healthy run's own
// metrics (the check changes nothing before it fires); with
// faults.on_collapse "fail" the run ends there with the values.
TEST_F(TrainerTest, CollapsedFeaturesRollBackOrFail) {
  const std::string straight = testing::TempDir("collapse-straight");
  auto a = Trainer::Create(Spec(straight));
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE((*a)->Run().ok());
  // step -> the logged spread, as a fraction of the healthy 1/sqrt(dim).
  std::vector<std::pair<int64_t, double>> ratios;
  std::map<int64_t, double> stds;
  for (const auto& j : MetricsLines(straight)) {
    ASSERT_NE(j.value("event", ""), "rollback")
        << "the default threshold fires on a healthy run: " << j.dump();
    if (!j.contains("feature_std_mean")) continue;
    const double std_mean = j["feature_std_mean"].get<double>();
    ratios.emplace_back(j["step"].get<int64_t>(), std_mean * std::sqrt(8.0));
    stds[j["step"].get<int64_t>()] = std_mean;
  }
  ASSERT_GE(ratios.size(), 6u);
  // Fire at the 4th and 5th checks; the earliest run of two checks below
  // the threshold is where it must fire.
  const double threshold =
      std::nextafter(std::max(ratios[3].second, ratios[4].second), 2.0);
  ASSERT_LT(threshold, 1.0);
  int64_t expected_step = -1;
  for (size_t i = 1; i < ratios.size() && expected_step < 0; ++i) {
    if (ratios[i - 1].second < threshold && ratios[i].second < threshold) {
      expected_step = ratios[i].first;
    }
  }
  ASSERT_GT(expected_step, 0);

  JobSpec rolling = Spec(testing::TempDir("collapse-rolled"));
  rolling.faults.collapse_std_ratio = threshold;
  rolling.faults.collapse_patience = 2;
  rolling.faults.max_rollbacks = 1;
  auto b = Trainer::Create(rolling);
  ASSERT_TRUE(b.ok());
  auto sb = (*b)->Run();
  // After the roll-back the run trains on differently: it may fire again,
  // which then fails on faults.max_rollbacks.
  if (!sb.ok()) {
    EXPECT_NE(sb.status().message().find("feature collapse"), std::string::npos)
        << sb.status();
    EXPECT_NE(sb.status().message().find("faults.max_rollbacks"),
              std::string::npos)
        << sb.status();
  }
  std::vector<nlohmann::json> events;
  for (const auto& j : MetricsLines(rolling.output_dir)) {
    if (j.value("event", "") == "rollback") events.push_back(j);
  }
  ASSERT_EQ(events.size(), 1u);
  const nlohmann::json& e = events[0];
  EXPECT_EQ(e["from_step"].get<int64_t>(), expected_step);
  // Checkpoints every step; the one of the firing step is not written yet.
  EXPECT_EQ(e["to_step"].get<int64_t>(), expected_step - 1);
  EXPECT_DOUBLE_EQ(e["lr_scale"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(e["feature_std_mean"].get<double>(), stds[expected_step]);
  EXPECT_DOUBLE_EQ(e["feature_std_ratio"].get<double>(),
                   stds[expected_step] * std::sqrt(8.0));
  EXPECT_NE(e["reason"].get<std::string>().find(
                absl::StrCat("feature collapse at step ", expected_step)),
            std::string::npos)
      << e.dump();

  JobSpec failing = Spec(testing::TempDir("collapse-fail"));
  failing.faults.collapse_std_ratio = threshold;
  failing.faults.collapse_patience = 2;
  failing.faults.on_collapse = "fail";
  auto c = Trainer::Create(failing);
  ASSERT_TRUE(c.ok());
  auto sc = (*c)->Run();
  ASSERT_FALSE(sc.ok());
  EXPECT_NE(sc.status().message().find(
                absl::StrCat("feature collapse at step ", expected_step)),
            std::string::npos)
      << sc.status();
  EXPECT_NE(sc.status().message().find("faults.on_collapse: fail"),
            std::string::npos)
      << sc.status();
  fs::remove_all(straight);
  fs::remove_all(rolling.output_dir);
  fs::remove_all(failing.output_dir);
}

INSTANTIATE_TEST_SUITE_P(StopPoints, TrainerResumeTest,
                         ::testing::Values(1, 6, 7, 17));

// Age of the oldest key after s steps of b keys into a queue of k slots,
// from the definition (worker/step_report.h): the initial keys (step 0)
// survive while fewer than k keys were enqueued; then the oldest surviving
// key is key n - k of the n = s * b enqueued, written by step (n - k) / b + 1.
int64_t ExpectedStaleness(int64_t s, int64_t b, int64_t k) {
  const int64_t n = s * b;
  if (n < k) return s;
  return s - ((n - k) / b + 1);
}

std::vector<StepReport> Windows(const std::vector<StepReport>& reports) {
  std::vector<StepReport> out;
  for (const auto& r : reports) {
    if (r.knn_top1 < 0) out.push_back(r);
  }
  return out;
}

// The callback sees every logging window and every evaluation, with the
// series defined in worker/step_report.h; metrics.jsonl lists the same
// health values.
TEST_F(TrainerTest, ReportsEveryWindowAndEvaluationToItsCallback) {
  const std::string out = testing::TempDir("trainer-reports");
  JobSpec spec = Spec(out);
  spec.logging.every_steps = 1;  // 18 steps, evaluations after 6, 12, 18
  auto trainer = Trainer::Create(spec);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  std::vector<StepReport> reports;
  (*trainer)->SetReportCallback(
      [&](const StepReport& r) { reports.push_back(r); });
  auto summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  ASSERT_EQ(reports.size(), 18u + 3u);

  const int64_t b = spec.optim.batch_size, k = spec.moco.queue_size;
  int64_t step = 0;
  for (size_t i = 0; i < reports.size(); ++i) {
    const StepReport& r = reports[i];
    SCOPED_TRACE("report " + std::to_string(i) + " at step " +
                 std::to_string(r.step));
    EXPECT_EQ(r.rank, 0);
    EXPECT_EQ(r.queue_staleness_steps, ExpectedStaleness(r.step, b, k));
    EXPECT_DOUBLE_EQ(r.epoch, r.step / 6.0);
    EXPECT_GT(r.fraction, 0.0);
    EXPECT_LE(r.fraction, 1.0);
    if (r.knn_top1 >= 0) {
      // After the window of the same step, with its series.
      ASSERT_GT(i, 0u);
      const StepReport& w = reports[i - 1];
      EXPECT_EQ(r.step % 6, 0);
      EXPECT_EQ(r.step, w.step);
      EXPECT_LE(r.knn_top1, 1.0);
      EXPECT_DOUBLE_EQ(r.loss, w.loss);
      EXPECT_DOUBLE_EQ(r.positive_logit_mean, w.positive_logit_mean);
      EXPECT_DOUBLE_EQ(r.feature_std_min, w.feature_std_min);
      EXPECT_DOUBLE_EQ(r.learning_rate, w.learning_rate);
      continue;
    }
    EXPECT_EQ(r.step, ++step);
    EXPECT_TRUE(std::isfinite(r.loss) && r.loss > 0);
    EXPECT_GT(r.learning_rate, 0.0);
    EXPECT_GT(r.images_per_second, 0.0);
    EXPECT_GT(r.forward_seconds, 0.0);
    EXPECT_GT(r.backward_seconds, 0.0);
    EXPECT_GE(r.data_seconds, 0.0);
    EXPECT_EQ(r.communication_seconds, 0.0);  // one rank
    EXPECT_GE(r.optimizer_seconds, 0.0);
    EXPECT_GE(r.positive_logit_mean, -1.0);
    EXPECT_LE(r.positive_logit_mean, 1.0);
    EXPECT_GE(r.negative_logit_mean, -1.0);
    EXPECT_LE(r.negative_logit_mean, 1.0);
    EXPECT_GT(r.feature_std_min, 0.0);
    EXPECT_LE(r.feature_std_min, r.feature_std_mean);
    EXPECT_LE(r.feature_std_mean, 1.0);
  }
  EXPECT_DOUBLE_EQ(reports.back().knn_top1, summary->knn_top1);

  // metrics.jsonl: one line per window with the same values.
  std::ifstream metrics(out + "/metrics.jsonl");
  std::string line;
  std::vector<StepReport> windows = Windows(reports);
  size_t matched = 0;
  while (std::getline(metrics, line)) {
    auto j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;
    const int64_t s = j["step"].get<int64_t>();
    ASSERT_GE(s, 1);
    ASSERT_LE(s, 18);
    const StepReport& r = windows[s - 1];
    EXPECT_DOUBLE_EQ(j["positive_logit_mean"].get<double>(),
                     r.positive_logit_mean);
    EXPECT_DOUBLE_EQ(j["negative_logit_mean"].get<double>(),
                     r.negative_logit_mean);
    EXPECT_DOUBLE_EQ(j["feature_std_mean"].get<double>(), r.feature_std_mean);
    EXPECT_DOUBLE_EQ(j["feature_std_min"].get<double>(), r.feature_std_min);
    EXPECT_EQ(j["queue_staleness_steps"].get<int64_t>(),
              r.queue_staleness_steps);
    // One rank: its window loss is the group's.
    EXPECT_DOUBLE_EQ(j["loss_mean"].get<double>(), r.loss);
    ++matched;
  }
  EXPECT_EQ(matched, 18u);
  fs::remove_all(out);
}

// The queue's age survives a stop and resume: the reports of three Run()
// calls on one output folder follow the closed form of one run.
TEST_F(TrainerTest, QueueStalenessFollowsTheClosedFormAcrossResumes) {
  const std::string out = testing::TempDir("trainer-staleness");
  JobSpec spec = Spec(out);
  spec.optim.batch_size = 8;  // 12 steps per epoch
  spec.moco.queue_size = 36;  // not a multiple of the batch
  spec.optim.epochs = 1;
  spec.logging.every_steps = 1;
  std::vector<StepReport> reports;
  auto collect = [&](const StepReport& r) { reports.push_back(r); };
  for (int64_t limit : {2, 3, 0}) {  // steps 1-2, 3-5, 6-12 and evaluation
    auto trainer = Trainer::Create(spec);
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    (*trainer)->SetReportCallback(collect);
    auto summary = (*trainer)->Run(nullptr, limit);
    ASSERT_TRUE(summary.ok()) << summary.status();
    EXPECT_EQ(summary->resumed, limit != 2);
  }
  ASSERT_EQ(reports.size(), 12u + 1u);  // every step, then the evaluation
  for (size_t i = 0; i < 12; ++i) {
    EXPECT_EQ(reports[i].step, static_cast<int64_t>(i) + 1);
    EXPECT_EQ(reports[i].queue_staleness_steps,
              ExpectedStaleness(reports[i].step, 8, 36))
        << "step " << reports[i].step;
  }
  EXPECT_GE(reports.back().knn_top1, 0.0);
  EXPECT_EQ(reports.back().step, 12);
  EXPECT_EQ(reports.back().queue_staleness_steps, ExpectedStaleness(12, 8, 36));
  fs::remove_all(out);
}

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
