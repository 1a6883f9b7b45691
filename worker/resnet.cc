#include "worker/resnet.h"

#include <torch/nn/functional/pooling.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/activation.h>

#include <stdexcept>

#include "worker/direct_conv.h"
#include "worker/fused_batch_norm.h"

namespace momentum::worker {
namespace {

namespace nn = torch::nn;

nn::Conv2d Conv(int64_t in, int64_t out, int64_t kernel, int64_t stride,
                int64_t padding) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, kernel)
                        .stride(stride)
                        .padding(padding)
                        .bias(false));
}

// torchvision's BasicBlock (expansion 1) and Bottleneck (expansion 4, the
// stride on the 3x3 conv as in torchvision v1.5).
class BlockImpl : public nn::Module {
 public:
  BlockImpl(bool bottleneck, int64_t in, int64_t planes, int64_t stride,
            bool fuse, bool direct)
      : bottleneck_(bottleneck), fuse_(fuse), direct_(direct) {
    const int64_t expansion = bottleneck ? 4 : 1;
    if (bottleneck) {
      conv1_ = register_module("conv1", Conv(in, planes, 1, 1, 0));
      bn1_ = register_module("bn1", nn::BatchNorm2d(planes));
      conv2_ = register_module("conv2", Conv(planes, planes, 3, stride, 1));
      bn2_ = register_module("bn2", nn::BatchNorm2d(planes));
      conv3_ = register_module("conv3", Conv(planes, planes * 4, 1, 1, 0));
      bn3_ = register_module("bn3", nn::BatchNorm2d(planes * 4));
    } else {
      conv1_ = register_module("conv1", Conv(in, planes, 3, stride, 1));
      bn1_ = register_module("bn1", nn::BatchNorm2d(planes));
      conv2_ = register_module("conv2", Conv(planes, planes, 3, 1, 1));
      bn2_ = register_module("bn2", nn::BatchNorm2d(planes));
    }
    if (stride != 1 || in != planes * expansion) {
      downsample_ = register_module(
          "downsample",
          nn::Sequential(Conv(in, planes * expansion, 1, stride, 0),
                         nn::BatchNorm2d(planes * expansion)));
    }
  }

  at::Tensor forward(const at::Tensor& x) {
    at::Tensor out =
        BatchNormAddReLU(*bn1_, Conv3x3(*conv1_, x, direct_), {}, fuse_);
    const at::Tensor identity = downsample_ ? downsample_->forward(x) : x;
    if (bottleneck_) {
      out = BatchNormAddReLU(*bn2_, Conv3x3(*conv2_, out, direct_), {}, fuse_);
      return BatchNormAddReLU(*bn3_, conv3_(out), identity, fuse_);
    }
    return BatchNormAddReLU(*bn2_, Conv3x3(*conv2_, out, direct_), identity,
                            fuse_);
  }

 private:
  bool bottleneck_;
  bool fuse_;
  bool direct_;
  nn::Conv2d conv1_{nullptr}, conv2_{nullptr}, conv3_{nullptr};
  nn::BatchNorm2d bn1_{nullptr}, bn2_{nullptr}, bn3_{nullptr};
  nn::Sequential downsample_{nullptr};
};
TORCH_MODULE(Block);

void CollectState(const nn::Module& module, const std::string& prefix,
                  std::vector<std::pair<std::string, at::Tensor>>* out) {
  for (const auto& p : module.named_parameters(/*recurse=*/false)) {
    out->emplace_back(prefix + p.key(), p.value());
  }
  for (const auto& b : module.named_buffers(/*recurse=*/false)) {
    out->emplace_back(prefix + b.key(), b.value());
  }
  for (const auto& child : module.named_children()) {
    CollectState(*child.value(), prefix + child.key() + ".", out);
  }
}

}  // namespace

ResNetOptions ResNetOptionsFromSpec(const ModelSpec& model,
                                    const MocoSpec& moco) {
  ResNetOptions o;
  o.arch = model.arch;
  o.width = model.width;
  o.in_channels = model.in_channels;
  o.small_stem = model.small_stem;
  o.out_dim = moco.dim;
  o.mlp = moco.mlp;
  return o;
}

