// Decode attention for XLA:CPU, called through jax.ffi (cfpo_jax/models/cpu_kernel.py builds it).
//
// One new query per row against that row's valid cache slots [0, length[b]) only: the same sums as
// attention.py's "reduce" kernel (float32 products and sums, float32 softmax, the probabilities
// rounded to the query's dtype, float32 p·v, the output rounded to the query's dtype), without
// reading the slots past a row's length and without materializing a product. XLA:CPU's fusions of
// that kernel read every slot and ran at a third of the box's memory bandwidth
// (benchmarks/README.md, "A C++ decode attention for XLA:CPU").
//
//   q [B, N, H] (f32 or bf16), k and v [B, K, S, H] (f32 or bf16), length [B] int32
//   -> out [B, N, H] in q's dtype; query head n reads kv head n / (N / K).
//
// Work: B*K units of one (row, kv head), split into contiguous ranges over XLA's intra-op thread
// pool; each unit's result depends on that unit's inputs alone (the same bits whatever the batch).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
extern "C" __m512 _ZGVeN16v_expf(__m512);  // glibc's libmvec: expf on 16 lanes (linked with -lmvec)
#endif

#include "bfloat16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename T>
inline float Load(const T* p, int64_t i);
template <>
inline float Load<float>(const float* p, int64_t i) { return p[i]; }
template <>
inline float Load<uint16_t>(const uint16_t* p, int64_t i) { return Bf16ToF32(p[i]); }

template <typename T>
inline void Store(T* p, int64_t i, float value);
template <>
inline void Store<float>(float* p, int64_t i, float value) { p[i] = value; }
template <>
inline void Store<uint16_t>(uint16_t* p, int64_t i, float value) { p[i] = F32ToBf16(value); }

// Rounds a float32 to the query dtype and back (the reference casts its probabilities so).
template <typename Q>
inline float RoundTo(float value);
template <>
inline float RoundTo<float>(float value) { return value; }
template <>
inline float RoundTo<uint16_t>(float value) { return Bf16ToF32(F32ToBf16(value)); }

constexpr int64_t kMaxGroup = 8;  // query heads per kv head the AVX-512 score loop keeps in registers

struct Shape {
  int64_t B, N, K, S, H;
};

// The float32 dot product of a query row with a key row of `h` entries. With AVX-512: 16-lane
// fused multiply-adds and one tree sum at the end (a scalar tail for h % 16); otherwise 16
// independent lanes the compiler vectorizes, summed in order.
#ifdef __AVX512F__
inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 Load16(const uint16_t* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif

template <typename C>
inline float Dot(const float* query, const C* key, int64_t h) {
  int64_t i = 0;
  float total = 0.0f;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= h; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(query + i), Load16(key + i), acc);
  total = _mm512_reduce_add_ps(acc);
#else
  float lanes[16] = {0};
  for (; i + 16 <= h; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += query[i + j] * Load(key, i + j);
  for (int j = 0; j < 16; ++j) total += lanes[j];
#endif
  for (; i < h; ++i) total += query[i] * Load(key, i);
  return total;
}

// acc[0, h) += Σ_s p[s] · value_s[0, h) over `valid` value rows `stride` apart. kH: h when known at
// compile time (the accumulator then stays in registers: 4 AVX-512 vectors for 64), else 0.
template <int64_t kH, typename C>
inline void WeightedSum(const float* p, const C* values, int64_t valid, int64_t h, float* acc) {
  if constexpr (kH > 0) {
    float local[kH] = {0};
    for (int64_t s = 0; s < valid; ++s)
      for (int64_t i = 0; i < kH; ++i) local[i] += p[s] * Load(values + s * kH, i);
    for (int64_t i = 0; i < kH; ++i) acc[i] = local[i];
  } else {
    std::fill(acc, acc + h, 0.0f);
    for (int64_t s = 0; s < valid; ++s)
      for (int64_t i = 0; i < h; ++i) acc[i] += p[s] * Load(values + s * h, i);
  }
}

// Units [begin, end) of (row, kv head).
template <int64_t kH, typename Q, typename C>
void RunUnits(const Shape& shape, const Q* q, const C* k, const C* v, const int32_t* length, Q* out,
              int64_t begin, int64_t end) {
  const int64_t G = shape.N / shape.K, S = shape.S, H = shape.H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  std::vector<float> scores(G * S), query(G * H), acc(G * H);
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / shape.K, kv = unit % shape.K;
    const int64_t valid = std::min<int64_t>(std::max<int32_t>(length[b], 0), S);
    const int64_t q_offset = (b * shape.N + kv * G) * H;  // query heads kv*G .. kv*G+G-1
    for (int64_t i = 0; i < G * H; ++i) query[i] = Load(q, q_offset + i);
    const C* k_unit = k + (b * shape.K + kv) * S * H;
    const C* v_unit = v + (b * shape.K + kv) * S * H;
    // Scores, slot by slot: each key row is read from memory once for all G query heads.
#ifdef __AVX512F__
    if (H % 16 == 0 && G <= kMaxGroup) {
      constexpr int64_t kAhead = 16;  // slots ahead; with the hardware prefetcher alone the loop read ~14 GB/s
      const int64_t row_bytes = H * static_cast<int64_t>(sizeof(C));
      for (int64_t s = 0; s < valid; ++s) {
        // The key row kAhead slots on, and this slot's value row for the p·v pass below.
        for (int64_t byte = 0; byte < row_bytes; byte += 64) {
          if (s + kAhead < valid)
            _mm_prefetch(reinterpret_cast<const char*>(k_unit + (s + kAhead) * H) + byte, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(v_unit + s * H) + byte, _MM_HINT_T1);
        }
        __m512 acc[kMaxGroup];
        for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
        for (int64_t i = 0; i < H; i += 16) {
          const __m512 key = Load16(k_unit + s * H + i);
          for (int64_t g = 0; g < G; ++g)
            acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(query.data() + g * H + i), key, acc[g]);
        }
        for (int64_t g = 0; g < G; ++g) scores[g * S + s] = _mm512_reduce_add_ps(acc[g]) * scale;
      }
    } else
#endif
    for (int64_t s = 0; s < valid; ++s)
      for (int64_t g = 0; g < G; ++g) scores[g * S + s] = Dot(query.data() + g * H, k_unit + s * H, H) * scale;
    // Softmax over the valid slots (the rest have probability 0), rounded to the query dtype.
    for (int64_t g = 0; g < G; ++g) {
      float* row = scores.data() + g * S;
      float peak = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < valid; ++s) peak = std::max(peak, row[s]);
      float sum = 0.0f;
      int64_t s = 0;
#ifdef __AVX512F__
      __m512 sums = _mm512_setzero_ps();
      for (; s + 16 <= valid; s += 16) {
        __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_loadu_ps(row + s), _mm512_set1_ps(peak)));
        _mm512_storeu_ps(row + s, e);
        sums = _mm512_add_ps(sums, e);
      }
      sum = _mm512_reduce_add_ps(sums);
