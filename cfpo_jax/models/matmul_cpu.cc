// A bfloat16 matmul for XLA:CPU, called through jax.ffi (cfpo_jax/models/cpu_kernel.py builds it):
// `transformer.dense`'s bfloat16 projections when the sampler asks for the "native" matmul.
//
//   a [M, K] bf16, b [K, N] bf16 -> out [M, N] bf16: float32 sums of the (exact) products, rounded
//   to nearest even once at the end — what XLA's bfloat16 dot with float32 accumulation followed
//   by a convert computes, summed in another order.
//
// Why: XLA:CPU's dot ran the decode step's shapes (32 rows x 576 x 1536, SmolLM2) at ~45 % of the
// box's bfloat16 peak (benchmarks/README.md, "A C++ bfloat16 matmul for the sampler"). Here each
// panel of 48 columns of b is interleaved once into k-pairs — the layout AVX-512 BF16's
// dot-product instruction (vdpbf16ps) reads — in a per-task buffer, then every block of 8 rows
// runs over the panel from cache with 8 x 3 float32 accumulators in registers.
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
// Columns [n0, n0 + width) of b as k-pairs: packed[p][c][2] = (b[2p][n0 + c], b[2p + 1][n0 + c]),
// zero past width and past K.
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
      const int64_t left = std::clamp<int64_t>(width - 16 * j, 0, 16);
      const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1);
      const __m256i lo = _mm256_maskz_loadu_epi16(mask, even + 16 * j);
      const __m256i hi = k + 1 < s.K ? _mm256_maskz_loadu_epi16(mask, odd + 16 * j) : zero;
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      _mm512_store_si512(packed + k * kPanel + 32 * j, _mm512_permutexvar_epi16(order, both));
    }
  }
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

// out[m0 : m0 + R, n0 : n0 + width] from the packed panel. Meanwhile the rows of the task's next
// panel (`next`: its first column in b, or null) are prefetched into L2, two k per step: packing
// waits on memory (strided rows) as long as the compute takes, and this overlaps the two
// (benchmarks/README.md).
template <int64_t R>
void RowBlock(const uint16_t* a, const uint16_t* packed, const Shape& s, int64_t m0, int64_t n0, int64_t width,
              const uint16_t* next, uint16_t* out) {
  __m512 acc[R][kVectors];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < kVectors; ++j) acc[r][j] = _mm512_setzero_ps();
  const uint16_t* rows = a + m0 * s.K;
  for (int64_t k = 0; k < s.K; k += 2) {
    __m512bh panel[kVectors];
    for (int64_t j = 0; j < kVectors; ++j)
      panel[j] = (__m512bh)_mm512_load_si512(packed + k * kPanel + 32 * j);
    if (next != nullptr)
      for (int64_t row = k; row < std::min(k + 2, s.K); ++row) {
        const char* line = reinterpret_cast<const char*>(next + row * s.N);
        _mm_prefetch(line, _MM_HINT_T1);
        _mm_prefetch(line + 64, _MM_HINT_T1);
        _mm_prefetch(line + 2 * kPanel - 1, _MM_HINT_T1);  // the panel's last byte (a third line when unaligned)
      }
    for (int64_t r = 0; r < R; ++r) {
      // (a[r][k], a[r][k + 1]) as one 32-bit lane; a lone last k pairs with zero (no read past K).
      uint32_t pair = rows[r * s.K + k];
      if (k + 1 < s.K) pair |= static_cast<uint32_t>(rows[r * s.K + k + 1]) << 16;
      const __m512bh broadcast = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair));
      for (int64_t j = 0; j < kVectors; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], broadcast, panel[j]);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < kVectors; ++j) {
      const int64_t left = std::clamp<int64_t>(width - 16 * j, 0, 16);
      _mm256_mask_storeu_epi16(out + (m0 + r) * s.N + n0 + 16 * j, static_cast<__mmask16>((1u << left) - 1),
                               RoundToBf16(acc[r][j]));
    }
}

