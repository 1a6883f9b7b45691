// MoCo's augmentation in plain C++ (no LibTorch): random resized crop, colour
// jitter, grayscale, Gaussian blur, horizontal flip and normalisation, written
// as CHW floats. Every random choice comes from a seed, so a view is a pure
// function of (job seed, epoch, index, view).
//
// Usage:
//   ViewFormat format = ResolveViewFormat(spec.data, *train, /*channels=*/1);
//   std::vector<float> view(format.channels * format.size * format.size);
//   AugmentView(image, spec.data.augment, format,
//               ViewSeed(spec.seed, epoch, index, /*view=*/0), view.data());
//
// Thread-safe: the functions keep their scratch buffers thread_local.
#ifndef MOMENTUM_WORKER_AUGMENT_H_
#define MOMENTUM_WORKER_AUGMENT_H_

#include <cstdint>
#include <vector>

#include "common/job_spec.h"
#include "worker/dataset.h"

namespace momentum::worker {

// Output geometry and normalisation of a view.
struct ViewFormat {
  int64_t channels = 3;  // 1: converted to gray; 3: gray replicated
  int64_t size = 28;     // square side
  // One per output channel, or one for all; empty means mean 0 / std 1.
  std::vector<float> mean;
  std::vector<float> std;
};

// The format of `data`'s views with `channels` output channels: side
// data.image_size (0: the dataset's natural size, or 224 when it has none)
// and data.augment.mean/std (empty: the dataset's defaults). Three-channel
// statistics are folded to one with the luminance weights, one-channel
// statistics are replicated.
ViewFormat ResolveViewFormat(const DataSpec& data, const Dataset& dataset,
                             int64_t channels);

// SplitMix64's output function: a bijective 64-bit mix.
uint64_t Mix64(uint64_t x);

// Seed of view `view` (0 query, 1 key) of image `index` in `epoch`.
uint64_t ViewSeed(uint64_t job_seed, int64_t epoch, int64_t index, int view);

// xoshiro256** seeded through SplitMix64: small, fast and identical on every
// platform (the standard library's distributions are not). Not thread-safe;
// make one per stream.
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t Next();
  // Uniform in [0, 1) with 53 random bits.
  double Uniform();
  // Uniform in [lo, hi).
  double Uniform(double lo, double hi);
  // Uniform integer in [0, n), n > 0, without modulo bias (Lemire).
  uint64_t Below(uint64_t n);

 private:
  uint64_t s_[4];
};

// A crop of an image: rows [top, top + height), columns [left, left + width).
struct CropBox {
  int64_t top = 0;
  int64_t left = 0;
  int64_t height = 0;
  int64_t width = 0;
};

// torchvision's RandomResizedCrop.get_params for an image of height x width,
// scale [spec.crop_min_scale, spec.crop_max_scale] and ratio [3/4, 4/3]: ten
// tries, then the centre crop. `seed` is a view seed; AugmentView uses the box
// this returns for the same seed.
CropBox SampleCropBox(int64_t height, int64_t width, const AugmentSpec& spec,
                      uint64_t seed);

// Writes one augmented view of `image` into `out` (channels*size*size floats).
void AugmentView(const Image& image, const AugmentSpec& spec,
                 const ViewFormat& format, uint64_t seed, float* out);

// The un-augmented view used for evaluation: resize the shorter side to
// format.size (only when it differs) and centre-crop, then normalise.
void EvalView(const Image& image, const ViewFormat& format, float* out);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_AUGMENT_H_
