// Training-mode batch normalisation fused with the activation after it, on the CPU:
//   y = (x - mean[c]) * invstd[c] * gamma[c] + beta[c],   z = act(y)
// with the mean and biased variance of channel c over N x H x W. ResNet's stem and the first convolution
// of every block are followed by this pair; in PyTorch it is three passes forward (statistics, normalise,
// activation) and three back, and saves both x and y. Here: one pass for the statistics and one for z;
// backward recomputes y from x (only x is saved) in a pass that writes dy (into dx's memory, rounded to
// the storage type as PyTorch's activation backward does) and takes the two per-channel sums, and a
// linear pass turns dy into dx (evaluating act' once: it costs more than a pass over memory):
//   dy = dz act'(y),  dbeta = sum dy,  dgamma = invstd sum dy (x - mean)
//   dx = gamma invstd (dy - sum dy / M - (x - mean) invstd^2 sum dy (x - mean) / M),  M = N H W
// Sums are taken against a per-channel shift (the channel's first value), so that the one-pass variance
// does not cancel when |mean| >> std. They accumulate in double, as PyTorch's CPU batch norm does (summing
// blocks in float made dbias of a float32 input 5x less accurate than PyTorch's), over pieces fixed by the
// shape, so the result does not depend on the number of threads.
#include <ATen/Dispatch.h>

#include <vector>

#include "../ops.h"
#include "../recalibrate.h"
#include "cpu_common.h"

namespace fer_kernels {
namespace {

constexpr int64_t SUM_BLOCK = 256;  // NCHW: terms of a plane per call of the inner loop
constexpr int64_t SUM_ROWS = 16;    // channels-last: rows per call of the inner loop

// ---- inner loops (vectorised per CPU by FK_CPU_CLONES) ----

// Adds the sums of d = x - shift and d^2 over one run of a plane (NCHW) to *s1 and *s2.
template <typename scalar_t, typename T>
FK_CPU_CLONES void stats_run(const scalar_t* __restrict__ x, T shift, double* s1, double* s2, int64_t n) {
  double a1 = 0.0, a2 = 0.0;
#pragma omp simd reduction(+ : a1, a2)
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(static_cast<T>(x[i]) - shift);
    a1 += d;
    a2 += d * d;
  }
  *s1 += a1;
  *s2 += a2;
}

// The same down each column of consecutive channels-last rows, into s1[c] and s2[c].
template <typename scalar_t, typename T>
FK_CPU_CLONES void stats_rows(const scalar_t* __restrict__ x, const T* __restrict__ shift, double* __restrict__ s1,
                              double* __restrict__ s2, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r, x += C) {
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(static_cast<T>(x[c]) - shift[c]);
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

template <Act A, typename scalar_t, typename T>
FK_CPU_CLONES void forward_run(const scalar_t* __restrict__ x, scalar_t* __restrict__ z, T mean, T scale, T beta,
                               int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    z[i] = static_cast<scalar_t>(act_forward<A>((static_cast<T>(x[i]) - mean) * scale + beta));
  }
}

template <Act A, typename scalar_t, typename T>
FK_CPU_CLONES void forward_rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ z, const T* __restrict__ mean,
                                const T* __restrict__ scale, const T* __restrict__ beta, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r, x += C, z += C) {
    for (int64_t c = 0; c < C; ++c) {
      z[c] = static_cast<scalar_t>(act_forward<A>((static_cast<T>(x[c]) - mean[c]) * scale[c] + beta[c]));
    }
  }
}

// dy = act'(y) dz over one run of at most SUM_BLOCK elements, written to dy (rounded to the storage type);
// adds sum dy and sum dy (x - mean) to *s1 and *s2 (of dy before rounding). Three simple loops: with the
// rounding store inside the double reduction, GCC left the bfloat16 loop scalar (6x slower).
template <Act A, typename scalar_t, typename T>
FK_CPU_CLONES void dy_run(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ x, scalar_t* __restrict__ dy,
                          T mean, T scale, T beta, double* s1, double* s2, int64_t n) {
  T g[SUM_BLOCK], d[SUM_BLOCK];
  for (int64_t i = 0; i < n; ++i) {
    d[i] = static_cast<T>(x[i]) - mean;
    g[i] = act_backward<A>(static_cast<T>(dz[i]), d[i] * scale + beta);
  }
  for (int64_t i = 0; i < n; ++i) dy[i] = static_cast<scalar_t>(g[i]);
  double a1 = 0.0, a2 = 0.0;
#pragma omp simd reduction(+ : a1, a2)
  for (int64_t i = 0; i < n; ++i) {
    a1 += static_cast<double>(g[i]);
    a2 += static_cast<double>(g[i]) * static_cast<double>(d[i]);
  }
  *s1 += a1;
  *s2 += a2;
}

