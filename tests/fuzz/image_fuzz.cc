// libFuzzer target: the worker's image decoder (DecodeImage: libpng and
// libjpeg-turbo behind our error handling) on arbitrary file contents; the
// png and jpeg targets are this one with seed corpora of each format. The
// first byte picks the mode: header only, full size, or a DCT scale of n/8
// (JPEG). Properties: a refusal is DATA_LOSS naming the file; a decoded
// image has 1 or 3 channels, a positive size within the reader's limit and
// height * width * channels pixels; a header-only decode agrees with the
// full decode on the channels.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "worker/dataset.h"

namespace {

constexpr char kName[] = "fuzz/class/image";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const int mode = data[0] % 10;  // 0: header only; 1..8: eighths; 9: full
  ++data;
  --size;
  using momentum::worker::Image;
  const int eighths = mode;
  const momentum::worker::Dataset::EighthsFn pick = [&](int64_t, int64_t) {
    return eighths;
  };
  Image full;
  absl::StatusOr<Image> image = momentum::worker::DecodeImage(
      data, size, kName, /*header_only=*/mode == 0,
      mode >= 1 && mode <= 8 ? &pick : nullptr, &full);
  if (!image.ok()) {
    if (image.status().code() != absl::StatusCode::kDataLoss ||
        image.status().message().find(kName) == absl::string_view::npos) {
      std::abort();
    }
    return 0;
  }
  if (image->channels != 1 && image->channels != 3) std::abort();
  if (mode == 0) {
    if (!image->pixels.empty()) std::abort();
    absl::StatusOr<Image> decoded =
        momentum::worker::DecodeImage(data, size, kName, false);
    if (decoded.ok() && decoded->channels != image->channels) std::abort();
    return 0;
  }
  if (image->height <= 0 || image->width <= 0 ||
      image->height * image->width > (int64_t{1} << 28) ||
      static_cast<int64_t>(image->pixels.size()) !=
          image->height * image->width * image->channels) {
    std::abort();
  }
  return 0;
}
