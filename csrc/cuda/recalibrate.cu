// The block tail out = act(x * g + identity) on CUDA: the GPU twin of csrc/cpu/recalibrate.cpp, using the
// same math (csrc/recalibrate.h). NCHW and channels-last are both read in memory order with 16-byte
// packs where the row length allows; the backward's per-(n, c) sum is reduced on chip, deterministically
// (fixed split, fixed reduction order, no atomics), and finished by one small sum over the splits. Sums
// accumulate in double (one add per pack in NCHW, per element in channels-last): float sums over a
// 112 x 112 plane would otherwise lose several digits against PyTorch's cascade sum.
#include <ATen/Dispatch.h>

#include <algorithm>

#include "../ops.h"
#include "../recalibrate.h"
#include "cuda_common.cuh"

namespace fer_kernels {
namespace {

using cuda::Pack;
using cuda::THREADS;
using cuda::UNROLL;

// Gate index of flat element j: its (n, c) plane in NCHW, n * C + c in channels-last.
template <bool CL>
__device__ __forceinline__ int64_t gate_index(int64_t j, int64_t HW, int64_t C) {
  return CL ? (j / (HW * C)) * C + j % C : j / HW;
}

// VEC > 1 only when a pack never straddles a plane (NCHW: HW % VEC == 0) or a row (channels-last:
// C % VEC == 0), so one pack needs one gate value (NCHW) or VEC consecutive ones (channels-last).
template <Act A, bool CL, int VEC, typename scalar_t, typename T>
__global__ void __launch_bounds__(THREADS)
    tail_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ id, scalar_t* __restrict__ out,
                        const T* __restrict__ gate, int64_t n, int64_t HW, int64_t C) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * THREADS * UNROLL * VEC;
  Pack<scalar_t, VEC> xs[UNROLL], ids[UNROLL];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int64_t i = base + (static_cast<int64_t>(u) * THREADS + threadIdx.x) * VEC;
    if (i + VEC <= n) {
      xs[u] = cuda::load_pack<VEC>(x + i);
      ids[u] = cuda::load_pack<VEC>(id + i);
    }
  }
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int64_t i = base + (static_cast<int64_t>(u) * THREADS + threadIdx.x) * VEC;
    if (i + VEC <= n) {
      const int64_t gi = gate_index<CL>(i, HW, C);
      Pack<scalar_t, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const T g = gate == nullptr ? T(1) : gate[CL ? gi + k : gi];
        o.v[k] = static_cast<scalar_t>(act_forward<A>(static_cast<T>(xs[u].v[k]) * g + static_cast<T>(ids[u].v[k])));
      }
      cuda::store_pack<VEC>(out + i, o);
    } else {
      for (int64_t j = i; j < n; ++j) {
        const T g = gate == nullptr ? T(1) : gate[gate_index<CL>(j, HW, C)];
        out[j] = static_cast<scalar_t>(act_forward<A>(static_cast<T>(x[j]) * g + static_cast<T>(id[j])));
      }
    }
  }
}

// NCHW backward: one warp per (plane, split); lanes stride through the split in packs, then a warp sum.
template <Act A, int VEC, typename scalar_t, typename T>
__global__ void __launch_bounds__(THREADS)
    tail_backward_nchw_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ id, scalar_t* __restrict__ dx, scalar_t* __restrict__ did,
                              const T* __restrict__ gate, double* __restrict__ partial, int64_t planes, int64_t HW,
                              int64_t splits, int64_t chunk) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (THREADS / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (item >= planes * splits) return;  // a whole warp leaves together, so warp_sum below stays full
  const int64_t plane = item / splits;
  const int64_t lo = (item % splits) * chunk;
  const int64_t hi = std::min(HW, lo + chunk);
  const T g = gate == nullptr ? T(1) : gate[plane];
  const int64_t off = plane * HW;
  double acc = 0.0;
  for (int64_t j = lo + lane * VEC; j < hi; j += 32 * VEC) {
    T pack_sum = T(0);
    if (j + VEC <= hi) {
      const auto dyv = cuda::load_pack<VEC>(dy + off + j);
      const auto xv = cuda::load_pack<VEC>(x + off + j);
      const auto idv = cuda::load_pack<VEC>(id + off + j);
      Pack<scalar_t, VEC> dxv, didv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const T xk = static_cast<T>(xv.v[k]);
        const T dz = act_backward<A>(static_cast<T>(dyv.v[k]), xk * g + static_cast<T>(idv.v[k]));
        dxv.v[k] = static_cast<scalar_t>(dz * g);
        didv.v[k] = static_cast<scalar_t>(dz);
        pack_sum += dz * xk;
      }
      cuda::store_pack<VEC>(dx + off + j, dxv);
      cuda::store_pack<VEC>(did + off + j, didv);
    } else {
      for (int64_t e = off + j; e < off + hi; ++e) {
        const T xk = static_cast<T>(x[e]);
        const T dz = act_backward<A>(static_cast<T>(dy[e]), xk * g + static_cast<T>(id[e]));
        dx[e] = static_cast<scalar_t>(dz * g);
        did[e] = static_cast<scalar_t>(dz);
        pack_sum += dz * xk;
      }
    }
    acc += static_cast<double>(pack_sum);
  }
  acc = cuda::warp_sum(acc);
  if (lane == 0) partial[item] = acc;
}

