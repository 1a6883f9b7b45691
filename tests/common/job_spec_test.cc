#include "common/job_spec.h"

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "yaml-cpp/yaml.h"

namespace momentum {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// The message of a parse that must fail with INVALID_ARGUMENT.
std::string ParseError(const std::string& yaml,
                       const std::vector<std::string>& overrides = {}) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec(yaml, overrides, "job.yaml");
  EXPECT_FALSE(spec.ok()) << "parsed:\n" << yaml;
  if (spec.ok()) return "";
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(spec.status().message());
}

JobSpec ParseOk(const std::string& yaml,
                const std::vector<std::string>& overrides = {}) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec(yaml, overrides, "job.yaml");
  EXPECT_TRUE(spec.ok()) << spec.status();
  return spec.ok() ? *spec : JobSpec();
}

// Field by field, written out here rather than derived from the library, so
// that a field JobSpecToYaml forgets shows up as a difference.
void ExpectSameSpec(const JobSpec& a, const JobSpec& b) {
  EXPECT_EQ(a.name, b.name);
  EXPECT_EQ(a.seed, b.seed);
  EXPECT_EQ(a.output_dir, b.output_dir);
  EXPECT_EQ(a.model.arch, b.model.arch);
  EXPECT_EQ(a.model.width, b.model.width);
  EXPECT_EQ(a.model.in_channels, b.model.in_channels);
  EXPECT_EQ(a.model.small_stem, b.model.small_stem);
  EXPECT_EQ(a.moco.version, b.moco.version);
  EXPECT_EQ(a.moco.dim, b.moco.dim);
  EXPECT_EQ(a.moco.queue_size, b.moco.queue_size);
  EXPECT_EQ(a.moco.momentum, b.moco.momentum);
  EXPECT_EQ(a.moco.temperature, b.moco.temperature);
  EXPECT_EQ(a.moco.mlp, b.moco.mlp);
  EXPECT_EQ(a.moco.bn, b.moco.bn);
  EXPECT_EQ(a.moco.bn_groups, b.moco.bn_groups);
  EXPECT_EQ(a.data.format, b.data.format);
  EXPECT_EQ(a.data.path, b.data.path);
  EXPECT_EQ(a.data.image_size, b.data.image_size);
  EXPECT_EQ(a.data.loader_threads, b.data.loader_threads);
  EXPECT_EQ(a.data.prefetch, b.data.prefetch);
  EXPECT_EQ(a.data.limit, b.data.limit);
  EXPECT_EQ(a.data.scaled_decode, b.data.scaled_decode);
  EXPECT_EQ(a.data.augment_on, b.data.augment_on);
  const AugmentSpec& x = a.data.augment;
  const AugmentSpec& y = b.data.augment;
  EXPECT_EQ(x.crop_min_scale, y.crop_min_scale);
  EXPECT_EQ(x.crop_max_scale, y.crop_max_scale);
  EXPECT_EQ(x.jitter_brightness, y.jitter_brightness);
  EXPECT_EQ(x.jitter_contrast, y.jitter_contrast);
  EXPECT_EQ(x.jitter_saturation, y.jitter_saturation);
  EXPECT_EQ(x.jitter_hue, y.jitter_hue);
  EXPECT_EQ(x.jitter_prob, y.jitter_prob);
  EXPECT_EQ(x.grayscale_prob, y.grayscale_prob);
  EXPECT_EQ(x.blur, y.blur);
  EXPECT_EQ(x.blur_prob, y.blur_prob);
  EXPECT_EQ(x.blur_sigma_min, y.blur_sigma_min);
  EXPECT_EQ(x.blur_sigma_max, y.blur_sigma_max);
  EXPECT_EQ(x.hflip_prob, y.hflip_prob);
  EXPECT_EQ(x.mean, y.mean);
  EXPECT_EQ(x.std, y.std);
  EXPECT_EQ(a.optim.batch_size, b.optim.batch_size);
  EXPECT_EQ(a.optim.lr, b.optim.lr);
  EXPECT_EQ(a.optim.momentum, b.optim.momentum);
  EXPECT_EQ(a.optim.weight_decay, b.optim.weight_decay);
  EXPECT_EQ(a.optim.schedule, b.optim.schedule);
  EXPECT_EQ(a.optim.warmup, b.optim.warmup);
  EXPECT_EQ(a.optim.milestones, b.optim.milestones);
  EXPECT_EQ(a.optim.gamma, b.optim.gamma);
  EXPECT_EQ(a.optim.epochs, b.optim.epochs);
  EXPECT_EQ(a.optim.steps, b.optim.steps);
  EXPECT_EQ(a.optim.time_budget_s, b.optim.time_budget_s);
  EXPECT_EQ(a.eval.every_epochs, b.eval.every_epochs);
  EXPECT_EQ(a.eval.knn_k, b.eval.knn_k);
  EXPECT_EQ(a.eval.knn_temperature, b.eval.knn_temperature);
  EXPECT_EQ(a.eval.batch_size, b.eval.batch_size);
  EXPECT_EQ(a.eval.max_train, b.eval.max_train);
  EXPECT_EQ(a.eval.max_test, b.eval.max_test);
  EXPECT_EQ(a.checkpoint.every_steps, b.checkpoint.every_steps);
  EXPECT_EQ(a.checkpoint.every_epochs, b.checkpoint.every_epochs);
  EXPECT_EQ(a.checkpoint.keep, b.checkpoint.keep);
  EXPECT_EQ(a.checkpoint.resume, b.checkpoint.resume);
  EXPECT_EQ(a.logging.every_steps, b.logging.every_steps);
  EXPECT_EQ(a.resources.threads, b.resources.threads);
  EXPECT_EQ(a.resources.nproc, b.resources.nproc);
  EXPECT_EQ(a.resources.backend, b.resources.backend);
  EXPECT_EQ(a.resources.device, b.resources.device);
  EXPECT_EQ(a.resources.precision, b.resources.precision);
  EXPECT_EQ(a.resources.timeout_s, b.resources.timeout_s);
}

