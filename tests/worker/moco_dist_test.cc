// MoCo across ranks: real Gloo ranks on loopback (threads of this process)
// against the one-process computation of the same global batch.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "tests/worker/test_data.h"
#include "tests/worker/thread_ranks.h"
#include "worker/knn.h"
#include "worker/moco.h"
#include "worker/optim.h"
#include "worker/process_group.h"

namespace momentum::worker {
namespace {

constexpr std::chrono::milliseconds kTimeout{20000};

MocoOptions Small(int64_t groups) {
  MocoOptions o;
  o.encoder.width = 4;
  o.encoder.in_channels = 1;
  o.encoder.small_stem = true;
  o.encoder.mlp = true;
  o.encoder.out_dim = 8;
  o.queue_size = 10;  // not a multiple of the group batch: wraps around
  o.momentum = 0.9;
  o.temperature = 0.2;
  o.bn_groups = groups;
  return o;
}

// Identical models: the same seeds for the global and the queue generators.
// `across`: BatchNorm shuffled across the ranks (else split inside each).
std::unique_ptr<Moco> MakeModel(int64_t groups, bool across = true) {
  torch::manual_seed(11);
  MocoOptions o = Small(groups);
  o.shuffle_across_ranks = across;
  return std::make_unique<Moco>(o,
                                at::make_generator<at::CPUGeneratorImpl>(12));
}

// Runs body(rank, group) on one thread per rank of a fresh process group.
void RunRanks(int64_t world,
              const std::function<void(int64_t, ProcessGroup&)>& body) {
  absl::Status joined = testing::RunRanks(world, kTimeout, body);
  ASSERT_TRUE(joined.ok()) << joined;
}

// FNV-1a over the bytes of both encoders' parameters, the queue and the
// pointer: equal fingerprints mean bit-identical state. BatchNorm running
// statistics are left out; each rank's follow its own slice of the batch.
uint64_t Fingerprint(Moco& m) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  };
  std::vector<at::Tensor> parts = m.encoder_q()->parameters();
  for (const at::Tensor& t : m.encoder_k()->parameters()) parts.push_back(t);
  parts.push_back(m.queue());
  for (const at::Tensor& t : parts) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    mix(c.data_ptr(), c.numel() * c.element_size());
  }
  const int64_t ptr = m.queue_ptr();
  mix(&ptr, sizeof(ptr));
  return h;
}

class MocoDistTest : public ::testing::TestWithParam<int64_t> {};

// Shuffled BatchNorm across N ranks gives the keys that one process gets by
// splitting the same shuffled global batch into N groups.
TEST_P(MocoDistTest, KeysAcrossRanksEqualSplitBatchNormInOneProcess) {
  const int64_t world = GetParam(), per_rank = 4, total = world * per_rank;
  at::Tensor x = at::randn({total, 1, 12, 12});
  at::Tensor perm = at::randperm(total, at::kLong);
  auto reference = MakeModel(/*groups=*/world);
  at::Tensor expected = reference->EncodeKeys(x, perm);

  std::vector<std::unique_ptr<Moco>> models;
  for (int64_t r = 0; r < world; ++r) models.push_back(MakeModel(1));
  std::vector<at::Tensor> got(world);
  RunRanks(world, [&](int64_t rank, ProcessGroup& group) {
    models[rank]->SetProcessGroup(&group);
    got[rank] = models[rank]->EncodeKeysAcrossRanks(
        x.slice(0, rank * per_rank, (rank + 1) * per_rank), perm);
  });
  for (int64_t r = 0; r < world; ++r) {
    EXPECT_TRUE(at::allclose(got[r], expected, 1e-5, 1e-6)) << "rank " << r;
  }
}

