// Small datasets on disk for trainer tests: Fashion-MNIST-format gzip IDX
// files with random images of a given side.
#ifndef MOMENTUM_TESTS_WORKER_TEST_DATA_H_
#define MOMENTUM_TESTS_WORKER_TEST_DATA_H_

#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace momentum::worker::testing {

inline void WriteBigEndian(std::vector<uint8_t>* out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8)
    out->push_back((v >> shift) & 0xff);
}

inline void WriteGz(const std::string& path,
                    const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}

// Writes {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz into `dir` with
// `train` and `test` images of side `side`. Each class draws its pixels
// around its own mean, so the classes are learnable.
inline void WriteFakeFashionMnist(const std::string& dir, int64_t train,
                                  int64_t test, int64_t side,
                                  uint32_t seed = 7) {
  std::filesystem::create_directories(dir);
  std::mt19937 rng(seed);
  for (const auto& [prefix, n] : std::vector<std::pair<std::string, int64_t>>{
           {"train", train}, {"t10k", test}}) {
    std::vector<uint8_t> images, labels;
    WriteBigEndian(&images, 2051);
    WriteBigEndian(&images, static_cast<uint32_t>(n));
    WriteBigEndian(&images, static_cast<uint32_t>(side));
    WriteBigEndian(&images, static_cast<uint32_t>(side));
    WriteBigEndian(&labels, 2049);
    WriteBigEndian(&labels, static_cast<uint32_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int label = static_cast<int>(rng() % 10);
      labels.push_back(static_cast<uint8_t>(label));
      for (int64_t p = 0; p < side * side; ++p) {
        const int v = label * 25 + static_cast<int>(rng() % 40);
        images.push_back(static_cast<uint8_t>(std::min(v, 255)));
      }
    }
    WriteGz(dir + "/" + prefix + "-images-idx3-ubyte.gz", images);
    WriteGz(dir + "/" + prefix + "-labels-idx1-ubyte.gz", labels);
  }
}

inline std::string TempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             ("momentum-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

}  // namespace momentum::worker::testing

#endif  // MOMENTUM_TESTS_WORKER_TEST_DATA_H_
