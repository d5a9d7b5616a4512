// The block tail out = act(x * g + identity) on the CPU: the C++ twin of csrc/cuda/recalibrate.cu, using
// the same math (csrc/recalibrate.h). NCHW and channels-last are both walked in memory order.
#include <ATen/Dispatch.h>

#include <vector>

#include "../ops.h"
#include "../recalibrate.h"
#include "cpu_common.h"

namespace fer_kernels {
namespace {

// ---- inner loops (vectorised per CPU by FK_CPU_CLONES) ----

// One contiguous run of a single (n, c) plane (NCHW): the gate is a scalar.
template <Act A, typename scalar_t, typename T>
FK_CPU_CLONES void tail_forward_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ id,
                                    scalar_t* __restrict__ out, T g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(act_forward<A>(static_cast<T>(x[i]) * g + static_cast<T>(id[i])));
  }
}

// Consecutive channels-last rows of C channels each: the gate is a vector over c.
template <Act A, typename scalar_t, typename T>
FK_CPU_CLONES void tail_forward_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ id,
                                     scalar_t* __restrict__ out, const T* __restrict__ g, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r, x += C, id += C, out += C) {
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<scalar_t>(act_forward<A>(static_cast<T>(x[c]) * g[c] + static_cast<T>(id[c])));
    }
  }
}

// Backward over a run of one plane (at most SUM_BLOCK elements); returns sum(dz * x) over the run.
template <Act A, typename scalar_t, typename T>
FK_CPU_CLONES T tail_backward_run(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  const scalar_t* __restrict__ id, scalar_t* __restrict__ dx,
                                  scalar_t* __restrict__ did, T g, int64_t n) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    T xv = static_cast<T>(x[i]);
    T dz = act_backward<A>(static_cast<T>(dy[i]), xv * g + static_cast<T>(id[i]));
    dx[i] = static_cast<scalar_t>(dz * g);
    did[i] = static_cast<scalar_t>(dz);
    acc += dz * xv;
  }
  return acc;
}

// Backward over consecutive channels-last rows (at most SUM_ROWS): sums dz * x down each column into
// acc[c], in the math type; the caller adds these block sums up in double.
template <Act A, typename scalar_t, typename T>
FK_CPU_CLONES void tail_backward_rows(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ id, scalar_t* __restrict__ dx,
                                      scalar_t* __restrict__ did, const T* __restrict__ g, T* __restrict__ acc,
                                      int64_t rows, int64_t C) {
  for (int64_t c = 0; c < C; ++c) acc[c] = T(0);
  for (int64_t r = 0; r < rows; ++r, dy += C, x += C, id += C, dx += C, did += C) {
    for (int64_t c = 0; c < C; ++c) {
      T xv = static_cast<T>(x[c]);
      T dz = act_backward<A>(static_cast<T>(dy[c]), xv * g[c] + static_cast<T>(id[c]));
      dx[c] = static_cast<scalar_t>(dz * g[c]);
      did[c] = static_cast<scalar_t>(dz);
      acc[c] += dz * xv;
    }
  }
}

template <typename T>
FK_CPU_CLONES void add_to_double(const T* __restrict__ src, double* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<double>(src[i]);
}

// ---- drivers ----

template <Act A, typename scalar_t>
void tail_forward(const TailShape& s, const scalar_t* x, const scalar_t* id, scalar_t* out,
                  const typename MathType<scalar_t>::type* gate) {
  using T = typename MathType<scalar_t>::type;
  const int64_t numel = s.N * s.C * s.HW;
  if (!s.channels_last) {
    // Flat ranges of the NCHW buffer, cut at plane boundaries so each piece has one gate value.
    at::parallel_for(0, numel, cpu::GRAIN, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end;) {
        const int64_t plane = i / s.HW;
        const int64_t stop = std::min(end, (plane + 1) * s.HW);
        const T g = gate ? gate[plane] : T(1);
        cpu::prefetched_blocks(
            i, stop, [&](int64_t lo, int64_t hi) { tail_forward_run<A>(x + lo, id + lo, out + lo, g, hi - lo); }, x,
            id);
        i = stop;
      }
    });
  } else {
    std::vector<T> ones(gate ? 0 : s.C, T(1));
    // Rows of one image share a gate vector: cut the row range at image boundaries.
    at::parallel_for(0, s.N * s.HW, std::max<int64_t>(1, cpu::GRAIN / s.C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end;) {
        const int64_t n = r / s.HW;
        const int64_t stop = std::min(end, (n + 1) * s.HW);
        const T* g = gate ? gate + n * s.C : ones.data();
        cpu::prefetched_rows(
            r, stop, s.C,
            [&](int64_t lo, int64_t hi) {
              const int64_t o = lo * s.C;
              tail_forward_rows<A>(x + o, id + o, out + o, g, hi - lo, s.C);
            },
            x, id);
        r = stop;
      }
    });
  }
}

