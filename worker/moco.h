// MoCo (v1/v2): a query encoder trained by SGD, a key encoder that follows it
// by momentum, and a queue of normalised keys, with the semantics of
// shared/DESIGN.md:
//   - the key encoder starts as an exact copy and never gets gradients;
//   - MomentumUpdate() runs once per step before the keys are computed;
//   - logits = [q·k, q·queue] / T with the positive at index 0, InfoNCE loss;
//     the queue used is the one before this step's Enqueue();
//   - Enqueue() writes the keys at the pointer, wrapping around for any K.
// Beside the training it keeps the health series of worker/step_report.h:
// Forward() summarises its batch (BatchHealth) and Enqueue() records which
// step wrote each queue slot (QueueStaleness()).
// Shuffled BatchNorm is emulated in one process: the key batch is permuted,
// split into G groups that the key encoder normalises separately, and the
// keys are un-permuted so that each returns to its query.
//
// Usage, one training step:
//   model.MomentumUpdate();
//   Moco::Output out = model.Forward(x_q, x_k, perm);
//   sgd.ZeroGrad(); out.loss.backward(); sgd.Step(lr);
//   model.Enqueue(out.all_keys);
//
// Not thread-safe; Forward() may run the key encoder on a second thread of its
// own, which it joins before returning.
#ifndef MOMENTUM_WORKER_MOCO_H_
#define MOMENTUM_WORKER_MOCO_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "common/job_spec.h"
#include "worker/device.h"
#include "worker/resnet.h"

namespace momentum::worker {

class GradientAverager;
class ProcessGroup;

struct MocoOptions {
  ResNetOptions encoder;
  int64_t queue_size = 65536;
  double momentum = 0.999;
  double temperature = 0.2;
  // Groups of the key batch that normalise separately after the shuffle.
  // 0: no shuffle at all (bn none).
  int64_t bn_groups = 2;
  // Groups of the query batch that normalise separately: the one-process
  // emulation of N ranks whose query encoders each normalise their own
  // batch (as DistributedDataParallel does). 1: the whole batch.
  int64_t query_bn_groups = 1;
  // With several ranks: shuffle the group's key batch across the ranks
  // (moco.bn shuffle) rather than each rank's own batch (split).
  bool shuffle_across_ranks = false;
  // Run the key encoder's forward pass on its own thread beside the query
  // encoder's. Changes no value, only the wall time; off by default, as two
  // intra-op threads measured faster (worker/trainer.cc).
  bool concurrent_key = false;
};

MocoOptions MocoOptionsFromSpec(const JobSpec& spec, int64_t world_size);

// Health of one step's batch on one rank (worker/step_report.h): mean
// positive and negative logits as cosine similarities (before the
// temperature) and the standard deviation across the batch of each dimension
// of the normalised queries, averaged over the dimensions and its minimum.
struct BatchHealth {
  double positive_logit_mean = 0;
  double negative_logit_mean = 0;
  double feature_std_mean = 0;
  double feature_std_min = 0;
};

class Moco {
 public:
  // Initialises the query encoder from the global LibTorch generator (seed it
  // first), copies it into the key encoder and draws the queue from
  // `generator`.
  Moco(const MocoOptions& options, at::Generator generator);
  ~Moco();
  Moco(const Moco&) = delete;
  Moco& operator=(const Moco&) = delete;

  struct Output {
    at::Tensor loss;    // scalar, with grad to the query encoder
    at::Tensor logits;  // [N, 1 + K], already divided by T
    at::Tensor keys;    // [N, dim], normalised, no grad
    // The keys of the whole group's batch in rank order, [world * N, dim]:
    // what Enqueue() takes. `keys` itself with one rank.
    at::Tensor all_keys;
    // This rank's normalised queries [N, dim], with grad: the tensor the
    // logits were computed from.
    at::Tensor queries;
    // BatchHealth as a [4] double tensor without grad, on the model's
    // device: read it with ReadBatchHealth() after the step (with the loss,
    // as the trainer does), so that the forward pass never waits for the
    // device.
    at::Tensor health;
  };

  // Makes this model one rank of `group` (not owned; may be null for one
  // process). With more than one rank, EncodeKeys() shuffles BatchNorm across
  // the ranks, Forward() returns the group's keys for Enqueue(), and
  // AverageGradients() averages the query encoder's gradients, whose
  // buckets start during the backward pass (worker/grad_averager.h).
  void SetProcessGroup(ProcessGroup* group);
  ProcessGroup* process_group() const { return group_; }

  // Moves both encoders (their 4-d weights channels_last on every device)
  // and the queue to `where.device` and autocasts the encoders to bfloat16 from
  // now on when `where.bf16`; the features leave the encoders as float32, so
  // that the normalisation, logits, loss and queue stay float32. Call before
  // making an optimiser of the parameters.
  void To(const RankDevice& where);
  const RankDevice& where() const { return where_; }

