// Fashion-MNIST from its four gzip IDX files, held in memory as bytes, and
// OpenDatasets, which picks the reader the data spec names.
#include <sys/stat.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "worker/dataset.h"

namespace momentum::worker {
namespace {

constexpr uint32_t kImagesMagic = 2051;  // 0x00000803: uint8, 3 dimensions
constexpr uint32_t kLabelsMagic = 2049;  // 0x00000801: uint8, 1 dimension
constexpr int64_t kNumClasses = 10;

// Inflates a whole gzip file. gzread passes a file that is not gzip through
// unchanged, so an uncompressed IDX file is read as well.
absl::StatusOr<std::vector<uint8_t>> ReadGzipFile(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) {
      return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    }
    return absl::UnavailableError(absl::StrCat(path, ": ", std::strerror(err)));
  }
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) {
    return absl::UnavailableError(
        absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  gzbuffer(file, 1 << 17);
  std::vector<uint8_t> bytes;
  constexpr unsigned kChunk = 1 << 20;
  while (true) {
    const size_t old_size = bytes.size();
    bytes.resize(old_size + kChunk);
    const int n = gzread(file, bytes.data() + old_size, kChunk);
    if (n < 0) {
      bytes.resize(old_size);
      break;
    }
    bytes.resize(old_size + n);
    if (n == 0) break;
  }
  int errnum = Z_OK;
  const char* message = gzerror(file, &errnum);
  std::string what = message == nullptr ? "" : message;
  // zlib puts the path in front of its message; we name the file once.
  if (what.rfind(path + ": ", 0) == 0) what.erase(0, path.size() + 2);
  gzclose(file);
  if (errnum == Z_ERRNO) {
    return absl::UnavailableError(
        absl::StrCat(path, ": read failed: ", std::strerror(errno)));
  }
  if (errnum != Z_OK) {
    // Z_BUF_ERROR: the stream ends early ("unexpected end of file");
    // Z_DATA_ERROR: corrupt deflate data or a bad checksum.
    return absl::DataLossError(
        absl::StrCat(path, ": corrupt or truncated gzip data (", what, ")"));
  }
  return bytes;
}

uint32_t ReadBigEndian32(const uint8_t* p) {
  return (static_cast<uint32_t>(p[0]) << 24) |
         (static_cast<uint32_t>(p[1]) << 16) |
         (static_cast<uint32_t>(p[2]) << 8) | static_cast<uint32_t>(p[3]);
}

struct IdxImages {
  int64_t count = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<uint8_t> bytes;  // the header stays in front of the pixels
};

absl::StatusOr<IdxImages> ReadIdxImages(const std::string& path) {
  absl::StatusOr<std::vector<uint8_t>> bytes = ReadGzipFile(path);
  if (!bytes.ok()) return bytes.status();
  if (bytes->size() < 16) {
    return absl::DataLossError(absl::StrCat(path, ": truncated IDX header (",
                                            bytes->size(), " of 16 bytes)"));
  }
  const uint32_t magic = ReadBigEndian32(bytes->data());
  if (magic != kImagesMagic) {
    return absl::DataLossError(absl::StrCat(path, ": bad IDX magic number ",
                                            magic, " for images, expected ",
                                            kImagesMagic));
  }
  IdxImages images;
  images.count = ReadBigEndian32(bytes->data() + 4);
  images.rows = ReadBigEndian32(bytes->data() + 8);
  images.cols = ReadBigEndian32(bytes->data() + 12);
  if (images.rows <= 0 || images.cols <= 0 || images.rows > 65536 ||
      images.cols > 65536) {
    return absl::DataLossError(absl::StrCat(path, ": bad image dimensions ",
                                            images.rows, "x", images.cols));
  }
  // Compared by division: count * rows * cols may not fit in 64 bits.
  const int64_t plane = images.rows * images.cols;
  const int64_t actual = static_cast<int64_t>(bytes->size()) - 16;
  if (actual % plane != 0 || actual / plane != images.count) {
    return absl::DataLossError(absl::StrCat(
        path, ": ",
        actual / plane < images.count ? "truncated" : "trailing data",
        ": header says ", images.count, " images of ", images.rows, "x",
        images.cols, ", file has ", actual, " bytes of pixels"));
  }
  images.bytes = *std::move(bytes);
  return images;
}

absl::StatusOr<std::vector<uint8_t>> ReadIdxLabels(const std::string& path) {
  absl::StatusOr<std::vector<uint8_t>> bytes = ReadGzipFile(path);
  if (!bytes.ok()) return bytes.status();
  if (bytes->size() < 8) {
    return absl::DataLossError(absl::StrCat(path, ": truncated IDX header (",
                                            bytes->size(), " of 8 bytes)"));
  }
  const uint32_t magic = ReadBigEndian32(bytes->data());
  if (magic != kLabelsMagic) {
    return absl::DataLossError(absl::StrCat(path, ": bad IDX magic number ",
                                            magic, " for labels, expected ",
                                            kLabelsMagic));
  }
  const int64_t count = ReadBigEndian32(bytes->data() + 4);
  const int64_t actual = static_cast<int64_t>(bytes->size()) - 8;
  if (actual != count) {
    return absl::DataLossError(
        absl::StrCat(path, ": ", actual < count ? "truncated" : "trailing data",
                     ": header says ", count, " labels, file has ", actual));
  }
  std::vector<uint8_t> labels(bytes->begin() + 8, bytes->end());
  for (int64_t i = 0; i < count; ++i) {
    if (labels[i] >= kNumClasses) {
      return absl::DataLossError(absl::StrCat(path, ": label ", labels[i],
                                              " of item ", i, " is not in [0, ",
                                              kNumClasses, ")"));
    }
  }
  return labels;
}

class FashionMnistDataset : public Dataset {
 public:
  FashionMnistDataset(IdxImages images, std::vector<uint8_t> labels)
      : images_(std::move(images)), labels_(std::move(labels)) {}

  int64_t size() const override { return images_.count; }

  absl::StatusOr<Image> Get(int64_t index) const override {
    if (index < 0 || index >= images_.count) {
      return absl::OutOfRangeError(absl::StrCat(
          "Fashion-MNIST index ", index, " not in [0, ", images_.count, ")"));
    }
    const int64_t plane = images_.rows * images_.cols;
    Image image;
    image.height = images_.rows;
    image.width = images_.cols;
    image.channels = 1;
    const uint8_t* first = images_.bytes.data() + 16 + index * plane;
    image.pixels.assign(first, first + plane);
    return image;
  }

  int64_t Label(int64_t index) const override { return labels_[index]; }
  int64_t num_classes() const override { return kNumClasses; }
  int64_t channels() const override { return 1; }
  int64_t natural_size() const override {
    return images_.rows == images_.cols ? images_.rows : 0;
  }
  std::vector<double> default_mean() const override { return {0.2860}; }
  std::vector<double> default_std() const override { return {0.3530}; }

 private:
  IdxImages images_;
  std::vector<uint8_t> labels_;
};

// The first `limit` items of another dataset (data.limit).
class PrefixDataset : public Dataset {
 public:
  PrefixDataset(std::unique_ptr<Dataset> base, int64_t limit)
      : base_(std::move(base)), size_(std::min(limit, base_->size())) {}

  int64_t size() const override { return size_; }
  absl::StatusOr<Image> Get(int64_t index) const override {
    if (index < 0 || index >= size_) {
      return absl::OutOfRangeError(
          absl::StrCat("index ", index, " not in [0, ", size_, ")"));
    }
    return base_->Get(index);
  }
  int64_t Label(int64_t index) const override { return base_->Label(index); }
  int64_t num_classes() const override { return base_->num_classes(); }
  int64_t channels() const override { return base_->channels(); }
  int64_t natural_size() const override { return base_->natural_size(); }
  std::vector<double> default_mean() const override {
    return base_->default_mean();
  }
  std::vector<double> default_std() const override {
    return base_->default_std();
  }

 private:
  std::unique_ptr<Dataset> base_;
  int64_t size_;
};

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Dataset>> OpenFashionMnist(
    const std::string& dir, bool train) {
  const std::string prefix = absl::StrCat(dir, "/", train ? "train" : "t10k");
  const std::string images_path = prefix + "-images-idx3-ubyte.gz";
  const std::string labels_path = prefix + "-labels-idx1-ubyte.gz";
  absl::StatusOr<IdxImages> images = ReadIdxImages(images_path);
  if (!images.ok()) return images.status();
  absl::StatusOr<std::vector<uint8_t>> labels = ReadIdxLabels(labels_path);
  if (!labels.ok()) return labels.status();
  if (static_cast<int64_t>(labels->size()) != images->count) {
    return absl::DataLossError(absl::StrCat(labels_path, ": ", labels->size(),
                                            " labels but ", images_path,
                                            " has ", images->count, " images"));
  }
  return std::unique_ptr<Dataset>(
      new FashionMnistDataset(*std::move(images), *std::move(labels)));
}

absl::StatusOr<DatasetPair> OpenDatasets(const DataSpec& spec) {
  DatasetPair pair;
  if (spec.format == "fashion-mnist") {
    absl::StatusOr<std::unique_ptr<Dataset>> train =
        OpenFashionMnist(spec.path, /*train=*/true);
    if (!train.ok()) return train.status();
    absl::StatusOr<std::unique_ptr<Dataset>> test =
        OpenFashionMnist(spec.path, /*train=*/false);
    if (!test.ok()) return test.status();
    pair.train = *std::move(train);
    pair.test = *std::move(test);
  } else if (spec.format == "image-folder") {
    absl::StatusOr<std::unique_ptr<Dataset>> train =
        OpenImageFolder(spec.path + "/train");
    if (!train.ok()) return train.status();
    std::string test_dir = spec.path + "/val";
    if (!IsDirectory(test_dir)) test_dir = spec.path + "/test";
    if (!IsDirectory(test_dir)) {
      return absl::NotFoundError(absl::StrCat(
          spec.path, ": no val/ or test/ folder for the evaluation set"));
    }
    absl::StatusOr<std::unique_ptr<Dataset>> test = OpenImageFolder(test_dir);
    if (!test.ok()) return test.status();
    pair.train = *std::move(train);
    pair.test = *std::move(test);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "data.format must be fashion-mnist or image-folder, got \"",
        spec.format, "\""));
  }
  if (spec.limit > 0 && spec.limit < pair.train->size()) {
    pair.train =
        std::make_unique<PrefixDataset>(std::move(pair.train), spec.limit);
  }
  return pair;
}

}  // namespace momentum::worker