// A valid spec in which every field differs from the value it would take if
// JobSpecToYaml left it out (for the (v) fields: the v1 default), with
// doubles that need all 17 digits to round-trip.
JobSpec NonDefaultSpec() {
  JobSpec spec;
  spec.name = "fmnist_r18.v1-test";
  spec.seed = 18446744073709551615ull;
  spec.output_dir = "/tmp/momentum runs/a: b";
  spec.model.arch = "resnet50";
  spec.model.width = 32;
  spec.model.in_channels = 1;
  spec.model.small_stem = true;
  spec.moco.version = "v1";
  spec.moco.dim = 64;
  spec.moco.queue_size = 1000;
  spec.moco.momentum = 0.99;
  spec.moco.temperature = 0.1 + 0.2;  // 0.30000000000000004
  spec.moco.mlp = true;
  spec.moco.bn = "split";
  spec.moco.bn_groups = 4;
  spec.data.format = "image-folder";
  spec.data.path = "null";
  spec.data.image_size = 32;
  spec.data.loader_threads = 3;
  spec.data.prefetch = 2;
  spec.data.limit = 5000;
  spec.data.scaled_decode = false;
  spec.data.augment_on = "device";
  AugmentSpec& augment = spec.data.augment;
  augment.crop_min_scale = 0.08;
  augment.crop_max_scale = 0.9;
  augment.jitter_brightness = 0.5;
  augment.jitter_contrast = 0.6;
  augment.jitter_saturation = 0.7;
  augment.jitter_hue = 0.05;
  augment.jitter_prob = 0.7;
  augment.grayscale_prob = 0.25;
  augment.blur = true;
  augment.blur_prob = 0.4;
  augment.blur_sigma_min = 0.2;
  augment.blur_sigma_max = 1.5;
  augment.hflip_prob = 0.0;
  augment.mean = {-0.5, 1.0 / 3.0, 1e-300};
  augment.std = {0.25};
  spec.optim.batch_size = 128;
  spec.optim.lr = 0.06;
  spec.optim.momentum = 0.95;
  spec.optim.weight_decay = 5e-4;
  spec.optim.schedule = "cosine";
  spec.optim.warmup = 0.05;
  spec.optim.milestones = {0.1, 2.0 / 3.0, 0.9};
  spec.optim.gamma = 0.5;
  spec.optim.epochs = 0;
  spec.optim.steps = 1000;
  spec.optim.time_budget_s = 3600.5;
  spec.eval.every_epochs = 5;
  spec.eval.knn_k = 20;
  spec.eval.knn_temperature = 0.07;
  spec.eval.batch_size = 256;
  spec.eval.max_train = 10000;
  spec.eval.max_test = 2000;
  spec.checkpoint.every_steps = 100;
  spec.checkpoint.every_epochs = 2;
  spec.checkpoint.keep = 1;
  spec.checkpoint.resume = false;
  spec.logging.every_steps = 1;
  spec.resources.threads = 8;
  spec.resources.nproc = 2;
  spec.resources.backend = "nccl";
  spec.resources.device = "cuda";
  spec.resources.precision = "bf16";
  spec.resources.timeout_s = 60;
  return spec;
}

std::string SourceDir() {
  const char* dir = std::getenv("MOMENTUM_SOURCE_DIR");
  return dir == nullptr ? "" : dir;
}

