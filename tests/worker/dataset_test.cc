#include "worker/dataset.h"

#include <gtest/gtest.h>
#include <png.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tests/worker/image_fixtures.h"
#include "worker/augment.h"

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;
using ::momentum::worker::testing::ReadFile;
using ::momentum::worker::testing::ScopedTempDir;
using ::momentum::worker::testing::WriteFile;
using ::momentum::worker::testing::WriteJpeg;
using ::momentum::worker::testing::WritePng;

void WriteGzip(const std::string& path, const std::vector<uint8_t>& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  gzFile file = gzopen(path.c_str(), "wb");
  ASSERT_NE(file, nullptr) << path;
  if (!bytes.empty()) {
    ASSERT_EQ(gzwrite(file, bytes.data(), bytes.size()),
              static_cast<int>(bytes.size()));
  }
  ASSERT_EQ(gzclose(file), Z_OK);
}

void PutBigEndian32(uint32_t v, std::vector<uint8_t>* out) {
  out->push_back(v >> 24);
  out->push_back((v >> 16) & 0xFF);
  out->push_back((v >> 8) & 0xFF);
  out->push_back(v & 0xFF);
}

std::vector<uint8_t> IdxImages(uint32_t magic, uint32_t count, uint32_t rows,
                               uint32_t cols,
                               const std::vector<uint8_t>& pixels) {
  std::vector<uint8_t> out;
  PutBigEndian32(magic, &out);
  PutBigEndian32(count, &out);
  PutBigEndian32(rows, &out);
  PutBigEndian32(cols, &out);
  out.insert(out.end(), pixels.begin(), pixels.end());
  return out;
}

std::vector<uint8_t> IdxLabels(uint32_t magic, uint32_t count,
                               const std::vector<uint8_t>& labels) {
  std::vector<uint8_t> out;
  PutBigEndian32(magic, &out);
  PutBigEndian32(count, &out);
  out.insert(out.end(), labels.begin(), labels.end());
  return out;
}

std::vector<uint8_t> Pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(i * 37 + seed);
  return out;
}

// Writes {prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz
// with `count` images of rows x cols and labels i % 10.
void WriteFashionFiles(const std::string& dir, const std::string& prefix,
                       uint32_t count, uint32_t rows, uint32_t cols) {
  WriteGzip(
      dir + "/" + prefix + "-images-idx3-ubyte.gz",
      IdxImages(2051, count, rows, cols, Pattern(count * rows * cols, count)));
  std::vector<uint8_t> labels;
  for (uint32_t i = 0; i < count; ++i) labels.push_back(i % 10);
  WriteGzip(dir + "/" + prefix + "-labels-idx1-ubyte.gz",
            IdxLabels(2049, count, labels));
}

bool Contains(const absl::Status& status, const std::string& text) {
  return std::string(status.message()).find(text) != std::string::npos;
}

TEST(FashionMnistTest, ReadsImagesAndLabelsBack) {
  ScopedTempDir dir("dataset_test");
  WriteFashionFiles(dir.path(), "train", 12, 4, 4);
  WriteFashionFiles(dir.path(), "t10k", 3, 5, 2);
  auto train = OpenFashionMnist(dir.path(), /*train=*/true);
  ASSERT_TRUE(train.ok()) << train.status();
  const std::vector<uint8_t> pixels = Pattern(12 * 16, 12);
  ASSERT_EQ((*train)->size(), 12);
  EXPECT_EQ((*train)->num_classes(), 10);
  EXPECT_EQ((*train)->channels(), 1);
  EXPECT_EQ((*train)->natural_size(), 4);
  EXPECT_EQ((*train)->default_mean(), std::vector<double>{0.2860});
  EXPECT_EQ((*train)->default_std(), std::vector<double>{0.3530});
  for (int64_t i = 0; i < 12; ++i) {
    absl::StatusOr<Image> image = (*train)->Get(i);
    ASSERT_TRUE(image.ok()) << image.status();
    EXPECT_EQ(image->height, 4);
    EXPECT_EQ(image->width, 4);
    EXPECT_EQ(image->channels, 1);
    EXPECT_EQ(image->pixels,
              std::vector<uint8_t>(pixels.begin() + i * 16,
                                   pixels.begin() + i * 16 + 16));
    EXPECT_EQ((*train)->Label(i), i % 10);
  }
  EXPECT_EQ((*train)->Get(12).status().code(), absl::StatusCode::kOutOfRange);

  auto test = OpenFashionMnist(dir.path(), /*train=*/false);
  ASSERT_TRUE(test.ok()) << test.status();
  ASSERT_EQ((*test)->size(), 3);
  EXPECT_EQ((*test)->natural_size(), 0);  // 5x2 is not square
  absl::StatusOr<Image> last = (*test)->Get(2);
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(last->height, 5);
  EXPECT_EQ(last->width, 2);
  const std::vector<uint8_t> test_pixels = Pattern(3 * 10, 3);
  EXPECT_EQ(last->pixels,
            std::vector<uint8_t>(test_pixels.begin() + 20, test_pixels.end()));
}

