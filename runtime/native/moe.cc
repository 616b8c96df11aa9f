// The routed experts of a DeepSeekMoE layer in int4 or int8: ONNX Runtime custom ops MoEQ4 and MoEQ8,
// domain ai.dscompile, in the place of com.microsoft.QMoE (lowering/quantize.py writes them for
// --weights int4|int8 --native-kernels).
//
//   x [T, D] float32, router [T, E] float32 (the chosen experts' log weights, a very negative value
//   elsewhere, as lowering/ops.py builds QMoE's input), fc1 uint8 [E, ceil(2I/16), D/32, Bits * 64] and
//   float16 scales [E, ceil(2I/16), D/32, 16] (gate and up rows interleaved: g0 u0 g1 u1 ...), fc2 uint8
//   [E, ceil(D/16), I/32, Bits * 64] and scales [E, ceil(D/16), I/32, 16]; attributes k, I
//   -> y [T, D] = sum over each token's k chosen experts e of softmax(router[t])_e * fc2_e(silu(g) * u)
//
// The same sum QMoE computes with normalize_routing_weights=0 and swiglu (alpha 1, beta 0). Each weight
// matrix is MatMulQ4's or MatMulQ8's panels (matmul.cc, panels.h), one per expert. A token's k choices become k slots, ordered by
// expert; the slots' activations are quantized to int8 per block of 32 (as MatMulQ4 and QMoE at
// accuracy_level 4 do), then fc1 runs as tasks of (expert, panel of 16 rows) over the expert's slots,
// silu(g) * u is quantized again, fc2 runs the same way, and each token sums its slots. One token with
// k > 1 (a decode step) runs each chosen expert as one task instead, fc1 to fc2 (Expert). Only the chosen
// experts' weights are read.
//
// ExpertsQ4/ExpertsQ8 (lowering/fuse_experts.py) are the same experts with TopK's choice given (each token's
// chosen experts and weights, summed as given) and the layer's shared MLP in the op: one more task of the
// decode step's loop, handed out first, so a MoE layer is one node instead of fifteen. Working memory comes
// from the session's arena (panels.h, Scratch).
//
// MoEF32 (lowering/native_f32.py, the decode graphs of float32 engines exported with --native-kernels) is
// com.microsoft.MoE's float32 experts with the same routing, read where they lie (floats.h):
//   x [T, D], router [T, E], fc1 float32 [E, 2I, D] (gate and up rows interleaved), fc2 float32 [E, D, I];
//   attribute k -> y [T, D] as above, with the slots' rows in float32 and tasks of (expert, kRows rows).
#include "floats.h"
#include "native.h"
#include "panels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kRows = 16;  // MoEF32: weight rows per task

struct Matrix {
  const uint8_t* w;   // [E, count, K/32, bits * 64]
  const uint16_t* s;  // [E, count, K/32, 16]
  int64_t N, K, count, block_bytes;
  const uint8_t* weights(int64_t e) const { return w + e * count * (K / 32) * block_bytes; }
  const uint16_t* scales(int64_t e) const { return s + e * count * (K / 32) * 16; }
};

// The [N, K] matrices (one per expert, or one) of input i's panels and input i + 1's scales, read where
// CopyWeights put them.
template <int Bits>
Matrix Stored(const std::vector<std::unique_ptr<panels::HugeCopy>>& copies, size_t i,
              const Ort::Custom::Tensor<uint8_t>& w, const Ort::Custom::Tensor<Ort::Float16_t>& s, int64_t N,
              int64_t K) {
  return Matrix{panels::Weight(copies, i, w), panels::Weight(copies, i + 1, s), N, K, (N + 15) / 16, Bits * 64};
}

