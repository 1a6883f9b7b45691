#include "worker/moco.h"

#include <torch/nn/functional/loss.h>
#include <torch/nn/functional/normalization.h>
#include <torch/nn/utils/convert_parameters.h>

#include <algorithm>
#include <future>

#include "worker/grad_averager.h"
#include "worker/process_group.h"

namespace momentum::worker {
namespace {

at::Tensor Normalize(const at::Tensor& x, int64_t dim = 1) {
  return torch::nn::functional::normalize(
      x, torch::nn::functional::NormalizeFuncOptions().dim(dim));
}

}  // namespace

MocoOptions MocoOptionsFromSpec(const JobSpec& spec, int64_t world_size) {
  MocoOptions o;
  o.encoder = ResNetOptionsFromSpec(spec.model, spec.moco);
  o.queue_size = spec.moco.queue_size;
  o.momentum = spec.moco.momentum;
  o.temperature = spec.moco.temperature;
  const std::string& bn = spec.moco.bn;
  if (bn == "none") {
    o.bn_groups = 0;
  } else if (bn == "split" || (bn == "auto" && world_size == 1)) {
    o.bn_groups = spec.moco.bn_groups;
  } else {
    // Shuffled across ranks: each rank encodes one slice.
    o.bn_groups = 1;
    o.shuffle_across_ranks = world_size > 1;
  }
  return o;
}

Moco::Moco(const MocoOptions& options, at::Generator generator)
    : options_(options), queue_slot_steps_(options.queue_size, 0) {
  // The layout the weights get below, kept from the stem on.
  options_.encoder.channels_last = true;
  encoder_q_ = ResNet(options_.encoder);
  encoder_k_ = ResNet(options_.encoder);
  {
    at::NoGradGuard no_grad;
    auto q_state = StateOf(*encoder_q_);
    auto k_state = StateOf(*encoder_k_);
    TORCH_CHECK(q_state.size() == k_state.size());
    for (size_t i = 0; i < q_state.size(); ++i) {
      TORCH_CHECK(q_state[i].first == k_state[i].first);
      k_state[i].second.copy_(q_state[i].second);
    }
    for (auto& p : encoder_k_->parameters()) p.set_requires_grad(false);
    // The 4-d weights channels_last (NHWC), on every device: cuDNN's fastest
    // kernels read it, and on the CPU oneDNN's convolutions and ATen's
    // BatchNorm run it without reordering (the demo model's float32 step on
    // one AMD EPYC core: 341 ms, against 410 ms in NCHW).
    for (ResNet* encoder : {&encoder_q_, &encoder_k_}) {
      for (at::Tensor& p : (*encoder)->parameters()) {
        if (p.dim() == 4) {
          p.set_data(p.data().contiguous(at::MemoryFormat::ChannelsLast));
        }
      }
    }
    queue_ = Normalize(at::randn({options.encoder.out_dim, options.queue_size},
                                 generator, at::kFloat),
                       /*dim=*/0);
  }
  params_q_ = encoder_q_->parameters();
  params_k_ = encoder_k_->parameters();
  encoder_q_->train();
  encoder_k_->train();
}

Moco::~Moco() = default;

void Moco::SetProcessGroup(ProcessGroup* group) {
  group_ = group;
  ResetAverager();
}

void Moco::ResetAverager() {
  averager_.reset();  // its hooks go first
  if (group_ != nullptr && group_->world_size() > 1) {
    averager_ = std::make_unique<GradientAverager>(group_, params_q_);
  }
}

void Moco::To(const RankDevice& where) {
  where_ = where;
  // Tensor::to keeps the channels_last layout the constructor gave them.
  encoder_q_->to(where.device);
  encoder_k_->to(where.device);
  queue_ = queue_.to(where.device);
  params_q_ = encoder_q_->parameters();
  params_k_ = encoder_k_->parameters();
  ResetAverager();
}

at::Tensor Moco::Encode(ResNet& encoder, const at::Tensor& x) {
  at::Tensor input = x.device() == where_.device
                         ? x
                         : x.to(where_.device, /*non_blocking=*/true);
  // The layout of the weights (the constructor's); a no-op for inputs made
  // so, as the loader's are.
  input = input.contiguous(at::MemoryFormat::ChannelsLast);
  AutocastScope autocast(where_);
  return encoder->forward(input).to(at::kFloat);
}

void Moco::MomentumUpdate() {
  at::NoGradGuard no_grad;
  const double m = options_.momentum;
  // θk·m + θq·(1−m), the same two roundings as mul_ then add_, in one
  // kernel per list.
  at::_foreach_mul_(params_k_, m);
  at::_foreach_add_(params_k_, params_q_, 1.0 - m);
}

at::Tensor Moco::OnModelDevice(const at::Tensor& tensor) const {
  if (!tensor.defined() || tensor.device() == where_.device) return tensor;
  return tensor.to(where_.device, /*non_blocking=*/true);
}

at::Tensor Moco::EncodeKeys(const at::Tensor& images,
                            const at::Tensor& permutation) {
  at::NoGradGuard no_grad;
  const at::Tensor x_k = OnModelDevice(images);
  const at::Tensor perm = OnModelDevice(permutation);
  if (!perm.defined() || perm.numel() == 0 || options_.bn_groups == 0) {
    return Normalize(Encode(encoder_k_, x_k));
  }
  const int64_t n = x_k.size(0);
  TORCH_CHECK(perm.numel() == n, "shuffle permutation has ", perm.numel(),
              " entries for a key batch of ", n);
  const int64_t groups = options_.bn_groups;
  TORCH_CHECK(n % groups == 0, "key batch ", n, " not divisible into ", groups,
              " BatchNorm groups");
  at::Tensor shuffled = x_k.index_select(0, perm);
  std::vector<at::Tensor> parts;
  for (const at::Tensor& chunk : shuffled.chunk(groups, 0)) {
    parts.push_back(Encode(encoder_k_, chunk));
  }
  at::Tensor k = at::cat(parts, 0);
  at::Tensor inverse = at::empty_like(perm);
  inverse.index_put_({perm}, at::arange(n, perm.options()));
  return Normalize(k.index_select(0, inverse));
}

at::Tensor Moco::EncodeKeysAcrossRanks(const at::Tensor& x_k,
                                       const at::Tensor& perm) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(group_ != nullptr, "EncodeKeysAcrossRanks needs a process group");
  const int64_t n = x_k.size(0);
  const int64_t rank = group_->rank();
  auto gathered = group_->AllGather(x_k.contiguous());
  TORCH_CHECK(gathered.ok(),
              "gathering the key batches: ", gathered.status().ToString());
  const int64_t total = gathered->size(0);
  TORCH_CHECK(perm.numel() == total, "shuffle permutation has ", perm.numel(),
              " entries for a group key batch of ", total);
  at::Tensor mine =
      gathered->index_select(0, perm).slice(0, rank * n, (rank + 1) * n);
  const int64_t groups = std::max<int64_t>(options_.bn_groups, 1);
  TORCH_CHECK(n % groups == 0, "key batch ", n, " not divisible into ", groups,
              " BatchNorm groups");
  std::vector<at::Tensor> parts;
  for (const at::Tensor& chunk : mine.chunk(groups, 0)) {
    parts.push_back(Encode(encoder_k_, chunk));
  }
  auto keys = group_->AllGather(at::cat(parts, 0).contiguous());
  TORCH_CHECK(keys.ok(), "gathering the keys: ", keys.status().ToString());
  at::Tensor inverse = at::empty_like(perm);
  inverse.index_put_({perm}, at::arange(total, perm.options()));
  return Normalize(keys->index_select(0, inverse));
}

