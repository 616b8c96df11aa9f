// int4 linear layer with VNNI dot products: ONNX Runtime custom op MatMulQ4, domain ai.dscompile.
// lowering/quantize.py writes the nodes (and the weights' layout) for engines exported with
// --weights int4 --native-kernels.
//
//   x [..., K] float32, w uint8 [N16, K/32, 256], s float16 [N16, K/32, 16], attributes K, N
//   -> y [..., N] float32, y[m, n] = sum_k x[m, k] * (q[n, k] * s[n, k/32]),  q in [-8, 7]
//
// Weights come in panels of 16 output rows (N16 = ceil(N/16); rows past N are zero). A panel's block of
// 32 values along K is 256 bytes: 8 vectors V_j (j = 0..7) of 16 rows x 4 values (q + 8, unsigned),
// V_j for values 4j..4j+3 of the block, byte 4r+e = row r, value e; byte i of chunk c (c = 0..3, 64 bytes)
// holds V_c's byte i in its low nibble and V_{c+4}'s in its high nibble. One scale per row and block,
// float16 (4.5 bits per weight in all, as llama.cpp's q4_0).
//
// Activations are quantized to int8 per block of 32 values (scale = max |x| / 127, rounded to nearest
// even), as MatMulNBits does at accuracy_level 4. Each lane of a 16-lane vector is one output row, so a
// block is 8 VPDPBUSD (unsigned weights x signed activations, 4 products per lane each) into int32
// lanes, started at -8 * sum(x_q) (the weights' offset of 8), then one conversion and one FMA with the
// rows' scales times the activations' scale: no horizontal sums, and the instruction count per weight
// byte is low enough that one thread streams weights at about the machine's read bandwidth. Tasks of
// kPanels panels (one token) or of one panel and every token run on ONNX Runtime's intra-op thread pool.
#include "native.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kPanels = 4;  // panels per task with one token

struct Job {
  const uint8_t* w;
  const uint16_t* s;
  float* y;
  int64_t M, K, N, panels;
  const int8_t* xq;    // [M, K] quantized activations
  const float* xs;     // [M, K/32] their scales
  const int32_t* off;  // [M, K/32] -8 * the sum of each block's quantized activations
};

// Token m's activations, quantized per block of 32.
void Quantize(const float* x, int64_t K, int8_t* q, float* scale, int32_t* off) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + 32 * b), hi = _mm512_loadu_ps(x + 32 * b + 16);
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float s = top / 127.0f, inv = top > 0.0f ? 127.0f / top : 0.0f;
    const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));  // nearest, ties to even
    const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b), _mm512_cvtsepi32_epi8(a));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16), _mm512_cvtsepi32_epi8(c));
    scale[b] = s;
    off[b] = -8 * _mm512_reduce_add_epi32(_mm512_add_epi32(a, c));
  }
}

void QuantizeTask(void* data, size_t m) {
  const auto& j = *static_cast<const std::pair<const float*, Job*>*>(data);
  const Job& job = *j.second;
  const int64_t blocks = job.K / 32;
  Quantize(j.first + m * job.K, job.K, const_cast<int8_t*>(job.xq) + m * job.K, const_cast<float*>(job.xs) + m * blocks,
           const_cast<int32_t*>(job.off) + m * blocks);
}

// One block of one token against the panel's unpacked block v[0..7]: acc += (dots - 8 sum) * s * xs.
inline __m512 Token(const __m512i v[8], const int8_t* xq, float xs, int32_t off, __m512 s, __m512 acc) {
  const int32_t* x4 = reinterpret_cast<const int32_t*>(xq);
  __m512i d = _mm512_set1_epi32(off);
  d = _mm512_dpbusd_epi32(d, v[0], _mm512_set1_epi32(x4[0]));
  d = _mm512_dpbusd_epi32(d, v[1], _mm512_set1_epi32(x4[1]));
  d = _mm512_dpbusd_epi32(d, v[2], _mm512_set1_epi32(x4[2]));
  d = _mm512_dpbusd_epi32(d, v[3], _mm512_set1_epi32(x4[3]));
  d = _mm512_dpbusd_epi32(d, v[4], _mm512_set1_epi32(x4[4]));
  d = _mm512_dpbusd_epi32(d, v[5], _mm512_set1_epi32(x4[5]));
  d = _mm512_dpbusd_epi32(d, v[6], _mm512_set1_epi32(x4[6]));
  d = _mm512_dpbusd_epi32(d, v[7], _mm512_set1_epi32(x4[7]));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, _mm512_set1_ps(xs)), acc);
}