struct Job {
  const float* x;
  int64_t T, D, I, k;
  Matrix fc1, fc2;
  std::vector<int64_t> token, expert, first;  // slot -> token, slot -> expert; expert -> its first slot (E + 1)
  std::vector<float> mix;             // slot -> its weight
  std::vector<int64_t> slots;         // token t's k slots at t * k
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (expert, panel)
  panels::Activations rows;           // slot rows quantized: x for fc1 (K = D), then the activation (K = I)
  panels::Activations act;            // one token: the slots' activations (K = I); rows holds x once
  float *h = nullptr, *out = nullptr;  // [S, 2I] fc1's outputs, [S, D] fc2's (from scratch)
  float* y;
  const float *f1 = nullptr, *f2 = nullptr;  // MoEF32: fc1 [E, 2I, D], fc2 [E, D, I]
  float* a = nullptr;                        // MoEF32: the slots' rows: x for fc1 (D), then silu(g) * u (I)
  // ExpertsQ4/Q8's shared experts (Is = 0: none): one MLP of width Is, gate and up [Is, D], down [D, Is].
  Matrix gate, up, down;
  int64_t Is = 0;
  panels::Activations tokens, shared_act;  // x per token (K = D); silu(g) * u per token (K = Is)
  float *g = nullptr, *u = nullptr, *sh = nullptr;  // [T, Is], [T, Is], [T, D]
};

void QuantizeInput(void* data, size_t slot) {
  Job& j = *static_cast<Job*>(data);
  j.rows.Quantize(j.x + j.token[slot] * j.D, static_cast<int64_t>(slot));
}

// Task `index` of `m` (expert e, panel p) over e's slots' quantized rows; outputs at `out` + slot * ldy.
template <int Bits>
void Run(const Job& j, const Matrix& m, size_t index, float* out, int64_t ldy) {
  const auto [e, p] = j.tasks[index];
  const int64_t first = j.first[e], count = j.first[e + 1] - first;
  panels::PanelRows<Bits>(m.weights(e), m.scales(e), m.N, p, j.rows.rows().From(first), count, out + first * ldy, ldy);
}

template <int Bits>
void Fc1(void* data, size_t index) {
  Job& j = *static_cast<Job*>(data);
  Run<Bits>(j, j.fc1, index, j.h, 2 * j.I);
}

template <int Bits>
void Fc2(void* data, size_t index) {
  Job& j = *static_cast<Job*>(data);
  Run<Bits>(j, j.fc2, index, j.out, j.D);
}

// a[i] = silu(g_i) * u_i, n of them, g_i at g + i * stride and u_i at u + i * stride (fc1's outputs: g and u
// interleaved, stride 2; the shared MLP's gate and up: stride 1).
void SwiGlu(const float* g, const float* u, int64_t stride, int64_t n, float* a) {
  for (int64_t i = 0; i < n; ++i) a[i] = g[i * stride] / (1.0f + std::exp(-g[i * stride])) * u[i * stride];
}

// silu(g) * u of token t's shared MLP, quantized for its down projection.
void SharedActivate(void* data, size_t t) {
  Job& j = *static_cast<Job*>(data);
  static thread_local std::vector<float> a;
  a.resize(j.Is);
  SwiGlu(j.g + t * j.Is, j.u + t * j.Is, 1, j.Is, a.data());
  j.shared_act.Quantize(a.data(), static_cast<int64_t>(t));
}

// silu(g) * u of one slot, quantized for fc2.
void Activate(void* data, size_t slot) {
  Job& j = *static_cast<Job*>(data);
  static thread_local std::vector<float> a;
  a.resize(j.I);
  const float* h = j.h + slot * 2 * j.I;
  SwiGlu(h, h + 1, 2, j.I, a.data());
  j.rows.Quantize(a.data(), static_cast<int64_t>(slot));
}

// The shared MLP of one token (x quantized once, rows' row 0), start to end, into sh: the task that runs it
// is twice a routed expert's (Is = 2I in DeepSeek-V2-Lite), and is handed out first.
template <int Bits>
void SharedOne(Job& j) {
  const panels::Rows x = j.rows.rows();
  for (int64_t p = 0; p < j.gate.count; ++p) {
    panels::PanelRows<Bits>(j.gate.weights(0), j.gate.scales(0), j.Is, p, x, 1, j.g, j.Is);
    panels::PanelRows<Bits>(j.up.weights(0), j.up.scales(0), j.Is, p, x, 1, j.u, j.Is);
  }
  SharedActivate(&j, 0);
  for (int64_t p = 0; p < j.down.count; ++p)
    panels::PanelRows<Bits>(j.down.weights(0), j.down.scales(0), j.D, p, j.shared_act.rows(), 1, j.sh, j.D);
}