// Dotted paths of the leaves of a YAML map.
void CollectPaths(const YAML::Node& map, const std::string& prefix,
                  std::vector<std::string>* paths) {
  for (const auto& entry : map) {
    const std::string path = prefix + entry.first.Scalar();
    if (entry.second.IsMap()) {
      CollectPaths(entry.second, path + ".", paths);
    } else {
      paths->push_back(path);
    }
  }
}

TEST(JobSpecTest, EmptyDocumentGivesDefaults) {
  for (const std::string yaml : {"", "{}", "# only a comment\n", "moco:\n"}) {
    const JobSpec spec = ParseOk(yaml);
    EXPECT_EQ(spec.name, "momentum-job");
    EXPECT_EQ(spec.seed, 0u);
    EXPECT_EQ(spec.output_dir, "runs/momentum-job");
    EXPECT_EQ(spec.model.arch, "resnet18");
    EXPECT_EQ(spec.moco.version, "v2");
    EXPECT_EQ(spec.moco.queue_size, 65536);
    EXPECT_EQ(spec.moco.momentum, 0.999);
    EXPECT_EQ(spec.data.format, "fashion-mnist");
    EXPECT_EQ(spec.data.path, "/usr/share/datasets/fashion-mnist");
    EXPECT_EQ(spec.data.augment.crop_min_scale, 0.2);
    EXPECT_TRUE(spec.data.augment.mean.empty());
    EXPECT_EQ(spec.optim.batch_size, 256);
    EXPECT_EQ(spec.optim.lr, 0.03);
    EXPECT_EQ(spec.optim.weight_decay, 1e-4);
    EXPECT_THAT(spec.optim.milestones, ElementsAre(0.6, 0.8));
    EXPECT_EQ(spec.optim.epochs, 200);
    EXPECT_EQ(spec.eval.knn_k, 200);
    EXPECT_EQ(spec.resources.timeout_s, 300);
    ExpectSameSpec(spec, JobSpec());
  }
}

TEST(JobSpecTest, V2DefaultsAreTheV2Paper) {
  const JobSpec spec = ParseOk("moco:\n  version: v2\n");
  EXPECT_EQ(spec.moco.temperature, 0.2);
  EXPECT_TRUE(spec.moco.mlp);
  EXPECT_TRUE(spec.data.augment.blur);
  EXPECT_EQ(spec.optim.schedule, "cosine");
}

TEST(JobSpecTest, V1DefaultsAreTheV1Paper) {
  const JobSpec spec = ParseOk("moco:\n  version: v1\n");
  EXPECT_EQ(spec.moco.temperature, 0.07);
  EXPECT_FALSE(spec.moco.mlp);
  EXPECT_FALSE(spec.data.augment.blur);
  EXPECT_EQ(spec.optim.schedule, "step");
  // Fields without a version default keep theirs.
  EXPECT_EQ(spec.moco.momentum, 0.999);
  EXPECT_EQ(spec.data.augment.jitter_prob, 0.8);
}

TEST(JobSpecTest, ExplicitValuesWinOverVersionDefaults) {
  const JobSpec v1 = ParseOk(
      "moco: {version: v1, temperature: 0.2, mlp: true}\n"
      "data: {augment: {blur: true}}\n"
      "optim: {schedule: cosine}\n");
  EXPECT_EQ(v1.moco.temperature, 0.2);
  EXPECT_TRUE(v1.moco.mlp);
  EXPECT_TRUE(v1.data.augment.blur);
  EXPECT_EQ(v1.optim.schedule, "cosine");

  const JobSpec v2 = ParseOk(
      "moco: {version: v2, temperature: 0.07, mlp: false}\n"
      "data: {augment: {blur: false}}\n"
      "optim: {schedule: constant}\n");
  EXPECT_EQ(v2.moco.temperature, 0.07);
  EXPECT_FALSE(v2.moco.mlp);
  EXPECT_FALSE(v2.data.augment.blur);
  EXPECT_EQ(v2.optim.schedule, "constant");

  // One explicit field leaves the other (v) fields at the version's default.
  const JobSpec mixed = ParseOk("moco: {version: v1, mlp: true}\n");
  EXPECT_TRUE(mixed.moco.mlp);
  EXPECT_EQ(mixed.moco.temperature, 0.07);
  EXPECT_EQ(mixed.optim.schedule, "step");
}

