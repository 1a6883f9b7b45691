#include "worker/augment.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <vector>

#include "tests/worker/image_fixtures.h"

namespace momentum::worker {
namespace {

using testing::RandomImage;

Image ConstantImage(int64_t size, std::vector<uint8_t> value) {
  Image image;
  image.height = size;
  image.width = size;
  image.channels = static_cast<int64_t>(value.size());
  for (int64_t i = 0; i < size * size; ++i) {
    image.pixels.insert(image.pixels.end(), value.begin(), value.end());
  }
  return image;
}

// Every random operation off and the crop forced to the whole image.
AugmentSpec NoAugment() {
  AugmentSpec spec;
  spec.crop_min_scale = 1.0;
  spec.crop_max_scale = 1.0;
  spec.jitter_prob = 0.0;
  spec.grayscale_prob = 0.0;
  spec.blur_prob = 0.0;
  spec.hflip_prob = 0.0;
  return spec;
}

ViewFormat Format(int64_t channels, int64_t size, float mean, float std) {
  ViewFormat format;
  format.channels = channels;
  format.size = size;
  format.mean.assign(channels, mean);
  format.std.assign(channels, std);
  return format;
}

std::vector<float> Augment(const Image& image, const AugmentSpec& spec,
                           const ViewFormat& format, uint64_t seed) {
  std::vector<float> out(format.channels * format.size * format.size, -99.0f);
  AugmentView(image, spec, format, seed, out.data());
  return out;
}

// (p / 255 - mean) / std in CHW, computed independently of the library.
std::vector<float> PlainNormalised(const Image& image, float mean, float std) {
  std::vector<float> out(image.pixels.size());
  const int64_t plane = image.height * image.width;
  for (int64_t c = 0; c < image.channels; ++c) {
    for (int64_t i = 0; i < plane; ++i) {
      out[c * plane + i] =
          (image.pixels[i * image.channels + c] / 255.0f - mean) / std;
    }
  }
  return out;
}

double Variance(const std::vector<float>& v) {
  double mean = 0.0;
  for (float x : v) mean += x;
  mean /= v.size();
  double var = 0.0;
  for (float x : v) var += (x - mean) * (x - mean);
  return var / v.size();
}

TEST(AugmentTest, OutputHasFormatShapeAndUnitRange) {
  const AugmentSpec spec;  // the v2 defaults
  struct Case {
    Image image;
    ViewFormat format;
  };
  const std::vector<Case> cases = {
      {RandomImage(28, 28, 1, 1), Format(1, 28, 0.286f, 0.353f)},
      {RandomImage(28, 28, 1, 2), Format(3, 28, 0.286f, 0.353f)},
      {RandomImage(30, 41, 3, 3), Format(3, 24, 0.45f, 0.22f)},
      {RandomImage(50, 37, 3, 4), Format(1, 32, 0.45f, 0.22f)},
  };
  for (const Case& c : cases) {
    for (uint64_t seed = 0; seed < 50; ++seed) {
      const std::vector<float> out = Augment(c.image, spec, c.format, seed);
      ASSERT_EQ(out.size(), static_cast<size_t>(c.format.channels *
                                                c.format.size * c.format.size));
      for (float v : out) {
        const float raw = v * c.format.std[0] + c.format.mean[0];
        ASSERT_GE(raw, -1e-5f);
        ASSERT_LE(raw, 1.0f + 1e-5f);
      }
    }
  }
}

// AugmentView draws its crop with SampleCropBox; given that box,
// AugmentViewInBox gives the same view bit for bit.
TEST(AugmentTest, ViewInTheSampledBoxIsTheView) {
  Image image;
  image.height = 37;
  image.width = 53;
  image.channels = 3;
  image.pixels.resize(37 * 53 * 3);
  for (size_t i = 0; i < image.pixels.size(); ++i) {
    image.pixels[i] = static_cast<uint8_t>(i * 7 % 251);
  }
  AugmentSpec spec;
  ViewFormat format;
  format.size = 16;
  const size_t n = 3 * 16 * 16;
  for (uint64_t seed = 0; seed < 8; ++seed) {
    std::vector<float> a(n), b(n);
    AugmentView(image, spec, format, seed, a.data());
    AugmentViewInBox(image, SampleCropBox(37, 53, spec, seed), spec, format,
                     seed, b.data());
    EXPECT_EQ(a, b) << "seed " << seed;
  }
}

// The smallest n/8 at which every crop keeps `size` pixels a side, from the
// closed form: a side s scales to ceil(s n / 8), less one for rounding.
TEST(AugmentTest, DecodeEighthsAndScaleCropBox) {
  const CropBox boxes[2] = {{0, 0, 200, 300}, {5, 7, 100, 150}};
  // side 100: n = 2 gives 25 - 1 = 24 < 32, n = 4 gives 50 - 1 = 49.
  EXPECT_EQ(DecodeEighths(boxes, 2, 32), 4);
  EXPECT_EQ(DecodeEighths(boxes, 1, 32), 2);  // side 200: 50 - 1 = 49
  EXPECT_EQ(DecodeEighths(boxes, 2, 50), 8);  // 4/8 gives 49: the full image
  EXPECT_EQ(DecodeEighths(boxes, 1, 24), 1);  // side 200: 25 - 1 = 24
  // A 300x400 image decoded at 75x100: a quarter a side, rounded.
  const CropBox scaled = ScaleCropBox({10, 22, 100, 200}, 300, 400, 75, 100);
  EXPECT_EQ(scaled.top, 3);   // 2.5 rounds away from zero
  EXPECT_EQ(scaled.left, 6);  // 5.5
  EXPECT_EQ(scaled.height, 25);
  EXPECT_EQ(scaled.width, 50);
  // Kept inside, at least a pixel.
  const CropBox edge = ScaleCropBox({299, 399, 1, 1}, 300, 400, 38, 50);
  EXPECT_EQ(edge.top, 37);
  EXPECT_EQ(edge.left, 49);
  EXPECT_EQ(edge.height, 1);
  EXPECT_EQ(edge.width, 1);
}

TEST(AugmentTest, SameSeedGivesIdenticalView) {
  const AugmentSpec spec;
  const Image image = RandomImage(32, 32, 3, 7);
  const ViewFormat format = Format(3, 32, 0.5f, 0.25f);
  const uint64_t seed = ViewSeed(42, 3, 1234, 1);
  EXPECT_EQ(Augment(image, spec, format, seed),
            Augment(image, spec, format, seed));
}

TEST(AugmentTest, DifferentIndexEpochOrViewGivesDifferentViews) {
  const AugmentSpec spec;
  const Image image = RandomImage(32, 32, 3, 7);
  const ViewFormat format = Format(3, 32, 0.5f, 0.25f);
  const std::vector<float> base =
      Augment(image, spec, format, ViewSeed(42, 3, 10, 0));
  EXPECT_NE(base, Augment(image, spec, format, ViewSeed(42, 3, 11, 0)));
  EXPECT_NE(base, Augment(image, spec, format, ViewSeed(42, 4, 10, 0)));
  EXPECT_NE(base, Augment(image, spec, format, ViewSeed(42, 3, 10, 1)));
  EXPECT_NE(base, Augment(image, spec, format, ViewSeed(43, 3, 10, 0)));
}

TEST(AugmentTest, ViewSeedsAreDistinct) {
  std::set<uint64_t> seeds;
  int64_t n = 0;
  for (uint64_t job = 0; job < 3; ++job) {
    for (int64_t epoch = 0; epoch < 10; ++epoch) {
      for (int64_t index = 0; index < 1000; ++index) {
        for (int view = 0; view < 2; ++view) {
          seeds.insert(ViewSeed(job, epoch, index, view));
          ++n;
        }
      }
    }
  }
  EXPECT_EQ(static_cast<int64_t>(seeds.size()), n);
}

TEST(AugmentTest, WithoutRandomnessViewIsNormalisedImage) {
  const AugmentSpec spec = NoAugment();
  for (int64_t channels : {1, 3}) {
    const Image image = RandomImage(28, 28, channels, 11 + channels);
    const ViewFormat format = Format(channels, 28, 0.3f, 0.4f);
    const std::vector<float> expected = PlainNormalised(image, 0.3f, 0.4f);
    for (uint64_t seed = 0; seed < 20; ++seed) {
      const std::vector<float> out = Augment(image, spec, format, seed);
      ASSERT_EQ(out.size(), expected.size());
      for (size_t i = 0; i < out.size(); ++i) {
        ASSERT_NEAR(out[i], expected[i], 1e-5f) << "channels " << channels;
      }
    }
  }
}

TEST(AugmentTest, FlipWithProbabilityOneMirrorsTheIdentityView) {
  AugmentSpec spec = NoAugment();
  const Image image = RandomImage(28, 28, 3, 5);
  const ViewFormat format = Format(3, 28, 0.3f, 0.4f);
  const std::vector<float> identity = Augment(image, spec, format, 9);
  spec.hflip_prob = 1.0;
  const std::vector<float> flipped = Augment(image, spec, format, 9);
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t y = 0; y < 28; ++y) {
      for (int64_t x = 0; x < 28; ++x) {
        ASSERT_EQ(flipped[(c * 28 + y) * 28 + x],
                  identity[(c * 28 + y) * 28 + 27 - x]);
      }
    }
  }
}