// One full step on every rank: identical queues (the group's keys in rank
// order, wrapping around) and gradients that are the mean of the ranks' own
// gradients, computed here one rank at a time.
TEST_P(MocoDistTest, StepSharesQueueAndAveragesGradients) {
  const int64_t world = GetParam(), per_rank = 4, total = world * per_rank;
  at::Tensor xq = at::randn({total, 1, 12, 12});
  at::Tensor xk = at::randn({total, 1, 12, 12});
  at::Tensor perm = at::randperm(total, at::kLong);

  // Independent path: keys from one process with split BN; each rank's loss
  // and gradients computed separately, then averaged.
  auto reference = MakeModel(world);
  at::Tensor all_keys = reference->EncodeKeys(xk, perm);
  const auto params = reference->encoder_q()->parameters();
  std::vector<at::Tensor> mean_grads(params.size());
  for (int64_t r = 0; r < world; ++r) {
    auto fresh = MakeModel(world);
    at::Tensor q =
        fresh->EncodeQueries(xq.slice(0, r * per_rank, (r + 1) * per_rank));
    at::Tensor loss = InfoNceLoss(ContrastiveLogits(
        q, all_keys.slice(0, r * per_rank, (r + 1) * per_rank), fresh->queue(),
        0.2));
    loss.backward();
    auto p = fresh->encoder_q()->parameters();
    for (size_t i = 0; i < p.size(); ++i) {
      at::Tensor g = p[i].grad() / static_cast<double>(world);
      mean_grads[i] = mean_grads[i].defined() ? mean_grads[i] + g : g;
    }
  }
  reference->Enqueue(all_keys);

  std::vector<std::unique_ptr<Moco>> models;
  for (int64_t r = 0; r < world; ++r) models.push_back(MakeModel(1));
  RunRanks(world, [&](int64_t rank, ProcessGroup& group) {
    Moco& m = *models[rank];
    m.SetProcessGroup(&group);
    auto out =
        m.Forward(xq.slice(0, rank * per_rank, (rank + 1) * per_rank),
                  xk.slice(0, rank * per_rank, (rank + 1) * per_rank), perm);
    EXPECT_EQ(out.all_keys.size(0), total);
    out.loss.backward();
    absl::Status averaged = m.AverageGradients();
    EXPECT_TRUE(averaged.ok()) << averaged;
    m.Enqueue(out.all_keys);
  });
  for (int64_t r = 0; r < world; ++r) {
    Moco& m = *models[r];
    EXPECT_TRUE(at::allclose(m.queue(), reference->queue(), 1e-5, 1e-6))
        << "rank " << r;
    EXPECT_EQ(m.queue_ptr(), reference->queue_ptr());
    auto p = m.encoder_q()->parameters();
    for (size_t i = 0; i < p.size(); ++i) {
      EXPECT_TRUE(at::allclose(p[i].grad(), mean_grads[i], 1e-4, 1e-6))
          << "rank " << r << " parameter " << i;
    }
  }
}

// Split BatchNorm with several ranks: each rank shuffles and splits its own
// batch; the group's keys are the ranks' keys in rank order.
TEST_P(MocoDistTest, SplitBatchNormStaysInsideEachRank) {
  const int64_t world = GetParam(), per_rank = 4, total = world * per_rank;
  at::Tensor xq = at::randn({total, 1, 12, 12});
  at::Tensor xk = at::randn({total, 1, 12, 12});
  at::Tensor local_perm = at::randperm(per_rank, at::kLong);
  std::vector<at::Tensor> expected;
  for (int64_t r = 0; r < world; ++r) {
    auto one = MakeModel(2, /*across=*/false);
    expected.push_back(one->EncodeKeys(
        xk.slice(0, r * per_rank, (r + 1) * per_rank), local_perm));
  }
  at::Tensor expected_all = at::cat(expected);
  std::vector<std::unique_ptr<Moco>> models;
  for (int64_t r = 0; r < world; ++r) models.push_back(MakeModel(2, false));
  std::vector<at::Tensor> got(world);
  RunRanks(world, [&](int64_t rank, ProcessGroup& group) {
    models[rank]->SetProcessGroup(&group);
    auto out = models[rank]->Forward(
        xq.slice(0, rank * per_rank, (rank + 1) * per_rank),
        xk.slice(0, rank * per_rank, (rank + 1) * per_rank), local_perm);
    got[rank] = out.all_keys;
  });
  for (int64_t r = 0; r < world; ++r) {
    EXPECT_TRUE(at::allclose(got[r], expected_all, 1e-5, 1e-6)) << "rank " << r;
  }
}

