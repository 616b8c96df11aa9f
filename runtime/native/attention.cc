// MLA's attention over the compressed cache: ONNX Runtime custom op LatentAttention, domain ai.dscompile,
// in the place of lowering/ops.py's latent_attention composite (lowering/fuse_attention.py writes it in
// the decode graphs of engines exported with --native-kernels).
//
//   q_latent [B, H, S, C], q_rope [B, H, S, R], kv_latent [B, T, C], k_rope [B, T, R], mask [B or 1, H or 1,
//   S, T], all float32; attribute scale
//   -> y [B, H, S, C] = softmax((q_latent . kv_latent^T + q_rope . k_rope^T) * scale + mask) . kv_latent
//
// Every head attends to the one cached key and value (MQA), so a task takes kRows query rows (heads x new
// tokens) of a batch row, transposed so that each vector lane is one row, against a chunk of the cached
// tokens: the scores of 8 tokens at a time are 8 accumulators of broadcast key values times the rows'
// query values (no horizontal sums), the softmax runs a row per lane, and the values are 16 columns at a
// time with the rows' sums in registers; each cached token is read once for the scores and again, from
// cache, for the values. Each chunk keeps its rows' maximum, sum of exponentials and weighted sum of
// values; the chunks are then merged as in flash-decoding, each rescaled by exp(its maximum - the row's).
// The FMAs are those of the MatMuls it replaces (on this 2-core EPYC attention at long contexts is
// compute-bound); what goes is the packing of the cache for each MatMul, and the fourteen other
// nodes a layer. benchmarks/native_attention.py: 4 layers of 16 heads, C 512, R 64, one token, 2
// threads: 0.16 against 0.20-0.27 ms at 129 cached tokens, 0.8-1.1 against 1.5-1.8 at 1025, 3.8-4.1 against
// 7.9-9.5 at 4097.
#include "native.h"
#include "panels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kRows = 16;      // query rows per task
constexpr int64_t kTokens = 64;    // cached tokens per chunk, at least
constexpr int64_t kMaxTasks = 32;  // chunks are made longer where rows x chunks would pass this

struct Job {
  const float *q, *qr, *kv, *kr, *mask;
  int64_t B, H, S, C, R, T;
  int64_t mask_b, mask_h;      // the mask's strides along B and H (0: broadcast)
  int64_t rows, blocks;        // H * S rows per batch row; ceil(rows / kRows)
  int64_t chunks, chunk;       // chunks of `chunk` tokens
  float scale;
  float* qt;     // [B, blocks, C + R, kRows]: each block's query rows transposed (a row per lane), 0 past the last
  float* part;   // [B, rows, chunks, C]: each chunk's weighted sum of values
  float* stats;  // [B, rows, chunks, 2]: each chunk's maximum and sum of exponentials
  float* y;
};

