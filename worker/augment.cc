#include "worker/augment.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

namespace momentum::worker {
namespace {

// ITU-R 601-2 luma, as PIL's convert("L") and torchvision's grayscale.
constexpr float kLumaR = 0.299f;
constexpr float kLumaG = 0.587f;
constexpr float kLumaB = 0.114f;

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// Each stage draws from its own generator, so the number of draws one stage
// makes (the crop's tries depend on the image size) never shifts another's.
enum Stream : uint64_t {
  kCropStream = 1,
  kJitterStream = 2,
  kGrayStream = 3,
  kBlurStream = 4,
  kFlipStream = 5,
};

Rng StreamRng(uint64_t seed, Stream stream) {
  return Rng(Mix64(seed ^ Mix64(static_cast<uint64_t>(stream) * kGolden)));
}

// A broken caller contract (bad image geometry, mismatched normalisation)
// cannot be recovered from inside a loader thread: crash loudly.
void Check(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "momentum augment: check failed: %s\n", what);
    std::abort();
  }
}

inline float Clamp01(float v) { return std::min(std::max(v, 0.0f), 1.0f); }

// Separable resampling weights for one axis: output i reads source
// positions [first[i], first[i] + count[i]) with weights
// weights[i * stride ...].
struct AxisWeights {
  std::vector<int32_t> first;
  std::vector<int32_t> count;
  std::vector<float> weights;
  int64_t stride = 0;
};

// Bilinear resampling as PIL (and torchvision with antialias=True) do it: a
// triangle filter whose support widens with the downscale factor, so every
// source pixel contributes (area-like averaging, no aliasing when a large
// crop is shrunk); when upscaling it is plain bilinear with half-pixel
// centres, clamped at the edges. Source [src_start, src_start + src_len) is
// mapped onto dst_len outputs, of which [dst_offset, dst_offset + dst_count)
// are computed. `gain` multiplies every weight (1/255 folds the uint8 scale
// into the first pass).
void ComputeAxisWeights(int64_t src_start, int64_t src_len, int64_t dst_len,
                        int64_t dst_offset, int64_t dst_count, double gain,
                        AxisWeights* axis) {
  const double scale = static_cast<double>(src_len) / dst_len;
  const double filter_scale = std::max(scale, 1.0);
  const double support = filter_scale;  // the triangle's radius is 1
  const double inv_filter_scale = 1.0 / filter_scale;
  axis->stride = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  axis->first.resize(dst_count);
  axis->count.resize(dst_count);
  axis->weights.assign(dst_count * axis->stride, 0.0f);
  for (int64_t i = 0; i < dst_count; ++i) {
    const double center = (dst_offset + i + 0.5) * scale;
    int64_t lo =
        std::max<int64_t>(static_cast<int64_t>(center - support + 0.5), 0);
    int64_t hi = std::min<int64_t>(static_cast<int64_t>(center + support + 0.5),
                                   src_len);
    hi = std::min(hi, lo + axis->stride);
    if (hi <= lo) {  // only for degenerate geometry; read the nearest pixel
      lo = std::min(lo, src_len - 1);
      hi = lo + 1;
    }
    float* w = &axis->weights[i * axis->stride];
    double total = 0.0;
    for (int64_t x = lo; x < hi; ++x) {
      const double d = std::abs((x - center + 0.5) * inv_filter_scale);
      const double v = d < 1.0 ? 1.0 - d : 0.0;
      w[x - lo] = static_cast<float>(v);
      total += v;
    }
    // Zero-weight taps at either end cost time and change nothing.
    int64_t a = 0;
    int64_t b = hi - lo;
    while (b - a > 1 && w[a] == 0.0f) ++a;
    while (b - a > 1 && w[b - 1] == 0.0f) --b;
    for (int64_t k = a; k < b; ++k) {
      w[k - a] = total > 0.0 ? static_cast<float>(w[k] * (gain / total))
                             : static_cast<float>(gain);
    }
    for (int64_t k = b - a; k < axis->stride; ++k) w[k] = 0.0f;
    axis->first[i] = static_cast<int32_t>(src_start + lo + a);
    axis->count[i] = static_cast<int32_t>(b - a);
  }
}

