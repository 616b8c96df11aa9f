// MLA's attention inputs from its projections: ONNX Runtime custom ops QueryRope and LatentKey, domain
// ai.dscompile (lowering/fuse_query_key.py writes them in the decode graphs of engines exported with
// --native-kernels, in the place of the small nodes between the projections and the attention).
//
//   QueryRope: q [B, S, H * (N + R)], cos [B, S, R/2], sin [B, S, R/2]; attributes heads H, nope N, interleaved
//   -> q_nope [B, H, S, N], q_rope [B, H, S, R] (rotated)
//   LatentKey: kv [B, S, C + R], scale [C], cos, sin; attributes epsilon, interleaved
//   -> kv_latent [B, S, C] (RMS-normalized, times scale), k_rope [B, S, R] (rotated)
//
// The rotation is ONNX's RotaryEmbedding with interleaved=0 on R/2 pairs (x_i, x_{i+R/2}):
// (x_i cos_i - x_{i+R/2} sin_i, x_{i+R/2} cos_i + x_i sin_i). With `interleaved` the pairs are (x_2i, x_2i+1)
// of the input, de-interleaved first (the Gather lowering/fuse_rope.py writes), so the output keeps the
// [rotated firsts, rotated seconds] layout the cache holds. The normalization is ONNX's RMSNormalization
// over the last axis in float32: x / sqrt(mean(x^2) + epsilon) * scale.
//
// What they replace, per layer of the bench model: Reshape, Split, Gather, Reshape, RotaryEmbedding,
// Reshape and two Transposes for the query; Split, RMSNormalization, Gather and RotaryEmbedding for the key.
// Each of those nodes costs a kernel launch and a pass over a few KB of activations, on caches that the
// step's weight streams have emptied; the work itself is a few thousand multiplies.
#include "native.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// x's R values rotated into out by cos/sin (R/2 each): the pairs (x[i], x[i + R/2]), or with `interleaved`
// (x[2i], x[2i + 1]).
inline void Rotate(const float* x, const float* cos, const float* sin, int64_t R, bool interleaved, float* out) {
  const int64_t half = R / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = interleaved ? x[2 * i] : x[i], b = interleaved ? x[2 * i + 1] : x[half + i];
    out[i] = a * cos[i] - b * sin[i];
    out[half + i] = b * cos[i] + a * sin[i];
  }
}

// Whether cos and sin are both [B, S, half].
bool Angles(const std::vector<int64_t>& c, const std::vector<int64_t>& s, int64_t B, int64_t S) {
  return c.size() == 3 && c == s && c[0] == B && c[1] == S && c[2] > 0;
}

struct QueryRope {
  QueryRope(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    heads_ = k.GetAttribute<int64_t>("heads");
    nope_ = k.GetAttribute<int64_t>("nope");
    interleaved_ = k.GetAttribute<int64_t>("interleaved") != 0;
  }

  void Compute(const Ort::Custom::Tensor<float>& q, const Ort::Custom::Tensor<float>& cos,
               const Ort::Custom::Tensor<float>& sin, Ort::Custom::Tensor<float>& q_nope,
               Ort::Custom::Tensor<float>& q_rope) {
    const auto qs = q.Shape();
    const int64_t H = heads_, N = nope_;
    const bool shaped = qs.size() == 3 && Angles(cos.Shape(), sin.Shape(), qs[0], qs[1]);
    const int64_t R = shaped ? 2 * cos.Shape()[2] : 0;
    if (!shaped || H <= 0 || N < 0 || qs[2] != H * (N + R)) {
      ORT_CXX_API_THROW("QueryRope: expected q [B, S, heads * (nope + R)], cos and sin [B, S, R/2]",
                        ORT_INVALID_ARGUMENT);
    }
    const int64_t B = qs[0], S = qs[1], half = R / 2;
    float* nope = q_nope.Allocate({B, H, S, N});
    float* rope = q_rope.Allocate({B, H, S, R});
    const float *x = q.Data(), *c = cos.Data(), *s = sin.Data();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < S; ++t)
        for (int64_t h = 0; h < H; ++h) {
          const float* row = x + ((b * S + t) * H + h) * (N + R);
          const int64_t at = (b * H + h) * S + t;  // [b, h, t] of the outputs
          std::memcpy(nope + at * N, row, sizeof(float) * N);
          Rotate(row + N, c + (b * S + t) * half, s + (b * S + t) * half, R, interleaved_, rope + at * R);
        }
  }

  int64_t heads_, nope_;
  bool interleaved_;
};

struct LatentKey {
  LatentKey(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    epsilon_ = k.GetAttribute<float>("epsilon");
    interleaved_ = k.GetAttribute<int64_t>("interleaved") != 0;
  }

  void Compute(const Ort::Custom::Tensor<float>& kv, const Ort::Custom::Tensor<float>& scale,
               const Ort::Custom::Tensor<float>& cos, const Ort::Custom::Tensor<float>& sin,
               Ort::Custom::Tensor<float>& latent, Ort::Custom::Tensor<float>& k_rope) {
    const auto ks = kv.Shape(), ws = scale.Shape();
    const bool shaped = ks.size() == 3 && ws.size() == 1 && Angles(cos.Shape(), sin.Shape(), ks[0], ks[1]);
    const int64_t R = shaped ? 2 * cos.Shape()[2] : 0, C = shaped ? ws[0] : 0;
    if (!shaped || C <= 0 || ks[2] != C + R) {
      ORT_CXX_API_THROW("LatentKey: expected kv [B, S, C + R], scale [C], cos and sin [B, S, R/2]",
                        ORT_INVALID_ARGUMENT);
    }
    const int64_t rows = ks[0] * ks[1], half = R / 2;
    float* out = latent.Allocate({ks[0], ks[1], C});
    float* rope = k_rope.Allocate({ks[0], ks[1], R});
    const float *x = kv.Data(), *w = scale.Data(), *c = cos.Data(), *s = sin.Data();
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = x + r * (C + R);
      float squares = 0.0f;
      for (int64_t i = 0; i < C; ++i) squares += row[i] * row[i];
      const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(C) + epsilon_);
      for (int64_t i = 0; i < C; ++i) out[r * C + i] = row[i] * inverse * w[i];
      Rotate(row + C, c + r * half, s + r * half, R, interleaved_, rope + r * R);
    }
  }

  float epsilon_;
  bool interleaved_;
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* NewQueryRope() {
  return Ort::Custom::CreateLiteCustomOp<QueryRope>("QueryRope", "CPUExecutionProvider");
}

Ort::Custom::OrtLiteCustomOp* NewLatentKey() {
  return Ort::Custom::CreateLiteCustomOp<LatentKey>("LatentKey", "CPUExecutionProvider");
}
