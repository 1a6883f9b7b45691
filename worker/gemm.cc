#include "worker/gemm.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOMENTUM_GEMM 1
#define MOMENTUM_AVX512 __attribute__((target("avx512f,fma")))
#endif

namespace momentum::worker {

#ifdef MOMENTUM_GEMM
namespace {

// Rows per block: 14 x 2 accumulators, two vectors of b and the broadcast
// fill 31 of the 32 registers.
constexpr int kRows = 14;

// Depth per pass: a block's rows of A (14 x 256 floats, 14 KiB) stay in L1
// and b's slab (256 x 32 floats, 32 KiB) in L2 while the rows go by. Each
// pass adds to what the one before stored, so the sums are the same as in
// one pass.
constexpr int64_t kDepth = 256;

// One block: R rows x V vectors of 16 columns, over the whole depth.
template <int R, int V>
MOMENTUM_AVX512 void Block(int64_t depth, const float* __restrict__ a,
                           int64_t a_row, int64_t a_depth,
                           const float* __restrict__ b, int64_t ldb,
                           float* __restrict__ out, int64_t ldo,
                           bool accumulate) {
  __m512 acc[R][V];
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      acc[r][v] = accumulate ? _mm512_loadu_ps(out + r * ldo + 16 * v)
                             : _mm512_setzero_ps();
    }
  }
  for (int64_t s = 0; s < depth; ++s) {
    const float* bs = b + s * ldb;
    __m512 bv[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) bv[v] = _mm512_loadu_ps(bs + 16 * v);
    const float* as = a + s * a_depth;
#pragma GCC unroll 14
    for (int r = 0; r < R; ++r) {
      const __m512 ar = _mm512_set1_ps(as[r * a_row]);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) {
        acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
      }
    }
  }
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      _mm512_storeu_ps(out + r * ldo + 16 * v, acc[r][v]);
    }
  }
}

using BlockFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*,
                         int64_t, float*, int64_t, bool);

template <int V, int... Rs>
constexpr std::array<BlockFn, sizeof...(Rs)> Blocks(
    std::integer_sequence<int, Rs...>) {
  return {Block<Rs + 1, V>...};
}

// BlockFor<V>[R - 1] is Block<R, V>.
template <int V>
constexpr std::array<BlockFn, kRows> kBlocks =
    Blocks<V>(std::make_integer_sequence<int, kRows>());

}  // namespace

void Gemm(int64_t rows, int64_t cols, int64_t depth, const float* a,
          int64_t a_row, int64_t a_depth, const float* b, int64_t ldb,
          float* out, int64_t ldo, bool accumulate) {
  for (int64_t s0 = 0; s0 < depth; s0 += kDepth) {
    const int64_t ds = std::min(kDepth, depth - s0);
    const bool add = accumulate || s0 > 0;
    const float* as = a + s0 * a_depth;
    const float* bs = b + s0 * ldb;
    for (int64_t k0 = 0; k0 < cols; k0 += 32) {
      const bool two = cols - k0 >= 32;
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        const int64_t r = std::min<int64_t>(kRows, rows - r0);
        const BlockFn fn = two ? kBlocks<2>[r - 1] : kBlocks<1>[r - 1];
        fn(ds, as + r0 * a_row, a_row, a_depth, bs + k0, ldb,
           out + r0 * ldo + k0, ldo, add);
      }
    }
  }
}

#else

void Gemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
          const float*, int64_t, float*, int64_t, bool) {}

#endif  // MOMENTUM_GEMM

}  // namespace momentum::worker
