// The layouts the CPU convolution kernels (direct_conv.h, winograd.h) want
// a 3x3 convolution's weights in, and back. The weights are [K, C, 3, 3]
// (K output, C input channels), stored channels_last like the activations
// ([K][3][3][C] in memory); the kernels want one tap's weights as rows of
// output channels ([3][3][C][K]), which is a transpose of C and K for each
// of the nine taps.
//
// ATen's permute(...).contiguous() does these copies element by element
// with the source's large strides innermost: 512 x 512 channels took 5.4 ms
// to [3][3][C][K] and 11.8 ms back (one core of an AMD EPYC), some 70 ms of
// a width-64 ResNet-18's training step at batch 128. Here they go in 16 x 16
// blocks that stay in cache. Pure copies: the results equal ATen's bit for
// bit (conv_weights_test).
//
// Usage:
//   at::Tensor taps = TapsByInput(weight);            // [3][3][C][K]
//   at::Tensor back = WeightsFromTaps(taps_gradient);  // [K, C, 3, 3]
#ifndef MOMENTUM_WORKER_CONV_WEIGHTS_H_
#define MOMENTUM_WORKER_CONV_WEIGHTS_H_

#include <ATen/core/Tensor.h>

namespace momentum::worker {

// [3][3][C][K] contiguous: out[ky][kx][c][k] = weight[k][c][ky][kx], as
// weight.permute({2, 3, 1, 0}).contiguous(). `weight` [K, C, 3, 3], any
// strides and dtype.
at::Tensor TapsByInput(const at::Tensor& weight);

// [3][3][K][C] contiguous of the weights turned 180 degrees:
// out[ky][kx][k][c] = weight[k][c][2 - ky][2 - kx], as
// weight.flip({2, 3}).permute({2, 3, 0, 1}).contiguous(). These are the
// taps of the convolution that gives the input's gradient (K in, C out).
at::Tensor TapsByOutputFlipped(const at::Tensor& weight);

// The inverse of TapsByInput: [K, C, 3, 3] channels_last from taps
// [3, 3, C, K] (contiguous), as
// taps.permute({3, 2, 0, 1}).contiguous(at::MemoryFormat::ChannelsLast).
at::Tensor WeightsFromTaps(const at::Tensor& taps);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_CONV_WEIGHTS_H_
