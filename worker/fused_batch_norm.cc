// Built with -ffp-contract=off: every fused multiply-add below is an explicit
// std::fma, placed where ATen's own (contracted) build has one, so that the
// results equal ATen's bit for bit. Where ATen fuses and where it does not
// was found by comparing candidate roundings with its results; the test
// holds the answer.
#include "worker/fused_batch_norm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <vector>

namespace momentum::worker {
namespace {

// The row loops (a row is one pixel's C channels) in AVX-512 and AVX2
// versions beside the baseline one, picked once when the library loads.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOMENTUM_ROW_KERNEL \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOMENTUM_ROW_KERNEL
#endif

// Pointers into distinct tensors, which the loops below may read and write
// as vectors.
#define R __restrict__

// Elements are float, or bfloat16 under autocast: read as float, written
// rounded to nearest even (ATen's conversions).
inline float Widen(float v) { return v; }
inline float Widen(c10::BFloat16 v) { return static_cast<float>(v); }
template <typename T>
inline T Narrow(float v) {
  return T(v);
}
// The float a bfloat16 store and load leave of v (v itself for float).
template <typename T>
inline float Rounded(float v) {
  return Widen(Narrow<T>(v));
}

// The row loops take the channel count at compile time (kC: 16 to 128, the
// ResNets' widths) or at run time (kC 0). With it known the sums stay in
// registers across rows instead of going through memory each row (the demo
// model's step: 16 channels, one row a vector), in the same order.
template <int kC>
inline int64_t Channels(int64_t channels) {
  return kC > 0 ? kC : channels;
}

// Where the reductions keep their per-channel sums: registers (a local array
// of kC) for a compile-time channel count, else the caller's array itself.
template <int kC>
struct Sums {
  explicit Sums(float* R out, int64_t) : out_(out) {
    for (int c = 0; c < kC; ++c) v_[c] = out[c];
  }
  ~Sums() {
    for (int c = 0; c < kC; ++c) out_[c] = v_[c];
  }
  float& operator[](int64_t c) { return v_[c]; }
  float* R out_;
  float v_[kC];
};
template <>
struct Sums<0> {
  explicit Sums(float* R out, int64_t) : v_(out) {}
  float& operator[](int64_t c) { return v_[c]; }
  float* R v_;
};

// s[c] += x[i][c] for rows i in [begin, end).
template <typename T, int kC>
inline __attribute__((always_inline)) void SumRowsT(const T* R x, int64_t begin,
                                                    int64_t end,
                                                    int64_t channels_in,
                                                    float* R out) {
  const int64_t channels = Channels<kC>(channels_in);
  Sums<kC> s(out, channels);
  for (int64_t i = begin; i < end; ++i) {
    const T* R row = x + i * channels;
    for (int64_t c = 0; c < channels; ++c) s[c] += Widen(row[c]);
  }
}

// s[c] += (x[i][c] - mean[c])², one rounding for the multiply-add.
template <typename T, int kC>
inline __attribute__((always_inline)) void SquaredDeviationRowsT(
    const T* R x, int64_t begin, int64_t end, int64_t channels_in,
    const float* R mean, float* R out) {
  const int64_t channels = Channels<kC>(channels_in);
  Sums<kC> s(out, channels);
  for (int64_t i = begin; i < end; ++i) {
    const T* R row = x + i * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const float d = Widen(row[c]) - mean[c];
      s[c] = std::fma(d, d, s[c]);
    }
  }
}

// y = max(x·alpha + beta (+ residual), 0), rounded to T after each op as
// ATen's batch_norm, add_ and relu_ store it, and keeping -0 and NaN as
// clamp_min does. `residual` may be null.
template <typename T, int kC>
inline __attribute__((always_inline)) void NormalizeRowsT(
    const T* R x, const T* R residual, int64_t begin, int64_t end,
    int64_t channels_in, const float* R alpha, const float* R beta, T* R y) {
  const int64_t channels = Channels<kC>(channels_in);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t o = i * channels;
    if (residual != nullptr) {
      for (int64_t c = 0; c < channels; ++c) {
        const float v =
            Rounded<T>(std::fma(Widen(x[o + c]), alpha[c], beta[c])) +
            Widen(residual[o + c]);
        y[o + c] = Narrow<T>(v < 0.0f ? 0.0f : v);
      }
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        const float v = std::fma(Widen(x[o + c]), alpha[c], beta[c]);
        y[o + c] = Narrow<T>(v < 0.0f ? 0.0f : v);
      }
    }
  }
}

