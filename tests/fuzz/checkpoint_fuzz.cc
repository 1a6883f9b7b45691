// libFuzzer target: the worker's checkpoint reader (LoadCheckpoint) on
// arbitrary file contents, into a real (tiny) MoCo model and its SGD state:
// LibTorch's zip and pickle readers, then our checks of every field.
// Properties: a refusal is DATA_LOSS or FAILED_PRECONDITION naming the file
// (LibTorch's exceptions turned into a Status); a checkpoint that loads
// leaves a model that can go on training: its queue pointer inside the
// queue.
//
// The seed corpus holds a real checkpoint of this model, written by
// SaveCheckpoint: run the binary with MOMENTUM_FUZZ_SAVE_CHECKPOINT=DIR
// (tests/fuzz/make_seeds.py checkpoint does). With MOMENTUM_FUZZ_VERBOSE
// set it prints what LoadCheckpoint returned for each input.
#include <ATen/ATen.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>

#include "worker/checkpoint.h"
#include "worker/moco.h"
#include "worker/optim.h"

namespace {

namespace worker = ::momentum::worker;

struct Model {
  Model() {
    worker::MocoOptions options;
    options.encoder.width = 1;  // resnet18 of 1..8 channels: a few KB
    options.encoder.in_channels = 1;
    options.encoder.small_stem = true;
    options.encoder.out_dim = 4;
    options.queue_size = 8;
    at::manual_seed(1);
    moco = std::make_unique<worker::Moco>(
        options, at::make_generator<at::CPUGeneratorImpl>(2));
    sgd = std::make_unique<worker::Sgd>(moco->encoder_q()->parameters(), 0.9,
                                        1e-4);
  }
  std::unique_ptr<worker::Moco> moco;
  std::unique_ptr<worker::Sgd> sgd;
};

const std::string& Path() {
  static const std::string* path = [] {
    char pattern[] = "/tmp/checkpoint_fuzz.XXXXXX";
    const int fd = ::mkstemp(pattern);
    if (fd < 0) std::abort();
    ::close(fd);
    std::atexit([] { std::filesystem::remove(Path()); });
    return new std::string(pattern);
  }();
  return *path;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  at::set_num_threads(1);
  if (const char* dir = std::getenv("MOMENTUM_FUZZ_SAVE_CHECKPOINT")) {
    Model model;
    worker::CheckpointState state;
    state.position = {.epoch = 1,
                      .step_in_epoch = 2,
                      .global_step = 5,
                      .images_seen = 40,
                      .train_seconds = 1.5};
    state.shuffle_rng_state =
        at::make_generator<at::CPUGeneratorImpl>(3).get_state();
    state.torch_rng_state = at::detail::getDefaultCPUGenerator().get_state();
    state.knn_history = {{0.5, 2, 0.25}, {1.0, 4, 0.5}};
    state.spec_yaml = "name: fuzz\n";
    state.world_size = 1;
    absl::StatusOr<std::string> written =
        worker::SaveCheckpoint(dir, *model.moco, *model.sgd, state, 1);
    if (!written.ok()) {
      std::cerr << written.status() << "\n";
      std::exit(1);
    }
    std::cout << *written << "\n";
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  {
    std::ofstream file(Path(), std::ios::binary | std::ios::trunc);
    file.write(reinterpret_cast<const char*>(data), size);
    if (!file) std::abort();
  }
  Model model;
  absl::StatusOr<worker::CheckpointState> state =
      worker::LoadCheckpoint(Path(), *model.moco, *model.sgd);
  if (std::getenv("MOMENTUM_FUZZ_VERBOSE") != nullptr) {
    std::cerr << (state.ok() ? "loaded" : state.status().ToString()) << "\n";
  }
  if (!state.ok()) {
    if ((state.status().code() != absl::StatusCode::kDataLoss &&
         state.status().code() != absl::StatusCode::kFailedPrecondition) ||
        state.status().message().find(Path()) == absl::string_view::npos) {
      std::abort();
    }
    return 0;
  }
  if (model.moco->queue_ptr() < 0 ||
      model.moco->queue_ptr() >= model.moco->options().queue_size) {
    std::abort();
  }
  return 0;
}
