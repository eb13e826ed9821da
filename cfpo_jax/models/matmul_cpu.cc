// A float32 / bfloat16 matmul for XLA:CPU, called through jax.ffi (cfpo_jax/models/cpu_kernel.py
// builds it): `transformer.dense`'s projections when the sampler asks for the "native" matmul.
//
//   a [M, K], b [K, N] -> out [M, N], all float32 or all bfloat16: float32 sums of the products
//   (exact for bfloat16 operands), for bfloat16 rounded to nearest even once at the end — what
//   XLA's dot computes (for bfloat16: with float32 accumulation, then a convert), summed in
//   another order.
//
// Why: XLA:CPU's dot ran the decode step's shapes (32 rows x 576 x 1536, SmolLM2) at ~45 % of the
// box's bfloat16 peak (benchmarks/README.md, "A C++ matmul for the sampler"). Here each panel of
// 48 columns of b is packed once into a per-task buffer — bfloat16 interleaved into k-pairs, the
// layout AVX-512 BF16's dot-product instruction (vdpbf16ps) reads — then every block of 8 rows runs
// over the panel from cache with 8 x 3 float32 accumulators in registers.
//
// Work: (chunk of up to 256 rows, panel) items, split into contiguous ranges over XLA's intra-op
// thread pool. Each output element's sum runs over k in the same order whatever M and the
// split, so a row gives the same bits alone as in its batch.

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define CFPO_MATMUL_AVX512_BF16 1
#include <immintrin.h>
#endif

#include "bfloat16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kVectors = 3;                 // 16-column vectors per panel
constexpr int64_t kPanel = 16 * kVectors;       // columns per panel
constexpr int64_t kRows = 8;                    // rows per register block
constexpr int64_t kRowChunk = 256;              // rows per work item (one panel packing per item)

struct Shape {
  int64_t M, K, N;
};

#ifdef CFPO_MATMUL_AVX512_BF16
// Rows of b per packed step: bfloat16 packs k-pairs (what vdpbf16ps reads), float32 single k.
template <typename T>
constexpr int64_t kStep = sizeof(T) == 2 ? 2 : 1;

// The lanes of the panel's vector j that hold columns (of `width`).
inline __mmask16 Lanes(int64_t width, int64_t j) {
  return static_cast<__mmask16>((1u << std::clamp<int64_t>(width - 16 * j, 0, 16)) - 1);
}

// Columns [n0, n0 + width) of b, zero past width and past K, as packed[k / step][c][step]:
// bfloat16 as k-pairs (b[2p][n0 + c], b[2p + 1][n0 + c]), float32 as b[k][n0 + c]. Either way
// 192 bytes per step (a multiple of the 64-byte lines the loads are aligned to).
void PackPanel(const uint16_t* b, const Shape& s, int64_t n0, int64_t width, uint16_t* packed) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                       21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                       11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(kInterleave);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t k = 0; k < s.K; k += 2) {
    const uint16_t* even = b + k * s.N + n0;
    const uint16_t* odd = even + s.N;
    for (int64_t j = 0; j < kVectors; ++j) {
      const __m256i lo = _mm256_maskz_loadu_epi16(Lanes(width, j), even + 16 * j);
      const __m256i hi = k + 1 < s.K ? _mm256_maskz_loadu_epi16(Lanes(width, j), odd + 16 * j) : zero;
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      _mm512_store_si512(packed + k * kPanel + 32 * j, _mm512_permutexvar_epi16(order, both));
    }
  }
}

void PackPanel(const float* b, const Shape& s, int64_t n0, int64_t width, float* packed) {
  for (int64_t k = 0; k < s.K; ++k)
    for (int64_t j = 0; j < kVectors; ++j)
      _mm512_store_ps(packed + k * kPanel + 16 * j, _mm512_maskz_loadu_ps(Lanes(width, j), b + k * s.N + n0 + 16 * j));
}

