// trainer_bench: images per second of the C++ MoCo training step, with the
// same options and JSON output as bench/reference_bench.py, so that
// bench/run.sh can put the two side by side.
//   --mode synthetic  random inputs made once: the step alone
//   --mode augment    Fashion-MNIST through the real loader threads and
//                     augmentation: step plus waiting for data
//   --mode folder     an ImageFolder of JPEG/PNG files (--data) decoded and
//                     augmented by the loader threads (e.g. 224 px ImageNet
//                     style input for ResNet-50)
//   --device cuda, --precision bf16: the GPU path of the trainer (inputs
//   copied from page-locked memory without waiting; the clock stops after
//   the device has finished the last step).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/utils.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>

#include "worker/device.h"
#include "worker/device_augment.h"
#include "worker/loader.h"
#include "worker/malloc_tuning.h"
#include "worker/moco.h"
#include "worker/optim.h"

namespace mw = momentum::worker;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  CLI::App app{"C++ MoCo step throughput"};
  mw::MocoOptions o;
  o.encoder.width = 16;
  o.encoder.in_channels = 1;
  o.encoder.small_stem = true;
  o.encoder.mlp = true;
  o.queue_size = 4096;
  o.momentum = 0.999;
  o.temperature = 0.2;
  o.bn_groups = 0;
  int64_t image_size = 28, batch = 256, threads = 1, steps = 10, warmup = 2;
  int64_t loader_threads = 1;
  double lr = 0.03;
  std::string mode = "synthetic", data = "/usr/share/datasets/fashion-mnist";
  bool concurrent_key = false;
  app.add_option("--arch", o.encoder.arch);
  app.add_option("--width", o.encoder.width);
  app.add_option("--in-channels", o.encoder.in_channels);
  app.add_flag("--small-stem,!--no-small-stem", o.encoder.small_stem);
  app.add_flag("--mlp,!--no-mlp", o.encoder.mlp);
  app.add_flag("--fused-bn,!--no-fused-bn", o.encoder.fuse_batch_norm,
               "BatchNorm, add and ReLU as one node (bit for bit the same)");
  app.add_flag("--direct-conv,!--no-direct-conv", o.encoder.direct_conv,
               "the blocks' 3x3 convolutions of stride 1 on the direct kernel "
               "(outputs bit for bit the same, weight gradients to "
               "rounding)");
  app.add_option("--image-size", image_size);
  app.add_option("--batch", batch);
  app.add_option("--queue", o.queue_size);
  app.add_option("--dim", o.encoder.out_dim);
  app.add_option("--temperature", o.temperature);
  app.add_option("--momentum", o.momentum);
  app.add_option("--lr", lr);
  app.add_option("--bn-groups", o.bn_groups);
  app.add_option("--threads", threads,
                 "threads in all, as the trainer uses them");
  app.add_option("--concurrent-key", concurrent_key,
                 "key encoder on its own thread (needs threads >= 2)");
  app.add_option("--steps", steps);
  app.add_option("--warmup", warmup);
  app.add_option("--mode", mode)
      ->check(CLI::IsMember({"synthetic", "augment", "folder"}));
  momentum::ResourcesSpec resources;
  resources.device = "cpu";
  app.add_option("--device", resources.device)
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  app.add_option("--precision", resources.precision)
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--data", data);
  app.add_option("--workers", loader_threads, "loader threads (augment)");
  bool loader_only = false, scaled_decode = true;
  app.add_flag("--loader-only", loader_only,
               "time the loader alone: batches per second of --workers "
               "threads, no training step (augment, folder)");
  std::string augment_on = "host";
  app.add_option("--augment-on", augment_on,
                 "where colour, blur, flip and normalisation run "
                 "(data.augment_on): host threads, or batched on --device")
      ->check(CLI::IsMember({"host", "device"}));
  app.add_flag("--scaled-decode,!--no-scaled-decode", scaled_decode,
               "decode JPEGs at the smallest DCT scale that covers the crops "
               "(data.scaled_decode)");
  bool malloc_tuning = true;
  app.add_flag("--malloc-tuning,!--no-malloc-tuning", malloc_tuning,
               "keep large blocks on the heap, as momentum-worker does "
               "(worker/malloc_tuning.h)");
  CLI11_PARSE(app, argc, argv);
  // Before the first large allocation; parsing the flags makes none.
  if (malloc_tuning) mw::TuneMallocForTraining();

  // The trainer's thread layout (worker/trainer.cc).
  o.concurrent_key = concurrent_key && threads >= 2;
  at::set_num_threads(
      static_cast<int>(o.concurrent_key ? threads / 2 : threads));
  auto where = mw::ResolveRankDevice(resources, /*local_rank=*/0);
  if (!where.ok()) {
    std::cerr << where.status().message() << "\n";
    return 1;
  }
  mw::PrepareDevice(*where);
  torch::manual_seed(0);
  mw::Moco model(o, at::make_generator<at::CPUGeneratorImpl>(0));
  model.To(*where);
  mw::Sgd sgd(model.encoder_q()->parameters(), 0.9, 1e-4);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);

  std::unique_ptr<mw::Dataset> dataset;
  std::unique_ptr<mw::TrainLoader> loader;
  mw::ViewFormat lo_format;
  int64_t blur_radius = 0;
  at::Tensor xq, xk;
  if (mode != "synthetic") {
    auto opened = mode == "augment" ? mw::OpenFashionMnist(data, /*train=*/true)
                                    : mw::OpenImageFolder(data);
    if (!opened.ok()) {
      std::cerr << opened.status().message() << "\n";
      return 1;
    }
    dataset = std::move(*opened);
    mw::LoaderOptions lo;
    lo.global_batch = batch;
    lo.threads = loader_threads;
    lo.prefetch = 4;
    lo.format.channels = o.encoder.in_channels;
    lo.format.size = image_size;
    // The dataset's statistics (ImageNet's for an ImageFolder).
    const std::vector<double> mean = dataset->default_mean();
    const std::vector<double> std = dataset->default_std();
    lo.format.mean.assign(mean.begin(), mean.end());
    lo.format.std.assign(std.begin(), std.end());
    lo.pin_memory = where->device.is_cuda();
    lo.scaled_decode = scaled_decode;
    lo.photometric_on_device = augment_on == "device";
    lo_format = lo.format;
    blur_radius = mw::MaxBlurRadius(lo.augment, lo.format);
    loader = std::make_unique<mw::TrainLoader>(dataset.get(), lo);
    loader->StartEpoch(0, 0);
  } else {
    xq = at::randn({batch, o.encoder.in_channels, image_size, image_size}, gen)
             .to(where->device);
    xk = at::randn({batch, o.encoder.in_channels, image_size, image_size}, gen)
             .to(where->device);
  }

  double wait_seconds = 0;
  Clock::time_point timed_start;
  at::Tensor last_loss;
  for (int64_t s = 0; s < warmup + steps; ++s) {
    if (s == warmup) {
      // Warm-up done on the device too (cuDNN's benchmark picks kernels).
      if (last_loss.defined()) (void)last_loss.item<double>();
      timed_start = Clock::now();
    }
    const auto start = Clock::now();
    if (loader) {
      const int64_t per_epoch = loader->steps_per_epoch();
      if (s > 0 && s % per_epoch == 0) loader->StartEpoch(s / per_epoch, 0);
      auto b = loader->Next();
      if (!b.ok()) {
        std::cerr << b.status().message() << "\n";
        return 1;
      }
      auto on_device = [&](const at::Tensor& t) {
        return t.to(where->device, /*non_blocking=*/true);
      };
      if (b->query_bytes.defined()) {
        xq = mw::PhotometricOnDevice(on_device(b->query_bytes),
                                     on_device(b->query_params), lo_format,
                                     blur_radius);
        xk = mw::PhotometricOnDevice(on_device(b->key_bytes),
                                     on_device(b->key_params), lo_format,
                                     blur_radius);
      } else {
        xq = on_device(b->query);
        xk = on_device(b->key);
      }
    }
    const auto got = Clock::now();
    if (loader_only) {
      last_loss = xk.sum();  // the device's share of the loading
      continue;
    }
    model.MomentumUpdate();
    at::Tensor perm;
    if (o.bn_groups > 0) {
      perm = at::randperm(batch, gen, at::kLong)
                 .to(where->device, /*non_blocking=*/true);
    }
    auto out = model.Forward(xq, xk, perm);
    sgd.ZeroGrad();
    out.loss.backward();
    sgd.Step(lr);
    model.Enqueue(out.all_keys);
    // The trainer reads the loss only where it logs (every 20 steps by
    // default); on the CPU this changes nothing.
    last_loss = out.loss.detach();
    if (s >= warmup) {
      wait_seconds += std::chrono::duration<double>(got - start).count();
    }
  }
  if (last_loss.defined()) (void)last_loss.item<double>();
  const double seconds =
      std::chrono::duration<double>(Clock::now() - timed_start).count();
  nlohmann::json j{{"impl", "cpp"},
                   {"mode", mode},
                   {"images_per_s", steps * batch / seconds},
                   {"step_ms", 1000 * seconds / steps},
                   {"data_wait_ms", 1000 * wait_seconds / steps},
                   {"threads", threads},
                   {"concurrent_key", o.concurrent_key},
                   {"fused_bn", o.encoder.fuse_batch_norm},
                   {"direct_conv", o.encoder.direct_conv},
                   {"batch", batch},
                   {"width", o.encoder.width},
                   {"arch", o.encoder.arch},
                   {"device", where->device.str()},
                   {"precision", resources.precision},
                   {"image_size", image_size},
                   {"loader_only", loader_only},
                   {"scaled_decode", scaled_decode},
                   {"augment_on", augment_on},
                   {"workers", loader_threads},
                   {"steps", steps}};
  std::cout << j.dump() << std::endl;
  return 0;
}
