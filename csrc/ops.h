// Host entry points of the extension, one set per device. Inputs are validated here (TORCH_CHECK with
// the argument's name); the Python layer in fer_kernels/ops/ has already put them in a supported layout,
// but these functions are safe to call directly.
#pragma once

// The tensor type and the few operators used, not <ATen/ATen.h>: that header declares every operator, which
// costs each file that includes this one seconds of compiling.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "optim.h"
#include "recalibrate.h"

namespace fer_kernels {

// Shape of a block-tail problem: x viewed as N x C x HW, stored either NCHW (HW innermost) or
// channels-last (C innermost). Every tensor of one call shares the layout of x.
struct TailShape {
  int64_t N = 0, C = 0, HW = 0;
  bool channels_last = false;
};

inline bool is_channels_last_dense(const at::Tensor& t) {
  return t.dim() >= 3 && t.movedim(1, -1).is_contiguous();
}

// Whether x (N x C x ...), which must be dense, is stored channels-last rather than NCHW.
inline bool dense_channels_last(const char* op, const at::Tensor& x) {
  const bool channels_last = !x.is_contiguous() && is_channels_last_dense(x);
  TORCH_CHECK(x.is_contiguous() || channels_last, op,
              ": x must be contiguous in NCHW or channels-last order, got strides ", x.strides());
  return channels_last;
}

// Checks x / gate / identity (and grad, if given) and returns the problem's shape.
inline TailShape check_tail(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& gate,
                            const at::Tensor& identity, const at::Tensor* grad = nullptr) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape N x C x ..., got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TailShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.HW = s.N * s.C == 0 ? 0 : x.numel() / (s.N * s.C);
  s.channels_last = dense_channels_last(op, x);
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
                "), got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", t.device());
    bool layout_ok = s.channels_last ? is_channels_last_dense(t) : t.is_contiguous();
    TORCH_CHECK(layout_ok, op, ": ", name, " must be stored like x (", s.channels_last ? "channels-last" : "NCHW",
                "), got strides ", t.strides());
  };
  same(identity, "identity");
  if (grad != nullptr) same(*grad, "grad");
  if (gate.has_value()) {
    const at::Tensor& g = *gate;
    TORCH_CHECK(g.numel() == s.N * s.C && g.dim() >= 2 && g.size(0) == s.N && g.size(1) == s.C, op,
                ": gate must have shape N x C (x 1 x 1) = ", s.N, " x ", s.C, ", got ", g.sizes());
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), op, ": gate must be floating point, got ", g.scalar_type());
    TORCH_CHECK(g.device() == x.device(), op, ": gate must be on ", x.device(), ", got ", g.device());
  }
  return s;
}

// Two dense tensors of one shape whose elements sit at the same offsets (strides of size-1 dims ignored).
inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

inline void check_elementwise(const char* op, const at::Tensor& x, const at::Tensor* grad = nullptr) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.is_non_overlapping_and_dense(), op, ": x must be dense (no gaps or overlaps), got strides ",
              x.strides());
  if (grad != nullptr) {
    TORCH_CHECK(same_dense_layout(*grad, x), op, ": grad must have the shape and strides of x ", x.sizes(), " ",
                x.strides(), ", got ", grad->sizes(), " ", grad->strides());
    TORCH_CHECK(grad->scalar_type() == x.scalar_type(), op, ": grad must have the dtype of x");
    TORCH_CHECK(grad->device() == x.device(), op, ": grad must be on the device of x");
  }
}

// Calls f with the activation as a compile-time constant (std::integral_constant<Act, ...>).
template <typename F>
void dispatch_act(int64_t act, F&& f) {
  switch (static_cast<Act>(act)) {
    case Act::Mish: return f(std::integral_constant<Act, Act::Mish>{});
    case Act::Relu: return f(std::integral_constant<Act, Act::Relu>{});
    case Act::None: return f(std::integral_constant<Act, Act::None>{});
  }
  TORCH_CHECK(false, "recalibrate: act must be 0 (mish), 1 (relu) or 2 (none), got ", act);
}