// The ReLU's gradient (threshold_backward: 0 where y <= 0), g'.
template <typename T>
inline float Masked(T g, T y) {
  return Widen(y) <= 0.0f ? 0.0f : Widen(g);
}

// BatchNorm's two sums of g': sum[c] += g', dotp[c] += (x - mean)·g'.
// With `masked` given, g' is also written there (the residual's gradient).
template <typename T, int kC>
inline __attribute__((always_inline)) void BackwardSumRowsT(
    const T* R g, const T* R y, const T* R x, int64_t begin, int64_t end,
    int64_t channels_in, const float* R mean, T* R masked, float* R sum_out,
    float* R dotp_out) {
  const int64_t channels = Channels<kC>(channels_in);
  Sums<kC> sum(sum_out, channels), dotp(dotp_out, channels);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t o = i * channels;
    if (masked != nullptr) {
      for (int64_t c = 0; c < channels; ++c) {
        const float gm = Masked(g[o + c], y[o + c]);
        masked[o + c] = Narrow<T>(gm);
        sum[c] += gm;
        dotp[c] = std::fma(Widen(x[o + c]) - mean[c], gm, dotp[c]);
      }
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        const float gm = Masked(g[o + c], y[o + c]);
        sum[c] += gm;
        dotp[c] = std::fma(Widen(x[o + c]) - mean[c], gm, dotp[c]);
      }
    }
  }
}

// (g' - grad_mean) - (x - mean)·k: one rounding for the multiply-add in
// ATen's float kernel, two in its bfloat16 one (found by experiment).
template <typename T>
inline float Centered(float g, float grad_mean, float xm, float k) {
  if constexpr (std::is_same_v<T, float>) {
    return std::fma(-xm, k, g - grad_mean);
  } else {
    return (g - grad_mean) - xm * k;
  }
}

// dx = ((g' - grad_mean) - (x - mean)·k) · invstd · w, g' read from
// `masked` or made again from g and y.
template <typename T, int kC>
inline __attribute__((always_inline)) void GradInputRowsT(
    const T* R g, const T* R y, const T* R masked, const T* R x, int64_t begin,
    int64_t end, int64_t channels_in, const float* R mean, const float* R k,
    const float* R grad_mean, const float* R invstd, const float* R w,
    T* R dx) {
  const int64_t channels = Channels<kC>(channels_in);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t o = i * channels;
    if (masked != nullptr) {
      for (int64_t c = 0; c < channels; ++c) {
        const float t = Centered<T>(Widen(masked[o + c]), grad_mean[c],
                                    Widen(x[o + c]) - mean[c], k[c]);
        dx[o + c] = Narrow<T>((t * invstd[c]) * w[c]);
      }
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        const float t = Centered<T>(Masked(g[o + c], y[o + c]), grad_mean[c],
                                    Widen(x[o + c]) - mean[c], k[c]);
        dx[o + c] = Narrow<T>((t * invstd[c]) * w[c]);
      }
    }
  }
}

// kernel<T, C>(args) for the channel counts compiled in, else kernel<T, 0>.
#define MOMENTUM_BY_CHANNELS(kernel, T, channels, ...) \
  switch (channels) {                                  \
    case 16:                                           \
      return kernel<T, 16>(__VA_ARGS__);               \
    case 32:                                           \
      return kernel<T, 32>(__VA_ARGS__);               \
    case 64:                                           \
      return kernel<T, 64>(__VA_ARGS__);               \
    case 128:                                          \
      return kernel<T, 128>(__VA_ARGS__);              \
    default:                                           \
      return kernel<T, 0>(__VA_ARGS__);                \
  }

