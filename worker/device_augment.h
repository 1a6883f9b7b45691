// MoCo's photometric augmentation on batches, with ATen operators, on the
// device the batch lives on: colour jitter (in each view's own random
// order), grayscale, Gaussian blur with each view's sigma, horizontal flip,
// clamping and normalisation. The loader threads then only decode and crop
// (CropViewBytes, uint8) and draw each view's choices (DrawPhotometric); a
// GPU does the float work of 256 views in a few kernels instead of the host
// doing it view by view (data.augment_on). Given the same bytes and
// choices it computes what AugmentViewInBox computes, up to float rounding.
//
// Usage:
//   // loader thread, per view:
//   CropViewBytes(image, box, format, channels, bytes + i * plane_bytes);
//   PackPhotometric(DrawPhotometric(spec, seed, image.channels),
//                   params + i * kPhotometricWidth);
//   // training thread, on the device:
//   at::Tensor views = PhotometricOnDevice(bytes_on_gpu, params_on_gpu,
//                                          format, MaxBlurRadius(spec,
//                                          format));
#ifndef MOMENTUM_WORKER_DEVICE_AUGMENT_H_
#define MOMENTUM_WORKER_DEVICE_AUGMENT_H_

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common/job_spec.h"
#include "worker/augment.h"

namespace momentum::worker {

// Floats per view in a packed parameter row.
constexpr int64_t kPhotometricWidth = 17;

// Writes `p` as kPhotometricWidth floats: jitter, order[4], apply[4],
// brightness, contrast, saturation, hue, gray, blur, sigma, flip.
void PackPhotometric(const PhotometricParams& p, float* row);

// The largest blur radius a view of `format` can get under `spec`:
// ceil(3 * blur_sigma_max), at most format.size - 1 (0 without blur).
int64_t MaxBlurRadius(const AugmentSpec& spec, const ViewFormat& format);

// `crops`: uint8 [B, C, S, S] (C 1 or 3; S = format.size), `params`: float
// [B, kPhotometricWidth] rows of PackPhotometric, both on one device.
// Returns the normalised views, float [B, format.channels, S, S], there.
// `max_radius` bounds every view's blur radius (MaxBlurRadius); it sets the
// kernels' width without reading `params` back to the host.
at::Tensor PhotometricOnDevice(const at::Tensor& crops,
                               const at::Tensor& params,
                               const ViewFormat& format, int64_t max_radius);

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_DEVICE_AUGMENT_H_
