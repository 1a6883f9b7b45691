#include "worker/device_augment.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "tests/worker/image_fixtures.h"
#include "worker/device.h"

namespace momentum::worker {
namespace {

using testing::RandomImage;

AugmentSpec MocoV2() {
  AugmentSpec spec;  // the defaults: MoCo v2's jitter, gray, blur, flip
  spec.blur = true;
  spec.blur_prob = 0.5;
  return spec;
}

// The device path against AugmentViewInBox, view by view, on `where`: a crop
// box of the output's size makes the crop exact bytes, so the two differ
// only by float rounding.
void ExpectSameViews(const Image& image, const ViewFormat& format,
                     const AugmentSpec& spec, c10::Device device,
                     int64_t transport_channels, double tolerance) {
  const int64_t size = format.size, views = 48;
  const int64_t plane = size * size;
  const CropBox box{3, 5, size, size};
  std::vector<uint8_t> bytes(views * transport_channels * plane);
  std::vector<float> params(views * kPhotometricWidth);
  std::vector<float> want(views * format.channels * plane);
  for (int64_t v = 0; v < views; ++v) {
    const uint64_t seed = 1000 + v;
    AugmentViewInBox(image, box, spec, format, seed,
                     &want[v * format.channels * plane]);
    CropViewBytes(image, box, format, transport_channels,
                  &bytes[v * transport_channels * plane]);
    PackPhotometric(DrawPhotometric(spec, seed, image.channels),
                    &params[v * kPhotometricWidth]);
  }
  const at::Tensor crops =
      at::from_blob(bytes.data(), {views, transport_channels, size, size},
                    at::kByte)
          .to(device);
  const at::Tensor rows =
      at::from_blob(params.data(), {views, kPhotometricWidth}, at::kFloat)
          .to(device);
  const at::Tensor got =
      PhotometricOnDevice(crops, rows, format, MaxBlurRadius(spec, format))
          .cpu();
  const at::Tensor expected = at::from_blob(
      want.data(), {views, format.channels, size, size}, at::kFloat);
  ASSERT_EQ(got.sizes(), expected.sizes());
  const double worst = (got - expected).abs().max().item<double>();
  EXPECT_LT(worst, tolerance);
  // Every choice was exercised: some views jittered, some gray (colour
  // images only), some blurred, some flipped.
  const at::Tensor p = rows.cpu();
  for (int64_t column : {0, 13, 14, 16}) {
    if (column == 13 && image.channels == 1) continue;
    const double on = p.select(1, column).sum().item<double>();
    EXPECT_GT(on, 0) << "column " << column;
    EXPECT_LT(on, views) << "column " << column;
  }
}

TEST(DeviceAugmentTest, RgbViewsEqualTheHostViews) {
  ViewFormat format;
  format.channels = 3;
  format.size = 24;
  format.mean = {0.485f, 0.456f, 0.406f};
  format.std = {0.229f, 0.224f, 0.225f};
  ExpectSameViews(RandomImage(40, 41, 3, 7), format, MocoV2(), at::kCPU, 3,
                  2e-4);
}

// A gray image in a colour dataset travels as three equal planes; a gray
// dataset with one-channel views as one.
TEST(DeviceAugmentTest, GrayImagesEqualTheHostViews) {
  ViewFormat rgb;
  rgb.channels = 3;
  rgb.size = 20;
  rgb.mean = {0.5f};
  rgb.std = {0.25f};
  ExpectSameViews(RandomImage(33, 30, 1, 8), rgb, MocoV2(), at::kCPU, 3, 2e-4);
  ViewFormat gray = rgb;
  gray.channels = 1;
  ExpectSameViews(RandomImage(33, 30, 1, 9), gray, MocoV2(), at::kCPU, 1, 2e-4);
}

// The bytes are the float crop rounded to 256 levels: a resized crop differs
// from the host's float view by the rounding only.
TEST(DeviceAugmentTest, CropBytesAreTheRoundedCrop) {
  const Image image = RandomImage(50, 60, 3, 10);
  ViewFormat format;
  format.channels = 3;
  format.size = 16;
  AugmentSpec none;
  none.jitter_prob = 0;
  none.grayscale_prob = 0;
  none.blur = false;
  none.hflip_prob = 0;
  const CropBox box{4, 6, 37, 45};
  std::vector<float> host(3 * 16 * 16);
  AugmentViewInBox(image, box, none, format, 1, host.data());
  std::vector<uint8_t> bytes(3 * 16 * 16);
  CropViewBytes(image, box, format, 3, bytes.data());
  for (size_t i = 0; i < bytes.size(); ++i) {
    EXPECT_NEAR(bytes[i] / 255.0, host[i], 0.5 / 255 + 1e-6) << i;
  }
}

TEST(DeviceAugmentTest, GpuViewsEqualTheHostViews) {
  if (VisibleCudaDevices() == 0) GTEST_SKIP() << "no GPU visible";
  ViewFormat format;
  format.channels = 3;
  format.size = 32;
  format.mean = {0.485f, 0.456f, 0.406f};
  format.std = {0.229f, 0.224f, 0.225f};
  ExpectSameViews(RandomImage(48, 50, 3, 11), format, MocoV2(),
                  c10::Device(c10::kCUDA, 0), 3, 5e-4);
}

}  // namespace
}  // namespace momentum::worker