// One multiversioned function per loop and element type.
#define MOMENTUM_ROW_KERNELS(T, suffix)                                        \
  MOMENTUM_ROW_KERNEL void SumRows##suffix(                                    \
      const T* x, int64_t begin, int64_t end, int64_t channels,                \
      float* s){MOMENTUM_BY_CHANNELS(SumRowsT, T, channels, x, begin, end,     \
                                     channels, s)} MOMENTUM_ROW_KERNEL void    \
      SquaredDeviationRows##suffix(const T* x, int64_t begin, int64_t end,     \
                                   int64_t channels, const float* mean,        \
                                   float* s){MOMENTUM_BY_CHANNELS(             \
          SquaredDeviationRowsT, T, channels, x, begin, end, channels, mean,   \
          s)} MOMENTUM_ROW_KERNEL void                                         \
          NormalizeRows##suffix(const T* x, const T* residual, int64_t begin,  \
                                int64_t end, int64_t channels,                 \
                                const float* alpha, const float* beta,         \
                                T* y){MOMENTUM_BY_CHANNELS(                    \
              NormalizeRowsT, T, channels, x, residual, begin, end, channels,  \
              alpha, beta, y)} MOMENTUM_ROW_KERNEL void                        \
              BackwardSumRows##suffix(                                         \
                  const T* g, const T* y, const T* x, int64_t begin,           \
                  int64_t end, int64_t channels, const float* mean, T* masked, \
                  float* sum, float* dotp){MOMENTUM_BY_CHANNELS(               \
                  BackwardSumRowsT, T, channels, g, y, x, begin, end,          \
                  channels, mean, masked, sum, dotp)} MOMENTUM_ROW_KERNEL void \
                  GradInputRows##suffix(                                       \
                      const T* g, const T* y, const T* masked, const T* x,     \
                      int64_t begin, int64_t end, int64_t channels,            \
                      const float* mean, const float* k,                       \
                      const float* grad_mean, const float* invstd,             \
                      const float* w, T* dx) {                                 \
    MOMENTUM_BY_CHANNELS(GradInputRowsT, T, channels, g, y, masked, x, begin,  \
                         end, channels, mean, k, grad_mean, invstd, w, dx)     \
  }

MOMENTUM_ROW_KERNELS(float, )
MOMENTUM_ROW_KERNELS(c10::BFloat16, )
#undef MOMENTUM_ROW_KERNELS
#undef MOMENTUM_BY_CHANNELS
#undef R

// ATen sums the per-thread partial sums in double for float tensors and in
// float for bfloat16 ones (at::acc_type and at::opmath_type).
template <typename T>
using ThreadSum = std::conditional_t<std::is_same_v<T, float>, double, float>;

// Per-thread partial sums over the rows [0, rows), then their sum per
// channel, in thread order: ATen's channels-last reduction.
// `body(begin, end, partial)` adds rows [begin, end) into partial[0..width).
template <typename T, typename Body>
std::vector<ThreadSum<T>> ReduceRows(int64_t rows, int64_t width,
                                     const Body& body) {
  const int threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * width, 0.0f);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "thread ", tid, " of ", threads);
    body(begin, end, partial.data() + static_cast<size_t>(tid) * width);
  });
  std::vector<ThreadSum<T>> total(width, 0);
  for (int64_t c = 0; c < width; ++c) {
    for (int t = 0; t < threads; ++t) total[c] += partial[t * width + c];
  }
  return total;
}

