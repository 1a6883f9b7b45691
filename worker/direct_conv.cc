#include "worker/direct_conv.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <variant>
#include <vector>

#include "worker/conv_weights.h"
#include "worker/cpu_features.h"
#include "worker/winograd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOMENTUM_DIRECT_CONV 1
#define MOMENTUM_AVX512 __attribute__((target("avx512f,fma")))
#endif

namespace momentum::worker {
namespace {

#ifdef MOMENTUM_DIRECT_CONV

// Output pixels per block: 14 accumulators, a weight vector and a spare
// fill 16 of the 32 registers; a 28-pixel row is two blocks.
constexpr int kMaxBlock = 14;

// One block of B output pixels of one row (columns x0 .. x0+B-1) and all
// output channels, 16 at a time. x is one image [H][W][C], w is [3][3][C][OC],
// y points at the block's first output pixel. kLeft: the block holds column
// 0, whose left tap is padding; kRight: it holds column W-1.
template <int C, int B, bool kLeft, bool kRight>
MOMENTUM_AVX512 void Block(const float* __restrict__ x,
                           const float* __restrict__ w, float* __restrict__ y,
                           int64_t row, int64_t x0, int64_t H, int64_t W,
                           int64_t OC) {
  for (int64_t oc0 = 0; oc0 < OC; oc0 += 16) {
    __m512 acc[B];
#pragma GCC unroll 14
    for (int j = 0; j < B; ++j) acc[j] = _mm512_setzero_ps();
    for (int ky = 0; ky < 3; ++ky) {
      const int64_t iy = row + ky - 1;
      if (iy < 0 || iy >= H) continue;
      for (int kx = 0; kx < 3; ++kx) {
        const float* wt = w + (ky * 3 + kx) * C * OC + oc0;
        const float* xp = x + (iy * W + x0 + kx - 1) * C;
#pragma GCC unroll 4
        for (int ic = 0; ic < C; ++ic) {
          const __m512 wv = _mm512_loadu_ps(wt + ic * OC);
#pragma GCC unroll 14
          for (int j = 0; j < B; ++j) {
            if (kLeft && kx == 0 && j == 0) continue;
            if (kRight && kx == 2 && j == B - 1) continue;
            acc[j] =
                _mm512_fmadd_ps(_mm512_set1_ps(xp[j * C + ic]), wv, acc[j]);
          }
        }
      }
    }
#pragma GCC unroll 14
    for (int j = 0; j < B; ++j) _mm512_storeu_ps(y + j * OC + oc0, acc[j]);
  }
}

using BlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t,
                         int64_t, int64_t, int64_t);

template <int C, int B>
BlockFn PickEdges(bool left, bool right) {
  if (left) return right ? &Block<C, B, true, true> : &Block<C, B, true, false>;
  return right ? &Block<C, B, false, true> : &Block<C, B, false, false>;
}

template <int C>
BlockFn PickBlock(int b, bool left, bool right) {
  switch (b) {
    case 1:
      return PickEdges<C, 1>(left, right);
    case 2:
      return PickEdges<C, 2>(left, right);
    case 3:
      return PickEdges<C, 3>(left, right);
    case 4:
      return PickEdges<C, 4>(left, right);
    case 5:
      return PickEdges<C, 5>(left, right);
    case 6:
      return PickEdges<C, 6>(left, right);
    case 7:
      return PickEdges<C, 7>(left, right);
    case 8:
      return PickEdges<C, 8>(left, right);
    case 9:
      return PickEdges<C, 9>(left, right);
    case 10:
      return PickEdges<C, 10>(left, right);
    case 11:
      return PickEdges<C, 11>(left, right);
    case 12:
      return PickEdges<C, 12>(left, right);
    case 13:
      return PickEdges<C, 13>(left, right);
    default:
      return PickEdges<C, 14>(left, right);
  }
}

BlockFn Pick(int64_t channels, int b, bool left, bool right) {
  switch (channels) {
    case 1:
      return PickBlock<1>(b, left, right);
    case 3:
      return PickBlock<3>(b, left, right);
    case 16:
      return PickBlock<16>(b, left, right);
    case 32:
      return PickBlock<32>(b, left, right);
    case 64:
      return PickBlock<64>(b, left, right);
    default:
      TORCH_CHECK(false, "the direct convolution has no kernel for ", channels,
                  " input channels");
  }
}

// y = the convolution of x [N][H][W][C] with w [3][3][C][OC], stride 1,
// padding 1, into a new NHWC tensor [N, OC, H, W]. Rows are split over
// threads; a row's blocks are balanced (a 30-pixel row: 10, 10, 10).
at::Tensor Convolve(const at::Tensor& x, const at::Tensor& packed,
                    int64_t out_channels) {
  const int64_t n = x.size(0), channels = x.size(1), H = x.size(2),
                W = x.size(3);
  at::Tensor y =
      at::empty({n, out_channels, H, W},
                x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t blocks = (W + kMaxBlock - 1) / kMaxBlock;
  std::vector<BlockFn> fns(blocks);
  std::vector<int64_t> starts(blocks);
  int64_t x0 = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int size = static_cast<int>(W / blocks + (b < W % blocks ? 1 : 0));
    fns[b] = Pick(channels, size, x0 == 0, x0 + size == W);
    starts[b] = x0;
    x0 += size;
  }
  const float* xd = x.data_ptr<float>();
  const float* wd = packed.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, n * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t image = r / H, row = r % H;
      const float* xi = xd + image * H * W * channels;
      float* yr = yd + r * W * out_channels;
      for (int64_t b = 0; b < blocks; ++b) {
        fns[b](xi, wd, yr + starts[b] * out_channels, row, starts[b], H, W,
               out_channels);
      }
    }
  });
  return y;
}