TEST(AugmentTest, GrayscaleWithProbabilityOneEqualisesChannels) {
  AugmentSpec spec = NoAugment();
  spec.grayscale_prob = 1.0;
  const Image image = RandomImage(20, 20, 3, 8);
  const ViewFormat format = Format(3, 20, 0.5f, 0.5f);
  const std::vector<float> out = Augment(image, spec, format, 3);
  const int64_t plane = 20 * 20;
  for (int64_t i = 0; i < plane; ++i) {
    ASSERT_EQ(out[i], out[plane + i]);
    ASSERT_EQ(out[i], out[2 * plane + i]);
    const uint8_t* p = &image.pixels[i * 3];
    const float luma = (0.299f * p[0] + 0.587f * p[1] + 0.114f * p[2]) / 255;
    ASSERT_NEAR(out[i], (luma - 0.5f) / 0.5f, 1e-5f);
  }
}

TEST(AugmentTest, ChannelConversionReplicatesGrayAndTakesLuma) {
  const AugmentSpec spec = NoAugment();
  const Image gray = ConstantImage(16, {200});
  const std::vector<float> rgb_out =
      Augment(gray, spec, Format(3, 16, 0, 1), 1);
  for (float v : rgb_out) ASSERT_NEAR(v, 200 / 255.0f, 1e-6f);
  const Image rgb = ConstantImage(16, {10, 100, 250});
  const std::vector<float> gray_out =
      Augment(rgb, spec, Format(1, 16, 0, 1), 1);
  const float luma = (0.299f * 10 + 0.587f * 100 + 0.114f * 250) / 255;
  for (float v : gray_out) ASSERT_NEAR(v, luma, 1e-6f);
}