absl::Status Moco::AverageGradients() {
  return averager_ == nullptr ? absl::OkStatus() : averager_->Finish();
}

at::Tensor Moco::EncodeQueries(const at::Tensor& x_q) {
  const int64_t groups = options_.query_bn_groups;
  if (groups <= 1) return Normalize(Encode(encoder_q_, x_q));
  TORCH_CHECK(x_q.size(0) % groups == 0, "query batch ", x_q.size(0),
              " not divisible into ", groups, " BatchNorm groups");
  std::vector<at::Tensor> parts;
  for (const at::Tensor& chunk : x_q.chunk(groups, 0)) {
    parts.push_back(Encode(encoder_q_, chunk));
  }
  return Normalize(at::cat(parts, 0));
}

Moco::Output Moco::Forward(const at::Tensor& query_images,
                           const at::Tensor& key_images,
                           const at::Tensor& permutation) {
  // Inputs from anywhere: the batch, the permutation and the model meet on
  // the model's device.
  const at::Tensor x_q = OnModelDevice(query_images);
  const at::Tensor x_k = OnModelDevice(key_images);
  const at::Tensor perm = OnModelDevice(permutation);
  Output out;
  at::Tensor q;
  if (group_ != nullptr && group_->world_size() > 1) {
    const int64_t n = x_k.size(0);
    const int64_t rank = group_->rank();
    if (options_.shuffle_across_ranks && perm.defined() && perm.numel() > 0 &&
        options_.bn_groups > 0) {
      out.all_keys = EncodeKeysAcrossRanks(x_k, perm);
    } else {
      // Split (or no) shuffle inside this rank, then the group's keys.
      at::NoGradGuard no_grad;
      auto all = group_->AllGather(EncodeKeys(x_k, perm).contiguous());
      TORCH_CHECK(all.ok(), "gathering the keys: ", all.status().ToString());
      out.all_keys = *all;
    }
    out.keys = out.all_keys.slice(0, rank * n, (rank + 1) * n);
    q = EncodeQueries(x_q);
  } else if (options_.concurrent_key) {
    // The key encoder shares no tensor with the query encoder's forward
    // pass, so both can run at once; grad mode is per thread.
    auto keys =
        std::async(std::launch::async, [&] { return EncodeKeys(x_k, perm); });
    try {
      q = EncodeQueries(x_q);
    } catch (...) {
      keys.wait();
      throw;
    }
    out.keys = keys.get();
  } else {
    out.keys = EncodeKeys(x_k, perm);
    q = EncodeQueries(x_q);
  }
  if (!out.all_keys.defined()) out.all_keys = out.keys;
  out.logits = ContrastiveLogits(q, out.keys, queue_, options_.temperature);
  out.loss = InfoNceLoss(out.logits);
  out.queries = q;
  out.health = BatchHealthOf(q, out.logits, queue_, options_.temperature);
  return out;
}