// Per-thread buffers, grown on demand and reused, so a view allocates nothing
// once a thread has warmed up.
struct Scratch {
  AxisWeights rows;
  AxisWeights cols;
  std::vector<float> horizontal;  // [C][rows used][S]
  std::vector<float> work;        // [C][S][S], values in [0, 1]
  std::vector<float> blur_tmp;    // [S][S]
  std::vector<float> padded;      // one padded row
  std::vector<float> kernel;
  std::vector<float> mean;
  std::vector<float> inv_std;
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

void CheckImage(const Image& image) {
  Check(image.height > 0 && image.width > 0, "image has no pixels");
  Check(image.channels == 1 || image.channels == 3,
        "image channels must be 1 or 3");
  Check(static_cast<int64_t>(image.pixels.size()) ==
            image.height * image.width * image.channels,
        "image pixel count does not match its shape");
}

// Resamples rows x cols of `image` (the weights' source ranges) into
// scratch->work as [C][size][size] floats in [0, 1].
void Resample(const Image& image, int64_t size, Scratch* s) {
  const int64_t c_in = image.channels;
  const int64_t width = image.width;
  int64_t row_lo = s->rows.first[0];
  int64_t row_hi = row_lo;
  for (int64_t y = 0; y < size; ++y) {
    row_lo = std::min<int64_t>(row_lo, s->rows.first[y]);
    row_hi = std::max<int64_t>(row_hi, s->rows.first[y] + s->rows.count[y]);
  }
  const int64_t n_rows = row_hi - row_lo;
  s->horizontal.resize(c_in * n_rows * size);
  s->work.resize(c_in * size * size);

  // Horizontal pass: uint8 HWC rows into float [C][row][x].
  const uint8_t* pixels = image.pixels.data();
  for (int64_t r = 0; r < n_rows; ++r) {
    const uint8_t* row = pixels + (row_lo + r) * width * c_in;
    for (int64_t x = 0; x < size; ++x) {
      const int64_t first = s->cols.first[x];
      const int64_t count = s->cols.count[x];
      const float* w = &s->cols.weights[x * s->cols.stride];
      if (c_in == 1) {
        const uint8_t* src = row + first;
        float acc = 0.0f;
        for (int64_t k = 0; k < count; ++k) acc += w[k] * src[k];
        s->horizontal[r * size + x] = acc;
      } else {
        const uint8_t* src = row + first * 3;
        float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f;
        for (int64_t k = 0; k < count; ++k) {
          acc0 += w[k] * src[3 * k];
          acc1 += w[k] * src[3 * k + 1];
          acc2 += w[k] * src[3 * k + 2];
        }
        s->horizontal[(0 * n_rows + r) * size + x] = acc0;
        s->horizontal[(1 * n_rows + r) * size + x] = acc1;
        s->horizontal[(2 * n_rows + r) * size + x] = acc2;
      }
    }
  }

  // Vertical pass: [C][row][x] into [C][y][x].
  for (int64_t c = 0; c < c_in; ++c) {
    const float* plane = &s->horizontal[c * n_rows * size];
    for (int64_t y = 0; y < size; ++y) {
      float* out = &s->work[(c * size + y) * size];
      const int64_t first = s->rows.first[y] - row_lo;
      const int64_t count = s->rows.count[y];
      const float* w = &s->rows.weights[y * s->rows.stride];
      const float* src = plane + first * size;
      for (int64_t x = 0; x < size; ++x) out[x] = w[0] * src[x];
      for (int64_t k = 1; k < count; ++k) {
        const float wk = w[k];
        const float* line = src + k * size;
        for (int64_t x = 0; x < size; ++x) out[x] += wk * line[x];
      }
    }
  }
}

void AdjustBrightness(float factor, int64_t n, float* v) {
  for (int64_t i = 0; i < n; ++i) v[i] = Clamp01(v[i] * factor);
}

// Blends with the mean of the image's grayscale version, as torchvision.
void AdjustContrast(float factor, int64_t channels, int64_t plane, float* v) {
  double sum = 0.0;
  if (channels == 1) {
    for (int64_t i = 0; i < plane; ++i) sum += v[i];
  } else {
    const float* r = v;
    const float* g = v + plane;
    const float* b = v + 2 * plane;
    for (int64_t i = 0; i < plane; ++i) {
      sum += kLumaR * r[i] + kLumaG * g[i] + kLumaB * b[i];
    }
  }
  const float offset = static_cast<float>((1.0 - factor) * sum / plane);
  for (int64_t i = 0; i < channels * plane; ++i) {
    v[i] = Clamp01(factor * v[i] + offset);
  }
}

// Blends each pixel with its own gray value (RGB only).
void AdjustSaturation(float factor, int64_t plane, float* v) {
  float* r = v;
  float* g = v + plane;
  float* b = v + 2 * plane;
  const float keep = 1.0f - factor;
  for (int64_t i = 0; i < plane; ++i) {
    const float gray = keep * (kLumaR * r[i] + kLumaG * g[i] + kLumaB * b[i]);
    r[i] = Clamp01(factor * r[i] + gray);
    g[i] = Clamp01(factor * g[i] + gray);
    b[i] = Clamp01(factor * b[i] + gray);
  }
}

// Rotates the hue by `shift` (a fraction of the circle) in HSV, with
// torchvision's _rgb2hsv / _hsv2rgb formulas (RGB only).
void AdjustHue(float shift, int64_t plane, float* v) {
  float* rp = v;
  float* gp = v + plane;
  float* bp = v + 2 * plane;
  for (int64_t i = 0; i < plane; ++i) {
    const float r = rp[i], g = gp[i], b = bp[i];
    const float maxc = std::max(r, std::max(g, b));
    const float minc = std::min(r, std::min(g, b));
    if (maxc == minc) continue;  // no saturation: hue is irrelevant
    const float cr = maxc - minc;
    const float s = cr / maxc;
    const float rc = (maxc - r) / cr;
    const float gc = (maxc - g) / cr;
    const float bc = (maxc - b) / cr;
    float h;
    if (maxc == r) {
      h = bc - gc;
    } else if (maxc == g) {
      h = 2.0f + rc - bc;
    } else {
      h = 4.0f + gc - rc;
    }
    h = std::fmod(h / 6.0f + 1.0f, 1.0f);
    h = std::fmod(h + shift + 1.0f, 1.0f);
    const float h6 = h * 6.0f;
    const float sector = std::floor(h6);
    const float f = h6 - sector;
    const float val = maxc;
    const float p = Clamp01(val * (1.0f - s));
    const float q = Clamp01(val * (1.0f - s * f));
    const float t = Clamp01(val * (1.0f - s * (1.0f - f)));
    switch (static_cast<int>(sector) % 6) {
      case 0:
        rp[i] = val, gp[i] = t, bp[i] = p;
        break;
      case 1:
        rp[i] = q, gp[i] = val, bp[i] = p;
        break;
      case 2:
        rp[i] = p, gp[i] = val, bp[i] = t;
        break;
      case 3:
        rp[i] = p, gp[i] = q, bp[i] = val;
        break;
      case 4:
        rp[i] = t, gp[i] = p, bp[i] = val;
        break;
      default:
        rp[i] = val, gp[i] = p, bp[i] = q;
        break;
    }
  }
}

// Reflect padding without repeating the edge (numpy/torch "reflect"): index
// -1 reads 1. Valid for -size < i < 2 * size - 1, which the radius clip
// guarantees.
inline int64_t Reflect(int64_t i, int64_t size) {
  if (i < 0) return -i;
  if (i >= size) return 2 * (size - 1) - i;
  return i;
}

// Separable Gaussian blur of each [size][size] plane: kernel radius
// ceil(3 sigma), clipped to size - 1 so one reflection covers the padding.
void GaussianBlur(float sigma, int64_t channels, int64_t size, Scratch* s) {
  const int64_t radius =
      std::min<int64_t>(static_cast<int64_t>(std::ceil(3.0 * sigma)), size - 1);
  if (radius <= 0) return;
  const int64_t taps = 2 * radius + 1;
  s->kernel.resize(taps);
  double total = 0.0;
  for (int64_t k = 0; k < taps; ++k) {
    const double x = static_cast<double>(k - radius) / sigma;
    const double w = std::exp(-0.5 * x * x);
    s->kernel[k] = static_cast<float>(w);
    total += w;
  }
  for (int64_t k = 0; k < taps; ++k) {
    s->kernel[k] = static_cast<float>(s->kernel[k] / total);
  }
  const float* kernel = s->kernel.data();
  s->padded.resize(size + 2 * radius);
  s->blur_tmp.resize(size * size);
  float* padded = s->padded.data();
  float* tmp = s->blur_tmp.data();
  for (int64_t c = 0; c < channels; ++c) {
    float* plane = &s->work[c * size * size];
    // Horizontal: plane -> tmp.
    for (int64_t y = 0; y < size; ++y) {
      const float* row = plane + y * size;
      for (int64_t i = -radius; i < size + radius; ++i) {
        padded[i + radius] = row[Reflect(i, size)];
      }
      float* out = tmp + y * size;
      for (int64_t x = 0; x < size; ++x) {
        const float* src = padded + x;
        float acc = 0.0f;
        for (int64_t k = 0; k < taps; ++k) acc += kernel[k] * src[k];
        out[x] = acc;
      }
    }
    // Vertical: tmp -> plane, whole rows at a time.
    for (int64_t y = 0; y < size; ++y) {
      float* out = plane + y * size;
      const float* src = tmp + Reflect(y - radius, size) * size;
      const float w0 = kernel[0];
      for (int64_t x = 0; x < size; ++x) out[x] = w0 * src[x];
      for (int64_t k = 1; k < taps; ++k) {
        const float wk = kernel[k];
        const float* line = tmp + Reflect(y - radius + k, size) * size;
        for (int64_t x = 0; x < size; ++x) out[x] += wk * line[x];
      }
    }
  }
}

// Per-output-channel normalisation constants of `format`.
void PrepareNormalisation(const ViewFormat& format, Scratch* s) {
  const int64_t c = format.channels;
  Check(format.mean.empty() || format.mean.size() == 1 ||
            static_cast<int64_t>(format.mean.size()) == c,
        "format.mean needs 0, 1 or channels values");
  Check(format.std.empty() || format.std.size() == 1 ||
            static_cast<int64_t>(format.std.size()) == c,
        "format.std needs 0, 1 or channels values");
  s->mean.resize(c);
  s->inv_std.resize(c);
  for (int64_t i = 0; i < c; ++i) {
    const float m = format.mean.empty()
                        ? 0.0f
                        : format.mean[format.mean.size() == 1 ? 0 : i];
    const float sd =
        format.std.empty() ? 1.0f : format.std[format.std.size() == 1 ? 0 : i];
    Check(sd > 0.0f, "format.std must be > 0");
    s->mean[i] = m;
    s->inv_std[i] = 1.0f / sd;
  }
}

// Clamps, converts `c_in` working channels to the format's channels,
// normalises and mirrors (when `flip`) into `out`.
void WriteOutput(const ViewFormat& format, int64_t c_in, bool flip,
                 const Scratch& s, float* out) {
  const int64_t size = format.size;
  const int64_t plane = size * size;
  for (int64_t c = 0; c < format.channels; ++c) {
    const float mean = s.mean[c];
    const float inv_std = s.inv_std[c];
    float* dst = out + c * plane;
    for (int64_t y = 0; y < size; ++y) {
      float* dst_row = dst + y * size;
      const int64_t base = y * size;
      for (int64_t x = 0; x < size; ++x) {
        const int64_t i = base + (flip ? size - 1 - x : x);
        float v;
        if (c_in == format.channels) {
          v = s.work[c * plane + i];
        } else if (c_in == 1) {
          v = s.work[i];
        } else {
          v = kLumaR * s.work[i] + kLumaG * s.work[plane + i] +
              kLumaB * s.work[2 * plane + i];
        }
        dst_row[x] = (Clamp01(v) - mean) * inv_std;
      }
    }
  }
}

// torchvision's ColorJitter._check_input: [max(0, 1 - v), 1 + v].
double JitterFactor(Rng& rng, double amount) {
  return rng.Uniform(std::max(0.0, 1.0 - amount), 1.0 + amount);
}

std::vector<float> FoldStatistics(const std::vector<double>& values,
                                  int64_t channels) {
  std::vector<float> out;
  if (static_cast<int64_t>(values.size()) == channels) {
    for (double v : values) out.push_back(static_cast<float>(v));
  } else if (values.size() == 1) {
    out.assign(channels, static_cast<float>(values[0]));
  } else if (values.size() == 3 && channels == 1) {
    out.push_back(static_cast<float>(kLumaR * values[0] + kLumaG * values[1] +
                                     kLumaB * values[2]));
  } else {
    Check(false, "normalisation needs 1 or channels values");
  }
  return out;
}

}  // namespace

