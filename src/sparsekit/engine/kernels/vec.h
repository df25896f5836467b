// Value loads of the kernel cores, compiled once per instruction set (included by
// cores_impl.h inside namespace sparsekit::SPARSEKIT_ISA; SPARSEKIT_AVX2/SPARSEKIT_AVX512
// say which intrinsics the translation unit may use).
//
// Stored values are float, bf16 (the upper 16 bits of a float32) or int8 codes (scaled per
// row by the output stage); every product and sum is fp32. Scalar code converts with
// to_float, vector code loads 8 (AVX2) or 16 (AVX-512) values as floats.

namespace sparsekit::SPARSEKIT_ISA {

using bf16 = bf16_bits;

// The bytes of the widest vector register of this instruction set. Generic vectors
// (vector_size) wider than it are split into several registers, and a tile of accumulators
// made of them spills to the stack: the SparseLinear training step ran 11x slower on the
// AVX2 cores with 64-byte vectors than on the AVX-512 ones (sparse_linear_training.py).
#if SPARSEKIT_AVX512
constexpr int kVectorBytes = 64;
#elif SPARSEKIT_AVX2
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

// The streaming loops prefetch their weights this many bytes ahead: the hardware
// prefetcher alone left the fp32 bitmap GEMV at ~50% of its bytes' floor on AMD Zen 5 (1
// thread, 11008x4096 at 50%), 8 KiB ahead took it to ~90% (bf16 and W8A8 gain less). A
// compute-heavy loop leaves the demand misses unhidden: on an Intel Xeon (2 vCPUs) the
// float-input int8 rows went from 72% to 92% of their floor (bitmap, 50%) and from 78% to 95%
// (N:M, 2:4) with it (benchmarks/kernels.py --tables values), and the 2:4 int8 LLaMA decode
// from 2.21x to 2.91x dense fp32 (benchmarks/llm_decode.py).
constexpr int kPrefetchBytes = 8192;

// Prefetch the line kPrefetchBytes past p into L1. Always inlined: a core compiled for more
// instruction sets than its file (BitmapVpexpand) called it out of line, 1.3x slower.
__attribute__((always_inline)) inline void prefetch_ahead(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes, 0, 3);
}

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(int8_t v) { return static_cast<float>(v); }

// y[r] of a row's sum: times the row's scale, plus its bias.
inline float finish(const Output& out, float sum, int64_t r) {
  if (out.scale) sum *= out.scale[r];
  return out.bias ? sum + out.bias[r] : sum;
}

// Calls body(p) with p the stored values as const float*, const bf16* or const int8_t*.
template <typename Body>
inline void with_values(Value value, const void* values, Body&& body) {
  switch (value) {
    case Value::bf16: body(static_cast<const bf16*>(values)); break;
    case Value::i8: body(static_cast<const int8_t*>(values)); break;
    default: body(static_cast<const float*>(values)); break;
  }
}

#if SPARSEKIT_AVX512
// 16 bf16 (in the 16-bit lanes of h) as 16 floats: shift each into the upper half.
inline __m512 widen16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// 16 int8 codes as 16 floats.
inline __m512 widen16(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const int8_t* p) {
  return widen16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// Lanes of m loaded, the others zero; nothing outside them is read.
inline __m512 load16_masked(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16_masked(__mmask16 m, const bf16* p) {
  return widen16(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512 load16_masked(__mmask16 m, const int8_t* p) {
  return widen16(_mm_maskz_loadu_epi8(m, p));
}
#endif

#if SPARSEKIT_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const int8_t* p) {
  const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}
// 4 values as 4 floats (the 4 x 4 BSR blocks' rows): the generic int8 -> float vector
// conversion is scalar code (see bsr_core.h's loadv).
inline __m128 load4(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4(const bf16* p) {
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
}
inline __m128 load4(const int8_t* p) {
  int32_t q;
  __builtin_memcpy(&q, p, sizeof q);
  return _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(q)));
}
// Sum of the 8 lanes.
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
#endif

#if SPARSEKIT_AVX2
// x at 4, 8 or 16 columns c[0..) as one vector, built from scalar loads: on AMD Zen 5 this
// ran the GEMV 1.4-1.5x faster than vgatherdps (8 or 16 lanes) at 50% and 90% in bf16 and
// int8 (11008x4096, one thread), and Zen 3's gathers are slower still.
template <typename I>
inline __m128 gather4(const float* x, const I* c) {
  return _mm_set_ps(x[c[3]], x[c[2]], x[c[1]], x[c[0]]);
}
template <typename I>
inline __m256 gather8(const float* x, const I* c) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(gather4(x, c)), gather4(x, c + 4), 1);
}
#endif
#if SPARSEKIT_AVX512
template <typename I>
inline __m512 gather16(const float* x, const I* c) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(gather8(x, c)), gather8(x, c + 8), 1);
}
#endif


}  // namespace sparsekit::SPARSEKIT_ISA