void Moco::Enqueue(const at::Tensor& keys, const at::Tensor& found_inf) {
  at::NoGradGuard no_grad;
  const int64_t n = keys.size(0);
  const int64_t k = options_.queue_size;
  // With more keys than slots only the last K survive, as if written one by
  // one.
  const int64_t skip = n > k ? n - k : 0;
  at::Tensor idx =
      (at::arange(skip, n, queue_.options().dtype(at::kLong)) + queue_ptr_)
          .remainder_(k);
  at::Tensor columns = keys.slice(0, skip).t().to(queue_.options());
  if (found_inf.defined()) {
    columns = at::where(found_inf.to(queue_.device()).ne(0),
                        queue_.index_select(1, idx), columns);
  }
  queue_.index_copy_(1, idx, columns);
  ++enqueued_steps_;
  for (int64_t i = skip; i < n; ++i) {
    queue_slot_steps_[(queue_ptr_ + i) % k] = enqueued_steps_;
  }
  queue_ptr_ = (queue_ptr_ + n) % k;
}

int64_t Moco::QueueStaleness() const {
  return enqueued_steps_ -
         *std::min_element(queue_slot_steps_.begin(), queue_slot_steps_.end());
}

void Moco::RestoreQueueAges(int64_t steps, std::vector<int64_t> slot_steps) {
  TORCH_CHECK(static_cast<int64_t>(slot_steps.size()) == options_.queue_size,
              "queue ages for ", slot_steps.size(), " slots, the queue has ",
              options_.queue_size);
  for (int64_t s : slot_steps) {
    TORCH_CHECK(s >= 0 && s <= steps, "queue slot written at step ", s, " of ",
                steps);
  }
  enqueued_steps_ = steps;
  queue_slot_steps_ = std::move(slot_steps);
}

at::Tensor ContrastiveLogits(const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& queue, double temperature) {
  at::Tensor l_pos = (q * k).sum(1, /*keepdim=*/true);
  at::Tensor l_neg = q.mm(queue);
  return at::cat({l_pos, l_neg}, 1).div_(temperature);
}

at::Tensor InfoNceLoss(const at::Tensor& logits) {
  at::Tensor labels =
      at::zeros({logits.size(0)}, logits.options().dtype(at::kLong));
  return torch::nn::functional::cross_entropy(logits, labels);
}

at::Tensor BatchHealthOf(const at::Tensor& q, const at::Tensor& logits,
                         const at::Tensor& queue, double temperature) {
  at::NoGradGuard no_grad;
  const at::Tensor qd = q.detach();
  at::Tensor positive = logits.detach().select(1, 0).mean() * temperature;
  // The mean of q·queue over all N×K pairs is the dot product of the mean
  // query and the mean key: one pass over the queue instead of over the
  // N×K logits.
  at::Tensor negative = qd.mean(0).dot(queue.mean(1).to(qd.scalar_type()));
  at::Tensor spread = qd.std(0, /*unbiased=*/false);
  return at::stack({positive, negative, spread.mean(), spread.min()})
      .to(at::kDouble);
}

BatchHealth ReadBatchHealth(const at::Tensor& health) {
  TORCH_CHECK(health.numel() == 4, "batch health has ", health.numel(),
              " values, want 4");
  at::Tensor h = health.to(at::kCPU, at::kDouble).contiguous();
  const double* v = h.data_ptr<double>();
  return {v[0], v[1], v[2], v[3]};
}

std::vector<int64_t> QueueSlotSteps(int64_t steps, int64_t keys_per_step,
                                    int64_t queue_size, int64_t queue_ptr) {
  TORCH_CHECK(steps >= 0 && keys_per_step > 0 && queue_size > 0 &&
                  queue_ptr >= 0 && queue_ptr < queue_size,
              "QueueSlotSteps(", steps, ", ", keys_per_step, ", ", queue_size,
              ", ", queue_ptr, ")");
  const int64_t total = steps * keys_per_step;
  std::vector<int64_t> out(queue_size, 0);
  for (int64_t slot = 0; slot < queue_size; ++slot) {
    const int64_t back = ((queue_ptr - 1 - slot) % queue_size + queue_size) %
                         queue_size;  // keys written after this slot's
    const int64_t i = total - 1 - back;
    out[slot] = i >= 0 ? i / keys_per_step + 1 : 0;
  }
  return out;
}

}  // namespace momentum::worker
