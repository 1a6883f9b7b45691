// The job spec: one typed structure for a Momentum training job, read from
// YAML and validated here, shared by the worker, and later the server and the
// client. Every field has a default; docs/job-spec.md lists them all.
//
// Usage:
//   absl::StatusOr<momentum::JobSpec> spec =
//       momentum::LoadJobSpecFile("job.yaml", {"optim.epochs=5"});
//   if (!spec.ok()) { std::cerr << spec.status() << "\n"; return 2; }
//
// Errors are INVALID_ARGUMENT with a message naming the field and the rule,
// for example "moco.temperature must be > 0, got -1".
#ifndef MOMENTUM_COMMON_JOB_SPEC_H_
#define MOMENTUM_COMMON_JOB_SPEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace momentum {

// Most ranks one job may have (resources.nproc), and the largest global
// batch (optim.batch_size).
inline constexpr int64_t kMaxRanks = 65536;
inline constexpr int64_t kMaxBatchSize = int64_t{1} << 24;

struct ModelSpec {
  std::string arch = "resnet18";  // resnet18 | resnet50
  int64_t width = 64;             // base width; torchvision's is 64
  int64_t in_channels = 3;        // channels of the input images
  bool small_stem = false;        // 3x3 stride-1 conv1 and no max-pool
};

struct MocoSpec {
  std::string version = "v2";  // v1 | v2: picks the defaults marked (v)
  int64_t dim = 128;           // feature dimension of keys and queries
  int64_t queue_size = 65536;  // K; any value >= 1, need not divide batch
  double momentum = 0.999;     // m of the key encoder update
  double temperature = 0.2;    // (v) T: v1 0.07, v2 0.2
  bool mlp = true;             // (v) 2-layer MLP head: v1 false, v2 true
  // BatchNorm of the key encoder: "split" normalises G groups separately
  // after a seeded shuffle (the one-process emulation of shuffled BN),
  // "shuffle" is the cross-rank version (more than one rank), "none" turns
  // shuffling off. "auto" is shuffle for several ranks, split otherwise.
  std::string bn = "auto";
  int64_t bn_groups = 2;  // G for split BN; must divide the per-rank batch
};

struct AugmentSpec {
  double crop_min_scale = 0.2;
  double crop_max_scale = 1.0;
  double jitter_brightness = 0.4;
  double jitter_contrast = 0.4;
  double jitter_saturation = 0.4;
  double jitter_hue = 0.1;
  double jitter_prob = 0.8;
  double grayscale_prob = 0.2;
  bool blur = true;  // (v) Gaussian blur: v1 false, v2 true
  double blur_prob = 0.5;
  double blur_sigma_min = 0.1;
  double blur_sigma_max = 2.0;
  double hflip_prob = 0.5;
  // Per-channel normalisation; one value applies to every channel. Empty
  // means the dataset's default (Fashion-MNIST: 0.2860 / 0.3530; ImageFolder:
  // the ImageNet values).
  std::vector<double> mean;
  std::vector<double> std;
};

struct DataSpec {
  std::string format = "fashion-mnist";  // fashion-mnist | image-folder
  // fashion-mnist: folder with the four gzip IDX files.
  // image-folder: folder with train/ and val/ (or test/), one sub-folder per
  // class.
  std::string path = "/usr/share/datasets/fashion-mnist";
  int64_t image_size = 0;  // side of the crops; 0: 28 (fashion-mnist) or 224
  int64_t loader_threads = 1;  // decode/augment threads
  int64_t prefetch = 4;        // batches prepared ahead
  int64_t limit = 0;           // use only the first N train images; 0: all
  // Decode training JPEGs at the smallest DCT scale (n/8 a side) at which
  // both views' random crops still have image_size pixels a side.
  bool scaled_decode = true;
  // Where the colour jitter, grayscale, blur, flip and normalisation of the
  // training views run: on the loader threads (host), batched on the
  // rank's device (device), or auto: device when the rank trains on CUDA.
  std::string augment_on = "auto";  // auto | host | device
  AugmentSpec augment;
};

struct OptimSpec {
  int64_t batch_size = 256;  // global batch (all ranks)
  // Learning rate per 256 images; the rate used is lr * batch_size / 256, as
  // in the reference (0.03 for batch 256).
  double lr = 0.03;
  double momentum = 0.9;
  double weight_decay = 1e-4;
  std::string schedule = "cosine";  // (v) step | cosine | constant
  // Fractions of the run. The run's progress is the largest of step/steps,
  // epoch/epochs and time/time_budget over the bounds that are set.
  double warmup = 0.0;
  std::vector<double> milestones = {0.6, 0.8};  // step schedule
  double gamma = 0.1;                           // step schedule factor
  // Bounds: training ends at the first one reached; 0 means unset. At least
  // one must be set.
  int64_t epochs = 200;
  int64_t steps = 0;
  double time_budget_s = 0;  // training time, evaluation not counted
};

