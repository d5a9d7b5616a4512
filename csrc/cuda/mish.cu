// Mish on CUDA: the GPU twin of csrc/cpu/mish.cpp, using the same math (csrc/mish.h).
// Memory-bound: each thread moves UNROLL 16-byte packs, all loads issued before the math.
#include <ATen/Dispatch.h>

#include "../mish.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace fer_kernels {
namespace {

using cuda::Pack;

// Block b covers THREADS * UNROLL * VEC consecutive elements; within it, pack u of thread t starts at
// element (u * THREADS + t) * VEC, so each of the UNROLL loads is coalesced across the block.
template <int VEC, typename scalar_t>
__global__ void __launch_bounds__(cuda::THREADS)
    mish_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n) {
  using T = typename MathType<scalar_t>::type;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cuda::THREADS * cuda::UNROLL * VEC;
  Pack<scalar_t, VEC> in[cuda::UNROLL];
#pragma unroll
  for (int u = 0; u < cuda::UNROLL; ++u) {
    const int64_t i = base + (static_cast<int64_t>(u) * cuda::THREADS + threadIdx.x) * VEC;
    if (i + VEC <= n) in[u] = cuda::load_pack<VEC>(x + i);
  }
#pragma unroll
  for (int u = 0; u < cuda::UNROLL; ++u) {
    const int64_t i = base + (static_cast<int64_t>(u) * cuda::THREADS + threadIdx.x) * VEC;
    if (i + VEC <= n) {
      Pack<scalar_t, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = static_cast<scalar_t>(mish_forward(static_cast<T>(in[u].v[k])));
      cuda::store_pack<VEC>(y + i, out);
    } else {
      for (int64_t j = i; j < n; ++j) y[j] = static_cast<scalar_t>(mish_forward(static_cast<T>(x[j])));
    }
  }
}

template <int VEC, typename scalar_t>
__global__ void __launch_bounds__(cuda::THREADS)
    mish_backward_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                         int64_t n) {
  using T = typename MathType<scalar_t>::type;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cuda::THREADS * cuda::UNROLL * VEC;
  Pack<scalar_t, VEC> in_x[cuda::UNROLL], in_dy[cuda::UNROLL];
#pragma unroll
  for (int u = 0; u < cuda::UNROLL; ++u) {
    const int64_t i = base + (static_cast<int64_t>(u) * cuda::THREADS + threadIdx.x) * VEC;
    if (i + VEC <= n) {
      in_x[u] = cuda::load_pack<VEC>(x + i);
      in_dy[u] = cuda::load_pack<VEC>(dy + i);
    }
  }
#pragma unroll
  for (int u = 0; u < cuda::UNROLL; ++u) {
    const int64_t i = base + (static_cast<int64_t>(u) * cuda::THREADS + threadIdx.x) * VEC;
    if (i + VEC <= n) {
      Pack<scalar_t, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] = static_cast<scalar_t>(static_cast<T>(in_dy[u].v[k]) * mish_derivative(static_cast<T>(in_x[u].v[k])));
      }
      cuda::store_pack<VEC>(dx + i, out);
    } else {
      for (int64_t j = i; j < n; ++j) {
        dx[j] = static_cast<scalar_t>(static_cast<T>(dy[j]) * mish_derivative(static_cast<T>(x[j])));
      }
    }
  }
}

template <int VEC>
int64_t blocks_for(int64_t n) {
  return cuda::ceil_div(n, static_cast<int64_t>(cuda::THREADS) * cuda::UNROLL * VEC);
}

}  // namespace

at::Tensor mish_forward_cuda(const at::Tensor& x) {
  check_elementwise("mish_forward_cuda", x);
  TORCH_CHECK(x.is_cuda(), "mish_forward_cuda: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mish_forward_cuda", [&] {
    constexpr int VEC = cuda::vec_width<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (cuda::aligned16(xp) && cuda::aligned16(yp)) {
      mish_forward_kernel<VEC><<<blocks_for<VEC>(n), cuda::THREADS, 0, stream>>>(xp, yp, n);
    } else {
      mish_forward_kernel<1><<<blocks_for<1>(n), cuda::THREADS, 0, stream>>>(xp, yp, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor mish_backward_cuda(const at::Tensor& grad, const at::Tensor& x) {
  check_elementwise("mish_backward_cuda", x, &grad);
  TORCH_CHECK(x.is_cuda(), "mish_backward_cuda: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return dx;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mish_backward_cuda", [&] {
    constexpr int VEC = cuda::vec_width<scalar_t>();
    const scalar_t* dyp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    if (cuda::aligned16(dyp) && cuda::aligned16(xp) && cuda::aligned16(dxp)) {
      mish_backward_kernel<VEC><<<blocks_for<VEC>(n), cuda::THREADS, 0, stream>>>(dyp, xp, dxp, n);
    } else {
      mish_backward_kernel<1><<<blocks_for<1>(n), cuda::THREADS, 0, stream>>>(dyp, xp, dxp, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace fer_kernels