// The lanes of a vector of the last `left` values (all 16 where as many are left).
inline __mmask16 Tail(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// exp(x) of 16 lanes: 2^(x log2 e) as 2^n (scalef) times a degree-6 polynomial of 2^f, |f| <= 1/2 (relative error
// below 3e-7); x below -87 (the mask's padding) gives about 1e-38 or less, which adds nothing beside the row's
// largest term, 1.
inline __m512 Exp(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Block `index` (batch row b, row block) of the queries transposed: qt[k][i] = row r0 + i's value k (latent, then
// rope), 0 for rows past the last.
void Transpose(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t b = static_cast<int64_t>(index) / j.blocks, r0 = (static_cast<int64_t>(index) % j.blocks) * kRows;
  const int64_t count = std::min(kRows, j.rows - r0), width = j.C + j.R;
  float* qt = j.qt + static_cast<int64_t>(index) * width * kRows;
  std::fill(qt, qt + width * kRows, 0.0f);
  for (int64_t i = 0; i < count; ++i) {
    const float* q = j.q + (b * j.rows + r0 + i) * j.C;
    const float* qr = j.qr + (b * j.rows + r0 + i) * j.R;
    for (int64_t k = 0; k < j.C; ++k) qt[k * kRows + i] = q[k];
    for (int64_t k = 0; k < j.R; ++k) qt[(j.C + k) * kRows + i] = qr[k];
  }
}

// The scores of tokens t .. t+Tokens-1 (key rows k[i] at k + i*n, n values each) against a block's transposed
// queries qt [n][16]: out[i] = the 16 rows' dot products with token i, in Tokens independent accumulators.
template <int Tokens>
inline void Scores(const float* qt, const float* k, int64_t n, __m512 out[Tokens]) {
  __m512 acc[Tokens];
  for (int i = 0; i < Tokens; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; ++c) {
    const __m512 q = _mm512_loadu_ps(qt + c * kRows);
    for (int i = 0; i < Tokens; ++i) acc[i] = _mm512_fmadd_ps(q, _mm512_set1_ps(k[i * n + c]), acc[i]);
  }
  for (int i = 0; i < Tokens; ++i) out[i] = _mm512_add_ps(out[i], acc[i]);
}

// Task (batch row b, row block, chunk c): the scores of the block's rows against the chunk's tokens (a token
// per vector, a row per lane), their softmax statistics and the weighted sum of the chunk's values.
void Chunk(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t c = static_cast<int64_t>(index) % j.chunks, bb = static_cast<int64_t>(index) / j.chunks;
  const int64_t b = bb / j.blocks, r0 = (bb % j.blocks) * kRows, count = std::min(kRows, j.rows - r0);
  const int64_t t0 = c * j.chunk, n = std::min(t0 + j.chunk, j.T) - t0;
  const float* qt = j.qt + bb * (j.C + j.R) * kRows;
  const float* kv = j.kv + (b * j.T + t0) * j.C;
  const float* kr = j.kr + (b * j.T + t0) * j.R;
  static thread_local std::vector<float> buffer;
  buffer.resize(j.chunk * kRows);
  float* const scores = buffer.data();  // [n][16]: token t's scores of the block's rows (TLS looked up once)
  // each row's mask offset (rows past the last repeat it)
  int64_t mask_at[kRows];
  for (int64_t i = 0; i < kRows; ++i) {
    const int64_t r = r0 + std::min(i, count - 1);
    mask_at[i] = b * j.mask_b + (r / j.S) * j.mask_h + (r % j.S) * j.T + t0;
  }
  const __m512 scale = _mm512_set1_ps(j.scale);
  auto finish = [&](int64_t t, __m512 dots) {
    alignas(64) float m[kRows];
    for (int64_t i = 0; i < kRows; ++i) m[i] = j.mask[mask_at[i] + t];
    _mm512_storeu_ps(scores + t * kRows, _mm512_fmadd_ps(dots, scale, _mm512_load_ps(m)));
  };
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    __m512 out[8];
    for (int i = 0; i < 8; ++i) out[i] = _mm512_setzero_ps();
    Scores<8>(qt, kv + t * j.C, j.C, out);
    Scores<8>(qt + j.C * kRows, kr + t * j.R, j.R, out);
    for (int i = 0; i < 8; ++i) finish(t + i, out[i]);
  }
  for (; t < n; ++t) {
    __m512 out[1] = {_mm512_setzero_ps()};
    Scores<1>(qt, kv + t * j.C, j.C, out);
    Scores<1>(qt + j.C * kRows, kr + t * j.R, j.R, out);
    finish(t, out[0]);
  }
  // softmax statistics, a row per lane: the chunk's maximum, exp(score - maximum) in place, their sum
  __m512 top = _mm512_loadu_ps(scores);
  for (t = 1; t < n; ++t) top = _mm512_max_ps(top, _mm512_loadu_ps(scores + t * kRows));
  __m512 total = _mm512_setzero_ps();
  for (t = 0; t < n; ++t) {
    const __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(scores + t * kRows), top));
    _mm512_storeu_ps(scores + t * kRows, e);
    total = _mm512_add_ps(total, e);
  }
  alignas(64) float tops[kRows], totals[kRows];
  _mm512_store_ps(tops, top), _mm512_store_ps(totals, total);
  for (int64_t i = 0; i < count; ++i) {
    float* st = j.stats + ((b * j.rows + r0 + i) * j.chunks + c) * 2;
    st[0] = tops[i], st[1] = totals[i];
  }
  // the values, 16 at a time: the block's rows' sums in registers over the chunk's tokens
  for (int64_t v0 = 0; v0 < j.C; v0 += 16) {
    const __mmask16 m = Tail(j.C - v0);
    __m512 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
    for (t = 0; t < n; ++t) {
      const __m512 v = _mm512_maskz_loadu_ps(m, kv + t * j.C + v0);
      const float* p = scores + t * kRows;
      for (int r = 0; r < kRows; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r]), v, acc[r]);
    }
    float* out = j.part + ((b * j.rows + r0) * j.chunks + c) * j.C + v0;
    for (int r = 0; r < kRows; ++r)
      if (r < count) _mm512_mask_storeu_ps(out + r * j.chunks * j.C, m, acc[r]);
  }
}

