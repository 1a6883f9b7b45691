// Helpers shared by the convolution kernels' tests (direct_conv_test,
// winograd_test).
#ifndef MOMENTUM_TESTS_WORKER_CONV_TEST_UTIL_H_
#define MOMENTUM_TESTS_WORKER_CONV_TEST_UTIL_H_

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <tuple>

namespace momentum::worker::conv_testing {

inline bool CpuHasAvx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Random [n, c, h, w] in channels_last, as the trainer's activations.
inline at::Tensor RandomNhwc(int64_t n, int64_t c, int64_t h, int64_t w) {
  return at::randn({n, c, h, w}).contiguous(at::MemoryFormat::ChannelsLast);
}

// "n x in -> out @ h x w".
inline std::string ShapeName(int64_t n, int64_t in, int64_t out, int64_t h,
                             int64_t w) {
  return std::to_string(n) + "x" + std::to_string(in) + "->" +
         std::to_string(out) + "@" + std::to_string(h) + "x" +
         std::to_string(w);
}

// The largest difference from `exact` (float64), relative to its largest
// element.
inline double RelativeError(const at::Tensor& a, const at::Tensor& exact) {
  return ((a.to(at::kDouble) - exact).abs().max() /
          exact.abs().max().clamp_min(1e-30))
      .item<double>();
}

// A test over (intra-op threads, shape): runs on that many threads and
// restores the count after.
template <class Shape>
class ThreadsAndShape
    : public ::testing::TestWithParam<std::tuple<int, Shape>> {
 protected:
  void SetUp() override { at::set_num_threads(std::get<0>(this->GetParam())); }
  void TearDown() override { at::set_num_threads(threads_); }
  Shape shape() const { return std::get<1>(this->GetParam()); }

 private:
  const int threads_ = at::get_num_threads();
};

}  // namespace momentum::worker::conv_testing

#endif  // MOMENTUM_TESTS_WORKER_CONV_TEST_UTIL_H_
