#include "worker/knn.h"

#include <algorithm>

#include "worker/loader.h"

namespace momentum::worker {

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
  std::vector<at::Tensor> features, labels;
  absl::Status status;
  while (true) {
    auto batch = loader.Next();
    if (!batch.ok()) {
      status = batch.status();
      break;
    }
    if (!batch->has_value()) break;
    at::Tensor f = encoder->features((*batch)->images);
    features.push_back(f.div(f.norm(2, 1, /*keepdim=*/true).clamp_min(1e-12)));
    labels.push_back((*batch)->label);
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
                               const EvalSpec& spec, int64_t loader_threads) {
  auto bank = ExtractFeatures(encoder, train, format, spec.batch_size,
                              loader_threads, spec.max_train);
  if (!bank.ok()) return bank.status();
  auto queries = ExtractFeatures(encoder, test, format, spec.batch_size,
                                 loader_threads, spec.max_test);
  if (!queries.ok()) return queries.status();
  KnnOptions options;
  options.k = spec.knn_k;
  options.temperature = spec.knn_temperature;
  options.num_classes = std::max(train.num_classes(), test.num_classes());
  at::Tensor predicted =
      KnnPredict(queries->first, bank->first, bank->second, options);
  return predicted.eq(queries->second).to(at::kDouble).mean().item<double>();
}

}  // namespace momentum::worker