// The same over consecutive channels-last rows, into s1[c] and s2[c].
template <Act A, typename scalar_t, typename T>
FK_CPU_CLONES void dy_rows(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ x, scalar_t* __restrict__ dy,
                           const T* __restrict__ mean, const T* __restrict__ scale, const T* __restrict__ beta,
                           double* __restrict__ s1, double* __restrict__ s2, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r, dz += C, x += C, dy += C) {
    for (int64_t c = 0; c < C; ++c) {
      const T d = static_cast<T>(x[c]) - mean[c];
      const T g = act_backward<A>(static_cast<T>(dz[c]), d * scale[c] + beta[c]);
      dy[c] = static_cast<scalar_t>(g);
      s1[c] += static_cast<double>(g);
      s2[c] += static_cast<double>(g) * static_cast<double>(d);
    }
  }
}

// dx = scale dy + k (x - mean) + q, per channel k and q (see the top of the file), in place of dy.
template <typename scalar_t, typename T>
FK_CPU_CLONES void dx_run(const scalar_t* __restrict__ x, scalar_t* __restrict__ dy_dx, T mean, T scale, T k, T q,
                          int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dy_dx[i] = static_cast<scalar_t>(scale * static_cast<T>(dy_dx[i]) + k * (static_cast<T>(x[i]) - mean) + q);
  }
}

template <typename scalar_t, typename T>
FK_CPU_CLONES void dx_rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ dy_dx, const T* __restrict__ mean,
                           const T* __restrict__ scale, const T* __restrict__ k, const T* __restrict__ q, int64_t rows,
                           int64_t C) {
  for (int64_t r = 0; r < rows; ++r, x += C, dy_dx += C) {
    for (int64_t c = 0; c < C; ++c) {
      dy_dx[c] = static_cast<scalar_t>(scale[c] * static_cast<T>(dy_dx[c]) + k[c] * (static_cast<T>(x[c]) - mean[c]) +
                                       q[c]);
    }
  }
}

// ---- drivers ----

// How a problem is cut for the per-channel sums: channels-last into pieces of `rows` rows of the N*HW,
// NCHW each plane into `splits` parts. Fixed by the shape alone.
struct Pieces {
  int64_t count = 0, rows = 0, splits = 0;
};

Pieces pieces_of(const TailShape& s) {
  Pieces p;
  if (s.channels_last) {
    p.rows = std::max<int64_t>(SUM_ROWS, cpu::GRAIN / std::max<int64_t>(1, s.C));
    p.count = cpu::ceil_div(s.N * s.HW, p.rows);
  } else {
    p.splits = std::max<int64_t>(1, s.HW / cpu::GRAIN);
    p.count = s.N * s.C * p.splits;
  }
  return p;
}

// Runs the per-channel two-sum reduction over the pieces and adds each channel's pieces in a fixed order.
// Channels-last: rows_block(first_row, rows, s1, s2) adds to C sums each; NCHW: run_block(plane, lo, len,
// s1, s2) to one each. Returns the sums, 2 x C.
template <typename RowsBlock, typename RunBlock>
std::vector<double> channel_sums(const TailShape& s, const RowsBlock& rows_block, const RunBlock& run_block) {
  const Pieces pc = pieces_of(s);
  const int64_t C = s.C;
  std::vector<double> partial(pc.count * 2 * (s.channels_last ? C : 1), 0.0);
  if (s.channels_last) {
    const int64_t total_rows = s.N * s.HW;
    at::parallel_for(0, pc.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t piece = begin; piece < end; ++piece) {
        double* s1 = partial.data() + piece * 2 * C;
        const int64_t stop = std::min(total_rows, (piece + 1) * pc.rows);
        for (int64_t r = piece * pc.rows; r < stop; r += SUM_ROWS) {
          rows_block(r, std::min(SUM_ROWS, stop - r), s1, s1 + C);
        }
      }
    });
  } else {
    const int64_t chunk = cpu::ceil_div(s.HW, pc.splits);
    at::parallel_for(0, pc.count, std::max<int64_t>(1, cpu::GRAIN / std::max<int64_t>(1, chunk)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t item = begin; item < end; ++item) {
                         const int64_t plane = item / pc.splits, part = item % pc.splits;
                         const int64_t hi = std::min(s.HW, (part + 1) * chunk);
                         for (int64_t lo = part * chunk; lo < hi; lo += SUM_BLOCK) {
                           run_block(plane, lo, std::min(SUM_BLOCK, hi - lo), &partial[item * 2],
                                     &partial[item * 2 + 1]);
                         }
                       }
                     });
  }
  std::vector<double> sums(2 * C, 0.0);
  if (s.channels_last) {
    for (int64_t piece = 0; piece < pc.count; ++piece) {
      for (int64_t i = 0; i < 2 * C; ++i) sums[i] += partial[piece * 2 * C + i];
    }
  } else {
    for (int64_t n = 0; n < s.N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t part = 0; part < pc.splits; ++part) {
          const int64_t item = (n * C + c) * pc.splits + part;
          sums[c] += partial[item * 2];
          sums[C + c] += partial[item * 2 + 1];
        }
      }
    }
  }
  return sums;
}

