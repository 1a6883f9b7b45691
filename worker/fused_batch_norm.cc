// Built with -ffp-contract=off: every fused multiply-add below is an explicit
// std::fma, placed where ATen's own (contracted) build has one, so that the
// results equal ATen's bit for bit.
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

// s[c] += x[i][c] for rows i in [begin, end).
MOMENTUM_ROW_KERNEL void SumRows(const float* R x, int64_t begin, int64_t end,
                                 int64_t channels, float* R s) {
  for (int64_t i = begin; i < end; ++i) {
    const float* R row = x + i * channels;
    for (int64_t c = 0; c < channels; ++c) s[c] += row[c];
  }
}

// s[c] += (x[i][c] - mean[c])², one rounding for the multiply-add.
MOMENTUM_ROW_KERNEL void SquaredDeviationRows(const float* R x, int64_t begin,
                                              int64_t end, int64_t channels,
                                              const float* R mean, float* R s) {
  for (int64_t i = begin; i < end; ++i) {
    const float* R row = x + i * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const float d = row[c] - mean[c];
      s[c] = std::fma(d, d, s[c]);
    }
  }
}

// y = max(x·alpha + beta (+ residual), 0), keeping -0 and NaN as ATen's
// clamp_min does. `residual` may be null.
MOMENTUM_ROW_KERNEL void NormalizeRows(const float* R x,
                                       const float* R residual, int64_t begin,
                                       int64_t end, int64_t channels,
                                       const float* R alpha,
                                       const float* R beta, float* R y) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t o = i * channels;
    if (residual != nullptr) {
      for (int64_t c = 0; c < channels; ++c) {
        const float v = std::fma(x[o + c], alpha[c], beta[c]) + residual[o + c];
        y[o + c] = v < 0.0f ? 0.0f : v;
      }
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        const float v = std::fma(x[o + c], alpha[c], beta[c]);
        y[o + c] = v < 0.0f ? 0.0f : v;
      }
    }
  }
}

// The ReLU's gradient (threshold_backward: 0 where y <= 0), g'.
inline float Masked(float g, float y) { return y <= 0.0f ? 0.0f : g; }

// BatchNorm's two sums of g': sum[c] += g', dotp[c] += (x - mean)·g'.
// With `masked` given, g' is also written there (the residual's gradient).
MOMENTUM_ROW_KERNEL void BackwardSumRows(const float* R g, const float* R y,
                                         const float* R x, int64_t begin,
                                         int64_t end, int64_t channels,
                                         const float* R mean, float* R masked,
                                         float* R sum, float* R dotp) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t o = i * channels;
    if (masked != nullptr) {
      for (int64_t c = 0; c < channels; ++c) {
        const float gm = Masked(g[o + c], y[o + c]);
        masked[o + c] = gm;
        sum[c] += gm;
        dotp[c] = std::fma(x[o + c] - mean[c], gm, dotp[c]);
      }
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        const float gm = Masked(g[o + c], y[o + c]);
        sum[c] += gm;
        dotp[c] = std::fma(x[o + c] - mean[c], gm, dotp[c]);
      }
    }
  }
}

// dx = ((g' - grad_mean) - (x - mean)·k) · invstd · w, g' read from
// `masked` or made again from g and y.
MOMENTUM_ROW_KERNEL void GradInputRows(
    const float* R g, const float* R y, const float* R masked, const float* R x,
    int64_t begin, int64_t end, int64_t channels, const float* R mean,
    const float* R k, const float* R grad_mean, const float* R invstd,
    const float* R w, float* R dx) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t o = i * channels;
    if (masked != nullptr) {
      for (int64_t c = 0; c < channels; ++c) {
        const float t =
            std::fma(-(x[o + c] - mean[c]), k[c], masked[o + c] - grad_mean[c]);
        dx[o + c] = (t * invstd[c]) * w[c];
      }
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        const float t = std::fma(-(x[o + c] - mean[c]), k[c],
                                 Masked(g[o + c], y[o + c]) - grad_mean[c]);
        dx[o + c] = (t * invstd[c]) * w[c];
      }
    }
  }
}

#undef R

// Per-thread partial sums over the rows [0, rows), then their sum per
// channel in double, in thread order: ATen's channels-last reduction.
// `body(begin, end, partial)` adds rows [begin, end) into partial[0..width).
template <typename Body>
std::vector<double> ReduceRows(int64_t rows, int64_t width, const Body& body) {
  const int threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * width, 0.0f);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "thread ", tid, " of ", threads);
    body(begin, end, partial.data() + static_cast<size_t>(tid) * width);
  });
  std::vector<double> total(width, 0.0);
  for (int64_t c = 0; c < width; ++c) {
    for (int t = 0; t < threads; ++t) total[c] += partial[t * width + c];
  }
  return total;
}

