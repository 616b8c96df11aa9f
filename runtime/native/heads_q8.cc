// Per-head int8 matmul for MLA's absorbed W_UK / W_UV: ONNX Runtime custom op HeadsMatMulQ8, domain
// ai.dscompile. runtime/native/__init__.py builds this file into the library that engines exported
// with --native-kernels register; lowering/quantize.py writes the nodes.
//
//   x [B, H, S, K] float32, w [H, N, K] int8, s [H, N, K/32] float32 (one scale per 32 values along K)
//   -> y [B, H, S, N] float32, y[b,h,s,n] = sum_k x[b,h,s,k] * w[h,n,k] * s[h,n,k/32]
//
// One token (decode): each row's int8 blocks are widened to float32 and multiplied against x as they
// are read. Several tokens: 16 rows at a time are dequantized into a float panel, then every token's
// 16 outputs accumulate as one vector (Tokens). Activations stay float32 (nothing is rounded but the weights). Tasks of kRows output rows
// of one head run on ONNX Runtime's intra-op thread pool (KernelContext::ParallelFor).
#include "native.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kRows = 64;     // output rows per task
constexpr int64_t kMaxK = 4096;   // the dequantized row buffer

struct Job {
  const float* x;
  const int8_t* w;
  const float* s;
  float* y;
  int64_t B, H, S, K, N;
};

// 32 int8 values widened to float32, times x, as two 16-lane products summed.
inline __m512 Block(const int8_t* w, const float* x) {
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))));
  return _mm512_fmadd_ps(_mm512_loadu_ps(x + 16), hi, _mm512_mul_ps(_mm512_loadu_ps(x), lo));
}

// One int8 row (`blocks` blocks of 32, scales s) dotted with x, widened as it is read.
inline float RowDot(const int8_t* w, const float* s, const float* x, int64_t blocks) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) acc = _mm512_fmadd_ps(_mm512_set1_ps(s[b]), Block(w + 32 * b, x + 32 * b), acc);
  return _mm512_reduce_add_ps(acc);
}

// One token: rows [first, last) of head h, each dotted with x as its int8 blocks are widened.
void OneToken(const Job& j, int64_t h, int64_t first, int64_t last) {
  const int64_t blocks = j.K / 32;
  for (int64_t n = first; n < last; ++n)
    j.y[h * j.N + n] = RowDot(j.w + (h * j.N + n) * j.K, j.s + (h * j.N + n) * blocks, j.x + h * j.K, blocks);
}

// Several tokens: 16 rows at a time dequantized into a [K][16] buffer (transposed), then each group of
// up to 4 tokens accumulates its 16 outputs as one vector per token: one broadcast and one FMA per
// token and k, no horizontal sums. Rows past the last multiple of 16 go one by one.
void Tokens(const Job& j, int64_t h, int64_t first, int64_t last) {
  const int64_t blocks = j.K / 32, tokens = j.B * j.S;
  alignas(64) static thread_local float panel[kMaxK * 16];
  auto out = [&](int64_t t, int64_t n) -> float& {
    return j.y[(((t / j.S) * j.H + h) * j.S + t % j.S) * j.N + n];
  };
  auto xrow = [&](int64_t t) { return j.x + (((t / j.S) * j.H + h) * j.S + t % j.S) * j.K; };
  int64_t n = first;
  for (; n + 16 <= last; n += 16) {
    for (int r = 0; r < 16; ++r) {
      const int8_t* w = j.w + (h * j.N + n + r) * j.K;
      const float* s = j.s + (h * j.N + n + r) * blocks;
      for (int64_t k = 0; k < j.K; ++k) panel[k * 16 + r] = s[k / 32] * static_cast<float>(w[k]);
    }
    for (int64_t t = 0; t < tokens; t += 4) {
      const int64_t m = std::min<int64_t>(4, tokens - t);
      const float* x[4];
      for (int64_t i = 0; i < 4; ++i) x[i] = xrow(t + std::min(i, m - 1));
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      for (int64_t k = 0; k < j.K; ++k) {
        const __m512 w = _mm512_load_ps(panel + k * 16);
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(x[0][k]), w, a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(x[1][k]), w, a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(x[2][k]), w, a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(x[3][k]), w, a3);
      }
      alignas(64) float acc[4][16];
      _mm512_store_ps(acc[0], a0);
      _mm512_store_ps(acc[1], a1);
      _mm512_store_ps(acc[2], a2);
      _mm512_store_ps(acc[3], a3);
      for (int64_t i = 0; i < m; ++i)
        for (int r = 0; r < 16; ++r) out(t + i, n + r) = acc[i][r];
    }
  }
  for (; n < last; ++n)
    for (int64_t t = 0; t < tokens; ++t)
      out(t, n) = RowDot(j.w + (h * j.N + n) * j.K, j.s + (h * j.N + n) * blocks, xrow(t), blocks);
}

void Task(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t tasks_per_head = (j.N + kRows - 1) / kRows;
  const int64_t h = static_cast<int64_t>(index) / tasks_per_head;
  const int64_t first = (static_cast<int64_t>(index) % tasks_per_head) * kRows;
  const int64_t last = std::min(first + kRows, j.N);
  if (j.B * j.S == 1) {
    OneToken(j, h, first, last);
  } else {
    Tokens(j, h, first, last);
  }
}

void HeadsMatMul(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<int8_t>& w,
                 const Ort::Custom::Tensor<float>& s, Ort::Custom::Tensor<float>& y) {
  const auto xs = x.Shape();
  const auto ws = w.Shape();
  if (xs.size() != 4 || ws.size() != 3 || ws[0] != xs[1] || ws[2] != xs[3] || xs[3] % 32 != 0 || xs[3] > kMaxK ||
      s.NumberOfElement() != ws[0] * ws[1] * (ws[2] / 32)) {
    ORT_CXX_API_THROW("HeadsMatMulQ8: expected x [B, H, S, K], w [H, N, K], s [H, N, K/32] with K a multiple of 32 "
                      "up to 4096", ORT_INVALID_ARGUMENT);
  }
  Job job{x.Data(), w.Data(), s.Data(), nullptr, xs[0], xs[1], xs[2], xs[3], ws[1]};
  job.y = y.Allocate({job.B, job.H, job.S, job.N});
  if (job.B * job.S == 0 || job.N == 0) return;
  Ort::KernelContext(context).ParallelFor(Task, static_cast<size_t>(job.H * ((job.N + kRows - 1) / kRows)), 0, &job);
}

}  // namespace

Ort::Custom::OrtLiteCustomOp* NewHeadsMatMulQ8() {
  return Ort::Custom::CreateLiteCustomOp("HeadsMatMulQ8", "CPUExecutionProvider", HeadsMatMul);
}