TEST(FashionMnistTest, MissingFileIsNotFoundNamingIt) {
  ScopedTempDir dir("dataset_test");
  WriteFashionFiles(dir.path(), "train", 2, 4, 4);
  fs::remove(dir.path() + "/train-labels-idx1-ubyte.gz");
  auto train = OpenFashionMnist(dir.path(), /*train=*/true);
  ASSERT_FALSE(train.ok());
  EXPECT_EQ(train.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(train.status(), "train-labels-idx1-ubyte.gz"))
      << train.status();
}

TEST(FashionMnistTest, TruncatedGzipIsDataLossNamingTheFile) {
  ScopedTempDir dir("dataset_test");
  WriteFashionFiles(dir.path(), "train", 50, 28, 28);
  const std::string images = dir.path() + "/train-images-idx3-ubyte.gz";
  std::vector<uint8_t> bytes = ReadFile(images);
  bytes.resize(bytes.size() / 2);
  WriteFile(images, bytes);
  auto train = OpenFashionMnist(dir.path(), /*train=*/true);
  ASSERT_FALSE(train.ok());
  EXPECT_EQ(train.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(train.status(), images)) << train.status();
}

TEST(FashionMnistTest, CorruptGzipIsDataLoss) {
  ScopedTempDir dir("dataset_test");
  WriteFashionFiles(dir.path(), "train", 50, 28, 28);
  const std::string labels = dir.path() + "/train-labels-idx1-ubyte.gz";
  std::vector<uint8_t> bytes = ReadFile(labels);
  // Inside the deflate data (the gzip header is 10 bytes, the trailer 8).
  for (size_t i = 12; i + 8 < bytes.size(); i += 3) bytes[i] ^= 0x5A;
  WriteFile(labels, bytes);
  auto train = OpenFashionMnist(dir.path(), /*train=*/true);
  ASSERT_FALSE(train.ok());
  EXPECT_EQ(train.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(train.status(), labels)) << train.status();
}

TEST(FashionMnistTest, TruncatedPayloadIsDataLossNamingTheFile) {
  ScopedTempDir dir("dataset_test");
  WriteFashionFiles(dir.path(), "train", 5, 4, 4);
  const std::string images = dir.path() + "/train-images-idx3-ubyte.gz";
  // A valid gzip stream whose IDX header promises more than it holds.
  WriteGzip(images, IdxImages(2051, 5, 4, 4, Pattern(4 * 16 + 7, 1)));
  auto train = OpenFashionMnist(dir.path(), /*train=*/true);
  ASSERT_FALSE(train.ok());
  EXPECT_EQ(train.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(train.status(), images)) << train.status();
  EXPECT_TRUE(Contains(train.status(), "truncated")) << train.status();

  // A header cut short.
  WriteGzip(images, std::vector<uint8_t>{0, 0, 8, 3, 0, 0});
  train = OpenFashionMnist(dir.path(), /*train=*/true);
  ASSERT_FALSE(train.ok());
  EXPECT_EQ(train.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(train.status(), images)) << train.status();
}