#endif
      for (; s < valid; ++s) {
        row[s] = std::exp(row[s] - peak);
        sum += row[s];
      }
      for (int64_t s = 0; s < valid; ++s) row[s] = RoundTo<Q>(row[s] / sum);
    }
    // p·v per query head (the unit's values stay in L1/L2 across its G heads).
    for (int64_t g = 0; g < G; ++g) WeightedSum<kH>(scores.data() + g * S, v_unit, valid, H, acc.data() + g * H);
    const float empty = valid ? 0.0f : std::numeric_limits<float>::quiet_NaN();  // softmax of no slot
    for (int64_t i = 0; i < G * H; ++i) Store(out, q_offset + i, valid ? acc[i] : empty);
  }
}

template <typename Q, typename C>
ffi::Future Dispatch(ffi::ThreadPool pool, const Shape& shape, const void* q, const void* k, const void* v,
                     const int32_t* length, void* out) {
  const int64_t units = shape.B * shape.K;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), units));
  ffi::CountDownPromise done(tasks);
  ffi::Future future(done);
  auto units_of = shape.H == 64 ? RunUnits<64, Q, C> : shape.H == 128 ? RunUnits<128, Q, C> : RunUnits<0, Q, C>;
  auto run = [=](int64_t task) mutable {
    units_of(shape, static_cast<const Q*>(q), static_cast<const C*>(k), static_cast<const C*>(v), length,
                   static_cast<Q*>(out), units * task / tasks, units * (task + 1) / tasks);
    done.CountDown();
  };
  for (int64_t task = 1; task < tasks; ++task) pool.Schedule([run, task]() mutable { run(task); });
  run(0);  // the calling thread takes the first range
  return future;
}

ffi::Future DecodeAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::Buffer<ffi::S32> length, ffi::Result<ffi::AnyBuffer> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  auto supported = [](ffi::DataType t) { return t == ffi::F32 || t == ffi::BF16; };
  bool ok = qd.size() == 3 && kd.size() == 4 && vd.size() == 4 && supported(q.element_type()) &&
            supported(k.element_type()) && k.element_type() == v.element_type() &&
            q.element_type() == out->element_type();
  for (size_t i = 0; ok && i < 4; ++i) ok = kd[i] == vd[i];
  ok = ok && kd[0] == qd[0] && kd[1] > 0 && qd[1] % kd[1] == 0 && kd[3] == qd[2];
  ok = ok && length.dimensions().size() == 1 && length.dimensions()[0] == qd[0];
  if (!ok) {
    ffi::Promise failed;
    ffi::Future future(failed);
    failed.SetError(ffi::Error::InvalidArgument(
        "decode attention: needs q [B, N, H], k, v [B, K, S, H] with N % K == 0 and length [B], "
        "float32 or bfloat16"));
    return future;
  }
  const Shape shape{qd[0], qd[1], kd[1], kd[2], qd[2]};
  const bool q_bf16 = q.element_type() == ffi::BF16, c_bf16 = k.element_type() == ffi::BF16;
  const void *qp = q.untyped_data(), *kp = k.untyped_data(), *vp = v.untyped_data();
  void* op = out->untyped_data();
  const int32_t* lp = length.typed_data();
  if (q_bf16 && c_bf16) return Dispatch<uint16_t, uint16_t>(pool, shape, qp, kp, vp, lp, op);
  if (q_bf16) return Dispatch<uint16_t, float>(pool, shape, qp, kp, vp, lp, op);
  if (c_bf16) return Dispatch<float, uint16_t>(pool, shape, qp, kp, vp, lp, op);
  return Dispatch<float, float>(pool, shape, qp, kp, vp, lp, op);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfpoDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
