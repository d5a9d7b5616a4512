// One element of the Ranger step (Gradient Centralization + RAdam + Lookahead, docs/method.md section 3): the one
// definition used by the CPU twin (csrc/cpu/optim.cpp) and the CUDA kernel (csrc/cuda/optim.cu).
//
// Everything that depends only on the step count and the hyperparameters (bias corrections, the RAdam
// rectifier, whether this step ends a Lookahead cycle) is computed once per step on the host, in double,
// by fer_kernels/optim/ranger.py, and passed in RangerScalars.
#pragma once

#include <type_traits>

#include "common.h"

namespace fer_kernels {

// Scalars of one step for one bucket of parameters (same group, dtype and step count).
template <typename T>
struct RangerScalars {
  T beta1, beta2;   // moment decay rates
  T one_minus_beta1, one_minus_beta2;  // computed in double: 1 - float(0.999) is off by 1.3e-5
  T eps;            // added to sqrt(v_hat), outside the square root
  T l2;             // L2 weight decay, added to the gradient before centralization (0 if none)
  T decay;          // decoupled weight decay: p *= decay before the update (1 if none)
  T step_size;      // rectified: lr * r_t / (1 - beta1^t); un-adapted: lr / (1 - beta1^t)
  T inv_sqrt_bc2;   // 1 / sqrt(1 - beta2^t)
  T alpha;          // Lookahead: slow += alpha * (fast - slow)
};

// The gradient as the moments see it: raw gradient plus L2 decay, less its row's mean (Gradient
// Centralization; mean is 0 where it does not apply).
template <typename T>
FK_HOST_DEVICE FK_INLINE T ranger_gradient(T p, T g, T mean, const RangerScalars<T>& c) {
  return g + c.l2 * p - mean;
}

// Updates one element: the moments m and v in place, and returns the new parameter. RECTIFIED: rho_t >= 5,
// the adaptive step, else un-adapted momentum. SYNC: this step ends a Lookahead cycle (slow is read and
// written only then).
template <bool RECTIFIED, bool SYNC, typename T>
FK_HOST_DEVICE FK_INLINE T ranger_update(T p, T g, T mean, T& m, T& v, T* slow, const RangerScalars<T>& c) {
  g = ranger_gradient(p, g, mean, c);
  m = c.beta1 * m + c.one_minus_beta1 * g;
  v = c.beta2 * v + c.one_minus_beta2 * g * g;
  p = p * c.decay;
  if constexpr (RECTIFIED) {
    p = p - c.step_size * m / (fk_sqrt(v) * c.inv_sqrt_bc2 + c.eps);
  } else {
    p = p - c.step_size * m;
  }
  if constexpr (SYNC) {
    *slow = *slow + c.alpha * (p - *slow);
    p = *slow;
  }
  return p;
}

// Calls f with RECTIFIED and SYNC as compile-time constants (std::bool_constant).
template <typename F>
void dispatch_ranger(bool rectified, bool sync, F&& f) {
  if (rectified) {
    sync ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  } else {
    sync ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
  }
}

}  // namespace fer_kernels