// The weight gradient for one tap (ky, kx), input channels c0 .. c0+CB-1
// and output channels oc0 .. oc0+16*OCB-1, over `images` consecutive images:
// acc[ci][o] += x[y+ky-1][xx+kx-1][c0+ci] * g[y][xx][oc0+16*o..] over the
// output pixels whose input pixel is inside the image (padding skipped).
template <int CB, int OCB>
MOMENTUM_AVX512 void WeightTile(const float* __restrict__ x,
                                const float* __restrict__ g,
                                float* __restrict__ total, int64_t images,
                                int64_t H, int64_t W, int64_t C, int64_t OC,
                                int ky, int kx, int64_t c0, int64_t oc0) {
  __m512 acc[CB][OCB];
#pragma GCC unroll 16
  for (int ci = 0; ci < CB; ++ci) {
#pragma GCC unroll 4
    for (int o = 0; o < OCB; ++o) acc[ci][o] = _mm512_setzero_ps();
  }
  const int64_t y_lo = ky == 0 ? 1 : 0, y_hi = ky == 2 ? H - 1 : H;
  const int64_t x_lo = kx == 0 ? 1 : 0, x_hi = kx == 2 ? W - 1 : W;
  for (int64_t r = 0; r < images * H; ++r) {
    const int64_t y = r % H;
    if (y < y_lo || y >= y_hi) continue;
    const float* gp = g + (r * W + x_lo) * OC + oc0;
    const float* xp = x + ((r + ky - 1) * W + x_lo + kx - 1) * C + c0;
    for (int64_t xx = x_lo; xx < x_hi; ++xx, gp += OC, xp += C) {
      __m512 gv[OCB];
#pragma GCC unroll 4
      for (int o = 0; o < OCB; ++o) gv[o] = _mm512_loadu_ps(gp + 16 * o);
#pragma GCC unroll 16
      for (int ci = 0; ci < CB; ++ci) {
        const __m512 xv = _mm512_set1_ps(xp[ci]);
#pragma GCC unroll 4
        for (int o = 0; o < OCB; ++o) {
          acc[ci][o] = _mm512_fmadd_ps(xv, gv[o], acc[ci][o]);
        }
      }
    }
  }
  // These images' sums join the running total.
#pragma GCC unroll 16
  for (int ci = 0; ci < CB; ++ci) {
#pragma GCC unroll 4
    for (int o = 0; o < OCB; ++o) {
      float* t = total + ci * OC + 16 * o;
      _mm512_storeu_ps(t, _mm512_add_ps(_mm512_loadu_ps(t), acc[ci][o]));
    }
  }
}

