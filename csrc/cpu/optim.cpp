// The fused Ranger step on the CPU: the C++ twin of csrc/cuda/optim.cu, using the same math (csrc/optim.h).
// One pass over every parameter of a bucket, segment by segment (plan rows); a centralized segment (one
// row of a weight's gradient) is read twice, first for its mean.
//
// With copies, the parameters are float32 masters of bfloat16 copies that the forward and backward passes
// use (fer_kernels.optim.BFloat16Weights): the gradients are the copies' bfloat16 ones, and the same pass
// writes each updated parameter, rounded, into its copy. Under CPU autocast the passes round every float32
// weight to bfloat16 and the weight gradient back to float32 at every step, two copies of the weights that
// this saves; the arithmetic is the same (a bfloat16 gradient widens exactly).
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "../optim.h"
#include "cpu_common.h"

namespace fer_kernels {
namespace {

// Sum of g + l2 * p over one row: SUM_BLOCK terms at a time across the vector lanes, the block sums in
// double (as csrc/cpu/recalibrate.cpp), so a row's mean is exact to the last bits of the math type.
constexpr int64_t SUM_BLOCK = 256;

template <bool L2, typename scalar_t, typename grad_t, typename T>
FK_CPU_CLONES T block_sum(const scalar_t* __restrict__ p, const grad_t* __restrict__ g, T l2, int64_t n) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += L2 ? static_cast<T>(g[i]) + l2 * static_cast<T>(p[i]) : static_cast<T>(g[i]);
  return acc;
}

// Mean of g + l2 * p over one row; p is read only with L2 decay.
template <typename scalar_t, typename grad_t, typename T>
T row_mean(const scalar_t* p, const grad_t* g, T l2, int64_t n) {
  double sum = 0.0;
  for (int64_t lo = 0; lo < n; lo += SUM_BLOCK) {
    const int64_t len = std::min(SUM_BLOCK, n - lo);
    sum += l2 != T(0) ? block_sum<true>(p + lo, g + lo, l2, len) : block_sum<false>(p + lo, g + lo, l2, len);
  }
  return static_cast<T>(sum / static_cast<double>(n));
}

// One segment of a bucket. COPY: float32 parameters whose gradients are their bfloat16 copies', and the
// updated parameter is also written, rounded, into the copy.
template <bool RECTIFIED, bool SYNC, bool COPY, typename scalar_t, typename grad_t, typename T>
FK_CPU_CLONES void update_segment(scalar_t* __restrict__ p, const grad_t* __restrict__ g,
                                  at::BFloat16* __restrict__ copy, T* __restrict__ m, T* __restrict__ v,
                                  T* __restrict__ slow, T mean, RangerScalars<T> c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T updated = ranger_update<RECTIFIED, SYNC>(static_cast<T>(p[i]), static_cast<T>(g[i]), mean, m[i], v[i],
                                                     SYNC ? slow + i : nullptr, c);
    p[i] = static_cast<scalar_t>(updated);
    if constexpr (COPY) copy[i] = static_cast<at::BFloat16>(updated);
  }
}

// body(tensor, start, length, centralize) for every plan row, rows split among threads by their elements
// (offsets: where each row starts in the bucket's elements), each task taking the rows that start in it.
template <typename Body>
void for_each_segment(const std::vector<int64_t>& offsets, const int64_t* rows, const Body& body) {
  const int64_t segments = static_cast<int64_t>(offsets.size()) - 1;
  at::parallel_for(0, offsets.back(), cpu::GRAIN, [&](int64_t begin, int64_t end) {
    auto first = std::lower_bound(offsets.begin(), offsets.end() - 1, begin) - offsets.begin();
    for (int64_t s = first; s < segments && offsets[s] < end; ++s) {
      const int64_t* r = rows + s * PLAN_COLUMNS;
      body(r[PLAN_TENSOR], r[PLAN_START], r[PLAN_LENGTH], r[PLAN_CENTRALIZE] != 0);
    }
  });
}

template <typename X>
struct TypeTag {
  using type = X;
};

}  // namespace

void ranger_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::vector<at::Tensor>& slows, const at::Tensor& plan, const ScalarMap& scalars,
                     const std::vector<at::Tensor>& copies) {
  const bool rectified = scalar_of(scalars, "rectified") != 0, sync = scalar_of(scalars, "sync") != 0;
  check_ranger_step("ranger_step_cpu", params, grads, exp_avgs, exp_avg_sqs, slows, plan, sync, copies);
  TORCH_CHECK(params[0].device().is_cpu(), "ranger_step_cpu: parameters must be on the CPU, got ", params[0].device());
  const int64_t segments = plan.size(0);
  const int64_t* rows = plan.const_data_ptr<int64_t>();
  // Where each segment starts in the bucket's elements: threads split the elements, not the segments,
  // whose lengths range from a few dozen (a stem row) to thousands (a layer-4 row).
  std::vector<int64_t> offsets(segments + 1, 0);
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t* r = rows + s * PLAN_COLUMNS;
    TORCH_CHECK(r[PLAN_TENSOR] >= 0 && r[PLAN_TENSOR] < static_cast<int64_t>(params.size()) && r[PLAN_START] >= 0 &&
                    r[PLAN_LENGTH] > 0 && r[PLAN_START] + r[PLAN_LENGTH] <= params[r[PLAN_TENSOR]].numel(),
                "ranger_step_cpu: plan row ", s, " is outside its parameter");
    offsets[s + 1] = offsets[s] + r[PLAN_LENGTH];
  }
  // The parameters' own dtype, or float32 parameters with bfloat16 gradients and copies.
  auto run = [&](auto param_type, auto grad_type, auto with_copy) {
    using scalar_t = typename decltype(param_type)::type;
    using grad_t = typename decltype(grad_type)::type;
    constexpr bool COPY = decltype(with_copy)::value;
    using T = typename MathType<scalar_t>::type;
    const RangerScalars<T> c = ranger_scalars<T>(scalars);
    dispatch_ranger(rectified, sync, [&](auto rect, auto syn) {
      constexpr bool R = decltype(rect)::value, S = decltype(syn)::value;
      for_each_segment(offsets, rows, [&](int64_t t, int64_t start, int64_t n, bool centralize) {
        scalar_t* p = params[t].mutable_data_ptr<scalar_t>() + start;
        const grad_t* g = grads[t].const_data_ptr<grad_t>() + start;
        const T mean = centralize ? row_mean(p, g, c.l2, n) : T(0);
        update_segment<R, S, COPY>(p, g, COPY ? copies[t].mutable_data_ptr<at::BFloat16>() + start : nullptr,
                                   exp_avgs[t].mutable_data_ptr<T>() + start,
                                   exp_avg_sqs[t].mutable_data_ptr<T>() + start,
                                   S ? slows[t].mutable_data_ptr<T>() + start : nullptr, mean, c, n);
      });
    });
  };
  if (!copies.empty()) {
    run(TypeTag<float>{}, TypeTag<at::BFloat16>{}, std::true_type{});
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ranger_step_cpu", [&] {
    run(TypeTag<scalar_t>{}, TypeTag<scalar_t>{}, std::false_type{});
  });
}

}  // namespace fer_kernels