// One token, task `index`: the shared MLP (SharedOne) where there is one as task 0, else chosen expert (slot)
// `index` (less one after a shared MLP) start to end: fc1 over x (quantized once, rows' row 0), silu(g) * u
// quantized, fc2; so the experts stream without a barrier between fc1 and fc2.
template <int Bits>
void Expert(void* data, size_t index) {
  Job& j = *static_cast<Job*>(data);
  if (j.Is > 0 && index == 0) return SharedOne<Bits>(j);
  const size_t slot = index - (j.Is > 0 ? 1 : 0);
  const int64_t e = j.expert[slot], s = static_cast<int64_t>(slot);
  float* h = j.h + s * 2 * j.I;
  const panels::Rows x = j.rows.rows();
  for (int64_t p = 0; p < j.fc1.count; ++p)
    panels::PanelRows<Bits>(j.fc1.weights(e), j.fc1.scales(e), j.fc1.N, p, x, 1, h, 2 * j.I);
  static thread_local std::vector<float> a;
  a.resize(j.I);
  SwiGlu(h, h + 1, 2, j.I, a.data());
  j.act.Quantize(a.data(), s);
  const panels::Rows in = j.act.rows().From(s);
  for (int64_t p = 0; p < j.fc2.count; ++p)
    panels::PanelRows<Bits>(j.fc2.weights(e), j.fc2.scales(e), j.fc2.N, p, in, 1, j.out + s * j.D, j.D);
}

void Combine(void* data, size_t t) {
  Job& j = *static_cast<Job*>(data);
  float* y = j.y + t * j.D;
  if (j.Is > 0)
    std::copy_n(j.sh + t * j.D, j.D, y);
  else
    std::fill(y, y + j.D, 0.0f);
  for (int64_t c = 0; c < j.k; ++c) {
    const int64_t slot = j.slots[t * j.k + c];
    const float w = j.mix[slot];
    const float* o = j.out + slot * j.D;
    for (int64_t d = 0; d < j.D; ++d) y[d] += w * o[d];
  }
}

// (expert, part) tasks, `parts` per expert (a matrix's panels or groups of rows), for every expert with slots.
std::vector<std::pair<int64_t, int64_t>> Tasks(const Job& j, int64_t parts, int64_t E) {
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t e = 0; e < E; ++e)
    if (j.first[e + 1] > j.first[e])
      for (int64_t p = 0; p < parts; ++p) tasks.emplace_back(e, p);
  return tasks;
}

// Slots from each token's k chosen experts `chosen` [T, k] and their mixing weights `weight` [T, k]: ordered by
// expert (j.k set; every chosen expert in [0, E)).
void Assign(const int64_t* chosen, const float* weight, int64_t T, int64_t E, Job& j) {
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t i = 0; i < T * j.k; ++i) ++count[chosen[i] + 1];
  j.first.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) j.first[e + 1] = j.first[e] + count[e + 1];
  const int64_t S = T * j.k;
  j.token.resize(S), j.expert.resize(S), j.mix.resize(S), j.slots.resize(S);
  std::vector<int64_t> next(j.first.begin(), j.first.end() - 1);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < j.k; ++c) {
      const int64_t e = chosen[t * j.k + c], slot = next[e]++;
      j.token[slot] = t, j.expert[slot] = e, j.mix[slot] = weight[t * j.k + c], j.slots[t * j.k + c] = slot;
    }
}

// Routing: each token's k largest router values [T, E], their softmax; slots ordered by expert (j.k set).
void Route(const float* r, int64_t T, int64_t E, Job& j) {
  std::vector<int64_t> chosen(T * j.k), order(E);
  std::vector<float> weight(T * j.k);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = r + t * E;
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + j.k, order.end(),
                      [row](int64_t a, int64_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
    const float top = row[order[0]];
    float total = 0.0f;
    for (int64_t c = 0; c < j.k; ++c) {
      chosen[t * j.k + c] = order[c];
      weight[t * j.k + c] = std::exp(row[order[c]] - top);
      total += weight[t * j.k + c];
    }
    for (int64_t c = 0; c < j.k; ++c) weight[t * j.k + c] /= total;
  }
  Assign(chosen.data(), weight.data(), T, E, j);
}

