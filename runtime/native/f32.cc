// Float32 linear layers of a decode step: ONNX Runtime custom ops MatMulF32 and LinearF32, domain
// ai.dscompile. lowering/native_f32.py writes them into the decode graphs of engines exported with
// --native-kernels and float32 weights; the prefill graph keeps ONNX Runtime's MatMul and Gemm, which
// read the same weights (floats.h: no copy is made).
//
//   MatMulF32: x [..., K] float32, w [K, N] float32 (torch's linear, its weight folded transposed)
//   LinearF32: x [..., K] float32, w [N, K] float32 (Gemm with transB=1, no bias, alpha 1)
//   -> y [..., N] float32
//
// A decode step multiplies a few token rows by each weight once, so its time is the weights' bytes over
// the read bandwidth. MatMulF32 splits w's K rows into up to kParts contiguous parts, each swept front to
// back into its own partial y, then sums the parts (a few times N floats, against K times N read);
// LinearF32 computes tasks of kRows output rows, floats::kStreams weight rows at a time. Both run on ONNX
// Runtime's intra-op thread pool.
#include "floats.h"
#include "native.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace {

constexpr int64_t kParts = 8;      // MatMulF32: parts of K at most,
constexpr int64_t kPartRows = 128;  // each of this many rows at least
constexpr int64_t kSumWidth = 1024;  // MatMulF32: columns per task of the parts' sum
constexpr int64_t kRows = 16;       // LinearF32: output rows per task

// Op `op`'s x [..., K] against w ([K, N], or [N, K] with `rows`), y allocated as [..., N]: M (x's rows), K, N
// and y's data, which is nullptr where nothing is left to compute (no rows or outputs; K = 0: y set to 0).
struct Product {
  int64_t M, K, N;
  float* y;
};

Product Prepare(const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<float>& w, Ort::Custom::Tensor<float>& y,
                bool rows, const std::string& op) {
  const auto xs = x.Shape(), ws = w.Shape();
  const std::string layout = rows ? "w [N, K]" : "w [K, N]";
  if (ws.size() != 2) ORT_CXX_API_THROW(op + ": expected " + layout, ORT_INVALID_ARGUMENT);
  if (xs.empty() || xs.back() != ws[rows ? 1 : 0]) {
    ORT_CXX_API_THROW(op + ": expected x [..., K] and " + layout, ORT_INVALID_ARGUMENT);
  }
  Product p{1, xs.back(), ws[rows ? 0 : 1], nullptr};
  std::vector<int64_t> shape(xs.begin(), xs.end());
  shape.back() = p.N;
  float* out = y.Allocate(shape);
  for (size_t i = 0; i + 1 < xs.size(); ++i) p.M *= xs[i];
  if (p.M == 0 || p.N == 0) return p;
  if (p.K == 0) {
    std::fill(out, out + p.M * p.N, 0.0f);
    return p;
  }
  p.y = out;
  return p;
}

struct ColumnsJob {
  const float *x, *w;
  int64_t M, K, N, parts;
  float *partial, *y;
  int64_t Begin(int64_t p) const { return (K * p / parts + 7) / 8 * 8; }  // part p's first row, a multiple of 8
};

void ColumnsPart(void* data, size_t index) {
  const ColumnsJob& j = *static_cast<const ColumnsJob*>(data);
  const int64_t p = static_cast<int64_t>(index), end = p + 1 == j.parts ? j.K : j.Begin(p + 1);
  float* out = j.parts == 1 ? j.y : j.partial + p * j.M * j.N;
  floats::Columns(j.w, j.K, j.N, j.Begin(p), end, j.x, j.M, out);
}

void SumParts(void* data, size_t index) {
  const ColumnsJob& j = *static_cast<const ColumnsJob*>(data);
  const int64_t n0 = static_cast<int64_t>(index) * kSumWidth, n1 = std::min(n0 + kSumWidth, j.N);
  const int64_t stride = j.M * j.N;
  for (int64_t m = 0; m < j.M; ++m) {
    const float* first = j.partial + m * j.N;
    float* y = j.y + m * j.N;
    for (int64_t n = n0; n < n1; ++n) {
      float s = first[n];
      for (int64_t p = 1; p < j.parts; ++p) s += first[p * stride + n];
      y[n] = s;
    }
  }
}

struct MatMulF32 {
  MatMulF32(const OrtApi*, const OrtKernelInfo*) {}

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<float>& w,
               Ort::Custom::Tensor<float>& y) {
    const Product p = Prepare(x, w, y, false, "MatMulF32");
    if (p.y == nullptr) return;
    // Each calling thread's parts: kept between calls (a decode step runs the op tens of times).
    static thread_local std::vector<float> partial;
    ColumnsJob job{x.Data(), w.Data(), p.M, p.K, p.N, std::clamp<int64_t>(p.K / kPartRows, 1, kParts), nullptr, p.y};
    if (job.parts > 1) {
      partial.resize(job.parts * p.M * p.N);
      job.partial = partial.data();
    }
    Ort::KernelContext ctx(context);
    ctx.ParallelFor(ColumnsPart, static_cast<size_t>(job.parts), 0, &job);
    if (job.parts > 1) ctx.ParallelFor(SumParts, static_cast<size_t>((p.N + kSumWidth - 1) / kSumWidth), 0, &job);
  }
};

struct RowsJob {
  const float *x, *w;
  int64_t M, K, N;
  float* y;
};

void RowsTask(void* data, size_t index) {
  const RowsJob& j = *static_cast<const RowsJob*>(data);
  const int64_t n0 = static_cast<int64_t>(index) * kRows;
  floats::Rows(j.w, j.K, n0, std::min(n0 + kRows, j.N), j.x, j.K, j.M, j.y, j.N);
}

struct LinearF32 {
  LinearF32(const OrtApi*, const OrtKernelInfo*) {}

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<float>& w,
               Ort::Custom::Tensor<float>& y) {
    const Product p = Prepare(x, w, y, true, "LinearF32");
    if (p.y == nullptr) return;
    RowsJob job{x.Data(), w.Data(), p.M, p.K, p.N, p.y};
    Ort::KernelContext(context).ParallelFor(RowsTask, static_cast<size_t>((p.N + kRows - 1) / kRows), 0, &job);
  }
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* NewMatMulF32() {
  return Ort::Custom::CreateLiteCustomOp<MatMulF32>("MatMulF32", "CPUExecutionProvider");
}

Ort::Custom::OrtLiteCustomOp* NewLinearF32() {
  return Ort::Custom::CreateLiteCustomOp<LinearF32>("LinearF32", "CPUExecutionProvider");
}