TEST(FashionMnistTest, WrongMagicIsDataLossNamingTheFile) {
  ScopedTempDir dir("dataset_test");
  WriteFashionFiles(dir.path(), "train", 5, 4, 4);
  const std::string images = dir.path() + "/train-images-idx3-ubyte.gz";
  WriteGzip(images, IdxImages(2049, 5, 4, 4, Pattern(5 * 16, 1)));
  auto train = OpenFashionMnist(dir.path(), /*train=*/true);
  ASSERT_FALSE(train.ok());
  EXPECT_EQ(train.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(train.status(), images)) << train.status();
  EXPECT_TRUE(Contains(train.status(), "magic")) << train.status();

  const std::string labels = dir.path() + "/train-labels-idx1-ubyte.gz";
  WriteFashionFiles(dir.path(), "train", 5, 4, 4);
  WriteGzip(labels, IdxLabels(2051, 5, {0, 1, 2, 3, 4}));
  train = OpenFashionMnist(dir.path(), /*train=*/true);
  ASSERT_FALSE(train.ok());
  EXPECT_TRUE(Contains(train.status(), labels)) << train.status();
  EXPECT_TRUE(Contains(train.status(), "magic")) << train.status();
}

TEST(FashionMnistTest, LabelCountMismatchIsDataLoss) {
  ScopedTempDir dir("dataset_test");
  WriteFashionFiles(dir.path(), "train", 5, 4, 4);
  const std::string labels = dir.path() + "/train-labels-idx1-ubyte.gz";
  WriteGzip(labels, IdxLabels(2049, 4, {0, 1, 2, 3}));
  auto train = OpenFashionMnist(dir.path(), /*train=*/true);
  ASSERT_FALSE(train.ok());
  EXPECT_EQ(train.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(train.status(), labels)) << train.status();
}

TEST(FashionMnistTest, LabelOutOfRangeIsDataLoss) {
  ScopedTempDir dir("dataset_test");
  WriteFashionFiles(dir.path(), "train", 3, 4, 4);
  const std::string labels = dir.path() + "/train-labels-idx1-ubyte.gz";
  WriteGzip(labels, IdxLabels(2049, 3, {0, 10, 2}));
  auto train = OpenFashionMnist(dir.path(), /*train=*/true);
  ASSERT_FALSE(train.ok());
  EXPECT_EQ(train.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(train.status(), labels)) << train.status();
}

TEST(FashionMnistTest, OpenDatasetsAppliesTheTrainLimit) {
  ScopedTempDir dir("dataset_test");
  WriteFashionFiles(dir.path(), "train", 10, 4, 4);
  WriteFashionFiles(dir.path(), "t10k", 3, 4, 4);
  DataSpec spec;
  spec.path = dir.path();
  spec.limit = 4;
  absl::StatusOr<DatasetPair> pair = OpenDatasets(spec);
  ASSERT_TRUE(pair.ok()) << pair.status();
  EXPECT_EQ(pair->train->size(), 4);
  EXPECT_EQ(pair->test->size(), 3);
  EXPECT_EQ(pair->train->natural_size(), 4);
  EXPECT_EQ(pair->train->Label(3), 3);
  absl::StatusOr<Image> image = pair->train->Get(3);
  ASSERT_TRUE(image.ok());
  const std::vector<uint8_t> pixels = Pattern(10 * 16, 10);
  EXPECT_EQ(image->pixels,
            std::vector<uint8_t>(pixels.begin() + 48, pixels.begin() + 64));
  EXPECT_FALSE(pair->train->Get(4).ok());

  spec.limit = 0;
  pair = OpenDatasets(spec);
  ASSERT_TRUE(pair.ok());
  EXPECT_EQ(pair->train->size(), 10);

  spec.format = "tfrecord";
  EXPECT_EQ(OpenDatasets(spec).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(FashionMnistTest, RealDatasetHasExpectedSizes) {
  const std::string dir = "/usr/share/datasets/fashion-mnist";
  if (!fs::exists(dir + "/train-images-idx3-ubyte.gz")) {
    GTEST_SKIP() << dir << " not installed";
  }
  auto train = OpenFashionMnist(dir, /*train=*/true);
  ASSERT_TRUE(train.ok()) << train.status();
  auto test = OpenFashionMnist(dir, /*train=*/false);
  ASSERT_TRUE(test.ok()) << test.status();
  EXPECT_EQ((*train)->size(), 60000);
  EXPECT_EQ((*test)->size(), 10000);
  EXPECT_EQ((*train)->natural_size(), 28);
  std::vector<int64_t> per_class(10, 0);
  for (int64_t i = 0; i < (*train)->size(); ++i) {
    const int64_t label = (*train)->Label(i);
    ASSERT_GE(label, 0);
    ASSERT_LT(label, 10);
    ++per_class[label];
  }
  // Fashion-MNIST is balanced: 6000 train images per class.
  for (int64_t n : per_class) EXPECT_EQ(n, 6000);
  absl::StatusOr<Image> image = (*test)->Get(9999);
  ASSERT_TRUE(image.ok());
  EXPECT_EQ(image->pixels.size(), 784u);
}

// ---------------------------------------------------------------- ImageFolder

// A smooth image, which JPEG keeps within a few levels.
std::vector<uint8_t> Gradient(int width, int height, int channels) {
  std::vector<uint8_t> out;
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      for (int c = 0; c < channels; ++c) {
        out.push_back(static_cast<uint8_t>(20 + 3 * x + 2 * y + 30 * c));
      }
    }
  }
  return out;
}

