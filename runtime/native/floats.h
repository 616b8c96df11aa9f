// Float32 products over weights read where they lie: the engine's weights.bin as ONNX Runtime maps it,
// the same pages the prefill graph's kernels read (no copy, so float32 engines keep one copy of their
// weights). Used by f32.cc (MatMulF32, LinearF32) and moe.cc (MoEF32) in float32 decode graphs, where a
// step reads every weight once: they are written to stream, not to reuse.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace floats {

// No software prefetches: the hardware's follow these sequential streams. Non-temporal prefetches, which
// pay in panels.h's int4/int8 kernels, cost float32 streams 10-20% here (rows 4 at a time, 2 threads, 20
// matrices 2816 x 2048 on 4 KB pages: 21-30 against 25-37 GB/s; columns: 25-28 against 28-30).

// Weight rows read together: eight streams read faster than four (2 threads, 4 KB pages: rows of 2816 x
// 2048, 29-30 against 27-28 GB/s, a plain read 28-29; columns of 2048 x 10944, 31-39 against 30-34).
constexpr int64_t kStreams = 8;

// The kStreams rows of `w` (each `width` floats) read together from row `first`, the last of `count` repeated.
inline void Streams(const float* w, int64_t width, int64_t first, int64_t count, const float* r[kStreams]) {
  for (int64_t i = 0; i < kStreams; ++i) r[i] = w + (first + std::min(i, count - 1)) * width;
}

// Row form, w [N, K] (y = x wᵀ): y[m * ldy + n] = sum_k w[n * K + k] * x[m * ldx + k] for the rows n in
// [n0, n1) and m < M. kStreams weight rows at a time (the last group repeats its last row, stored once),
// each group held while every m is computed (from the second m on, they come from the caches).
inline void Rows(const float* w, int64_t K, int64_t n0, int64_t n1, const float* x, int64_t ldx, int64_t M, float* y,
                 int64_t ldy) {
  const int64_t full = K & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - full)) - 1);
  for (int64_t n = n0; n < n1; n += kStreams) {
    const int64_t count = std::min(kStreams, n1 - n);
    const float* r[kStreams];
    Streams(w, K, n, count, r);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * ldx;
      __m512 s[kStreams];
      for (int64_t i = 0; i < kStreams; ++i) s[i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < full; k += 16) {
        const __m512 v = _mm512_loadu_ps(xm + k);
        for (int64_t i = 0; i < kStreams; ++i) s[i] = _mm512_fmadd_ps(_mm512_loadu_ps(r[i] + k), v, s[i]);
      }
      if (tail) {
        const __m512 v = _mm512_maskz_loadu_ps(tail, xm + full);
        for (int64_t i = 0; i < kStreams; ++i) s[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, r[i] + full), v, s[i]);
      }
      for (int64_t i = 0; i < count; ++i) y[m * ldy + n + i] = _mm512_reduce_add_ps(s[i]);
    }
  }
}

// Column form, w [K, N] (y = x w), over the weight rows k in [k0, k1): part[m * N + n] = sum_k x[m * K + k]
// * w[k * N + n] for m < M, written (not added). kStreams weight rows at a time (the last group repeats its
// last row with a zero factor), swept along N, so the part reads its rows front to back; each vector of
// weights is used for every m while held in a register, into two sums (shorter dependent chains).
inline void Columns(const float* w, int64_t K, int64_t N, int64_t k0, int64_t k1, const float* x, int64_t M,
                    float* part) {
  const int64_t full = N & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (N - full)) - 1);
  for (int64_t k = k0; k < k1; k += kStreams) {
    const int64_t count = std::min(kStreams, k1 - k);
    const float* r[kStreams];
    Streams(w, N, k, count, r);
    const bool first = k == k0;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      __m512 f[kStreams];
      for (int64_t i = 0; i < kStreams; ++i) f[i] = _mm512_set1_ps(i < count ? xm[k + i] : 0.0f);
      float* out = part + m * N;
      for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 keep = n < full ? static_cast<__mmask16>(0xFFFF) : tail;
        __m512 a = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(keep, out + n), b = _mm512_setzero_ps();
        for (int64_t i = 0; i < kStreams; i += 2) {
          a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(keep, r[i] + n), f[i], a);
          b = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(keep, r[i + 1] + n), f[i + 1], b);
        }
        _mm512_mask_storeu_ps(out + n, keep, _mm512_add_ps(a, b));
      }
    }
  }
}

}  // namespace floats
