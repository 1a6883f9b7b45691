// The kNN monitor of the MoCo reference's CIFAR demo: backbone features of
// the un-augmented train set form the bank; each test image takes the k most
// cosine-similar bank entries, weights them by exp(sim / t) and predicts the
// class with the largest summed weight. Reports top-1 accuracy.
#ifndef MOMENTUM_WORKER_KNN_H_
#define MOMENTUM_WORKER_KNN_H_

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "common/job_spec.h"
#include "worker/augment.h"
#include "worker/dataset.h"
#include "worker/resnet.h"

namespace momentum::worker {

class ProcessGroup;

struct KnnOptions {
  int64_t k = 200;
  double temperature = 0.1;
  int64_t num_classes = 10;
  int64_t chunk = 256;  // queries per similarity block
};

// Predicted classes [Nq] of `queries` [Nq, D] given `bank` [Nb, D] (both
// L2-normalised) and `bank_labels` [Nb].
at::Tensor KnnPredict(const at::Tensor& queries, const at::Tensor& bank,
                      const at::Tensor& bank_labels, const KnnOptions& options);

// Normalised backbone features [N, D] and labels [N] of `dataset` (first
// `limit` images, 0: all), with the encoder in eval mode (restored after).
absl::StatusOr<std::pair<at::Tensor, at::Tensor>> ExtractFeatures(
    ResNet& encoder, const Dataset& dataset, const ViewFormat& format,
    int64_t batch_size, int64_t loader_threads, int64_t limit);

// The whole monitor: bank from `train`, accuracy on `test`, in [0, 1].
// With a process group of several ranks (all holding the same encoder) each
// rank encodes a contiguous shard of both sets; the bank is gathered, each
// rank classifies its test shard, and the counts are summed, so every rank
// returns the same accuracy. Collective.
absl::StatusOr<double> KnnTop1(ResNet& encoder, const Dataset& train,
                               const Dataset& test, const ViewFormat& format,
                               const EvalSpec& spec, int64_t loader_threads,
                               ProcessGroup* group = nullptr);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_KNN_H_