// The float32 lanes rounded to bfloat16 (nearest even, NaN kept NaN: F32ToBf16 on 16 lanes).
inline __m256i RoundToBf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(rounded);
}

// out[m0 : m0 + R, n0 : n0 + width] from the packed panel: per step, each row's a (a k-pair for
// bfloat16) broadcast against the panel's three vectors into R x 3 float32 accumulators. Meanwhile
// the rows of the task's next panel (`next`: its first column in b, or null) are prefetched into
// L2, one step's rows per step: packing waits on memory (strided rows) as long as the compute
// takes, and this overlaps the two (benchmarks/README.md).
template <typename T, int64_t R>
void RowBlock(const T* a, const T* packed, const Shape& s, int64_t m0, int64_t n0, int64_t width, const T* next,
              T* out) {
  constexpr int64_t step = kStep<T>, panel_bytes = kPanel * sizeof(T);
  __m512 acc[R][kVectors];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < kVectors; ++j) acc[r][j] = _mm512_setzero_ps();
  const T* rows = a + m0 * s.K;
  for (int64_t k = 0; k < s.K; k += step) {
    __m512i panel[kVectors];
    for (int64_t j = 0; j < kVectors; ++j) panel[j] = _mm512_load_si512(packed + k * kPanel + 16 * step * j);
    if (next != nullptr)
      for (int64_t row = k; row < std::min(k + step, s.K); ++row) {
        const char* line = reinterpret_cast<const char*>(next + row * s.N);
        for (int64_t byte = 0; byte < panel_bytes; byte += 64) _mm_prefetch(line + byte, _MM_HINT_T1);
        _mm_prefetch(line + panel_bytes - 1, _MM_HINT_T1);  // a last line when the row is unaligned
      }
    for (int64_t r = 0; r < R; ++r) {
      if constexpr (step == 2) {
        // (a[r][k], a[r][k + 1]) as one 32-bit lane; a lone last k pairs with zero (no read past K).
        uint32_t pair = rows[r * s.K + k];
        if (k + 1 < s.K) pair |= static_cast<uint32_t>(rows[r * s.K + k + 1]) << 16;
        const __m512bh broadcast = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair));
        for (int64_t j = 0; j < kVectors; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], broadcast, (__m512bh)panel[j]);
      } else {
        const __m512 broadcast = _mm512_set1_ps(rows[r * s.K + k]);
        for (int64_t j = 0; j < kVectors; ++j)
          acc[r][j] = _mm512_fmadd_ps(broadcast, _mm512_castsi512_ps(panel[j]), acc[r][j]);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < kVectors; ++j) {
      T* at = out + (m0 + r) * s.N + n0 + 16 * j;
      if constexpr (step == 2)
        _mm256_mask_storeu_epi16(at, Lanes(width, j), RoundToBf16(acc[r][j]));
      else
        _mm512_mask_storeu_ps(at, Lanes(width, j), acc[r][j]);
    }
}

template <typename T>
void RunItems(const T* a, const T* b, const Shape& s, T* out, int64_t begin, int64_t end) {
  const int64_t panels = (s.N + kPanel - 1) / kPanel;
  constexpr int64_t align = 64 / sizeof(T);
  std::vector<T> storage((s.K + 1) / 2 * 2 * kPanel + align);
  T* packed = storage.data() + (align - reinterpret_cast<uintptr_t>(storage.data()) % 64 / sizeof(T)) % align;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t m_begin = item / panels * kRowChunk, n0 = item % panels * kPanel;
    const int64_t m_end = std::min(s.M, m_begin + kRowChunk), width = std::min(kPanel, s.N - n0);
    const T* next = item + 1 < end ? b + (item + 1) % panels * kPanel : nullptr;
    PackPanel(b, s, n0, width, packed);
    int64_t m = m_begin;
    for (; m + kRows <= m_end; m += kRows) RowBlock<T, kRows>(a, packed, s, m, n0, width, next, out);
    switch (m_end - m) {
      case 7: RowBlock<T, 7>(a, packed, s, m, n0, width, next, out); break;
      case 6: RowBlock<T, 6>(a, packed, s, m, n0, width, next, out); break;
      case 5: RowBlock<T, 5>(a, packed, s, m, n0, width, next, out); break;
      case 4: RowBlock<T, 4>(a, packed, s, m, n0, width, next, out); break;
      case 3: RowBlock<T, 3>(a, packed, s, m, n0, width, next, out); break;
      case 2: RowBlock<T, 2>(a, packed, s, m, n0, width, next, out); break;
      case 1: RowBlock<T, 1>(a, packed, s, m, n0, width, next, out); break;
      default: break;
    }
  }
}
#else
inline float ToF32(uint16_t x) { return Bf16ToF32(x); }
inline float ToF32(float x) { return x; }
inline void Put(uint16_t* p, float x) { *p = F32ToBf16(x); }
inline void Put(float* p, float x) { *p = x; }