float* Data(const at::Tensor& t) { return t.data_ptr<float>(); }

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class BatchNormAddReLUFunction
    : public torch::autograd::Function<BatchNormAddReLUFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const std::optional<at::Tensor>& residual,
                            at::Tensor running_mean, at::Tensor running_var,
                            double momentum, double eps) {
    const int64_t channels = x.size(1);
    const int64_t rows = x.numel() / channels;
    const float* in = Data(x);

    // The statistics (batch_norm_cpu_update_stats_template): the mean in
    // float partial sums, the squared deviations from the float mean, the
    // biased variance for invstd and the unbiased one for running_var.
    std::vector<double> sum = ReduceRows(
        rows, channels, [&](int64_t begin, int64_t end, float* partial) {
          SumRows(in, begin, end, channels, partial);
        });
    at::Tensor mean = at::empty({channels}, x.options());
    float* mean_data = Data(mean);
    for (int64_t c = 0; c < channels; ++c) {
      mean_data[c] = static_cast<float>(sum[c] / rows);
    }
    std::vector<double> var_sum_d = ReduceRows(
        rows, channels, [&](int64_t begin, int64_t end, float* partial) {
          SquaredDeviationRows(in, begin, end, channels, mean_data, partial);
        });
    at::Tensor invstd = at::empty({channels}, x.options());
    float* invstd_data = Data(invstd);
    float* rm = Data(running_mean);
    float* rv = Data(running_var);
    const float* w = Data(weight);
    const float* b = Data(bias);
    std::vector<float> alpha(channels), beta(channels);
    const float m = static_cast<float>(momentum);
    const float keep = static_cast<float>(1.0 - momentum);
    for (int64_t c = 0; c < channels; ++c) {
      const float var_sum = static_cast<float>(var_sum_d[c]);
      const double var = var_sum / static_cast<float>(rows);
      invstd_data[c] = (var != 0.0 || eps != 0.0)
                           ? static_cast<float>(1.0 / std::sqrt(var + eps))
                           : 0.0f;
      // The running averages in float, rounded as ATen's update rounds them
      // (found by experiment: the variance's first product is fused).
      rm[c] = m * mean_data[c] + keep * rm[c];
      const float unbiased = var_sum / static_cast<float>(rows - 1);
      rv[c] = std::fma(m, unbiased, keep * rv[c]);
      // batch_norm_cpu_collect_linear_and_constant_terms.
      alpha[c] = invstd_data[c] * w[c];
      beta[c] = std::fma(-mean_data[c], alpha[c], b[c]);
    }

    at::Tensor y = at::empty_like(x);
    const float* add = residual.has_value() ? Data(*residual) : nullptr;
    float* out = Data(y);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      NormalizeRows(in, add, begin, end, channels, alpha.data(), beta.data(),
                    out);
    });

    ctx->saved_data["residual"] = residual.has_value();
    ctx->save_for_backward({x, y, weight, mean, invstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx,
                                variable_list grad_outputs) {
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
        grad_outputs[0].contiguous(at::MemoryFormat::ChannelsLast);

    const int64_t channels = x.size(1);
    const int64_t rows = x.numel() / channels;
    at::Tensor masked;
    if (has_residual) masked = at::empty_like(x);
    float* masked_data = has_residual ? Data(masked) : nullptr;

    // batch_norm_cpu_backward_channels_last_impl, on the ReLU's gradient.
    const int threads = at::get_num_threads();
    std::vector<float> partial(static_cast<size_t>(2) * threads * channels,
                               0.0f);
    float* sum_partial = partial.data();
    float* dotp_partial = sum_partial + static_cast<size_t>(threads) * channels;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      const int tid = at::get_thread_num();
      TORCH_CHECK(tid < threads, "thread ", tid, " of ", threads);
      BackwardSumRows(Data(g), Data(y), Data(x), begin, end, channels, mean,
                      masked_data, sum_partial + tid * channels,
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
      double s = 0.0, d = 0.0;
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
      GradInputRows(Data(g), Data(y), masked_data, Data(x), begin, end,
                    channels, mean, k.data(), grad_mean.data(), invstd, w,
                    Data(dx));
    });
    // One gradient per argument of forward().
    return {dx,           grad_weight,  grad_bias,    masked,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
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
  if (!x.defined() || !x.device().is_cpu() || x.scalar_type() != at::kFloat ||
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
      (!residual.device().is_cpu() || residual.scalar_type() != at::kFloat ||
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
