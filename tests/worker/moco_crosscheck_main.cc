// moco_crosscheck: runs a few MoCo training steps of the C++ trainer on
// random inputs and writes the initial state, the inputs (with the BatchNorm
// shuffle permutations and learning rates) and the final state, for
// tests/reference/crosscheck.py to replay with the Python reference.
//
// With --world-size N > 1 the steps run on N Gloo ranks (threads of this
// process) with BatchNorm shuffled across them; --batch is then the batch of
// each rank, the inputs are the group's batches, and RESULT holds one entry
// per rank under "ranks" (tests/reference/crosscheck_dist.py replays them on
// N torch.distributed ranks).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Dict.h>
#include <torch/serialize.h>
#include <torch/utils.h>

#include <CLI/CLI.hpp>
#include <iostream>

#include "tests/worker/thread_ranks.h"
#include "worker/checkpoint.h"
#include "worker/moco.h"
#include "worker/optim.h"
#include "worker/process_group.h"

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

// The same model for the same seed: identical on every rank; on the CPU,
// its encoders autocast to bfloat16 with `bf16`.
std::unique_ptr<Moco> MakeModel(const MocoOptions& o, uint64_t seed,
                                bool bf16) {
  torch::manual_seed(seed);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto model = std::make_unique<Moco>(o, gen);
  // Non-zero BatchNorm affine parameters: with biases at exactly zero the
  // relative comparison would measure rounding noise alone.
  at::NoGradGuard no_grad;
  auto q = StateOf(*model->encoder_q());
  auto k = StateOf(*model->encoder_k());
  for (size_t i = 0; i < q.size(); ++i) {
    const std::string& name = q[i].first;
    const bool bn = name.find("bn") != std::string::npos ||
                    name.find("downsample.1") != std::string::npos;
    if (bn &&
        (name.size() > 5 && (name.substr(name.size() - 5) == ".bias" ||
                             name.substr(name.size() - 7) == ".weight"))) {
      q[i].second.add_(at::rand(q[i].second.sizes(), gen).sub_(0.5).mul_(0.2));
    }
    k[i].second.copy_(q[i].second);
  }
  momentum::worker::RankDevice where;
  where.bf16 = bf16;
  model->To(where);
  return model;
}

c10::impl::GenericDict FinalState(Moco& model,
                                  const c10::impl::GenericList& losses) {
  c10::impl::GenericDict result(c10::StringType::get(), c10::AnyType::get());
  result.insert("loss", losses);
  result.insert("encoder_q", StateDict(*model.encoder_q()));
  result.insert("encoder_k", StateDict(*model.encoder_k()));
  result.insert("queue", model.queue().clone());
  result.insert("queue_ptr", model.queue_ptr());
  return result;
}

