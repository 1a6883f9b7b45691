#include "worker/fused_batch_norm.h"

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

namespace momentum::worker {
namespace {

namespace nn = torch::nn;

// One BatchNorm + add + ReLU, run both ways from the same state: ATen's ops
// (the module's forward, add_, relu_) and BatchNormAddReLU, each forward
// `calls` times and then backward from `grad`.
struct Run {
  at::Tensor out, dx, dweight, dbias, dresidual;
  at::Tensor running_mean, running_var, batches;
};

Run RunOnce(bool fused, const at::Tensor& x0, const at::Tensor& residual0,
            const at::Tensor& grad, int calls) {
  torch::manual_seed(7);
  nn::BatchNorm2d bn(x0.size(1));
  {
    at::NoGradGuard no_grad;
    // Not the initial 1 and 0, so that a mix-up of weight and bias shows.
    bn->weight.uniform_(0.5, 1.5);
    bn->bias.uniform_(-0.5, 0.5);
    bn->running_var.uniform_(0.5, 2.0);
  }
  bn->train();
  at::Tensor x = x0.clone().requires_grad_(true);
  at::Tensor residual;
  if (residual0.defined()) residual = residual0.clone().requires_grad_(true);
  at::Tensor out;
  for (int i = 0; i < calls; ++i) {
    if (fused) {
      out = BatchNormAddReLU(*bn, x, residual);
    } else {
      out = bn->forward(x);
      if (residual.defined()) out.add_(residual);
      out = out.relu_();
    }
  }
  out.backward(grad);
  Run r;
  r.out = out.detach();
  r.dx = x.grad();
  r.dweight = bn->weight.grad();
  r.dbias = bn->bias.grad();
  if (residual.defined()) r.dresidual = residual.grad();
  r.running_mean = bn->running_mean.clone();
  r.running_var = bn->running_var.clone();
  r.batches = bn->num_batches_tracked.clone();
  return r;
}

void ExpectBitEqual(const Run& fused, const Run& aten) {
  EXPECT_TRUE(at::equal(fused.out, aten.out));
  EXPECT_TRUE(at::equal(fused.dx, aten.dx))
      << (fused.dx - aten.dx).abs().max().item<float>();
  EXPECT_TRUE(at::equal(fused.dweight, aten.dweight));
  EXPECT_TRUE(at::equal(fused.dbias, aten.dbias));
  if (aten.dresidual.defined()) {
    ASSERT_TRUE(fused.dresidual.defined());
    EXPECT_TRUE(at::equal(fused.dresidual, aten.dresidual));
  }
  EXPECT_TRUE(at::equal(fused.running_mean, aten.running_mean));
  EXPECT_TRUE(at::equal(fused.running_var, aten.running_var));
  EXPECT_TRUE(at::equal(fused.batches, aten.batches));
  // Not vacuous: the ReLU cut some outputs and kept others.
  EXPECT_GT((aten.out == 0).sum().item<int64_t>(), 0);
  EXPECT_GT((aten.out > 0).sum().item<int64_t>(), 0);
}

at::Tensor ChannelsLast(const at::Tensor& t) {
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

struct Shape {
  int64_t n, c, hw;
};

// Threads, and the element type: float, or bfloat16 as autocast gives
// BatchNorm (its parameters and statistics stay float).
class FusedBatchNormTest
    : public ::testing::TestWithParam<std::tuple<int, at::ScalarType>> {
 protected:
  void SetUp() override {
    threads_ = at::get_num_threads();
    at::set_num_threads(std::get<0>(GetParam()));
  }
  at::ScalarType type() const { return std::get<1>(GetParam()); }
  void TearDown() override { at::set_num_threads(threads_); }
  int threads_ = 1;
};

// The ResNet-18 shapes of the demo model (width 16, 28 px) and a channel
// count that is not a multiple of a vector; inputs with an offset and a
// scale, as convolution outputs have.
TEST_P(FusedBatchNormTest, EqualsAtenBitForBit) {
  for (const Shape& s : std::vector<Shape>{
           {16, 16, 28}, {16, 32, 14}, {16, 64, 7}, {32, 128, 4}, {8, 24, 5}}) {
    for (bool with_residual : {false, true}) {
      SCOPED_TRACE(testing::Message() << s.n << "x" << s.c << "x" << s.hw
                                      << " residual " << with_residual);
      torch::manual_seed(s.c + with_residual);
      at::Tensor x = ChannelsLast(
          (torch::randn({s.n, s.c, s.hw, s.hw}) * 3 + 1).to(type()));
      at::Tensor residual;
      if (with_residual) {
        residual =
            ChannelsLast(torch::randn({s.n, s.c, s.hw, s.hw}).to(type()));
      }
      at::Tensor grad =
          ChannelsLast(torch::randn({s.n, s.c, s.hw, s.hw}).to(type()));
      nn::BatchNorm2d probe(s.c);
      ASSERT_TRUE(FusedBatchNormApplies(*probe, x, residual));
      ExpectBitEqual(RunOnce(true, x, residual, grad, 3),
                     RunOnce(false, x, residual, grad, 3));
    }
  }
}

// A global average pool's gradient reaches the last block as an expanded
// view, not a channels_last tensor.
TEST_P(FusedBatchNormTest, EqualsAtenForAnExpandedGradient) {
  torch::manual_seed(3);
  at::Tensor x =
      ChannelsLast((torch::randn({16, 32, 4, 4}) * 2 - 0.5).to(type()));
  at::Tensor residual = ChannelsLast(torch::randn({16, 32, 4, 4}).to(type()));
  at::Tensor grad =
      (torch::randn({16, 32, 1, 1}) / 16).to(type()).expand({16, 32, 4, 4});
  ExpectBitEqual(RunOnce(true, x, residual, grad, 1),
                 RunOnce(false, x, residual, grad, 1));
}

INSTANTIATE_TEST_SUITE_P(ThreadsAndTypes, FusedBatchNormTest,
                         ::testing::Combine(::testing::Values(1, 2, 3),
                                            ::testing::Values(at::kFloat,
                                                              at::kBFloat16)));

// Where the fused path does not apply, the ATen ops run: the same results,
// and the module in evaluation mode uses its running statistics.
TEST(FusedBatchNormFallbackTest, OtherLayoutsPrecisionsAndModesRunAten) {
  torch::manual_seed(5);
  nn::BatchNorm2d bn(8);
  at::Tensor nchw = torch::randn({4, 8, 6, 6});
  EXPECT_FALSE(FusedBatchNormApplies(*bn, nchw, at::Tensor()));
  EXPECT_FALSE(FusedBatchNormApplies(*bn, ChannelsLast(nchw.to(at::kDouble)),
                                     at::Tensor()));
  // A residual of another layout, or of another type.
  EXPECT_FALSE(FusedBatchNormApplies(*bn, ChannelsLast(nchw), nchw));
  EXPECT_FALSE(FusedBatchNormApplies(*bn, ChannelsLast(nchw),
                                     ChannelsLast(nchw).to(at::kBFloat16)));
  at::Tensor grad = torch::randn({4, 8, 6, 6});
  ExpectBitEqual(RunOnce(true, nchw, nchw * 0.5, grad, 2),
                 RunOnce(false, nchw, nchw * 0.5, grad, 2));

  bn->eval();
  EXPECT_FALSE(FusedBatchNormApplies(*bn, ChannelsLast(nchw), at::Tensor()));
  at::NoGradGuard no_grad;
  at::Tensor expected = bn->forward(nchw).relu();
  EXPECT_TRUE(at::equal(BatchNormAddReLU(*bn, ChannelsLast(nchw)), expected));
}

// Against float64 arithmetic written out here, for what neither code path
// may get wrong: the batch statistics, the running averages, the ReLU.
TEST(FusedBatchNormMathTest, MatchesFloat64Formulas) {
  torch::manual_seed(11);
  const int64_t n = 8, c = 16, hw = 6;
  at::Tensor x = ChannelsLast(torch::randn({n, c, hw, hw}) * 2 + 0.3);
  at::Tensor residual = ChannelsLast(torch::randn({n, c, hw, hw}));
  nn::BatchNorm2d bn(c);
  at::Tensor rm0 = bn->running_mean.clone(), rv0 = bn->running_var.clone();
  at::Tensor out = BatchNormAddReLU(*bn, x, residual);

  at::Tensor xd = x.to(at::kDouble);
  at::Tensor mean = xd.mean({0, 2, 3});
  at::Tensor var = xd.var({0, 2, 3}, /*unbiased=*/false);
  at::Tensor expected =
      ((xd - mean.view({1, c, 1, 1})) / (var.view({1, c, 1, 1}) + 1e-5).sqrt() +
       residual.to(at::kDouble))
          .clamp_min(0);
  EXPECT_TRUE(torch::allclose(out.to(at::kDouble), expected, 1e-5, 1e-5));
  const double m = 0.1;
  const double count = n * hw * hw;
  EXPECT_TRUE(torch::allclose(bn->running_mean.to(at::kDouble),
                              (1 - m) * rm0.to(at::kDouble) + m * mean, 1e-6,
                              1e-6));
  EXPECT_TRUE(torch::allclose(
      bn->running_var.to(at::kDouble),
      (1 - m) * rv0.to(at::kDouble) + m * var * count / (count - 1), 1e-6,
      1e-6));
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 1);
}

}  // namespace
}  // namespace momentum::worker