// The shared MLP of T > 1 tokens into sh: x quantized per token, gate and up by panel, silu(g) * u
// quantized per token, down by panel.
template <int Bits>
void SharedGateUp(void* data, size_t index) {
  Job& j = *static_cast<Job*>(data);
  const bool gate = static_cast<int64_t>(index) < j.gate.count;
  const Matrix& m = gate ? j.gate : j.up;
  const int64_t p = gate ? static_cast<int64_t>(index) : static_cast<int64_t>(index) - j.gate.count;
  panels::PanelRows<Bits>(m.weights(0), m.scales(0), j.Is, p, j.tokens.rows(), j.T, gate ? j.g : j.u, j.Is);
}

template <int Bits>
void SharedDown(void* data, size_t p) {
  Job& j = *static_cast<Job*>(data);
  panels::PanelRows<Bits>(j.down.weights(0), j.down.scales(0), j.D, static_cast<int64_t>(p), j.shared_act.rows(), j.T,
                          j.sh, j.D);
}

void QuantizeToken(void* data, size_t t) {
  Job& j = *static_cast<Job*>(data);
  j.tokens.Quantize(j.x + t * j.D, static_cast<int64_t>(t));
}

// The routed experts of the assigned slots (and the shared MLP where j.Is > 0) into j.y: MoEQ4/Q8 and
// ExpertsQ4/Q8 after their routing.
template <int Bits>
void RunExperts(Job& j, int64_t E, Ort::KernelContext& ctx, panels::Scratch& scratch) {
  const int64_t T = j.T, D = j.D, I = j.I, S = T * j.k, Is = j.Is;
  j.h = scratch.Get<float>(S * 2 * I), j.out = scratch.Get<float>(S * D);
  if (Is > 0) {
    j.g = scratch.Get<float>(T * Is), j.u = scratch.Get<float>(T * Is), j.sh = scratch.Get<float>(T * D);
    j.shared_act.Reset(T, Is, scratch);
  }
  if (T == 1 && S > 1) {
    // Decode: x quantized once, one task per chosen expert (fc1, silu(g) * u, fc2), the shared MLP first as
    // one more, the token's sum here. Against the steps below (a task per panel, a barrier after each
    // step): 0.92-0.96 of the time for 8 layers of the bench model's experts (16 of 2048 x 1408, k = 6) on
    // 2 threads, 27-34 GB/s. With one expert, the steps below keep every thread busy.
    j.rows.Reset(1, D, scratch);
    j.rows.Quantize(j.x, 0);
    j.act.Reset(S, I, scratch);
    ctx.ParallelFor(Expert<Bits>, static_cast<size_t>(S + (Is > 0 ? 1 : 0)), 0, &j);
    Combine(&j, 0);
    return;
  }
  if (Is > 0) {
    j.tokens.Reset(T, D, scratch);
    ctx.ParallelFor(QuantizeToken, static_cast<size_t>(T), 0, &j);
    ctx.ParallelFor(SharedGateUp<Bits>, static_cast<size_t>(j.gate.count + j.up.count), 0, &j);
    ctx.ParallelFor(SharedActivate, static_cast<size_t>(T), 0, &j);
    ctx.ParallelFor(SharedDown<Bits>, static_cast<size_t>(j.down.count), 0, &j);
  }
  j.rows.Reset(S, D, scratch);
  ctx.ParallelFor(QuantizeInput, static_cast<size_t>(S), 0, &j);
  j.tasks = Tasks(j, j.fc1.count, E);
  ctx.ParallelFor(Fc1<Bits>, j.tasks.size(), 0, &j);
  j.rows.Reset(S, I, scratch);
  ctx.ParallelFor(Activate, static_cast<size_t>(S), 0, &j);
  j.tasks = Tasks(j, j.fc2.count, E);
  ctx.ParallelFor(Fc2<Bits>, j.tasks.size(), 0, &j);
  ctx.ParallelFor(Combine, static_cast<size_t>(T), 0, &j);
}

