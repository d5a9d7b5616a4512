// Mish, mish(x) = x * tanh(softplus(x)), and its derivative: the one definition used by the CPU twin
// (csrc/cpu/mish.cpp), the CUDA kernel (csrc/cuda/mish.cu) and the block tail (csrc/recalibrate.h).
//
// With e = exp(x) and n = e (e + 2):  tanh(softplus(x)) = n / (n + 2), so
//   mish(x)  = x n / (n + 2)
//   mish'(x) = tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2) = (n (n + 2) + 4 x e (1 + e)) / (n + 2)^2
// One exponential, no log, no tanh, no cancellation in the forward. Above x = 20, tanh(softplus(x))
// rounds to 1 in float and double, so mish(x) = x and mish'(x) = 1 there (this also keeps e^2 from
// overflowing). Far below 0, e underflows to 0 and mish(x) = x * 0 = -0, as in PyTorch.
// Non-finite inputs follow torch.nn.functional.mish: mish(+inf) = +inf, mish(-inf) = NaN, NaN -> NaN,
// and the derivative is NaN at +-inf and NaN.
#pragma once

#include "common.h"

namespace fer_kernels {

constexpr float MISH_LINEAR_ABOVE = 20.0f;

template <typename T>
FK_HOST_DEVICE FK_INLINE T mish_forward(T x) {
  T e = fk_exp_no_overflow(x < T(MISH_LINEAR_ABOVE) ? x : T(MISH_LINEAR_ABOVE));
  T n = e * (e + T(2));
  T y = x * n / (n + T(2));
  return x > T(MISH_LINEAR_ABOVE) ? x : y;
}

template <typename T>
FK_HOST_DEVICE FK_INLINE T mish_derivative(T x) {
  T e = fk_exp_no_overflow(x < T(MISH_LINEAR_ABOVE) ? x : T(MISH_LINEAR_ABOVE));
  T n = e * (e + T(2));
  T d = n + T(2);
  T grad = (n * d + T(4) * (x * e) * (T(1) + e)) / (d * d);  // x * e first: 4 * x overflows for x near -FLT_MAX
  // x - x is NaN exactly when x is +-inf, matching PyTorch's NaN gradient there.
  return x > T(MISH_LINEAR_ABOVE) ? T(1) + (x - x) : grad;
}

}  // namespace fer_kernels
