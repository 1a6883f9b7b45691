#include "worker/winograd.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "worker/conv_weights.h"
#include "worker/gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOMENTUM_WINOGRAD 1
#define MOMENTUM_AVX512 __attribute__((target("avx512f,fma")))
#endif

namespace momentum::worker {
#ifdef MOMENTUM_WINOGRAD
namespace {

struct Geometry {
  int64_t n, H, W, TH, TW, tiles;
  explicit Geometry(const at::Tensor& t)
      : n(t.size(0)),
        H(t.size(2)),
        W(t.size(3)),
        TH((H + 1) / 2),
        TW((W + 1) / 2),
        tiles(n * TH * TW) {}

  // A tile: its image's offset in a tensor of `channels`, its top-left
  // output pixel (y, x), and whether its second row and column are inside.
  struct Tile {
    int64_t image, y, x;
    bool row1, col1;
  };
  Tile At(int64_t tile, int64_t channels) const {
    const int64_t y = tile / TW % TH * 2, x = tile % TW * 2;
    return {tile / (TH * TW) * H * W * channels, y, x, y + 1 < H, x + 1 < W};
  }
};

// Tiles per chunk: 128, more where the transformed weights are large (the
// GEMM packs them once per chunk, and the weight gradient's sums [16][C][K]
// are read and written once per chunk): 512 at 512 x 512 channels.
int64_t ChunkTiles(int64_t C, int64_t K, int64_t tiles) {
  return std::min<int64_t>(tiles, std::max<int64_t>(128, C * K / 512));
}

// V[p][t][c] = (B^T d B)[p] for the 4x4 input patch d of tiles t0..t0+tb-1.
MOMENTUM_AVX512 void InputTransform(const float* __restrict__ x,
                                    float* __restrict__ v, const Geometry& g,
                                    int64_t C, int64_t t0, int64_t tb,
                                    int64_t begin, int64_t end) {
  const int64_t plane = tb * C;
  for (int64_t t = begin; t < end; ++t) {
    const Geometry::Tile tile = g.At(t0 + t, C);
    const float* xi = x + tile.image;
    const int64_t y0 = tile.y - 1, x0 = tile.x - 1;
    bool inside[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        inside[i][j] =
            y0 + i >= 0 && y0 + i < g.H && x0 + j >= 0 && x0 + j < g.W;
      }
    }
    for (int64_t c = 0; c < C; c += 16) {
      __m512 d[4][4];
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          d[i][j] =
              inside[i][j]
                  ? _mm512_loadu_ps(xi + ((y0 + i) * g.W + x0 + j) * C + c)
                  : _mm512_setzero_ps();
        }
      }
      __m512 r[4][4];
      for (int j = 0; j < 4; ++j) {
        r[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
        r[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
        r[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
        r[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
      }
      float* out = v + t * C + c;
      for (int i = 0; i < 4; ++i) {
        _mm512_storeu_ps(out + (i * 4 + 0) * plane,
                         _mm512_sub_ps(r[i][0], r[i][2]));
        _mm512_storeu_ps(out + (i * 4 + 1) * plane,
                         _mm512_add_ps(r[i][1], r[i][2]));
        _mm512_storeu_ps(out + (i * 4 + 2) * plane,
                         _mm512_sub_ps(r[i][2], r[i][1]));
        _mm512_storeu_ps(out + (i * 4 + 3) * plane,
                         _mm512_sub_ps(r[i][1], r[i][3]));
      }
    }
  }
}

// y tile = A^T m A for M[p][t][k], inside the image only.
MOMENTUM_AVX512 void OutputTransform(const float* __restrict__ m,
                                     float* __restrict__ y, const Geometry& g,
                                     int64_t K, int64_t t0, int64_t tb,
                                     int64_t begin, int64_t end) {
  const int64_t plane = tb * K;
  for (int64_t t = begin; t < end; ++t) {
    const Geometry::Tile tile = g.At(t0 + t, K);
    float* yi = y + tile.image;
    for (int64_t k = 0; k < K; k += 16) {
      const float* in = m + t * K + k;
      __m512 s[2][4];
      for (int j = 0; j < 4; ++j) {
        const __m512 a = _mm512_loadu_ps(in + (0 * 4 + j) * plane);
        const __m512 b = _mm512_loadu_ps(in + (1 * 4 + j) * plane);
        const __m512 c = _mm512_loadu_ps(in + (2 * 4 + j) * plane);
        const __m512 d = _mm512_loadu_ps(in + (3 * 4 + j) * plane);
        s[0][j] = _mm512_add_ps(_mm512_add_ps(a, b), c);
        s[1][j] = _mm512_sub_ps(_mm512_sub_ps(b, c), d);
      }
      for (int a = 0; a < 2; ++a) {
        if (a == 1 && !tile.row1) break;
        float* out = yi + ((tile.y + a) * g.W + tile.x) * K + k;
        _mm512_storeu_ps(
            out, _mm512_add_ps(_mm512_add_ps(s[a][0], s[a][1]), s[a][2]));
        if (tile.col1) {
          _mm512_storeu_ps(
              out + K, _mm512_sub_ps(_mm512_sub_ps(s[a][1], s[a][2]), s[a][3]));
        }
      }
    }
  }
}

// dM[p][t][k] = (A dy A^T)[p] for the 2x2 output-gradient tile (zero
// outside the image).
MOMENTUM_AVX512 void GradTransform(const float* __restrict__ gy,
                                   float* __restrict__ dm, const Geometry& g,
                                   int64_t K, int64_t t0, int64_t tb,
                                   int64_t begin, int64_t end) {
  const int64_t plane = tb * K;
  for (int64_t t = begin; t < end; ++t) {
    const Geometry::Tile tile = g.At(t0 + t, K);
    const float* gi = gy + tile.image;
    for (int64_t k = 0; k < K; k += 16) {
      __m512 d[2][2];
      for (int a = 0; a < 2; ++a) {
        for (int b = 0; b < 2; ++b) {
          d[a][b] = (a == 1 && !tile.row1) || (b == 1 && !tile.col1)
                        ? _mm512_setzero_ps()
                        : _mm512_loadu_ps(
                              gi + ((tile.y + a) * g.W + tile.x + b) * K + k);
        }
      }
      __m512 r[4][2];
      for (int b = 0; b < 2; ++b) {
        r[0][b] = d[0][b];
        r[1][b] = _mm512_add_ps(d[0][b], d[1][b]);
        r[2][b] = _mm512_sub_ps(d[0][b], d[1][b]);
        r[3][b] = _mm512_sub_ps(_mm512_setzero_ps(), d[1][b]);
      }
      float* out = dm + t * K + k;
      for (int i = 0; i < 4; ++i) {
        _mm512_storeu_ps(out + (i * 4 + 0) * plane, r[i][0]);
        _mm512_storeu_ps(out + (i * 4 + 1) * plane,
                         _mm512_add_ps(r[i][0], r[i][1]));
        _mm512_storeu_ps(out + (i * 4 + 2) * plane,
                         _mm512_sub_ps(r[i][0], r[i][1]));
        _mm512_storeu_ps(out + (i * 4 + 3) * plane,
                         _mm512_sub_ps(_mm512_setzero_ps(), r[i][1]));
      }
    }
  }
}

// U[p][c][k] = (G w G^T)[p] of the weights w [ky][kx][C][K], 16 output
// channels at a time; G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2],
// [0, 0, 1]].
MOMENTUM_AVX512 void TransformWeightsKernel(const float* __restrict__ w,
                                            float* __restrict__ u, int64_t C,
                                            int64_t K) {
  const int64_t tap = C * K;
  const __m512 half = _mm512_set1_ps(0.5f);
  for (int64_t i = 0; i < C * K; i += 16) {
    __m512 g[3][3];
    for (int a = 0; a < 3; ++a) {
      for (int b = 0; b < 3; ++b) {
        g[a][b] = _mm512_loadu_ps(w + (a * 3 + b) * tap + i);
      }
    }
    // Rows: (G g), 4 x 3.
    __m512 r[4][3];
    for (int b = 0; b < 3; ++b) {
      r[0][b] = g[0][b];
      r[1][b] = _mm512_mul_ps(
          half, _mm512_add_ps(_mm512_add_ps(g[0][b], g[1][b]), g[2][b]));
      r[2][b] = _mm512_mul_ps(
          half, _mm512_add_ps(_mm512_sub_ps(g[0][b], g[1][b]), g[2][b]));
      r[3][b] = g[2][b];
    }
    for (int a = 0; a < 4; ++a) {
      float* out = u + a * 4 * tap + i;
      _mm512_storeu_ps(out, r[a][0]);
      _mm512_storeu_ps(
          out + tap,
          _mm512_mul_ps(
              half, _mm512_add_ps(_mm512_add_ps(r[a][0], r[a][1]), r[a][2])));
      _mm512_storeu_ps(
          out + 2 * tap,
          _mm512_mul_ps(
              half, _mm512_add_ps(_mm512_sub_ps(r[a][0], r[a][1]), r[a][2])));
      _mm512_storeu_ps(out + 3 * tap, r[a][2]);
    }
  }
}

// dw[a][b] = (G^T du G)[a][b] of du [4][4][C][K]: the gradient of the
// weights [ky][kx][C][K] from that of their transform.
MOMENTUM_AVX512 void WeightsGradKernel(const float* __restrict__ du,
                                       float* __restrict__ dw, int64_t C,
                                       int64_t K) {
  const int64_t tap = C * K;
  const __m512 half = _mm512_set1_ps(0.5f);
  for (int64_t i = 0; i < C * K; i += 16) {
    // Rows: G^T du, 3 x 4.
    __m512 r[3][4];
    for (int j = 0; j < 4; ++j) {
      const __m512 d0 = _mm512_loadu_ps(du + (0 * 4 + j) * tap + i);
      const __m512 d1 = _mm512_loadu_ps(du + (1 * 4 + j) * tap + i);
      const __m512 d2 = _mm512_loadu_ps(du + (2 * 4 + j) * tap + i);
      const __m512 d3 = _mm512_loadu_ps(du + (3 * 4 + j) * tap + i);
      r[0][j] = _mm512_fmadd_ps(half, _mm512_add_ps(d1, d2), d0);
      r[1][j] = _mm512_mul_ps(half, _mm512_sub_ps(d1, d2));
      r[2][j] = _mm512_fmadd_ps(half, _mm512_add_ps(d1, d2), d3);
    }
    for (int a = 0; a < 3; ++a) {
      float* out = dw + a * 3 * tap + i;
      _mm512_storeu_ps(
          out, _mm512_fmadd_ps(half, _mm512_add_ps(r[a][1], r[a][2]), r[a][0]));
      _mm512_storeu_ps(out + tap,
                       _mm512_mul_ps(half, _mm512_sub_ps(r[a][1], r[a][2])));
      _mm512_storeu_ps(
          out + 2 * tap,
          _mm512_fmadd_ps(half, _mm512_add_ps(r[a][1], r[a][2]), r[a][3]));
    }
  }
}

// fn(p) for the 16 positions of the 4x4 transforms, split over threads
// (each position's GEMM is one thread's: gemm.h).
template <typename Fn>
void EachPosition(const Fn& fn) {
  at::parallel_for(0, 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) fn(p);
  });
}

// U [16][C][K] of the taps [3][3][C][K] (conv_weights.h).
at::Tensor TransformTaps(const at::Tensor& taps) {
  const int64_t C = taps.size(2), K = taps.size(3);
  at::Tensor u = at::empty({16, C, K}, taps.options());
  TransformWeightsKernel(taps.data_ptr<float>(), u.data_ptr<float>(), C, K);
  return u;
}

// y [N, K, H, W] (channels_last) of x with transformed weights U [16][C][K].
at::Tensor Convolve(const at::Tensor& x, const at::Tensor& U) {
  const Geometry g(x);
  const int64_t C = U.size(1), K = U.size(2);
  at::Tensor y =
      at::empty({g.n, K, g.H, g.W},
                x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t tb = ChunkTiles(C, K, g.tiles);
  at::Tensor V = at::empty({16, tb, C}, x.options());
  at::Tensor M = at::empty({16, tb, K}, x.options());
  const float* xd = x.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  for (int64_t t0 = 0; t0 < g.tiles; t0 += tb) {
    const int64_t count = std::min(tb, g.tiles - t0);
    at::parallel_for(0, count, 8, [&](int64_t b, int64_t e) {
      InputTransform(xd, V.data_ptr<float>(), g, C, t0, tb, b, e);
    });
    // M[p] = V[p] U[p], 16 GEMMs [count x C] x [C x K] (the last chunk
    // fills the first `count` rows of each position).
    EachPosition([&](int64_t p) {
      Gemm(count, K, C, V.data_ptr<float>() + p * tb * C, C, 1,
           U.data_ptr<float>() + p * C * K, K, M.data_ptr<float>() + p * tb * K,
           K, /*accumulate=*/false);
    });
    at::parallel_for(0, count, 8, [&](int64_t b, int64_t e) {
      OutputTransform(M.data_ptr<float>(), yd, g, K, t0, tb, b, e);
    });
  }
  return y;
}

// The kernels' preconditions: an NHWC float32 CPU tensor of `channels`
// (a multiple of 16) channels; `what` names it in the error.
void CheckActivation(const at::Tensor& t, int64_t channels, const char* what) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() &&
                  t.scalar_type() == at::kFloat && t.dim() == 4 &&
                  t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "Winograd convolution: ", what,
              " must be a 4-d channels_last float32 CPU tensor");
  TORCH_CHECK(t.size(1) == channels, "Winograd convolution: ", what, " has ",
              t.size(1), " channels; the weights need ", channels);
  TORCH_CHECK(channels % 16 == 0, "Winograd convolution: ", what, " has ",
              channels, " channels, not a multiple of 16");
}

