// Mish on CUDA: the GPU twin of csrc/cpu/mish.cpp, using the same math (csrc/mish.h).
// Memory-bound: each thread moves UNROLL 16-byte packs per input, all loads issued before the math.
#include <ATen/Dispatch.h>

#include <array>

#include "../mish.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace fer_kernels {
namespace {

using cuda::Pack;

struct MishForward {
  template <typename T>
  __device__ T operator()(const T (&in)[1]) const {
    return mish_forward(in[0]);
  }
};

struct MishBackward {  // inputs: dy, x
  template <typename T>
  __device__ T operator()(const T (&in)[2]) const {
    return in[0] * mish_derivative(in[1]);
  }
};

// out[i] = op(in[0][i], ..., in[NIN-1][i]) over a dense buffer. Block b covers THREADS * UNROLL * VEC
// consecutive elements; pack u of thread t starts at element (u * THREADS + t) * VEC of it, so each of
// the UNROLL loads of an input is coalesced across the block.
template <int VEC, int NIN, typename scalar_t, typename Op>
__global__ void __launch_bounds__(cuda::THREADS)
    map_kernel(std::array<const scalar_t*, NIN> in, scalar_t* __restrict__ out, int64_t n, Op op) {
  using T = typename MathType<scalar_t>::type;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cuda::THREADS * cuda::UNROLL * VEC;
  Pack<scalar_t, VEC> packs[cuda::UNROLL][NIN];
#pragma unroll
  for (int u = 0; u < cuda::UNROLL; ++u) {
    const int64_t i = base + (static_cast<int64_t>(u) * cuda::THREADS + threadIdx.x) * VEC;
    if (i + VEC <= n) {
#pragma unroll
      for (int a = 0; a < NIN; ++a) packs[u][a] = cuda::load_pack<VEC>(in[a] + i);
    }
  }
#pragma unroll
  for (int u = 0; u < cuda::UNROLL; ++u) {
    const int64_t i = base + (static_cast<int64_t>(u) * cuda::THREADS + threadIdx.x) * VEC;
    T args[NIN];
    if (i + VEC <= n) {
      Pack<scalar_t, VEC> result;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
#pragma unroll
        for (int a = 0; a < NIN; ++a) args[a] = static_cast<T>(packs[u][a].v[k]);
        result.v[k] = static_cast<scalar_t>(op(args));
      }
      cuda::store_pack<VEC>(out + i, result);
    } else {
      for (int64_t j = i; j < n; ++j) {  // the partial pack at the end of the buffer
#pragma unroll
        for (int a = 0; a < NIN; ++a) args[a] = static_cast<T>(in[a][j]);
        out[j] = static_cast<scalar_t>(op(args));
      }
    }
  }
}

// Launches map_kernel over `inputs` (dense, same strides) into a new tensor shaped like inputs.back().
template <int NIN, typename Op>
at::Tensor launch_map(const char* name, const std::array<at::Tensor, NIN>& inputs, Op op) {
  const at::Tensor& like = inputs.back();
  TORCH_CHECK(like.is_cuda(), name, ": x must be a CUDA tensor, got ", like.device());
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty_like(like);
  const int64_t n = like.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "mish_cuda", [&] {
    std::array<const scalar_t*, NIN> ptrs;
    bool aligned = cuda::aligned16(out.const_data_ptr());
    for (int a = 0; a < NIN; ++a) {
      ptrs[a] = inputs[a].template const_data_ptr<scalar_t>();
      aligned = aligned && cuda::aligned16(ptrs[a]);
    }
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    auto launch = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const int64_t blocks = cuda::ceil_div(n, static_cast<int64_t>(cuda::THREADS) * cuda::UNROLL * V);
      map_kernel<V, NIN><<<blocks, cuda::THREADS, 0, stream>>>(ptrs, outp, n, op);
    };
    constexpr int VEC = cuda::vec_width<scalar_t>();
    aligned ? launch(std::integral_constant<int, VEC>{}) : launch(std::integral_constant<int, 1>{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

at::Tensor mish_forward_cuda(const at::Tensor& x) {
  check_elementwise("mish_forward_cuda", x);
  return launch_map<1>("mish_forward_cuda", {x}, MishForward{});
}

at::Tensor mish_backward_cuda(const at::Tensor& grad, const at::Tensor& x) {
  check_elementwise("mish_backward_cuda", x, &grad);
  return launch_map<2>("mish_backward_cuda", {grad, x}, MishBackward{});
}

}  // namespace fer_kernels
