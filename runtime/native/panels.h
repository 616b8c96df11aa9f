// The panel primitives the int4 and int8 linear layers (matmul.cc) and routed experts (moe.cc) share.
// Weights of an [N, K] matrix: panels of 16 output rows, ceil(N/16) of them, each [K/32 blocks]
// [Bits * 64 bytes] with float16 scales [K/32][16]; matmul.cc's header gives the byte layout.
// Activations: int8 per block of 32 (Quantize).
#pragma once

#include "native.h"

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace panels {

// A constant weight copied, at session creation, into memory of its own on transparent huge pages
// (madvise MADV_HUGEPAGE; Linux gives them where THP is "always" or "madvise"). A weight matrix is read
// from end to end every step, and on 4 KB pages the TLB misses slow streaming reads: measured, one
// thread summing 512 MB, 16.4 GB/s on 4 KB pages against 25.5 on huge pages; the int4 panel kernel,
// 2 threads, 20 matrices of 12.6 MB, 8.6-9.4 against 10.2-12.6 ms. ONNX Runtime maps external
// initializers from the weights file privately on 4 KB pages, where MADV_COLLAPSE is refused; after the
// copy its pages are handed back (MADV_PAGEOUT: clean file pages are dropped, contents unchanged), so
// the weights stay resident once.
class HugeCopy {
 public:
  HugeCopy(const void* source, size_t bytes) : bytes_(bytes) {
    constexpr size_t kHuge = size_t{2} << 20;
    size_ = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      size_ = 0;
      return;
    }
    madvise(p, size_, MADV_HUGEPAGE);
    std::memcpy(p, source, bytes);
    data_ = p;
    constexpr uintptr_t kPage = 4096;
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(source) + kPage - 1) & ~(kPage - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(source) + bytes) & ~(kPage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, 21 /* MADV_PAGEOUT, Linux 5.4+ */);
  }
  HugeCopy(const HugeCopy&) = delete;
  HugeCopy& operator=(const HugeCopy&) = delete;
  ~HugeCopy() {
    if (data_ != nullptr) munmap(data_, size_);
  }

  // The copy, or `fallback` (the input as ONNX Runtime gives it) where none was made or it differs in size.
  template <typename T>
  const T* Or(const T* fallback, size_t bytes) const {
    return data_ != nullptr && bytes == bytes_ ? static_cast<const T*>(data_) : fallback;
  }

 private:
  void* data_ = nullptr;
  size_t bytes_, size_ = 0;
};

// Input i's weights as a kernel reads them: its HugeCopy where one was made (CopyWeights), else `given`.
template <typename T>
const T* Weight(const std::vector<std::unique_ptr<HugeCopy>>& copies, size_t i, const T* given, size_t bytes) {
  return copies[i] ? copies[i]->Or(given, bytes) : given;
}

// Input i's panels or float16 scales, as Weight (the scales read as their uint16_t bits).
inline const uint8_t* Weight(const std::vector<std::unique_ptr<HugeCopy>>& copies, size_t i,
                             const Ort::Custom::Tensor<uint8_t>& t) {
  return Weight(copies, i, t.Data(), t.NumberOfElement());
}
inline const uint16_t* Weight(const std::vector<std::unique_ptr<HugeCopy>>& copies, size_t i,
                              const Ort::Custom::Tensor<Ort::Float16_t>& t) {
  return Weight(copies, i, reinterpret_cast<const uint16_t*>(t.Data()), 2 * t.NumberOfElement());
}

// Whether panels p and scales s hold `count` [N, K] matrices of Bits-bit weights (K a multiple of 32).
template <int Bits>
bool Holds(const Ort::Custom::Tensor<uint8_t>& p, const Ort::Custom::Tensor<Ort::Float16_t>& s, int64_t count,
           int64_t N, int64_t K) {
  const int64_t blocks = count * ((N + 15) / 16) * (K / 32);
  return K % 32 == 0 && p.NumberOfElement() == blocks * Bits * 64 && s.NumberOfElement() == blocks * 16;
}

// HugeCopy of each of a kernel's inputs `first` .. `last` that is a constant initializer (its weights;
// nullptr for the others), made at session creation.
inline std::vector<std::unique_ptr<HugeCopy>> CopyWeights(const OrtKernelInfo* info, size_t first, size_t last) {
  Ort::ConstKernelInfo k(info);
  std::vector<std::unique_ptr<HugeCopy>> copies;
  for (size_t i = first; i <= last; ++i) {
    int constant = 0;
    Ort::ConstValue value = k.GetTensorConstantInput(i, &constant);
    if (!constant || !value) {
      copies.emplace_back();
      continue;
    }
    const auto info_shape = value.GetTensorTypeAndShapeInfo();
    const size_t element = info_shape.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? 2 : 1;
    copies.emplace_back(std::make_unique<HugeCopy>(value.GetTensorRawData(), info_shape.GetElementCount() * element));
  }
  return copies;
}