template <typename T>
T* Data(const at::Tensor& t) {
  return t.data_ptr<T>();
}
float* Data(const at::Tensor& t) { return t.data_ptr<float>(); }

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename T>
at::Tensor Forward(AutogradContext* ctx, const at::Tensor& x,
                   const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& residual,
                   const at::Tensor& running_mean,
                   const at::Tensor& running_var, double momentum, double eps) {
  const int64_t channels = x.size(1);
  const int64_t rows = x.numel() / channels;
  const T* in = Data<T>(x);

  // The statistics (batch_norm_cpu_update_stats_template): the mean from
  // float partial sums, the squared deviations from the float mean, the
  // biased variance for invstd and the unbiased one for running_var.
  const std::vector<ThreadSum<T>> sum = ReduceRows<T>(
      rows, channels, [&](int64_t begin, int64_t end, float* partial) {
        SumRows(in, begin, end, channels, partial);
      });
  at::Tensor mean = at::empty({channels}, weight.options());
  float* mean_data = Data(mean);
  for (int64_t c = 0; c < channels; ++c) {
    mean_data[c] = static_cast<float>(sum[c] / rows);
  }
  const std::vector<ThreadSum<T>> var_sums = ReduceRows<T>(
      rows, channels, [&](int64_t begin, int64_t end, float* partial) {
        SquaredDeviationRows(in, begin, end, channels, mean_data, partial);
      });
  at::Tensor invstd = at::empty({channels}, weight.options());
  float* invstd_data = Data(invstd);
  float* rm = Data(running_mean);
  float* rv = Data(running_var);
  const float* w = Data(weight);
  const float* b = Data(bias);
  std::vector<float> alpha(channels), beta(channels);
  const float m = static_cast<float>(momentum);
  const float keep = static_cast<float>(1.0 - momentum);
  for (int64_t c = 0; c < channels; ++c) {
    const float var_sum = static_cast<float>(var_sums[c]);
    const double var = var_sum / static_cast<float>(rows);
    invstd_data[c] = (var != 0.0 || eps != 0.0)
                         ? static_cast<float>(1.0 / std::sqrt(var + eps))
                         : 0.0f;
    // The running averages in float, rounded as ATen's update rounds them
    // (found by experiment: for float tensors the variance's first product
    // is fused, for bfloat16 ones not).
    rm[c] = m * mean_data[c] + keep * rm[c];
    const float unbiased = var_sum / static_cast<float>(rows - 1);
    rv[c] = std::is_same_v<T, float> ? std::fma(m, unbiased, keep * rv[c])
                                     : m * unbiased + keep * rv[c];
    // batch_norm_cpu_collect_linear_and_constant_terms.
    alpha[c] = invstd_data[c] * w[c];
    beta[c] = std::fma(-mean_data[c], alpha[c], b[c]);
  }

  at::Tensor y = at::empty_like(x);
  const T* add = residual.has_value() ? Data<T>(*residual) : nullptr;
  T* out = Data<T>(y);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    NormalizeRows(in, add, begin, end, channels, alpha.data(), beta.data(),
                  out);
  });

  ctx->saved_data["residual"] = residual.has_value();
  ctx->save_for_backward({x, y, weight, mean, invstd});
  return y;
}

template <typename T>
variable_list Backward(AutogradContext* ctx, const at::Tensor& grad) {
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor& x = saved[0];
  const at::Tensor& y = saved[1];
  const at::Tensor& weight = saved[2];
  const float* mean = Data(saved[3]);
  const float* invstd = Data(saved[4]);
  const bool has_residual = ctx->saved_data["residual"].toBool();
  // The next convolution's gradient is channels_last already; the global
  // average pool's is an expanded view.
  const at::Tensor g =
      grad.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);

  const int64_t channels = x.size(1);
  const int64_t rows = x.numel() / channels;
  at::Tensor masked;
  if (has_residual) masked = at::empty_like(x);
  T* masked_data = has_residual ? Data<T>(masked) : nullptr;

  // batch_norm_cpu_backward_channels_last_impl, on the ReLU's gradient.
  const int threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(2) * threads * channels, 0.0f);
  float* sum_partial = partial.data();
  float* dotp_partial = sum_partial + static_cast<size_t>(threads) * channels;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "thread ", tid, " of ", threads);
    BackwardSumRows(Data<T>(g), Data<T>(y), Data<T>(x), begin, end, channels,
                    mean, masked_data, sum_partial + tid * channels,
                    dotp_partial + tid * channels);
  });
  at::Tensor grad_weight = at::empty({channels}, weight.options());
  at::Tensor grad_bias = at::empty({channels}, weight.options());
  float* gw = Data(grad_weight);
  float* gb = Data(grad_bias);
  const float* w = Data(weight);
  const float n = static_cast<float>(rows);
  std::vector<float> k(channels), grad_mean(channels);
  for (int64_t c = 0; c < channels; ++c) {
    ThreadSum<T> s = 0, d = 0;
    for (int t = 0; t < threads; ++t) s += sum_partial[t * channels + c];
    for (int t = 0; t < threads; ++t) d += dotp_partial[t * channels + c];
    const float sum = static_cast<float>(s);
    const float dotp = static_cast<float>(d);
    k[c] = dotp * invstd[c] * invstd[c] / n;
    grad_mean[c] = sum / n;
    gw[c] = dotp * invstd[c];
    gb[c] = sum;
  }

  at::Tensor dx = at::empty_like(x);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    GradInputRows(Data<T>(g), Data<T>(y), masked_data, Data<T>(x), begin, end,
                  channels, mean, k.data(), grad_mean.data(), invstd, w,
                  Data<T>(dx));
  });
  // One gradient per argument of forward().
  return {dx,           grad_weight,  grad_bias,    masked,
          at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
}

