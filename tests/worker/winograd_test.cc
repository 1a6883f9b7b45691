#include "worker/winograd.h"

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "tests/worker/conv_test_util.h"
#include "worker/direct_conv.h"

namespace momentum::worker {
namespace {

namespace nn = torch::nn;

using conv_testing::CpuHasAvx512;
using conv_testing::RandomNhwc;
using conv_testing::RelativeError;

struct Shape {
  int64_t n, in, out, h, w;
};

std::string Name(const Shape& s) {
  return conv_testing::ShapeName(s.n, s.in, s.out, s.h, s.w);
}

// F(2x2, 3x3)'s sums differ from the direct ones by rounding. Measured
// against float64 they were the closer of the two (64 channels at 28x28:
// 3.7e-7 of the largest element, oneDNN's 1.1e-6); 1e-5 leaves room for
// wider sums, and still fails a tile or a transform coefficient gone wrong,
// which is off by the size of an element.
constexpr double kTolerance = 1e-5;

struct Exact {
  at::Tensor out, dx, dweight;
};

// The convolution and its gradients in float64 (ATen).
Exact Float64(const at::Tensor& x, const at::Tensor& weight,
              const at::Tensor& grad) {
  const at::Tensor xd = x.to(at::kDouble), wd = weight.to(at::kDouble);
  const at::Tensor out = at::conv2d(xd, wd, {}, 1, 1);
  auto [dx, dw, db] = at::convolution_backward(
      grad.to(at::kDouble), xd, wd, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false,
      {0, 0}, 1, {true, true, false});
  return {out, dx, dw};
}

class WinogradTest : public conv_testing::ThreadsAndShape<Shape> {
 protected:
  void SetUp() override {
    if (!CpuHasAvx512()) GTEST_SKIP() << "no AVX-512 on this CPU";
    ThreadsAndShape::SetUp();
  }
};

// The three passes called directly, on even and odd sizes, against the
// float64 sums; and the same bits on any number of threads.
TEST_P(WinogradTest, EqualsFloat64) {
  const Shape s = shape();
  torch::manual_seed(21);
  const at::Tensor x = RandomNhwc(s.n, s.in, s.h, s.w);
  const at::Tensor grad = RandomNhwc(s.n, s.out, s.h, s.w);
  const at::Tensor weight = (at::randn({s.out, s.in, 3, 3}) * 0.1)
                                .contiguous(at::MemoryFormat::ChannelsLast);
  const Exact exact = Float64(x, weight, grad);
  const at::Tensor out = WinogradForward(x, weight);
  const at::Tensor dx = WinogradInputGrad(grad, weight);
  const at::Tensor dweight = WinogradWeightGrad(x, grad);
  EXPECT_TRUE(out.is_contiguous(at::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(dx.is_contiguous(at::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(dweight.is_contiguous(at::MemoryFormat::ChannelsLast));
  EXPECT_LT(RelativeError(out, exact.out), kTolerance) << Name(s);
  EXPECT_LT(RelativeError(dx, exact.dx), kTolerance) << Name(s);
  EXPECT_LT(RelativeError(dweight, exact.dweight), kTolerance) << Name(s);

  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  EXPECT_TRUE(at::equal(out, WinogradForward(x, weight))) << Name(s);
  EXPECT_TRUE(at::equal(dx, WinogradInputGrad(grad, weight))) << Name(s);
  EXPECT_TRUE(at::equal(dweight, WinogradWeightGrad(x, grad))) << Name(s);
  at::set_num_threads(threads);
}

INSTANTIATE_TEST_SUITE_P(
    ThreadsAndShapes, WinogradTest,
    ::testing::Combine(::testing::Values(1, 2, 3),
                       ::testing::Values(
                           // Width-64 ResNet-18's layers at 28, 14 and 4 pixels
                           // (784 tiles: six chunks of 128 and one of 16).
                           Shape{4, 64, 64, 28, 28}, Shape{3, 128, 128, 14, 14},
                           Shape{2, 512, 512, 4, 4},
                           // Channels in and out differ; odd sizes, whose last
                           // tiles hang over the edge; one pixel; one image.
                           Shape{2, 64, 128, 6, 10}, Shape{3, 96, 64, 7, 7},
                           Shape{2, 64, 80, 5, 9}, Shape{2, 64, 64, 1, 1},
                           Shape{1, 64, 64, 1, 3}, Shape{1, 128, 64, 2, 2})));

// Through Conv3x3 and autograd, as the model runs it: the module's output
// and both gradients against float64, where WinogradApplies.
// Even sizes from 64 channels in and out, odd ones from 128.
TEST(WinogradConvTest, Conv3x3TakesItForWideLayers) {
  if (!CpuHasAvx512()) GTEST_SKIP() << "no AVX-512 on this CPU";
  for (const Shape& s : {Shape{3, 64, 64, 28, 28}, Shape{2, 128, 128, 4, 4},
                         Shape{2, 64, 128, 14, 14}, Shape{3, 128, 128, 7, 7},
                         Shape{2, 256, 128, 7, 5}}) {
    torch::manual_seed(4);
    nn::Conv2d conv(
        nn::Conv2dOptions(s.in, s.out, 3).stride(1).padding(1).bias(false));
    conv->weight.set_data(
        conv->weight.contiguous(at::MemoryFormat::ChannelsLast));
    const at::Tensor x0 = RandomNhwc(s.n, s.in, s.h, s.w);
    const at::Tensor grad = RandomNhwc(s.n, s.out, s.h, s.w);
    EXPECT_TRUE(WinogradApplies(*conv, x0)) << Name(s);
    EXPECT_FALSE(DirectConvApplies(*conv, x0)) << Name(s);
    EXPECT_FALSE(DirectWeightGradApplies(*conv, x0)) << Name(s);
    const at::Tensor x = x0.clone().requires_grad_(true);
    const at::Tensor out = Conv3x3(*conv, x);
    out.backward(grad);
    const Exact exact = Float64(x0, conv->weight.detach(), grad);
    EXPECT_LT(RelativeError(out.detach(), exact.out), kTolerance) << Name(s);
    EXPECT_LT(RelativeError(x.grad(), exact.dx), kTolerance) << Name(s);
    EXPECT_LT(RelativeError(conv->weight.grad(), exact.dweight), kTolerance)
        << Name(s);
    // And not the same bits as oneDNN's: it did run.
    EXPECT_FALSE(at::equal(out.detach(), conv->forward(x0))) << Name(s);
  }
}

// Called directly with what the kernels cannot take: a clear error, no
// out-of-bounds reads.
TEST(WinogradConvTest, RejectsWhatItCannotTake) {
  if (!CpuHasAvx512()) GTEST_SKIP() << "no AVX-512 on this CPU";
  const at::Tensor w = at::randn({64, 64, 3, 3});
  const auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const c10::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] {
              WinogradForward(at::randn({2, 64, 4, 4}), w);
            }).find("channels_last"),
            std::string::npos);
  EXPECT_NE(message([&] {
              WinogradForward(RandomNhwc(2, 48, 4, 4), w);
            }).find("48 channels; the weights need 64"),
            std::string::npos);
  EXPECT_NE(
      message([&] {
        WinogradForward(RandomNhwc(2, 24, 4, 4), at::randn({64, 24, 3, 3}));
      }).find("multiple of 16"),
      std::string::npos);
  EXPECT_NE(
      message([&] {
        WinogradInputGrad(RandomNhwc(2, 72, 4, 4), at::randn({72, 64, 3, 3}));
      }).find("72"),
      std::string::npos);
  EXPECT_NE(message([&] {
              WinogradWeightGrad(RandomNhwc(2, 64, 4, 4),
                                 RandomNhwc(2, 64, 4, 6));
            }).find("differ in batch or size"),
            std::string::npos);
}

TEST(WinogradConvTest, NotForNarrowOddOrUnevenChannels) {
  const auto conv = [](int64_t in, int64_t out) {
    nn::Conv2d c(
        nn::Conv2dOptions(in, out, 3).stride(1).padding(1).bias(false));
    c->weight.set_data(c->weight.contiguous(at::MemoryFormat::ChannelsLast));
    return c;
  };
  // 32 channels (the direct kernel's), an odd size under 128 channels in
  // or out, 72 channels (not a multiple of 16), NCHW input, bfloat16.
  EXPECT_FALSE(WinogradApplies(*conv(32, 64), RandomNhwc(2, 32, 8, 8)));
  EXPECT_FALSE(WinogradApplies(*conv(64, 32), RandomNhwc(2, 64, 8, 8)));
  EXPECT_FALSE(WinogradApplies(*conv(64, 64), RandomNhwc(2, 64, 7, 8)));
  EXPECT_FALSE(WinogradApplies(*conv(128, 64), RandomNhwc(2, 128, 7, 7)));
  EXPECT_FALSE(WinogradApplies(*conv(64, 128), RandomNhwc(2, 64, 7, 7)));
  EXPECT_FALSE(WinogradApplies(*conv(72, 64), RandomNhwc(2, 72, 8, 8)));
  EXPECT_FALSE(WinogradApplies(*conv(64, 64), at::randn({2, 64, 8, 8})));
  EXPECT_FALSE(WinogradApplies(*conv(64, 64),
                               RandomNhwc(2, 64, 8, 8).to(at::kBFloat16)));
  EXPECT_EQ(WinogradApplies(*conv(64, 64), RandomNhwc(2, 64, 8, 8)),
            CpuHasAvx512());
}

}  // namespace
}  // namespace momentum::worker
