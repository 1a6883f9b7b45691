// ImageFolder: a folder with one sub-folder per class, holding JPEG and PNG
// files, decoded with libjpeg(-turbo) and libpng on the caller's thread.
#include <png.h>
// jpeglib.h needs size_t and FILE declared before it.
#include <csetjmp>
#include <cstddef>
#include <cstdio>
// clang-format off
#include <jpeglib.h>
#include <jerror.h>
// clang-format on

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "worker/dataset.h"

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;

// Larger images are refused rather than allocated: 2^28 pixels is far beyond
// any training image and keeps a corrupt header from asking for gigabytes.
constexpr int64_t kMaxPixels = int64_t{1} << 28;

// ---------------------------------------------------------------- JPEG

// libjpeg reports fatal errors through error_exit, which must not return; we
// longjmp back to the decoder. It only *warns* about a premature end of the
// data (it pads with an EOI marker and fills the rest gray), so those
// warnings jump out as errors too; other warnings (extraneous bytes before a
// marker and the like) are tolerated, as PIL tolerates them.
struct JpegErrorManager {
  jpeg_error_mgr pub;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

[[noreturn]] void JpegErrorExit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void JpegEmitMessage(j_common_ptr cinfo, int level) {
  if (level >= 0) return;  // trace messages
  const int code = cinfo->err->msg_code;
  if (code == JWRN_JPEG_EOF || code == JWRN_HIT_MARKER) JpegErrorExit(cinfo);
  cinfo->err->num_warnings++;
}

struct JpegResult {
  int64_t full_height = 0;  // the image's size before any scaling
  int64_t full_width = 0;
  int64_t height = 0;
  int64_t width = 0;
  int64_t channels = 0;
  std::vector<uint8_t> pixels;
  std::vector<uint8_t> cmyk_row;
  std::string error;
};

// Returns false with result->error set on failure. Plain C-style state only:
// after longjmp we touch nothing but `cinfo` and `*result` through pointers
// that were not modified after setjmp.
bool DecodeJpegInto(const uint8_t* data, size_t size, bool header_only,
                    const Dataset::EighthsFn* eighths, JpegResult* result) {
  jpeg_decompress_struct cinfo;
  JpegErrorManager err;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = JpegErrorExit;
  err.pub.emit_message = JpegEmitMessage;
  if (setjmp(err.jump)) {
    result->error = err.message;
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  const bool cmyk =
      cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  if (cinfo.jpeg_color_space == JCS_GRAYSCALE) {
    cinfo.out_color_space = JCS_GRAYSCALE;
    result->channels = 1;
  } else if (cmyk) {
    cinfo.out_color_space = JCS_CMYK;
    result->channels = 3;
  } else {
    cinfo.out_color_space = JCS_RGB;
    result->channels = 3;
  }
  result->height = result->full_height = cinfo.image_height;
  result->width = result->full_width = cinfo.image_width;
  if (header_only) {
    jpeg_destroy_decompress(&cinfo);
    return true;
  }
  if (result->height * result->width > kMaxPixels) {
    std::snprintf(err.message, sizeof(err.message),
                  "%lldx%lld pixels exceed the limit",
                  static_cast<long long>(result->width),
                  static_cast<long long>(result->height));
    result->error = err.message;
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  if (eighths != nullptr) {
    const int n = (*eighths)(result->height, result->width);
    if (n >= 1 && n < 8) {
      // The DCT scales each 8x8 block to n x n: ceil(side * n / 8) pixels.
      cinfo.scale_num = static_cast<unsigned int>(n);
      cinfo.scale_denom = 8;
    }
  }
  jpeg_start_decompress(&cinfo);
  result->height = cinfo.output_height;
  result->width = cinfo.output_width;
  const int64_t row_bytes = result->width * result->channels;
  result->pixels.resize(result->height * row_bytes);
  if (cmyk) result->cmyk_row.resize(result->width * 4);
  // Adobe writes CMYK inverted (0 is full ink), which is what PIL assumes.
  const bool inverted = cinfo.saw_Adobe_marker;
  while (cinfo.output_scanline < cinfo.output_height) {
    uint8_t* out = result->pixels.data() + cinfo.output_scanline * row_bytes;
    JSAMPROW row = cmyk ? result->cmyk_row.data() : out;
    jpeg_read_scanlines(&cinfo, &row, 1);
    if (cmyk) {
      const uint8_t* in = result->cmyk_row.data();
      for (int64_t x = 0; x < result->width; ++x, in += 4, out += 3) {
        const int k = inverted ? in[3] : 255 - in[3];
        for (int c = 0; c < 3; ++c) {
          const int ink = inverted ? in[c] : 255 - in[c];
          out[c] = static_cast<uint8_t>((ink * k + 127) / 255);
        }
      }
    }
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return true;
}

// ---------------------------------------------------------------- PNG

struct PngState {
  const uint8_t* data = nullptr;
  size_t size = 0;
  size_t pos = 0;
  std::string error;
};

[[noreturn]] void PngError(png_structp png, png_const_charp message) {
  auto* state = static_cast<PngState*>(png_get_error_ptr(png));
  state->error = message;
  png_longjmp(png, 1);
}

// Warnings (a bad CRC in an ancillary chunk, an unknown chunk) do not make
// the pixels wrong; libpng already discards what it warns about.
void PngWarning(png_structp, png_const_charp) {}

void PngRead(png_structp png, png_bytep out, png_size_t n) {
  auto* state = static_cast<PngState*>(png_get_io_ptr(png));
  if (state->size - state->pos < n) png_error(png, "unexpected end of file");
  std::memcpy(out, state->data + state->pos, n);
  state->pos += n;
}

struct PngResult {
  int64_t height = 0;
  int64_t width = 0;
  int64_t channels = 0;
  std::vector<uint8_t> pixels;
  std::vector<png_bytep> rows;
};

// Gray (with or without alpha) decodes to 1 channel, everything else to RGB;
// alpha is dropped and 16-bit samples keep their high byte, as PIL's
// convert("RGB") / convert("L") do.
bool DecodePngInto(PngState* state, PngResult* result) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, state,
                                           PngError, PngWarning);
  if (png == nullptr) {
    state->error = "cannot allocate the PNG reader";
    return false;
  }
  png_infop info = png_create_info_struct(png);
  if (info == nullptr) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    state->error = "cannot allocate the PNG reader";
    return false;
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    return false;
  }
  png_set_read_fn(png, state, PngRead);
  png_read_info(png, info);
  const png_uint_32 width = png_get_image_width(png, info);
  const png_uint_32 height = png_get_image_height(png, info);
  const int color_type = png_get_color_type(png, info);
  const int bit_depth = png_get_bit_depth(png, info);
  if (static_cast<int64_t>(width) * height > kMaxPixels) {
    png_error(png, "image exceeds the pixel limit");
  }
  if (color_type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color_type == PNG_COLOR_TYPE_GRAY && bit_depth < 8) {
    png_set_expand_gray_1_2_4_to_8(png);
  }
  if (bit_depth == 16) png_set_strip_16(png);
  if (color_type & PNG_COLOR_MASK_ALPHA) png_set_strip_alpha(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const int channels = png_get_channels(png, info);
  if (channels != 1 && channels != 3)
    png_error(png, "unexpected channel count");
  result->height = height;
  result->width = width;
  result->channels = channels;
  const size_t row_bytes = png_get_rowbytes(png, info);
  if (row_bytes != static_cast<size_t>(width) * channels) {
    png_error(png, "unexpected row size");
  }
  result->pixels.resize(row_bytes * height);
  result->rows.resize(height);
  for (png_uint_32 y = 0; y < height; ++y) {
    result->rows[y] = result->pixels.data() + y * row_bytes;
  }
  png_read_image(png, result->rows.data());
  // Reads up to IEND, so a file cut after its pixel data still fails.
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return true;
}

// ---------------------------------------------------------------- decode

bool IsPng(const uint8_t* bytes, size_t size) {
  return size >= 8 && png_sig_cmp(bytes, 0, 8) == 0;
}

bool IsJpeg(const uint8_t* bytes, size_t size) {
  return size >= 2 && bytes[0] == 0xFF && bytes[1] == 0xD8;
}

}  // namespace

absl::StatusOr<Image> DecodeImage(const uint8_t* bytes, size_t size,
                                  const std::string& path, bool header_only,
                                  const Dataset::EighthsFn* eighths,
                                  Image* full) {
  Image image;
  if (IsJpeg(bytes, size)) {
    JpegResult result;
    if (!DecodeJpegInto(bytes, size, header_only, eighths, &result)) {
      return absl::DataLossError(
          absl::StrCat(path, ": undecodable JPEG: ", result.error));
    }
    if (full != nullptr) {
      full->height = result.full_height;
      full->width = result.full_width;
      full->channels = result.channels;
    }
    image.height = result.height;
    image.width = result.width;
    image.channels = result.channels;
    image.pixels = std::move(result.pixels);
  } else if (IsPng(bytes, size)) {
    // IHDR is the first chunk of a well-formed file: colour type at byte
    // 25; 0 and 4 are gray. libpng also reads a file with other chunks
    // before it (found by the png fuzz target), whose byte 25 is not the
    // colour type; such a file is decoded in full to learn its channels.
    if (header_only && size >= 26 && std::memcmp(bytes + 12, "IHDR", 4) == 0) {
      image.channels = (bytes[25] & PNG_COLOR_MASK_COLOR) ? 3 : 1;
      return image;
    }
    PngState state;
    state.data = bytes;
    state.size = size;
    PngResult result;
    if (!DecodePngInto(&state, &result)) {
      return absl::DataLossError(
          absl::StrCat(path, ": undecodable PNG: ", state.error));
    }
    image.height = result.height;
    image.width = result.width;
    image.channels = result.channels;
    if (!header_only) image.pixels = std::move(result.pixels);
    if (full != nullptr) {
      full->height = image.height;
      full->width = image.width;
      full->channels = image.channels;
    }
  } else {
    return absl::DataLossError(
        absl::StrCat(path, ": neither JPEG nor PNG (", size, " bytes)"));
  }
  if (!header_only && (image.height <= 0 || image.width <= 0)) {
    return absl::DataLossError(absl::StrCat(path, ": image has no pixels"));
  }
  return image;
}

namespace {

absl::StatusOr<Image> DecodeImageFile(
    const std::string& path, bool header_only,
    const Dataset::EighthsFn* eighths = nullptr, Image* full = nullptr) {
  absl::StatusOr<std::string> file = ReadWholeFile(path);
  if (!file.ok()) return file.status();
  return DecodeImage(reinterpret_cast<const uint8_t*>(file->data()),
                     file->size(), path, header_only, eighths, full);
}

bool HasImageExtension(const fs::path& path) {
  std::string ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  return ext == ".jpg" || ext == ".jpeg" || ext == ".png";
}

class ImageFolderDataset : public Dataset {
 public:
  ImageFolderDataset(std::vector<std::string> files,
                     std::vector<int32_t> labels, int64_t num_classes,
                     int64_t channels)
      : files_(std::move(files)),
        labels_(std::move(labels)),
        num_classes_(num_classes),
        channels_(channels) {}