// Without AVX-512 BF16: the same float32 sums, one output row at a time (the compiler vectorizes
// over n). cpu_kernel.py's "auto" does not pick this build (XLA's dot is faster).
template <typename T>
void RunItems(const T* a, const T* b, const Shape& s, T* out, int64_t begin, int64_t end) {
  const int64_t panels = (s.N + kPanel - 1) / kPanel;
  std::vector<float> acc(kPanel);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t m_begin = item / panels * kRowChunk, n0 = item % panels * kPanel;
    const int64_t m_end = std::min(s.M, m_begin + kRowChunk), width = std::min(kPanel, s.N - n0);
    for (int64_t m = m_begin; m < m_end; ++m) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < s.K; ++k) {
        const float x = ToF32(a[m * s.K + k]);
        for (int64_t c = 0; c < width; ++c) acc[c] += x * ToF32(b[k * s.N + n0 + c]);
      }
      for (int64_t c = 0; c < width; ++c) Put(out + m * s.N + n0 + c, acc[c]);
    }
  }
}
#endif

template <typename T>
ffi::Future Dispatch(ffi::ThreadPool pool, const Shape& s, const void* a, const void* b, void* out) {
  const int64_t items = (s.M + kRowChunk - 1) / kRowChunk * ((s.N + kPanel - 1) / kPanel);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), items));
  ffi::CountDownPromise done(tasks);
  ffi::Future future(done);
  auto run = [=](int64_t task) mutable {
    RunItems(static_cast<const T*>(a), static_cast<const T*>(b), s, static_cast<T*>(out), items * task / tasks,
             items * (task + 1) / tasks);
    done.CountDown();
  };
  for (int64_t task = 1; task < tasks; ++task) pool.Schedule([run, task]() mutable { run(task); });
  run(0);  // the calling thread takes the first range
  return future;
}

ffi::Future Matmul(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out) {
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  const ffi::DataType type = a.element_type();
  const bool ok = ad.size() == 2 && bd.size() == 2 && ad[1] == bd[0] && od.size() == 2 && od[0] == ad[0] &&
                  od[1] == bd[1] && (type == ffi::F32 || type == ffi::BF16) && b.element_type() == type &&
                  out->element_type() == type;
  if (!ok) {
    ffi::Promise failed;
    ffi::Future future(failed);
    failed.SetError(ffi::Error::InvalidArgument(
        "matmul: needs a [M, K], b [K, N] -> out [M, N], all float32 or all bfloat16"));
    return future;
  }
  const Shape s{ad[0], ad[1], bd[1]};
  if (type == ffi::BF16) return Dispatch<uint16_t>(pool, s, a.untyped_data(), b.untyped_data(), out->untyped_data());
  return Dispatch<float>(pool, s, a.untyped_data(), b.untyped_data(), out->untyped_data());
}

}  // namespace

// Whether this build has the AVX-512 (BF16) path (what "auto" asks before picking the kernel).
extern "C" int CfpoMatmulVectorized() {
#ifdef CFPO_MATMUL_AVX512_BF16
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfpoMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