// N ranks equal one rank with split BatchNorm: three full steps (momentum
// update, keys shuffled across ranks, InfoNCE, averaged gradients, SGD,
// shared queue) on N ranks end where one process ends when it splits the key
// batch into N groups after the same shuffle and the query batch into N
// groups.
// Three steps of N ranks on `where` (threads of this process, a Gloo group)
// against one rank on the same device that splits BatchNorm into N groups.
void ExpectNRanksEqualOneRank(int64_t world, const RankDevice& where) {
  const int64_t per_rank = 4, total = world * per_rank;
  const auto on = at::TensorOptions().device(where.device);
  std::vector<at::Tensor> xq, xk, perms;
  for (int s = 0; s < 3; ++s) {
    xq.push_back(at::randn({total, 1, 12, 12}).to(on));
    xk.push_back(at::randn({total, 1, 12, 12}).to(on));
    perms.push_back(at::randperm(total, at::kLong).to(on));
  }
  const double lrs[] = {0.05, 0.1, 0.08};

  torch::manual_seed(11);
  MocoOptions o = Small(world);
  o.query_bn_groups = world;
  Moco one(o, at::make_generator<at::CPUGeneratorImpl>(12));
  one.To(where);
  Sgd one_sgd(one.encoder_q()->parameters(), 0.9, 1e-3);
  for (int s = 0; s < 3; ++s) {
    one.MomentumUpdate();
    auto out = one.Forward(xq[s], xk[s], perms[s]);
    one_sgd.ZeroGrad();
    out.loss.backward();
    one_sgd.Step(lrs[s]);
    one.Enqueue(out.all_keys);
  }

  std::vector<std::unique_ptr<Moco>> models;
  for (int64_t r = 0; r < world; ++r) {
    models.push_back(MakeModel(1));
    models.back()->To(where);
  }
  std::vector<std::vector<uint64_t>> fingerprints(world);
  RunRanks(world, [&](int64_t rank, ProcessGroup& group) {
    Moco& m = *models[rank];
    m.SetProcessGroup(&group);
    Sgd sgd(m.encoder_q()->parameters(), 0.9, 1e-3);
    for (int s = 0; s < 3; ++s) {
      m.MomentumUpdate();
      auto out = m.Forward(
          xq[s].slice(0, rank * per_rank, (rank + 1) * per_rank),
          xk[s].slice(0, rank * per_rank, (rank + 1) * per_rank), perms[s]);
      sgd.ZeroGrad();
      out.loss.backward();
      ASSERT_TRUE(m.AverageGradients().ok());
      sgd.Step(lrs[s]);
      m.Enqueue(out.all_keys);
      fingerprints[rank].push_back(Fingerprint(m));
    }
  });
  // Every rank holds bit for bit the same parameters, queue and pointer after
  // every step (K = 10 is not a multiple of the group batch).
  for (int64_t r = 1; r < world; ++r) {
    EXPECT_EQ(fingerprints[r], fingerprints[0]) << "rank " << r;
  }
  for (int64_t r = 0; r < world; ++r) {
    Moco& m = *models[r];
    for (auto [a, b] : {std::make_pair(m.encoder_q(), one.encoder_q()),
                        std::make_pair(m.encoder_k(), one.encoder_k())}) {
      auto pa = a->named_parameters(), pb = b->named_parameters();
      for (size_t i = 0; i < pa.size(); ++i) {
        EXPECT_TRUE(at::allclose(pa[i].value(), pb[i].value(), 1e-4, 1e-5))
            << "rank " << r << " " << pa[i].key();
      }
    }
    EXPECT_TRUE(at::allclose(m.queue(), one.queue(), 1e-4, 1e-5))
        << "rank " << r;
    EXPECT_EQ(m.queue_ptr(), one.queue_ptr());
  }
}

TEST_P(MocoDistTest, ThreeStepsOnNRanksEqualOneRankWithSplitBatchNorm) {
  ExpectNRanksEqualOneRank(GetParam(), RankDevice());
}

// The same with CUDA tensors: N ranks share the one GPU over Gloo (NCCL
// refuses two ranks on one GPU). Runs where a GPU is visible
// (scripts/gpu-check.sh).
TEST_P(MocoDistTest, ThreeStepsOfNRanksOnOneGpuEqualOneRankWithSplitBatchNorm) {
  if (VisibleCudaDevices() == 0) GTEST_SKIP() << "no GPU visible";
  RankDevice gpu;
  gpu.device = c10::Device(c10::kCUDA, 0);
  ExpectNRanksEqualOneRank(GetParam(), gpu);
}

// The kNN monitor in shards across ranks (uneven shards: 97 and 41 images)
// gives the accuracy one process computes alone.
TEST_P(MocoDistTest, ShardedKnnEqualsOneProcess) {
  const int64_t world = GetParam();
  const std::string dir = testing::TempDir("sharded-knn");
  testing::WriteFakeFashionMnist(dir, 97, 41, 12);
  auto train = OpenFashionMnist(dir, /*train=*/true);
  auto test = OpenFashionMnist(dir, /*train=*/false);
  ASSERT_TRUE(train.ok() && test.ok());
  ViewFormat format;
  format.channels = 1;
  format.size = 12;
  format.mean = {0.5f};
  format.std = {0.25f};
  EvalSpec spec;
  spec.knn_k = 7;
  spec.batch_size = 16;
  std::vector<std::unique_ptr<Moco>> models;
  for (int64_t r = 0; r <= world; ++r) models.push_back(MakeModel(1));
  auto expected = KnnTop1(models[world]->encoder_q(), **train, **test, format,
                          spec, /*loader_threads=*/1);
  ASSERT_TRUE(expected.ok()) << expected.status();
  std::vector<double> got(world, -1);
  RunRanks(world, [&](int64_t rank, ProcessGroup& group) {
    auto top1 = KnnTop1(models[rank]->encoder_q(), **train, **test, format,
                        spec, 1, &group);
    ASSERT_TRUE(top1.ok()) << top1.status();
    got[rank] = *top1;
  });
  for (int64_t r = 0; r < world; ++r) {
    EXPECT_NEAR(got[r], *expected, 1e-12) << "rank " << r;
  }
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, MocoDistTest, ::testing::Values(1, 2, 3));

}  // namespace
}  // namespace momentum::worker