uint64_t Mix64(uint64_t x) {
  x += kGolden;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

uint64_t ViewSeed(uint64_t job_seed, int64_t epoch, int64_t index, int view) {
  // Absorb one input per round; each round is a bijection of the running
  // value for a fixed input, and the distinct constants keep the roles of
  // the inputs apart.
  uint64_t h = Mix64(job_seed ^ 0x5649455753454544ULL);  // "VIEWSEED"
  h = Mix64(h ^ (static_cast<uint64_t>(epoch) * 0xD6E8FEB86659FD93ULL));
  h = Mix64(h ^ (static_cast<uint64_t>(index) * 0xA0761D6478BD642FULL));
  h = Mix64(h ^ (static_cast<uint64_t>(view) * 0xE7037ED1A0B428DBULL));
  return h;
}

Rng::Rng(uint64_t seed) {
  // SplitMix64's sequence: Mix64 adds the golden increment itself.
  for (int i = 0; i < 4; ++i) s_[i] = Mix64(seed + i * kGolden);
}

uint64_t Rng::Next() {
  auto rotl = [](uint64_t x, int k) { return (x << k) | (x >> (64 - k)); };
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::Uniform() { return (Next() >> 11) * 0x1.0p-53; }

double Rng::Uniform(double lo, double hi) { return lo + (hi - lo) * Uniform(); }

uint64_t Rng::Below(uint64_t n) {
  uint64_t x = Next();
  unsigned __int128 m = static_cast<unsigned __int128>(x) * n;
  uint64_t low = static_cast<uint64_t>(m);
  if (low < n) {
    const uint64_t threshold = (0 - n) % n;
    while (low < threshold) {
      x = Next();
      m = static_cast<unsigned __int128>(x) * n;
      low = static_cast<uint64_t>(m);
    }
  }
  return static_cast<uint64_t>(m >> 64);
}

ViewFormat ResolveViewFormat(const DataSpec& data, const Dataset& dataset,
                             int64_t channels) {
  ViewFormat format;
  format.channels = channels;
  if (data.image_size > 0) {
    format.size = data.image_size;
  } else if (dataset.natural_size() > 0) {
    format.size = dataset.natural_size();
  } else {
    format.size = 224;
  }
  const std::vector<double>& mean =
      data.augment.mean.empty() ? dataset.default_mean() : data.augment.mean;
  const std::vector<double>& std =
      data.augment.std.empty() ? dataset.default_std() : data.augment.std;
  format.mean = FoldStatistics(mean, channels);
  format.std = FoldStatistics(std, channels);
  return format;
}

CropBox SampleCropBox(int64_t height, int64_t width, const AugmentSpec& spec,
                      uint64_t seed) {
  Rng rng = StreamRng(seed, kCropStream);
  const double area = static_cast<double>(height) * width;
  const double log_lo = std::log(3.0 / 4.0);
  const double log_hi = std::log(4.0 / 3.0);
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double target =
        area * rng.Uniform(spec.crop_min_scale, spec.crop_max_scale);
    const double ratio = std::exp(rng.Uniform(log_lo, log_hi));
    // std::nearbyint rounds half to even, like Python's round().
    const auto w =
        static_cast<int64_t>(std::nearbyint(std::sqrt(target * ratio)));
    const auto h =
        static_cast<int64_t>(std::nearbyint(std::sqrt(target / ratio)));
    if (w > 0 && w <= width && h > 0 && h <= height) {
      CropBox box;
      box.height = h;
      box.width = w;
      box.top = static_cast<int64_t>(rng.Below(height - h + 1));
      box.left = static_cast<int64_t>(rng.Below(width - w + 1));
      return box;
    }
  }
  // Fallback: the largest centred crop with an allowed aspect ratio.
  CropBox box;
  const double in_ratio = static_cast<double>(width) / height;
  if (in_ratio < 3.0 / 4.0) {
    box.width = width;
    box.height = static_cast<int64_t>(std::nearbyint(width / (3.0 / 4.0)));
  } else if (in_ratio > 4.0 / 3.0) {
    box.height = height;
    box.width = static_cast<int64_t>(std::nearbyint(height * (4.0 / 3.0)));
  } else {
    box.width = width;
    box.height = height;
  }
  box.top = (height - box.height) / 2;
  box.left = (width - box.width) / 2;
  return box;
}

void AugmentView(const Image& image, const AugmentSpec& spec,
                 const ViewFormat& format, uint64_t seed, float* out) {
  AugmentViewInBox(image, SampleCropBox(image.height, image.width, spec, seed),
                   spec, format, seed, out);
}

CropBox ScaleCropBox(const CropBox& box, int64_t full_height,
                     int64_t full_width, int64_t height, int64_t width) {
  const double sy = static_cast<double>(height) / full_height;
  const double sx = static_cast<double>(width) / full_width;
  CropBox scaled;
  scaled.top = std::min<int64_t>(std::llround(box.top * sy), height - 1);
  scaled.left = std::min<int64_t>(std::llround(box.left * sx), width - 1);
  scaled.height = std::clamp<int64_t>(std::llround(box.height * sy), 1,
                                      height - scaled.top);
  scaled.width =
      std::clamp<int64_t>(std::llround(box.width * sx), 1, width - scaled.left);
  return scaled;
}

int DecodeEighths(const CropBox* boxes, int count, int64_t size) {
  int64_t side = std::numeric_limits<int64_t>::max();
  for (int i = 0; i < count; ++i) {
    side = std::min({side, boxes[i].height, boxes[i].width});
  }
  // 1/8, 1/4 and 1/2: libjpeg-turbo's fast reduced IDCTs; the other
  // eighths decode no faster than the whole image.
  for (int n : {1, 2, 4}) {
    // ceil(side * n / 8) pixels of the crop after scaling, less one for
    // the rounding of its edges.
    if ((side * n + 7) / 8 - 1 >= size) return n;
  }
  return 8;
}

PhotometricParams DrawPhotometric(const AugmentSpec& spec, uint64_t seed,
                                  int64_t channels) {
  PhotometricParams p;
  // Colour jitter. Every draw is made whether or not the jitter applies and
  // whatever the channels, so the stream does not depend on either.
  Rng jitter_rng = StreamRng(seed, kJitterStream);
  p.jitter = jitter_rng.Uniform() < spec.jitter_prob;
  for (int i = 3; i > 0; --i) {
    std::swap(p.order[i], p.order[jitter_rng.Below(i + 1)]);
  }
  p.brightness =
      static_cast<float>(JitterFactor(jitter_rng, spec.jitter_brightness));
  p.contrast =
      static_cast<float>(JitterFactor(jitter_rng, spec.jitter_contrast));
  p.saturation =
      static_cast<float>(JitterFactor(jitter_rng, spec.jitter_saturation));
  p.hue =
      static_cast<float>(jitter_rng.Uniform(-spec.jitter_hue, spec.jitter_hue));
  // An operation whose amount is 0, or that needs colour, is left out.
  p.apply[0] = spec.jitter_brightness > 0;
  p.apply[1] = spec.jitter_contrast > 0;
  p.apply[2] = spec.jitter_saturation > 0 && channels == 3;
  p.apply[3] = spec.jitter_hue > 0 && channels == 3;
  Rng gray_rng = StreamRng(seed, kGrayStream);
  p.gray = gray_rng.Uniform() < spec.grayscale_prob && channels == 3;
  Rng blur_rng = StreamRng(seed, kBlurStream);
  const bool blur = blur_rng.Uniform() < spec.blur_prob;
  p.sigma = static_cast<float>(
      blur_rng.Uniform(spec.blur_sigma_min, spec.blur_sigma_max));
  p.blur = spec.blur && blur && p.sigma > 0.0f;
  Rng flip_rng = StreamRng(seed, kFlipStream);
  p.flip = flip_rng.Uniform() < spec.hflip_prob;
  return p;
}

namespace {

void CheckCrop(const Image& image, const CropBox& box,
               const ViewFormat& format) {
  CheckImage(image);
  Check(box.top >= 0 && box.left >= 0 && box.height > 0 && box.width > 0 &&
            box.top + box.height <= image.height &&
            box.left + box.width <= image.width,
        "crop box outside the image");
  Check(format.size > 0, "format.size must be > 0");
  Check(format.channels == 1 || format.channels == 3,
        "format.channels must be 1 or 3");
}

// The random resized crop of `box` into s.work as [C][size][size] floats in
// [0, 1].
void ResampleCrop(const Image& image, const CropBox& box, int64_t size,
                  Scratch* s) {
  ComputeAxisWeights(box.top, box.height, size, 0, size, 1.0, &s->rows);
  ComputeAxisWeights(box.left, box.width, size, 0, size, 1.0 / 255.0, &s->cols);
  Resample(image, size, s);
}

}  // namespace

void AugmentViewInBox(const Image& image, const CropBox& box,
                      const AugmentSpec& spec, const ViewFormat& format,
                      uint64_t seed, float* out) {
  CheckCrop(image, box, format);
  Scratch& s = ThreadScratch();
  const int64_t size = format.size;
  const int64_t plane = size * size;
  ResampleCrop(image, box, size, &s);
  int64_t c_in = image.channels;
  const PhotometricParams p = DrawPhotometric(spec, seed, c_in);

  if (p.jitter) {
    float* v = s.work.data();
    for (int op : p.order) {
      if (!p.apply[op]) continue;
      switch (op) {
        case 0:
          AdjustBrightness(p.brightness, c_in * plane, v);
          break;
        case 1:
          AdjustContrast(p.contrast, c_in, plane, v);
          break;
        case 2:
          AdjustSaturation(p.saturation, plane, v);
          break;
        default:
          AdjustHue(p.hue, plane, v);
          break;
      }
    }
  }

  // Random grayscale: the three channels become one luma plane, which the
  // output stage replicates again when it writes three channels.
  if (p.gray) {
    float* v = s.work.data();
    for (int64_t i = 0; i < plane; ++i) {
      v[i] = kLumaR * v[i] + kLumaG * v[plane + i] + kLumaB * v[2 * plane + i];
    }
    c_in = 1;
  }

  // Gaussian blur (MoCo v2).
  if (p.blur) GaussianBlur(p.sigma, c_in, size, &s);

  // Horizontal flip, clamp and normalisation in one pass.
  PrepareNormalisation(format, &s);
  WriteOutput(format, c_in, p.flip, s, out);
}

void CropViewBytes(const Image& image, const CropBox& box,
                   const ViewFormat& format, int64_t channels, uint8_t* out) {
  CheckCrop(image, box, format);
  Check(channels == image.channels || (channels == 3 && image.channels == 1),
        "CropViewBytes: channels must be the image's, or 3 for a gray one");
  Scratch& s = ThreadScratch();
  const int64_t plane = format.size * format.size;
  ResampleCrop(image, box, format.size, &s);
  for (int64_t c = 0; c < channels; ++c) {
    const float* src = &s.work[(image.channels == 1 ? 0 : c) * plane];
    uint8_t* dst = out + c * plane;
    for (int64_t i = 0; i < plane; ++i) {
      dst[i] = static_cast<uint8_t>(std::lround(Clamp01(src[i]) * 255.0f));
    }
  }
}

void EvalView(const Image& image, const ViewFormat& format, float* out) {
  CheckImage(image);
  Check(format.size > 0, "format.size must be > 0");
  Check(format.channels == 1 || format.channels == 3,
        "format.channels must be 1 or 3");
  Scratch& s = ThreadScratch();
  const int64_t size = format.size;
  // torchvision Resize(size): the shorter side becomes `size`, the longer
  // one int(size * long / short); then CenterCrop(size).
  int64_t new_h = image.height;
  int64_t new_w = image.width;
  if (std::min(image.height, image.width) != size) {
    if (image.height <= image.width) {
      new_h = size;
      new_w = static_cast<int64_t>(static_cast<double>(size) * image.width /
                                   image.height);
    } else {
      new_w = size;
      new_h = static_cast<int64_t>(static_cast<double>(size) * image.height /
                                   image.width);
    }
  }
  const auto top = static_cast<int64_t>(std::nearbyint((new_h - size) / 2.0));
  const auto left = static_cast<int64_t>(std::nearbyint((new_w - size) / 2.0));
  ComputeAxisWeights(0, image.height, new_h, top, size, 1.0, &s.rows);
  ComputeAxisWeights(0, image.width, new_w, left, size, 1.0 / 255.0, &s.cols);
  Resample(image, size, &s);
  PrepareNormalisation(format, &s);
  WriteOutput(format, image.channels, /*flip=*/false, s, out);
}

}  // namespace momentum::worker
