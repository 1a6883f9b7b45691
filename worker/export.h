// Export of a trained backbone as a state_dict that Python reads with
// torch.load: a dict from torchvision's parameter and buffer names (conv1.*,
// bn1.*, layer1.0.conv1.*, ..., no fc.*) to tensors. At the standard width
// (64) with the standard stem and 3 input channels,
//   torchvision.models.resnet18().load_state_dict(sd, strict=False)
// takes every backbone weight. With the small-image stem conv1 is 3x3 and
// there is no max-pool: replace model.conv1 by Conv2d(C, width, 3, 1, 1,
// bias=False) and model.maxpool by Identity() first. With another width the
// layer widths are width, 2*width, 4*width, 8*width (x4 for ResNet-50).
#ifndef MOMENTUM_WORKER_EXPORT_H_
#define MOMENTUM_WORKER_EXPORT_H_

#include <string>

#include "absl/status/status.h"
#include "worker/resnet.h"

namespace momentum::worker {

// Writes the backbone of `encoder` to `path` atomically.
absl::Status ExportBackbone(const ResNet& encoder, const std::string& path);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_EXPORT_H_
