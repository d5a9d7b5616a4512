// FMix's mix on the CPU, out = m * x + (1 - m) * x[perm] with the mask broadcast over the channels: the C++
// twin of fer_kernels/triton/fmix.py, one pass over the batch. The specification is
// fer_kernels.reference.fmix_mix; floating inputs compute in float (double for float64) and round once,
// uint8 in float rounded half up, so a binary mask copies each element exactly.
#include <ATen/Dispatch.h>

#include <cmath>

#include "../ops.h"
#include "cpu_common.h"

namespace fer_kernels {
namespace {

template <typename scalar_t, typename T>
inline scalar_t mixed(T m, scalar_t a, scalar_t b) {
  const T v = m * static_cast<T>(a) + (T(1) - m) * static_cast<T>(b);
  if constexpr (std::is_same_v<scalar_t, uint8_t>) {
    return static_cast<uint8_t>(std::floor(v + T(0.5)));
  } else {
    return static_cast<scalar_t>(v);
  }
}

// NCHW: one run of a plane, a mask value per element.
template <typename scalar_t, typename T>
FK_CPU_CLONES void mix_run(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, const T* __restrict__ m,
                           scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = mixed(m[i], a[i], b[i]);
}

// Channels-last: consecutive rows of C channels, a mask value per row.
template <typename scalar_t, typename T>
FK_CPU_CLONES void mix_rows(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, const T* __restrict__ m,
                            scalar_t* __restrict__ out, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r, a += C, b += C, out += C) {
    const T mr = m[r];
    for (int64_t c = 0; c < C; ++c) out[c] = mixed(mr, a[c], b[c]);
  }
}

}  // namespace

at::Tensor fmix_mix_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& perm) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "fmix_mix_cpu: x must be a CPU tensor N x C x H x W, got ",
              x.sizes(), " on ", x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const bool channels_last = dense_channels_last("fmix_mix_cpu", x);
  const auto math = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mask.scalar_type() == math && mask.is_contiguous() && mask.device().is_cpu() &&
                  (mask.sizes() == x.sizes().slice(2) || mask.sizes() == at::IntArrayRef({N, x.size(2), x.size(3)})),
              "fmix_mix_cpu: mask must be a contiguous ", math, " CPU tensor H x W or N x H x W for x of shape ",
              x.sizes(), ", got ", mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(perm.scalar_type() == at::kLong && perm.is_contiguous() && perm.sizes() == at::IntArrayRef({N}),
              "fmix_mix_cpu: perm must be ", N, " contiguous int64 indices, got ", perm.scalar_type(), " ",
              perm.sizes());
  const int64_t* p = perm.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(p[n] >= 0 && p[n] < N, "fmix_mix_cpu: perm[", n, "] = ", p[n], " is not in [0, ", N, ")");
  }
  at::Tensor out = at::empty_like(x);  // the strides of the dense x
  if (out.numel() == 0) return out;
  const int64_t mask_sample = mask.dim() == 3 ? HW : 0;  // per-sample masks step by a plane, a shared one not
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "fmix_mix_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const T* mp = mask.const_data_ptr<T>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t sample = C * HW;
    if (channels_last) {
      at::parallel_for(0, N * HW, std::max<int64_t>(1, cpu::GRAIN / C), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end;) {  // rows of one sample at a time: its partner and mask
          const int64_t n = r / HW, stop = std::min(end, (n + 1) * HW), q = r - n * HW;
          const int64_t first = n * sample + q * C;
          mix_rows(xp + first, xp + p[n] * sample + q * C, mp + n * mask_sample + q, op + first, stop - r, C);
          r = stop;
        }
      });
    } else {
      at::parallel_for(0, N * sample, cpu::GRAIN, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end;) {  // runs inside one plane
          const int64_t plane = i / HW, stop = std::min(end, (plane + 1) * HW), q = i - plane * HW;
          const int64_t n = plane / C, c = plane % C;
          mix_run(xp + i, xp + p[n] * sample + c * HW + q, mp + n * mask_sample + q, op + i, stop - i);
          i = stop;
        }
      });
    }
  });
  return out;
}

}  // namespace fer_kernels
