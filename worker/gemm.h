// A float32 matrix product for the Winograd convolution's GEMMs
// (winograd.h) on CPUs with AVX-512:
//
//   out[r][k] (+)= sum over s of A(r, s) * b[s][k]
//
// for rows r < rows, columns k < cols (a multiple of 16) and depth s <
// depth, where A(r, s) = a[r * a_row + s * a_depth] may be either way round
// (the forward pass's V [tiles][C] times U [C][K]: a_row = C, a_depth = 1;
// the weight gradient's V^T D, V [tiles][C]: a_row = 1, a_depth = C), and
// b and out have unit column stride.
//
// Each call of the kernel keeps a block of 14 rows x 32 columns of `out`
// in 28 of the 32 AVX-512 registers while the depth goes by: two vectors of
// b's row, and for each row one fused multiply-add per vector with A(r, s)
// broadcast from memory, as the direct convolution does (direct_conv.h).
// Blocks go column slab by column slab, so that b's slab (depth x 32) stays
// in L2 while the rows go by; the depth goes 256 at a time. One core of an
// AMD EPYC, the Winograd layers' 16 products of 128 or 512 tiles, GFLOP/s,
// MKL's sgemm (at::bmm, baddbmm) -> this: 64 and 128 channels in and out
// 75-98 -> 81-111, 256 84-96 -> 90-95, 512 86-98 -> 79-99 (the one shape
// where it is slower: 512 x 512 with 128 tiles, which winograd.cc does not
// use). The Winograd layers of a width-64 ResNet-18 ran 4-13% faster for it
// (winograd.h).
//
// The sum over s runs in order, one multiply-add each into the element's
// accumulator (with `accumulate`, starting from out's value). MKL sums in
// blocks of its own, so the two differ by rounding (gemm_test: within a few
// units in the last place, relative to the sum of |terms|, of float64).
//
// Usage:
//   Gemm(tiles, K, C, v, C, 1, u, K, m, K, /*accumulate=*/false);
#ifndef MOMENTUM_WORKER_GEMM_H_
#define MOMENTUM_WORKER_GEMM_H_

#include <cstdint>

namespace momentum::worker {

// As above, on a CPU with AVX-512 (CpuHasAvx512, cpu_features.h). cols must
// be a multiple of 16; nothing is checked beyond that (the callers' tensors
// are checked where they are made). One thread.
void Gemm(int64_t rows, int64_t cols, int64_t depth, const float* a,
          int64_t a_row, int64_t a_depth, const float* b, int64_t ldb,
          float* out, int64_t ldo, bool accumulate);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_GEMM_H_