// The per-(n, c) sums are kept as accurate as PyTorch's own cascade sum: blocks of terms are summed in
// the math type (NCHW: SUM_BLOCK terms spread over the vector lanes; channels-last: SUM_ROWS terms down
// each column) and the block sums are added in double.
constexpr int64_t SUM_BLOCK = 256;
constexpr int64_t SUM_ROWS = 16;

// dg goes to `partial` (double), shaped N*C x S (NCHW) or N x S x C (channels-last), summed over S by
// the caller. S depends on the shape only, so the result does not depend on the number of threads.
template <Act A, typename scalar_t>
void tail_backward(const TailShape& s, const scalar_t* dy, const scalar_t* x, const scalar_t* id, scalar_t* dx,
                   scalar_t* did, const typename MathType<scalar_t>::type* gate, double* partial, int64_t splits) {
  using T = typename MathType<scalar_t>::type;
  const int64_t chunk = cpu::ceil_div(s.HW, splits);
  if (!s.channels_last) {
    const int64_t planes = s.N * s.C;
    at::parallel_for(0, planes * splits, std::max<int64_t>(1, cpu::GRAIN / chunk), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t plane = item / splits, part = item % splits;
        const int64_t hi = std::min(s.HW, (part + 1) * chunk);
        const T g = gate ? gate[plane] : T(1);
        double total = 0.0;
        for (int64_t lo = part * chunk; lo < hi; lo += SUM_BLOCK) {
          const int64_t o = plane * s.HW + lo, len = std::min(SUM_BLOCK, hi - lo);
          cpu::prefetch_ahead(len, dy + o, x + o, id + o);
          total += tail_backward_run<A>(dy + o, x + o, id + o, dx + o, did + o, g, len);
        }
        partial[item] = total;
      }
    });
  } else {
    std::vector<T> ones(gate ? 0 : s.C, T(1));
    at::parallel_for(0, s.N * splits, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> block(s.C);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / splits, part = item % splits;
        const T* g = gate ? gate + n * s.C : ones.data();
        double* total = partial + item * s.C;
        std::fill(total, total + s.C, 0.0);
        const int64_t hi = std::min(s.HW, (part + 1) * chunk);
        for (int64_t lo = part * chunk; lo < hi; lo += SUM_ROWS) {
          const int64_t o = (n * s.HW + lo) * s.C, rows = std::min(SUM_ROWS, hi - lo);
          cpu::prefetch_ahead(rows * s.C, dy + o, x + o, id + o);
          tail_backward_rows<A>(dy + o, x + o, id + o, dx + o, did + o, g, block.data(), rows, s.C);
          add_to_double(block.data(), total, s.C);
        }
      }
    });
  }
}

}  // namespace

at::Tensor recalibrate_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                   const at::Tensor& identity, int64_t act) {
  const TailShape s = check_tail("recalibrate_forward_cpu", x, gate, identity);
  TORCH_CHECK(x.device().is_cpu(), "recalibrate_forward_cpu: x must be a CPU tensor, got ", x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const auto g = gate_in_math_type(gate, s, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recalibrate_forward_cpu", [&] {
    using T = typename MathType<scalar_t>::type;
    dispatch_act(act, [&](auto a) {
      tail_forward<decltype(a)::value>(s, x.const_data_ptr<scalar_t>(), identity.const_data_ptr<scalar_t>(),
                                       out.mutable_data_ptr<scalar_t>(), g ? g->const_data_ptr<T>() : nullptr);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recalibrate_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                        const std::optional<at::Tensor>& gate,
                                                                        const at::Tensor& identity, int64_t act) {
  const TailShape s = check_tail("recalibrate_backward_cpu", x, gate, identity, &grad);
  TORCH_CHECK(x.device().is_cpu(), "recalibrate_backward_cpu: x must be a CPU tensor, got ", x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor did = at::empty_like(x);
  if (x.numel() == 0) return {dx, gate_gradient(gate, {}), did};
  // Split a plane (or an image, channels-last) into pieces of about GRAIN elements so that a few large
  // planes still spread over all threads.
  const int64_t per_item = s.channels_last ? s.HW * s.C : s.HW;
  const int64_t splits = std::max<int64_t>(1, per_item / cpu::GRAIN);
  const auto g = gate_in_math_type(gate, s, x.scalar_type());
  at::Tensor partial = s.channels_last ? at::empty({s.N, splits, s.C}, x.options().dtype(at::kDouble))
                                       : at::empty({s.N * s.C, splits}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recalibrate_backward_cpu", [&] {
    using T = typename MathType<scalar_t>::type;
    dispatch_act(act, [&](auto a) {
      tail_backward<decltype(a)::value>(s, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                        identity.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                                        did.mutable_data_ptr<scalar_t>(), g ? g->const_data_ptr<T>() : nullptr,
                                        partial.mutable_data_ptr<double>(), splits);
    });
  });
  return {dx, gate_gradient(gate, partial), did};
}

}  // namespace fer_kernels