// float16/bfloat16/float32 compute in float32, float64 in float64 (see MathType in common.h).
inline at::ScalarType math_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The gate as a contiguous N x C tensor of the math type: N*C values, so converting costs nothing and the
// kernels need not be instantiated for every gate dtype.
inline std::optional<at::Tensor> gate_in_math_type(const std::optional<at::Tensor>& gate, const TailShape& s,
                                                   at::ScalarType storage) {
  if (!gate.has_value()) return std::nullopt;
  return gate->reshape({s.N, s.C}).to(math_dtype(storage)).contiguous();
}

// The gate's gradient from the per-(n, c) partial sums in double (N*C x S for NCHW, N x S x C for
// channels-last): summed over the S splits in a fixed order, in the gate's shape and dtype. Undefined
// without a gate; zeros when `partial` is undefined (an empty problem).
inline at::Tensor gate_gradient(const std::optional<at::Tensor>& gate, const at::Tensor& partial) {
  if (!gate.has_value()) return {};
  if (!partial.defined()) return at::zeros(gate->sizes(), gate->options());
  return partial.sum(1).reshape(gate->sizes()).to(gate->scalar_type());
}

// ---- the fused optimizer step ----

// Scalars of a step as fer_kernels/optim/ranger.py passes them (a dict): the RangerScalars fields plus
// "rectified" and "sync" (0 or 1).
using ScalarMap = std::unordered_map<std::string, double>;

inline double scalar_of(const ScalarMap& scalars, const char* key) {
  auto it = scalars.find(key);
  TORCH_CHECK(it != scalars.end(), "ranger_step: scalars lack \"", key, "\"");
  return it->second;
}

template <typename T>
RangerScalars<T> ranger_scalars(const ScalarMap& s) {
  return {static_cast<T>(scalar_of(s, "beta1")), static_cast<T>(scalar_of(s, "beta2")),
          static_cast<T>(scalar_of(s, "one_minus_beta1")), static_cast<T>(scalar_of(s, "one_minus_beta2")),
          static_cast<T>(scalar_of(s, "eps")), static_cast<T>(scalar_of(s, "l2")),
          static_cast<T>(scalar_of(s, "decay")), static_cast<T>(scalar_of(s, "step_size")),
          static_cast<T>(scalar_of(s, "inv_sqrt_bc2")), static_cast<T>(scalar_of(s, "alpha"))};
}

// Columns of the plan: a parameter cut into segments, each a row of a centralized gradient or a chunk
// of a plain one. Built by fer_kernels/optim/ranger.py (_plan), once per set of parameters.
enum PlanColumn : int { PLAN_TENSOR = 0, PLAN_START = 1, PLAN_LENGTH = 2, PLAN_CENTRALIZE = 3, PLAN_COLUMNS = 4 };

// Checks the tensor lists of one step: one device and dtype per role, state in the math type, dense
// tensors laid out alike (the kernels walk them as flat buffers), and a plan of the right shape.
// copies (optional): bfloat16 copies of float32 parameters, whose gradients are then the copies' (bfloat16).
inline void check_ranger_step(const char* op, const std::vector<at::Tensor>& params,
                              const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                              const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& slows,
                              const at::Tensor& plan, bool sync, const std::vector<at::Tensor>& copies = {}) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, op, ": no parameters");
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n, op,
              ": params, grads, exp_avgs and exp_avg_sqs must have one tensor per parameter");
  TORCH_CHECK(!sync || slows.size() == n, op, ": a Lookahead sync step needs one slow buffer per parameter");
  const at::Tensor& first = params[0];
  TORCH_CHECK(at::isFloatingType(first.scalar_type()), op, ": parameters must be floating point");
  TORCH_CHECK(copies.empty() || (copies.size() == n && first.scalar_type() == at::kFloat), op,
              ": copies are one bfloat16 copy per float32 parameter, got ", copies.size(), " for ", n, " ",
              first.scalar_type(), " parameters");
  const at::ScalarType state_dtype = math_dtype(first.scalar_type());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == first.scalar_type() && p.device() == first.device(), op, ": parameter ", i,
                " has dtype ", p.scalar_type(), " on ", p.device(), ", the others ", first.scalar_type(), " on ",
                first.device());
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": parameter ", i, " is not dense");
    auto check = [&](const at::Tensor& t, const char* role, at::ScalarType dtype) {
      TORCH_CHECK(t.scalar_type() == dtype && t.device() == p.device(), op, ": ", role, " ", i, " must be ", dtype,
                  " on ", p.device(), ", got ", t.scalar_type(), " on ", t.device());
      TORCH_CHECK(same_dense_layout(t, p), op, ": ", role, " ", i, " must have the shape and strides of its parameter");
    };
    check(grads[i], "grad", copies.empty() ? first.scalar_type() : at::kBFloat16);
    if (!copies.empty()) check(copies[i], "copy", at::kBFloat16);
    check(exp_avgs[i], "exp_avg", state_dtype);
    check(exp_avg_sqs[i], "exp_avg_sq", state_dtype);
    if (sync) check(slows[i], "slow buffer", state_dtype);
  }
  TORCH_CHECK(plan.scalar_type() == at::kLong && plan.dim() == 2 && plan.size(1) == PLAN_COLUMNS &&
                  plan.is_contiguous() && plan.device() == first.device(),
              op, ": plan must be a contiguous int64 tensor of shape segments x ", int(PLAN_COLUMNS), " on ",
              first.device());
}