TEST(AugmentTest, GrayImagesIgnoreSaturationHueAndGrayscale) {
  // Only the colour-only operations are on: a gray image comes out as the
  // identity view, and the draws they consume leave the flip unchanged.
  AugmentSpec spec = NoAugment();
  spec.jitter_prob = 1.0;
  spec.jitter_brightness = 0.0;
  spec.jitter_contrast = 0.0;
  spec.grayscale_prob = 1.0;
  spec.hflip_prob = 0.5;
  AugmentSpec flip_only = NoAugment();
  flip_only.hflip_prob = 0.5;
  const Image image = RandomImage(28, 28, 1, 21);
  const ViewFormat format = Format(1, 28, 0.3f, 0.4f);
  for (uint64_t seed = 0; seed < 20; ++seed) {
    EXPECT_EQ(Augment(image, spec, format, seed),
              Augment(image, flip_only, format, seed));
  }
}

TEST(AugmentTest, BrightnessScalesAConstantImageWithinItsRange) {
  AugmentSpec spec = NoAugment();
  spec.jitter_prob = 1.0;
  spec.jitter_contrast = 0.0;  // contrast would pull a constant to its mean
  spec.jitter_brightness = 0.4;
  const Image image = ConstantImage(8, {128});
  std::set<float> seen;
  for (uint64_t seed = 0; seed < 100; ++seed) {
    const std::vector<float> out =
        Augment(image, spec, Format(1, 8, 0, 1), seed);
    for (float v : out) {
      ASSERT_EQ(v, out[0]);  // brightness is uniform over the image
    }
    ASSERT_GE(out[0], 0.6f * 128 / 255 - 1e-5f);
    ASSERT_LE(out[0], 1.4f * 128 / 255 + 1e-5f);
    seen.insert(out[0]);
  }
  EXPECT_GT(seen.size(), 90u);
}

TEST(AugmentTest, HueShiftKeepsValueAndSaturationOfAColour) {
  // A hue rotation in HSV keeps max and min of (r, g, b).
  AugmentSpec spec = NoAugment();
  spec.jitter_prob = 1.0;
  spec.jitter_brightness = 0.0;
  spec.jitter_contrast = 0.0;
  spec.jitter_saturation = 0.0;
  spec.jitter_hue = 0.5;
  const Image image = ConstantImage(4, {200, 60, 120});
  int changed = 0;
  for (uint64_t seed = 0; seed < 50; ++seed) {
    const std::vector<float> out =
        Augment(image, spec, Format(3, 4, 0, 1), seed);
    const float r = out[0], g = out[16], b = out[32];
    EXPECT_NEAR(std::max({r, g, b}), 200 / 255.0f, 1e-5f);
    EXPECT_NEAR(std::min({r, g, b}), 60 / 255.0f, 1e-5f);
    if (std::abs(r - 200 / 255.0f) > 1e-3f) ++changed;
  }
  EXPECT_GT(changed, 25);
}