// Channels-last backward: a block owns (n, a tile of TX * VEC channels, a split of the H x W rows). Thread
// (ty, tx) walks rows ty, ty + TY, ... of its VEC channels; the TY partial sums meet in shared memory.
template <Act A, int VEC, typename scalar_t, typename T>
__global__ void __launch_bounds__(THREADS)
    tail_backward_nhwc_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ id, scalar_t* __restrict__ dx, scalar_t* __restrict__ did,
                              const T* __restrict__ gate, double* __restrict__ partial, int64_t HW, int64_t C,
                              int64_t splits, int64_t rows_per_split, int TX) {
  __shared__ double smem[THREADS * VEC];
  const int TY = THREADS / TX;
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  const int64_t c_tiles = cuda::ceil_div(C, static_cast<int64_t>(TX) * VEC);
  const int64_t part = blockIdx.x % splits;
  const int64_t ct = (blockIdx.x / splits) % c_tiles;
  const int64_t n = blockIdx.x / (splits * c_tiles);
  const int64_t c0 = (ct * TX + tx) * VEC;
  const bool active = c0 < C;
  T g[VEC];
  double acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    g[k] = (gate == nullptr || !active) ? T(1) : gate[n * C + c0 + k];
    acc[k] = 0.0;
  }
  const int64_t r_lo = part * rows_per_split;
  const int64_t r_hi = std::min(HW, r_lo + rows_per_split);
  if (active) {
    for (int64_t r = r_lo + ty; r < r_hi; r += TY) {
      const int64_t o = (n * HW + r) * C + c0;
      const auto dyv = cuda::load_pack<VEC>(dy + o);
      const auto xv = cuda::load_pack<VEC>(x + o);
      const auto idv = cuda::load_pack<VEC>(id + o);
      Pack<scalar_t, VEC> dxv, didv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const T xk = static_cast<T>(xv.v[k]);
        const T dz = act_backward<A>(static_cast<T>(dyv.v[k]), xk * g[k] + static_cast<T>(idv.v[k]));
        dxv.v[k] = static_cast<scalar_t>(dz * g[k]);
        didv.v[k] = static_cast<scalar_t>(dz);
        acc[k] += static_cast<double>(dz * xk);
      }
      cuda::store_pack<VEC>(dx + o, dxv);
      cuda::store_pack<VEC>(did + o, didv);
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) smem[ty * TX * VEC + tx * VEC + k] = acc[k];
  __syncthreads();
  if (ty == 0 && active) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      double s = 0.0;
      for (int t = 0; t < TY; ++t) s += smem[t * TX * VEC + tx * VEC + k];
      partial[(n * splits + part) * C + c0 + k] = s;
    }
  }
}

}  // namespace

