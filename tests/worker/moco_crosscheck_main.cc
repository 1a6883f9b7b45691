// moco_crosscheck: runs a few MoCo training steps of the C++ trainer on
// random inputs and writes the initial state, the inputs (with the BatchNorm
// shuffle permutations and learning rates) and the final state, for
// tests/reference/crosscheck.py to replay with the Python reference.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Dict.h>
#include <torch/serialize.h>
#include <torch/utils.h>

#include <CLI/CLI.hpp>
#include <iostream>

#include "worker/checkpoint.h"
#include "worker/moco.h"
#include "worker/optim.h"

namespace {

using momentum::worker::Moco;
using momentum::worker::MocoOptions;
using momentum::worker::Sgd;
using momentum::worker::StateOf;

c10::Dict<std::string, at::Tensor> StateDict(const torch::nn::Module& m) {
  c10::Dict<std::string, at::Tensor> d;
  for (const auto& [name, t] : StateOf(m)) d.insert(name, t.detach().clone());
  return d;
}

int Write(const std::string& path, const c10::impl::GenericDict& dict) {
  absl::Status s = momentum::worker::WriteFileAtomically(
      path, torch::pickle_save(c10::IValue(dict)));
  if (!s.ok()) {
    std::cerr << s.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"MoCo cross-check dump"};
  MocoOptions o;
  int64_t image_size = 16, batch = 8, steps = 3;
  uint64_t seed = 1;
  double sgd_momentum = 0.9, weight_decay = 1e-4, lr = 0.03;
  std::string init_path, result_path;
  app.add_option("--arch", o.encoder.arch);
  app.add_option("--width", o.encoder.width);
  app.add_option("--in-channels", o.encoder.in_channels);
  app.add_flag("--small-stem", o.encoder.small_stem);
  app.add_option("--dim", o.encoder.out_dim);
  app.add_flag("--mlp", o.encoder.mlp);
  app.add_option("--queue", o.queue_size);
  app.add_option("--momentum", o.momentum);
  app.add_option("--temperature", o.temperature);
  app.add_option("--groups", o.bn_groups, "0: no shuffle");
  app.add_option("--image-size", image_size);
  app.add_option("--batch", batch);
  app.add_option("--steps", steps);
  app.add_option("--seed", seed);
  app.add_option("--lr", lr);
  app.add_option("--sgd-momentum", sgd_momentum);
  app.add_option("--weight-decay", weight_decay);
  app.add_option("--concurrent-key", o.concurrent_key,
                 "key encoder on its own thread beside the query encoder");
  app.add_option("--init", init_path)->required();
  app.add_option("--result", result_path)->required();
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(1);

  torch::manual_seed(seed);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  Moco model(o, gen);
  Sgd sgd(model.encoder_q()->parameters(), sgd_momentum, weight_decay);
  {
    // Non-zero BatchNorm affine parameters: with biases at exactly zero the
    // relative comparison would measure rounding noise alone.
    at::NoGradGuard no_grad;
    auto q = StateOf(*model.encoder_q());
    auto k = StateOf(*model.encoder_k());
    for (size_t i = 0; i < q.size(); ++i) {
      const std::string& name = q[i].first;
      const bool bn = name.find("bn") != std::string::npos ||
                      name.find("downsample.1") != std::string::npos;
      if (bn &&
          (name.size() > 5 && (name.substr(name.size() - 5) == ".bias" ||
                               name.substr(name.size() - 7) == ".weight"))) {
        q[i].second.add_(
            at::rand(q[i].second.sizes(), gen).sub_(0.5).mul_(0.2));
      }
      k[i].second.copy_(q[i].second);
    }
  }

  c10::impl::GenericDict config(c10::StringType::get(), c10::AnyType::get());
  config.insert("arch", o.encoder.arch);
  config.insert("width", o.encoder.width);
  config.insert("in_channels", o.encoder.in_channels);
  config.insert("small_stem", o.encoder.small_stem);
  config.insert("dim", o.encoder.out_dim);
  config.insert("mlp", o.encoder.mlp);
  config.insert("queue_size", o.queue_size);
  config.insert("momentum", o.momentum);
  config.insert("temperature", o.temperature);
  config.insert("sgd_momentum", sgd_momentum);
  config.insert("weight_decay", weight_decay);
  config.insert("bn_groups", o.bn_groups);

  c10::impl::GenericDict init(c10::StringType::get(), c10::AnyType::get());
  init.insert("config", config);
  init.insert("encoder_q", StateDict(*model.encoder_q()));
  init.insert("encoder_k", StateDict(*model.encoder_k()));
  init.insert("queue", model.queue().clone());
  init.insert("queue_ptr", model.queue_ptr());

  c10::impl::GenericList step_list(c10::AnyType::get());
  c10::impl::GenericList losses(c10::FloatType::get());
  for (int64_t s = 0; s < steps; ++s) {
    const std::vector<int64_t> shape = {batch, o.encoder.in_channels,
                                        image_size, image_size};
    at::Tensor x_q = at::randn(shape, gen);
    at::Tensor x_k = at::randn(shape, gen);
    at::Tensor perm = o.bn_groups > 0 ? at::randperm(batch, gen, at::kLong)
                                      : at::empty({0}, at::kLong);
    const double step_lr = lr * (1.0 + 0.5 * s);  // a schedule of sorts
    model.MomentumUpdate();
    Moco::Output out = model.Forward(x_q, x_k, perm);
    sgd.ZeroGrad();
    out.loss.backward();
    sgd.Step(step_lr);
    model.Enqueue(out.all_keys);
    losses.push_back(out.loss.item<double>());

    c10::impl::GenericDict step(c10::StringType::get(), c10::AnyType::get());
    step.insert("query", x_q);
    step.insert("key", x_k);
    step.insert("perm", perm);
    step.insert("lr", step_lr);
    step_list.push_back(step);
  }
  init.insert("steps", step_list);

  c10::impl::GenericDict result(c10::StringType::get(), c10::AnyType::get());
  result.insert("loss", losses);
  result.insert("encoder_q", StateDict(*model.encoder_q()));
  result.insert("encoder_k", StateDict(*model.encoder_k()));
  result.insert("queue", model.queue().clone());
  result.insert("queue_ptr", model.queue_ptr());
  return Write(init_path, init) | Write(result_path, result);
}
