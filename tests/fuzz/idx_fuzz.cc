// libFuzzer target: the worker's Fashion-MNIST reader (OpenFashionMnist) on
// arbitrary IDX files. The input is two frames (tests/fuzz/frames.h): the
// images file and the labels file, written as train-images-idx3-ubyte.gz
// and train-labels-idx1-ubyte.gz (raw or gzip: the reader takes both).
// Properties: a refusal is DATA_LOSS or NOT_FOUND naming a file; a dataset
// that opens returns every image with rows * cols pixels and every label in
// [0, 10), and refuses indices outside it.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tests/fuzz/frames.h"
#include "worker/dataset.h"

namespace {

const std::string& Dir() {
  static const std::string* dir = [] {
    char pattern[] = "/tmp/idx_fuzz.XXXXXX";
    if (::mkdtemp(pattern) == nullptr) std::abort();
    std::atexit([] { std::filesystem::remove_all(Dir()); });
    return new std::string(pattern);
  }();
  return *dir;
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file << bytes;
  if (!file) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> frames = momentum::fuzz::SplitFrames(data, size);
  frames.resize(2);
  WriteFile(Dir() + "/train-images-idx3-ubyte.gz", frames[0]);
  WriteFile(Dir() + "/train-labels-idx1-ubyte.gz", frames[1]);
  absl::StatusOr<std::unique_ptr<momentum::worker::Dataset>> dataset =
      momentum::worker::OpenFashionMnist(Dir(), /*train=*/true);
  if (!dataset.ok()) {
    if ((dataset.status().code() != absl::StatusCode::kDataLoss &&
         dataset.status().code() != absl::StatusCode::kNotFound) ||
        dataset.status().message().find(Dir()) == absl::string_view::npos) {
      std::abort();
    }
    return 0;
  }
  const momentum::worker::Dataset& d = **dataset;
  for (int64_t i = 0; i < d.size(); ++i) {
    absl::StatusOr<momentum::worker::Image> image = d.Get(i);
    if (!image.ok() || image->channels != 1 ||
        static_cast<int64_t>(image->pixels.size()) !=
            image->height * image->width) {
      std::abort();
    }
    if (d.Label(i) < 0 || d.Label(i) >= d.num_classes()) std::abort();
  }
  if (d.Get(-1).ok() || d.Get(d.size()).ok()) std::abort();
  return 0;
}