int Write(const std::string& path, const c10::impl::GenericDict& dict) {
  absl::Status s = momentum::worker::WriteFileAtomically(
      path, momentum::worker::PickleForTorchLoad(c10::IValue(dict)));
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
  int64_t world = 1;
  app.add_option("--world-size", world,
                 "ranks (threads with Gloo); --batch is then per rank")
      ->check(CLI::PositiveNumber);
  std::string precision = "fp32";
  app.add_option("--precision", precision, "resources.precision")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--init", init_path)->required();
  app.add_option("--result", result_path)->required();
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(1);

  // Across ranks every rank encodes its slice of the shuffled group batch as
  // one BatchNorm group; the file says "world_size" groups.
  const int64_t file_groups =
      world > 1 && o.bn_groups > 0 ? world : o.bn_groups;
  if (world > 1) {
    o.shuffle_across_ranks = o.bn_groups > 0;
    if (o.bn_groups > 0) o.bn_groups = 1;
  }
  std::unique_ptr<Moco> model = MakeModel(o, seed, precision == "bf16");
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
  config.insert("bn_groups", file_groups);
  config.insert("world_size", world);
  config.insert("precision", precision);
  // The layout the trainer runs its convolutions in: the reference runs the
  // same, so that both round alike (a pre-activation within rounding of 0
  // otherwise takes the other side of a ReLU in one of them).
  config.insert("channels_last",
                model->encoder_q()->parameters()[0].is_contiguous(
                    at::MemoryFormat::ChannelsLast));

  c10::impl::GenericDict init(c10::StringType::get(), c10::AnyType::get());
  init.insert("config", config);
  init.insert("encoder_q", StateDict(*model->encoder_q()));
  init.insert("encoder_k", StateDict(*model->encoder_k()));
  init.insert("queue", model->queue().clone());
  init.insert("queue_ptr", model->queue_ptr());

  // The group's inputs, drawn up front from a generator of their own.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1000);
  const int64_t total = batch * world;
  const std::vector<int64_t> shape = {total, o.encoder.in_channels, image_size,
                                      image_size};
  struct Inputs {
    at::Tensor x_q, x_k, perm;
    double lr;
  };
  std::vector<Inputs> inputs;
  c10::impl::GenericList step_list(c10::AnyType::get());
  for (int64_t s = 0; s < steps; ++s) {
    Inputs in;
    in.x_q = at::randn(shape, gen);
    in.x_k = at::randn(shape, gen);
    in.perm = o.bn_groups > 0 ? at::randperm(total, gen, at::kLong)
                              : at::empty({0}, at::kLong);
    in.lr = lr * (1.0 + 0.5 * s);  // a schedule of sorts
    c10::impl::GenericDict step(c10::StringType::get(), c10::AnyType::get());
    step.insert("query", in.x_q);
    step.insert("key", in.x_k);
    step.insert("perm", in.perm);
    step.insert("lr", in.lr);
    step_list.push_back(step);
    inputs.push_back(std::move(in));
  }
  init.insert("steps", step_list);

  // One rank's steps; with a group, on its slice of every batch.
  auto run = [&](Moco& m, int64_t rank, c10::impl::GenericList& losses) {
    Sgd sgd(m.encoder_q()->parameters(), sgd_momentum, weight_decay);
    for (const Inputs& in : inputs) {
      m.MomentumUpdate();
      Moco::Output out =
          m.Forward(in.x_q.slice(0, rank * batch, (rank + 1) * batch),
                    in.x_k.slice(0, rank * batch, (rank + 1) * batch), in.perm);
      sgd.ZeroGrad();
      out.loss.backward();
      absl::Status averaged = m.AverageGradients();
      if (!averaged.ok()) return averaged;
      sgd.Step(in.lr);
      m.Enqueue(out.all_keys);
      losses.push_back(out.loss.item<double>());
    }
    return absl::OkStatus();
  };

  if (world == 1) {
    c10::impl::GenericList losses(c10::FloatType::get());
    absl::Status s = run(*model, 0, losses);
    if (!s.ok()) {
      std::cerr << s.message() << "\n";
      return 1;
    }
    return Write(init_path, init) |
           Write(result_path, FinalState(*model, losses));
  }

  std::vector<std::unique_ptr<Moco>> models;
  models.push_back(std::move(model));
  for (int64_t r = 1; r < world; ++r)
    models.push_back(MakeModel(o, seed, precision == "bf16"));
  // Lists share their storage when copied: one made per rank.
  std::vector<c10::impl::GenericList> losses;
  for (int64_t r = 0; r < world; ++r) {
    losses.emplace_back(c10::FloatType::get());
  }
  std::vector<absl::Status> statuses(world);
  absl::Status joined = momentum::worker::testing::RunRanks(
      world, std::chrono::milliseconds(60000),
      [&](int64_t rank, momentum::worker::ProcessGroup& group) {
        models[rank]->SetProcessGroup(&group);
        statuses[rank] = run(*models[rank], rank, losses[rank]);
        models[rank]->SetProcessGroup(nullptr);
      });
  for (const absl::Status& s : statuses) {
    if (!s.ok()) joined.Update(s);
  }
  if (!joined.ok()) {
    std::cerr << joined.message() << "\n";
    return 1;
  }
  c10::impl::GenericList ranks(c10::AnyType::get());
  for (int64_t r = 0; r < world; ++r) {
    ranks.push_back(FinalState(*models[r], losses[r]));
  }
  c10::impl::GenericDict result(c10::StringType::get(), c10::AnyType::get());
  result.insert("ranks", ranks);
  return Write(init_path, init) | Write(result_path, result);
}
