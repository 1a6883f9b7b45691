#include "worker/conv_weights.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "worker/cpu_features.h"

namespace momentum::worker {
namespace {

// Elements per side of a block: 16 rows of 16 floats are 16 cache lines on
// each side.
constexpr int64_t kBlock = 16;

// Where one 2-d slice of the nine taps starts, in elements.
using TapOffsets = std::array<int64_t, 9>;

// One block of rows x cols (kBlock x kBlock but at the edges) through a
// buffer in L1: read along the source's unit stride, written along the
// destination's. kSrcRowsUnit: the source's rows are adjacent (src_row is
// 1), else its columns are (or neither: the strides still hold);
// kDstRowsUnit likewise.
template <bool kSrcRowsUnit, bool kDstRowsUnit>
void CopyBlock(const float* s, int64_t src_row, int64_t src_col, float* d,
               int64_t dst_row, int64_t dst_col, int64_t rows, int64_t cols) {
  float buf[kBlock][kBlock];  // [i][j]
  if constexpr (kSrcRowsUnit) {
    for (int64_t j = 0; j < cols; ++j) {
      const float* column = s + j * src_col;
      for (int64_t i = 0; i < rows; ++i) buf[i][j] = column[i];
    }
  } else {
    for (int64_t i = 0; i < rows; ++i) {
      const float* row = s + i * src_row;
      for (int64_t j = 0; j < cols; ++j) buf[i][j] = row[j * src_col];
    }
  }
  if constexpr (kDstRowsUnit) {
    for (int64_t j = 0; j < cols; ++j) {
      float* column = d + j * dst_col;
      for (int64_t i = 0; i < rows; ++i) column[i] = buf[i][j];
    }
  } else {
    for (int64_t i = 0; i < rows; ++i) {
      float* row = d + i * dst_row;
      for (int64_t j = 0; j < cols; ++j) row[j * dst_col] = buf[i][j];
    }
  }
}

using BlockFn = void (*)(const float*, int64_t, int64_t, float*, int64_t,
                         int64_t, int64_t, int64_t);

#if defined(__x86_64__) && defined(__GNUC__)

// The 16 x 16 transpose in registers: vector a of the source (16 floats
// from s + a * s_stride) becomes lane a of every vector of the destination
// (16 floats to d + b * d_stride, b = 0..15). Four rounds of shuffles, each
// swapping ever larger sub-blocks (1, 2, 4 and 8 floats).
__attribute__((target("avx512f"))) void Transpose16(const float* s,
                                                    int64_t s_stride, float* d,
                                                    int64_t d_stride) {
  __m512 r[16], t[16];
  for (int a = 0; a < 16; ++a) r[a] = _mm512_loadu_ps(s + a * s_stride);
  for (int a = 0; a < 16; a += 2) {
    t[a] = _mm512_unpacklo_ps(r[a], r[a + 1]);
    t[a + 1] = _mm512_unpackhi_ps(r[a], r[a + 1]);
  }
  for (int a = 0; a < 16; a += 4) {
    for (int b = 0; b < 2; ++b) {
      const __m512d lo = _mm512_castps_pd(t[a + b]);
      const __m512d hi = _mm512_castps_pd(t[a + b + 2]);
      r[a + 2 * b] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
      r[a + 2 * b + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
    }
  }
  for (int a = 0; a < 16; a += 8) {
    for (int b = 0; b < 4; ++b) {
      t[a + b] = _mm512_shuffle_f32x4(r[a + b], r[a + b + 4], 0x88);
      t[a + b + 4] = _mm512_shuffle_f32x4(r[a + b], r[a + b + 4], 0xdd);
    }
  }
  for (int b = 0; b < 8; ++b) {
    r[b] = _mm512_shuffle_f32x4(t[b], t[b + 8], 0x88);
    r[b + 8] = _mm512_shuffle_f32x4(t[b], t[b + 8], 0xdd);
  }
  for (int b = 0; b < 16; ++b) _mm512_storeu_ps(d + b * d_stride, r[b]);
}

#else

void Transpose16(const float*, int64_t, float*, int64_t) {}

#endif

// For each tap t, rows i < rows and columns j < cols:
//   dst[dst_tap[t] + i * dst_row + j * dst_col] =
//       src[src_tap[t] + i * src_row + j * src_col]
// in kBlock x kBlock blocks, so that neither side's large stride leaves the
// cache between uses of a line; a full block whose unit strides cross (a
// transpose) in registers where the CPU has AVX-512. Rows adjacent on both
// sides (the flipped taps of channels_last weights) are copied whole.
void CopyTaps(const float* src, const TapOffsets& src_tap, int64_t src_row,
              int64_t src_col, float* dst, const TapOffsets& dst_tap,
              int64_t dst_row, int64_t dst_col, int64_t rows, int64_t cols) {
  const bool src_rows_unit = src_row == 1 && src_col != 1;
  const bool dst_rows_unit = dst_row == 1 && dst_col != 1;
  const BlockFn block =
      src_rows_unit
          ? (dst_rows_unit ? CopyBlock<true, true> : CopyBlock<true, false>)
          : (dst_rows_unit ? CopyBlock<false, true> : CopyBlock<false, false>);
  const bool whole_rows = src_col == 1 && dst_col == 1;
  // Vectors along the source's unit stride, stored along the destination's.
  const bool by_columns = src_rows_unit && dst_col == 1;  // load columns
  const bool by_rows = src_col == 1 && dst_rows_unit;     // load rows
  const bool transpose = CpuHasAvx512() && (by_columns || by_rows);
  const int64_t row_blocks = (rows + kBlock - 1) / kBlock;
  at::parallel_for(0, 9 * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / row_blocks;
      const int64_t i0 = item % row_blocks * kBlock;
      const int64_t i1 = std::min(rows, i0 + kBlock);
      const float* s = src + src_tap[t];
      float* d = dst + dst_tap[t];
      if (whole_rows) {
        for (int64_t i = i0; i < i1; ++i) {
          std::copy(s + i * src_row, s + i * src_row + cols, d + i * dst_row);
        }
        continue;
      }
      for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
        const int64_t j1 = std::min(cols, j0 + kBlock);
        const float* sb = s + i0 * src_row + j0 * src_col;
        float* db = d + i0 * dst_row + j0 * dst_col;
        if (transpose && i1 - i0 == kBlock && j1 - j0 == kBlock) {
          if (by_columns) {
            Transpose16(sb, src_col, db, dst_row);
          } else {
            Transpose16(sb, src_row, db, dst_col);
          }
        } else {
          block(sb, src_row, src_col, db, dst_row, dst_col, i1 - i0, j1 - j0);
        }
      }
    }
  });
}