  // θk ← m·θk + (1−m)·θq over the parameters (not the BatchNorm statistics).
  void MomentumUpdate();
  // Normalised keys of x_k. With `perm` defined (a permutation of [0, N)),
  // encodes x_k[perm] in bn_groups slices and un-permutes the result.
  at::Tensor EncodeKeys(const at::Tensor& x_k, const at::Tensor& perm);
  // Shuffled BatchNorm across the ranks of the process group: the key
  // batches of all ranks are gathered (rank order), permuted by `perm` (a
  // permutation of [0, world * N), the same on every rank), each rank encodes
  // its slice of N in bn_groups groups, the keys are gathered again and
  // un-permuted. Returns the normalised keys of the whole group, [world * N,
  // dim]; this rank's are rows [rank * N, (rank + 1) * N). Collective: every
  // rank calls it. Throws c10::Error naming the collective when it fails or
  // times out.
  at::Tensor EncodeKeysAcrossRanks(const at::Tensor& x_k,
                                   const at::Tensor& perm);
  // Averages the query encoder's gradients over the ranks, in buckets
  // (no-op with one rank); call once after each backward pass, whose hooks
  // started the buckets of the gradients it completed (grad_averager.h).
  // Collective.
  absl::Status AverageGradients();
  // Normalised queries, with grad.
  at::Tensor EncodeQueries(const at::Tensor& x_q);
  // Queries and keys (the keys concurrently when enabled), logits and loss.
  // The images and the permutation may live anywhere; they are moved to the
  // model's device (asynchronously from page-locked memory).
  Output Forward(const at::Tensor& x_q, const at::Tensor& x_k,
                 const at::Tensor& perm);
  // Writes keys [N, dim] into the queue at the pointer (wrapping around) and
  // advances it by N modulo K. With `found_inf` (a one-element tensor on the
  // queue's device) the slots keep their keys where it is not 0, decided on
  // the device; the pointer and the ages advance all the same (a trainer
  // rolls such a step back). Counts as one step of the queue's age
  // bookkeeping: the slots written get step enqueued_steps() + 1 (a
  // trainer calls it once per global step, so that is the global step).
  void Enqueue(const at::Tensor& keys, const at::Tensor& found_inf = {});

  // Enqueue() calls so far (the group's global step after the last one).
  int64_t enqueued_steps() const { return enqueued_steps_; }
  // The step that wrote each queue slot, K entries; 0 for the initial random
  // keys.
  const std::vector<int64_t>& queue_slot_steps() const {
    return queue_slot_steps_;
  }
  // Age in steps of the oldest key in the queue: enqueued_steps() minus the
  // oldest slot's step.
  int64_t QueueStaleness() const;
  // Restores the age bookkeeping (from a checkpoint): `slot_steps` must have
  // K entries, each in [0, steps].
  void RestoreQueueAges(int64_t steps, std::vector<int64_t> slot_steps);

  ResNet& encoder_q() { return encoder_q_; }
  ResNet& encoder_k() { return encoder_k_; }
  at::Tensor& queue() { return queue_; }
  int64_t queue_ptr() const { return queue_ptr_; }
  void set_queue_ptr(int64_t ptr) { queue_ptr_ = ptr; }
  const MocoOptions& options() const { return options_; }

 private:
  MocoOptions options_;
  ResNet encoder_q_{nullptr};
  ResNet encoder_k_{nullptr};
  at::Tensor queue_;  // [dim, K]
  int64_t queue_ptr_ = 0;
  int64_t enqueued_steps_ = 0;
  std::vector<int64_t> queue_slot_steps_;  // K entries
  std::vector<at::Tensor> params_q_, params_k_;
  ProcessGroup* group_ = nullptr;
  // With more than one rank: the query encoder's gradients' hooks.
  std::unique_ptr<GradientAverager> averager_;
  RankDevice where_;
  // `tensor` on where_.device (itself when it is there, or undefined).
  at::Tensor OnModelDevice(const at::Tensor& tensor) const;
  // A fresh averager of params_q_ over group_ (none with one rank).
  void ResetAverager();
  // encoder->forward(x) under the autocast of where_, as float32.
  at::Tensor Encode(ResNet& encoder, const at::Tensor& x);
};

// InfoNCE logits [N, 1+K] = [q·k, q·queue] / T and the cross-entropy loss with
// the positive at index 0.
at::Tensor ContrastiveLogits(const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& queue, double temperature);
at::Tensor InfoNceLoss(const at::Tensor& logits);

// BatchHealth of queries q [N, dim] (normalised), their logits [N, 1+K]
// (divided by `temperature`) and the queue [dim, K] the logits used, as a
// [4] double tensor without grad, in BatchHealth's field order.
at::Tensor BatchHealthOf(const at::Tensor& q, const at::Tensor& logits,
                         const at::Tensor& queue, double temperature);
// Reads a tensor of BatchHealthOf() (a device sync on CUDA).
BatchHealth ReadBatchHealth(const at::Tensor& health);

// The step that wrote each of `queue_size` slots after `steps` steps of
// `keys_per_step` keys each, the pointer now at `queue_ptr` (0: the initial
// key survives). The newest key lies just before the pointer; the key d
// places before it is key i = steps * keys_per_step - 1 - d of all those
// ever enqueued and came from step i / keys_per_step + 1. Rebuilds Moco's
// age bookkeeping from checkpoints written before it was saved.
std::vector<int64_t> QueueSlotSteps(int64_t steps, int64_t keys_per_step,
                                    int64_t queue_size, int64_t queue_ptr);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_MOCO_H_