// Calls body(plane or first row, stop, channel params...) over the elementwise passes: NCHW planes cut into
// flat ranges, channels-last rows, both with the input streams prefetched.
template <typename scalar_t, typename PlaneRun, typename RowsRun, typename... Stream>
void elementwise(const TailShape& s, const PlaneRun& plane_run, const RowsRun& rows_run, const Stream*... streams) {
  if (!s.channels_last) {
    at::parallel_for(0, s.N * s.C * s.HW, cpu::GRAIN, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end;) {
        const int64_t plane = i / s.HW;
        const int64_t stop = std::min(end, (plane + 1) * s.HW);
        cpu::prefetched_blocks(i, stop, [&](int64_t lo, int64_t hi) { plane_run(plane % s.C, lo, hi - lo); },
                               streams...);
        i = stop;
      }
    });
  } else {
    at::parallel_for(0, s.N * s.HW, std::max<int64_t>(1, cpu::GRAIN / s.C), [&](int64_t begin, int64_t end) {
      cpu::prefetched_rows(begin, end, s.C, [&](int64_t lo, int64_t hi) { rows_run(lo * s.C, hi - lo); },
                           streams...);
    });
  }
}

TailShape check_batch_norm_act(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor* grad = nullptr) {
  TailShape s = check_tail(op, x, std::nullopt, x, grad);  // shape, dtype, layout (x is its own identity)
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(s.N * s.HW > 1, op, ": training needs more than one value per channel, got x of shape ", x.sizes());
  for (const auto* t : {&weight, &bias}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->numel() == s.C && at::isFloatingType((*t)->scalar_type()), op,
                  ": weight and bias must be floating point with one value per channel (", s.C, "), got ",
                  (*t)->sizes());
    }
  }
  return s;
}