ResNetImpl::ResNetImpl(const ResNetOptions& options) : options_(options) {
  bool bottleneck;
  std::vector<int64_t> blocks;
  if (options.arch == "resnet18") {
    bottleneck = false;
    blocks = {2, 2, 2, 2};
  } else if (options.arch == "resnet50") {
    bottleneck = true;
    blocks = {3, 4, 6, 3};
  } else {
    throw std::invalid_argument("unknown arch " + options.arch);
  }
  const int64_t w = options.width;
  const int64_t expansion = bottleneck ? 4 : 1;
  conv1_ = register_module(
      "conv1", options.small_stem ? Conv(options.in_channels, w, 3, 1, 1)
                                  : Conv(options.in_channels, w, 7, 2, 3));
  bn1_ = register_module("bn1", nn::BatchNorm2d(w));
  int64_t in = w;
  auto make_layer = [&](int64_t planes, int64_t count, int64_t stride) {
    nn::Sequential layer;
    for (int64_t i = 0; i < count; ++i) {
      layer->push_back(Block(bottleneck, in, planes, i == 0 ? stride : 1,
                             options.fuse_batch_norm, options.direct_conv));
      in = planes * expansion;
    }
    return layer;
  };
  layer1_ = register_module("layer1", make_layer(w, blocks[0], 1));
  layer2_ = register_module("layer2", make_layer(2 * w, blocks[1], 2));
  layer3_ = register_module("layer3", make_layer(4 * w, blocks[2], 2));
  layer4_ = register_module("layer4", make_layer(8 * w, blocks[3], 2));
  feature_dim_ = in;
  if (options.mlp) {
    fc_mlp_ =
        register_module("fc", nn::Sequential(nn::Linear(in, in), nn::ReLU(),
                                             nn::Linear(in, options.out_dim)));
  } else {
    fc_ = register_module("fc", nn::Linear(in, options.out_dim));
  }
  // torchvision's initialisation: Kaiming normal (fan_out, ReLU) for convs,
  // BatchNorm weight 1 and bias 0; Linear keeps PyTorch's default.
  for (auto& m : modules(/*include_self=*/false)) {
    if (auto* conv = m->as<nn::Conv2d>()) {
      nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut,
                                torch::kReLU);
    } else if (auto* bn = m->as<nn::BatchNorm2d>()) {
      nn::init::ones_(bn->weight);
      nn::init::zeros_(bn->bias);
    }
  }
}

at::Tensor ResNetImpl::features(const at::Tensor& x) {
  // The small stem (3x3, stride 1) on one or three channels of data takes
  // the direct kernel too: for one channel oneDNN writes NCHW blocks that
  // are then reordered (128 Fashion-MNIST images, one AMD EPYC core, to 16
  // channels with the reorder to NHWC: 6.8 -> 0.34 ms; to 64: 35.5 -> 2.4).
  at::Tensor h = Conv3x3(*conv1_, x, options_.direct_conv);
  if (options_.channels_last) {
    h = h.contiguous(at::MemoryFormat::ChannelsLast);
  }
  h = BatchNormAddReLU(*bn1_, h, {}, options_.fuse_batch_norm);
  if (!options_.small_stem) {
    h = at::max_pool2d(h, {3, 3}, {2, 2}, {1, 1});
  }
  h = layer1_->forward(h);
  h = layer2_->forward(h);
  h = layer3_->forward(h);
  h = layer4_->forward(h);
  return h.mean({2, 3});
}

at::Tensor ResNetImpl::forward(const at::Tensor& x) {
  at::Tensor f = features(x);
  return options_.mlp ? fc_mlp_->forward(f) : fc_->forward(f);
}

std::vector<std::pair<std::string, at::Tensor>> ResNetImpl::BackboneState()
    const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (auto& [name, t] : StateOf(*this)) {
    if (name.rfind("fc.", 0) != 0) out.emplace_back(name, t);
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> StateOf(
    const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  CollectState(module, "", &out);
  return out;
}

}  // namespace momentum::worker