TEST(AugmentTest, CropBoxAreaIsUniformWhenNoRatioIsRejected) {
  // With scale at most 0.5, every ratio in [3/4, 4/3] fits on a square, so
  // the area fraction is uniform on [min, max].
  AugmentSpec spec;
  spec.crop_min_scale = 0.2;
  spec.crop_max_scale = 0.5;
  double sum = 0.0;
  const int n = 20000;
  for (int seed = 0; seed < n; ++seed) {
    const CropBox box =
        SampleCropBox(1000, 1000, spec, ViewSeed(1, 0, seed, 0));
    ASSERT_GE(box.top, 0);
    ASSERT_GE(box.left, 0);
    ASSERT_LE(box.top + box.height, 1000);
    ASSERT_LE(box.left + box.width, 1000);
    const double ratio = static_cast<double>(box.width) / box.height;
    ASSERT_GE(ratio, 0.75 - 0.01);
    ASSERT_LE(ratio, 4.0 / 3.0 + 0.01);
    const double fraction = box.height * box.width / 1e6;
    ASSERT_GE(fraction, 0.2 - 0.002);
    ASSERT_LE(fraction, 0.5 + 0.002);
    sum += fraction;
  }
  EXPECT_NEAR(sum / n, 0.35, 0.01);
}

TEST(AugmentTest, CropBoxAreaMatchesClosedFormWithRatioRejection) {
  // On a square image an area fraction s with ratio r fits when
  // s * max(r, 1/r) <= 1. With log r uniform on [-a, a], a = ln(4/3), the
  // chance that a try with fraction s fits is 1 for s <= 3/4 and
  // -ln(s) / a above. The accepted fraction has density proportional to that
  // chance on [min, max] (ten tries make the fallback negligible), so its
  // mean is N / D with the integrals below.
  AugmentSpec spec;
  spec.crop_min_scale = 0.2;
  spec.crop_max_scale = 1.0;
  const double a = std::log(4.0 / 3.0);
  const double lo = 0.2, mid = 0.75, hi = 1.0;
  // Antiderivatives of s, 1, -s ln s and -ln s.
  auto s_ln = [](double s) { return -(s * s / 2 * std::log(s) - s * s / 4); };
  auto ln = [](double s) { return -(s * std::log(s) - s); };
  const double numerator =
      (mid * mid - lo * lo) / 2 + (s_ln(hi) - s_ln(mid)) / a;
  const double denominator = (mid - lo) + (ln(hi) - ln(mid)) / a;
  const double expected = numerator / denominator;  // about 0.538
  double sum = 0.0;
  const int n = 20000;
  for (int seed = 0; seed < n; ++seed) {
    const CropBox box =
        SampleCropBox(1000, 1000, spec, ViewSeed(2, 0, seed, 0));
    const double fraction = box.height * box.width / 1e6;
    ASSERT_GE(fraction, 0.2 - 0.002);
    ASSERT_LE(fraction, 1.0);
    sum += fraction;
  }
  EXPECT_NEAR(sum / n, expected, 0.01);
}

TEST(AugmentTest, CropBoxFallsBackToCentreCrop) {
  AugmentSpec spec;
  spec.crop_min_scale = 1.0;
  spec.crop_max_scale = 1.0;
  // A tall image no full-area ratio fits: the centre crop at ratio 3/4.
  const CropBox box = SampleCropBox(100, 30, spec, 5);
  EXPECT_EQ(box.width, 30);
  EXPECT_EQ(box.height, 40);
  EXPECT_EQ(box.top, 30);
  EXPECT_EQ(box.left, 0);
}

TEST(AugmentTest, BlurKeepsAConstantImageAndSmoothsNoise) {
  AugmentSpec spec = NoAugment();
  spec.blur = true;
  spec.blur_prob = 1.0;
  spec.blur_sigma_min = 1.0;
  spec.blur_sigma_max = 2.0;
  const ViewFormat format = Format(1, 28, 0, 1);
  const Image constant = ConstantImage(28, {77});
  for (uint64_t seed = 0; seed < 10; ++seed) {
    for (float v : Augment(constant, spec, format, seed)) {
      ASSERT_NEAR(v, 77 / 255.0f, 1e-5f);
    }
  }
  const Image noise = RandomImage(28, 28, 1, 99);
  AugmentSpec sharp = spec;
  sharp.blur_prob = 0.0;
  for (uint64_t seed = 0; seed < 10; ++seed) {
    const std::vector<float> blurred = Augment(noise, spec, format, seed);
    const std::vector<float> plain = Augment(noise, sharp, format, seed);
    EXPECT_LT(Variance(blurred), 0.5 * Variance(plain));
    double mean_blurred = 0.0, mean_plain = 0.0;
    for (size_t i = 0; i < plain.size(); ++i) {
      mean_blurred += blurred[i];
      mean_plain += plain[i];
    }
    EXPECT_NEAR(mean_blurred / plain.size(), mean_plain / plain.size(), 0.01);
  }
}