void CheckWeight(const at::Tensor& w) {
  TORCH_CHECK(w.defined() && w.device().is_cpu() &&
                  w.scalar_type() == at::kFloat && w.dim() == 4 &&
                  w.size(2) == 3 && w.size(3) == 3,
              "Winograd convolution: the weights must be [K, C, 3, 3] float32 "
              "on the CPU");
}

}  // namespace

at::Tensor WinogradForward(const at::Tensor& x, const at::Tensor& weight) {
  CheckWeight(weight);
  CheckActivation(x, weight.size(1), "the input");
  TORCH_CHECK(weight.size(0) % 16 == 0,
              "Winograd convolution: ", weight.size(0),
              " output channels, not a multiple of 16");
  return Convolve(x, TransformTaps(TapsByInput(weight)));
}

at::Tensor WinogradInputGrad(const at::Tensor& grad, const at::Tensor& weight) {
  CheckWeight(weight);
  CheckActivation(grad, weight.size(0), "the output's gradient");
  TORCH_CHECK(weight.size(1) % 16 == 0,
              "Winograd convolution: ", weight.size(1),
              " input channels, not a multiple of 16");
  // The convolution of the output's gradient with the weights turned 180
  // degrees, input and output channels swapped.
  return Convolve(grad, TransformTaps(TapsByOutputFlipped(weight)));
}

