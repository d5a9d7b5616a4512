// Mish on the CPU: the C++ twin of csrc/cuda/mish.cu, using the same math (csrc/mish.h).
#include <ATen/Dispatch.h>

#include "../mish.h"
#include "../ops.h"
#include "cpu_common.h"

namespace fer_kernels {
namespace {

template <typename scalar_t>
FK_CPU_CLONES void mish_forward_loop(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n) {
  using T = typename MathType<scalar_t>::type;
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>(mish_forward(static_cast<T>(x[i])));
}

template <typename scalar_t>
FK_CPU_CLONES void mish_backward_loop(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ dx, int64_t n) {
  using T = typename MathType<scalar_t>::type;
  for (int64_t i = 0; i < n; ++i) {
    dx[i] = static_cast<scalar_t>(static_cast<T>(dy[i]) * mish_derivative(static_cast<T>(x[i])));
  }
}

}  // namespace

at::Tensor mish_forward_cpu(const at::Tensor& x) {
  check_elementwise("mish_forward_cpu", x);
  TORCH_CHECK(x.device().is_cpu(), "mish_forward_cpu: x must be a CPU tensor, got ", x.device());
  at::Tensor y = at::empty_like(x);  // keeps the strides of a dense x, so both are walked linearly
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mish_forward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), cpu::GRAIN, [&](int64_t begin, int64_t end) {
      cpu::prefetched_blocks(
          begin, end, [&](int64_t lo, int64_t hi) { mish_forward_loop(xp + lo, yp + lo, hi - lo); }, xp);
    });
  });
  return y;
}

at::Tensor mish_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  check_elementwise("mish_backward_cpu", x, &grad);
  TORCH_CHECK(x.device().is_cpu(), "mish_backward_cpu: x must be a CPU tensor, got ", x.device());
  at::Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mish_backward_cpu", [&] {
    const scalar_t* dyp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), cpu::GRAIN, [&](int64_t begin, int64_t end) {
      cpu::prefetched_blocks(
          begin, end, [&](int64_t lo, int64_t hi) { mish_backward_loop(dyp + lo, xp + lo, dxp + lo, hi - lo); }, dyp,
          xp);
    });
  });
  return dx;
}

}  // namespace fer_kernels