// One row of activations quantized per block of 32: q = round(x * 127 / max|x|) (nearest, ties to even),
// its scale max|x| / 127, and the block's sum of q (times the weights' offset, in Token).
inline void Quantize(const float* x, int64_t K, int8_t* q, float* scale, int32_t* sum) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + 32 * b), hi = _mm512_loadu_ps(x + 32 * b + 16);
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float inv = top > 0.0f ? 127.0f / top : 0.0f;
    const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
    const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b), _mm512_cvtsepi32_epi8(a));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16), _mm512_cvtsepi32_epi8(c));
    scale[b] = top / 127.0f;
    sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(a, c));
  }
}

// Quantized activation rows: row m at q + m*K, scale + m*K/32, sum + m*K/32.
struct Rows {
  const int8_t* q;
  const float* scale;
  const int32_t* sum;
  int64_t K;

  // The rows from row `first` on.
  Rows From(int64_t first) const { return Rows{q + first * K, scale + first * (K / 32), sum + first * (K / 32), K}; }
};

// Working memory of one Compute, from the session's CPU allocator (ONNX Runtime's arena, on by default),
// which keeps its blocks from run to run. From the heap, a buffer above malloc's mmap threshold is
// unmapped when freed and faulted in again, zeroed, on the next call: measured, a 128-token MoE layer of
// the bench model (15 MB of buffers) spent 7.6-10 ms of its 45 in std::vector resizes.
class Scratch {
 public:
  explicit Scratch(const Ort::KernelContext& ctx) {
    const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    const OrtMemoryInfo* info = cpu;
    allocator_ = ctx.GetAllocator(*info);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    for (void* p : blocks_) allocator_->Free(allocator_, p);
    Ort::GetApi().ReleaseAllocator(allocator_);
  }

  // Room for n values of T, contents undefined, held until the Scratch goes.
  template <typename T>
  T* Get(int64_t n) {
    void* p = allocator_->Alloc(allocator_, std::max<size_t>(1, static_cast<size_t>(n) * sizeof(T)));
    if (p == nullptr) ORT_CXX_API_THROW("dscompile native kernels: out of memory", ORT_FAIL);
    blocks_.push_back(p);
    return static_cast<T*>(p);
  }

 private:
  OrtAllocator* allocator_;
  std::vector<void*> blocks_;
};

// Room for `count` rows of K activations quantized (Quantize), from a Compute's Scratch; each row is
// written by one task.
class Activations {
 public:
  void Reset(int64_t count, int64_t K, Scratch& scratch) {
    K_ = K;
    q_ = scratch.Get<int8_t>(count * K), scale_ = scratch.Get<float>(count * K / 32);
    sum_ = scratch.Get<int32_t>(count * K / 32);
  }
  // Row m quantized from x [K].
  void Quantize(const float* x, int64_t m) {
    panels::Quantize(x, K_, q_ + m * K_, scale_ + m * (K_ / 32), sum_ + m * (K_ / 32));
  }
  Rows rows() const { return Rows{q_, scale_, sum_, K_}; }

 private:
  int64_t K_ = 0;
  int8_t* q_ = nullptr;
  float* scale_ = nullptr;
  int32_t* sum_ = nullptr;
};

