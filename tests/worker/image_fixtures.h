// Test helpers for writing image datasets to disk: a scoped temporary
// folder, raw file reads and writes, and PNG and JPEG encoders (gray, RGB,
// alpha and palette PNGs; gray or RGB JPEGs). Shared by dataset_test and
// image_folder_training_test.
#ifndef MOMENTUM_TESTS_WORKER_IMAGE_FIXTURES_H_
#define MOMENTUM_TESTS_WORKER_IMAGE_FIXTURES_H_

#include <gtest/gtest.h>
#include <png.h>
#include <unistd.h>

#include <cstdio>
// clang-format off
#include <jpeglib.h>
// clang-format on

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include "absl/status/statusor.h"
#include "common/file_util.h"
#include "worker/augment.h"
#include "worker/dataset.h"

namespace momentum::worker::testing {

// An image of uniformly random bytes, the same for the same seed.
inline Image RandomImage(int64_t height, int64_t width, int64_t channels,
                         uint64_t seed) {
  Image image;
  image.height = height;
  image.width = width;
  image.channels = channels;
  image.pixels.resize(height * width * channels);
  Rng rng(seed);
  for (uint8_t& p : image.pixels) p = static_cast<uint8_t>(rng.Below(256));
  return image;
}

// A fresh folder under gtest's temporary directory, named
// `prefix`_XXXXXX, removed with everything in it on destruction.
class ScopedTempDir {
 public:
  explicit ScopedTempDir(const std::string& prefix = "momentum_test") {
    std::string pattern =
        (std::filesystem::path(::testing::TempDir()) / (prefix + "_XXXXXX"))
            .string();
    char* made = ::mkdtemp(pattern.data());
    EXPECT_NE(made, nullptr);
    path_ = pattern;
  }
  ~ScopedTempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScopedTempDir(const ScopedTempDir&) = delete;
  ScopedTempDir& operator=(const ScopedTempDir&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Writes `bytes` to `path`, creating its parent folders.
inline void WriteFile(const std::string& path,
                      const std::vector<uint8_t>& bytes) {
  std::filesystem::create_directories(
      std::filesystem::path(path).parent_path());
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  ASSERT_TRUE(out.good()) << path;
}

// The whole of `path`; empty if it cannot be read.
inline std::vector<uint8_t> ReadFile(const std::string& path) {
  const absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return {};
  return std::vector<uint8_t>(text->begin(), text->end());
}

// Writes 8-bit pixels with libpng's simplified API. `format` is a
// PNG_FORMAT_* value; with a colormap the pixels are palette indices.
inline void WritePng(const std::string& path, int width, int height,
                     uint32_t format, const std::vector<uint8_t>& pixels,
                     const std::vector<uint8_t>& colormap = {}) {
  std::filesystem::create_directories(
      std::filesystem::path(path).parent_path());
  png_image image;
  std::memset(&image, 0, sizeof(image));
  image.version = PNG_IMAGE_VERSION;
  image.width = width;
  image.height = height;
  image.format = format;
  if (!colormap.empty()) {
    image.colormap_entries =
        colormap.size() /
        PNG_IMAGE_SAMPLE_CHANNELS(format & ~PNG_FORMAT_FLAG_COLORMAP);
  }
  ASSERT_NE(
      png_image_write_to_file(&image, path.c_str(), 0, pixels.data(), 0,
                              colormap.empty() ? nullptr : colormap.data()),
      0)
      << path << ": " << image.message;
}

// Writes a baseline JPEG of `channels` 1 (gray) or 3 (RGB) interleaved
// 8-bit samples at the given quality.
inline void WriteJpeg(const std::string& path, int width, int height,
                      int channels, const std::vector<uint8_t>& pixels,
                      int quality = 95) {
  jpeg_compress_struct cinfo;
  jpeg_error_mgr jerr;
  cinfo.err = jpeg_std_error(&jerr);
  jpeg_create_compress(&cinfo);
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&cinfo, &buffer, &size);
  cinfo.image_width = width;
  cinfo.image_height = height;
  cinfo.input_components = channels;
  cinfo.in_color_space = channels == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(&cinfo);
  jpeg_set_quality(&cinfo, quality, TRUE);
  jpeg_start_compress(&cinfo, TRUE);
  while (cinfo.next_scanline < cinfo.image_height) {
    JSAMPROW row = const_cast<uint8_t*>(pixels.data()) +
                   cinfo.next_scanline * static_cast<size_t>(width) * channels;
    jpeg_write_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_compress(&cinfo);
  jpeg_destroy_compress(&cinfo);
  WriteFile(path, std::vector<uint8_t>(buffer, buffer + size));
  std::free(buffer);
}

}  // namespace momentum::worker::testing

#endif  // MOMENTUM_TESTS_WORKER_IMAGE_FIXTURES_H_