int MaxAbsDiff(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  int worst = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    worst = std::max(worst, std::abs(int{a[i]} - int{b[i]}));
  }
  return worst;
}

TEST(ImageFolderTest, ListsClassesAndFilesSortedAndDecodes) {
  ScopedTempDir dir("dataset_test");
  const std::string root = dir.path() + "/data";
  const std::vector<uint8_t> rgb_png = Pattern(5 * 4 * 3, 9);
  const std::vector<uint8_t> rgb_jpeg = Gradient(32, 24, 3);
  const std::vector<uint8_t> gray_png = Pattern(6 * 3, 2);
  const std::vector<uint8_t> gray_jpeg = Gradient(16, 16, 1);
  // Created out of order; the listing sorts.
  WritePng(root + "/zebra/b.png", 5, 4, PNG_FORMAT_RGB, rgb_png);
  WriteJpeg(root + "/zebra/a.JPG", 32, 24, 3, rgb_jpeg);
  WritePng(root + "/ant/c.PNG", 6, 3, PNG_FORMAT_GRAY, gray_png);
  WriteJpeg(root + "/ant/d.jpeg", 16, 16, 1, gray_jpeg);
  WriteFile(root + "/ant/notes.txt", {'h', 'i'});
  WriteFile(root + "/README.png", {'x'});  // not in a class folder

  auto dataset = OpenImageFolder(root);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  ASSERT_EQ((*dataset)->size(), 4);
  EXPECT_EQ((*dataset)->num_classes(), 2);
  EXPECT_EQ((*dataset)->channels(), 3);
  EXPECT_EQ((*dataset)->natural_size(), 0);
  EXPECT_EQ((*dataset)->default_mean(),
            (std::vector<double>{0.485, 0.456, 0.406}));
  EXPECT_EQ((*dataset)->default_std(),
            (std::vector<double>{0.229, 0.224, 0.225}));
  EXPECT_EQ((*dataset)->Label(0), 0);  // ant/c.PNG
  EXPECT_EQ((*dataset)->Label(1), 0);  // ant/d.jpeg
  EXPECT_EQ((*dataset)->Label(2), 1);  // zebra/a.JPG
  EXPECT_EQ((*dataset)->Label(3), 1);  // zebra/b.png

  absl::StatusOr<Image> image = (*dataset)->Get(0);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->channels, 1);
  EXPECT_EQ(image->height, 3);
  EXPECT_EQ(image->width, 6);
  EXPECT_EQ(image->pixels, gray_png);

  image = (*dataset)->Get(1);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->channels, 1);
  EXPECT_EQ(image->height, 16);
  EXPECT_EQ(image->width, 16);
  ASSERT_EQ(image->pixels.size(), gray_jpeg.size());
  EXPECT_LE(MaxAbsDiff(image->pixels, gray_jpeg), 6);

  image = (*dataset)->Get(2);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->channels, 3);
  EXPECT_EQ(image->height, 24);
  EXPECT_EQ(image->width, 32);
  ASSERT_EQ(image->pixels.size(), rgb_jpeg.size());
  EXPECT_LE(MaxAbsDiff(image->pixels, rgb_jpeg), 12);

  image = (*dataset)->Get(3);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->channels, 3);
  EXPECT_EQ(image->height, 4);
  EXPECT_EQ(image->width, 5);
  EXPECT_EQ(image->pixels, rgb_png);
}

