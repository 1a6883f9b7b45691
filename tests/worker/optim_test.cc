#include "worker/optim.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

namespace momentum::worker {
namespace {

// Three steps of SGD on f(p) = 0.5 * a * p^2 (grad a*p) against the closed
// recurrence of PyTorch's SGD written out by hand.
TEST(SgdTest, MatchesHandWrittenRecurrence) {
  at::Tensor p = at::full({1}, 2.0, at::kDouble).set_requires_grad(true);
  Sgd sgd({p}, /*momentum=*/0.9, /*weight_decay=*/0.01);
  const double a = 3.0;
  double x = 2.0, buf = 0;
  const double lrs[] = {0.1, 0.05, 0.2};
  for (int s = 0; s < 3; ++s) {
    sgd.ZeroGrad();
    (0.5 * a * p * p).sum().backward();
    sgd.Step(lrs[s]);
    const double d = a * x + 0.01 * x;
    buf = s == 0 ? d : 0.9 * buf + d;
    x -= lrs[s] * buf;
    EXPECT_NEAR(p.item<double>(), x, 1e-12) << "step " << s;
  }
}

TEST(SgdTest, SkipsParametersWithoutGradient) {
  at::Tensor p = at::ones({2}).set_requires_grad(true);
  Sgd sgd({p}, 0.9, 0.1);
  sgd.Step(1.0);
  EXPECT_TRUE(at::equal(p, at::ones({2})));
  EXPECT_FALSE(sgd.momentum_buffers()[0].defined());
}

// A step flagged non-finite on the device (found_inf 1) changes neither the
// parameters nor the momentum; an unflagged one (0) equals a step without a
// flag, bit for bit.
TEST(SgdTest, FoundInfSkipsTheWholeUpdate) {
  at::Tensor a = at::randn({5, 3}).set_requires_grad(true);
  at::Tensor b = a.detach().clone().set_requires_grad(true);
  Sgd flagged({a}, 0.9, 1e-4);
  Sgd plain({b}, 0.9, 1e-4);
  const at::Tensor grad = at::randn({5, 3});
  a.mutable_grad() = grad.clone();
  b.mutable_grad() = grad.clone();
  const at::Tensor start = a.detach().clone();
  flagged.Step(0.1, at::ones({1}));
  EXPECT_TRUE(at::equal(a, start));
  EXPECT_TRUE(at::equal(flagged.momentum_buffers()[0], at::zeros({5, 3})));
  for (int s = 0; s < 3; ++s) {
    flagged.Step(0.1, at::zeros({1}));
    plain.Step(0.1);
    EXPECT_TRUE(at::equal(a, b)) << "step " << s;
    EXPECT_TRUE(
        at::equal(flagged.momentum_buffers()[0], plain.momentum_buffers()[0]));
  }
}

OptimSpec Spec() {
  OptimSpec s;
  s.lr = 0.03;
  s.batch_size = 512;
  s.epochs = 10;
  s.steps = 0;
  s.time_budget_s = 0;
  return s;
}

TEST(ScheduleTest, ScalesLearningRatePer256Images) {
  OptimSpec s = Spec();
  s.schedule = "constant";
  EXPECT_DOUBLE_EQ(LearningRate(s, {}), 0.06);
}

TEST(ScheduleTest, CosineOverTheEpochBound) {
  OptimSpec s = Spec();
  s.schedule = "cosine";
  Progress p;
  p.steps_per_epoch = 100;
  p.step = 250;  // a quarter of 1000 steps
  EXPECT_NEAR(LearningRate(s, p), 0.06 * 0.5 * (1 + std::cos(M_PI * 0.25)),
              1e-15);
}

TEST(ScheduleTest, StepMilestonesAsFractions) {
  OptimSpec s = Spec();
  s.schedule = "step";
  s.milestones = {0.5, 0.75};
  s.gamma = 0.1;
  Progress p;
  p.steps_per_epoch = 100;
  p.step = 499;
  EXPECT_NEAR(LearningRate(s, p), 0.06, 1e-15);
  p.step = 500;
  EXPECT_NEAR(LearningRate(s, p), 0.006, 1e-15);
  p.step = 800;
  EXPECT_NEAR(LearningRate(s, p), 0.0006, 1e-15);
}

TEST(ScheduleTest, LinearWarmupThenCosine) {
  OptimSpec s = Spec();
  s.schedule = "cosine";
  s.epochs = 0;
  s.steps = 100;
  s.warmup = 0.1;
  Progress p;
  p.step = 0;
  EXPECT_NEAR(LearningRate(s, p), 0.06 * (1.0 / 10) * 0.5 * (1 + std::cos(0.0)),
              1e-15);
  p.step = 4;
  EXPECT_NEAR(LearningRate(s, p),
              0.06 * (5.0 / 10) * 0.5 * (1 + std::cos(M_PI * 0.04)), 1e-15);
  p.step = 50;
  EXPECT_NEAR(LearningRate(s, p), 0.06 * 0.5, 1e-15);
}

TEST(ScheduleTest, FirstBoundToEndSetsTheProgress) {
  OptimSpec s = Spec();
  s.epochs = 10;
  s.steps = 200;
  s.time_budget_s = 60;
  Progress p;
  p.steps_per_epoch = 100;  // epochs bound: 1000 steps
  p.step = 50;
  p.train_seconds = 3;
  EXPECT_DOUBLE_EQ(RunFraction(s, p, false), 0.25);  // steps end first
  p.train_seconds = 30;
  EXPECT_DOUBLE_EQ(RunFraction(s, p, false), 0.5);  // now time does
  p.step = 5000;
  EXPECT_DOUBLE_EQ(RunFraction(s, p, false), 1.0);
}

}  // namespace
}  // namespace momentum::worker