TEST(AugmentTest, BlurIsOffWhenTheSpecDisablesIt) {
  AugmentSpec spec = NoAugment();
  spec.blur = false;
  spec.blur_prob = 1.0;
  const Image noise = RandomImage(28, 28, 1, 98);
  const ViewFormat format = Format(1, 28, 0, 1);
  EXPECT_EQ(Augment(noise, spec, format, 4),
            Augment(noise, NoAugment(), format, 4));
}

TEST(AugmentTest, EvalViewOfNaturalSizeIsTheNormalisedImage) {
  const Image image = RandomImage(28, 28, 1, 31);
  std::vector<float> out(28 * 28);
  EvalView(image, Format(1, 28, 0.286f, 0.353f), out.data());
  const std::vector<float> expected = PlainNormalised(image, 0.286f, 0.353f);
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_NEAR(out[i], expected[i], 1e-5f);
  }
}

TEST(AugmentTest, EvalViewCentreCropsTheLongerSide) {
  // Shorter side already at size: no resampling, only the centre crop.
  const Image image = RandomImage(20, 30, 3, 32);
  std::vector<float> out(3 * 20 * 20);
  EvalView(image, Format(3, 20, 0, 1), out.data());
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t y = 0; y < 20; ++y) {
      for (int64_t x = 0; x < 20; ++x) {
        const float expected = image.pixels[(y * 30 + x + 5) * 3 + c] / 255.0f;
        ASSERT_NEAR(out[(c * 20 + y) * 20 + x], expected, 1e-6f);
      }
    }
  }
}

TEST(AugmentTest, EvalViewDownscalingAveragesInsteadOfAliasing) {
  // A one-pixel checkerboard shrunk 8x: point sampling would give 0s and 1s,
  // area-like filtering gives mid gray.
  Image board;
  board.height = 224;
  board.width = 224;
  board.channels = 1;
  for (int64_t y = 0; y < 224; ++y) {
    for (int64_t x = 0; x < 224; ++x) {
      board.pixels.push_back((x + y) % 2 ? 255 : 0);
    }
  }
  std::vector<float> out(28 * 28);
  EvalView(board, Format(1, 28, 0, 1), out.data());
  for (float v : out) {
    ASSERT_NEAR(v, 0.5f, 0.05f);
  }
}

TEST(AugmentTest, ResolveViewFormatFoldsStatistics) {
  class FakeDataset : public Dataset {
   public:
    int64_t size() const override { return 0; }
    absl::StatusOr<Image> Get(int64_t) const override { return Image(); }
    int64_t Label(int64_t) const override { return 0; }
    int64_t num_classes() const override { return 1; }
    int64_t channels() const override { return 3; }
    int64_t natural_size() const override { return 0; }
    std::vector<double> default_mean() const override {
      return {0.4, 0.5, 0.6};
    }
    std::vector<double> default_std() const override { return {0.2, 0.2, 0.2}; }
  };
  FakeDataset dataset;
  DataSpec data;
  ViewFormat rgb = ResolveViewFormat(data, dataset, 3);
  EXPECT_EQ(rgb.size, 224);
  EXPECT_EQ(rgb.mean, (std::vector<float>{0.4f, 0.5f, 0.6f}));
  ViewFormat gray = ResolveViewFormat(data, dataset, 1);
  ASSERT_EQ(gray.mean.size(), 1u);
  EXPECT_NEAR(gray.mean[0], 0.299 * 0.4 + 0.587 * 0.5 + 0.114 * 0.6, 1e-6);
  data.image_size = 64;
  data.augment.mean = {0.25};
  data.augment.std = {0.5};
  ViewFormat custom = ResolveViewFormat(data, dataset, 3);
  EXPECT_EQ(custom.size, 64);
  EXPECT_EQ(custom.mean, (std::vector<float>{0.25f, 0.25f, 0.25f}));
  EXPECT_EQ(custom.std, (std::vector<float>{0.5f, 0.5f, 0.5f}));
}

}  // namespace
}  // namespace momentum::worker