// Per-channel vectors of the math type: gamma (1 without weight) and beta (0 without bias).
at::Tensor channel_vector(const std::optional<at::Tensor>& t, int64_t C, at::ScalarType dtype, double fill) {
  if (t.has_value()) return t->reshape({C}).to(dtype).contiguous();
  return at::full({C}, fill, at::TensorOptions().dtype(dtype));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward_cpu(const at::Tensor& x,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          const std::optional<at::Tensor>& bias,
                                                                          double eps, int64_t act) {
  const TailShape s = check_batch_norm_act("batch_norm_act_forward_cpu", x, weight, bias);
  const at::ScalarType mt = math_dtype(x.scalar_type());
  at::Tensor z = at::empty_like(x);
  at::Tensor mean = at::empty({s.C}, x.options().dtype(mt));
  at::Tensor var = at::empty({s.C}, x.options().dtype(mt));
  const at::Tensor gamma = channel_vector(weight, s.C, mt, 1.0), beta = channel_vector(bias, s.C, mt, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_forward_cpu", [&] {
    using T = typename MathType<scalar_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // The shift: each channel's value at the first position.
    std::vector<T> shift(s.C);
    for (int64_t c = 0; c < s.C; ++c) shift[c] = static_cast<T>(xp[s.channels_last ? c : c * s.HW]);
    const std::vector<double> sums = channel_sums(
        s,
        [&](int64_t r, int64_t rows, double* s1, double* s2) {
          cpu::prefetch_ahead(rows * s.C, xp + r * s.C);
          stats_rows(xp + r * s.C, shift.data(), s1, s2, rows, s.C);
        },
        [&](int64_t plane, int64_t lo, int64_t len, double* s1, double* s2) {
          cpu::prefetch_ahead(len, xp + plane * s.HW + lo);
          stats_run(xp + plane * s.HW + lo, shift[plane % s.C], s1, s2, len);
        });
    const double M = static_cast<double>(s.N * s.HW);
    T* mp = mean.mutable_data_ptr<T>();
    T* vp = var.mutable_data_ptr<T>();
    std::vector<T> scale(s.C);
    const T* gp = gamma.const_data_ptr<T>();
    const T* bp = beta.const_data_ptr<T>();
    for (int64_t c = 0; c < s.C; ++c) {
      const double m1 = sums[c] / M;
      double v = sums[s.C + c] / M - m1 * m1;
      if (v < 0.0) v = 0.0;  // rounding; a NaN (a non-finite input) stays NaN, as in PyTorch
      mp[c] = static_cast<T>(static_cast<double>(shift[c]) + m1);
      vp[c] = static_cast<T>(v);
      scale[c] = static_cast<T>(static_cast<double>(gp[c]) / std::sqrt(v + eps));
    }
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    dispatch_act(act, [&](auto a) {
      constexpr Act A = decltype(a)::value;
      elementwise<scalar_t>(
          s,
          [&](int64_t c, int64_t o, int64_t n) {
            forward_run<A>(xp + o, zp + o, mp[c], scale[c], bp[c], n);
          },
          [&](int64_t o, int64_t rows) { forward_rows<A>(xp + o, zp + o, mp, scale.data(), bp, rows, s.C); }, xp);
    });
  });
  return {z, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, double eps, int64_t act) {
  const TailShape s = check_batch_norm_act("batch_norm_act_backward_cpu", x, weight, bias, &grad);
  const at::ScalarType mt = math_dtype(x.scalar_type());
  TORCH_CHECK(mean.numel() == s.C && var.numel() == s.C, "batch_norm_act_backward_cpu: mean and var must have one "
              "value per channel (", s.C, ")");
  const at::Tensor m = mean.reshape({s.C}).to(mt).contiguous(), v = var.reshape({s.C}).to(mt).contiguous();
  const at::Tensor gamma = channel_vector(weight, s.C, mt, 1.0), beta = channel_vector(bias, s.C, mt, 0.0);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dgamma = at::empty({s.C}, x.options().dtype(mt)), dbeta = at::empty({s.C}, x.options().dtype(mt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_backward_cpu", [&] {
    using T = typename MathType<scalar_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dzp = grad.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const T* mp = m.const_data_ptr<T>();
    const T* gp = gamma.const_data_ptr<T>();
    const T* bp = beta.const_data_ptr<T>();
    std::vector<T> scale(s.C), k(s.C), q(s.C);
    std::vector<double> invstd(s.C);
    for (int64_t c = 0; c < s.C; ++c) {
      invstd[c] = 1.0 / std::sqrt(static_cast<double>(v.const_data_ptr<T>()[c]) + eps);
      scale[c] = static_cast<T>(static_cast<double>(gp[c]) * invstd[c]);
    }
    dispatch_act(act, [&](auto a) {
      constexpr Act A = decltype(a)::value;
      const std::vector<double> sums = channel_sums(
          s,
          [&](int64_t r, int64_t rows, double* s1, double* s2) {
            const int64_t o = r * s.C;
            cpu::prefetch_ahead(rows * s.C, dzp + o, xp + o);
            dy_rows<A>(dzp + o, xp + o, dxp + o, mp, scale.data(), bp, s1, s2, rows, s.C);
          },
          [&](int64_t plane, int64_t lo, int64_t len, double* s1, double* s2) {
            const int64_t o = plane * s.HW + lo, c = plane % s.C;
            cpu::prefetch_ahead(len, dzp + o, xp + o);
            dy_run<A>(dzp + o, xp + o, dxp + o, mp[c], scale[c], bp[c], s1, s2, len);
          });
      const double M = static_cast<double>(s.N * s.HW);
      T* dgp = dgamma.mutable_data_ptr<T>();
      T* dbp = dbeta.mutable_data_ptr<T>();
      for (int64_t c = 0; c < s.C; ++c) {
        const double sc = static_cast<double>(gp[c]) * invstd[c];
        k[c] = static_cast<T>(-sc * invstd[c] * invstd[c] * sums[s.C + c] / M);
        q[c] = static_cast<T>(-sc * sums[c] / M);
        dgp[c] = static_cast<T>(sums[s.C + c] * invstd[c]);
        dbp[c] = static_cast<T>(sums[c]);
      }
      elementwise<scalar_t>(
          s, [&](int64_t c, int64_t o, int64_t n) { dx_run(xp + o, dxp + o, mp[c], scale[c], k[c], q[c], n); },
          [&](int64_t o, int64_t rows) { dx_rows(xp + o, dxp + o, mp, scale.data(), k.data(), q.data(), rows, s.C); },
          xp, static_cast<const scalar_t*>(dxp));
    });
  });
  return {dx, dgamma, dbeta};
}

}  // namespace fer_kernels