// Row `index` of all batch rows: its chunks merged into y.
void Merge(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t br = static_cast<int64_t>(index);  // b * rows + r
  const float* st = j.stats + br * j.chunks * 2;
  float top = st[0];
  for (int64_t c = 1; c < j.chunks; ++c) top = std::max(top, st[2 * c]);
  float total = 0.0f;
  static thread_local std::vector<float> buffer;
  buffer.resize(j.chunks);
  float* const weight = buffer.data();
  for (int64_t c = 0; c < j.chunks; ++c) total += st[2 * c + 1] * (weight[c] = std::exp(st[2 * c] - top));
  float* y = j.y + br * j.C;
  for (int64_t v0 = 0; v0 < j.C; v0 += 16) {
    const __mmask16 m = Tail(j.C - v0);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < j.chunks; ++c)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(weight[c]),
                            _mm512_maskz_loadu_ps(m, j.part + (br * j.chunks + c) * j.C + v0), acc);
    _mm512_mask_storeu_ps(y + v0, m, _mm512_div_ps(acc, _mm512_set1_ps(total)));
  }
}

struct LatentAttention {
  LatentAttention(const OrtApi*, const OrtKernelInfo* info) {
    scale_ = Ort::ConstKernelInfo(info).GetAttribute<float>("scale");
  }

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& q, const Ort::Custom::Tensor<float>& qr,
               const Ort::Custom::Tensor<float>& kv, const Ort::Custom::Tensor<float>& kr,
               const Ort::Custom::Tensor<float>& mask, Ort::Custom::Tensor<float>& y) {
    const auto qs = q.Shape(), rs = qr.Shape(), vs = kv.Shape(), ks = kr.Shape(), ms = mask.Shape();
    const bool ok = qs.size() == 4 && rs.size() == 4 && vs.size() == 3 && ks.size() == 3 && ms.size() == 4 &&
                    rs[0] == qs[0] && rs[1] == qs[1] && rs[2] == qs[2] && vs[0] == qs[0] && vs[2] == qs[3] &&
                    ks[0] == qs[0] && ks[1] == vs[1] && ks[2] == rs[3] && (ms[0] == qs[0] || ms[0] == 1) &&
                    (ms[1] == qs[1] || ms[1] == 1) && ms[2] == qs[2] && ms[3] == vs[1];
    if (!ok) {
      ORT_CXX_API_THROW("LatentAttention: expected q_latent [B, H, S, C], q_rope [B, H, S, R], kv_latent [B, T, C], "
                        "k_rope [B, T, R] and mask [B or 1, H or 1, S, T]", ORT_INVALID_ARGUMENT);
    }
    Job j;
    j.q = q.Data(), j.qr = qr.Data(), j.kv = kv.Data(), j.kr = kr.Data(), j.mask = mask.Data();
    j.B = qs[0], j.H = qs[1], j.S = qs[2], j.C = qs[3], j.R = rs[3], j.T = vs[1];
    j.mask_h = ms[1] == 1 ? 0 : j.S * j.T;
    j.mask_b = ms[0] == 1 ? 0 : ms[1] * j.S * j.T;
    j.scale = scale_;
    j.y = y.Allocate({j.B, j.H, j.S, j.C});
    j.rows = j.H * j.S;
    if (j.B == 0 || j.rows == 0 || j.C == 0) return;
    if (j.T == 0) {  // nothing to attend to: the composite's softmax over no keys, an empty sum
      std::fill(j.y, j.y + j.B * j.rows * j.C, 0.0f);
      return;
    }
    j.blocks = (j.rows + kRows - 1) / kRows;
    const int64_t most = std::max<int64_t>(1, kMaxTasks / (j.B * j.blocks));
    j.chunks = std::min((j.T + kTokens - 1) / kTokens, most);
    if (j.chunks > 1) j.chunks &= ~int64_t{1};  // an even count: two threads share the chunks evenly
    j.chunk = (j.T + j.chunks - 1) / j.chunks;
    j.chunks = (j.T + j.chunk - 1) / j.chunk;
    Ort::KernelContext ctx(context);
    panels::Scratch scratch(ctx);
    j.qt = scratch.Get<float>(j.B * j.blocks * (j.C + j.R) * kRows);
    j.part = scratch.Get<float>(j.B * j.rows * j.chunks * j.C);
    j.stats = scratch.Get<float>(j.B * j.rows * j.chunks * 2);
    ctx.ParallelFor(Transpose, static_cast<size_t>(j.B * j.blocks), 0, &j);
    ctx.ParallelFor(Chunk, static_cast<size_t>(j.B * j.blocks * j.chunks), 0, &j);
    if (j.chunks * j.B * j.rows * j.C < (1 << 16)) {  // a decode step's few rows: not worth waking the pool
      for (int64_t r = 0; r < j.B * j.rows; ++r) Merge(&j, static_cast<size_t>(r));
    } else {
      ctx.ParallelFor(Merge, static_cast<size_t>(j.B * j.rows), 0, &j);
    }
  }

  float scale_;
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* NewLatentAttention() {
  return Ort::Custom::CreateLiteCustomOp<LatentAttention>("LatentAttention", "CPUExecutionProvider");
}
