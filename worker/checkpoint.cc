#include "worker/checkpoint.h"

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>
#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>
#include <fcntl.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/import_read.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/serialize.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>

#include "common/file_util.h"

namespace momentum::worker {
namespace {

namespace fs = std::filesystem;
constexpr char kFormat[] = "momentum-checkpoint-1";
constexpr char kPrefix[] = "checkpoint-";
constexpr char kSuffix[] = ".pt";

// The bytes of a checkpoint for LibTorch's zip reader. torch::pickle_load
// reads through a VectorReader that copies whatever range it is asked for:
// a corrupt central directory made it copy past the end of the file's bytes
// (a heap over-read, found by the checkpoint fuzz target). This reader
// gives only what is there; the zip reader takes a short read for a
// corrupt file and throws.
class BoundedReader final : public caffe2::serialize::ReadAdapterInterface {
 public:
  explicit BoundedReader(std::string bytes) : bytes_(std::move(bytes)) {}
  size_t size() const override { return bytes_.size(); }
  size_t read(uint64_t pos, void* buf, size_t n, const char*) const override {
    if (pos >= bytes_.size()) return 0;
    n = std::min<size_t>(n, bytes_.size() - pos);
    std::memcpy(buf, bytes_.data() + pos, n);
    return n;
  }

 private:
  const std::string bytes_;
};

// LibTorch's unpickler trusts two kinds of number in a pickle before it
// knows whether the bytes behind them exist (both found by the checkpoint
// fuzz target): the index a PUT names, to which it grows its memo (four
// corrupt bytes ask for up to 64 GB), and the length of a string or bytes
// argument, for which it reserves memory first (eight bytes ask for any
// size). ASan refuses such an allocation; a worker either throws
// std::bad_alloc, which is no c10::Error and so terminated it, or gets the
// memory and fills it until it is killed.
// Picklers number memo entries in order and write whole arguments, so a
// PUT past the next free index or an argument longer than the pickle is a
// corrupt file: DATA_LOSS naming `path`. OK otherwise, and also at an
// opcode this walk does not know, which LibTorch then judges itself.
absl::Status CheckPickle(const uint8_t* p, size_t size,
                         const std::string& path) {
  auto le = [&](size_t at, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = v << 8 | p[at + i];
    return v;
  };
  uint64_t memo_size = 0;
  size_t pos = 0;
  while (pos < size) {
    const uint8_t op = p[pos++];
    size_t fixed = 0;  // argument bytes
    int length = 0;    // bytes of a length prefix of the argument
    switch (op) {
      case '.':  // STOP
        return absl::OkStatus();
      case 'q':    // BINPUT
      case 'r': {  // LONG_BINPUT
        const int bytes = op == 'q' ? 1 : 4;
        if (size - pos < static_cast<size_t>(bytes)) return absl::OkStatus();
        const uint64_t id = le(pos, bytes);
        if (id > memo_size) {
          return absl::DataLossError(
              "corrupt checkpoint " + path + ": its pickle stores memo entry " +
              std::to_string(id) + " after " + std::to_string(memo_size));
        }
        if (id == memo_size) ++memo_size;
        fixed = bytes;
        break;
      }
      case 0x94:  // MEMOIZE
        ++memo_size;
        break;
      case '(':
      case ')':
      case ']':
      case '}':
      case 't':
      case 0x85:
      case 0x86:
      case 0x87:
      case 'a':
      case 'e':
      case 's':
      case 'u':
      case 'b':
      case 'R':
      case 0x88:
      case 0x89:
      case 'N':
      case 0x81:
      case 'Q':
      case 'd':
      case 'l':
      case 0x93:
        break;
      case 0x80:
      case 'h':
      case 'K':  // PROTO, BINGET, BININT1
        fixed = 1;
        break;
      case 'M':  // BININT2
        fixed = 2;
        break;
      case 'j':
      case 'J':  // LONG_BINGET, BININT
        fixed = 4;
        break;
      case 'G':
      case 0x95:  // BINFLOAT, FRAME
        fixed = 8;
        break;
      case 0x8a:
      case 0x8c:
      case 'U':
      case 'C':  // LONG1, SHORT_BIN*
        length = 1;
        break;
      case 'X':
      case 'T':
      case 'B':  // BINUNICODE, BINSTRING, BINBYTES
        length = 4;
        break;
      case 0x8d:
      case 0x8e:  // BINUNICODE8, BINBYTES8
        length = 8;
        break;
      case 'c': {  // GLOBAL: module and name, each ending in a newline
        for (int line = 0; line < 2; ++line) {
          while (pos < size && p[pos] != '\n') ++pos;
          if (pos == size) return absl::OkStatus();
          ++pos;
        }
        break;
      }
      default:
        return absl::OkStatus();
    }
    if (length > 0) {
      if (size - pos < static_cast<size_t>(length)) return absl::OkStatus();
      fixed = length;
      const uint64_t n = le(pos, length);
      if (n > size - pos - length) {
        return absl::DataLossError(
            "corrupt checkpoint " + path + ": its pickle has an argument of " +
            std::to_string(n) + " bytes where " +
            std::to_string(size - pos - length) + " are left");
      }
      fixed += n;
    }
    if (size - pos < fixed) return absl::OkStatus();
    pos += fixed;
  }
  return absl::OkStatus();
}

absl::Status Errno(const std::string& what, const std::string& path) {
  return absl::InternalError(what + " " + path + ": " + std::strerror(errno));
}

// `value` with every dict and list, at any depth, re-made with elements of
// type Any, which the pickler writes without a type tag.
c10::IValue Untyped(const c10::IValue& value) {
  if (value.isGenericDict()) {
    c10::impl::GenericDict dict(c10::AnyType::get(), c10::AnyType::get());
    for (const auto& entry : value.toGenericDict()) {
      dict.insert(Untyped(entry.key()), Untyped(entry.value()));
    }
    return dict;
  }
  if (value.isList()) {
    c10::impl::GenericList list(c10::AnyType::get());
    for (const c10::IValue& item : value.toListRef()) {
      list.push_back(Untyped(item));
    }
    return list;
  }
  if (value.isTuple()) {
    std::vector<c10::IValue> items;
    for (const c10::IValue& item : value.toTupleRef().elements()) {
      items.push_back(Untyped(item));
    }
    return c10::ivalue::Tuple::create(std::move(items));
  }
  return value;
}

}  // namespace

at::Tensor OnHost(const at::Tensor& tensor) {
  return tensor.detach().to(at::kCPU).contiguous();
}

namespace {

c10::Dict<std::string, at::Tensor> ToDict(
    const std::vector<std::pair<std::string, at::Tensor>>& state) {
  c10::Dict<std::string, at::Tensor> dict;
  // Host tensors in the default layout: a checkpoint reads the same on any
  // device.
  for (const auto& [name, tensor] : state) dict.insert(name, OnHost(tensor));
  return dict;
}

// Copies the tensors of `dict` into `state`, requiring the same names and
// shapes.
absl::Status CopyInto(
    const c10::IValue& value, const std::string& what,
    const std::vector<std::pair<std::string, at::Tensor>>& state,
    const std::string& path) {
  if (!value.isGenericDict()) {
    return absl::DataLossError(path + ": " + what + " is not a dict");
  }
  auto dict = value.toGenericDict();
  if (dict.size() != state.size()) {
    return absl::FailedPreconditionError(
        path + ": " + what + " has " + std::to_string(dict.size()) +
        " tensors, the model " + std::to_string(state.size()) +
        " (another architecture or width?)");
  }
  at::NoGradGuard no_grad;
  for (const auto& [name, tensor] : state) {
    auto it = dict.find(name);
    if (it == dict.end() || !it->value().isTensor()) {
      return absl::FailedPreconditionError(path + ": " + what + " lacks " +
                                           name);
    }
    const at::Tensor& saved = it->value().toTensor();
    if (saved.sizes() != tensor.sizes()) {
      return absl::FailedPreconditionError(
          path + ": " + what + "." + name + " has shape " +
          c10::str(saved.sizes()) + ", the model " + c10::str(tensor.sizes()));
    }
    tensor.copy_(saved);
  }
  return absl::OkStatus();
}

int64_t StepOfFile(const std::string& name) {
  const std::string prefix = kPrefix, suffix = kSuffix;
  if (name.size() <= prefix.size() + suffix.size() ||
      name.compare(0, prefix.size(), prefix) != 0 ||
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return -1;
  }
  const std::string digits =
      name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
  if (digits.empty() || !std::all_of(digits.begin(), digits.end(), ::isdigit)) {
    return -1;
  }
  return std::stoll(digits);
}

// (step, path) of the checkpoints in `dir`, oldest first.
std::vector<std::pair<int64_t, std::string>> ListCheckpoints(
    const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const int64_t step = StepOfFile(entry.path().filename().string());
    if (step >= 0) out.emplace_back(step, entry.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

std::vector<char> PickleForTorchLoad(const c10::IValue& value) {
  std::vector<char> pickle;
  // No tensor table: tensors go to data/<n> records beside the pickle, as
  // torch.save writes them. tag_aggregates=false: plain dicts and lists.
  torch::jit::Pickler pickler(
      [&](const char* bytes, size_t size) {
        pickle.insert(pickle.end(), bytes, bytes + size);
      },
      /*tensor_table=*/nullptr, /*type_renamer=*/nullptr,
      /*memoized_class_types=*/nullptr, /*get_tensor_id=*/nullptr,
      /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(Untyped(value));
  pickler.stop();
  std::vector<char> file;
  caffe2::serialize::PyTorchStreamWriter writer(
      [&](const void* bytes, size_t size) {
        const char* begin = static_cast<const char*>(bytes);
        file.insert(file.end(), begin, begin + size);
        return size;
      });
  torch::jit::writeArchiveAndTensors("data", pickle.data(), pickle.size(),
                                     pickler.tensorData(), writer);
  writer.writeEndOfFile();
  return file;
}

absl::Status WriteFileAtomically(const std::string& path,
                                 const std::vector<char>& bytes) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", tmp);
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      absl::Status status = Errno("cannot write", tmp);
      ::close(fd);
      ::unlink(tmp.c_str());
      return status;
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    absl::Status status = Errno("cannot fsync", tmp);
    ::close(fd);
    ::unlink(tmp.c_str());
    return status;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status status = Errno("cannot rename to", path);
    ::unlink(tmp.c_str());
    return status;
  }
  const std::string dir = fs::path(path).parent_path().string();
  int dir_fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> SaveCheckpoint(const std::string& dir, Moco& model,
                                           Sgd& sgd,
                                           const CheckpointState& state,
                                           int64_t keep) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError("cannot create " + dir + ": " + ec.message());
  }
  c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
  root.insert("format", std::string(kFormat));
  root.insert("spec", state.spec_yaml);
  root.insert("encoder_q", ToDict(StateOf(*model.encoder_q())));
  root.insert("encoder_k", ToDict(StateOf(*model.encoder_k())));
  root.insert("queue", OnHost(model.queue()));
  root.insert("queue_ptr", model.queue_ptr());
  root.insert(
      "queue_steps",
      at::tensor(at::ArrayRef<int64_t>(model.queue_slot_steps()), at::kLong));
  c10::impl::GenericList buffers(c10::TensorType::get());
  for (const at::Tensor& b : sgd.momentum_buffers()) {
    // An empty tensor marks a parameter that has not stepped yet.
    buffers.push_back(b.defined() ? OnHost(b) : at::Tensor(at::empty({0})));
  }
  root.insert("sgd_momentum", buffers);
  const RunPosition& pos = state.position;
  root.insert("epoch", pos.epoch);
  root.insert("step_in_epoch", pos.step_in_epoch);
  root.insert("global_step", pos.global_step);
  root.insert("images_seen", pos.images_seen);
  root.insert("train_seconds", pos.train_seconds);
  root.insert("world_size", state.world_size);
  root.insert("lr_scale", state.lr_scale);
  root.insert("rollbacks", state.rollbacks);
  root.insert("shuffle_rng", state.shuffle_rng_state);
  root.insert("torch_rng", state.torch_rng_state.defined()
                               ? state.torch_rng_state
                               : at::empty({0}, at::kByte));
  c10::impl::GenericList history(c10::TensorType::get());
  at::Tensor knn = at::empty(
      {static_cast<int64_t>(state.knn_history.size()), 3}, at::kDouble);
  for (size_t i = 0; i < state.knn_history.size(); ++i) {
    knn[i][0] = state.knn_history[i].epochs;
    knn[i][1] = static_cast<double>(state.knn_history[i].step);
    knn[i][2] = state.knn_history[i].top1;
  }
  root.insert("knn_history", knn);

  std::vector<char> bytes = PickleForTorchLoad(c10::IValue(root));
  char name[64];
  std::snprintf(name, sizeof(name), "%s%09lld%s", kPrefix,
                static_cast<long long>(pos.global_step), kSuffix);
  const std::string path = (fs::path(dir) / name).string();
  absl::Status written = WriteFileAtomically(path, bytes);
  if (!written.ok()) return written;

  auto all = ListCheckpoints(dir);
  for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) {
    fs::remove(all[i].second, ec);
  }
  return path;
}

std::optional<std::string> LatestCheckpoint(const std::string& dir) {
  auto all = ListCheckpoints(dir);
  if (all.empty()) return std::nullopt;
  return all.back().second;
}

std::vector<std::string> CheckpointsNewestFirst(const std::string& dir) {
  std::vector<std::string> out;
  auto all = ListCheckpoints(dir);
  for (auto it = all.rbegin(); it != all.rend(); ++it)
    out.push_back(it->second);
  return out;
}

absl::StatusOr<CheckpointState> LoadCheckpoint(const std::string& path,
                                               Moco& model, Sgd& sgd) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  c10::IValue value;
  try {
    // What torch::pickle_load does, over a reader that stays in bounds.
    caffe2::serialize::PyTorchStreamReader reader(
        std::make_shared<BoundedReader>(*std::move(text)));
    const auto [pickle, size] = reader.getRecord("data.pkl");
    if (absl::Status s =
            CheckPickle(static_cast<const uint8_t*>(pickle.get()), size, path);
        !s.ok()) {
      return s;
    }
    value = torch::jit::readArchiveAndTensors(
        "data", /*pickle_prefix=*/"", /*tensor_prefix=*/"",
        /*type_resolver=*/std::nullopt, /*obj_loader=*/std::nullopt,
        /*device=*/std::nullopt, reader);
  } catch (const c10::Error& e) {
    return absl::DataLossError("corrupt checkpoint " + path + ": " +
                               e.what_without_backtrace());
  }
  if (!value.isGenericDict()) {
    return absl::DataLossError("corrupt checkpoint " + path +
                               ": not a dict at the top");
  }
  auto root = value.toGenericDict();
  auto get = [&](const std::string& key) -> absl::StatusOr<c10::IValue> {
    auto it = root.find(key);
    if (it == root.end()) {
      return absl::DataLossError("corrupt checkpoint " + path + ": no " + key);
    }
    return it->value();
  };
  auto format = get("format");
  if (!format.ok() || !format->isString() || format->toStringRef() != kFormat) {
    return absl::DataLossError(path + " is not a Momentum checkpoint (" +
                               std::string(kFormat) + ")");
  }
  CheckpointState state;
  try {
    for (const char* key :
         {"spec", "encoder_q", "encoder_k", "queue", "queue_ptr",
          "sgd_momentum", "epoch", "step_in_epoch", "global_step",
          "images_seen", "train_seconds", "shuffle_rng", "torch_rng",
          "knn_history"}) {
      if (!get(key).ok()) return get(key).status();
    }
    absl::Status s = CopyInto(*get("encoder_q"), "encoder_q",
                              StateOf(*model.encoder_q()), path);
    if (!s.ok()) return s;
    s = CopyInto(*get("encoder_k"), "encoder_k", StateOf(*model.encoder_k()),
                 path);
    if (!s.ok()) return s;
    at::Tensor queue = get("queue")->toTensor();
    if (queue.sizes() != model.queue().sizes()) {
      return absl::FailedPreconditionError(
          path + ": queue has shape " + c10::str(queue.sizes()) +
          ", the model " + c10::str(model.queue().sizes()) +
          " (moco.dim or moco.queue_size changed?)");
    }
    model.queue().copy_(queue);
    model.set_queue_ptr(get("queue_ptr")->toInt());
    auto buffers = get("sgd_momentum")->toList();
    if (buffers.size() != sgd.momentum_buffers().size()) {
      return absl::FailedPreconditionError(path +
                                           ": optimiser state does not match");
    }
    for (size_t i = 0; i < buffers.size(); ++i) {
      at::Tensor b = buffers.get(i).toTensor();
      // On the parameter's device, in its layout.
      sgd.momentum_buffers()[i] =
          b.numel() == 0 ? at::Tensor()
                         : at::empty_like(sgd.params()[i]).copy_(b);
    }
    state.spec_yaml = get("spec")->toStringRef();
    // Absent from checkpoints of one-process runs written before it existed.
    if (auto it = root.find("world_size"); it != root.end()) {
      state.world_size = it->value().toInt();
    }
    if (auto it = root.find("lr_scale"); it != root.end()) {
      state.lr_scale = it->value().toDouble();
    }
    if (auto it = root.find("rollbacks"); it != root.end()) {
      state.rollbacks = it->value().toInt();
    }
    state.position.epoch = get("epoch")->toInt();
    state.position.step_in_epoch = get("step_in_epoch")->toInt();
    state.position.global_step = get("global_step")->toInt();
    state.position.images_seen = get("images_seen")->toInt();
    state.position.train_seconds = get("train_seconds")->toDouble();
    state.shuffle_rng_state = get("shuffle_rng")->toTensor();
    at::Tensor torch_rng = get("torch_rng")->toTensor();
    if (torch_rng.numel() > 0) state.torch_rng_state = torch_rng;
    // The step that wrote each queue slot. Checkpoints written before it
    // was kept have it rebuilt: every step enqueued the global batch
    // (images_seen / global_step keys).
    const int64_t steps = state.position.global_step;
    if (auto it = root.find("queue_steps"); it != root.end()) {
      at::Tensor t = it->value().toTensor().to(at::kLong).contiguous();
      model.RestoreQueueAges(
          steps, std::vector<int64_t>(t.data_ptr<int64_t>(),
                                      t.data_ptr<int64_t>() + t.numel()));
    } else {
      const int64_t per_step =
          steps > 0 ? std::max<int64_t>(state.position.images_seen / steps, 1)
                    : 1;
      model.RestoreQueueAges(
          steps, QueueSlotSteps(steps, per_step, model.options().queue_size,
                                model.queue_ptr()));
    }
    at::Tensor knn = get("knn_history")->toTensor();
    for (int64_t i = 0; i < knn.size(0); ++i) {
      state.knn_history.push_back(
          {knn[i][0].item<double>(),
           static_cast<int64_t>(knn[i][1].item<double>()),
           knn[i][2].item<double>()});
    }
  } catch (const c10::Error& e) {
    return absl::DataLossError("corrupt checkpoint " + path + ": " +
                               e.what_without_backtrace());
  }
  return state;
}

}  // namespace momentum::worker