void RunItems(const uint16_t* a, const uint16_t* b, const Shape& s, uint16_t* out, int64_t begin, int64_t end) {
  const int64_t panels = (s.N + kPanel - 1) / kPanel;
  std::vector<uint16_t> storage((s.K + 1) / 2 * 2 * kPanel + 32);
  // 64-byte aligned start for the aligned panel loads.
  uint16_t* packed = storage.data() + ((64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64) / 2;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t m_begin = item / panels * kRowChunk, n0 = item % panels * kPanel;
    const int64_t m_end = std::min(s.M, m_begin + kRowChunk), width = std::min(kPanel, s.N - n0);
    const uint16_t* next = item + 1 < end ? b + (item + 1) % panels * kPanel : nullptr;
    PackPanel(b, s, n0, width, packed);
    int64_t m = m_begin;
    for (; m + kRows <= m_end; m += kRows) RowBlock<kRows>(a, packed, s, m, n0, width, next, out);
    switch (m_end - m) {
      case 7: RowBlock<7>(a, packed, s, m, n0, width, next, out); break;
      case 6: RowBlock<6>(a, packed, s, m, n0, width, next, out); break;
      case 5: RowBlock<5>(a, packed, s, m, n0, width, next, out); break;
      case 4: RowBlock<4>(a, packed, s, m, n0, width, next, out); break;
      case 3: RowBlock<3>(a, packed, s, m, n0, width, next, out); break;
      case 2: RowBlock<2>(a, packed, s, m, n0, width, next, out); break;
      case 1: RowBlock<1>(a, packed, s, m, n0, width, next, out); break;
      default: break;
    }
  }
}
#else
// Without AVX-512 BF16: the same float32 sums, one output row at a time (the compiler vectorizes
// over n). cpu_kernel.py's "auto" does not pick this build (XLA's dot is faster).
void RunItems(const uint16_t* a, const uint16_t* b, const Shape& s, uint16_t* out, int64_t begin, int64_t end) {
  const int64_t panels = (s.N + kPanel - 1) / kPanel;
  std::vector<float> acc(kPanel);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t m_begin = item / panels * kRowChunk, n0 = item % panels * kPanel;
    const int64_t m_end = std::min(s.M, m_begin + kRowChunk), width = std::min(kPanel, s.N - n0);
    for (int64_t m = m_begin; m < m_end; ++m) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < s.K; ++k) {
        const float x = Bf16ToF32(a[m * s.K + k]);
        for (int64_t c = 0; c < width; ++c) acc[c] += x * Bf16ToF32(b[k * s.N + n0 + c]);
      }
      for (int64_t c = 0; c < width; ++c) out[m * s.N + n0 + c] = F32ToBf16(acc[c]);
    }
  }
}
#endif

ffi::Future Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                   ffi::Result<ffi::Buffer<ffi::BF16>> out) {
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[1] != bd[0] || od.size() != 2 || od[0] != ad[0] || od[1] != bd[1]) {
    ffi::Promise failed;
    ffi::Future future(failed);
    failed.SetError(ffi::Error::InvalidArgument("matmul: needs a [M, K], b [K, N] -> out [M, N], all bfloat16"));
    return future;
  }
  const Shape s{ad[0], ad[1], bd[1]};
  const int64_t items = (s.M + kRowChunk - 1) / kRowChunk * ((s.N + kPanel - 1) / kPanel);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), items));
  ffi::CountDownPromise done(tasks);
  ffi::Future future(done);
  const auto* ap = reinterpret_cast<const uint16_t*>(a.typed_data());
  const auto* bp = reinterpret_cast<const uint16_t*>(b.typed_data());
  auto* op = reinterpret_cast<uint16_t*>(out->typed_data());
  auto run = [=](int64_t task) mutable {
    RunItems(ap, bp, s, op, items * task / tasks, items * (task + 1) / tasks);
    done.CountDown();
  };
  for (int64_t task = 1; task < tasks; ++task) pool.Schedule([run, task]() mutable { run(task); });
  run(0);  // the calling thread takes the first range
  return future;
}

}  // namespace

// Whether this build has the AVX-512 BF16 path (what "auto" asks before picking the kernel).
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
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