// The strided copy for the dtypes the kernels use; other dtypes (which no
// kernel of ours takes) go through ATen.
bool Supported(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat;
}

void CheckWeight(const at::Tensor& w, const char* what) {
  TORCH_CHECK(w.defined() && w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3,
              what, ": the weights must be [K, C, 3, 3], got ",
              w.defined() ? w.sizes() : at::IntArrayRef());
}

}  // namespace

at::Tensor TapsByInput(const at::Tensor& weight) {
  CheckWeight(weight, "TapsByInput");
  if (!Supported(weight)) return weight.permute({2, 3, 1, 0}).contiguous();
  const int64_t K = weight.size(0), C = weight.size(1);
  at::Tensor out = at::empty({3, 3, C, K}, weight.options());
  TapOffsets src_tap, dst_tap;
  for (int64_t t = 0; t < 9; ++t) {
    src_tap[t] = t / 3 * weight.stride(2) + t % 3 * weight.stride(3);
    dst_tap[t] = t * C * K;
  }
  // Rows: input channels c; columns: output channels k.
  CopyTaps(weight.data_ptr<float>(), src_tap, weight.stride(1),
           weight.stride(0), out.data_ptr<float>(), dst_tap, K, 1, C, K);
  return out;
}

at::Tensor TapsByOutputFlipped(const at::Tensor& weight) {
  CheckWeight(weight, "TapsByOutputFlipped");
  if (!Supported(weight)) {
    return weight.flip({2, 3}).permute({2, 3, 0, 1}).contiguous();
  }
  const int64_t K = weight.size(0), C = weight.size(1);
  at::Tensor out = at::empty({3, 3, K, C}, weight.options());
  TapOffsets src_tap, dst_tap;
  for (int64_t t = 0; t < 9; ++t) {
    src_tap[t] =
        (2 - t / 3) * weight.stride(2) + (2 - t % 3) * weight.stride(3);
    dst_tap[t] = t * K * C;
  }
  // Rows: output channels k; columns: input channels c.
  CopyTaps(weight.data_ptr<float>(), src_tap, weight.stride(0),
           weight.stride(1), out.data_ptr<float>(), dst_tap, C, 1, K, C);
  return out;
}

at::Tensor WeightsFromTaps(const at::Tensor& taps) {
  TORCH_CHECK(taps.defined() && taps.dim() == 4 && taps.size(0) == 3 &&
                  taps.size(1) == 3,
              "WeightsFromTaps: the taps must be [3, 3, C, K], got ",
              taps.defined() ? taps.sizes() : at::IntArrayRef());
  if (!Supported(taps)) {
    return taps.permute({3, 2, 0, 1})
        .contiguous(at::MemoryFormat::ChannelsLast);
  }
  const int64_t C = taps.size(2), K = taps.size(3);
  at::Tensor out =
      at::empty({K, C, 3, 3},
                taps.options().memory_format(at::MemoryFormat::ChannelsLast));
  TapOffsets src_tap, dst_tap;
  for (int64_t t = 0; t < 9; ++t) {
    src_tap[t] = t / 3 * taps.stride(0) + t % 3 * taps.stride(1);
    dst_tap[t] = t / 3 * out.stride(2) + t % 3 * out.stride(3);
  }
  // Rows: input channels c; columns: output channels k.
  CopyTaps(taps.data_ptr<float>(), src_tap, taps.stride(2), taps.stride(3),
           out.data_ptr<float>(), dst_tap, out.stride(1), out.stride(0), C, K);
  return out;
}

}  // namespace momentum::worker