// A smooth 400x300 RGB picture: gradients and a disc, as a photo's large
// structures are (what a crop shrunk to a few dozen pixels keeps).
std::vector<uint8_t> Smooth(int width, int height) {
  std::vector<uint8_t> rgb(static_cast<size_t>(width) * height * 3);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      const bool disc = (x - 250) * (x - 250) + (y - 120) * (y - 120) < 60 * 60;
      uint8_t* p = &rgb[(static_cast<size_t>(y) * width + x) * 3];
      p[0] = static_cast<uint8_t>(255 * x / width);
      p[1] = static_cast<uint8_t>(disc ? 230 : 255 * y / height);
      p[2] = static_cast<uint8_t>(disc ? 40 : 128);
    }
  }
  return rgb;
}

// data.scaled_decode: a JPEG decodes at the n/8 the chooser picks, at the
// size libjpeg-turbo's DCT scaling gives (ceil(side * n / 8)), reporting the
// full size; and a view cut from that smaller decode (its crop box scaled)
// stays close to the same view of the full decode.
TEST(ImageFolderTest, ScaledDecodeShrinksJpegsAndKeepsTheirViews) {
  ScopedTempDir dir("dataset_test");
  WriteJpeg(dir.path() + "/a/x.jpg", 400, 300, 3, Smooth(400, 300), 95);
  auto dataset = OpenImageFolder(dir.path());
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  int64_t asked_height = 0, asked_width = 0;
  Image full_size;
  auto quarter = (*dataset)->GetScaled(
      0,
      [&](int64_t h, int64_t w) {
        asked_height = h;
        asked_width = w;
        return 2;
      },
      &full_size);
  ASSERT_TRUE(quarter.ok()) << quarter.status();
  EXPECT_EQ(asked_height, 300);
  EXPECT_EQ(asked_width, 400);
  EXPECT_EQ(full_size.height, 300);
  EXPECT_EQ(full_size.width, 400);
  EXPECT_EQ(quarter->height, 75);
  EXPECT_EQ(quarter->width, 100);
  EXPECT_EQ(quarter->pixels.size(), 75u * 100u * 3u);

  auto full = (*dataset)->Get(0);
  ASSERT_TRUE(full.ok());
  AugmentSpec spec;  // the geometry only: crop and flip
  spec.jitter_prob = 0;
  spec.grayscale_prob = 0;
  spec.blur_prob = 0;
  ViewFormat format;
  format.size = 32;
  const size_t n = 3 * 32 * 32;
  int scaled_views = 0;
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    const CropBox box = SampleCropBox(300, 400, spec, seed);
    const int eighths = DecodeEighths(&box, 1, format.size);
    if (eighths == 8) continue;
    ++scaled_views;
    Image size_seen;
    auto small = (*dataset)->GetScaled(
        0, [&](int64_t, int64_t) { return eighths; }, &size_seen);
    ASSERT_TRUE(small.ok());
    const CropBox scaled =
        ScaleCropBox(box, 300, 400, small->height, small->width);
    EXPECT_GE(std::min(scaled.height, scaled.width), format.size);
    std::vector<float> a(n), b(n);
    AugmentView(*full, spec, format, seed, a.data());
    AugmentViewInBox(*small, scaled, spec, format, seed, b.data());
    double total = 0;
    for (size_t i = 0; i < n; ++i) total += std::abs(a[i] - b[i]);
    EXPECT_LT(total / n, 0.03) << "seed " << seed << " at " << eighths << "/8";
  }
  EXPECT_GT(scaled_views, 10);
}

TEST(ImageFolderTest, GrayOnlyFolderHasOneChannel) {
  ScopedTempDir dir("dataset_test");
  WritePng(dir.path() + "/a/x.png", 4, 4, PNG_FORMAT_GRAY, Pattern(16, 1));
  WriteJpeg(dir.path() + "/b/y.jpg", 8, 8, 1, Gradient(8, 8, 1));
  auto dataset = OpenImageFolder(dir.path());
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ((*dataset)->channels(), 1);
}

