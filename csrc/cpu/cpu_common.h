// Helpers for the CPU twin: runtime dispatch to the widest vector unit, and work partitioning that does
// not depend on the thread count (so reductions give the same bits with 1 or 64 threads).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

// The inner loops are plain scalar code over the shared math headers, with __restrict__ pointers so the
// compiler vectorises them without overlap checks (with seven pointers it otherwise gives up: the
// channels-last backward ran 5x slower). Compiling each loop for AVX-512, AVX2+FMA and baseline x86-64
// and letting the loader pick one (GCC function multi-versioning) gives vector code without tying the
// binary to one CPU. Elsewhere the compiler's default target is used.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FK_CPU_CLONES
#endif

namespace fer_kernels {
namespace cpu {

// Elements per task: large enough to amortise a task (a few microseconds of work), small enough to
// balance 2-64 threads on the activation sizes of a ResNet.
constexpr int64_t GRAIN = 1 << 15;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cpu
}  // namespace fer_kernels