  int64_t size() const override { return static_cast<int64_t>(files_.size()); }

  absl::StatusOr<Image> Get(int64_t index) const override {
    if (index < 0 || index >= size()) {
      return absl::OutOfRangeError(
          absl::StrCat("image index ", index, " not in [0, ", size(), ")"));
    }
    return DecodeImageFile(files_[index], /*header_only=*/false);
  }

  absl::StatusOr<Image> GetScaled(int64_t index, const EighthsFn& eighths,
                                  Image* full) const override {
    if (index < 0 || index >= size()) {
      return absl::OutOfRangeError(
          absl::StrCat("image index ", index, " not in [0, ", size(), ")"));
    }
    return DecodeImageFile(files_[index], /*header_only=*/false, &eighths,
                           full);
  }

  int64_t Label(int64_t index) const override { return labels_[index]; }
  int64_t num_classes() const override { return num_classes_; }
  int64_t channels() const override { return channels_; }
  int64_t natural_size() const override { return 0; }
  std::vector<double> default_mean() const override {
    return {0.485, 0.456, 0.406};
  }
  std::vector<double> default_std() const override {
    return {0.229, 0.224, 0.225};
  }

 private:
  std::vector<std::string> files_;
  std::vector<int32_t> labels_;
  int64_t num_classes_;
  int64_t channels_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Dataset>> OpenImageFolder(
    const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no such folder"));
  }
  std::vector<std::string> classes;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end;
       it.increment(ec)) {
    std::error_code type_ec;
    if (it->is_directory(type_ec)) {
      classes.push_back(it->path().filename().string());
    }
  }
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat(dir, ": cannot list: ", ec.message()));
  }
  if (classes.empty()) {
    return absl::NotFoundError(absl::StrCat(dir, ": no class folders"));
  }
  std::sort(classes.begin(), classes.end());

  // Like torchvision, files below a class folder are found recursively and
  // ordered by (folder, file name).
  std::vector<std::string> files;
  std::vector<int32_t> labels;
  std::vector<std::string> first_of_class;
  for (size_t label = 0; label < classes.size(); ++label) {
    const fs::path class_dir = fs::path(dir) / classes[label];
    std::vector<std::pair<std::string, std::string>> found;
    for (fs::recursive_directory_iterator
             it(class_dir, fs::directory_options::follow_directory_symlink, ec),
         end;
         !ec && it != end; it.increment(ec)) {
      std::error_code type_ec;
      if (it->is_regular_file(type_ec) && HasImageExtension(it->path())) {
        found.emplace_back(it->path().parent_path().string(),
                           it->path().filename().string());
      }
    }
    if (ec) {
      return absl::UnavailableError(
          absl::StrCat(class_dir.string(), ": cannot list: ", ec.message()));
    }
    std::sort(found.begin(), found.end());
    for (const auto& [folder, name] : found) {
      files.push_back((fs::path(folder) / name).string());
      labels.push_back(static_cast<int32_t>(label));
    }
    if (!found.empty())
      first_of_class.push_back(files[files.size() - found.size()]);
  }
  if (files.empty()) {
    return absl::NotFoundError(absl::StrCat(
        dir, ": no .jpg, .jpeg or .png files in its class folders"));
  }

  // channels() is 1 only when the first image of every class is gray: a
  // cheap look at a few headers instead of decoding the whole set.
  int64_t channels = 1;
  for (const std::string& path : first_of_class) {
    absl::StatusOr<Image> header = DecodeImageFile(path, /*header_only=*/true);
    if (!header.ok()) return header.status();
    if (header->channels != 1) {
      channels = 3;
      break;
    }
  }
  return std::unique_ptr<Dataset>(
      new ImageFolderDataset(std::move(files), std::move(labels),
                             static_cast<int64_t>(classes.size()), channels));
}

}  // namespace momentum::worker