TEST(JobSpecTest, RejectsUnknownFieldNamingItsPath) {
  EXPECT_EQ(ParseError("moco:\n  temprature: 0.1\n"),
            "job.yaml: unknown field moco.temprature "
            "(did you mean moco.temperature?)");
  EXPECT_EQ(ParseError("data:\n  augment:\n    blurr: true\n"),
            "job.yaml: unknown field data.augment.blurr "
            "(did you mean data.augment.blur?)");
  EXPECT_EQ(ParseError("optimizer: {lr: 0.1}\n"),
            "job.yaml: unknown field optimizer (did you mean optim?)");
  EXPECT_EQ(ParseError("moco: {temp: 0.1}\n"),
            "job.yaml: unknown field moco.temp "
            "(did you mean moco.temperature?)");
  EXPECT_EQ(ParseError("wandb: {}\n"), "job.yaml: unknown field wandb");
  EXPECT_EQ(ParseError("moco.temperature: 0.1\n"),
            "job.yaml: field name \"moco.temperature\" must not contain dots "
            "(nest it under its section)");
}

TEST(JobSpecTest, RejectsDuplicateField) {
  EXPECT_EQ(ParseError("moco:\n  dim: 64\n  dim: 32\n"),
            "job.yaml: duplicate field moco.dim");
}

TEST(JobSpecTest, RejectsWrongTypeNamingTheExpectedType) {
  EXPECT_EQ(ParseError("optim:\n  batch_size: abc\n"),
            "job.yaml: optim.batch_size must be an integer, got \"abc\"");
  EXPECT_EQ(ParseError("optim:\n  batch_size: 1.5\n"),
            "job.yaml: optim.batch_size must be an integer, got \"1.5\"");
  EXPECT_EQ(ParseError("moco:\n  temperature: [1]\n"),
            "job.yaml: moco.temperature must be a number, got a list");
  EXPECT_EQ(ParseError("moco:\n  temperature: .inf\n"),
            "job.yaml: moco.temperature must be a number, got \".inf\"");
  EXPECT_EQ(
      ParseError("moco:\n  mlp: yes\n"),
      "job.yaml: moco.mlp must be a boolean (true or false), got \"yes\"");
  EXPECT_EQ(ParseError("name: {a: 1}\n"),
            "job.yaml: name must be a string, got a map");
  EXPECT_EQ(ParseError("seed: -1\n"),
            "job.yaml: seed must be an unsigned 64-bit integer, got \"-1\"");
  EXPECT_EQ(ParseError("seed: 18446744073709551616\n"),
            "job.yaml: seed must be an unsigned 64-bit integer, got "
            "\"18446744073709551616\"");
  EXPECT_EQ(ParseError("moco: 3\n"), "job.yaml: moco must be a map, got \"3\"");
  EXPECT_EQ(ParseError("- a\n- b\n"),
            "job.yaml: the job spec must be a map of fields, got a list");
}

TEST(JobSpecTest, CutsLongValuesInMessages) {
  const std::string long_value(100, 'x');
  EXPECT_EQ(ParseError("moco: {dim: " + long_value + "}\n"),
            "job.yaml: moco.dim must be an integer, got \"" +
                std::string(64, 'x') + "\"...");
}

TEST(JobSpecTest, ReportsEveryTypeErrorAtOnce) {
  EXPECT_EQ(ParseError("moco: {dim: x}\noptim: {lr: y}\n"),
            "job.yaml: moco.dim must be an integer, got \"x\"; "
            "optim.lr must be a number, got \"y\"");
}

TEST(JobSpecTest, AcceptsLargestSeed) {
  EXPECT_EQ(ParseOk("seed: 18446744073709551615\n").seed,
            18446744073709551615ull);
}

TEST(JobSpecTest, RejectsOutOfRangeNumber) {
  EXPECT_EQ(ParseError("moco:\n  temperature: -1\n"),
            "job.yaml: moco.temperature must be > 0, got -1");
  EXPECT_EQ(ParseError("optim: {batch_size: 0}\n"),
            "job.yaml: optim.batch_size must be in [1, 16777216], got 0");
  // Sizes past any cluster: 2^62 would become 0 in the API's int32.
  EXPECT_EQ(ParseError("optim: {batch_size: 4611686018427387904}\n"
                       "resources: {nproc: 4611686018427387904}\n"),
            "job.yaml: optim.batch_size must be in [1, 16777216], got "
            "4611686018427387904; resources.nproc must be in [1, 65536], got "
            "4611686018427387904");
  EXPECT_EQ(ParseError("optim: {batch_size: 65537}\n"
                       "resources: {nproc: 65537}\n"),
            "job.yaml: resources.nproc must be in [1, 65536], got 65537");
  EXPECT_EQ(ParseError("optim: {momentum: 1}\n"),
            "job.yaml: optim.momentum must be in [0, 1), got 1");
  EXPECT_EQ(ParseError("moco: {momentum: 1.5}\n"),
            "job.yaml: moco.momentum must be in [0, 1], got 1.5");
  EXPECT_EQ(ParseError("data: {augment: {jitter_hue: 0.6}}\n"),
            "job.yaml: data.augment.jitter_hue must be in [0, 0.5], got 0.6");
  EXPECT_EQ(ParseError("optim: {gamma: 0}\n"),
            "job.yaml: optim.gamma must be in (0, 1], got 0");
  EXPECT_EQ(ParseError("data: {augment: {crop_min_scale: 0.9, "
                       "crop_max_scale: 0.5}}\n"),
            "job.yaml: data.augment.crop_min_scale must be <= "
            "data.augment.crop_max_scale, got 0.9 and 0.5");
  EXPECT_EQ(ParseError("name: a b\n"),
            "job.yaml: name must match [A-Za-z0-9._-]+, got \"a b\"");
  EXPECT_EQ(ParseError("output_dir: \"\"\n"),
            "job.yaml: output_dir must not be empty");
}

