#include "worker/direct_conv.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <tuple>
#include <vector>

#include "tests/worker/conv_test_util.h"

namespace momentum::worker {
namespace {

namespace nn = torch::nn;

using conv_testing::CpuHasAvx512;
using conv_testing::RandomNhwc;
using conv_testing::RelativeError;

struct Shape {
  int64_t n, in, out, h, w;
  // oneDNN sums these in its usual order (taps row by row, then input
  // channels). For a batch of one image it takes other kernels, which sum in
  // another order: of 252 shapes tried (1 to 32 images of 1 to 28 pixels
  // square, 16 to 64 channels in and out) the 57 that differed were all of
  // one image (57 of its 63). There the two agree to rounding, and each
  // with the float64 sums.
  bool onednn_order = true;
  // One or three input channels: a small-image stem on the data, whose
  // input has no gradient.
  bool Stem() const { return in < 16; }
};

std::string Name(const Shape& s) {
  return conv_testing::ShapeName(s.n, s.in, s.out, s.h, s.w);
}

nn::Conv2d MakeConv(int64_t in, int64_t out) {
  torch::manual_seed(3);
  nn::Conv2d conv(
      nn::Conv2dOptions(in, out, 3).stride(1).padding(1).bias(false));
  conv->weight.set_data(
      conv->weight.contiguous(at::MemoryFormat::ChannelsLast));
  return conv;
}

struct Result {
  at::Tensor out, dx, dweight;
};

// The weight gradient summed in float64.
at::Tensor WeightGrad64(const at::Tensor& x, const at::Tensor& grad,
                        const at::Tensor& weight) {
  return std::get<1>(at::convolution_backward(
      grad.to(at::kDouble), x.to(at::kDouble), weight.to(at::kDouble),
      std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1,
      {false, true, false}));
}

// The direct weight gradient sums each image's pixels, then the images in
// order, where oneDNN sums in other blocks: the two differ by rounding.
// Measured against float64, ours was the closer (16 channels at 28x28:
// 4.7e-7 of the largest element against oneDNN's 1.8e-6).
constexpr double kWeightGradTolerance = 1e-5;

// The convolution forward and backward from the same weights and input,
// through Conv3x3 (direct) or the module's own forward (ATen).
Result RunOnce(bool direct, const Shape& s, const at::Tensor& x0,
               const at::Tensor& grad) {
  nn::Conv2d conv = MakeConv(s.in, s.out);
  at::Tensor x = x0.clone().requires_grad_(!s.Stem());
  at::Tensor out = direct ? Conv3x3(*conv, x) : conv->forward(x);
  out.backward(grad);
  return {out.detach(), s.Stem() ? at::zeros({0}) : x.grad(),
          conv->weight.grad()};
}

using DirectConvTest = conv_testing::ThreadsAndShape<Shape>;

TEST_P(DirectConvTest, EqualsAtenAndFloat64) {
  const Shape s = shape();
  torch::manual_seed(11);
  const at::Tensor x = RandomNhwc(s.n, s.in, s.h, s.w);
  const at::Tensor grad = RandomNhwc(s.n, s.out, s.h, s.w);
  nn::Conv2d probe = MakeConv(s.in, s.out);
  EXPECT_EQ(DirectConvApplies(*probe, x), CpuHasAvx512()) << Name(s);
  if (s.Stem()) {
    // The kernel makes no input gradient of fewer than 16 channels.
    EXPECT_FALSE(DirectConvApplies(*probe, x.clone().requires_grad_(true)))
        << Name(s);
  }

  const Result direct = RunOnce(true, s, x, grad);
  const Result aten = RunOnce(false, s, x, grad);
  EXPECT_TRUE(direct.out.is_contiguous(at::MemoryFormat::ChannelsLast));
  if (s.onednn_order) {
    EXPECT_TRUE(at::equal(direct.out, aten.out))
        << Name(s) << " output, max diff "
        << (direct.out - aten.out).abs().max().item<float>();
    EXPECT_TRUE(at::equal(direct.dx, aten.dx))
        << Name(s) << " input gradient, max diff "
        << (direct.dx - aten.dx).abs().max().item<float>();
  } else {
    EXPECT_TRUE(at::allclose(direct.out, aten.out, 1e-6, 1e-6)) << Name(s);
    EXPECT_TRUE(at::allclose(direct.dx, aten.dx, 1e-6, 1e-6)) << Name(s);
  }
  if (s.Stem()) {
    // A stem's weight gradient is ATen's own.
    EXPECT_TRUE(at::equal(direct.dweight, aten.dweight))
        << Name(s) << " weight gradient";
  } else {
    const at::Tensor exact =
        WeightGrad64(x, grad, MakeConv(s.in, s.out)->weight.detach());
    EXPECT_LT(RelativeError(direct.dweight, exact), kWeightGradTolerance)
        << Name(s);
    EXPECT_LT(RelativeError(aten.dweight, exact), kWeightGradTolerance)
        << Name(s);
    EXPECT_TRUE(direct.dweight.is_contiguous(at::MemoryFormat::ChannelsLast));
  }

  // Both against the convolution's definition, summed in float64.
  const at::Tensor w = MakeConv(s.in, s.out)->weight.detach().to(at::kDouble);
  const at::Tensor x64 = x.to(at::kDouble);
  at::Tensor expected = at::zeros({s.n, s.out, s.h, s.w}, at::kDouble);
  const at::Tensor padded = at::constant_pad_nd(x64, {1, 1, 1, 1});
  for (int64_t ky = 0; ky < 3; ++ky) {
    for (int64_t kx = 0; kx < 3; ++kx) {
      const at::Tensor window =
          padded.narrow(2, ky, s.h).narrow(3, kx, s.w);  // [N, C, H, W]
      expected +=
          at::einsum("nchw,oc->nohw", {window, w.select(3, kx).select(2, ky)});
    }
  }
  EXPECT_TRUE(at::allclose(direct.out.to(at::kDouble), expected, 1e-5, 1e-4))
      << Name(s);
}

// No gradient for the input (the first layer of a frozen stem), and none at
// all (the key encoder).
TEST_P(DirectConvTest, WeightGradientAloneAndNoGrad) {
  const Shape s = shape();
  torch::manual_seed(12);
  const at::Tensor x = RandomNhwc(s.n, s.in, s.h, s.w);
  const at::Tensor grad = RandomNhwc(s.n, s.out, s.h, s.w);
  nn::Conv2d a = MakeConv(s.in, s.out), b = MakeConv(s.in, s.out);
  Conv3x3(*a, x).backward(grad);
  b->forward(x).backward(grad);
  if (s.Stem()) {
    EXPECT_TRUE(at::equal(a->weight.grad(), b->weight.grad())) << Name(s);
  } else {
    EXPECT_LT(RelativeError(a->weight.grad(),
                            WeightGrad64(x, grad, b->weight.detach())),
              kWeightGradTolerance)
        << Name(s);
  }
  at::NoGradGuard no_grad;
  const at::Tensor out = Conv3x3(*a, x);
  EXPECT_FALSE(out.requires_grad());
  EXPECT_TRUE(s.onednn_order ? at::equal(out, b->forward(x))
                             : at::allclose(out, b->forward(x), 1e-6, 1e-6))
      << Name(s);
}

// One channel stored with channels_last strides (as clone(ChannelsLast)
// makes it; the loader's batches have NCHW strides, which are NHWC too for
// one channel): ATen takes another oneDNN kernel, which sums the taps column
// by column; ours sums them row by row as for the loader's layout. The two
// agree to rounding.
TEST(DirectConvStemTest, OneChannelWithChannelsLastStrides) {
  torch::manual_seed(13);
  const at::Tensor x =
      at::randn({4, 1, 28, 28}).clone(at::MemoryFormat::ChannelsLast);
  ASSERT_EQ(x.stride(1), 1);
  nn::Conv2d conv = MakeConv(1, 16);
  EXPECT_EQ(DirectConvApplies(*conv, x), CpuHasAvx512());
  at::NoGradGuard no_grad;
  const at::Tensor direct = Conv3x3(*conv, x), aten = conv->forward(x);
  EXPECT_TRUE(direct.is_contiguous(at::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(at::allclose(direct, aten, 1e-6, 1e-6))
      << (direct - aten).abs().max().item<float>();
  EXPECT_TRUE(at::equal(direct, Conv3x3(*conv, x.contiguous())));
}

INSTANTIATE_TEST_SUITE_P(
    ThreadsAndShapes, DirectConvTest,
    ::testing::Combine(
        ::testing::Values(1, 2, 3),
        ::testing::Values(
            // The demo model's stride-1 convolutions (width 16, 28 px).
            Shape{8, 16, 16, 28, 28}, Shape{6, 32, 32, 14, 14},
            Shape{5, 64, 64, 7, 7},
            // Channels in and out differ; rows of one and of 1..3 blocks
            // (30 = 10+10+10, 29 = 10+10+9, 15 = 8+7); 1x1 images.
            Shape{3, 16, 32, 5, 9}, Shape{2, 64, 16, 3, 29},
            Shape{2, 32, 64, 15, 30}, Shape{3, 16, 16, 1, 1},
            Shape{2, 16, 16, 2, 1},
            // A row of 29 blocks (400 = 23 x 14 + 6 x 13).
            Shape{2, 16, 16, 2, 400},
            // Small-image stems on grey and RGB data.
            Shape{8, 1, 16, 28, 28}, Shape{4, 3, 16, 28, 28},
            Shape{3, 1, 64, 9, 30}, Shape{2, 3, 32, 5, 15},
            // One image.
            Shape{1, 32, 16, 1, 15, /*onednn_order=*/false},
            Shape{1, 16, 16, 28, 28, /*onednn_order=*/false})));

// 128 channels, and 64 at 28x28, where oneDNN's output and input gradient
// are the faster: those stay ATen's (bit for bit), the weight gradient is
// the direct kernel's. On 1 and 2 threads, with padding on every side.
TEST(DirectWeightGradTest, AtenDataDirectWeights) {
  const int threads = at::get_num_threads();
  for (const int t : {1, 2}) {
    at::set_num_threads(t);
    // Odd sizes under 128 channels in or out: even ones of 64 channels or
    // more, and odd ones of 128 or more, take Winograd's.
    for (const Shape& s : {Shape{4, 128, 64, 5, 5}, Shape{2, 64, 64, 27, 28},
                           Shape{3, 64, 128, 5, 7}, Shape{2, 128, 16, 3, 2}}) {
      torch::manual_seed(14);
      const at::Tensor x = RandomNhwc(s.n, s.in, s.h, s.w);
      const at::Tensor grad = RandomNhwc(s.n, s.out, s.h, s.w);
      nn::Conv2d probe = MakeConv(s.in, s.out);
      EXPECT_FALSE(DirectConvApplies(*probe, x)) << Name(s);
      EXPECT_EQ(DirectWeightGradApplies(*probe, x), CpuHasAvx512()) << Name(s);
      const Result direct = RunOnce(true, s, x, grad);
      const Result aten = RunOnce(false, s, x, grad);
      EXPECT_TRUE(at::equal(direct.out, aten.out)) << Name(s);
      EXPECT_TRUE(at::equal(direct.dx, aten.dx)) << Name(s);
      EXPECT_LT(RelativeError(direct.dweight,
                              WeightGrad64(x, grad, probe->weight.detach())),
                kWeightGradTolerance)
          << Name(s);
    }
  }
  at::set_num_threads(threads);
}

TEST(DirectConvFallbackTest, OtherConvolutionsRunAten) {
  torch::manual_seed(5);
  const at::Tensor x =
      at::randn({2, 16, 6, 6}).contiguous(at::MemoryFormat::ChannelsLast);
  auto options = [] {
    return nn::Conv2dOptions(16, 16, 3).stride(1).padding(1).bias(false);
  };
  const std::vector<std::pair<std::string, nn::Conv2dOptions>> others = {
      {"stride 2", options().stride(2)},
      {"kernel 1", nn::Conv2dOptions(16, 16, 1).bias(false)},
      {"padding 0", options().padding(0)},
      {"dilation 2", options().dilation(2).padding(2)},
      {"groups 2", options().groups(2)},
      {"bias", options().bias(true)},
      {"reflect padding", options().padding_mode(torch::kReflect)},
      {"8 output channels", nn::Conv2dOptions(16, 8, 3).padding(1).bias(false)},
      {"256 output channels",
       nn::Conv2dOptions(16, 256, 3).padding(1).bias(false)},
  };
  for (const auto& [what, o] : others) {
    nn::Conv2d conv(o);
    EXPECT_FALSE(DirectConvApplies(*conv, x)) << what;
    EXPECT_FALSE(DirectWeightGradApplies(*conv, x)) << what;
    EXPECT_TRUE(at::equal(Conv3x3(*conv, x), conv->forward(x))) << what;
  }
  nn::Conv2d conv(options());
  const std::vector<std::pair<std::string, at::Tensor>> inputs = {
      {"NCHW", x.contiguous()},
      {"bfloat16", x.to(at::kBFloat16)},
      {"float64", x.to(at::kDouble)},
      {"8 input channels", at::randn({2, 8, 6, 6})},
  };
  for (const auto& [what, input] : inputs) {
    EXPECT_FALSE(DirectConvApplies(*conv, input)) << what;
    EXPECT_FALSE(DirectWeightGradApplies(*conv, input)) << what;
  }
  EXPECT_TRUE(at::equal(Conv3x3(*conv, x.contiguous()), conv->forward(x)));
  // 64 channels at 28x28, where oneDNN is the faster.
  nn::Conv2d wide(nn::Conv2dOptions(64, 64, 3).padding(1).bias(false));
  EXPECT_FALSE(DirectConvApplies(
      *wide,
      at::randn({2, 64, 28, 28}).contiguous(at::MemoryFormat::ChannelsLast)));
  EXPECT_TRUE(at::equal(Conv3x3(*conv, x, /*direct=*/false), conv->forward(x)));
  {
    // Autocast wants this convolution in bfloat16: ATen's, autocast's dtype.
    const bool was = at::autocast::is_autocast_enabled(at::kCPU);
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    EXPECT_FALSE(DirectConvApplies(*conv, x));
    EXPECT_FALSE(DirectWeightGradApplies(*conv, x));
    const at::Tensor out = Conv3x3(*conv, x);
    at::autocast::set_autocast_enabled(at::kCPU, was);
    at::autocast::clear_cache();
    EXPECT_EQ(out.scalar_type(), at::kBFloat16);
  }
}

}  // namespace
}  // namespace momentum::worker
