// BatchNorm in training mode, then an optional residual add, then a ReLU,
//   y = relu(batch_norm(x) + residual)
// as one autograd node: every BatchNorm of a ResNet but the downsample's.
//
// On the CPU in channels_last, float32 or bfloat16 (what autocast gives
// BatchNorm; its parameters and statistics stay float32), the forward makes
// one pass over the output where ATen makes three (normalize, add, ReLU),
// and the backward reads the ReLU's mask inside BatchNorm's two passes
// instead of writing the masked gradient first. The ops are memory-bound
// there: each of those passes costs as much as it reads and writes.
//
// The results are equal bit for bit to at::batch_norm, add_ and relu_ and
// their own backward, on any number of threads: the same partial sums in the
// same order over the same at::parallel_for chunks, the same roundings
// (fused_batch_norm_test checks every output, gradient and running
// statistic with at::equal, in both types, on 1, 2 and 3 threads).
// Elsewhere (a GPU, NCHW, other types, evaluation mode, a module without
// running statistics) it runs exactly those ATen ops.
//
// Usage, in a module's forward:
//   at::Tensor out = BatchNormAddReLU(*bn1_, conv1_(x));
//   out = BatchNormAddReLU(*bn2_, conv2_(out), /*residual=*/identity);
#ifndef MOMENTUM_WORKER_FUSED_BATCH_NORM_H_
#define MOMENTUM_WORKER_FUSED_BATCH_NORM_H_

#include <ATen/core/Tensor.h>
#include <torch/nn/modules/batchnorm.h>

namespace momentum::worker {

// `residual` may be undefined (no add). Updates bn's running statistics and
// num_batches_tracked exactly as bn->forward(x) would. `fuse` false runs
// the ATen ops always (for side-by-side benchmarks).
at::Tensor BatchNormAddReLU(torch::nn::BatchNorm2dImpl& bn, const at::Tensor& x,
                            const at::Tensor& residual = at::Tensor(),
                            bool fuse = true);

// Whether BatchNormAddReLU takes the fused path for these inputs.
bool FusedBatchNormApplies(const torch::nn::BatchNorm2dImpl& bn,
                           const at::Tensor& x, const at::Tensor& residual);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_FUSED_BATCH_NORM_H_
