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

// AugmentView with the crop given, in `image`'s pixels; every other random
// choice still comes from `seed`. AugmentView(image, ...) is
// AugmentViewInBox(image, SampleCropBox(image.height, image.width, spec,
// seed), ...).
void AugmentViewInBox(const Image& image, const CropBox& box,
                      const AugmentSpec& spec, const ViewFormat& format,
                      uint64_t seed, float* out);

// The random choices of one view after its crop, drawn from `seed`'s
// streams: colour jitter (whether, the order of its four operations,
// their factors), grayscale, blur and flip. `apply[op]` is false for an
// operation the spec turns off (amount 0) or that needs colour (saturation
// and hue with `channels` 1); gray needs colour too, and blur needs
// spec.blur. AugmentViewInBox applies exactly these; the device path
// (worker/device_augment.h) applies them to batches.
struct PhotometricParams {
  bool jitter = false;
  int order[4] = {0, 1, 2, 3};  // 0 brightness, 1 contrast, 2 saturation, 3 hue
  bool apply[4] = {false, false, false, false};
  float brightness = 1, contrast = 1, saturation = 1, hue = 0;
  bool gray = false;
  bool blur = false;
  float sigma = 0;
  bool flip = false;
};
PhotometricParams DrawPhotometric(const AugmentSpec& spec, uint64_t seed,
                                  int64_t channels);

// The random resized crop of `box` alone, as `channels` planes of
// format.size^2 bytes (a gray image replicated when `channels` is 3): what
// the photometric steps on the device start from. Rounds the float crop
// AugmentViewInBox works on to the nearest of 256 levels.
void CropViewBytes(const Image& image, const CropBox& box,
                   const ViewFormat& format, int64_t channels, uint8_t* out);

// `box`, a crop of an image of full_height x full_width, in the same image
// decoded at height x width (smaller): scaled, rounded to whole pixels and
// kept inside, at least one pixel a side.
CropBox ScaleCropBox(const CropBox& box, int64_t full_height,
                     int64_t full_width, int64_t height, int64_t width);

// The n of the smallest of the scales 1/8, 2/8 and 4/8 (JPEG's fast reduced
// DCTs) at which every one of `count` crops still has at least `size`
// pixels a side, so that resizing it to `size` only shrinks; 8 (the full
// image) when none does.
int DecodeEighths(const CropBox* boxes, int count, int64_t size);

// The un-augmented view used for evaluation: resize the shorter side to
// format.size (only when it differs) and centre-crop, then normalise.
void EvalView(const Image& image, const ViewFormat& format, float* out);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_AUGMENT_H_
