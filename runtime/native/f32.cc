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
#include <vector>

namespace {

constexpr int64_t kParts = 8;      // MatMulF32: parts of K at most,
constexpr int64_t kPartRows = 128;  // each of this many rows at least
constexpr int64_t kSumWidth = 1024;  // MatMulF32: columns per task of the parts' sum
constexpr int64_t kRows = 16;       // LinearF32: output rows per task

// Output shape: x's with the last dimension N; refuses x whose last dimension is not K.
std::vector<int64_t> OutShape(const std::vector<int64_t>& xs, int64_t K, int64_t N, const char* error) {
  if (xs.empty() || xs.back() != K) ORT_CXX_API_THROW(error, ORT_INVALID_ARGUMENT);
  std::vector<int64_t> shape(xs.begin(), xs.end());
  shape.back() = N;
  return shape;
}

// The rows of x [..., K]: the product of its leading dimensions.
int64_t Leading(const std::vector<int64_t>& xs) {
  int64_t M = 1;
  for (size_t i = 0; i + 1 < xs.size(); ++i) M *= xs[i];
  return M;
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
    const auto ws = w.Shape();
    if (ws.size() != 2) ORT_CXX_API_THROW("MatMulF32: expected w [K, N]", ORT_INVALID_ARGUMENT);
    const int64_t K = ws[0], N = ws[1];
    float* out = y.Allocate(OutShape(x.Shape(), K, N, "MatMulF32: expected x [..., K] and w [K, N]"));
    const int64_t M = Leading(x.Shape());
    if (M == 0 || N == 0) return;
    if (K == 0) return std::fill(out, out + M * N, 0.0f);
    // Each calling thread's parts: kept between calls (a decode step runs the op tens of times).
    static thread_local std::vector<float> partial;
    ColumnsJob job{x.Data(), w.Data(), M, K, N, std::clamp<int64_t>(K / kPartRows, 1, kParts), nullptr, out};
    if (job.parts > 1) {
      partial.resize(job.parts * M * N);
      job.partial = partial.data();
    }
    Ort::KernelContext ctx(context);
    ctx.ParallelFor(ColumnsPart, static_cast<size_t>(job.parts), 0, &job);
    if (job.parts > 1) ctx.ParallelFor(SumParts, static_cast<size_t>((N + kSumWidth - 1) / kSumWidth), 0, &job);
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
    const auto ws = w.Shape();
    if (ws.size() != 2) ORT_CXX_API_THROW("LinearF32: expected w [N, K]", ORT_INVALID_ARGUMENT);
    const int64_t N = ws[0], K = ws[1];
    float* out = y.Allocate(OutShape(x.Shape(), K, N, "LinearF32: expected x [..., K] and w [N, K]"));
    const int64_t M = Leading(x.Shape());
    if (M == 0 || N == 0) return;
    if (K == 0) return std::fill(out, out + M * N, 0.0f);
    RowsJob job{x.Data(), w.Data(), M, K, N, out};
    Ort::KernelContext(context).ParallelFor(RowsTask, static_cast<size_t>((N + kRows - 1) / kRows), 0, &job);
  }
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* NewMatMulF32() {
  return Ort::Custom::CreateLiteCustomOp<MatMulF32>("MatMulF32", "CPUExecutionProvider");
}

Ort::Custom::OrtLiteCustomOp* NewLinearF32() {
  return Ort::Custom::CreateLiteCustomOp<LinearF32>("LinearF32", "CPUExecutionProvider");
}
