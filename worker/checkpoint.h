// Checkpoints of a MoCo run, written atomically (temporary file, fsync,
// rename, fsync of the folder) as LibTorch pickles that Python's torch.load
// also reads. A checkpoint holds both encoders (parameters and buffers), the
// queue, its pointer and the step that wrote each slot, the SGD momentum
// buffers, the position in the run (epoch, step in epoch, global step, training
// seconds, images seen), the state of every random generator the run draws
// from, the kNN history and the job spec as YAML. Data order and augmentation
// are pure functions of (seed, epoch, index), so the position is all they need.
//
// Files are <dir>/checkpoint-<global step, 9 digits>.pt; the newest N are
// kept.
#ifndef MOMENTUM_WORKER_CHECKPOINT_H_
#define MOMENTUM_WORKER_CHECKPOINT_H_

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/moco.h"
#include "worker/optim.h"

namespace momentum::worker {

struct RunPosition {
  int64_t epoch = 0;          // epoch in progress
  int64_t step_in_epoch = 0;  // steps of it already done
  int64_t global_step = 0;    // steps done in all
  int64_t images_seen = 0;
  double train_seconds = 0;
};

struct KnnRecord {
  double epochs =
      0;  // epochs completed, fractional: global step / steps per epoch
  int64_t step = 0;
  double top1 = 0;
};

struct CheckpointState {
  RunPosition position;
  at::Tensor shuffle_rng_state;  // the BatchNorm-shuffle generator
  // LibTorch's default CPU generator (weight init; nothing in a step draws
  // from it today, but whatever does later resumes exactly).
  at::Tensor torch_rng_state;
  std::vector<KnnRecord> knn_history;
  std::string spec_yaml;
  int64_t world_size = 1;  // ranks of the run that wrote it
  // The learning rate's factor after roll-backs, and how many there were.
  double lr_scale = 1;
  int64_t rollbacks = 0;
};

// `value` (dicts, lists, tuples, tensors, strings and numbers) as the bytes
// of a file in torch.save's format that Python's torch.load reads with its
// default weights_only=True (torch 2.6 and later). torch::pickle_save tags
// typed dicts and lists with torch.jit._pickle globals, which that loader
// refuses; here every dict and list is written as a plain Python one.
// LibTorch's own loader (torch::pickle_load) reads both forms.
std::vector<char> PickleForTorchLoad(const c10::IValue& value);

// `tensor` as checkpoints and exports keep it: detached, in host memory, in
// the default (contiguous) layout, so that a file written on a GPU reads on
// a CPU and the other way round. Itself when it is that already.
at::Tensor OnHost(const at::Tensor& tensor);

// Writes `bytes` to `path` atomically: a temporary file beside it, fsync,
// rename over `path`, fsync of the folder. Nothing is left behind on error.
absl::Status WriteFileAtomically(const std::string& path,
                                 const std::vector<char>& bytes);

// Serialises the run into <dir>/checkpoint-<step>.pt and deletes all but the
// newest `keep`. Returns the path written.
absl::StatusOr<std::string> SaveCheckpoint(const std::string& dir, Moco& model,
                                           Sgd& sgd,
                                           const CheckpointState& state,
                                           int64_t keep);

// The newest checkpoint in `dir`, or std::nullopt when there is none.
std::optional<std::string> LatestCheckpoint(const std::string& dir);

// Every checkpoint in `dir`, newest first.
std::vector<std::string> CheckpointsNewestFirst(const std::string& dir);

// Restores model and optimiser in place and returns the rest. A file that is
// unreadable, corrupt or of another model gives DATA_LOSS or
// FAILED_PRECONDITION naming the file; on error the model may be partially
// overwritten, so callers must not go on training with it.
absl::StatusOr<CheckpointState> LoadCheckpoint(const std::string& path,
                                               Moco& model, Sgd& sgd);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_CHECKPOINT_H_
