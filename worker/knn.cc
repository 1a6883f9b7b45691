#include "worker/knn.h"

#include <algorithm>

#include "worker/loader.h"
#include "worker/process_group.h"

namespace momentum::worker {
namespace {

// Images [begin, end) of a dataset, as a dataset of their own.
class ShardView : public Dataset {
 public:
  ShardView(const Dataset& base, int64_t begin, int64_t end)
      : base_(base), begin_(begin), end_(end) {}
  int64_t size() const override { return end_ - begin_; }
  absl::StatusOr<Image> Get(int64_t index) const override {
    return base_.Get(begin_ + index);
  }
  int64_t Label(int64_t index) const override {
    return base_.Label(begin_ + index);
  }
  int64_t num_classes() const override { return base_.num_classes(); }
  int64_t channels() const override { return base_.channels(); }
  int64_t natural_size() const override { return base_.natural_size(); }
  std::vector<double> default_mean() const override {
    return base_.default_mean();
  }
  std::vector<double> default_std() const override {
    return base_.default_std();
  }

 private:
  const Dataset& base_;
  int64_t begin_, end_;
};

// Rows [rank * per, min(n, (rank + 1) * per)) of n, per = ceil(n / world).
std::pair<int64_t, int64_t> ShardRange(int64_t n, int64_t rank, int64_t world) {
  const int64_t per = (n + world - 1) / world;
  return {std::min(n, rank * per), std::min(n, (rank + 1) * per)};
}

// Features and labels of this rank's shard of the first `limit` images.
absl::StatusOr<std::pair<at::Tensor, at::Tensor>> ShardFeatures(
    ResNet& encoder, const Dataset& dataset, const ViewFormat& format,
    const EvalSpec& spec, int64_t loader_threads, int64_t limit,
    const ProcessGroup& group, int64_t* total) {
  const int64_t n =
      limit > 0 ? std::min(limit, dataset.size()) : dataset.size();
  *total = n;
  auto [begin, end] = ShardRange(n, group.rank(), group.world_size());
  if (begin == end) {
    const at::Device device = encoder->parameters().front().device();
    return std::make_pair(at::empty({0, encoder->feature_dim()},
                                    at::dtype(at::kFloat).device(device)),
                          at::empty({0}, at::dtype(at::kLong).device(device)));
  }
  ShardView shard(dataset, begin, end);
  return ExtractFeatures(encoder, shard, format, spec.batch_size,
                         loader_threads, /*limit=*/0);
}

// All ranks' rows in rank order: shards are padded to one size for the
// all-gather and trimmed after.
absl::StatusOr<at::Tensor> GatherShards(ProcessGroup& group,
                                        const at::Tensor& local, int64_t n) {
  const int64_t per = (n + group.world_size() - 1) / group.world_size();
  std::vector<int64_t> shape = local.sizes().vec();
  shape[0] = per;
  at::Tensor padded = at::zeros(shape, local.options());
  padded.slice(0, 0, local.size(0)).copy_(local);
  auto all = group.AllGather(padded);
  if (!all.ok()) return all.status();
  return all->slice(0, 0, n).contiguous();
}

}  // namespace

at::Tensor KnnPredict(const at::Tensor& queries, const at::Tensor& bank,
                      const at::Tensor& bank_labels,
                      const KnnOptions& options) {
  at::NoGradGuard no_grad;
  const int64_t k = std::min<int64_t>(options.k, bank.size(0));
  at::Tensor bank_t = bank.t().contiguous();
  std::vector<at::Tensor> predictions;
  for (int64_t start = 0; start < queries.size(0); start += options.chunk) {
    at::Tensor q = queries.slice(0, start, start + options.chunk);
    at::Tensor sim = q.mm(bank_t);  // [b, Nb]
    auto [top_sim, top_idx] = sim.topk(k, /*dim=*/1);
    at::Tensor top_labels = bank_labels.index_select(0, top_idx.reshape(-1))
                                .reshape(top_idx.sizes());
    at::Tensor weights = top_sim.div(options.temperature).exp_();
    at::Tensor scores =
        at::zeros({q.size(0), options.num_classes}, q.options());
    scores.scatter_add_(1, top_labels, weights);
    predictions.push_back(scores.argmax(1));
  }
  return at::cat(predictions);
}

absl::StatusOr<std::pair<at::Tensor, at::Tensor>> ExtractFeatures(
    ResNet& encoder, const Dataset& dataset, const ViewFormat& format,
    int64_t batch_size, int64_t loader_threads, int64_t limit) {
  at::NoGradGuard no_grad;
  const bool was_training = encoder->is_training();
  encoder->eval();
  EvalLoader loader(&dataset, format, batch_size, loader_threads, limit);
  // The bank lives where the encoder does (on its GPU, in shards over the
  // ranks, when it trains there).
  const at::Device device = encoder->parameters().front().device();
  std::vector<at::Tensor> features, labels;
  absl::Status status;
  while (true) {
    auto batch = loader.Next();
    if (!batch.ok()) {
      status = batch.status();
      break;
    }
    if (!batch->has_value()) break;
    at::Tensor f = encoder->features((*batch)->images.to(device));
    features.push_back(f.div(f.norm(2, 1, /*keepdim=*/true).clamp_min(1e-12)));
    labels.push_back((*batch)->label.to(device));
  }
  encoder->train(was_training);
  if (!status.ok()) return status;
  if (features.empty()) {
    return absl::FailedPreconditionError("kNN: the dataset is empty");
  }
  return std::make_pair(at::cat(features), at::cat(labels));
}

absl::StatusOr<double> KnnTop1(ResNet& encoder, const Dataset& train,
                               const Dataset& test, const ViewFormat& format,
                               const EvalSpec& spec, int64_t loader_threads,
                               ProcessGroup* group) {
  KnnOptions options;
  options.k = spec.knn_k;
  options.temperature = spec.knn_temperature;
  options.num_classes = std::max(train.num_classes(), test.num_classes());
  if (group == nullptr || group->world_size() == 1) {
    auto bank = ExtractFeatures(encoder, train, format, spec.batch_size,
                                loader_threads, spec.max_train);
    if (!bank.ok()) return bank.status();
    auto queries = ExtractFeatures(encoder, test, format, spec.batch_size,
                                   loader_threads, spec.max_test);
    if (!queries.ok()) return queries.status();
    at::Tensor predicted =
        KnnPredict(queries->first, bank->first, bank->second, options);
    return predicted.eq(queries->second).to(at::kDouble).mean().item<double>();
  }
  int64_t n_train = 0, n_test = 0;
  auto bank = ShardFeatures(encoder, train, format, spec, loader_threads,
                            spec.max_train, *group, &n_train);
  if (!bank.ok()) return bank.status();
  auto queries = ShardFeatures(encoder, test, format, spec, loader_threads,
                               spec.max_test, *group, &n_test);
  if (!queries.ok()) return queries.status();
  auto bank_features = GatherShards(*group, bank->first, n_train);
  if (!bank_features.ok()) return bank_features.status();
  auto bank_labels = GatherShards(*group, bank->second, n_train);
  if (!bank_labels.ok()) return bank_labels.status();
  double correct = 0;
  if (queries->first.size(0) > 0) {
    at::Tensor predicted =
        KnnPredict(queries->first, *bank_features, *bank_labels, options);
    correct = predicted.eq(queries->second).sum().item<double>();
  }
  // The mean of the ranks' counts times the world size is their sum.
  std::vector<at::Tensor> counts = {at::full({1}, correct, at::kDouble)};
  absl::Status summed = group->AllReduceMean(counts);
  if (!summed.ok()) return summed;
  return counts[0].item<double>() * group->world_size() / n_test;
}

}  // namespace momentum::worker
