// A 3x3 convolution of stride 1 and padding 1 (every 3x3 convolution of a
// ResNet's blocks but the first of a stage), computed directly on the CPU in
// NHWC float32 with AVX-512, for the narrow layers where oneDNN's kernels
// leave the most of the core unused: 16 and 32 input channels, and 64 up to
// 14x14 pixels; and a small-image stem's on one or three channels of data
// (no input gradient), where oneDNN's kernel for one channel writes NCHW
// blocks and reorders them (6.8 -> 0.34 ms for 128 28x28 images to 16
// channels).
//
// Each output pixel's 16 output channels are one AVX-512 register; a block
// of up to 14 pixels of one row keeps 14 of them while the 3x3 taps and the
// input channels go by, each input value broadcast from memory into the
// multiply-add. Padding costs nothing: taps that fall outside the image are
// skipped, as oneDNN skips them.
//
// The sums run in oneDNN's order (taps row by row, then input channels, one
// fused multiply-add each into the pixel's accumulator), so the outputs are
// equal bit for bit to at::conv2d's, on any number of threads (a pixel's sum
// never depends on how rows are split). The gradient of the input is the same
// kernel on the output's gradient with the weights turned 180 degrees and
// their channels swapped, again equal bit for bit to ATen's. The exceptions
// are a batch of one image, and one channel stored with channels_last
// strides (the loader's batches have NCHW strides), for which oneDNN picks
// kernels that sum in another order: there the two differ by rounding.
//
// The gradient of the weights has a kernel of its own, for 16 to 128
// channels in and out at any size (also where the output and the input's
// gradient stay oneDNN's, which is faster there: 128 channels, 64 at 28x28):
// per tap, 16 sums in registers (16 input x 16 output channels, 8 x 32 or
// 4 x 64) over one image's pixels (small images: as many as make 128
// pixels), padding skipped, then added to the total in image order, the same
// on any number of threads. oneDNN blocks
// its sums otherwise, so the two differ by rounding; against float64 ours
// was the closer (16 channels at 28x28: 4.7e-7 of the largest element,
// oneDNN 1.8e-6). A stem's weight gradient (1 or 3 input channels) is
// ATen's. direct_conv_test checks all of it: at::equal for the outputs and
// input gradients, float64 sums for all three, 1 to 3 threads, odd sizes
// and edges.
//
// Measured on one core (AMD EPYC, AVX-512, batch 128, in one process, ATen
// first): 16 channels at 28x28 forward 4.9 -> 4.0 ms, input gradient 4.7 ->
// 4.2 ms; 32 at 14x14 4.4 -> 3.9 ms; 64 at 7x7 3.7 -> 3.4 ms. Weight
// gradient (two runs): 16 at 28x28 4.4 -> 4.2-4.3 ms, 64 at 7x7 4.4 -> 3.5-
// 4.0, 128 at 4x4 6.4-7.7 -> 5.0-7.1, 128 at 7x7 17.7-19.0 -> 13.9-15.7, 64
// at 28x28 71.2-74.5 -> 65.3-68.1.
//
// Layers of 64 channels or more in and out at even sizes, and of 128 or
// more at odd sizes, take Winograd's F(2x2, 3x3) instead, for all three passes
// (winograd.h): 4/9 of the multiply-adds, which no direct kernel can match
// there.
//
// Elsewhere (a GPU, NCHW, bfloat16 or autocast, other strides, paddings,
// channel counts or sizes, groups, a bias, a CPU without AVX-512) it runs
// conv->forward(x), ATen's convolution.
//
// Usage, in a module's forward:
//   at::Tensor out = Conv3x3(*conv2_, x);
#ifndef MOMENTUM_WORKER_DIRECT_CONV_H_
#define MOMENTUM_WORKER_DIRECT_CONV_H_

#include <ATen/core/Tensor.h>
#include <torch/nn/modules/conv.h>

namespace momentum::worker {

// conv->forward(x), through the direct kernel where it applies. `direct`
// false runs ATen's convolution always (for side-by-side benchmarks).
at::Tensor Conv3x3(torch::nn::Conv2dImpl& conv, const at::Tensor& x,
                   bool direct = true);

// Whether Conv3x3 takes Winograd's F(2x2, 3x3) for this module and input
// (the output and both gradients; winograd.h): 64 channels or more in and
// out, multiples of 16, even sizes. It comes before the direct kernels.
bool WinogradApplies(const torch::nn::Conv2dImpl& conv, const at::Tensor& x);

// Whether Conv3x3 takes the direct kernel for this module and input (the
// output and both gradients).
bool DirectConvApplies(const torch::nn::Conv2dImpl& conv, const at::Tensor& x);

// Whether Conv3x3 takes the direct kernel's weight gradient for this module
// and input (true wherever DirectConvApplies is, but for a stem; also for
// 128 channels and for 64 at larger sizes where Winograd's does not apply,
// whose output and input gradient stay ATen's).
bool DirectWeightGradApplies(const torch::nn::Conv2dImpl& conv,
                             const at::Tensor& x);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_DIRECT_CONV_H_