class BatchNormAddReLUFunction
    : public torch::autograd::Function<BatchNormAddReLUFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const std::optional<at::Tensor>& residual,
                            at::Tensor running_mean, at::Tensor running_var,
                            double momentum, double eps) {
    if (x.scalar_type() == at::kBFloat16) {
      return Forward<c10::BFloat16>(ctx, x, weight, bias, residual,
                                    running_mean, running_var, momentum, eps);
    }
    return Forward<float>(ctx, x, weight, bias, residual, running_mean,
                          running_var, momentum, eps);
  }

  static variable_list backward(AutogradContext* ctx,
                                variable_list grad_outputs) {
    if (ctx->get_saved_variables()[0].scalar_type() == at::kBFloat16) {
      return Backward<c10::BFloat16>(ctx, grad_outputs[0]);
    }
    return Backward<float>(ctx, grad_outputs[0]);
  }
};

bool IsPlainFloatVector(const at::Tensor& t, int64_t size) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat &&
         t.dim() == 1 && t.size(0) == size && t.is_contiguous();
}

}  // namespace

bool FusedBatchNormApplies(const torch::nn::BatchNorm2dImpl& bn,
                           const at::Tensor& x, const at::Tensor& residual) {
  if (!bn.is_training() || !bn.options.track_running_stats() ||
      !bn.options.affine() || !bn.options.momentum().has_value()) {
    return false;
  }
  if (!x.defined() || !x.device().is_cpu() ||
      (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16) ||
      x.dim() != 4) {
    return false;
  }
  const int64_t channels = x.size(1);
  // Channels-last and not also contiguous, which ATen would take the other
  // way; more rows than threads (ATen's per-thread reduction).
  if (channels < 2 || x.size(2) * x.size(3) < 2 ||
      !x.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      x.numel() / channels <= at::get_num_threads()) {
    return false;
  }
  for (const at::Tensor* t :
       {&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var}) {
    if (!IsPlainFloatVector(*t, channels)) return false;
  }
  if (residual.defined() &&
      (!residual.device().is_cpu() ||
       residual.scalar_type() != x.scalar_type() ||
       residual.sizes() != x.sizes() ||
       !residual.is_contiguous(at::MemoryFormat::ChannelsLast))) {
    return false;
  }
  return true;
}

at::Tensor BatchNormAddReLU(torch::nn::BatchNorm2dImpl& bn, const at::Tensor& x,
                            const at::Tensor& residual, bool fuse) {
  if (!fuse || !FusedBatchNormApplies(bn, x, residual)) {
    at::Tensor out = bn.forward(x);
    if (residual.defined()) out.add_(residual);
    return out.relu_();
  }
  // What BatchNormImplBase::forward does before batch_norm.
  if (bn.num_batches_tracked.defined()) bn.num_batches_tracked += 1;
  std::optional<at::Tensor> add;
  if (residual.defined()) add = residual;
  return BatchNormAddReLUFunction::apply(
      x, bn.weight, bn.bias, add, bn.running_mean, bn.running_var,
      *bn.options.momentum(), bn.options.eps());
}

}  // namespace momentum::worker