at::Tensor recalibrate_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                    const at::Tensor& identity, int64_t act) {
  const TailShape s = check_tail("recalibrate_forward_cuda", x, gate, identity);
  TORCH_CHECK(x.is_cuda(), "recalibrate_forward_cuda: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const auto g = gate_in_math_type(gate, s, x.scalar_type());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recalibrate_forward_cuda", [&] {
    using T = typename MathType<scalar_t>::type;
    constexpr int VEC = cuda::vec_width<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* ip = identity.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const T* gp = g ? g->const_data_ptr<T>() : nullptr;
    const bool packed = (s.channels_last ? s.C : s.HW) % VEC == 0 && cuda::aligned16(xp) && cuda::aligned16(ip) &&
                        cuda::aligned16(op);
    dispatch_act(act, [&](auto a) {
      constexpr Act A = decltype(a)::value;
      auto launch = [&](auto cl, auto vec) {
        constexpr bool CL = decltype(cl)::value;
        constexpr int V = decltype(vec)::value;
        const int64_t blocks = cuda::ceil_div(n, static_cast<int64_t>(THREADS) * UNROLL * V);
        tail_forward_kernel<A, CL, V><<<blocks, THREADS, 0, stream>>>(xp, ip, op, gp, n, s.HW, s.C);
      };
      using CLt = std::true_type;
      using NCt = std::false_type;
      using Vp = std::integral_constant<int, VEC>;
      using V1 = std::integral_constant<int, 1>;
      if (s.channels_last) {
        packed ? launch(CLt{}, Vp{}) : launch(CLt{}, V1{});
      } else {
        packed ? launch(NCt{}, Vp{}) : launch(NCt{}, V1{});
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recalibrate_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                         const std::optional<at::Tensor>& gate,
                                                                         const at::Tensor& identity, int64_t act) {
  const TailShape s = check_tail("recalibrate_backward_cuda", x, gate, identity, &grad);
  TORCH_CHECK(x.is_cuda(), "recalibrate_backward_cuda: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor did = at::empty_like(x);
  if (x.numel() == 0) return {dx, gate_gradient(gate, {}), did};
  const auto g = gate_in_math_type(gate, s, x.scalar_type());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = cuda::sm_count();
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recalibrate_backward_cuda", [&] {
    using T = typename MathType<scalar_t>::type;
    constexpr int VEC = cuda::vec_width<scalar_t>();
    const scalar_t* dyp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* ip = identity.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* dip = did.mutable_data_ptr<scalar_t>();
    const T* gp = g ? g->const_data_ptr<T>() : nullptr;
    const bool packed = (s.channels_last ? s.C : s.HW) % VEC == 0 && cuda::aligned16(dyp) && cuda::aligned16(xp) &&
                        cuda::aligned16(ip) && cuda::aligned16(dxp) && cuda::aligned16(dip);
    dispatch_act(act, [&](auto a) {
      constexpr Act A = decltype(a)::value;
      if (!s.channels_last) {
        // Enough warps to fill every SM (64 resident warps each), each split at least 4 packs per lane.
        const int v = packed ? VEC : 1;
        const int64_t planes = s.N * s.C;
        const int64_t max_splits = std::max<int64_t>(1, s.HW / (32 * v * 4));
        int64_t splits = std::clamp<int64_t>(cuda::ceil_div(sms * 64, planes), 1, max_splits);
        const int64_t chunk = cuda::ceil_div(cuda::ceil_div(s.HW, splits), v) * v;
        splits = cuda::ceil_div(s.HW, chunk);
        partial = at::empty({planes, splits}, x.options().dtype(at::kDouble));
        const int64_t blocks = cuda::ceil_div(planes * splits, THREADS / 32);
        double* pp = partial.mutable_data_ptr<double>();
        if (packed) {
          tail_backward_nchw_kernel<A, VEC><<<blocks, THREADS, 0, stream>>>(dyp, xp, ip, dxp, dip, gp, pp, planes,
                                                                             s.HW, splits, chunk);
        } else {
          tail_backward_nchw_kernel<A, 1><<<blocks, THREADS, 0, stream>>>(dyp, xp, ip, dxp, dip, gp, pp, planes, s.HW,
                                                                           splits, chunk);
        }
      } else {
        auto launch = [&](auto vec) {
          constexpr int V = decltype(vec)::value;
          // Lanes along channels: the smallest power of two covering C (at most a warp), rows on the rest.
          int TX = 1;
          while (TX < 32 && static_cast<int64_t>(TX) * V < s.C) TX *= 2;
          const int TY = THREADS / TX;
          const int64_t c_tiles = cuda::ceil_div(s.C, static_cast<int64_t>(TX) * V);
          const int64_t max_splits = std::max<int64_t>(1, s.HW / (TY * 4));
          int64_t splits = std::clamp<int64_t>(cuda::ceil_div(sms * 8, s.N * c_tiles), 1, max_splits);
          const int64_t rows = cuda::ceil_div(s.HW, splits);
          splits = cuda::ceil_div(s.HW, rows);
          partial = at::empty({s.N, splits, s.C}, x.options().dtype(at::kDouble));
          const int64_t blocks = s.N * c_tiles * splits;
          tail_backward_nhwc_kernel<A, V><<<blocks, THREADS, 0, stream>>>(
              dyp, xp, ip, dxp, dip, gp, partial.mutable_data_ptr<double>(), s.HW, s.C, splits, rows, TX);
        };
        packed ? launch(std::integral_constant<int, VEC>{}) : launch(std::integral_constant<int, 1>{});
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, gate_gradient(gate, partial), did};
}

}  // namespace fer_kernels
