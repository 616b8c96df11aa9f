// Linear layers with int4, int6 or int8 weights and VNNI dot products: ONNX Runtime custom ops MatMulQ4,
// MatMulQ6 and MatMulQ8, domain ai.dscompile. lowering/quantize.py writes the nodes (and the weights'
// layout) for engines exported with --weights int4|int8 --native-kernels (6 bits: lm_head with
// --lm-head-bits 6).
//
//   x [..., K] float32, w uint8 [N16, K/32, Bits * 64], s float16 [N16, K/32, 16], attributes K, N
//   -> y [..., N] float32, y[m, n] = sum_k x[m, k] * (q[n, k] * s[n, k/32]),  q in [-2^(Bits-1), 2^(Bits-1))
//
// Weights come in panels of 16 output rows (N16 = ceil(N/16); rows past N are zero). A panel's block of
// 32 values along K is 8 vectors V_j (j = 0..7) of 16 rows x 4 values (q + 2^(Bits-1), unsigned), V_j
// for values 4j..4j+3 of the block, byte 4r+e = row r, value e. int8: the 8 vectors one after another
// (512 bytes); int4: 256 bytes, byte i of chunk c (c = 0..3, 64 bytes) holding V_c's byte i in its low
// nibble and V_{c+4}'s in its high nibble; int6: those 256 bytes hold the low 4 bits, then 2 chunks of
// 64 bytes the top 2 bits, byte i of chunk h holding V_{4h+j}'s at bits 2j, 2j+1 (384 bytes). One scale
// per row and block, float16 (4.5, 6.5 and 8.5 bits per weight in all, as llama.cpp's q4_0, about its
// q6_K's 6.56, and q8_0).
//
// Activations are quantized to int8 per block of 32 values (scale = max |x| / 127, rounded to nearest
// even), as MatMulNBits does at accuracy_level 4. Each lane of a 16-lane vector is one output row, so a
// block is 8 VPDPBUSD (unsigned weights x signed activations, 4 products per lane each) into int32
// lanes, started at -2^(Bits-1) * sum(x_q) (the weights' offset), then one conversion and one FMA with
// the rows' scales times the activations' scale: no horizontal sums, and the instruction count per
// weight byte is low enough that one thread streams weights at about the machine's read bandwidth
// (panels.h). Tasks of kPanels panels (one token) or of one panel and every token run on ONNX Runtime's
// intra-op thread pool.
#include "native.h"
#include "panels.h"

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
  int64_t M, N, count;  // count: panels
  const float* input;   // x [M, K]
  panels::Activations x;
};

void QuantizeTask(void* data, size_t m) {
  Job& j = *static_cast<Job*>(data);
  j.x.Quantize(j.input + m * j.x.rows().K, static_cast<int64_t>(m));
}

template <int Bits>
void OneTokenTask(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t first = static_cast<int64_t>(index) * kPanels, end = std::min(first + kPanels, j.count);
  for (int64_t p = first; p < end; ++p) panels::PanelRows<Bits>(j.w, j.s, j.N, p, j.x.rows(), 1, j.y, j.N);
}

template <int Bits>
void TokensTask(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  panels::PanelRows<Bits>(j.w, j.s, j.N, static_cast<int64_t>(index), j.x.rows(), j.M, j.y, j.N);
}

template <int Bits>
struct MatMulQ {
  MatMulQ(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    K_ = k.GetAttribute<int64_t>("K");
    N_ = k.GetAttribute<int64_t>("N");
    weights_ = panels::CopyWeights(info, 1, 2);
  }

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<uint8_t>& w,
               const Ort::Custom::Tensor<Ort::Float16_t>& s, Ort::Custom::Tensor<float>& y) {
    const auto xs = x.Shape();
    const int64_t count = (N_ + 15) / 16, blocks = K_ / 32;
    if (xs.empty() || xs.back() != K_ || K_ % 32 != 0 || w.NumberOfElement() != count * blocks * Bits * 64 ||
        s.NumberOfElement() != count * blocks * 16) {
      ORT_CXX_API_THROW(Bits == 4   ? "MatMulQ4: expected x [..., K], w [ceil(N/16), K/32, 256] and scales "
                                      "[ceil(N/16), K/32, 16] with K a multiple of 32"
                        : Bits == 6 ? "MatMulQ6: expected x [..., K], w [ceil(N/16), K/32, 384] and scales "
                                      "[ceil(N/16), K/32, 16] with K a multiple of 32"
                                    : "MatMulQ8: expected x [..., K], w [ceil(N/16), K/32, 512] and scales "
                                      "[ceil(N/16), K/32, 16] with K a multiple of 32", ORT_INVALID_ARGUMENT);
    }
    std::vector<int64_t> out_shape(xs.begin(), xs.end());
    out_shape.back() = N_;
    float* out = y.Allocate(out_shape);
    const int64_t M = x.NumberOfElement() / K_;
    if (M == 0 || N_ == 0) return;
    Job job{panels::Weight(weights_, 0, w), panels::Weight(weights_, 1, s), out, M, N_, count, x.Data(), {}};
    Ort::KernelContext ctx(context);
    panels::Scratch scratch(ctx);
    job.x.Reset(M, K_, scratch);
    if (M == 1) {
      QuantizeTask(&job, 0);
      ctx.ParallelFor(OneTokenTask<Bits>, static_cast<size_t>((count + kPanels - 1) / kPanels), 0, &job);
    } else {
      ctx.ParallelFor(QuantizeTask, static_cast<size_t>(M), 0, &job);
      ctx.ParallelFor(TokensTask<Bits>, static_cast<size_t>(count), 0, &job);
    }
  }

  int64_t K_, N_;
  std::vector<std::unique_ptr<panels::HugeCopy>> weights_;  // w and s, copied onto huge pages
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* NewMatMulQ4() {
  return Ort::Custom::CreateLiteCustomOp<MatMulQ<4>>("MatMulQ4", "CPUExecutionProvider");
}

Ort::Custom::OrtLiteCustomOp* NewMatMulQ6() {
  return Ort::Custom::CreateLiteCustomOp<MatMulQ<6>>("MatMulQ6", "CPUExecutionProvider");
}

Ort::Custom::OrtLiteCustomOp* NewMatMulQ8() {
  return Ort::Custom::CreateLiteCustomOp<MatMulQ<8>>("MatMulQ8", "CPUExecutionProvider");
}