// Every numeric field has an upper bound (past any real run), so that no
// value overflows what is made of it: one past each bound, and each bound
// itself accepted. The bounds are written out here, not read from the code.
TEST(JobSpecTest, RejectsEveryNumberPastItsUpperBound) {
  struct Case {
    std::string yaml;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"model: {width: 4097}", "model.width must be in [1, 4096], got 4097"},
      {"moco: {dim: 65537}", "moco.dim must be in [1, 65536], got 65537"},
      {"moco: {queue_size: 16777217}",
       "moco.queue_size must be in [1, 16777216], got 16777217"},
      {"moco: {temperature: 100.5}",
       "moco.temperature must be <= 100, got 100.5"},
      {"moco: {bn_groups: 16777217}",
       "moco.bn_groups must be in [1, 16777216], got 16777217"},
      {"data: {image_size: 4097}",
       "data.image_size must be in [0, 4096], got 4097"},
      {"data: {loader_threads: 1025}",
       "data.loader_threads must be in [1, 1024], got 1025"},
      {"data: {prefetch: 1025}",
       "data.prefetch must be in [1, 1024], got 1025"},
      {"data: {limit: 2147483648}",
       "data.limit must be in [0, 2147483647], got 2147483648"},
      {"data: {augment: {jitter_brightness: 101}}",
       "data.augment.jitter_brightness must be <= 100, got 101"},
      {"data: {augment: {jitter_contrast: 101}}",
       "data.augment.jitter_contrast must be <= 100, got 101"},
      {"data: {augment: {jitter_saturation: 101}}",
       "data.augment.jitter_saturation must be <= 100, got 101"},
      {"data: {augment: {blur_sigma_min: 1, blur_sigma_max: 101}}",
       "data.augment.blur_sigma_max must be <= 100, got 101"},
      {"data: {augment: {mean: [1001]}}",
       "data.augment.mean[0] must be in [-1000, 1000], got 1001"},
      {"data: {augment: {std: [1, 1, 1e9]}}",
       "data.augment.std[2] must be <= 1000, got 1000000000"},
      {"optim: {lr: 101}", "optim.lr must be <= 100, got 101"},
      {"optim: {weight_decay: 2}", "optim.weight_decay must be <= 1, got 2"},
      {"optim: {epochs: 1000001}",
       "optim.epochs must be in [0, 1000000], got 1000001"},
      {"optim: {steps: 1073741825}",
       "optim.steps must be in [0, 1073741824], got 1073741825"},
      {"optim: {time_budget_s: 1e9}",
       "optim.time_budget_s must be <= 100000000, got 1000000000"},
      {"eval: {every_epochs: 1000001}",
       "eval.every_epochs must be in [0, 1000000], got 1000001"},
      {"eval: {knn_k: 16777217}",
       "eval.knn_k must be in [1, 16777216], got 16777217"},
      {"eval: {knn_temperature: 1000}",
       "eval.knn_temperature must be <= 100, got 1000"},
      {"eval: {batch_size: 16777217}",
       "eval.batch_size must be in [1, 16777216], got 16777217"},
      {"eval: {max_train: 2147483648}",
       "eval.max_train must be in [0, 2147483647], got 2147483648"},
      {"eval: {max_test: 2147483648}",
       "eval.max_test must be in [0, 2147483647], got 2147483648"},
      {"checkpoint: {every_steps: 1073741825}",
       "checkpoint.every_steps must be in [0, 1073741824], got 1073741825"},
      {"checkpoint: {every_epochs: 1000001}",
       "checkpoint.every_epochs must be in [0, 1000000], got 1000001"},
      {"checkpoint: {keep: 1001}",
       "checkpoint.keep must be in [1, 1000], got 1001"},
      {"logging: {every_steps: 1073741825}",
       "logging.every_steps must be in [1, 1073741824], got 1073741825"},
      {"resources: {threads: 1025}",
       "resources.threads must be in [0, 1024], got 1025"},
      {"resources: {timeout_s: 604801}",
       "resources.timeout_s must be <= 604800, got 604801"},
      {"scheduling: {priority: 1001}",
       "scheduling.priority must be in [-1000, 1000], got 1001"},
      {"scheduling: {max_restarts: 2147483648}",
       "scheduling.max_restarts must be in [0, 1000], got 2147483648"},
      {"scheduling: {restart_backoff_s: 3601}",
       "scheduling.restart_backoff_s must be in [0, 3600], got 3601"},
      {"scheduling: {hang_timeout_s: 604801}",
       "scheduling.hang_timeout_s must be <= 604800, got 604801"},
      {"scheduling: {straggler_factor: 1001}",
       "scheduling.straggler_factor must be <= 1000, got 1001"},
      {"faults: {collapse_patience: 1073741825}",
       "faults.collapse_patience must be in [1, 1073741824], got 1073741825"},
      {"faults: {max_rollbacks: 1001}",
       "faults.max_rollbacks must be in [0, 1000], got 1001"},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(ParseError(c.yaml + "\n"), "job.yaml: " + c.message) << c.yaml;
  }

  const JobSpec largest = ParseOk(
      "model: {width: 4096}\nmoco: {dim: 65536, queue_size: 16777216, "
      "temperature: 100}\noptim: {epochs: 1000000, steps: 1073741824, "
      "lr: 100, weight_decay: 1, time_budget_s: 100000000}\n"
      "scheduling: {max_restarts: 1000, hang_timeout_s: 604800}\n"
      "resources: {timeout_s: 604800}\n");
  EXPECT_EQ(largest.optim.steps, 1073741824);
  EXPECT_EQ(largest.scheduling.max_restarts, 1000);
}

