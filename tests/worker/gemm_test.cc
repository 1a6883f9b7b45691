#include "worker/gemm.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "worker/cpu_features.h"

namespace momentum::worker {
namespace {

// Gemm against the float64 product of the same float32 inputs, element by
// element relative to the sum of the terms' magnitudes (a sum of n terms in
// order is within about n units in the last place of that); both ways round
// of A, with and without accumulating, at sizes that leave partial row
// blocks (not a multiple of 14), a lone 16-column slab (cols 16 mod 32) and
// several depth passes (depth over 256).

struct Case {
  int64_t rows, cols, depth;
};

std::string Name(const Case& c, bool transposed, bool accumulate) {
  return std::to_string(c.rows) + "x" + std::to_string(c.cols) + " depth " +
         std::to_string(c.depth) + (transposed ? " A^T" : " A") +
         (accumulate ? " +=" : " =");
}

const Case kCases[] = {{1, 16, 1},     {14, 32, 7},   {15, 48, 33},
                       {128, 64, 64},  {29, 16, 300}, {200, 96, 513},
                       {13, 128, 256}, {64, 512, 100}};

TEST(GemmTest, EqualsTheFloat64Product) {
  if (!CpuHasAvx512()) GTEST_SKIP() << "no AVX-512 on this CPU";
  torch::manual_seed(3);
  for (const Case& c : kCases) {
    for (const bool transposed : {false, true}) {
      for (const bool accumulate : {false, true}) {
        SCOPED_TRACE(Name(c, transposed, accumulate));
        // A(r, s): [rows, depth] row-major, or the transpose of a
        // [depth, rows] matrix (the weight gradient's V^T).
        const at::Tensor stored = transposed ? torch::randn({c.depth, c.rows})
                                             : torch::randn({c.rows, c.depth});
        const at::Tensor a = transposed ? stored.t() : stored;
        const at::Tensor b = torch::randn({c.depth, c.cols});
        const at::Tensor start = torch::randn({c.rows, c.cols});
        at::Tensor out =
            accumulate ? start.clone() : torch::full({c.rows, c.cols}, 7.0f);
        Gemm(c.rows, c.cols, c.depth, stored.data_ptr<float>(),
             transposed ? 1 : c.depth, transposed ? c.rows : 1,
             b.data_ptr<float>(), c.cols, out.data_ptr<float>(), c.cols,
             accumulate);
        const at::Tensor a64 = a.to(at::kDouble), b64 = b.to(at::kDouble);
        at::Tensor exact = at::matmul(a64, b64);
        at::Tensor scale = at::matmul(a64.abs(), b64.abs());
        if (accumulate) {
          exact = exact + start.to(at::kDouble);
          scale = scale + start.to(at::kDouble).abs();
        }
        const double ulp = 1.0 / (1 << 23);
        const at::Tensor err =
            (out.to(at::kDouble) - exact).abs() / (scale * ulp);
        // In units in the last place of the magnitudes' sum: at most the
        // number of roundings, depth + 1.
        EXPECT_LE(err.max().item<double>(), c.depth + 1.0);
        // And typically far less: a wrong index is off by whole terms.
        EXPECT_LT((out.to(at::kDouble) - exact).abs().max().item<double>(),
                  1e-4 * scale.max().item<double>());
      }
    }
  }
}

// Leading dimensions larger than the columns: blocks of a bigger matrix,
// as the Winograd buffers' chunks are; what lies between stays untouched.
TEST(GemmTest, WritesOnlyItsBlock) {
  if (!CpuHasAvx512()) GTEST_SKIP() << "no AVX-512 on this CPU";
  torch::manual_seed(4);
  const at::Tensor a = torch::randn({20, 40});  // uses [:, :24] as A
  const at::Tensor b = torch::randn({24, 80});  // uses [:, :32]
  at::Tensor out = torch::full({20, 64}, 5.0f);
  Gemm(20, 32, 24, a.data_ptr<float>(), 40, 1, b.data_ptr<float>(), 80,
       out.data_ptr<float>(), 64, /*accumulate=*/false);
  const at::Tensor exact = at::matmul(a.slice(1, 0, 24).to(at::kDouble),
                                      b.slice(1, 0, 32).to(at::kDouble));
  EXPECT_LT(
      (out.slice(1, 0, 32).to(at::kDouble) - exact).abs().max().item<double>(),
      1e-4);
  EXPECT_TRUE(at::equal(out.slice(1, 32, 64), torch::full({20, 32}, 5.0f)));
}

}  // namespace
}  // namespace momentum::worker