using TileFn = void (*)(const float*, const float*, float*, int64_t, int64_t,
                        int64_t, int64_t, int64_t, int, int, int64_t, int64_t);

// The weight gradient [OC, C, 3, 3] (channels_last) of the stride-1,
// padding-1 3x3 convolution of x [N][H][W][C] whose output's gradient is g
// [N][H][W][OC]. Work items are (tap, input channel block, output channel
// block), split over threads; each sums groups of images in order, one
// group's pixels first, so the result is the same on any number of threads.
// A group is one image, or as many as make 128 pixels (small images: the
// registers' sums are flushed to memory once per group).
at::Tensor WeightGrad(const at::Tensor& x, const at::Tensor& g) {
  const int64_t n = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3),
                OC = g.size(1);
  // 16 sums in flight: 16 input channels x 16 output channels, 8 x 32 or
  // 4 x 64.
  const int64_t ocb = std::min<int64_t>(OC / 16, 4);
  const int64_t cb = 16 / ocb;
  const TileFn tile = ocb == 1   ? &WeightTile<16, 1>
                      : ocb == 2 ? &WeightTile<8, 2>
                                 : &WeightTile<4, 4>;
  const int64_t c_blocks = C / cb, oc_blocks = OC / (16 * ocb);
  // [ky][kx][C][OC], zeroed: the images' sums are added into it.
  at::Tensor total = at::zeros({3, 3, C, OC}, x.options());
  const float* xd = x.data_ptr<float>();
  const float* gd = g.data_ptr<float>();
  float* td = total.data_ptr<float>();
  const int64_t group = std::max<int64_t>(1, (128 + H * W - 1) / (H * W));
  at::parallel_for(
      0, 9 * c_blocks * oc_blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t image = 0; image < n; image += group) {
          const int64_t images = std::min(group, n - image);
          const float* xi = xd + image * H * W * C;
          const float* gi = gd + image * H * W * OC;
          for (int64_t item = begin; item < end; ++item) {
            const int64_t tap = item / (c_blocks * oc_blocks);
            const int64_t cblock = item / oc_blocks % c_blocks;
            const int64_t ocblock = item % oc_blocks;
            const int64_t c0 = cblock * cb, oc0 = ocblock * 16 * ocb;
            tile(xi, gi, td + (tap * C + c0) * OC + oc0, images, H, W, C, OC,
                 static_cast<int>(tap / 3), static_cast<int>(tap % 3), c0, oc0);
          }
        }
      });
  // [ky][kx][C][OC] -> [OC, C, ky, kx] in channels_last, the weights' own
  // layout.
  return WeightsFromTaps(total);
}

#else

at::Tensor Convolve(const at::Tensor&, const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "the direct convolution needs an x86-64 build");
}
at::Tensor WeightGrad(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "the direct convolution needs an x86-64 build");
}
#endif  // MOMENTUM_DIRECT_CONV

bool DirectChannels(int64_t c) { return c == 16 || c == 32 || c == 64; }

// The weight gradient's kernel: 16 to 128 channels in and out.
bool WeightGradChannels(int64_t c) { return DirectChannels(c) || c == 128; }

// A stem's input: one (grey) or three (RGB) channels, the data itself, with
// no gradient to compute (the kernel's outputs are 16 channels at a time).
bool StemChannels(int64_t c) { return c == 1 || c == 3; }