TEST(JobSpecTest, RejectsLongNamesPathsAndListsNamingTheLimit) {
  EXPECT_EQ(ParseError("name: " + std::string(129, 'a') + "\n"),
            "job.yaml: name must have at most 128 characters, got 129");
  EXPECT_EQ(ParseOk("name: " + std::string(128, 'a') + "\n").name.size(), 128u);
  // A name is a path component and a column of `momentum list`: no
  // control characters, no separators.
  EXPECT_EQ(ParseError("name: \"a\\e[2Jb\"\n"),
            "job.yaml: name must match [A-Za-z0-9._-]+, got \"a\\x1b[2Jb\"");
  EXPECT_EQ(ParseError("output_dir: /" + std::string(4096, 'o') + "\n"),
            "job.yaml: output_dir must have at most 4096 bytes, got 4097");
  EXPECT_EQ(ParseError("data: {path: /" + std::string(4096, 'd') + "}\n"),
            "job.yaml: data.path must have at most 4096 bytes, got 4097");
  // Found by fuzzing the confinement: a NUL ends the path the worker
  // opens ("/data/..\0x" opens "/data/..") while the whole string looks
  // like a folder under /data.
  EXPECT_EQ(ParseError("data: {path: \"/data/..\\0x\"}\n"),
            "job.yaml: data.path must not contain control characters, got "
            "byte 0 at offset 8");
  EXPECT_EQ(ParseError("output_dir: \"runs/a\\nb\"\n"),
            "job.yaml: output_dir must not contain control characters, got "
            "byte 10 at offset 6");
  std::string milestones = "optim: {milestones: [";
  for (int i = 1; i <= 65; ++i) {
    absl::StrAppend(&milestones, i > 1 ? ", " : "", i / 100.0);
  }
  EXPECT_EQ(ParseError(milestones + "]}\n"),
            "job.yaml: optim.milestones must have at most 64 values, got 65");
}

TEST(JobSpecTest, RejectsBadEnum) {
  EXPECT_EQ(ParseError("moco:\n  bn: sync\n"),
            "job.yaml: moco.bn must be one of auto, split, shuffle, none, "
            "got \"sync\"");
  EXPECT_EQ(ParseError("moco:\n  version: v3\n"),
            "job.yaml: moco.version must be one of v1, v2, got \"v3\"");
  EXPECT_EQ(ParseError("model:\n  in_channels: 2\n"),
            "job.yaml: model.in_channels must be one of 1, 3, got 2");
}

TEST(JobSpecTest, RejectsBadList) {
  EXPECT_EQ(ParseError("optim:\n  milestones: [0.8, 0.6]\n"),
            "job.yaml: optim.milestones must be strictly increasing, "
            "got [0.8, 0.6]");
  EXPECT_EQ(ParseError("optim:\n  milestones: [0.5, 1]\n"),
            "job.yaml: optim.milestones[1] must be in (0, 1), got 1");
  EXPECT_EQ(ParseError("optim:\n  milestones: [0.5, x]\n"),
            "job.yaml: optim.milestones[1] must be a number, got \"x\"");
  EXPECT_EQ(
      ParseError("optim:\n  milestones: 0.5\n"),
      "job.yaml: optim.milestones must be a list of numbers, got \"0.5\"");
  EXPECT_EQ(ParseError("data: {augment: {mean: [0.5, 0.5]}}\n"),
            "job.yaml: data.augment.mean must have 0, 1 or 3 values, got 2");
  EXPECT_EQ(ParseError("data: {augment: {std: [0.2, 0, 0.2]}}\n"),
            "job.yaml: data.augment.std[1] must be > 0, got 0");
}

