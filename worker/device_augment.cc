#include "worker/device_augment.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace momentum::worker {
namespace {

// The luma of RGB planes [B, 3, S, S] as [B, 1, S, S] (ITU-R 601-2, as
// augment.cc).
at::Tensor Luma(const at::Tensor& x) {
  return x.select(1, 0)
      .mul(0.299f)
      .add_(x.select(1, 1), 0.587f)
      .add_(x.select(1, 2), 0.114f)
      .unsqueeze(1);
}

// Column k of the parameter rows as [B, 1, 1, 1].
at::Tensor Column(const at::Tensor& params, int64_t k) {
  return params.select(1, k).view({-1, 1, 1, 1});
}

at::Tensor Brightness(const at::Tensor& x, const at::Tensor& f) {
  return x.mul(f).clamp_(0, 1);
}

// Blends with the mean of the view's grayscale version.
at::Tensor Contrast(const at::Tensor& x, const at::Tensor& f) {
  const at::Tensor gray = x.size(1) == 3 ? Luma(x) : x;
  const at::Tensor mean = gray.mean({1, 2, 3}, /*keepdim=*/true);
  return x.mul(f).add_((1 - f) * mean).clamp_(0, 1);
}

// Blends each pixel with its own gray value.
at::Tensor Saturation(const at::Tensor& x, const at::Tensor& f) {
  return x.mul(f).add_((1 - f) * Luma(x)).clamp_(0, 1);
}

// Rotates the hue by `shift` of the circle with torchvision's HSV formulas,
// as augment.cc's AdjustHue, for a whole batch.
at::Tensor Hue(const at::Tensor& x, const at::Tensor& shift) {
  const at::Tensor r = x.select(1, 0).unsqueeze(1);
  const at::Tensor g = x.select(1, 1).unsqueeze(1);
  const at::Tensor b = x.select(1, 2).unsqueeze(1);
  const at::Tensor maxc = at::maximum(r, at::maximum(g, b));
  const at::Tensor minc = at::minimum(r, at::minimum(g, b));
  const at::Tensor gray = maxc.eq(minc);  // no saturation: left alone
  const at::Tensor cr = at::where(gray, at::ones_like(maxc), maxc - minc);
  const at::Tensor s = cr / at::where(gray, at::ones_like(maxc), maxc);
  const at::Tensor rc = (maxc - r) / cr;
  const at::Tensor gc = (maxc - g) / cr;
  const at::Tensor bc = (maxc - b) / cr;
  at::Tensor h =
      at::where(maxc.eq(r), bc - gc,
                at::where(maxc.eq(g), 2.0f + rc - bc, 4.0f + gc - rc));
  h = at::fmod(h / 6.0f + 1.0f, 1.0f);
  h = at::fmod(h + shift + 1.0f, 1.0f);
  const at::Tensor h6 = h * 6.0f;
  const at::Tensor sector = at::floor(h6);
  const at::Tensor f = h6 - sector;
  const at::Tensor v = maxc;
  const at::Tensor p = (v * (1.0f - s)).clamp_(0, 1);
  const at::Tensor q = (v * (1.0f - s * f)).clamp_(0, 1);
  const at::Tensor t = (v * (1.0f - s * (1.0f - f))).clamp_(0, 1);
  const at::Tensor i = sector.to(at::kLong).remainder(6);
  // The sector's (r, g, b) as in AdjustHue's switch.
  auto pick = [&](const at::Tensor& c0, const at::Tensor& c1,
                  const at::Tensor& c2, const at::Tensor& c3,
                  const at::Tensor& c4, const at::Tensor& c5) {
    return at::where(
        i.eq(0), c0,
        at::where(
            i.eq(1), c1,
            at::where(i.eq(2), c2,
                      at::where(i.eq(3), c3, at::where(i.eq(4), c4, c5)))));
  };
  const at::Tensor out = at::cat(
      {pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)},
      1);
  return at::where(gray, x, out);
}

// Each view blurred with its own sigma where `blur` holds: a separable
// kernel of radius min(ceil(3 sigma), S - 1) in a window of max_radius,
// reflect padding, as augment.cc's GaussianBlur.
at::Tensor Blur(const at::Tensor& x, const at::Tensor& blur,
                const at::Tensor& sigma, int64_t max_radius) {
  const int64_t batch = x.size(0), channels = x.size(1), size = x.size(2);
  const at::Tensor taps =
      at::arange(-max_radius, max_radius + 1, x.options()).view({1, -1});
  const at::Tensor sig = sigma.view({-1, 1}).clamp_min(1e-6f);
  const at::Tensor radius = at::ceil(sig.to(at::kDouble) * 3.0)
                                .to(x.scalar_type())
                                .clamp_max(static_cast<float>(size - 1));
  at::Tensor w = at::exp(-0.5f * (taps / sig).pow(2));
  w = at::where(taps.abs() <= radius, w, at::zeros_like(w));
  w = w / w.sum(1, /*keepdim=*/true);
  // Views without blur get the identity kernel.
  const at::Tensor identity = taps.eq(0).to(x.scalar_type()).expand_as(w);
  w = at::where(blur.view({-1, 1}), w, identity);
  const at::Tensor kernels =
      w.repeat_interleave(channels, 0);  // [B * C, 2R + 1]
  const int64_t n = 2 * max_radius + 1;
  const std::vector<int64_t> ones = {1, 1}, zeros = {0, 0};
  at::Tensor planes = x.reshape({1, batch * channels, size, size});
  planes = at::reflection_pad2d(planes, {max_radius, max_radius, 0, 0});
  planes = at::conv2d(planes, kernels.view({batch * channels, 1, 1, n}),
                      std::optional<at::Tensor>(), at::IntArrayRef(ones),
                      at::IntArrayRef(zeros), at::IntArrayRef(ones),
                      batch * channels);
  planes = at::reflection_pad2d(planes, {0, 0, max_radius, max_radius});
  planes = at::conv2d(planes, kernels.view({batch * channels, 1, n, 1}),
                      std::optional<at::Tensor>(), at::IntArrayRef(ones),
                      at::IntArrayRef(zeros), at::IntArrayRef(ones),
                      batch * channels);
  return planes.view({batch, channels, size, size});
}

}  // namespace

