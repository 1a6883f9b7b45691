// The 3x3 convolution of stride 1 and padding 1 by Winograd's minimal
// filtering, F(2x2, 3x3), on the CPU in NHWC float32 with AVX-512: each 2x2
// block of output pixels (a tile) is computed from its 4x4 input patch with
// 16 multiplications per input and output channel pair where the direct sum
// takes 36, so the multiply-adds, which are the work of these layers, fall
// to 4/9.
//
//   V = B^T d B        the input patch d, 4x4 per channel (additions only)
//   U = G w G^T        the weights w, 3x3 -> 4x4 per channel pair
//   M[p] = V[p] U[p]   for each of the 16 positions p: a GEMM over channels,
//                      [tiles x C] x [C x K] (gemm.h)
//   y = A^T M A        the 2x2 output tile (additions only)
//
// Tiles go in chunks of 128 (more for wide layers), transformed into buffers
// that stay in cache. The gradient of the input is the same convolution of
// the output's gradient with the weights turned 180 degrees and their
// channels swapped; the gradient of the weights is G^T (sum over tiles of
// V[p]^T (A dy A^T)[p]) G, the transpose of each step.
//
// The results differ from oneDNN's direct sums by rounding, and are the
// closer of the two to float64 (a third of oneDNN's largest error or less,
// relative to the largest element: 64 channels at 28x28, forward 3.9e-7
// against 1.2e-6, input gradient 3.7e-7 against 1.2e-6, weight gradient
// 6.3e-7 against 1.8e-6; 512 at 4x4, forward 5.0e-7 against 2.8e-6;
// measured with MKL's GEMMs, whose products at 64 and 128 channels equal
// gemm.h's bit for bit, and at 256 and 512 differ by 1e-6 of the largest).
// F(2x2, 3x3) only: the larger tiles, F(4x4, 3x3), save more multiplications
// but their transforms carry constants from 5 down to 1/24, which round worse
// (not tried here).
//
// x and the output's gradient: [N, C, H, W], channels_last (NHWC), float32;
// weight [K, C, 3, 3]; C and K multiples of 16. Odd sizes work (the last
// tile row and column hang over the edge and are partly thrown away) but
// waste up to a quarter of the work: direct_conv.cc takes this path for 64
// or more channels in and out at even sizes, and 128 or more at odd ones,
// where it is the fastest. One core of an AMD EPYC (AVX-512), batch 128, in
// one process, forward, input gradient, weight gradient, ms, oneDNN ->
// ours: 64 channels at 28x28 64 -> 47, 63 -> 43, 80 -> 45; 128 at 14x14
// 60 -> 38, 60 -> 37, 67 -> 40; 256 at 7x7 56 -> 49, 56 -> 48, 60 -> 53;
// 512 at 4x4 65 -> 54, 66 -> 51, 96 -> 57; 512 at 7x7 240 -> 197, 245 ->
// 193, 315 -> 206. At 7x7 with 64 channels it is no faster (11.2 -> 10.8
// ms for the three, where the direct kernel takes 3.4 for the forward).
#ifndef MOMENTUM_WORKER_WINOGRAD_H_
#define MOMENTUM_WORKER_WINOGRAD_H_

#include <ATen/core/Tensor.h>

namespace momentum::worker {

// The convolution of x [N, C, H, W] with weight [K, C, 3, 3]: [N, K, H, W],
// channels_last.
at::Tensor WinogradForward(const at::Tensor& x, const at::Tensor& weight);

// The gradient of the input [N, C, H, W] from that of the output grad
// [N, K, H, W].
at::Tensor WinogradInputGrad(const at::Tensor& grad, const at::Tensor& weight);

// The gradient of the weights [K, C, 3, 3] (channels_last) from the input x
// and the output's gradient grad.
at::Tensor WinogradWeightGrad(const at::Tensor& x, const at::Tensor& grad);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_WINOGRAD_H_
