// Per-head int8 matmul for MLA's absorbed W_UK / W_UV, as an ONNX Runtime custom op (dsc.bench domain).
// Measured by benchmarks/heads_kernel.py against the float32 batched MatMul the engines run now; not
// used by any engine. x [B, H, S, K] float32, w [H, N, K] int8, s [H, N, K/32] float32 (one scale per
// 32 values along K) -> y [B, H, S, N]: y[b,h,s,n] = sum_k x[b,h,s,k] * w[h,n,k] * s[h,n,k/32].
// One token: each row's int8 blocks are widened and multiplied against x directly; several tokens:
// each row is dequantized once into a float buffer and dotted with every token. Tasks of kRows
// output rows run on ONNX Runtime's intra-op thread pool (KernelContext::ParallelFor).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>
#include <immintrin.h>
#include <cstdint>
#include <memory>

struct Job { const float* x; const int8_t* w; const float* s; float* y; int64_t B, H, S, K, N; };
static constexpr int64_t kRows = 64;  // output rows per task

static void Task(void* p, size_t i) {
  const Job& j = *static_cast<const Job*>(p);
  const int64_t per_head = j.N / kRows, h = i / per_head, n0 = (i % per_head) * kRows, KB = j.K / 32, T = j.B * j.S;
  alignas(64) float wf[4096];  // K <= 4096 (checked by the caller)
  for (int64_t n = n0; n < n0 + kRows; ++n) {
    const int8_t* wr = j.w + (h * j.N + n) * j.K; const float* sr = j.s + (h * j.N + n) * KB;
    if (T == 1) {
      const float* xr = j.x + h * j.K;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t kb = 0; kb < KB; ++kb) {
        __m128i lo = _mm_loadu_si128((const __m128i*)(wr + kb * 32));
        __m128i hi = _mm_loadu_si128((const __m128i*)(wr + kb * 32 + 16));
        __m512 q = _mm512_mul_ps(_mm512_loadu_ps(xr + kb * 32), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)));
        q = _mm512_fmadd_ps(_mm512_loadu_ps(xr + kb * 32 + 16), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), q);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(sr[kb]), q, acc);
      }
      j.y[h * j.N + n] = _mm512_reduce_add_ps(acc);
      continue;
    }
    for (int64_t kb = 0; kb < KB; ++kb) {
      __m512 sc = _mm512_set1_ps(sr[kb]);
      for (int half = 0; half < 2; ++half) {
        __m128i q = _mm_loadu_si128((const __m128i*)(wr + kb * 32 + 16 * half));
        _mm512_store_ps(wf + kb * 32 + 16 * half, _mm512_mul_ps(sc, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))));
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      const int64_t b = t / j.S, s = t % j.S;
      const float* xr = j.x + ((b * j.H + h) * j.S + s) * j.K;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (int64_t k = 0; k < j.K; k += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k), _mm512_load_ps(wf + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k + 16), _mm512_load_ps(wf + k + 16), a1);
      }
      j.y[((b * j.H + h) * j.S + s) * j.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
  }
}

// x [B, H, S, K] float, w [H, N, K] int8, s [H, N, K/32] float -> y [B, H, S, N]
static void HeadsQ8(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<int8_t>& w,
                    const Ort::Custom::Tensor<float>& sc, Ort::Custom::Tensor<float>& y) {
  auto xs = x.Shape(); auto ws = w.Shape();
  if (xs.size() != 4 || ws.size() != 3 || ws[0] != xs[1] || ws[2] != xs[3] || xs[3] % 32 || xs[3] > 4096 ||
      ws[1] % kRows || sc.NumberOfElement() != ws[0] * ws[1] * (ws[2] / 32))
    ORT_CXX_API_THROW("HeadsMatMulQ8: expected x [B, H, S, K], w [H, N, K], s [H, N, K/32] with K a multiple "
                      "of 32 up to 4096 and N a multiple of 64", ORT_INVALID_ARGUMENT);
  Job j{x.Data(), w.Data(), sc.Data(), nullptr, xs[0], xs[1], xs[2], xs[3], ws[1]};
  j.y = y.Allocate({j.B, j.H, j.S, j.N});
  Ort::KernelContext(ctx).ParallelFor(Task, j.H * (j.N / kRows), 0, &j);
}

// Made once per process: every session the library is registered with shares the op and its domain.
static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> g_op;
static std::unique_ptr<Ort::CustomOpDomain> g_domain;

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api) {
  Ort::InitApi(api->GetApi(ORT_API_VERSION));
  if (!g_domain) {
    g_op.reset(Ort::Custom::CreateLiteCustomOp("HeadsMatMulQ8", "CPUExecutionProvider", HeadsQ8));
    g_domain = std::make_unique<Ort::CustomOpDomain>("dsc.bench");
    g_domain->Add(g_op.get());
  }
  Ort::UnownedSessionOptions(options).Add(*g_domain);
  return nullptr;
}
