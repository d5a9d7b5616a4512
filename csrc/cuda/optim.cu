// The fused Ranger step on CUDA: the GPU twin of csrc/cpu/optim.cpp, using the same math (csrc/optim.h).
// One launch per bucket of parameters: block b takes plan row b (one row of a centralized gradient, or a
// chunk of a plain one); the tensors' addresses come from a table copied to the device with the launch,
// so any number of parameters share one launch (no per-launch argument limit, unlike a pointer list in
// the kernel's arguments).
#include <ATen/Dispatch.h>

#include "../ops.h"
#include "../optim.h"
#include "cuda_common.cuh"

namespace fer_kernels {
namespace {

constexpr int OPT_THREADS = 256;
constexpr int OPT_UNROLL = 4;  // elements in flight per thread per role

// Roles in the address table: row r holds the addresses of role r, one per parameter.
enum Role : int { ROLE_PARAM = 0, ROLE_GRAD = 1, ROLE_EXP_AVG = 2, ROLE_EXP_AVG_SQ = 3, ROLE_SLOW = 4, ROLES = 5 };

template <bool RECTIFIED, bool SYNC, typename scalar_t, typename T>
__global__ void __launch_bounds__(OPT_THREADS)
    ranger_kernel(const int64_t* __restrict__ table, int64_t tensors, const int64_t* __restrict__ plan,
                  RangerScalars<T> c) {
  const int64_t* row = plan + static_cast<int64_t>(blockIdx.x) * PLAN_COLUMNS;
  const int64_t t = row[PLAN_TENSOR], start = row[PLAN_START], n = row[PLAN_LENGTH];
  auto address = [&](int role) { return table[role * tensors + t]; };
  scalar_t* p = reinterpret_cast<scalar_t*>(address(ROLE_PARAM)) + start;
  const scalar_t* g = reinterpret_cast<const scalar_t*>(address(ROLE_GRAD)) + start;
  T* m = reinterpret_cast<T*>(address(ROLE_EXP_AVG)) + start;
  T* v = reinterpret_cast<T*>(address(ROLE_EXP_AVG_SQ)) + start;
  T* slow = SYNC ? reinterpret_cast<T*>(address(ROLE_SLOW)) + start : nullptr;

  T mean = T(0);
  if (row[PLAN_CENTRALIZE]) {  // the same for the whole block: no divergence
    __shared__ double warp_sums[OPT_THREADS / 32];
    __shared__ T block_mean;
    double sum = 0.0;
    if (c.l2 != T(0)) {  // p is read only with L2 decay
      for (int64_t i = threadIdx.x; i < n; i += OPT_THREADS) {
        sum += static_cast<double>(static_cast<T>(g[i]) + c.l2 * static_cast<T>(p[i]));
      }
    } else {
      for (int64_t i = threadIdx.x; i < n; i += OPT_THREADS) sum += static_cast<double>(static_cast<T>(g[i]));
    }
    sum = cuda::warp_sum(sum);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int w = 0; w < OPT_THREADS / 32; ++w) total += warp_sums[w];
      block_mean = static_cast<T>(total / static_cast<double>(n));
    }
    __syncthreads();
    mean = block_mean;
  }

  // OPT_UNROLL strided elements per thread and iteration, all loads before the math.
  for (int64_t base = threadIdx.x; base < n; base += OPT_THREADS * OPT_UNROLL) {
    T ps[OPT_UNROLL], gs[OPT_UNROLL], ms[OPT_UNROLL], vs[OPT_UNROLL];
#pragma unroll
    for (int u = 0; u < OPT_UNROLL; ++u) {
      const int64_t i = base + u * OPT_THREADS;
      if (i < n) {
        ps[u] = static_cast<T>(p[i]);
        gs[u] = static_cast<T>(g[i]);
        ms[u] = m[i];
        vs[u] = v[i];
      }
    }
#pragma unroll
    for (int u = 0; u < OPT_UNROLL; ++u) {
      const int64_t i = base + u * OPT_THREADS;
      if (i < n) {
        const T updated = ranger_update<RECTIFIED, SYNC>(ps[u], gs[u], mean, ms[u], vs[u], SYNC ? slow + i : nullptr, c);
        p[i] = static_cast<scalar_t>(updated);
        m[i] = ms[u];
        v[i] = vs[u];
      }
    }
  }
}

}  // namespace

void ranger_step_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                      const std::vector<at::Tensor>& slows, const at::Tensor& plan, const ScalarMap& scalars) {
  const bool rectified = scalar_of(scalars, "rectified") != 0, sync = scalar_of(scalars, "sync") != 0;
  check_ranger_step("ranger_step_cuda", params, grads, exp_avgs, exp_avg_sqs, slows, plan, sync);
  TORCH_CHECK(params[0].is_cuda(), "ranger_step_cuda: parameters must be CUDA tensors, got ", params[0].device());
  const c10::cuda::CUDAGuard guard(params[0].device());
  const int64_t tensors = static_cast<int64_t>(params.size());
  const int64_t segments = plan.size(0);
  if (segments == 0) return;
  TORCH_CHECK(segments <= std::numeric_limits<int32_t>::max(), "ranger_step_cuda: too many plan rows");

  // The address table, written in pinned memory and copied on the current stream; the caching host
  // allocator keeps the pinned block until the copy has run.
  at::Tensor table = at::empty({ROLES, tensors}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* host = table.mutable_data_ptr<int64_t>();
  const std::vector<at::Tensor>* lists[ROLES] = {&params, &grads, &exp_avgs, &exp_avg_sqs, &slows};
  for (int role = 0; role < ROLES; ++role) {
    for (int64_t i = 0; i < tensors; ++i) {
      const bool present = role != ROLE_SLOW || sync;
      host[role * tensors + i] = present ? reinterpret_cast<int64_t>((*lists[role])[i].data_ptr()) : 0;
    }
  }
  const at::Tensor device_table = table.to(params[0].device(), /*non_blocking=*/true);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "ranger_step_cuda", [&] {
    using T = typename MathType<scalar_t>::type;
    const RangerScalars<T> c = ranger_scalars<T>(scalars);
    dispatch_ranger(rectified, sync, [&](auto rect, auto syn) {
      constexpr bool R = decltype(rect)::value, S = decltype(syn)::value;
      ranger_kernel<R, S, scalar_t, T><<<segments, OPT_THREADS, 0, stream>>>(
          device_table.const_data_ptr<int64_t>(), tensors, plan.const_data_ptr<int64_t>(), c);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fer_kernels