// MoEF32's steps: gather x per slot; fc1 and fc2 tasks of (expert, kRows rows); silu(g) * u per slot.
void GatherInput(void* data, size_t slot) {
  Job& j = *static_cast<Job*>(data);
  std::copy_n(j.x + j.token[slot] * j.D, j.D, j.a + slot * j.D);
}

// Task `index` of a float32 stack w [E, N, K] (expert e, rows kRows * c on) over e's slots' rows of `in`
// (K values each); outputs at `out` + slot * N.
void RunF32(const Job& j, const float* w, int64_t N, int64_t K, size_t index, const float* in, float* out) {
  const auto [e, c] = j.tasks[index];
  const int64_t first = j.first[e], count = j.first[e + 1] - first, n0 = c * kRows;
  floats::Rows(w + e * N * K, K, n0, std::min(n0 + kRows, N), in + first * K, K, count, out + first * N, N);
}

void Fc1F32(void* data, size_t index) {
  Job& j = *static_cast<Job*>(data);
  RunF32(j, j.f1, 2 * j.I, j.D, index, j.a, j.h);
}

void ActivateF32(void* data, size_t slot) {
  Job& j = *static_cast<Job*>(data);
  const float* h = j.h + slot * 2 * j.I;
  SwiGlu(h, h + 1, 2, j.I, j.a + slot * j.I);
}

void Fc2F32(void* data, size_t index) {
  Job& j = *static_cast<Job*>(data);
  RunF32(j, j.f2, j.D, j.I, index, j.a, j.out);
}

template <int Bits>
struct MoEQ {
  MoEQ(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    k_ = k.GetAttribute<int64_t>("k");
    I_ = k.GetAttribute<int64_t>("I");
    weights_ = panels::CopyWeights(info, 2, 5);
  }

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<float>& router,
               const Ort::Custom::Tensor<uint8_t>& w1, const Ort::Custom::Tensor<Ort::Float16_t>& s1,
               const Ort::Custom::Tensor<uint8_t>& w2, const Ort::Custom::Tensor<Ort::Float16_t>& s2,
               Ort::Custom::Tensor<float>& y) {
    const auto xs = x.Shape(), rs = router.Shape();
    if (xs.size() != 2 || rs.size() != 2 || rs[0] != xs[0]) {
      ORT_CXX_API_THROW(Bits == 4 ? "MoEQ4: expected x [T, D] and router [T, E]"
                                  : "MoEQ8: expected x [T, D] and router [T, E]", ORT_INVALID_ARGUMENT);
    }
    const int64_t T = xs[0], D = xs[1], E = rs[1], I = I_;
    Job j;
    j.x = x.Data();
    j.T = T, j.D = D, j.I = I, j.k = std::min(k_, E);
    j.fc1 = Stored<Bits>(weights_, 0, w1, s1, 2 * I, D);
    j.fc2 = Stored<Bits>(weights_, 2, w2, s2, D, I);
    if (j.k < 1 || !panels::Holds<Bits>(w1, s1, E, 2 * I, D) || !panels::Holds<Bits>(w2, s2, E, D, I)) {
      ORT_CXX_API_THROW(Bits == 4 ? "MoEQ4: expected fc1 [E, ceil(2I/16), D/32, 256], fc2 [E, ceil(D/16), I/32, 256] "
                                    "and their scales [..., 16], with D and I multiples of 32 and k >= 1"
                                  : "MoEQ8: expected fc1 [E, ceil(2I/16), D/32, 512], fc2 [E, ceil(D/16), I/32, 512] "
                                    "and their scales [..., 16], with D and I multiples of 32 and k >= 1",
                        ORT_INVALID_ARGUMENT);
    }
    j.y = y.Allocate({T, D});
    if (T == 0) return;
    Route(router.Data(), T, E, j);
    Ort::KernelContext ctx(context);
    panels::Scratch scratch(ctx);
    RunExperts<Bits>(j, E, ctx, scratch);
  }

  int64_t k_, I_;
  std::vector<std::unique_ptr<panels::HugeCopy>> weights_;  // fc1, its scales, fc2, its scales on huge pages
};

