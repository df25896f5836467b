// Helpers shared by the CPU kernels: argument checks, splitting rows across OpenMP threads
// by work, the transposed input workspace of the batched (SpMM) paths, the value types
// (fp32, bf16 and int8 weights, widened to fp32 for the arithmetic) and the output stage
// (per-row int8 scale, bias).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/to.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace sparsekit {

// -- argument checks ------------------------------------------------------------------------
// Every op validates all of its arguments with these before it allocates or writes anything,
// so a direct torch.ops.sparsekit call with mismatched tensors raises instead of reading out
// of bounds. They cost O(1): sizes, dtypes, devices, the first and last row pointer. Index
// contents (column < in_features, rising row pointers) are checked once, where a format is
// built from untrusted tensors (Format.from_state), never per call.

// A tensor argument: a contiguous CPU tensor with `dim` dimensions.
inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == dim && t.is_contiguous(), name,
              " must be a contiguous ", dim, "-D CPU tensor, got shape ", t.sizes(), " on ",
              t.device(), t.is_contiguous() ? "" : " (not contiguous)");
}

// The same, of element type `dtype`.
inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim,
                         at::ScalarType dtype) {
  check_tensor(t, name, dim);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// Column indices: int16 (read as uint16) or int32.
inline void check_index(const at::Tensor& t, const char* name, int64_t dim) {
  check_tensor(t, name, dim);
  TORCH_CHECK(t.scalar_type() == at::kShort || t.scalar_type() == at::kInt, name,
              " must be int16 or int32, got ", t.scalar_type());
}

// Size `d` of `t` must be `expected`.
inline void check_size(const at::Tensor& t, const char* name, int64_t d, int64_t expected) {
  TORCH_CHECK(t.size(d) == expected, name, ".size(", d, ") must be ", expected, ", got ",
              t.size(d), " (", name, " has shape ", t.sizes(), ")");
}

// Row pointers of `rows` rows into `stored` entries: int32 of length rows + 1, from 0 to
// `stored` (the O(1) part of their validity).
inline void check_rowptr(const at::Tensor& rowptr, const char* name, int64_t rows,
                         int64_t stored) {
  check_tensor(rowptr, name, 1, at::kInt);
  TORCH_CHECK(rows >= 0, "the number of rows must be non-negative, got ", rows);
  check_size(rowptr, name, 0, rows + 1);
  const int32_t* p = rowptr.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0 && p[rows] == stored, name, " must rise from 0 to ", stored,
              ", got ", p[0], " .. ", p[rows]);
}

// x of a linear kernel: a contiguous 2-D CPU tensor of `dtype` with in_features columns.
inline void check_input(const at::Tensor& x, int64_t in_features,
                        at::ScalarType dtype = at::kFloat) {
  check_tensor(x, "x", 2, dtype);
  TORCH_CHECK(in_features >= 0, "in_features must be non-negative, got ", in_features);
  TORCH_CHECK(x.size(1) == in_features, "x must have in_features=", in_features,
              " columns, got shape ", x.sizes());
}

// t's element type is float32 or bfloat16.
inline void check_float_or_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be ", at::kFloat, " or ", at::kBFloat16, ", got ", t.scalar_type());
}

// x of a kernel that also takes bfloat16 inputs (see as_float32 and like_input): as
// check_input, of either dtype.
inline void check_input_or_bf16(const at::Tensor& x, int64_t in_features) {
  check_float_or_bf16(x, "x");
  check_input(x, in_features, x.scalar_type());
}

// Stored values of the csr, bitmap and N:M ops: a contiguous `dim`-D CPU tensor of float32,
// bfloat16 or int8 (int8 codes come with per-row scales: see scales_data).
inline void check_values(const at::Tensor& values, int64_t dim) {
  check_tensor(values, "values", dim);
  const auto t = values.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kChar, "values must be ",
              at::kFloat, ", ", at::kBFloat16, " or ", at::kChar, ", got ", t);
}

// The per-row scales of int8 `values` (float32 of shape (rows,), required), or nullptr for
// float32/bf16 values (which take none).
inline const float* scales_data(const std::optional<at::Tensor>& scales,
                                const at::Tensor& values, int64_t rows) {
  const bool given = scales.has_value() && scales->defined();
  if (values.scalar_type() != at::kChar) {
    TORCH_CHECK(!given, "scales must be None for ", values.scalar_type(),
                " values (only int8 values are scaled)");
    return nullptr;
  }
  TORCH_CHECK(given, "scales (float32 of shape (", rows, ",)) are required with int8 values");
  check_tensor(*scales, "scales", 1, at::kFloat);
  check_size(*scales, "scales", 0, rows);
  return scales->data_ptr<float>();
}

// The bias of `rows` outputs (nullptr without one), checked to be contiguous float32.
inline const float* bias_data(const std::optional<at::Tensor>& bias, int64_t rows) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_tensor(*bias, "bias", 1, at::kFloat);
  check_size(*bias, "bias", 0, rows);
  return bias->data_ptr<float>();
}

// The OpenMP thread count of a `threads` argument (at least one).
inline int num_threads(int64_t threads) {
  TORCH_CHECK(threads >= 1 && threads <= 65536, "threads must be in [1, 65536], got ", threads);
  return static_cast<int>(threads);
}