// images: uint8 C x H x W (C = 1 or 3, any strides); matrices N x 2 x 3 and colour N x 4, float32; out N x 3 x S x S
// (any strides, float16/bfloat16/float32/float64) is written and returned. See fer_kernels.augment.
at::Tensor augment_cpu(const std::vector<at::Tensor>& images, const at::Tensor& matrices, const at::Tensor& colour,
                       at::Tensor out, const std::vector<double>& mean, const std::vector<double>& std);
// FMix's mix of a dense x (N x C x H x W, NCHW or channels-last; float16/bfloat16/float32/float64/uint8) with
// its samples perm (N int64) under mask (H x W or N x H x W, float32; float64 for float64 x). See
// csrc/cpu/fmix_mix.cpp.
at::Tensor fmix_mix_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& perm);
// Training-mode batch normalisation of x (N x C x ..., NCHW or channels-last) followed by act; returns z and
// the batch's per-channel mean and biased variance (math type). See csrc/cpu/batch_norm_act.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward_cpu(const at::Tensor& x,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          const std::optional<at::Tensor>& bias,
                                                                          double eps, int64_t act);
// Returns dx, dweight and dbias (math type) from the forward's mean and var.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, double eps, int64_t act);
// 2-D max pooling of a channels-last x: the output and, per output, the position of its maximum in the window
// (uint8, kh * kernel_w + kw); backward gathers the input gradient from them. See csrc/cpu/max_pool.cpp.
std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_cpu(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                          at::IntArrayRef stride, at::IntArrayRef padding);
at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad, const at::Tensor& idx, at::IntArrayRef input_size,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding);
at::Tensor mish_forward_cpu(const at::Tensor& x);
at::Tensor mish_backward_cpu(const at::Tensor& grad, const at::Tensor& x);
at::Tensor recalibrate_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                   const at::Tensor& identity, int64_t act);
std::tuple<at::Tensor, at::Tensor, at::Tensor> recalibrate_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                        const std::optional<at::Tensor>& gate,
                                                                        const at::Tensor& identity, int64_t act);

// copies: empty, or one bfloat16 tensor per float32 parameter, its copy for the forward and backward passes:
// then grads are the copies' (bfloat16) gradients, and the step writes each updated parameter, rounded, into
// its copy. See csrc/cpu/optim.cpp.
void ranger_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::vector<at::Tensor>& slows, const at::Tensor& plan, const ScalarMap& scalars,
                     const std::vector<at::Tensor>& copies);

#ifdef FER_KERNELS_WITH_CUDA
at::Tensor mish_forward_cuda(const at::Tensor& x);
at::Tensor mish_backward_cuda(const at::Tensor& grad, const at::Tensor& x);
at::Tensor recalibrate_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                    const at::Tensor& identity, int64_t act);
std::tuple<at::Tensor, at::Tensor, at::Tensor> recalibrate_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                         const std::optional<at::Tensor>& gate,
                                                                         const at::Tensor& identity, int64_t act);
void ranger_step_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                      const std::vector<at::Tensor>& slows, const at::Tensor& plan, const ScalarMap& scalars);
#endif

}  // namespace fer_kernels
