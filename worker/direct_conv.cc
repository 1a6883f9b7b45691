#include "worker/direct_conv.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>

#include <variant>
#include <vector>

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
    default:
      return PickBlock<64>(b, left, right);
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

bool CpuHasAvx512() {
  static const bool has =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return has;
}

#else

at::Tensor Convolve(const at::Tensor&, const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "the direct convolution needs an x86-64 build");
}
bool CpuHasAvx512() { return false; }

#endif  // MOMENTUM_DIRECT_CONV

bool DirectChannels(int64_t c) { return c == 16 || c == 32 || c == 64; }

// A stem's input: one (grey) or three (RGB) channels, the data itself, with
// no gradient to compute (the kernel's outputs are 16 channels at a time).
bool StemChannels(int64_t c) { return c == 1 || c == 3; }

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DirectConvFunction
    : public torch::autograd::Function<DirectConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight) {
    ctx->save_for_backward({x, weight});
    // [OC, C, ky, kx] -> [ky][kx][C][OC]: a tap's weights for one input
    // channel are one row of output channels.
    return Convolve(x, weight.permute({2, 3, 1, 0}).contiguous(),
                    weight.size(0));
  }

  static variable_list backward(AutogradContext* ctx,
                                variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor grad =
        grad_outputs[0].contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor grad_x, grad_weight;
    if (ctx->needs_input_grad(0)) {
      // The input's gradient is the convolution of the output's gradient
      // with the weights turned 180 degrees, input and output channels
      // swapped: [ky][kx][OC][C] of w[oc][c][2-ky][2-kx].
      grad_x =
          Convolve(grad, weight.flip({2, 3}).permute({2, 3, 0, 1}).contiguous(),
                   x.size(1));
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight = std::get<1>(at::convolution_backward(
          grad, x, weight, std::nullopt, /*stride=*/{1, 1}, /*padding=*/{1, 1},
          /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0},
          /*groups=*/1, {false, true, false}));
    }
    return {grad_x, grad_weight};
  }
};

bool IsOneOne(const torch::ExpandingArray<2>& a, int64_t v) {
  return (*a)[0] == v && (*a)[1] == v;
}

}  // namespace

bool DirectConvApplies(const torch::nn::Conv2dImpl& conv, const at::Tensor& x) {
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
  // Under autocast ATen's convolution runs in bfloat16.
  if (at::autocast::is_autocast_enabled(at::kCPU)) return false;
  // Where it is the faster of the two on the cores measured (AMD EPYC,
  // AVX-512, one thread, ATen first, ms): 16 and 32 input channels at every
  // size (16 at 28x28: 4.8 -> 4.0, 32 at 28x28: 18.1 -> 17.0), 64 up to
  // 14x14 (16.2 -> 15.6); at 64 and 28x28 oneDNN is faster (64.7 -> 65.8).
  const int64_t channels = x.size(1);
  const bool faster = channels <= 32 || x.size(2) * x.size(3) <= 14 * 14;
  const bool in_ok = DirectChannels(channels) ||
                     (StemChannels(channels) && !x.requires_grad());
  return in_ok && DirectChannels(w.size(0)) && faster && CpuHasAvx512();
}

at::Tensor Conv3x3(torch::nn::Conv2dImpl& conv, const at::Tensor& x,
                   bool direct) {
  if (!direct || !DirectConvApplies(conv, x)) return conv.forward(x);
  return DirectConvFunction::apply(x, conv.weight);
}

}  // namespace momentum::worker