at::Tensor WinogradWeightGrad(const at::Tensor& x, const at::Tensor& grad) {
  CheckActivation(x, x.size(1), "the input");
  CheckActivation(grad, grad.size(1), "the output's gradient");
  TORCH_CHECK(x.size(0) == grad.size(0) && x.size(2) == grad.size(2) &&
                  x.size(3) == grad.size(3),
              "Winograd convolution: the input ", x.sizes(),
              " and the output's gradient ", grad.sizes(),
              " differ in batch or size");
  const Geometry g(x);
  const int64_t C = x.size(1), K = grad.size(1);
  const int64_t tb = ChunkTiles(C, K, g.tiles);
  at::Tensor V = at::empty({16, tb, C}, x.options());
  at::Tensor D = at::empty({16, tb, K}, x.options());
  at::Tensor dU = at::zeros({16, C, K}, x.options());
  const float* xd = x.data_ptr<float>();
  const float* gd = grad.data_ptr<float>();
  for (int64_t t0 = 0; t0 < g.tiles; t0 += tb) {
    const int64_t count = std::min(tb, g.tiles - t0);
    at::parallel_for(0, count, 8, [&](int64_t b, int64_t e) {
      InputTransform(xd, V.data_ptr<float>(), g, C, t0, tb, b, e);
      GradTransform(gd, D.data_ptr<float>(), g, K, t0, tb, b, e);
    });
    // dU[p] += V[p]^T dM[p].
    EachPosition([&](int64_t p) {
      Gemm(C, K, count, V.data_ptr<float>() + p * tb * C, 1, C,
           D.data_ptr<float>() + p * tb * K, K,
           dU.data_ptr<float>() + p * C * K, K, /*accumulate=*/true);
    });
  }
  at::Tensor dw = at::empty({3, 3, C, K}, x.options());
  WeightsGradKernel(dU.data_ptr<float>(), dw.data_ptr<float>(), C, K);
  // [ky][kx][C][K] -> [K, C, ky, kx] in channels_last, the weights' layout.
  return WeightsFromTaps(dw);
}

#else

at::Tensor WinogradForward(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "the Winograd convolution needs an x86-64 build");
}
at::Tensor WinogradInputGrad(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "the Winograd convolution needs an x86-64 build");
}
at::Tensor WinogradWeightGrad(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "the Winograd convolution needs an x86-64 build");
}

#endif  // MOMENTUM_WINOGRAD

}  // namespace momentum::worker
