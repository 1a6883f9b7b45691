// GradientAverager on real Gloo groups of 2 and 3 ranks (threads, loopback):
// the means it writes equal the mean of the ranks' gradients computed apart
// on every rank, its buckets start during the backward pass, and it fails
// cleanly where it must.
#include "worker/grad_averager.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <atomic>
#include <chrono>
#include <vector>

#include "tests/worker/thread_ranks.h"

namespace momentum::worker {
namespace {

using std::chrono::milliseconds;

constexpr int64_t kTinyBuckets = 1;  // every parameter a bucket of its own

// A small network's parameters, the same on every rank: a 3x3 convolution
// (channels_last weight, as the trainer's) with a bias, a linear layer, and
// a parameter the loss does not use.
std::vector<at::Tensor> MakeParams() {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(7);
  std::vector<at::Tensor> p = {
      at::randn({8, 4, 3, 3}, g).contiguous(at::MemoryFormat::ChannelsLast),
      at::randn({8}, g), at::randn({5, 8}, g), at::randn({3}, g)};
  for (at::Tensor& t : p) t.requires_grad_(true);
  return p;
}
constexpr size_t kUnused = 3;

at::Tensor Input(int64_t rank) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(100 + rank);
  return at::randn({2, 4, 6, 6}, g).contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor Loss(const std::vector<at::Tensor>& p, const at::Tensor& x) {
  at::Tensor h = at::relu(at::conv2d(x, p[0], p[1], 1, 1)).mean({2, 3});
  return at::linear(h, p[2]).pow(2).sum();
}

// The gradients of rank r's loss, on fresh copies of the parameters (no
// hooks), and their mean over `world` ranks divided before the sum, as the
// averager does; the sum runs in rank order.
std::vector<at::Tensor> ExpectedMeans(int64_t world) {
  std::vector<at::Tensor> mean;
  for (int64_t r = 0; r < world; ++r) {
    std::vector<at::Tensor> p = MakeParams();
    Loss(p, Input(r)).backward();
    for (size_t k = 0; k < 3; ++k) {
      at::Tensor part = p[k].grad() / static_cast<double>(world);
      if (r == 0) {
        mean.push_back(part);
      } else {
        mean[k] = mean[k] + part;
      }
    }
  }
  return mean;
}

class GradientAveragerTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(GradientAveragerTest, WritesTheMeanOfTheRanksGradients) {
  const int64_t world = GetParam();
  const std::vector<at::Tensor> expected = ExpectedMeans(world);
  for (int64_t bucket_bytes :
       {kTinyBuckets, GradientAverager::kDefaultBucketBytes}) {
    std::atomic<int> checked{0};
    ASSERT_TRUE(
        testing::RunRanks(world, milliseconds(30000),
                          [&](int64_t rank, ProcessGroup& group) {
                            std::vector<at::Tensor> p = MakeParams();
                            GradientAverager averager(&group, p, bucket_bytes);
                            Loss(p, Input(rank)).backward();
                            ASSERT_TRUE(averager.Finish().ok());
                            for (size_t k = 0; k < 3; ++k) {
                              // Two ranks sum in one order only.
                              if (world == 2) {
                                EXPECT_TRUE(at::equal(p[k].grad(), expected[k]))
                                    << "parameter " << k;
                              } else {
                                EXPECT_TRUE(at::allclose(
                                    p[k].grad(), expected[k], 1e-6, 1e-7))
                                    << "parameter " << k;
                              }
                            }
                            // The layout the gradient had stays.
                            EXPECT_TRUE(p[0].grad().is_contiguous(
                                at::MemoryFormat::ChannelsLast));
                            EXPECT_FALSE(p[kUnused].grad().defined());
                            ++checked;
                          })
            .ok());
    EXPECT_EQ(checked.load(), world);
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, GradientAveragerTest, ::testing::Values(2, 3));

TEST(GradientAverager, BucketsStartDuringTheBackwardPassInOrder) {
  ASSERT_TRUE(testing::RunRanks(
                  2, milliseconds(30000),
                  [](int64_t rank, ProcessGroup& group) {
                    // Buckets go in reverse order: MakeParams() puts the unused
                    // parameter last, so its bucket is the first and holds back
                    // all.
                    std::vector<at::Tensor> p = MakeParams();
                    GradientAverager averager(&group, p, kTinyBuckets);
                    ASSERT_EQ(averager.bucket_count(), 4);
                    Loss(p, Input(rank)).backward();
                    ASSERT_TRUE(averager.Finish().ok());
                    EXPECT_EQ(averager.started_in_backward(), 0);
                    // First in the list, its bucket is the last: the others
                    // start in the backward pass.
                    std::vector<at::Tensor> q = MakeParams();
                    GradientAverager last(
                        &group, {q[kUnused], q[0], q[1], q[2]}, kTinyBuckets);
                    Loss(q, Input(rank)).backward();
                    ASSERT_TRUE(last.Finish().ok());
                    EXPECT_EQ(last.started_in_backward(), 3);
                    // In the middle: q[2]'s bucket starts, the ones after it
                    // wait.
                    std::vector<at::Tensor> m = MakeParams();
                    GradientAverager middle(
                        &group, {m[0], m[1], m[kUnused], m[2]}, kTinyBuckets);
                    Loss(m, Input(rank)).backward();
                    ASSERT_TRUE(middle.Finish().ok());
                    EXPECT_EQ(middle.started_in_backward(), 1);
                    // Without a backward pass Finish() starts every bucket
                    // itself.
                    ASSERT_TRUE(middle.Finish().ok());
                    EXPECT_EQ(middle.started_in_backward(), 0);
                  })
                  .ok());
}

TEST(GradientAverager, AgreesWithAllReduceMean) {
  ASSERT_TRUE(
      testing::RunRanks(2, milliseconds(30000),
                        [](int64_t rank, ProcessGroup& group) {
                          std::vector<at::Tensor> p = MakeParams();
                          Loss(p, Input(rank)).backward();
                          std::vector<at::Tensor> grads;
                          for (size_t k = 0; k < 3; ++k)
                            grads.push_back(p[k].grad().clone());
                          ASSERT_TRUE(group.AllReduceMean(grads).ok());
                          for (at::Tensor& t : p)
                            t.mutable_grad() = at::Tensor();
                          GradientAverager averager(&group, p);
                          Loss(p, Input(rank)).backward();
                          ASSERT_TRUE(averager.Finish().ok());
                          for (size_t k = 0; k < 3; ++k) {
                            EXPECT_TRUE(at::equal(p[k].grad(), grads[k]))
                                << "parameter " << k;
                          }
                        })
          .ok());
}

TEST(GradientAverager, GradientThatIsNotDenseIsAveragedInPlace) {
  const std::vector<at::Tensor> expected = ExpectedMeans(2);
  ASSERT_TRUE(
      testing::RunRanks(2, milliseconds(30000),
                        [&](int64_t rank, ProcessGroup& group) {
                          std::vector<at::Tensor> p = MakeParams();
                          // A gradient that is every other column of a larger
                          // buffer: autograd accumulates into it in place, and
                          // the mean must land there too.
                          at::Tensor storage = at::zeros({5, 16});
                          at::Tensor strided = storage.slice(1, 0, 16, 2);
                          ASSERT_FALSE(strided.is_non_overlapping_and_dense());
                          p[2].mutable_grad() = strided;
                          GradientAverager averager(&group, p);
                          Loss(p, Input(rank)).backward();
                          ASSERT_TRUE(averager.Finish().ok());
                          EXPECT_TRUE(p[2].grad().is_same(strided));
                          EXPECT_TRUE(at::equal(strided, expected[2]));
                          EXPECT_TRUE(at::equal(storage.slice(1, 1, 16, 2),
                                                at::zeros({5, 8})));
                        })
          .ok());
}

TEST(GradientAverager, TwoBackwardPassesBeforeFinishAreAnError) {
  ASSERT_TRUE(
      testing::RunRanks(2, milliseconds(30000),
                        [](int64_t rank, ProcessGroup& group) {
                          std::vector<at::Tensor> p = MakeParams();
                          GradientAverager averager(&group, p, kTinyBuckets);
                          Loss(p, Input(rank)).backward();
                          Loss(p, Input(rank)).backward();
                          absl::Status status = averager.Finish();
                          EXPECT_EQ(status.code(),
                                    absl::StatusCode::kFailedPrecondition);
                          EXPECT_NE(status.message().find("accumulated twice"),
                                    std::string::npos)
                              << status;
                        })
          .ok());
}

TEST(GradientAverager, LostPeerIsAnErrorNotAHang) {
  ASSERT_TRUE(
      testing::RunRanks(
          2, milliseconds(5000),
          [](int64_t rank, ProcessGroup& group) {
            if (rank == 1) return;  // leaves the group before the average
            std::vector<at::Tensor> p = MakeParams();
            GradientAverager averager(&group, p);
            Loss(p, Input(rank)).backward();
            absl::Status status = averager.Finish();
            EXPECT_FALSE(status.ok());
            EXPECT_NE(status.message().find("AllReduceMean"), std::string::npos)
                << status;
            // The group is broken from then on, with the first error.
            absl::Status again = averager.Finish();
            EXPECT_EQ(again.code(), absl::StatusCode::kFailedPrecondition)
                << again;
          })
          .ok());
}

TEST(GradientAverager, RejectsBadArguments) {
  ASSERT_TRUE(
      testing::RunRanks(1, milliseconds(5000), [](int64_t, ProcessGroup& g) {
        std::vector<at::Tensor> p = MakeParams();
        EXPECT_THROW(GradientAverager(&g, p, 0), c10::Error);
        EXPECT_THROW(GradientAverager(&g, {at::zeros({2}, at::kLong)}),
                     c10::Error);
        EXPECT_THROW(GradientAverager(nullptr, p), c10::Error);
      }).ok());
}

}  // namespace
}  // namespace momentum::worker