struct EvalSpec {
  int64_t every_epochs = 1;  // kNN monitor every E epochs (0: only at end)
  int64_t knn_k = 200;
  double knn_temperature = 0.1;
  int64_t batch_size = 512;
  int64_t max_train = 0;  // cap on the bank size; 0: whole train set
  int64_t max_test = 0;   // cap on the test set; 0: whole test set
};

struct CheckpointSpec {
  int64_t every_steps = 0;   // 0: only at epoch ends and at the end
  int64_t every_epochs = 1;  // 0: not at epoch ends
  int64_t keep = 3;          // keep the newest N checkpoints
  bool resume = true;        // resume from the newest checkpoint in output_dir
};

struct LoggingSpec {
  int64_t every_steps = 20;  // metrics.jsonl and progress line cadence
};

struct ResourcesSpec {
  int64_t threads = 0;  // intra-op threads; 0: the rank's CPUs
  int64_t nproc = 1;    // ranks (distributed training, later)
  // auto: NCCL on CUDA, Gloo on the CPU.
  std::string backend = "auto";  // auto | gloo | nccl
  // auto: cuda when a GPU is visible to the rank (the coordinator resolves
  // it at submission: cuda when it offers GPUs). Each rank owns one GPU.
  std::string device = "auto";  // auto | cpu | cuda
  // bf16: autocast of convolutions and matrix products to bfloat16;
  // normalisation, logits, loss, queue and optimiser stay float32.
  std::string precision = "fp32";  // fp32 | bf16
  // auto: the ranks on one machine split its CPUs (this process's affinity
  // mask) and each binds its threads to its share (CPU training with more
  // than one local rank); none: the scheduler places them.
  std::string cpu_affinity = "auto";  // auto | none
  double timeout_s = 300;             // collective and store timeout
};

// How the coordinator schedules the job (ignored by a worker run alone).
struct SchedulingSpec {
  // Higher runs first; equal priorities run in submission order.
  int64_t priority = 0;
  // Gang relaunches after a rank fails before the job fails.
  int64_t max_restarts = 3;
  // Wait before the first relaunch; doubles with each, up to 60 s.
  double restart_backoff_s = 1;
  // A rank that reported before and then sends nothing, or stays at one
  // step, for this long is hung: the gang is restarted. 0: no detection.
  double hang_timeout_s = 300;
  // A rank whose compute time per step (without communication) stays above
  // this multiple of the other ranks' median for 3 reports is reported as a
  // straggler (an event and a metric). 0: no check.
  double straggler_factor = 2;
};

// What a rank does when training goes wrong.
struct FaultsSpec {
  // A step whose averaged gradients are not finite (a NaN or infinite loss
  // on any rank): "rollback" to the newest checkpoint with the learning rate
  // scaled by rollback_lr_factor, or "fail".
  std::string on_nonfinite = "rollback";
  // Feature collapse: the group's mean per-dimension standard deviation of
  // the normalised query features, times sqrt(moco.dim) (about 1 while the
  // features spread over the sphere), below collapse_std_ratio at
  // collapse_patience logging steps in a row. 0 turns the check off.
  std::string on_collapse = "rollback";  // rollback | fail
  double collapse_std_ratio = 0.05;
  int64_t collapse_patience = 3;
  double rollback_lr_factor = 0.5;
  int64_t max_rollbacks = 3;
};

struct JobSpec {
  std::string name = "momentum-job";
  uint64_t seed = 0;
  std::string output_dir = "runs/momentum-job";
  ModelSpec model;
  MocoSpec moco;
  DataSpec data;
  OptimSpec optim;
  EvalSpec eval;
  CheckpointSpec checkpoint;
  LoggingSpec logging;
  ResourcesSpec resources;
  SchedulingSpec scheduling;
  FaultsSpec faults;
};

// Parses and validates YAML text. `overrides` are "dotted.key=value" strings
// applied on top of the YAML (value in YAML syntax, e.g.
// "optim.milestones=[0.5]"). `source` names the text in error messages (a file
// name): every error is INVALID_ARGUMENT, its message the source, ": " and the
// problem; several problems of one kind are joined by "; ".
absl::StatusOr<JobSpec> ParseJobSpec(const std::string& yaml_text,
                                     const std::vector<std::string>& overrides,
                                     const std::string& source = "<spec>");

// Reads the file and calls ParseJobSpec. NOT_FOUND names the file.
absl::StatusOr<JobSpec> LoadJobSpecFile(
    const std::string& path, const std::vector<std::string>& overrides = {});

// Serialises every field (defaults included) to YAML that ParseJobSpec reads
// back into an equal spec.
std::string JobSpecToYaml(const JobSpec& spec);

// Checks every field's rule and then the rules across fields
// (docs/job-spec.md); ParseJobSpec calls it. INVALID_ARGUMENT names the field
// and the rule, without a source prefix.
absl::Status ValidateJobSpec(const JobSpec& spec);

}  // namespace momentum

#endif  // MOMENTUM_COMMON_JOB_SPEC_H_