TEST(JobSpecTest, RejectsCrossFieldViolationsNamingBothFields) {
  EXPECT_EQ(ParseError("moco: {bn: split, bn_groups: 3}\n"),
            "job.yaml: moco.bn_groups must divide the per-rank batch "
            "optim.batch_size / resources.nproc for split BN, got 3 and "
            "256 / 1");
  // 96 / 2 = 48 is not a multiple of 5.
  EXPECT_EQ(ParseError("moco: {bn: split, bn_groups: 5}\n"
                       "optim: {batch_size: 96}\n"
                       "resources: {nproc: 2}\n"),
            "job.yaml: moco.bn_groups must divide the per-rank batch "
            "optim.batch_size / resources.nproc for split BN, got 5 and "
            "96 / 2");
  EXPECT_EQ(ParseError("optim: {batch_size: 250}\nresources: {nproc: 4}\n"),
            "job.yaml: optim.batch_size must be divisible by "
            "resources.nproc, got 250 and 4");
  EXPECT_EQ(ParseError("resources: {backend: nccl, device: cpu}\n"),
            "job.yaml: resources.backend nccl requires resources.device "
            "cuda or auto, got \"cpu\"");
  EXPECT_EQ(ParseOk("resources: {backend: nccl}\n").resources.device, "auto");
  // Shuffled BN across ranks does not split the per-rank batch.
  EXPECT_EQ(ParseOk("moco: {bn: shuffle, bn_groups: 3}\n").moco.bn_groups, 3);
}

TEST(JobSpecTest, RejectsSpecWithoutTrainingBound) {
  EXPECT_EQ(
      ParseError("optim:\n  epochs: 0\n"),
      "job.yaml: optim: set at least one of epochs, steps, time_budget_s");
  EXPECT_EQ(
      ParseOk("optim: {epochs: 0, time_budget_s: 30}\n").optim.time_budget_s,
      30);
}

TEST(JobSpecTest, OverridesApplyOnTopOfTheFile) {
  const JobSpec spec =
      ParseOk("moco:\n  temperature: 0.1\n", {"moco.temperature=0.5"});
  EXPECT_EQ(spec.moco.temperature, 0.5);

  const JobSpec more =
      ParseOk("name: from-file\n",
              {"optim.milestones=[0.5,0.75]", "name=foo", "moco.version = v1",
               "data.augment.mean=[0.1, 0.2, 0.3]", "seed=7"});
  EXPECT_THAT(more.optim.milestones, ElementsAre(0.5, 0.75));
  EXPECT_EQ(more.name, "foo");
  EXPECT_EQ(more.seed, 7u);
  EXPECT_THAT(more.data.augment.mean, ElementsAre(0.1, 0.2, 0.3));
  // An override counts as explicit; the version default fills the rest.
  EXPECT_EQ(more.moco.version, "v1");
  EXPECT_EQ(more.moco.temperature, 0.07);
  EXPECT_EQ(more.optim.schedule, "step");
}

TEST(JobSpecTest, OverridesCreateMissingSections) {
  const JobSpec spec =
      ParseOk("", {"data.augment.blur=false", "eval.knn_k=10"});
  EXPECT_FALSE(spec.data.augment.blur);
  EXPECT_EQ(spec.eval.knn_k, 10);
  // A whole section in flow syntax.
  EXPECT_EQ(ParseOk("", {"logging={every_steps: 5}"}).logging.every_steps, 5);
}

TEST(JobSpecTest, RejectsMalformedOverride) {
  EXPECT_EQ(ParseError("", {"moco.temperature"}),
            "job.yaml: override \"moco.temperature\": expected "
            "dotted.path=value");
  EXPECT_EQ(ParseError("", {"=0.5"}),
            "job.yaml: override \"=0.5\": expected dotted.path=value");
  EXPECT_EQ(ParseError("", {"moco.temprature=0.5"}),
            "job.yaml: override \"moco.temprature=0.5\": unknown field "
            "moco.temprature (did you mean moco.temperature?)");
  EXPECT_EQ(ParseError("", {"moco.temperature.x=0.5"}),
            "job.yaml: override \"moco.temperature.x=0.5\": unknown field "
            "moco.temperature.x");
  EXPECT_THAT(ParseError("", {"optim.milestones=[0.5"}),
              HasSubstr("job.yaml: override \"optim.milestones=[0.5\": "
                        "invalid YAML value: "));
  // The value is checked like one from the file.
  EXPECT_EQ(ParseError("", {"optim.batch_size=abc"}),
            "job.yaml: optim.batch_size must be an integer, got \"abc\"");
}