// ExpertsQ4/Q8: MoEQ4/Q8's experts with the routing given as each token's chosen experts and their weights
// (TopK's), and the shared experts in the same op.
//   x [T, D] float32, weights [T, k] float32, experts [T, k] int64 (each in [0, E)), fc1/fc2 and their scales as
//   MoEQ4/Q8's; optional: the shared MLP's gate and up [Is, D] and down [D, Is] in MatMulQ4/Q8's panels, each
//   with its scales; attributes I, shared_I (Is; 0: none)
//   -> y [T, D] = sum over c of weights[t, c] * fc2_e(silu(g) * u) for e = experts[t, c], + shared(x[t])
template <int Bits>
struct ExpertsQ {
  using Panels = Ort::Custom::Tensor<uint8_t>;
  using Scales = Ort::Custom::Tensor<Ort::Float16_t>;
  using Optional = std::optional<const Panels*>;
  using OptionalScales = std::optional<const Scales*>;

  ExpertsQ(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    I_ = k.GetAttribute<int64_t>("I");
    Is_ = k.GetAttribute<int64_t>("shared_I");
    weights_ = panels::CopyWeights(info, 3, k.GetInputCount() - 1);
  }

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
               const Ort::Custom::Tensor<float>& weights, const Ort::Custom::Tensor<int64_t>& experts,
               const Panels& w1, const Scales& s1, const Panels& w2, const Scales& s2, Optional gate,
               OptionalScales gs, Optional up, OptionalScales us, Optional down, OptionalScales ds,
               Ort::Custom::Tensor<float>& y) {
    const char* what = Bits == 4 ? "ExpertsQ4: expected x [T, D], weights and experts [T, k], the experts' fc1 and "
                                   "fc2 and (shared_I > 0) the shared MLP's gate, up and down in MatMulQ4's panels, "
                                   "with D, I and shared_I multiples of 32"
                                 : "ExpertsQ8: expected x [T, D], weights and experts [T, k], the experts' fc1 and "
                                   "fc2 and (shared_I > 0) the shared MLP's gate, up and down in MatMulQ8's panels, "
                                   "with D, I and shared_I multiples of 32";
    const auto xs = x.Shape(), ws = weights.Shape(), es = experts.Shape();
    if (xs.size() != 2 || ws.size() != 2 || ws != es || ws[0] != xs[0] || ws[1] < 1 || xs[1] % 32) {
      ORT_CXX_API_THROW(what, ORT_INVALID_ARGUMENT);
    }
    const int64_t T = xs[0], D = xs[1], I = I_, Is = Is_;
    const int64_t per_expert = (2 * I + 15) / 16 * (D / 32) * Bits * 64;
    const int64_t E = per_expert > 0 ? w1.NumberOfElement() / per_expert : 0;
    bool ok = E > 0 && panels::Holds<Bits>(w1, s1, E, 2 * I, D) && panels::Holds<Bits>(w2, s2, E, D, I);
    if (Is > 0) {
      ok = ok && gate && gs && up && us && down && ds && panels::Holds<Bits>(**gate, **gs, 1, Is, D) &&
           panels::Holds<Bits>(**up, **us, 1, Is, D) && panels::Holds<Bits>(**down, **ds, 1, D, Is);
    } else {
      ok = ok && Is == 0 && !gate && !up && !down;
    }
    if (!ok) ORT_CXX_API_THROW(what, ORT_INVALID_ARGUMENT);
    Job j;
    j.x = x.Data();
    j.T = T, j.D = D, j.I = I, j.k = ws[1], j.Is = Is;
    j.fc1 = Stored<Bits>(weights_, 0, w1, s1, 2 * I, D);
    j.fc2 = Stored<Bits>(weights_, 2, w2, s2, D, I);
    if (Is > 0) {
      j.gate = Stored<Bits>(weights_, 4, **gate, **gs, Is, D);
      j.up = Stored<Bits>(weights_, 6, **up, **us, Is, D);
      j.down = Stored<Bits>(weights_, 8, **down, **ds, D, Is);
    }
    const int64_t* chosen = experts.Data();
    for (int64_t i = 0; i < T * j.k; ++i)
      if (chosen[i] < 0 || chosen[i] >= E) ORT_CXX_API_THROW(Bits == 4 ? "ExpertsQ4: an expert index is out of range"
                                                                         : "ExpertsQ8: an expert index is out of range",
                                                               ORT_INVALID_ARGUMENT);
    j.y = y.Allocate({T, D});
    if (T == 0) return;
    Assign(chosen, weights.Data(), T, E, j);
    Ort::KernelContext ctx(context);
    panels::Scratch scratch(ctx);
    RunExperts<Bits>(j, E, ctx, scratch);
  }

  int64_t I_, Is_;
  // fc1, its scales, fc2, its scales, then the shared gate, up and down with theirs, on huge pages (indices from 0
  // at fc1)
  std::vector<std::unique_ptr<panels::HugeCopy>> weights_;
};