TEST(ImageFolderTest, AlphaAndPaletteBecomeRgbOrGray) {
  ScopedTempDir dir("dataset_test");
  // RGBA: alpha dropped, colour kept.
  const std::vector<uint8_t> rgba = Pattern(3 * 2 * 4, 5);
  WritePng(dir.path() + "/c/1.png", 3, 2, PNG_FORMAT_RGBA, rgba);
  // Gray + alpha: one channel.
  const std::vector<uint8_t> gray_alpha = Pattern(2 * 2 * 2, 6);
  WritePng(dir.path() + "/c/2.png", 2, 2, PNG_FORMAT_GA, gray_alpha);
  // Palette: indices into an RGB colour map.
  const std::vector<uint8_t> colormap = {255, 0, 0, 0, 255, 0, 10, 20, 30};
  const std::vector<uint8_t> indices = {0, 1, 2, 2, 1, 0};
  WritePng(dir.path() + "/c/3.png", 3, 2, PNG_FORMAT_RGB_COLORMAP, indices,
           colormap);
  auto dataset = OpenImageFolder(dir.path());
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  ASSERT_EQ((*dataset)->size(), 3);

  absl::StatusOr<Image> image = (*dataset)->Get(0);
  ASSERT_TRUE(image.ok()) << image.status();
  ASSERT_EQ(image->channels, 3);
  std::vector<uint8_t> expected;
  for (size_t i = 0; i < rgba.size(); i += 4) {
    expected.insert(expected.end(), rgba.begin() + i, rgba.begin() + i + 3);
  }
  EXPECT_EQ(image->pixels, expected);

  image = (*dataset)->Get(1);
  ASSERT_TRUE(image.ok()) << image.status();
  ASSERT_EQ(image->channels, 1);
  expected.clear();
  for (size_t i = 0; i < gray_alpha.size(); i += 2) {
    expected.push_back(gray_alpha[i]);
  }
  EXPECT_EQ(image->pixels, expected);

  image = (*dataset)->Get(2);
  ASSERT_TRUE(image.ok()) << image.status();
  ASSERT_EQ(image->channels, 3);
  expected.clear();
  for (uint8_t index : indices) {
    expected.insert(expected.end(), colormap.begin() + 3 * index,
                    colormap.begin() + 3 * index + 3);
  }
  EXPECT_EQ(image->pixels, expected);
}

TEST(ImageFolderTest, TruncatedJpegIsDataLossNamingTheFile) {
  ScopedTempDir dir("dataset_test");
  const std::string good = dir.path() + "/k/good.jpg";
  const std::string cut = dir.path() + "/k/cut.jpg";
  WriteJpeg(good, 64, 64, 3, Pattern(64 * 64 * 3, 3));
  std::vector<uint8_t> bytes = ReadFile(good);
  bytes.resize(bytes.size() * 6 / 10);
  WriteFile(cut, bytes);
  auto dataset = OpenImageFolder(dir.path());
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  ASSERT_EQ((*dataset)->size(), 2);
  absl::StatusOr<Image> image = (*dataset)->Get(0);  // cut.jpg sorts first
  ASSERT_FALSE(image.ok());
  EXPECT_EQ(image.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(image.status(), cut)) << image.status();
  EXPECT_TRUE((*dataset)->Get(1).ok());

  // Cut inside the header as well.
  bytes.resize(100);
  WriteFile(cut, bytes);
  image = (*dataset)->Get(0);
  ASSERT_FALSE(image.ok());
  EXPECT_EQ(image.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(image.status(), cut)) << image.status();
}

TEST(ImageFolderTest, CorruptOrTruncatedPngIsDataLossNamingTheFile) {
  ScopedTempDir dir("dataset_test");
  const std::string good = dir.path() + "/k/a_good.png";
  const std::string bad = dir.path() + "/k/b_bad.png";
  WritePng(good, 16, 16, PNG_FORMAT_RGB, Pattern(16 * 16 * 3, 4));
  const std::vector<uint8_t> original = ReadFile(good);
  std::vector<uint8_t> bytes = original;
  // Damage the compressed pixel data (after the 8-byte signature and the
  // 25-byte IHDR chunk): the IDAT CRC no longer matches.
  for (size_t i = 50; i < bytes.size() - 20; i += 7) bytes[i] ^= 0xFF;
  WriteFile(bad, bytes);
  auto dataset = OpenImageFolder(dir.path());
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  absl::StatusOr<Image> image = (*dataset)->Get(1);
  ASSERT_FALSE(image.ok());
  EXPECT_EQ(image.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(image.status(), bad)) << image.status();

  bytes = original;
  bytes.resize(bytes.size() / 2);
  WriteFile(bad, bytes);
  image = (*dataset)->Get(1);
  ASSERT_FALSE(image.ok());
  EXPECT_EQ(image.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(image.status(), bad)) << image.status();
}

