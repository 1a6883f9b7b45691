// ResNet encoders with torchvision's structure and parameter names
// (conv1, bn1, layer1.0.conv1, ..., layer2.0.downsample.0, fc), a base width
// (torchvision's is 64), any number of input channels, an optional
// small-image stem (3x3 stride-1 conv1, no max-pool) for 28-32 px inputs, and
// the MoCo v2 projection head (fc.0 Linear, fc.1 ReLU, fc.2 Linear).
//
// Usage:
//   ResNetOptions o; o.arch = "resnet18"; o.width = 16; o.small_stem = true;
//   ResNet net(o);
//   at::Tensor z = net->forward(images);     // [N, out_dim]
//   at::Tensor f = net->features(images);    // [N, 8*width*expansion]
#ifndef MOMENTUM_WORKER_RESNET_H_
#define MOMENTUM_WORKER_RESNET_H_

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <string>
#include <vector>

#include "common/job_spec.h"

namespace momentum::worker {

struct ResNetOptions {
  std::string arch = "resnet18";  // resnet18 | resnet50
  int64_t width = 64;
  int64_t in_channels = 3;
  bool small_stem = false;
  int64_t out_dim = 128;  // output of fc
  bool mlp = false;       // fc = Linear-ReLU-Linear (MoCo v2)
  // BatchNorm, residual add and ReLU as one node (fused_batch_norm.h), equal
  // bit for bit to the three ATen ops; false runs the ATen ops, for
  // side-by-side benchmarks.
  bool fuse_batch_norm = true;
  // The blocks' 3x3 convolutions of stride 1, and the small stem's, through
  // direct_conv.h where it applies (CPU, NHWC float32, 16 to 64 channels, or
  // 1 or 3 channels of data): outputs and input gradients equal bit for bit
  // to ATen's, weight gradients to rounding (16 to 128 channels); false runs
  // ATen's, for side-by-side benchmarks.
  bool direct_conv = true;
  // Activations in NHWC (channels_last) from the stem on. Moco sets it and
  // makes the weights and inputs channels_last too (moco.cc). The stem's
  // convolution alone does not keep the layout for a 1-channel input, whose
  // NCHW and NHWC are the same memory: its output would come out NCHW and
  // the stem's BatchNorm and layer1's first block would run NCHW.
  bool channels_last = false;
};

ResNetOptions ResNetOptionsFromSpec(const ModelSpec& model,
                                    const MocoSpec& moco);

class ResNetImpl : public torch::nn::Module {
 public:
  explicit ResNetImpl(const ResNetOptions& options);

  // Backbone output after global average pooling, [N, feature_dim()].
  at::Tensor features(const at::Tensor& x);
  // features followed by the head fc, [N, out_dim].
  at::Tensor forward(const at::Tensor& x);

  int64_t feature_dim() const { return feature_dim_; }
  const ResNetOptions& options() const { return options_; }

  // Parameters and buffers of the backbone only (everything but fc.*), with
  // torchvision's names.
  std::vector<std::pair<std::string, at::Tensor>> BackboneState() const;

 private:
  ResNetOptions options_;
  int64_t feature_dim_ = 0;
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr};
  torch::nn::Sequential layer1_{nullptr}, layer2_{nullptr}, layer3_{nullptr},
      layer4_{nullptr};
  torch::nn::Sequential fc_mlp_{nullptr};
  torch::nn::Linear fc_{nullptr};
};
TORCH_MODULE(ResNet);

// Every parameter and buffer of `module` by its dotted name, parameters and
// buffers interleaved as named_parameters()+named_buffers() of PyTorch's
// state_dict() would list them (order is not relied on).
std::vector<std::pair<std::string, at::Tensor>> StateOf(
    const torch::nn::Module& module);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_RESNET_H_