// ATen's gradients of the stride-1, padding-1 convolution, those in `mask`
// (input, weight, bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> AtenBackward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    std::array<bool, 3> mask) {
  return at::convolution_backward(
      grad, x, weight, std::nullopt, /*stride=*/{1, 1}, /*padding=*/{1, 1},
      /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0},
      /*groups=*/1, mask);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Which kernels a convolution takes: the direct kernels for all three
// passes; ATen's output and input gradient with the direct weight gradient
// (where oneDNN is faster); or Winograd's for all three.
enum class Path : int64_t { kDirect, kAtenData, kWinograd };

class DirectConvFunction
    : public torch::autograd::Function<DirectConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, int64_t path) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["path"] = path;
    switch (static_cast<Path>(path)) {
      case Path::kAtenData:
        return at::convolution(x, weight, std::nullopt, /*stride=*/{1, 1},
                               /*padding=*/{1, 1}, /*dilation=*/{1, 1},
                               /*transposed=*/false, /*output_padding=*/{0, 0},
                               /*groups=*/1);
      case Path::kWinograd:
        return WinogradForward(x, weight);
      case Path::kDirect:
        break;
    }
    // [OC, C, ky, kx] -> [ky][kx][C][OC]: a tap's weights for one input
    // channel are one row of output channels.
    return Convolve(x, TapsByInput(weight), weight.size(0));
  }

  static variable_list backward(AutogradContext* ctx,
                                variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const auto path = static_cast<Path>(ctx->saved_data["path"].toInt());
    const at::Tensor grad =
        grad_outputs[0].contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor grad_x, grad_weight;
    if (ctx->needs_input_grad(0)) {
      switch (path) {
        case Path::kAtenData:
          grad_x =
              std::get<0>(AtenBackward(grad, x, weight, {true, false, false}));
          break;
        case Path::kWinograd:
          grad_x = WinogradInputGrad(grad, weight);
          break;
        case Path::kDirect:
          // The input's gradient is the convolution of the output's
          // gradient with the weights turned 180 degrees, input and output
          // channels swapped: [ky][kx][OC][C] of w[oc][c][2-ky][2-kx].
          grad_x = Convolve(grad, TapsByOutputFlipped(weight), x.size(1));
          break;
      }
    }
    if (ctx->needs_input_grad(1) && path == Path::kWinograd) {
      grad_weight = WinogradWeightGrad(x, grad);
    } else if (ctx->needs_input_grad(1) && WeightGradChannels(x.size(1))) {
      grad_weight = WeightGrad(x, grad);
    } else if (ctx->needs_input_grad(1)) {
      // A stem's: 1 or 3 input channels, a small sum ATen does well.
      grad_weight =
          std::get<1>(AtenBackward(grad, x, weight, {false, true, false}));
    }
    return {grad_x, grad_weight, at::Tensor()};
  }
};

bool IsOneOne(const torch::ExpandingArray<2>& a, int64_t v) {
  return (*a)[0] == v && (*a)[1] == v;
}

// A 3x3 convolution of stride 1 and padding 1 without bias or groups, on a
// CPU with AVX-512, of NHWC float32 input (not under autocast, where ATen's
// convolution runs in bfloat16).
bool Eligible(const torch::nn::Conv2dImpl& conv, const at::Tensor& x) {
  const auto& o = conv.options;
  const auto* padding = std::get_if<torch::ExpandingArray<2>>(&o.padding());
  if (!IsOneOne(o.kernel_size(), 3) || !IsOneOne(o.stride(), 1) ||
      padding == nullptr || !IsOneOne(*padding, 1) ||
      !IsOneOne(o.dilation(), 1) || o.groups() != 1 || o.bias() ||
      !std::holds_alternative<torch::enumtype::kZeros>(o.padding_mode())) {
    return false;
  }
  const at::Tensor& w = conv.weight;
  if (!x.defined() || !x.device().is_cpu() || x.scalar_type() != at::kFloat ||
      x.dim() != 4 || x.numel() == 0 ||
      !x.is_contiguous(at::MemoryFormat::ChannelsLast) || !w.defined() ||
      !w.device().is_cpu() || w.scalar_type() != at::kFloat || w.dim() != 4 ||
      w.size(1) != x.size(1)) {
    return false;
  }
  return !at::autocast::is_autocast_enabled(at::kCPU) && CpuHasAvx512();
}

