#include "worker/conv_weights.h"

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

namespace momentum::worker {
namespace {

// The three re-layouts against ATen's permute / flip / contiguous, which
// define them (conv_weights.h): equal bit for bit, element by element, for
// the shapes the kernels see and odd ones (sizes not a multiple of the
// 16 x 16 block, one channel), from channels_last, contiguous and
// non-dense sources, on one and two threads.

struct Shape {
  int64_t k, c;
};

const std::vector<Shape> kShapes = {{16, 16}, {32, 16},  {16, 64},
                                    {64, 64}, {128, 64}, {17, 5},
                                    {1, 1},   {3, 40},   {512, 512}};

// Weights [K, C, 3, 3] with the given layout; "strided" is every other
// output channel of a larger tensor (not dense).
at::Tensor Weights(const Shape& s, const std::string& layout) {
  at::Tensor w = torch::randn({s.k, s.c, 3, 3});
  if (layout == "channels_last") {
    return w.contiguous(at::MemoryFormat::ChannelsLast);
  }
  if (layout == "strided") {
    return torch::randn({2 * s.k, s.c, 3, 3})
        .contiguous(at::MemoryFormat::ChannelsLast)
        .slice(0, 0, 2 * s.k, 2);
  }
  return w;
}

std::string Name(const Shape& s, const std::string& layout, int threads) {
  return "K=" + std::to_string(s.k) + " C=" + std::to_string(s.c) + " " +
         layout + ", " + std::to_string(threads) + " thread(s)";
}

class ConvWeightsTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    saved_ = at::get_num_threads();
    at::set_num_threads(GetParam());
  }
  void TearDown() override { at::set_num_threads(saved_); }

 private:
  int saved_ = 1;
};

TEST_P(ConvWeightsTest, TapsByInputIsThePermutedCopy) {
  for (const Shape& s : kShapes) {
    for (const std::string layout :
         {"channels_last", "contiguous", "strided"}) {
      SCOPED_TRACE(Name(s, layout, GetParam()));
      const at::Tensor w = Weights(s, layout);
      const at::Tensor ours = TapsByInput(w);
      const at::Tensor aten = w.permute({2, 3, 1, 0}).contiguous();
      EXPECT_EQ(ours.sizes(), aten.sizes());
      EXPECT_TRUE(ours.is_contiguous());
      EXPECT_TRUE(at::equal(ours, aten));
    }
  }
}

TEST_P(ConvWeightsTest, TapsByOutputFlippedIsTheFlippedPermutedCopy) {
  for (const Shape& s : kShapes) {
    for (const std::string layout :
         {"channels_last", "contiguous", "strided"}) {
      SCOPED_TRACE(Name(s, layout, GetParam()));
      const at::Tensor w = Weights(s, layout);
      const at::Tensor ours = TapsByOutputFlipped(w);
      const at::Tensor aten = w.flip({2, 3}).permute({2, 3, 0, 1}).contiguous();
      EXPECT_EQ(ours.sizes(), aten.sizes());
      EXPECT_TRUE(ours.is_contiguous());
      EXPECT_TRUE(at::equal(ours, aten));
      // And by the definition, one element: out[ky][kx][k][c] =
      // w[k][c][2 - ky][2 - kx].
      const int64_t k = s.k - 1, c = s.c / 2;
      EXPECT_EQ(ours[0][1][k][c].item<float>(), w[k][c][2][1].item<float>());
    }
  }
}

TEST_P(ConvWeightsTest, WeightsFromTapsIsTheInverse) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(Name(s, "taps", GetParam()));
    const at::Tensor taps = torch::randn({3, 3, s.c, s.k});
    const at::Tensor ours = WeightsFromTaps(taps);
    const at::Tensor aten =
        taps.permute({3, 2, 0, 1}).contiguous(at::MemoryFormat::ChannelsLast);
    EXPECT_EQ(ours.sizes(), aten.sizes());
    EXPECT_TRUE(ours.is_contiguous(at::MemoryFormat::ChannelsLast));
    EXPECT_TRUE(at::equal(ours, aten));
    // Round trip.
    EXPECT_TRUE(at::equal(TapsByInput(ours), taps));
  }
}

TEST_P(ConvWeightsTest, OtherDtypesGoThroughAten) {
  const at::Tensor w = torch::randn({32, 16, 3, 3}).to(at::kDouble);
  EXPECT_TRUE(at::equal(TapsByInput(w), w.permute({2, 3, 1, 0}).contiguous()));
  const at::Tensor h = w.to(at::kBFloat16);
  EXPECT_TRUE(at::equal(TapsByOutputFlipped(h),
                        h.flip({2, 3}).permute({2, 3, 0, 1}).contiguous()));
  const at::Tensor taps = torch::randn({3, 3, 16, 32}).to(at::kDouble);
  EXPECT_TRUE(at::equal(
      WeightsFromTaps(taps),
      taps.permute({3, 2, 0, 1}).contiguous(at::MemoryFormat::ChannelsLast)));
}

TEST_P(ConvWeightsTest, RefusesWhatIsNotThreeByThree) {
  EXPECT_THROW(TapsByInput(torch::randn({16, 16, 1, 1})), c10::Error);
  EXPECT_THROW(TapsByOutputFlipped(torch::randn({16, 16, 3})), c10::Error);
  EXPECT_THROW(WeightsFromTaps(torch::randn({16, 16, 3, 3})), c10::Error);
  EXPECT_THROW(TapsByInput(at::Tensor()), c10::Error);
}

INSTANTIATE_TEST_SUITE_P(Threads, ConvWeightsTest, ::testing::Values(1, 2),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return std::to_string(info.param) + "threads";
                         });

}  // namespace
}  // namespace momentum::worker
