#include "worker/resnet.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace momentum::worker {
namespace {

int64_t CountParameters(ResNet& net) {
  int64_t n = 0;
  for (const auto& p : net->parameters()) n += p.numel();
  return n;
}

ResNetOptions Standard(const std::string& arch) {
  ResNetOptions o;
  o.arch = arch;
  o.out_dim = 1000;
  return o;
}

// torchvision's published parameter counts: resnet18 11,689,512 and
// resnet50 25,557,032 (1000 classes).
TEST(ResNetTest, StandardResNet18HasTorchvisionParameterCount) {
  ResNet net(Standard("resnet18"));
  EXPECT_EQ(CountParameters(net), 11689512);
  EXPECT_EQ(net->feature_dim(), 512);
}

TEST(ResNetTest, StandardResNet50HasTorchvisionParameterCount) {
  ResNet net(Standard("resnet50"));
  EXPECT_EQ(CountParameters(net), 25557032);
  EXPECT_EQ(net->feature_dim(), 2048);
}

TEST(ResNetTest, UsesTorchvisionNames) {
  ResNet net(Standard("resnet18"));
  std::set<std::string> names;
  for (const auto& [name, t] : StateOf(*net)) names.insert(name);
  for (const char* n :
       {"conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked",
        "layer1.0.conv1.weight", "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var",
        "layer4.1.conv2.weight", "fc.weight", "fc.bias"}) {
    EXPECT_TRUE(names.count(n)) << n;
  }
  EXPECT_FALSE(names.count("layer1.0.downsample.0.weight"));
  // 62 parameter tensors + 3 buffers per BatchNorm (20 of them) in resnet18.
  EXPECT_EQ(names.size(), 62u + 60u);
}

TEST(ResNetTest, WidthScalesLayersAndSmallStemKeepsResolution) {
  ResNetOptions o;
  o.width = 8;
  o.in_channels = 1;
  o.small_stem = true;
  o.out_dim = 16;
  ResNet net(o);
  EXPECT_EQ(net->feature_dim(), 64);
  auto state = StateOf(*net);
  std::map<std::string, at::Tensor> m(state.begin(), state.end());
  EXPECT_EQ(m["conv1.weight"].sizes(), at::IntArrayRef({8, 1, 3, 3}));
  EXPECT_EQ(m["layer3.0.conv1.weight"].sizes(),
            at::IntArrayRef({32, 16, 3, 3}));
  at::Tensor x = at::randn({2, 1, 28, 28});
  EXPECT_EQ(net->forward(x).sizes(), at::IntArrayRef({2, 16}));
  // Small stem: stride 1 and no max-pool, so layer4 sees 28/8 -> 4x4.
  EXPECT_EQ(net->features(x).sizes(), at::IntArrayRef({2, 64}));
}

TEST(ResNetTest, MlpHeadIsLinearReluLinear) {
  ResNetOptions o;
  o.width = 4;
  o.mlp = true;
  o.out_dim = 8;
  ResNet net(o);
  auto state = StateOf(*net);
  std::map<std::string, at::Tensor> m(state.begin(), state.end());
  ASSERT_TRUE(m.count("fc.0.weight"));
  ASSERT_TRUE(m.count("fc.2.weight"));
  EXPECT_EQ(m["fc.0.weight"].sizes(), at::IntArrayRef({32, 32}));
  EXPECT_EQ(m["fc.2.weight"].sizes(), at::IntArrayRef({8, 32}));
  // forward = fc.2(relu(fc.0(features))) computed by hand.
  net->eval();
  at::Tensor x = at::randn({3, 3, 32, 32});
  at::NoGradGuard g;
  at::Tensor f = net->features(x);
  at::Tensor h = at::relu(at::linear(f, m["fc.0.weight"], m["fc.0.bias"]));
  at::Tensor want = at::linear(h, m["fc.2.weight"], m["fc.2.bias"]);
  EXPECT_TRUE(at::allclose(net->forward(x), want, 1e-5, 1e-6));
}

TEST(ResNetTest, BackboneStateExcludesHead) {
  ResNetOptions o;
  o.width = 4;
  o.mlp = true;
  ResNet net(o);
  for (const auto& [name, t] : net->BackboneState()) {
    EXPECT_NE(name.rfind("fc.", 0), 0u) << name;
  }
  EXPECT_EQ(net->BackboneState().size(), StateOf(*net).size() - 4);
}

}  // namespace
}  // namespace momentum::worker
