// Scalar math shared by the C++ CPU twin and the CUDA kernels.
//
// Everything here is a header-only, branch-light function of plain floats so that the same source is
// inlined into vectorised CPU loops (GCC/Clang auto-vectorise it) and into CUDA threads. The CPU tests
// therefore exercise the formulas the GPU runs; the roundings can differ by an ulp, since each compiler
// decides where a multiply and an add fuse (nvcc fuses by default), which the tests' tolerances allow.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define FK_HOST_DEVICE __host__ __device__
#define FK_INLINE __forceinline__
#else
#define FK_HOST_DEVICE
#define FK_INLINE inline __attribute__((always_inline))
#endif

namespace fer_kernels {

FK_HOST_DEVICE FK_INLINE float bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

FK_HOST_DEVICE FK_INLINE int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
#endif
}


// exp(x) for float, written without a libm call so that CPU loops vectorise and the GPU runs the same
// arithmetic. Range reduction x = k ln2 + r with |r| <= ln2/2 (ln2 split in two so k*LN2_HI is exact),
// then e^r = 1 + r + r^2 q(r) with q of degree 4, fitted here for minimal relative error (max 3.1e-9,
// well under float's 6e-8 epsilon). Below -87.3 the result would be subnormal and is flushed to 0; above
// 88.7 it overflows to inf; NaN stays NaN. Rounding to the nearest k uses the 1.5 * 2^23 trick: adding it
// leaves k in the low mantissa bits, read back by reinterpretation, so there is no float->int conversion
// (undefined for NaN) and the loop vectorises without a rounding instruction.
// fk_exp_no_overflow is the same for x <= 88: callers that bound x themselves (Mish) skip the two comparisons
// and selects that the overflow costs, a tenth of their vector loops' work.
constexpr float FK_EXP_LO = -87.3f, FK_EXP_HI = 88.0f;

FK_HOST_DEVICE FK_INLINE float fk_exp_no_overflow(float x) {
  constexpr float LOG2E = 1.44269504088896341f;
  constexpr float LN2_HI = 0.693145751953125f;
  constexpr float LN2_LO = 1.42860682030941723e-6f;
  constexpr float C2 = 0.4999999403953552f, C3 = 0.1666652113199234f, C4 = 0.04166838899254799f,
                  C5 = 0.008368710055947304f, C6 = 0.001381461275741458f;
  constexpr float LO = FK_EXP_LO;
  // Clamp with a comparison (not fmaxf) so a NaN input is kept and propagates through r.
  float xc = x < LO ? LO : x;
  constexpr float ROUND = 12582912.0f;  // 1.5 * 2^23
  float t = xc * LOG2E + ROUND;
  float k = t - ROUND;
  float r = xc - k * LN2_HI;
  r = r - k * LN2_LO;
  float q = C6;
  q = q * r + C5;
  q = q * r + C4;
  q = q * r + C3;
  q = q * r + C2;
  float p = 1.0f + r + (r * r) * q;
  int32_t ki = float_to_bits(t) - float_to_bits(ROUND);
  float scale = bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(ki + 127) << 23));
  float e = p * scale;
  return x < LO ? 0.0f : e;
}

FK_HOST_DEVICE FK_INLINE float fk_exp(float x) {
  float e = fk_exp_no_overflow(x > FK_EXP_HI ? FK_EXP_HI : x);  // a comparison again, so NaN stays NaN
  return x > 88.72283935546875f ? std::numeric_limits<float>::infinity() : e;
}

FK_HOST_DEVICE FK_INLINE double fk_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return __builtin_exp(x);
#endif
}

FK_HOST_DEVICE FK_INLINE double fk_exp_no_overflow(double x) { return fk_exp(x); }

FK_HOST_DEVICE FK_INLINE float fk_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return __builtin_sqrtf(x);  // vectorises: setup.py compiles with -fno-math-errno
#endif
}

FK_HOST_DEVICE FK_INLINE double fk_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return __builtin_sqrt(x);
#endif
}

// Storage types are converted to the math type at load and back at store; float16/bfloat16 compute in
// float, float64 in double (float64 exists for gradcheck and for callers that want exact references).
template <typename scalar_t> struct MathType { using type = float; };
template <> struct MathType<double> { using type = double; };

}  // namespace fer_kernels
