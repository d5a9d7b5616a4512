// 2-D max pooling on channels-last CPU tensors, with the window position of each maximum as one byte.
//
// PyTorch's CPU max pooling stores an int64 index per output and, backward, zero-fills the whole input
// gradient before scattering into it: for ResNet's stem at 224 px (8 x 64 x 112 x 112 bfloat16) 12.8 MB of
// indices, a 12.8 MB fill and a scatter. Here the index is the position inside the window (kh * KW + kw of
// the unclipped window, so windows of up to 255 positions), and backward gathers instead: each input
// gradient is the sum of the output gradients of the windows whose maximum it was, written once.
//
// The maximum follows PyTorch: scanned in window order, a value replaces the maximum if it is greater or
// NaN, starting from -inf at the first position inside the input. Backward sums the up to
// ceil(KH / SH) * ceil(KW / SW) contributions of one input position in float (double for float64) in the
// order of the output positions, and rounds once.
#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "cpu_common.h"

namespace fer_kernels {
namespace {

struct PoolShape {
  int64_t N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW;
};

// One output row (all OW positions, all C channels) of one image.
template <typename scalar_t, typename T>
FK_CPU_CLONES void forward_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, uint8_t* __restrict__ idx,
                               const PoolShape& s, int64_t oh, T* __restrict__ best) {
  const int64_t C = s.C;
  const int64_t h0 = oh * s.SH - s.PH;
  const int64_t hs = std::max<int64_t>(h0, 0), he = std::min<int64_t>(h0 + s.KH, s.H);
  for (int64_t ow = 0; ow < s.OW; ++ow, out += C, idx += C) {
    const int64_t w0 = ow * s.SW - s.PW;
    const int64_t ws = std::max<int64_t>(w0, 0), we = std::min<int64_t>(w0 + s.KW, s.W);
    const uint8_t first = static_cast<uint8_t>((hs - h0) * s.KW + (ws - w0));
    for (int64_t c = 0; c < C; ++c) {
      best[c] = -std::numeric_limits<T>::infinity();
      idx[c] = first;
    }
    for (int64_t h = hs; h < he; ++h) {
      for (int64_t w = ws; w < we; ++w) {
        const scalar_t* v = x + (h * s.W + w) * C;
        const uint8_t code = static_cast<uint8_t>((h - h0) * s.KW + (w - w0));
        for (int64_t c = 0; c < C; ++c) {
          const T val = static_cast<T>(v[c]);
          const bool take = val > best[c] || val != val;  // NaN wins, as in PyTorch
          best[c] = take ? val : best[c];
          idx[c] = take ? code : idx[c];
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(best[c]);
  }
}

// One input row (all W positions, all C channels) of the input gradient of one image.
template <typename scalar_t, typename T>
FK_CPU_CLONES void backward_row(const scalar_t* __restrict__ grad, const uint8_t* __restrict__ idx,
                                scalar_t* __restrict__ dx, const PoolShape& s, int64_t h, T* __restrict__ acc) {
  const int64_t C = s.C;
  // Output rows whose window holds row h: oh * SH - PH <= h < oh * SH - PH + KH.
  const int64_t oh_lo = std::max<int64_t>(0, cpu::ceil_div(std::max<int64_t>(h + s.PH - s.KH + 1, 0), s.SH));
  const int64_t oh_hi = std::min<int64_t>(s.OH - 1, (h + s.PH) / s.SH);
  for (int64_t w = 0; w < s.W; ++w, dx += C) {
    const int64_t ow_lo = std::max<int64_t>(0, cpu::ceil_div(std::max<int64_t>(w + s.PW - s.KW + 1, 0), s.SW));
    const int64_t ow_hi = std::min<int64_t>(s.OW - 1, (w + s.PW) / s.SW);
    for (int64_t c = 0; c < C; ++c) acc[c] = T(0);
    for (int64_t oh = oh_lo; oh <= oh_hi; ++oh) {
      for (int64_t ow = ow_lo; ow <= ow_hi; ++ow) {
        const uint8_t code = static_cast<uint8_t>((h - (oh * s.SH - s.PH)) * s.KW + (w - (ow * s.SW - s.PW)));
        const int64_t o = (oh * s.OW + ow) * C;
        const scalar_t* g = grad + o;
        const uint8_t* i = idx + o;
        for (int64_t c = 0; c < C; ++c) acc[c] += i[c] == code ? static_cast<T>(g[c]) : T(0);
      }
    }
    for (int64_t c = 0; c < C; ++c) dx[c] = static_cast<scalar_t>(acc[c]);
  }
}

PoolShape pool_shape(const char* op, const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                     at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be N x C x H x W, got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.numel() == 0 || is_channels_last_dense(x), op, ": x must be stored channels-last, got strides ",
              x.strides());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel_size, stride and padding must have 2 values each");
  PoolShape s{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0,
              kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1]};
  TORCH_CHECK(s.KH > 0 && s.KW > 0 && s.KH * s.KW <= 255, op, ": the window must have 1 to 255 positions, got ",
              s.KH, " x ", s.KW);
  TORCH_CHECK(s.SH > 0 && s.SW > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(s.PH >= 0 && s.PW >= 0 && 2 * s.PH <= s.KH && 2 * s.PW <= s.KW, op,
              ": padding must be at most half the kernel, got ", padding);
  s.OH = (s.H + 2 * s.PH - s.KH) / s.SH + 1;
  s.OW = (s.W + 2 * s.PW - s.KW) / s.SW + 1;
  TORCH_CHECK(s.OH > 0 && s.OW > 0, op, ": the output would be empty for input ", x.sizes());
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_cpu(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                          at::IntArrayRef stride, at::IntArrayRef padding) {
  const PoolShape s = pool_shape("max_pool2d_forward_cpu", x, kernel_size, stride, padding);
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({s.N, s.C, s.OH, s.OW}, x.options().memory_format(cl));
  at::Tensor idx = at::empty({s.N, s.C, s.OH, s.OW}, x.options().dtype(at::kByte).memory_format(cl));
  if (out.numel() == 0) return {out, idx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_forward_cpu", [&] {
    using T = typename MathType<scalar_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint8_t* ip = idx.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, s.N * s.OH, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> best(s.C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / s.OH, oh = row % s.OH;
        const int64_t o = row * s.OW * s.C;
        forward_row(xp + n * s.H * s.W * s.C, op + o, ip + o, s, oh, best.data());
      }
    });
  });
  return {out, idx};
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad, const at::Tensor& idx, at::IntArrayRef input_size,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(input_size.size() == 4, "max_pool2d_backward_cpu: input_size must have 4 values");
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor dx = at::empty(input_size, grad.options().memory_format(cl));
  const PoolShape s = pool_shape("max_pool2d_backward_cpu", dx, kernel_size, stride, padding);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({s.N, s.C, s.OH, s.OW}) && idx.sizes() == grad.sizes(),
              "max_pool2d_backward_cpu: grad and indices must have the output's shape ",
              at::IntArrayRef({s.N, s.C, s.OH, s.OW}), ", got ", grad.sizes(), " and ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kByte, "max_pool2d_backward_cpu: indices must be uint8");
  TORCH_CHECK(is_channels_last_dense(grad) && is_channels_last_dense(idx),
              "max_pool2d_backward_cpu: grad and indices must be stored channels-last");
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "max_pool2d_backward_cpu", [&] {
    using T = typename MathType<scalar_t>::type;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const uint8_t* ip = idx.const_data_ptr<uint8_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.N * s.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> acc(s.C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / s.H, h = row % s.H;
        const int64_t o = n * s.OH * s.OW * s.C;
        backward_row(gp + o, ip + o, dp + row * s.W * s.C, s, h, acc.data());
      }
    });
  });
  return dx;
}

}  // namespace fer_kernels