// One block of one row against the panel's unpacked block v[0..7] (weights + zero, unsigned):
// acc + (dots - zero * sum) * s * xs.
inline __m512 Token(const __m512i v[8], const int8_t* xq, float xs, int32_t zero_sum, __m512 s, __m512 acc) {
  const int32_t* x4 = reinterpret_cast<const int32_t*>(xq);
  __m512i d = _mm512_set1_epi32(-zero_sum);
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

// Non-temporal prefetch distance, in blocks, of a panel read once (Panel's `once`: a decode step's weights).
// Prefetched with the NTA hint, the weights a step streams (hundreds of MB) pass through the caches without
// evicting what the rest of the step uses: the small ops' tensors, ONNX Runtime's and the interpreter's
// code and data. Measured on the int4 bench engine, decode at context 128, 2 cores, processes alternated
// over 6 rounds: 6.1-9.6 ms a step against 7.1-10.0 without (faster in every round; median 8.9 against
// 9.5), and the time outside ONNX Runtime's run 0.46 against 0.56 ms (median).
constexpr int64_t kAhead = 16;

// Panel p (of N rows) of weights w, scales s against activation rows m0 .. m0+3 (fewer where count
// ends first: the last one is repeated, stored once): y[m][16p .. 16p+15] for row m at y + m*ldy; `once`:
// the panel is read once (no other rows), and streamed with non-temporal prefetches kAhead blocks ahead
// (a prefetch past the weights' end is harmless: prefetches do not fault).
// Bits 4: a block's 8 vectors are the low and high nibbles of 4 chunks of 64 bytes (zero 8); bits 6:
// those 4 chunks hold the low 4 bits, and 2 more chunks the top 2 bits, V_j's at bits 2(j%4) of chunk
// 4 + j/4 (zero 32); bits 8: 8 chunks of 64 bytes as they are (zero 128).
template <int Bits>
inline void Panel(const uint8_t* w, const uint16_t* s, int64_t N, int64_t p, const Rows& x, int64_t m0,
                  int64_t count, float* y, int64_t ldy, bool once) {
  static_assert(Bits == 4 || Bits == 6 || Bits == 8, "int4, int6 or int8 panels");
  constexpr int64_t kBlock = Bits * 64;  // bytes per block of a panel
  constexpr int32_t kZero = 1 << (Bits - 1);
  const int64_t blocks = x.K / 32, last = std::min<int64_t>(4, count - m0);
  const __m512i low = _mm512_set1_epi8(0x0F);
  w += p * blocks * kBlock;
  s += p * blocks * 16;
  int64_t m[4];
  for (int64_t i = 0; i < 4; ++i) m[i] = m0 + std::min(i, last - 1);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    if (once) {
      for (int i = 0; i < Bits; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + kBlock * (b + kAhead) + 64 * i), _MM_HINT_NTA);
    }
    __m512i v[8];
    if constexpr (Bits == 4 || Bits == 6) {
      for (int c = 0; c < 4; ++c) {
        const __m512i chunk = _mm512_loadu_si512(w + kBlock * b + 64 * c);
        v[c] = _mm512_and_si512(chunk, low);
        v[c + 4] = _mm512_and_si512(_mm512_srli_epi16(chunk, 4), low);
      }
      if constexpr (Bits == 6) {  // top 2 bits of V_j to bits 4-5 of its bytes (shifts of 16-bit lanes, masked)
        const __m512i top = _mm512_set1_epi8(0x30);
        for (int h = 0; h < 2; ++h) {  // v | (shifted & top): one ternary-logic op (0xF8: A | (B & C))
          const __m512i chunk = _mm512_loadu_si512(w + kBlock * b + 256 + 64 * h);
          v[4 * h] = _mm512_ternarylogic_epi32(v[4 * h], _mm512_slli_epi16(chunk, 4), top, 0xF8);
          v[4 * h + 1] = _mm512_ternarylogic_epi32(v[4 * h + 1], _mm512_slli_epi16(chunk, 2), top, 0xF8);
          v[4 * h + 2] = _mm512_ternarylogic_epi32(v[4 * h + 2], chunk, top, 0xF8);
          v[4 * h + 3] = _mm512_ternarylogic_epi32(v[4 * h + 3], _mm512_srli_epi16(chunk, 2), top, 0xF8);
        }
      }
    } else {
      for (int c = 0; c < 8; ++c) v[c] = _mm512_loadu_si512(w + kBlock * b + 64 * c);
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16 * b)));
    const int64_t at0 = m[0] * blocks + b, at1 = m[1] * blocks + b, at2 = m[2] * blocks + b, at3 = m[3] * blocks + b;
    a0 = Token(v, x.q + m[0] * x.K + 32 * b, x.scale[at0], kZero * x.sum[at0], scale, a0);
    if (last > 1) {
      a1 = Token(v, x.q + m[1] * x.K + 32 * b, x.scale[at1], kZero * x.sum[at1], scale, a1);
      a2 = Token(v, x.q + m[2] * x.K + 32 * b, x.scale[at2], kZero * x.sum[at2], scale, a2);
      a3 = Token(v, x.q + m[3] * x.K + 32 * b, x.scale[at3], kZero * x.sum[at3], scale, a3);
    }
  }
  const int64_t rows = std::min<int64_t>(16, N - 16 * p);
  const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
  const __m512 out[4] = {a0, a1, a2, a3};
  for (int64_t i = 0; i < last; ++i) _mm512_mask_storeu_ps(y + (m0 + i) * ldy + 16 * p, keep, out[i]);
}

// Panel p against rows 0 .. count-1 of x, 4 at a time; a panel read once (4 rows or fewer) is streamed
// with non-temporal prefetches (Panel's `once`), one read for every group of rows keeps it in the caches.
template <int Bits>
inline void PanelRows(const uint8_t* w, const uint16_t* s, int64_t N, int64_t p, const Rows& x, int64_t count,
                      float* y, int64_t ldy) {
  for (int64_t m0 = 0; m0 < count; m0 += 4) Panel<Bits>(w, s, N, p, x, m0, count, y, ldy, count <= 4);
}

}  // namespace panels