void PackPhotometric(const PhotometricParams& p, float* row) {
  row[0] = p.jitter ? 1.0f : 0.0f;
  for (int i = 0; i < 4; ++i) row[1 + i] = static_cast<float>(p.order[i]);
  for (int i = 0; i < 4; ++i) row[5 + i] = p.apply[i] ? 1.0f : 0.0f;
  row[9] = p.brightness;
  row[10] = p.contrast;
  row[11] = p.saturation;
  row[12] = p.hue;
  row[13] = p.gray ? 1.0f : 0.0f;
  row[14] = p.blur ? 1.0f : 0.0f;
  row[15] = p.sigma;
  row[16] = p.flip ? 1.0f : 0.0f;
}

int64_t MaxBlurRadius(const AugmentSpec& spec, const ViewFormat& format) {
  if (!spec.blur || spec.blur_prob <= 0) return 0;
  return std::min<int64_t>(
      static_cast<int64_t>(std::ceil(3.0 * spec.blur_sigma_max)),
      format.size - 1);
}

at::Tensor PhotometricOnDevice(const at::Tensor& crops,
                               const at::Tensor& params,
                               const ViewFormat& format, int64_t max_radius) {
  TORCH_CHECK(crops.dim() == 4 && crops.scalar_type() == at::kByte &&
                  (crops.size(1) == 1 || crops.size(1) == 3) &&
                  crops.size(2) == format.size && crops.size(3) == format.size,
              "PhotometricOnDevice: crops must be uint8 [B, 1|3, ", format.size,
              ", ", format.size, "], got ", crops.sizes());
  TORCH_CHECK(params.dim() == 2 && params.size(0) == crops.size(0) &&
                  params.size(1) == kPhotometricWidth &&
                  params.scalar_type() == at::kFloat,
              "PhotometricOnDevice: params must be float [B, ",
              kPhotometricWidth, "], got ", params.sizes());
  at::NoGradGuard no_grad;
  at::Tensor x = crops.to(at::kFloat).div_(255.0f);
  const bool colour = x.size(1) == 3;
  const at::Tensor jitter = Column(params, 0).gt(0.5f);
  for (int64_t position = 0; position < 4; ++position) {
    const at::Tensor op_here = Column(params, 1 + position);
    for (int64_t op = 0; op < 4; ++op) {
      if (op >= 2 && !colour) continue;  // saturation and hue need colour
      const at::Tensor run = jitter.logical_and(op_here.eq(op))
                                 .logical_and(Column(params, 5 + op).gt(0.5f));
      const at::Tensor factor = Column(params, 9 + op);
      at::Tensor changed;
      switch (op) {
        case 0:
          changed = Brightness(x, factor);
          break;
        case 1:
          changed = Contrast(x, factor);
          break;
        case 2:
          changed = Saturation(x, factor);
          break;
        default:
          changed = Hue(x, factor);
          break;
      }
      x = at::where(run, changed, x);
    }
  }
  if (colour) {
    x = at::where(Column(params, 13).gt(0.5f), Luma(x).expand_as(x), x);
  }
  if (max_radius > 0) {
    x = Blur(x, params.select(1, 14).gt(0.5f), params.select(1, 15),
             max_radius);
  }
  x = at::where(Column(params, 16).gt(0.5f), x.flip({3}), x);
  if (format.channels == 1 && colour) {
    x = Luma(x);
  } else if (format.channels == 3 && !colour) {
    x = x.expand({-1, 3, -1, -1});
  }
  std::vector<float> mean(format.channels), inv_std(format.channels);
  for (int64_t c = 0; c < format.channels; ++c) {
    mean[c] = format.mean.empty()
                  ? 0.0f
                  : format.mean[format.mean.size() == 1 ? 0 : c];
    inv_std[c] = 1.0f / (format.std.empty()
                             ? 1.0f
                             : format.std[format.std.size() == 1 ? 0 : c]);
  }
  const auto on = x.options();
  // Copied without waiting: a blocking copy to a GPU waits for its queue.
  const at::Tensor m =
      at::tensor(mean).to(on, /*non_blocking=*/true).view({1, -1, 1, 1});
  const at::Tensor s =
      at::tensor(inv_std).to(on, /*non_blocking=*/true).view({1, -1, 1, 1});
  return x.clamp(0, 1).sub_(m).mul_(s).contiguous();
}

}  // namespace momentum::worker
