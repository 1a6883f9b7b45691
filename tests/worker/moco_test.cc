#include "worker/moco.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "worker/optim.h"

namespace momentum::worker {
namespace {

MocoOptions Small(int64_t queue, int64_t groups) {
  MocoOptions o;
  o.encoder.width = 4;
  o.encoder.in_channels = 1;
  o.encoder.small_stem = true;
  o.encoder.out_dim = 8;
  o.queue_size = queue;
  o.momentum = 0.9;
  o.temperature = 0.5;
  o.bn_groups = groups;
  return o;
}

at::Generator Gen(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

TEST(MocoTest, KeyEncoderStartsAsCopyWithoutGradients) {
  Moco model(Small(16, 2), Gen(1));
  auto q = StateOf(*model.encoder_q());
  auto k = StateOf(*model.encoder_k());
  ASSERT_EQ(q.size(), k.size());
  for (size_t i = 0; i < q.size(); ++i) {
    EXPECT_TRUE(at::equal(q[i].second, k[i].second)) << q[i].first;
    EXPECT_NE(q[i].second.data_ptr(), k[i].second.data_ptr());
  }
  for (const auto& p : model.encoder_k()->parameters()) {
    EXPECT_FALSE(p.requires_grad());
  }
}

TEST(MocoTest, QueueStartsNormalised) {
  Moco model(Small(10, 2), Gen(2));
  at::Tensor norms = model.queue().norm(2, 0);
  EXPECT_EQ(model.queue().sizes(), at::IntArrayRef({8, 10}));
  EXPECT_TRUE(at::allclose(norms, at::ones({10}), 1e-5, 1e-6));
}

TEST(MocoTest, MomentumUpdateFollowsClosedForm) {
  Moco model(Small(16, 2), Gen(3));
  {
    at::NoGradGuard g;
    for (auto& p : model.encoder_q()->parameters()) p.add_(1.0);
  }
  std::vector<at::Tensor> q, k_before;
  for (auto& p : model.encoder_q()->parameters()) q.push_back(p.clone());
  for (auto& p : model.encoder_k()->parameters()) k_before.push_back(p.clone());
  std::vector<at::Tensor> buffers_before;
  for (auto& b : model.encoder_k()->buffers())
    buffers_before.push_back(b.clone());
  model.MomentumUpdate();
  auto k_after = model.encoder_k()->parameters();
  for (size_t i = 0; i < q.size(); ++i) {
    at::Tensor want = k_before[i] * 0.9 + q[i] * 0.1;
    EXPECT_TRUE(at::allclose(k_after[i], want, 1e-6, 1e-7));
  }
  // BatchNorm statistics are not averaged.
  auto buffers_after = model.encoder_k()->buffers();
  for (size_t i = 0; i < buffers_before.size(); ++i) {
    EXPECT_TRUE(at::equal(buffers_before[i], buffers_after[i]));
  }
}

TEST(MocoTest, EnqueueWrapsAroundWhenKIsNotAMultipleOfTheBatch) {
  Moco model(Small(10, 2), Gen(4));
  at::Tensor expected = model.queue().clone();
  int64_t ptr = 0;
  for (int step = 0; step < 5; ++step) {
    at::Tensor keys = at::randn({4, 8});
    for (int64_t i = 0; i < 4; ++i) {
      expected.select(1, (ptr + i) % 10).copy_(keys[i]);
    }
    ptr = (ptr + 4) % 10;
    model.Enqueue(keys);
    EXPECT_TRUE(at::equal(model.queue(), expected)) << "step " << step;
    EXPECT_EQ(model.queue_ptr(), ptr);
  }
}

TEST(MocoTest, EnqueueOfMoreKeysThanSlotsKeepsTheLast) {
  Moco model(Small(3, 2), Gen(5));
  model.set_queue_ptr(2);
  at::Tensor keys = at::randn({5, 8});
  at::Tensor expected = model.queue().clone();
  for (int64_t i = 0; i < 5; ++i)
    expected.select(1, (2 + i) % 3).copy_(keys[i]);
  model.Enqueue(keys);
  EXPECT_TRUE(at::equal(model.queue(), expected));
  EXPECT_EQ(model.queue_ptr(), (2 + 5) % 3);
}

// A step flagged non-finite on the device keeps the queue's keys (the
// pointer and the ages move on: a trainer rolls such a step back); an
// unflagged one writes them as Enqueue() without a flag does.
TEST(MocoTest, EnqueueFlaggedNonFiniteKeepsTheKeys) {
  Moco flagged(Small(10, 2), Gen(6));
  Moco plain(Small(10, 2), Gen(6));
  const at::Tensor before = flagged.queue().clone();
  at::Tensor keys = at::randn({4, 8});
  flagged.Enqueue(keys, at::ones({1}));
  EXPECT_TRUE(at::equal(flagged.queue(), before));
  EXPECT_EQ(flagged.queue_ptr(), 4);
  at::Tensor more = at::randn({4, 8});
  flagged.Enqueue(more, at::zeros({1}));
  plain.Enqueue(keys);
  plain.Enqueue(more);
  // Slots 4..7 hold `more` in both; slots 0..3 differ only by the skip.
  EXPECT_TRUE(
      at::equal(flagged.queue().slice(1, 4, 8), plain.queue().slice(1, 4, 8)));
  EXPECT_TRUE(at::equal(flagged.queue().slice(1, 0, 4), before.slice(1, 0, 4)));
}

TEST(MocoTest, LogitsAndLossMatchDirectComputation) {
  at::Tensor q = at::randn({3, 4}, at::kDouble);
  at::Tensor k = at::randn({3, 4}, at::kDouble);
  at::Tensor queue = at::randn({4, 5}, at::kDouble);
  const double t = 0.2;
  at::Tensor logits = ContrastiveLogits(q, k, queue, t);
  ASSERT_EQ(logits.sizes(), at::IntArrayRef({3, 6}));
  double loss = 0;
  for (int n = 0; n < 3; ++n) {
    std::vector<double> row(6);
    double pos = 0;
    for (int c = 0; c < 4; ++c)
      pos += q[n][c].item<double>() * k[n][c].item<double>();
    row[0] = pos / t;
    for (int j = 0; j < 5; ++j) {
      double s = 0;
      for (int c = 0; c < 4; ++c) {
        s += q[n][c].item<double>() * queue[c][j].item<double>();
      }
      row[j + 1] = s / t;
    }
    double denom = 0;
    for (int j = 0; j < 6; ++j) {
      EXPECT_NEAR(logits[n][j].item<double>(), row[j], 1e-12);
      denom += std::exp(row[j]);
    }
    loss += -std::log(std::exp(row[0]) / denom);
  }
  EXPECT_NEAR(InfoNceLoss(logits).item<double>(), loss / 3, 1e-12);
}

// Split BatchNorm: each group of the shuffled batch is normalised on its own,
// and every key returns to its query.
TEST(MocoTest, SplitBatchNormEncodesGroupsSeparatelyAndUnshuffles) {
  MocoOptions o = Small(16, 2);
  Moco model(o, Gen(6));
  at::Tensor x = at::randn({8, 1, 12, 12});
  at::Tensor perm = at::randperm(8, Gen(7), at::kLong);
  // Expected: encode x[perm[0:4]] and x[perm[4:8]] with a fresh copy of the
  // encoder, then put row i of the result at position perm[i].
  ResNet reference(o.encoder);
  {
    at::NoGradGuard g;
    auto src = StateOf(*model.encoder_k());
    auto dst = StateOf(*reference);
    for (size_t i = 0; i < src.size(); ++i) dst[i].second.copy_(src[i].second);
  }
  reference->train();
  at::Tensor expected = at::empty({8, 8});
  {
    at::NoGradGuard g;
    at::Tensor a = reference->forward(x.index_select(0, perm.slice(0, 0, 4)));
    at::Tensor b = reference->forward(x.index_select(0, perm.slice(0, 4, 8)));
    at::Tensor both = at::cat({a, b});
    for (int64_t i = 0; i < 8; ++i) {
      expected[perm[i].item<int64_t>()] = both[i] / both[i].norm();
    }
  }
  at::Tensor keys = model.EncodeKeys(x, perm);
  EXPECT_TRUE(at::allclose(keys, expected, 1e-4, 1e-5));
  EXPECT_FALSE(keys.requires_grad());
  // Running statistics were updated twice, once per group, as in the
  // reference.
  auto k_state = StateOf(*model.encoder_k());
  auto r_state = StateOf(*reference);
  for (size_t i = 0; i < k_state.size(); ++i) {
    EXPECT_TRUE(at::allclose(k_state[i].second.to(at::kDouble),
                             r_state[i].second.to(at::kDouble), 1e-5, 1e-6))
        << k_state[i].first;
  }
}

TEST(MocoTest, ConcurrentKeyEncoderGivesIdenticalResults) {
  MocoOptions o = Small(16, 2);
  o.concurrent_key = false;
  MocoOptions c = o;
  c.concurrent_key = true;
  torch::manual_seed(9);
  Moco serial(o, Gen(8));
  torch::manual_seed(9);
  Moco concurrent(c, Gen(8));
  at::Tensor xq = at::randn({8, 1, 12, 12}), xk = at::randn({8, 1, 12, 12});
  at::Tensor perm = at::randperm(8, Gen(10), at::kLong);
  auto a = serial.Forward(xq, xk, perm);
  auto b = concurrent.Forward(xq, xk, perm);
  EXPECT_TRUE(at::equal(a.logits, b.logits));
  EXPECT_TRUE(at::equal(a.keys, b.keys));
}

TEST(MocoTest, OnlyTheQueryEncoderGetsGradients) {
  Moco model(Small(16, 2), Gen(11));
  at::Tensor xq = at::randn({4, 1, 12, 12}), xk = at::randn({4, 1, 12, 12});
  model.MomentumUpdate();
  auto out = model.Forward(xq, xk, at::randperm(4, Gen(12), at::kLong));
  out.loss.backward();
  for (const auto& p : model.encoder_q()->parameters()) {
    EXPECT_TRUE(p.grad().defined());
  }
  for (const auto& p : model.encoder_k()->parameters()) {
    EXPECT_FALSE(p.grad().defined());
  }
}

// A reference copy of `source` (parameters and buffers), in training mode.
ResNet CopyOf(ResNet& source, const ResNetOptions& options) {
  ResNet copy(options);
  at::NoGradGuard g;
  auto src = StateOf(*source);
  auto dst = StateOf(*copy);
  for (size_t i = 0; i < src.size(); ++i) dst[i].second.copy_(src[i].second);
  copy->train();
  return copy;
}

// The health of a step recomputed from an explicit forward pass of the query
// encoder, with plain tensor ops: cosine similarities q·k and q·queue, and
// the population standard deviation of each feature over the batch.
TEST(MocoTest, ForwardReportsTheHealthOfItsBatch) {
  MocoOptions o = Small(24, 2);
  torch::manual_seed(21);
  Moco model(o, Gen(21));
  ResNet reference = CopyOf(model.encoder_q(), o.encoder);
  at::Tensor queue = model.queue().clone();
  at::Tensor xq = at::randn({8, 1, 12, 12}), xk = at::randn({8, 1, 12, 12});
  auto out = model.Forward(xq, xk, at::randperm(8, Gen(22), at::kLong));

  at::NoGradGuard g;
  at::Tensor f = reference->forward(xq);
  at::Tensor q = f / f.norm(2, 1, /*keepdim=*/true);
  ASSERT_TRUE(at::allclose(out.queries, q, 1e-5, 1e-6));
  EXPECT_TRUE(out.queries.requires_grad());
  const double positive = (q * out.keys).sum(1).mean().item<double>();
  const double negative = q.mm(queue).mean().item<double>();
  at::Tensor centred = q - q.mean(0, /*keepdim=*/true);
  at::Tensor per_dim = (centred * centred).mean(0).sqrt();
  const double std_mean = per_dim.mean().item<double>();
  const double std_min = per_dim.min().item<double>();

  BatchHealth h = ReadBatchHealth(out.health);
  EXPECT_FALSE(out.health.requires_grad());
  EXPECT_NEAR(h.positive_logit_mean, positive, 1e-5);
  EXPECT_NEAR(h.negative_logit_mean, negative, 1e-5);
  EXPECT_NEAR(h.feature_std_mean, std_mean, 1e-5);
  EXPECT_NEAR(h.feature_std_min, std_min, 1e-5);
  // The same as the logits' columns times the temperature.
  at::Tensor l = out.logits * o.temperature;
  EXPECT_NEAR(h.positive_logit_mean, l.select(1, 0).mean().item<double>(),
              1e-5);
  EXPECT_NEAR(h.negative_logit_mean, l.slice(1, 1).mean().item<double>(), 1e-5);
  // Sane ranges: cosines in [-1, 1], per-dimension spreads of unit vectors.
  EXPECT_GT(h.feature_std_min, 0.0);
  EXPECT_LE(h.feature_std_min, h.feature_std_mean);
  EXPECT_LE(h.feature_std_mean, 1.0);
}

TEST(MocoTest, IdenticalQueriesHaveNoFeatureSpread) {
  Moco model(Small(16, 2), Gen(23));
  at::Tensor one = at::randn({1, 1, 12, 12});
  auto out = model.Forward(one.expand({4, 1, 12, 12}).contiguous(),
                           at::randn({4, 1, 12, 12}), at::Tensor());
  BatchHealth h = ReadBatchHealth(out.health);
  EXPECT_NEAR(h.feature_std_mean, 0.0, 1e-6);
  EXPECT_NEAR(h.feature_std_min, 0.0, 1e-6);
}

// Age of the oldest key after s steps of b keys into a queue of k slots,
// from the definition: the initial keys (step 0) survive while fewer than k
// keys were enqueued; then the oldest surviving key is key n - k of the
// n = s * b enqueued, written by step (n - k) / b + 1.
int64_t ExpectedStaleness(int64_t s, int64_t b, int64_t k) {
  const int64_t n = s * b;
  if (n < k) return s;
  return s - ((n - k) / b + 1);
}

TEST(MocoTest, QueueStalenessFollowsTheClosedForm) {
  // K not a multiple of the batch; the last case has more keys than slots.
  for (auto [k, b] : std::vector<std::pair<int64_t, int64_t>>{
           {10, 4}, {40, 16}, {7, 3}, {3, 5}}) {
    Moco model(Small(k, 2), Gen(24));
    EXPECT_EQ(model.QueueStaleness(), 0);
    for (int64_t s = 1; s <= 12; ++s) {
      model.Enqueue(at::randn({b, 8}));
      EXPECT_EQ(model.enqueued_steps(), s);
      EXPECT_EQ(model.QueueStaleness(), ExpectedStaleness(s, b, k))
          << "K " << k << " batch " << b << " step " << s;
    }
  }
}

TEST(MocoTest, QueueSlotStepsRebuildTheBookkeepingOfEnqueue) {
  for (auto [k, b] : std::vector<std::pair<int64_t, int64_t>>{
           {10, 4}, {12, 4}, {7, 3}, {3, 5}}) {
    Moco model(Small(k, 2), Gen(25));
    for (int64_t s = 0; s <= 9; ++s) {
      if (s > 0) model.Enqueue(at::randn({b, 8}));
      EXPECT_EQ(QueueSlotSteps(s, b, k, model.queue_ptr()),
                model.queue_slot_steps())
          << "K " << k << " batch " << b << " step " << s;
    }
    Moco restored(Small(k, 2), Gen(26));
    restored.set_queue_ptr(model.queue_ptr());
    restored.RestoreQueueAges(9, QueueSlotSteps(9, b, k, model.queue_ptr()));
    EXPECT_EQ(restored.QueueStaleness(), model.QueueStaleness());
    restored.Enqueue(at::randn({b, 8}));
    model.Enqueue(at::randn({b, 8}));
    EXPECT_EQ(restored.queue_slot_steps(), model.queue_slot_steps());
  }
}

}  // namespace
}  // namespace momentum::worker

namespace momentum::worker {
namespace {

// max |a - b| / max |b|: the relative error of a tensor as a whole.
double RelativeError(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.detach().to(at::kCPU, at::kDouble);
  const at::Tensor y = b.detach().to(at::kCPU, at::kDouble);
  const double scale = std::max(y.abs().max().item<double>(), 1e-12);
  return (x - y).abs().max().item<double>() / scale;
}

// Two MoCo steps on the GPU in float32 (TF32 off, channels_last, cuDNN
// benchmark mode: what the trainer uses) equal the same steps on the CPU:
// the loss, both encoders (BatchNorm statistics included), the momentum and
// the queue, each within 1e-3 relative. With bf16 the loss stays within
// 5e-2. Runs where a GPU is visible (scripts/gpu-check.sh).
TEST(MocoGpuTest, StepOnTheGpuEqualsTheStepOnTheCpu) {
  if (VisibleCudaDevices() == 0) GTEST_SKIP() << "no GPU visible";
  MocoOptions o;
  o.encoder.width = 16;
  o.encoder.in_channels = 3;
  o.encoder.mlp = true;
  o.encoder.out_dim = 32;
  o.queue_size = 200;
  o.momentum = 0.99;
  o.temperature = 0.2;
  o.bn_groups = 4;
  for (const bool bf16 : {false, true}) {
    torch::manual_seed(21);
    Moco cpu(o, Gen(22));
    torch::manual_seed(21);
    Moco gpu(o, Gen(22));
    RankDevice where;
    where.device = c10::Device(c10::kCUDA, 0);
    where.bf16 = bf16;
    PrepareDevice(where);
    gpu.To(where);
    Sgd cpu_sgd(cpu.encoder_q()->parameters(), 0.9, 1e-4);
    Sgd gpu_sgd(gpu.encoder_q()->parameters(), 0.9, 1e-4);
    for (int step = 0; step < 2; ++step) {
      const at::Tensor xq = at::randn({32, 3, 32, 32});
      const at::Tensor xk = at::randn({32, 3, 32, 32});
      const at::Tensor perm = at::randperm(32, Gen(23 + step), at::kLong);
      double losses[2];
      int i = 0;
      for (auto [model, sgd] :
           {std::make_pair(&cpu, &cpu_sgd), std::make_pair(&gpu, &gpu_sgd)}) {
        const c10::Device device = model->queue().device();
        model->MomentumUpdate();
        Moco::Output out =
            model->Forward(xq.to(device), xk.to(device), perm.to(device));
        sgd->ZeroGrad();
        out.loss.backward();
        sgd->Step(0.05);
        model->Enqueue(out.all_keys);
        losses[i++] = out.loss.item<double>();
      }
      SCOPED_TRACE(::testing::Message() << "bf16 " << bf16 << " step " << step);
      EXPECT_NEAR(losses[1], losses[0],
                  (bf16 ? 5e-2 : 1e-3) * std::abs(losses[0]));
      if (bf16) continue;
      for (auto [a, b] : {std::make_pair(gpu.encoder_q(), cpu.encoder_q()),
                          std::make_pair(gpu.encoder_k(), cpu.encoder_k())}) {
        auto sa = StateOf(*a), sb = StateOf(*b);
        for (size_t t = 0; t < sa.size(); ++t) {
          if (!at::isFloatingType(sb[t].second.scalar_type())) continue;
          EXPECT_LT(RelativeError(sa[t].second, sb[t].second), 1e-3)
              << sa[t].first;
        }
      }
      for (size_t t = 0; t < cpu_sgd.momentum_buffers().size(); ++t) {
        EXPECT_LT(RelativeError(gpu_sgd.momentum_buffers()[t],
                                cpu_sgd.momentum_buffers()[t]),
                  1e-3);
      }
      EXPECT_LT(RelativeError(gpu.queue(), cpu.queue()), 1e-3);
      EXPECT_EQ(gpu.queue_ptr(), cpu.queue_ptr());
    }
  }
}

}  // namespace
}  // namespace momentum::worker