// Which of our kernels Conv3x3 runs for this module and input, or nullopt
// for ATen's convolution. kAtenData: only the weight gradient is ours (when
// the weights need one).
std::optional<Path> PickPath(const torch::nn::Conv2dImpl& conv,
                             const at::Tensor& x) {
  if (!Eligible(conv, x)) return std::nullopt;
  const int64_t channels = x.size(1), out = conv.weight.size(0);
  // Winograd: 64 channels or more in and out (where the GEMMs run near the
  // core's peak); at odd sizes, whose last tiles are half outside, 128 or
  // more (7x7, one core of an AMD EPYC, forward + both gradients, oneDNN ->
  // Winograd, ms: 128 channels 44.4 -> 38.5, 256 181.6 -> 164.9, 512 800.6
  // -> 595.9; 64 channels 11.2 -> 10.8, where the direct kernel is faster).
  const bool even = x.size(2) % 2 == 0 && x.size(3) % 2 == 0;
  if (channels >= 64 && channels % 16 == 0 && out >= 64 && out % 16 == 0 &&
      (even || (channels >= 128 && out >= 128))) {
    return Path::kWinograd;
  }
  // The direct kernel where it is the faster of the two on the cores
  // measured (AMD EPYC, AVX-512, one thread, ATen first, ms): 16 and 32
  // input channels at every size (16 at 28x28: 4.8 -> 4.0, 32 at 28x28:
  // 18.1 -> 17.0), 64 up to 14x14 (16.2 -> 15.6); at 64 and 28x28 oneDNN is
  // faster (64.7 -> 65.8).
  const bool faster = channels <= 32 || x.size(2) * x.size(3) <= 14 * 14;
  const bool in_ok = DirectChannels(channels) ||
                     (StemChannels(channels) && !x.requires_grad());
  if (in_ok && DirectChannels(out) && faster) return Path::kDirect;
  if (WeightGradChannels(channels) && WeightGradChannels(out)) {
    return Path::kAtenData;
  }
  return std::nullopt;
}

}  // namespace

bool WinogradApplies(const torch::nn::Conv2dImpl& conv, const at::Tensor& x) {
  return PickPath(conv, x) == Path::kWinograd;
}

bool DirectConvApplies(const torch::nn::Conv2dImpl& conv, const at::Tensor& x) {
  return PickPath(conv, x) == Path::kDirect;
}

bool DirectWeightGradApplies(const torch::nn::Conv2dImpl& conv,
                             const at::Tensor& x) {
  const std::optional<Path> path = PickPath(conv, x);
  return (path == Path::kDirect || path == Path::kAtenData) &&
         WeightGradChannels(x.size(1)) &&
         WeightGradChannels(conv.weight.size(0));
}

at::Tensor Conv3x3(torch::nn::Conv2dImpl& conv, const at::Tensor& x,
                   bool direct) {
  if (!direct) return conv.forward(x);
  const std::optional<Path> path = PickPath(conv, x);
  if (path == Path::kAtenData &&
      (!conv.weight.requires_grad() || !at::GradMode::is_enabled())) {
    return conv.forward(x);  // nothing of ours would run
  }
  if (path.has_value()) {
    return DirectConvFunction::apply(x, conv.weight,
                                     static_cast<int64_t>(*path));
  }
  return conv.forward(x);
}

}  // namespace momentum::worker