// Panel p against tokens [m0, m0 + 4) (a group short of 4 repeats its last token, stored once).
void Panel(const Job& j, int64_t p, int64_t m0) {
  const int64_t blocks = j.K / 32, last = std::min<int64_t>(4, j.M - m0);
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* w = j.w + p * blocks * 256;
  const uint16_t* s = j.s + p * blocks * 16;
  int64_t m[4];
  for (int64_t i = 0; i < 4; ++i) m[i] = m0 + std::min(i, last - 1);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i v[8];
    for (int c = 0; c < 4; ++c) {
      const __m512i chunk = _mm512_loadu_si512(w + 256 * b + 64 * c);
      v[c] = _mm512_and_si512(chunk, low);
      v[c + 4] = _mm512_and_si512(_mm512_srli_epi16(chunk, 4), low);
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16 * b)));
    const int64_t at0 = m[0] * blocks + b, at1 = m[1] * blocks + b, at2 = m[2] * blocks + b, at3 = m[3] * blocks + b;
    a0 = Token(v, j.xq + m[0] * j.K + 32 * b, j.xs[at0], j.off[at0], scale, a0);
    if (last > 1) {
      a1 = Token(v, j.xq + m[1] * j.K + 32 * b, j.xs[at1], j.off[at1], scale, a1);
      a2 = Token(v, j.xq + m[2] * j.K + 32 * b, j.xs[at2], j.off[at2], scale, a2);
      a3 = Token(v, j.xq + m[3] * j.K + 32 * b, j.xs[at3], j.off[at3], scale, a3);
    }
  }
  const int64_t rows = std::min<int64_t>(16, j.N - 16 * p);
  const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
  const __m512 out[4] = {a0, a1, a2, a3};
  for (int64_t i = 0; i < last; ++i) _mm512_mask_storeu_ps(j.y + (m0 + i) * j.N + 16 * p, keep, out[i]);
}

void OneTokenTask(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t first = static_cast<int64_t>(index) * kPanels, end = std::min(first + kPanels, j.panels);
  for (int64_t p = first; p < end; ++p) Panel(j, p, 0);
}

void TokensTask(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  for (int64_t m0 = 0; m0 < j.M; m0 += 4) Panel(j, static_cast<int64_t>(index), m0);
}

struct MatMulQ4 {
  MatMulQ4(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    K_ = k.GetAttribute<int64_t>("K");
    N_ = k.GetAttribute<int64_t>("N");
  }

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<uint8_t>& w,
               const Ort::Custom::Tensor<Ort::Float16_t>& s, Ort::Custom::Tensor<float>& y) {
    const auto xs = x.Shape();
    const int64_t panels = (N_ + 15) / 16, blocks = K_ / 32;
    if (xs.empty() || xs.back() != K_ || K_ % 32 != 0 || w.NumberOfElement() != panels * blocks * 256 ||
        s.NumberOfElement() != panels * blocks * 16) {
      ORT_CXX_API_THROW("MatMulQ4: expected x [..., K], w [ceil(N/16), K/32, 256] and scales [ceil(N/16), K/32, 16] "
                        "with K a multiple of 32", ORT_INVALID_ARGUMENT);
    }
    std::vector<int64_t> out_shape(xs.begin(), xs.end());
    out_shape.back() = N_;
    float* out = y.Allocate(out_shape);
    const int64_t M = x.NumberOfElement() / K_;
    if (M == 0 || N_ == 0) return;
    std::vector<int8_t> q(M * K_);
    std::vector<float> scales(M * blocks);
    std::vector<int32_t> off(M * blocks);
    Job job{w.Data(), reinterpret_cast<const uint16_t*>(s.Data()), out, M, K_, N_, panels, q.data(), scales.data(), off.data()};
    Ort::KernelContext ctx(context);
    if (M == 1) {
      Quantize(x.Data(), K_, q.data(), scales.data(), off.data());
      ctx.ParallelFor(OneTokenTask, static_cast<size_t>((panels + kPanels - 1) / kPanels), 0, &job);
    } else {
      std::pair<const float*, Job*> quantize{x.Data(), &job};
      ctx.ParallelFor(QuantizeTask, static_cast<size_t>(M), 0, &quantize);
      ctx.ParallelFor(TokensTask, static_cast<size_t>(panels), 0, &job);
    }
  }

  int64_t K_, N_;
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* NewMatMulQ4() {
  return Ort::Custom::CreateLiteCustomOp<MatMulQ4>("MatMulQ4", "CPUExecutionProvider");
}