TEST(JobSpecTest, RejectsYamlSyntaxErrorNamingTheLine) {
  EXPECT_THAT(ParseError("name: a\nmoco:\n  dim: [1, 2\n"),
              HasSubstr("job.yaml: YAML syntax error at line "));
  EXPECT_THAT(ParseError("name: a\n  bad: indent\n"),
              HasSubstr("job.yaml: YAML syntax error at line 2, column "));
  EXPECT_EQ(ParseError("name: a\n---\nname: b\n"),
            "job.yaml: expected one YAML document, got more than one");
}

TEST(JobSpecTest, ToYamlRoundTripsEveryField) {
  const JobSpec original = NonDefaultSpec();
  ASSERT_TRUE(ValidateJobSpec(original).ok()) << ValidateJobSpec(original);
  const std::string yaml = JobSpecToYaml(original);
  absl::StatusOr<JobSpec> parsed = ParseJobSpec(yaml, {});
  ASSERT_TRUE(parsed.ok()) << parsed.status() << "\n" << yaml;
  ExpectSameSpec(*parsed, original);
  // v1 with non-v1 values for the (v) fields: they are written explicitly.
  EXPECT_EQ(parsed->moco.temperature, 0.1 + 0.2);
  EXPECT_EQ(parsed->optim.schedule, "cosine");
}

TEST(JobSpecTest, ToYamlWritesVersionDefaultsExplicitly) {
  const std::string yaml = JobSpecToYaml(ParseOk("moco: {version: v1}\n"));
  const YAML::Node node = YAML::Load(yaml);
  EXPECT_EQ(node["moco"]["temperature"].Scalar(), "0.07");
  EXPECT_EQ(node["moco"]["mlp"].Scalar(), "false");
  EXPECT_EQ(node["data"]["augment"]["blur"].Scalar(), "false");
  EXPECT_EQ(node["optim"]["schedule"].Scalar(), "step");
}

TEST(JobSpecTest, ValidateRejectsNonFiniteNumbers) {
  JobSpec spec;
  spec.optim.lr = std::nan("");
  const absl::Status status = ValidateJobSpec(spec);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "optim.lr must be a finite number, got nan");
}

TEST(JobSpecTest, LoadJobSpecFileNamesMissingFile) {
  const absl::StatusOr<JobSpec> spec =
      LoadJobSpecFile("/nonexistent/momentum/job.yaml");
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(spec.status().message(),
              HasSubstr("/nonexistent/momentum/job.yaml"));
}

TEST(JobSpecTest, LoadJobSpecFilePrefixesErrorsWithThePath) {
  char path[] = "/tmp/job_spec_test_XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  close(fd);
  {
    std::ofstream out(path);
    out << "moco:\n  temperature: -1\n";
  }
  const absl::StatusOr<JobSpec> bad = LoadJobSpecFile(path);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(),
            std::string(path) + ": moco.temperature must be > 0, got -1");
  const absl::StatusOr<JobSpec> fixed =
      LoadJobSpecFile(path, {"moco.temperature=0.3"});
  ASSERT_TRUE(fixed.ok()) << fixed.status();
  EXPECT_EQ(fixed->moco.temperature, 0.3);
  unlink(path);
}

TEST(JobSpecTest, ExampleFashionMnistSpecIsValid) {
  const std::string dir = SourceDir();
  const std::string path = dir + "/examples/fashion-mnist.yaml";
  if (dir.empty() || access(path.c_str(), R_OK) != 0) {
    GTEST_SKIP() << "no " << path << " (set MOMENTUM_SOURCE_DIR)";
  }
  const absl::StatusOr<JobSpec> spec = LoadJobSpecFile(path);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->data.format, "fashion-mnist");
}

TEST(JobSpecTest, DocsListEveryField) {
  const std::string dir = SourceDir();
  if (dir.empty()) {
    GTEST_SKIP() << "no docs/job-spec.md (set MOMENTUM_SOURCE_DIR)";
  }
  const absl::StatusOr<std::string> docs =
      ReadWholeFile(dir + "/docs/job-spec.md");
  if (!docs.ok()) GTEST_SKIP() << docs.status();
  std::vector<std::string> paths;
  CollectPaths(YAML::Load(JobSpecToYaml(JobSpec())), "", &paths);
  EXPECT_EQ(paths.size(), 78u);
  for (const std::string& path : paths) {
    EXPECT_THAT(*docs, HasSubstr("`" + path + "`"));
  }
}

}  // namespace
}  // namespace momentum
