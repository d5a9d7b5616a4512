// The block tail of an Accuracy-Booster ResNet block, out = act(x * g[n, c] + identity), and the math
// of its backward: the one definition used by the CPU twin (csrc/cpu/recalibrate.cpp) and the CUDA
// kernels (csrc/cuda/recalibrate.cu).
//
// Forward:  z = x g + identity,  out = act(z)
// Backward: dz = dy act'(z),  dx = dz g,  d_identity = dz,  dg[n, c] = sum over H x W of dz x
// Only x, g and identity are saved; z is recomputed (one multiply-add) instead of stored.
#pragma once

#include "common.h"
#include "mish.h"

namespace fer_kernels {

// The index of each activation in fer_kernels.reference.ACTIVATIONS, which the Python side passes.
enum class Act : int { Mish = 0, Relu = 1, None = 2 };

template <Act A, typename T>
FK_HOST_DEVICE FK_INLINE T act_forward(T z) {
  if constexpr (A == Act::Mish) {
    return mish_forward(z);
  } else if constexpr (A == Act::Relu) {
    return z <= T(0) ? T(0) : z;  // NaN stays NaN, as torch.relu
  } else {
    return z;
  }
}

// d act(z) / dz, written so that dy * act_grad(z) matches PyTorch's backward, including at NaN.
template <Act A, typename T>
FK_HOST_DEVICE FK_INLINE T act_backward(T dy, T z) {
  if constexpr (A == Act::Mish) {
    return dy * mish_derivative(z);
  } else if constexpr (A == Act::Relu) {
    return z <= T(0) ? T(0) : dy;  // threshold_backward: the gradient passes where z > 0 or z is NaN
  } else {
    return dy;
  }
}

}  // namespace fer_kernels