struct MoEF32 {
  MoEF32(const OrtApi*, const OrtKernelInfo* info) { k_ = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("k"); }

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<float>& router,
               const Ort::Custom::Tensor<float>& w1, const Ort::Custom::Tensor<float>& w2, Ort::Custom::Tensor<float>& y) {
    const auto xs = x.Shape(), rs = router.Shape(), s1 = w1.Shape(), s2 = w2.Shape();
    if (xs.size() != 2 || rs.size() != 2 || rs[0] != xs[0] || s1.size() != 3 || s2.size() != 3 || s1[0] != rs[1] ||
        s2[0] != rs[1] || s1[2] != xs[1] || s2[1] != xs[1] || s1[1] != 2 * s2[2] || k_ < 1) {
      ORT_CXX_API_THROW("MoEF32: expected x [T, D], router [T, E], fc1 [E, 2I, D], fc2 [E, D, I] and k >= 1",
                        ORT_INVALID_ARGUMENT);
    }
    const int64_t T = xs[0], D = xs[1], E = rs[1], I = s2[2];
    Job j;
    j.x = x.Data(), j.f1 = w1.Data(), j.f2 = w2.Data();
    j.T = T, j.D = D, j.I = I, j.k = std::min(k_, E);
    j.y = y.Allocate({T, D});
    if (T == 0) return;
    Route(router.Data(), T, E, j);
    const int64_t S = T * j.k;
    Ort::KernelContext ctx(context);
    panels::Scratch scratch(ctx);
    j.a = scratch.Get<float>(S * std::max(D, I)), j.h = scratch.Get<float>(S * 2 * I);
    j.out = scratch.Get<float>(S * D);
    ctx.ParallelFor(GatherInput, static_cast<size_t>(S), 0, &j);
    j.tasks = Tasks(j, (2 * I + kRows - 1) / kRows, E);
    ctx.ParallelFor(Fc1F32, j.tasks.size(), 0, &j);
    ctx.ParallelFor(ActivateF32, static_cast<size_t>(S), 0, &j);
    j.tasks = Tasks(j, (D + kRows - 1) / kRows, E);
    ctx.ParallelFor(Fc2F32, j.tasks.size(), 0, &j);
    ctx.ParallelFor(Combine, static_cast<size_t>(T), 0, &j);
  }

  int64_t k_;
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* NewMoEF32() {
  return Ort::Custom::CreateLiteCustomOp<MoEF32>("MoEF32", "CPUExecutionProvider");
}

Ort::Custom::OrtLiteCustomOp* NewMoEQ4() {
  return Ort::Custom::CreateLiteCustomOp<MoEQ<4>>("MoEQ4", "CPUExecutionProvider");
}

Ort::Custom::OrtLiteCustomOp* NewMoEQ8() {
  return Ort::Custom::CreateLiteCustomOp<MoEQ<8>>("MoEQ8", "CPUExecutionProvider");
}

Ort::Custom::OrtLiteCustomOp* NewExpertsQ4() {
  return Ort::Custom::CreateLiteCustomOp<ExpertsQ<4>>("ExpertsQ4", "CPUExecutionProvider");
}

Ort::Custom::OrtLiteCustomOp* NewExpertsQ8() {
  return Ort::Custom::CreateLiteCustomOp<ExpertsQ<8>>("ExpertsQ8", "CPUExecutionProvider");
}
