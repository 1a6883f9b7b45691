// Datasets of labelled images with random access: Fashion-MNIST (gzip IDX)
// and ImageFolder (one sub-folder per class, JPEG and PNG). Images are
// decoded on the caller's thread (the loader's threads), never cached decoded
// except for Fashion-MNIST, which is small enough to hold as bytes.
//
// Usage:
//   auto train = momentum::worker::OpenFashionMnist(dir, /*train=*/true);
//   if (!train.ok()) return train.status();
//   absl::StatusOr<Image> img = (*train)->Get(0);
#ifndef MOMENTUM_WORKER_DATASET_H_
#define MOMENTUM_WORKER_DATASET_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/job_spec.h"

namespace momentum::worker {

// One decoded image, HWC, 8 bits per channel.
struct Image {
  int64_t height = 0;
  int64_t width = 0;
  int64_t channels = 0;  // 1 (gray) or 3 (RGB)
  std::vector<uint8_t> pixels;
};

// Thread-safe for concurrent Get/Label calls after construction.
class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual int64_t size() const = 0;
  // Decodes image `index`. An undecodable or truncated file gives
  // DATA_LOSS naming the file.
  virtual absl::StatusOr<Image> Get(int64_t index) const = 0;
  // Picks the size to decode at from an image's full size: n of n/8 (1 to
  // 8; 8 is the full size).
  using EighthsFn = std::function<int(int64_t height, int64_t width)>;
  // Decodes image `index` smaller where its format allows it cheaply (JPEG:
  // libjpeg-turbo's DCT scaling, which decodes n/8 of each side for a
  // fraction of the work), at the n `eighths` picks; `*full` gets the size
  // of the full image (pixels left empty). The default decodes the full
  // image.
  virtual absl::StatusOr<Image> GetScaled(int64_t index,
                                          const EighthsFn& eighths,
                                          Image* full) const {
    absl::StatusOr<Image> image = Get(index);
    if (image.ok()) {
      full->height = image->height;
      full->width = image->width;
      full->channels = image->channels;
    }
    return image;
  }
  virtual int64_t Label(int64_t index) const = 0;
  virtual int64_t num_classes() const = 0;
  // Channels of the images (1 or 3), the natural side (28 for
  // Fashion-MNIST, 0 when sizes vary) and the normalisation defaults.
  virtual int64_t channels() const = 0;
  virtual int64_t natural_size() const = 0;
  virtual std::vector<double> default_mean() const = 0;
  virtual std::vector<double> default_std() const = 0;
};

// Reads {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz from `dir`. A missing,
// truncated or malformed file gives an error naming it.
absl::StatusOr<std::unique_ptr<Dataset>> OpenFashionMnist(
    const std::string& dir, bool train);

// Lists `dir`/<class>/<file>.{jpg,jpeg,png} (classes sorted by name, files
// sorted by name). Decoding happens in Get.
absl::StatusOr<std::unique_ptr<Dataset>> OpenImageFolder(
    const std::string& dir);

// Decodes one image file's bytes by content, not by extension: JPEG (by
// libjpeg-turbo) or PNG (by libpng); an undecodable or truncated image, or
// one of neither format, gives DATA_LOSS naming `path`. With `header_only`
// the pixels are left empty (JPEG: only the header is parsed; PNG: channels
// from IHDR). `eighths` (JPEG only) picks a DCT scale from the full size,
// which `full` (if given) receives. ImageFolder's Get and GetScaled call it
// on the files they read.
absl::StatusOr<Image> DecodeImage(const uint8_t* bytes, size_t size,
                                  const std::string& path, bool header_only,
                                  const Dataset::EighthsFn* eighths = nullptr,
                                  Image* full = nullptr);

struct DatasetPair {
  std::unique_ptr<Dataset> train;
  std::unique_ptr<Dataset> test;
};

// Opens the train and test sets the spec names (image-folder: path/train and
// path/val, or path/test). Applies data.limit to the train set.
absl::StatusOr<DatasetPair> OpenDatasets(const DataSpec& spec);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_DATASET_H_
