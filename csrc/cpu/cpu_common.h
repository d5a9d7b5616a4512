// Helpers for the CPU twin: runtime dispatch to the widest vector unit, and work partitioning that does
// not depend on the thread count (so reductions give the same bits with 1 or 64 threads).
#pragma once

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

// Software prefetch for the streaming loops. On some of the 2-core virtual machines these kernels were
// measured on, the hardware prefetcher did not keep a streaming loop fed from DRAM: Mish forward over
// 6.4 M bfloat16 values took 4.9 ms when its input came from memory and 1.9 ms when it was in cache; asking
// for each input line PREFETCH_AHEAD bytes early made it 1.75 ms in both cases (1-8 KB ahead did as well).
// Outputs are not prefetched: that measured no gain. Prefetching past the end of a buffer is harmless.
constexpr int64_t PREFETCH_AHEAD = 4096;  // bytes
constexpr int64_t CACHE_LINE = 64;
// Elements per block of a prefetched loop: a few lines of each stream, so that a block's requests are
// spread through the loop rather than issued in one burst.
constexpr int64_t PREFETCH_BLOCK = 256;

// Requests the cache lines of [p, p + n) PREFETCH_AHEAD bytes further on, for each stream p.
template <typename... Stream>
inline void prefetch_ahead(int64_t n, const Stream*... streams) {
  auto one = [n](const auto* p) {
    const char* line = reinterpret_cast<const char*>(p) + PREFETCH_AHEAD;
    const int64_t bytes = n * static_cast<int64_t>(sizeof(*p));
    for (int64_t b = 0; b < bytes; b += CACHE_LINE) __builtin_prefetch(line + b, 0, 3);
  };
  (one(streams), ...);
}

// body(lo, hi) over the rows [begin, end) of `row` elements each, a block of about PREFETCH_BLOCK elements
// at a time; before each block, the lines of every stream (an array laid out row after row like the loop)
// are requested PREFETCH_AHEAD bytes ahead.
template <typename Body, typename... Stream>
inline void prefetched_rows(int64_t begin, int64_t end, int64_t row, const Body& body, const Stream*... streams) {
  const int64_t step = std::max<int64_t>(1, PREFETCH_BLOCK / row);
  for (int64_t lo = begin; lo < end; lo += step) {
    const int64_t hi = std::min(end, lo + step);
    prefetch_ahead((hi - lo) * row, (streams + lo * row)...);
    body(lo, hi);
  }
}

// prefetched_rows over single elements.
template <typename Body, typename... Stream>
inline void prefetched_blocks(int64_t begin, int64_t end, const Body& body, const Stream*... streams) {
  prefetched_rows(begin, end, 1, body, streams...);
}

}  // namespace cpu
}  // namespace fer_kernels
