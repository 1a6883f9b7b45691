#include "worker/export.h"

#include <ATen/core/Dict.h>

#include "worker/checkpoint.h"

namespace momentum::worker {

absl::Status ExportBackbone(const ResNet& encoder, const std::string& path) {
  c10::Dict<std::string, at::Tensor> state;
  for (const auto& [name, tensor] : encoder->BackboneState()) {
    state.insert(name, OnHost(tensor).clone());
  }
  return WriteFileAtomically(path, PickleForTorchLoad(c10::IValue(state)));
}

}  // namespace momentum::worker
