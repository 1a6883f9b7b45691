// Splits a fuzzer's input into frames, so that one input holds a sequence
// of messages: each frame is a 2-byte little-endian length and that many
// bytes; a last frame longer than what is left takes the rest. The seed
// generator (tests/fuzz/make_seeds.py) writes the same format.
#ifndef MOMENTUM_TESTS_FUZZ_FRAMES_H_
#define MOMENTUM_TESTS_FUZZ_FRAMES_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace momentum::fuzz {

inline std::vector<std::string> SplitFrames(const uint8_t* data, size_t size) {
  std::vector<std::string> frames;
  size_t pos = 0;
  while (size - pos >= 2) {
    const size_t length = data[pos] | (size_t{data[pos + 1]} << 8);
    pos += 2;
    const size_t take = length < size - pos ? length : size - pos;
    frames.emplace_back(reinterpret_cast<const char*>(data + pos), take);
    pos += take;
  }
  return frames;
}

}  // namespace momentum::fuzz

#endif  // MOMENTUM_TESTS_FUZZ_FRAMES_H_
