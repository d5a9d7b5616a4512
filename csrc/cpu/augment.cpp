// The fused augmentation on the CPU: the C++ twin of fer_kernels/triton/augment.py. Each output pixel is
// mapped to its source position by the sample's 2 x 3 matrix, sampled bilinearly from the uint8 source
// with a border mirrored about the pixel edges, then brightness, contrast, saturation and hue are applied
// and the result normalised; one pass per image, no intermediate image. The specification is
// fer_kernels.reference.augment.
//
// Source positions are computed in double: for the float64 output that keeps the result at the
// specification's precision. The colour math runs in double for float64 output, else in float. Each output
// row is two vectorised passes, its sample positions and then the sampling and colour (grey sources
// vectorise whole; the hue rotation of colour ones stays scalar).
#include <ATen/Dispatch.h>

#include <cmath>
#include <vector>

#include "../ops.h"
#include "cpu_common.h"

namespace fer_kernels {
namespace {

struct Source {
  const uint8_t* base;
  int64_t h, w, channel_stride, row_stride, column_stride;
};

// x (pixel index coordinates) mirrored about -0.5 and size - 0.5, then clamped to [0, size - 1]. A
// non-finite position (a broken matrix) reads pixel 0 instead of an address outside the image.
inline double mirror(double x, int64_t size) {
  const double period = 2.0 * static_cast<double>(size);
  double t = x + 0.5;
  t -= std::floor(t / period) * period;
  t = t >= static_cast<double>(size) ? period - t : t;
  t -= 0.5;
  t = t >= 0.0 ? t : 0.0;
  return std::min(t, static_cast<double>(size - 1));
}

template <typename T>
inline T clamp01(T v) {
  return std::min(std::max(v, T(0)), T(1));
}

template <typename T>
inline T grey_of(T r, T g, T b) {
  return T(0.2989) * r + T(0.587) * g + T(0.114) * b;
}

// HSV hue rotation as torchvision's adjust_hue (fer_kernels.reference.shift_hue).
template <typename T>
inline void shift_hue(T& r, T& g, T& b, T shift) {
  const T maxc = std::max(std::max(r, g), b);
  const T minc = std::min(std::min(r, g), b);
  const T chroma = maxc - minc;
  const T s = maxc > T(0) ? chroma / maxc : T(0);
  T h = T(0);
  if (chroma > T(0)) {
    const T rc = (maxc - r) / chroma, gc = (maxc - g) / chroma, bc = (maxc - b) / chroma;
    h = (maxc == r ? bc - gc : maxc == g ? T(2) + rc - bc : T(4) + gc - rc) / T(6);
  }
  h += shift;
  h -= std::floor(h);
  T sector = std::floor(h * T(6));
  const T f = h * T(6) - sector;
  sector -= std::floor(sector / T(6)) * T(6);
  const T v = maxc, p = v * (T(1) - s), q = v * (T(1) - s * f), t = v * (T(1) - s * (T(1) - f));
  switch (static_cast<int>(sector)) {
    case 0: r = v; g = t; b = p; break;
    case 1: r = q; g = v; b = p; break;
    case 2: r = p; g = v; b = t; break;
    case 3: r = p; g = q; b = v; break;
    case 4: r = t; g = p; b = v; break;
    default: r = v; g = p; b = q; break;
  }
}

// The mean grey of the whole source in [0, 1] (contrast blends towards it), summed in double.
inline double grey_mean(const Source& src, bool grey) {
  const int64_t gs = grey ? 0 : src.channel_stride;
  double sum = 0.0;
  for (int64_t y = 0; y < src.h; ++y) {
    const uint8_t* row = src.base + y * src.row_stride;
    for (int64_t x = 0; x < src.w; ++x) {
      const uint8_t* p = row + x * src.column_stride;
      sum += grey_of<double>(p[0], p[gs], p[2 * gs]);
    }
  }
  return sum / (255.0 * static_cast<double>(src.h * src.w));
}

// Where the output pixels of one row sample the source: the offset of the top-left pixel of each one's 2 x 2
// neighbourhood, the steps from it to its right and lower neighbours (0 at the last column or row), and the
// bilinear weights. A pass of its own so that it vectorises: the mirroring is a chain of selects.
template <typename T>
FK_CPU_CLONES void row_samples(const Source& src, const float* m, int64_t v, int64_t size, int64_t* __restrict__ corner,
                               int64_t* __restrict__ right, int64_t* __restrict__ down, T* __restrict__ fx,
                               T* __restrict__ fy) {
#pragma omp simd
  for (int64_t u = 0; u < size; ++u) {
    const double x = mirror(double(m[0]) * u + double(m[1]) * v + double(m[2]), src.w);
    const double y = mirror(double(m[3]) * u + double(m[4]) * v + double(m[5]), src.h);
    const int64_t x0 = static_cast<int64_t>(x), y0 = static_cast<int64_t>(y);  // x, y >= 0: truncation floors
    fx[u] = static_cast<T>(x - static_cast<double>(x0));
    fy[u] = static_cast<T>(y - static_cast<double>(y0));
    corner[u] = y0 * src.row_stride + x0 * src.column_stride;
    right[u] = x0 + 1 < src.w ? src.column_stride : 0;
    down[u] = y0 + 1 < src.h ? src.row_stride : 0;
  }
}

// One row of one image from its samples; Grey: a one-channel source, whose three output channels are equal.
template <bool Grey, typename scalar_t, typename T>
FK_CPU_CLONES void augment_row(const Source& src, const int64_t* __restrict__ corner, const int64_t* __restrict__ right,
                               const int64_t* __restrict__ down, const T* __restrict__ fx, const T* __restrict__ fy,
                               const float* colour, T centre, scalar_t* __restrict__ out, int64_t so_c, int64_t so_w,
                               int64_t size, const T* mean, const T* inv_std) {
  const T brightness = colour[0], contrast = colour[1], saturation = colour[2], hue = colour[3];
#pragma omp simd
  for (int64_t u = 0; u < size; ++u) {
    T rgb[3];
    for (int k = 0; k < (Grey ? 1 : 3); ++k) {
      const uint8_t* p = src.base + corner[u] + k * src.channel_stride;
      const T p00 = p[0], p01 = p[right[u]], p10 = p[down[u]], p11 = p[down[u] + right[u]];
      const T top = p00 + fx[u] * (p01 - p00);
      const T bottom = p10 + fx[u] * (p11 - p10);
      rgb[k] = clamp01(centre + contrast * (clamp01((top + fy[u] * (bottom - top)) / T(255) * brightness) - centre));
    }
    if constexpr (Grey) {
      // Three equal channels stay equal through saturation, and the hue rotation of a colour without chroma
      // gives it back: the general path's arithmetic on one value, so the same bits.
      const T g = grey_of(rgb[0], rgb[0], rgb[0]);
      rgb[0] = rgb[1] = rgb[2] = clamp01(g + saturation * (rgb[0] - g));
    } else {
      const T g = grey_of(rgb[0], rgb[1], rgb[2]);
      for (T& c : rgb) c = clamp01(g + saturation * (c - g));
      shift_hue(rgb[0], rgb[1], rgb[2], hue);
    }
    scalar_t* o = out + u * so_w;
    for (int k = 0; k < 3; ++k) o[k * so_c] = static_cast<scalar_t>((clamp01(rgb[k]) - mean[k]) * inv_std[k]);
  }
}

template <bool Grey, typename scalar_t, typename T>
void augment_image(const Source& src, const float* m, const float* colour, scalar_t* out,
                   const int64_t* out_strides, int64_t size, const T* mean, const T* inv_std) {
  const T centre = clamp01(static_cast<T>(grey_mean(src, Grey)) * static_cast<T>(colour[0]));
  std::vector<int64_t> offsets(3 * size);
  std::vector<T> weights(2 * size);
  int64_t *corner = offsets.data(), *right = corner + size, *down = right + size;
  T *fx = weights.data(), *fy = fx + size;
  for (int64_t v = 0; v < size; ++v) {
    row_samples(src, m, v, size, corner, right, down, fx, fy);
    augment_row<Grey>(src, corner, right, down, fx, fy, colour, centre, out + v * out_strides[2], out_strides[1],
                      out_strides[3], size, mean, inv_std);
  }
}

}  // namespace

at::Tensor augment_cpu(const std::vector<at::Tensor>& images, const at::Tensor& matrices, const at::Tensor& colour,
                       at::Tensor out, const std::vector<double>& mean, const std::vector<double>& std) {
  const int64_t n = static_cast<int64_t>(images.size());
  TORCH_CHECK(out.dim() == 4 && out.size(0) == n && out.size(1) == 3 && out.size(2) == out.size(3),
              "augment_cpu: out must be N x 3 x S x S for ", n, " images, got ", out.sizes());
  TORCH_CHECK(out.device().is_cpu(), "augment_cpu: out must be a CPU tensor, got ", out.device());
  TORCH_CHECK(matrices.sizes() == at::IntArrayRef({n, 2, 3}) && matrices.scalar_type() == at::kFloat &&
                  matrices.is_contiguous() && matrices.device().is_cpu(),
              "augment_cpu: matrices must be a contiguous float32 CPU tensor of shape (", n, ", 2, 3), got ",
              matrices.scalar_type(), " ", matrices.sizes());
  TORCH_CHECK(colour.sizes() == at::IntArrayRef({n, 4}) && colour.scalar_type() == at::kFloat &&
                  colour.is_contiguous() && colour.device().is_cpu(),
              "augment_cpu: colour must be a contiguous float32 CPU tensor of shape (", n, ", 4), got ",
              colour.scalar_type(), " ", colour.sizes());
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "augment_cpu: mean and std need 3 values each, got ",
              mean.size(), " and ", std.size());
  std::vector<Source> sources(n);
  std::vector<char> grey(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& im = images[i];
    TORCH_CHECK(im.device().is_cpu() && im.scalar_type() == at::kByte && im.dim() == 3 &&
                    (im.size(0) == 1 || im.size(0) == 3) && im.size(1) > 0 && im.size(2) > 0,
                "augment_cpu: images[", i, "] must be a non-empty uint8 CPU tensor C x H x W with C 1 or 3, got ",
                im.scalar_type(), " ", im.sizes(), " on ", im.device());
    sources[i] = {im.data_ptr<uint8_t>(), im.size(1), im.size(2), im.stride(0), im.stride(1), im.stride(2)};
    grey[i] = im.size(0) == 1;
  }
  if (n == 0 || out.size(2) == 0) return out;
  const float* m = matrices.data_ptr<float>();
  const float* c = colour.data_ptr<float>();
  const int64_t size = out.size(2);
  const int64_t strides[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "augment_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const T mean_t[3] = {T(mean[0]), T(mean[1]), T(mean[2])};
    const T inv_std[3] = {T(1.0 / std[0]), T(1.0 / std[1]), T(1.0 / std[2])};
    scalar_t* base = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        auto image = grey[i] ? augment_image<true, scalar_t, T> : augment_image<false, scalar_t, T>;
        image(sources[i], m + 6 * i, c + 4 * i, base + i * strides[0], strides, size, mean_t, inv_std);
      }
    });
  });
  return out;
}

}  // namespace fer_kernels