// Found by the png fuzz target: the header-only look took byte 25 for
// IHDR's colour type even when another chunk came first, which libpng
// reads past; an RGB folder was then opened as gray.
TEST(ImageFolderTest, PngWithAChunkBeforeIhdrHasTheChannelsItDecodesTo) {
  ScopedTempDir dir("dataset_test");
  const std::string path = dir.path() + "/k/a.png";
  WritePng(path, 4, 4, PNG_FORMAT_RGB, Pattern(4 * 4 * 3, 2));
  std::vector<uint8_t> bytes = ReadFile(path);
  // An ancillary chunk "abCd" of 13 zero bytes after the signature, with
  // its CRC: its byte at the file's offset 25 says "gray".
  std::vector<uint8_t> chunk = {0, 0, 0, 13, 'a', 'b', 'C', 'd'};
  chunk.resize(chunk.size() + 13, 0);
  const uLong crc = crc32(0, chunk.data() + 4, chunk.size() - 4);
  for (int shift = 24; shift >= 0; shift -= 8) chunk.push_back(crc >> shift);
  bytes.insert(bytes.begin() + 8, chunk.begin(), chunk.end());
  WriteFile(path, bytes);

  absl::StatusOr<Image> full =
      DecodeImage(bytes.data(), bytes.size(), path, /*header_only=*/false);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->channels, 3);
  absl::StatusOr<Image> header =
      DecodeImage(bytes.data(), bytes.size(), path, /*header_only=*/true);
  ASSERT_TRUE(header.ok()) << header.status();
  EXPECT_EQ(header->channels, 3);
  EXPECT_TRUE(header->pixels.empty());
  auto dataset = OpenImageFolder(dir.path());
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ((*dataset)->channels(), 3);
}

TEST(ImageFolderTest, FileThatIsNoImageIsDataLoss) {
  ScopedTempDir dir("dataset_test");
  WritePng(dir.path() + "/k/a.png", 2, 2, PNG_FORMAT_GRAY, Pattern(4, 1));
  const std::string text = dir.path() + "/k/b.jpg";
  WriteFile(text, {'n', 'o', 't', ' ', 'a', ' ', 'j', 'p', 'e', 'g'});
  auto dataset = OpenImageFolder(dir.path());
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  absl::StatusOr<Image> image = (*dataset)->Get(1);
  ASSERT_FALSE(image.ok());
  EXPECT_EQ(image.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(image.status(), text)) << image.status();
}

TEST(ImageFolderTest, MissingOrEmptyFolderIsNotFound) {
  ScopedTempDir dir("dataset_test");
  auto missing = OpenImageFolder(dir.path() + "/nothing");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(missing.status(), dir.path() + "/nothing"));

  auto no_classes = OpenImageFolder(dir.path());
  EXPECT_EQ(no_classes.status().code(), absl::StatusCode::kNotFound);

  fs::create_directories(dir.path() + "/empty_class");
  auto no_files = OpenImageFolder(dir.path());
  EXPECT_EQ(no_files.status().code(), absl::StatusCode::kNotFound);
}

TEST(ImageFolderTest, OpenDatasetsReadsTrainAndVal) {
  ScopedTempDir dir("dataset_test");
  for (const char* split : {"train", "val"}) {
    for (const char* cls : {"a", "b", "c"}) {
      for (int i = 0; i < 3; ++i) {
        WritePng(dir.path() + "/" + split + "/" + cls + "/" +
                     std::to_string(i) + ".png",
                 4, 4, PNG_FORMAT_RGB, Pattern(48, i));
      }
    }
  }
  DataSpec spec;
  spec.format = "image-folder";
  spec.path = dir.path();
  spec.limit = 5;
  absl::StatusOr<DatasetPair> pair = OpenDatasets(spec);
  ASSERT_TRUE(pair.ok()) << pair.status();
  EXPECT_EQ(pair->train->size(), 5);
  EXPECT_EQ(pair->test->size(), 9);
  EXPECT_EQ(pair->train->num_classes(), 3);
  EXPECT_EQ(pair->train->Label(4), 1);

  fs::rename(dir.path() + "/val", dir.path() + "/test");
  pair = OpenDatasets(spec);
  ASSERT_TRUE(pair.ok()) << pair.status();
  EXPECT_EQ(pair->test->size(), 9);

  fs::remove_all(dir.path() + "/test");
  EXPECT_EQ(OpenDatasets(spec).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace momentum::worker