// The output stage of a linear kernel: y[r] = scale[r] * sum + bias[r], each factor
// optional (scale: int8 values; nullptr: none).
struct Output {
  const float* scale;
  const float* bias;
  float operator()(float sum, int64_t r) const {
    if (scale) sum *= scale[r];
    return bias ? sum + bias[r] : sum;
  }
};

// -- work split -----------------------------------------------------------------------------

// Rows [*r0, *r1) of thread t out of T, each thread getting a 1/T share of the work, where
// work(i) is the (non-decreasing) work of rows [0, i).
template <typename Work>
inline void thread_rows_by(const Work& work, int64_t rows, int t, int T, int64_t* r0,
                           int64_t* r1) {
  auto bound = [&](int64_t target) {  // first row i with work(i) >= target
    int64_t lo = 0, hi = rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (work(mid) < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  const int64_t total = work(rows);
  *r0 = t == 0 ? 0 : bound(total * t / T);
  *r1 = t == T - 1 ? rows : bound(total * (t + 1) / T);
}

// The same for CSR-like rows: work = stored entries + rows.
inline void thread_rows(const int32_t* rowptr, int64_t rows, int t, int T, int64_t* r0,
                        int64_t* r1) {
  thread_rows_by([rowptr](int64_t i) { return static_cast<int64_t>(rowptr[i]) + i; }, rows, t,
                 T, r0, r1);
}

// -- transposed inputs ----------------------------------------------------------------------

// This thread's workspace of at least n floats; it grows only, so there is no large
// allocation per call.
inline float* workspace(int64_t n) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(n)) buffer.resize(n);
  return buffer.data();
}

// xt (padded_cols, ld) = x (batch, cols) transposed, zero beyond `batch` and `cols`: each
// input column becomes one contiguous row, so a nonzero is one broadcast-FMA over it. A
// blocked transpose shared by the threads of the enclosing parallel region (it ends with
// the implicit barrier of `omp for`: xt is then complete).
inline void transpose_into(const float* x, int64_t batch, int64_t cols, int64_t padded_cols,
                           int64_t ld, float* xt) {
  constexpr int64_t kBlock = 16;
#pragma omp for schedule(static)
  for (int64_t i0 = 0; i0 < padded_cols; i0 += kBlock) {
    const int64_t i1 = std::min(padded_cols, i0 + kBlock);
    for (int64_t b = 0; b < ld; ++b) {
      const float* src = x + b * cols;
      for (int64_t i = i0; i < i1; ++i) xt[i * ld + b] = b < batch && i < cols ? src[i] : 0.f;
    }
  }
}

// -- value types ------------------------------------------------------------------------------
// Stored values are float, bf16 (c10::BFloat16: the upper 16 bits of a float32) or int8
// codes (scaled per row by the Output stage); every product and sum is fp32. Kernels are
// templates on the value type T; scalar code converts with static_cast<float>, vector code
// loads through the overloads below.

using bf16 = c10::BFloat16;

// x as float32: a bf16 input is widened once per call (the kernels read fp32 inputs).
inline at::Tensor as_float32(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
}

// The float32 result y in the dtype of the input x.
inline at::Tensor like_input(const at::Tensor& y, const at::Tensor& x) {
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// Calls body(T{}) with T = float, bf16 or int8_t, the value type of `values` (see
// check_values).
template <typename Body>
inline decltype(auto) with_values(const at::Tensor& values, Body&& body) {
  if (values.scalar_type() == at::kBFloat16) return body(bf16{});
  if (values.scalar_type() == at::kChar) return body(int8_t{});
  return body(float{});
}

#if defined(__AVX512F__)
// 16 bf16 (in the 16-bit lanes of h) as 16 floats: shift each into the upper half.
inline __m512 widen16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// 16 int8 codes as 16 floats.
inline __m512 widen16(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }
inline __m512 load16(const int8_t* p) {
  return widen16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// Lanes of m loaded, the others zero; nothing outside them is read.
inline __m512 load16_masked(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16_masked(__mmask16 m, const bf16* p) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return widen16(_mm256_maskz_loadu_epi16(m, p));
#else
  alignas(32) uint16_t lanes[16] = {};
  for (int i = 0; i < 16; ++i) {
    if ((m >> i) & 1) lanes[i] = p[i].x;
  }
  return widen16(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes)));
#endif
}
inline __m512 load16_masked(__mmask16 m, const int8_t* p) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return widen16(_mm_maskz_loadu_epi8(m, p));
#else
  alignas(16) int8_t lanes[16] = {};
  for (int i = 0; i < 16; ++i) {
    if ((m >> i) & 1) lanes[i] = p[i];
  }
  return widen16(_mm_load_si128(reinterpret_cast<const __m128i*>(lanes)));
#endif
}
// The popcount(m) consecutive values at p, placed in the lanes of m's set bits (others zero).
inline __m512 expand16(__mmask16 m, const float* p) { return _mm512_maskz_expandloadu_ps(m, p); }
template <typename T>
inline __m512 expand16(__mmask16 m, const T* p) {  // bf16, int8: load packed, then expand
  const auto first = static_cast<__mmask16>((1u << __builtin_popcount(m)) - 1u);
  return _mm512_maskz_expand_ps(m, load16_masked(first, p));
}
#endif

#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const int8_t* p) {
  const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}
#endif

}  // namespace sparsekit
