#include "worker/loader.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "worker/device_augment.h"

namespace momentum::worker {
namespace {

// `n` small gray images with known pixels; Get(fail_at) fails like a
// truncated file would.
class FakeDataset : public Dataset {
 public:
  explicit FakeDataset(int64_t n, int64_t fail_at = -1)
      : n_(n), fail_at_(fail_at) {}

  int64_t size() const override { return n_; }
  absl::StatusOr<Image> Get(int64_t index) const override {
    if (index == fail_at_) {
      return absl::DataLossError(
          absl::StrCat("fake/img_", index, ".png: truncated"));
    }
    Image image;
    image.height = 12;
    image.width = 12;
    image.channels = 1;
    for (int64_t i = 0; i < 144; ++i) {
      image.pixels.push_back(static_cast<uint8_t>(index * 7 + i * 13));
    }
    return image;
  }
  int64_t Label(int64_t index) const override { return index % 5; }
  int64_t num_classes() const override { return 5; }
  int64_t channels() const override { return 1; }
  int64_t natural_size() const override { return 12; }
  std::vector<double> default_mean() const override { return {0.5}; }
  std::vector<double> default_std() const override { return {0.25}; }

 private:
  int64_t n_;
  int64_t fail_at_;
};

LoaderOptions Options(int64_t global_batch, int64_t rank, int64_t world,
                      int64_t threads) {
  LoaderOptions options;
  options.global_batch = global_batch;
  options.rank = rank;
  options.world_size = world;
  options.threads = threads;
  options.prefetch = 3;
  options.seed = 1234;
  options.format.channels = 3;
  options.format.size = 10;
  options.format.mean = {0.5f};
  options.format.std = {0.25f};
  return options;
}

std::vector<int64_t> Indices(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(),
                              c.data_ptr<int64_t>() + c.numel());
}

// All batches of one epoch, then the status that ended it.
std::vector<TrainBatch> Drain(TrainLoader& loader, absl::Status* end) {
  std::vector<TrainBatch> batches;
  while (true) {
    absl::StatusOr<TrainBatch> batch = loader.Next();
    if (!batch.ok()) {
      *end = batch.status();
      return batches;
    }
    batches.push_back(*std::move(batch));
  }
}

void ExpectSameBatch(const TrainBatch& a, const TrainBatch& b) {
  EXPECT_EQ(a.epoch, b.epoch);
  EXPECT_EQ(a.step_in_epoch, b.step_in_epoch);
  EXPECT_TRUE(at::equal(a.index, b.index));
  EXPECT_TRUE(at::equal(a.label, b.label));
  EXPECT_TRUE(at::equal(a.query, b.query));
  EXPECT_TRUE(at::equal(a.key, b.key));
}

TEST(LoaderTest, EpochPermutationIsAStableSeededPermutation) {
  const std::vector<int64_t> p = EpochPermutation(1000, 7, 3);
  std::vector<int64_t> sorted = p;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> identity(1000);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(sorted, identity);
  EXPECT_NE(p, identity);
  EXPECT_EQ(p, EpochPermutation(1000, 7, 3));
  EXPECT_NE(p, EpochPermutation(1000, 7, 4));
  EXPECT_NE(p, EpochPermutation(1000, 8, 3));
  EXPECT_TRUE(EpochPermutation(0, 7, 3).empty());
  EXPECT_EQ(EpochPermutation(1, 7, 3), std::vector<int64_t>{0});
}

TEST(LoaderTest, EpochPermutationPlacesItemsUniformly) {
  // Over many epochs every item lands in every position about equally often
  // (a biased shuffle such as swapping with any index would not).
  const int64_t n = 5;
  const int epochs = 20000;
  std::vector<std::vector<int>> counts(n, std::vector<int>(n, 0));
  for (int e = 0; e < epochs; ++e) {
    const std::vector<int64_t> p = EpochPermutation(n, 1, e);
    for (int64_t pos = 0; pos < n; ++pos) ++counts[p[pos]][pos];
  }
  for (const auto& row : counts) {
    for (int c : row) EXPECT_NEAR(c, epochs / n, 250);  // ~4.4 sigma
  }
}

class LoaderWorldTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(LoaderWorldTest, RanksSplitEachGlobalBatchInPermutationOrder) {
  const int64_t world = GetParam();
  const int64_t global_batch = 6;
  FakeDataset dataset(40);  // 6 steps; the last 4 images are dropped
  const std::vector<int64_t> permutation = EpochPermutation(40, 1234, 5);
  std::vector<std::vector<TrainBatch>> per_rank;
  for (int64_t rank = 0; rank < world; ++rank) {
    TrainLoader loader(&dataset, Options(global_batch, rank, world, 2));
    ASSERT_EQ(loader.steps_per_epoch(), 6);
    loader.StartEpoch(5, 0);
    absl::Status end;
    per_rank.push_back(Drain(loader, &end));
    EXPECT_EQ(end.code(), absl::StatusCode::kOutOfRange) << end;
    ASSERT_EQ(per_rank.back().size(), 6u);
  }
  for (int64_t step = 0; step < 6; ++step) {
    std::vector<int64_t> global;
    for (int64_t rank = 0; rank < world; ++rank) {
      const TrainBatch& batch = per_rank[rank][step];
      EXPECT_EQ(batch.epoch, 5);
      EXPECT_EQ(batch.step_in_epoch, step);
      const int64_t b = global_batch / world;
      EXPECT_EQ(batch.query.sizes(), (std::vector<int64_t>{b, 3, 10, 10}));
      EXPECT_EQ(batch.key.sizes(), (std::vector<int64_t>{b, 3, 10, 10}));
      EXPECT_EQ(batch.query.scalar_type(), at::kFloat);
      EXPECT_TRUE(batch.query.is_contiguous());
      EXPECT_EQ(batch.index.scalar_type(), at::kLong);
      EXPECT_EQ(batch.label.scalar_type(), at::kLong);
      const std::vector<int64_t> indices = Indices(batch.index);
      const std::vector<int64_t> labels = Indices(batch.label);
      for (size_t i = 0; i < indices.size(); ++i) {
        EXPECT_EQ(labels[i], indices[i] % 5);
      }
      global.insert(global.end(), indices.begin(), indices.end());
    }
    EXPECT_EQ(global, std::vector<int64_t>(
                          permutation.begin() + step * global_batch,
                          permutation.begin() + (step + 1) * global_batch));
  }
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, LoaderWorldTest,
                         ::testing::Values(1, 2, 3));

TEST(LoaderTest, BatchesHoldTheAugmentedViewsOfTheirIndices) {
  FakeDataset dataset(20);
  LoaderOptions options = Options(4, 0, 1, 2);
  TrainLoader loader(&dataset, options);
  loader.StartEpoch(2, 0);
  absl::Status end;
  const std::vector<TrainBatch> batches = Drain(loader, &end);
  ASSERT_EQ(batches.size(), 5u);
  const int64_t view = 3 * 10 * 10;
  std::vector<float> expected(view);
  for (const TrainBatch& batch : batches) {
    const std::vector<int64_t> indices = Indices(batch.index);
    for (size_t i = 0; i < indices.size(); ++i) {
      const Image image = *dataset.Get(indices[i]);
      for (int v = 0; v < 2; ++v) {
        AugmentView(image, options.augment, options.format,
                    ViewSeed(options.seed, 2, indices[i], v), expected.data());
        const at::Tensor& views = v == 0 ? batch.query : batch.key;
        const float* got = views.data_ptr<float>() + i * view;
        EXPECT_EQ(std::memcmp(got, expected.data(), view * sizeof(float)), 0)
            << "index " << indices[i] << " view " << v;
      }
    }
    EXPECT_FALSE(at::equal(batch.query, batch.key));
  }
}

// data.augment_on device: the loader gives each view's crop as bytes and its
// photometric choices; PhotometricOnDevice of them is the view the host
// loader gives, up to rounding the crop to 256 levels (at most half a level
// before normalisation, std 0.25 here: 2/255, grown by the jitter's factors
// and smoothed by the blur).
TEST(LoaderTest, DeviceAugmentBatchesGiveTheHostViews) {
  FakeDataset dataset(12);
  LoaderOptions host = Options(4, 0, 1, 2);
  LoaderOptions device = host;
  device.photometric_on_device = true;
  TrainLoader host_loader(&dataset, host);
  TrainLoader device_loader(&dataset, device);
  host_loader.StartEpoch(1, 0);
  device_loader.StartEpoch(1, 0);
  absl::Status end;
  const std::vector<TrainBatch> a = Drain(host_loader, &end);
  const std::vector<TrainBatch> b = Drain(device_loader, &end);
  ASSERT_EQ(a.size(), b.size());
  const int64_t radius = MaxBlurRadius(host.augment, host.format);
  for (size_t s = 0; s < a.size(); ++s) {
    EXPECT_FALSE(b[s].query.defined());
    EXPECT_TRUE(at::equal(a[s].index, b[s].index));
    EXPECT_EQ(b[s].query_bytes.scalar_type(), at::kByte);
    EXPECT_EQ(b[s].query_bytes.size(1), dataset.channels());
    const at::Tensor q = PhotometricOnDevice(
        b[s].query_bytes, b[s].query_params, host.format, radius);
    const at::Tensor k = PhotometricOnDevice(b[s].key_bytes, b[s].key_params,
                                             host.format, radius);
    EXPECT_LT((q - a[s].query).abs().max().item<double>(), 4.0 / 255 / 0.25);
    EXPECT_LT((k - a[s].key).abs().max().item<double>(), 4.0 / 255 / 0.25);
  }
}

TEST(LoaderTest, OutputDoesNotDependOnThreadsOrPrefetch) {
  FakeDataset dataset(50);
  LoaderOptions one = Options(8, 1, 2, 1);
  one.prefetch = 1;
  LoaderOptions three = Options(8, 1, 2, 3);
  three.prefetch = 5;
  TrainLoader a(&dataset, one);
  TrainLoader b(&dataset, three);
  for (int64_t epoch : {0, 1}) {
    a.StartEpoch(epoch, 0);
    b.StartEpoch(epoch, 0);
    absl::Status end_a, end_b;
    const std::vector<TrainBatch> from_a = Drain(a, &end_a);
    const std::vector<TrainBatch> from_b = Drain(b, &end_b);
    ASSERT_EQ(from_a.size(), 6u);
    ASSERT_EQ(from_b.size(), 6u);
    for (size_t s = 0; s < from_a.size(); ++s) {
      ExpectSameBatch(from_a[s], from_b[s]);
    }
  }
}

TEST(LoaderTest, StartEpochAtAStepMatchesSkippingToIt) {
  FakeDataset dataset(30);
  TrainLoader full(&dataset, Options(4, 0, 1, 2));
  full.StartEpoch(3, 0);
  absl::Status end;
  const std::vector<TrainBatch> all = Drain(full, &end);
  ASSERT_EQ(all.size(), 7u);

  TrainLoader resumed(&dataset, Options(4, 0, 1, 3));
  // Work prepared for another epoch is discarded.
  resumed.StartEpoch(1, 0);
  ASSERT_TRUE(resumed.Next().ok());
  resumed.StartEpoch(3, 4);
  const std::vector<TrainBatch> tail = Drain(resumed, &end);
  EXPECT_EQ(end.code(), absl::StatusCode::kOutOfRange);
  ASSERT_EQ(tail.size(), 3u);
  for (size_t s = 0; s < tail.size(); ++s) ExpectSameBatch(tail[s], all[4 + s]);

  // Starting past the end gives the end at once.
  resumed.StartEpoch(3, 9);
  EXPECT_EQ(resumed.Next().status().code(), absl::StatusCode::kOutOfRange);
}

TEST(LoaderTest, NextBeforeStartEpochIsFailedPrecondition) {
  FakeDataset dataset(10);
  TrainLoader loader(&dataset, Options(2, 0, 1, 1));
  EXPECT_EQ(loader.Next().status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(LoaderTest, EpochSmallerThanTheBatchHasNoSteps) {
  FakeDataset dataset(5);
  TrainLoader loader(&dataset, Options(6, 0, 1, 2));
  EXPECT_EQ(loader.steps_per_epoch(), 0);
  loader.StartEpoch(0, 0);
  EXPECT_EQ(loader.Next().status().code(), absl::StatusCode::kOutOfRange);
}

TEST(LoaderTest, FailingImageStopsTheLoaderWithItsError) {
  const int64_t n = 40;
  const int64_t fail_at = 17;
  FakeDataset dataset(n, fail_at);
  const std::vector<int64_t> permutation = EpochPermutation(n, 1234, 0);
  const int64_t position =
      std::find(permutation.begin(), permutation.end(), fail_at) -
      permutation.begin();
  const int64_t failing_step = position / 4;
  ASSERT_LT(failing_step, 10);
  TrainLoader loader(&dataset, Options(4, 0, 1, 3));
  loader.StartEpoch(0, 0);
  absl::Status end;
  const std::vector<TrainBatch> batches = Drain(loader, &end);
  EXPECT_EQ(static_cast<int64_t>(batches.size()), failing_step);
  EXPECT_EQ(end.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(end.message().find("fake/img_17.png"), std::string::npos) << end;
  // Stopped: the error stays, even across StartEpoch.
  EXPECT_EQ(loader.Next().status(), end);
  loader.StartEpoch(1, 0);
  EXPECT_EQ(loader.Next().status(), end);
}

TEST(LoaderTest, ShutdownIsIdempotentAndEndsNext) {
  FakeDataset dataset(40);
  TrainLoader loader(&dataset, Options(4, 0, 1, 2));
  loader.StartEpoch(0, 0);
  ASSERT_TRUE(loader.Next().ok());
  loader.Shutdown();
  loader.Shutdown();
  EXPECT_EQ(loader.Next().status().code(), absl::StatusCode::kCancelled);
}

TEST(LoaderTest, EvalLoaderYieldsEvalViewsInOrderUpToTheLimit) {
  FakeDataset dataset(23);
  ViewFormat format;
  format.channels = 1;
  format.size = 12;
  format.mean = {0.5f};
  format.std = {0.25f};
  for (const int64_t limit : {0, 12, 100}) {
    const int64_t count = limit == 0 ? 23 : std::min<int64_t>(limit, 23);
    EvalLoader loader(&dataset, format, /*batch_size=*/5, /*threads=*/3, limit);
    int64_t next = 0;
    std::vector<float> expected(12 * 12);
    while (true) {
      absl::StatusOr<std::optional<EvalBatch>> batch = loader.Next();
      ASSERT_TRUE(batch.ok()) << batch.status();
      if (!batch->has_value()) break;
      const EvalBatch& b = **batch;
      const int64_t size = b.images.size(0);
      EXPECT_EQ(size, std::min<int64_t>(5, count - next));
      EXPECT_EQ(b.images.sizes(), (std::vector<int64_t>{size, 1, 12, 12}));
      const std::vector<int64_t> labels = Indices(b.label);
      for (int64_t i = 0; i < size; ++i) {
        EXPECT_EQ(labels[i], (next + i) % 5);
        EvalView(*dataset.Get(next + i), format, expected.data());
        EXPECT_EQ(std::memcmp(b.images.data_ptr<float>() + i * 144,
                              expected.data(), 144 * sizeof(float)),
                  0);
      }
      next += size;
    }
    EXPECT_EQ(next, count) << "limit " << limit;
    absl::StatusOr<std::optional<EvalBatch>> after = loader.Next();
    ASSERT_TRUE(after.ok());
    EXPECT_FALSE(after->has_value());
  }
}

TEST(LoaderTest, EvalLoaderSurfacesTheDatasetError) {
  FakeDataset dataset(23, /*fail_at=*/12);
  ViewFormat format;
  format.channels = 1;
  format.size = 12;
  EvalLoader loader(&dataset, format, 5, 2);
  EXPECT_TRUE(loader.Next().ok());
  EXPECT_TRUE(loader.Next().ok());
  absl::StatusOr<std::optional<EvalBatch>> failed = loader.Next();
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(failed.status().message().find("fake/img_12.png"),
            std::string::npos);
  EXPECT_EQ(loader.Next().status(), failed.status());
}

}  // namespace
}  // namespace momentum::worker
