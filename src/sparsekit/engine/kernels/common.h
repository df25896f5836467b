// Helpers shared by the ops: argument checks, the dtypes of inputs and outputs, and the
// arguments of the kernel cores (cores.h). The cores' own helpers are in parallel.h (work
// split, transposed inputs) and vec.h (value loads per instruction set).
#pragma once

#include <ATen/DimVector.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/to.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cores.h"
#include "parallel.h"

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

// x of a linear kernel: a contiguous CPU tensor of `dtype` and shape (..., in_features), at
// least 1-D; its rows are all dimensions but the last (a token of a batch-1 decode comes as
// (1, 1, in_features), taken as it is: a reshape before and after the op costs µs).
inline void check_input(const at::Tensor& x, int64_t in_features,
                        at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.is_contiguous(),
              "x must be a contiguous CPU tensor of shape (..., in_features), got shape ",
              x.sizes(), " on ", x.device(), x.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(x.scalar_type() == dtype, "x must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(in_features >= 0, "in_features must be non-negative, got ", in_features);
  TORCH_CHECK(x.size(-1) == in_features, "x must have in_features=", in_features,
              " columns, got shape ", x.sizes());
}

// The rows of a checked input x (..., in_features): the product of all dimensions but the
// last.
inline int64_t input_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

// The output of a linear op with `rows` outputs for x (..., in_features): (..., rows), in
// x's dtype unless `dtype` is given.
inline at::Tensor linear_output(const at::Tensor& x, int64_t rows,
                                std::optional<at::ScalarType> dtype = std::nullopt) {
  at::DimVector sizes(x.sizes());
  sizes.back() = rows;
  return at::empty(sizes, x.options().dtype(dtype.value_or(x.scalar_type())));
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

// Per-group scales of int8 `values` (rows, cols): float32 (rows, groups) with `groups`
// dividing cols, the scale of each row and group of cols / groups consecutive inputs. Their
// data and group size, or {nullptr, 0} where `scales` are not 2-D (per-row scales, checked
// by scales_data, or none). A group holds at least one input: cols = 0 divided into groups
// of 0 inputs crashed the bitmap kernel (integer division by the group size).
struct GroupScales {
  const float* data;
  int64_t size;
};
inline GroupScales group_scales(const std::optional<at::Tensor>& scales,
                                const at::Tensor& values, int64_t rows, int64_t cols) {
  if (values.scalar_type() != at::kChar || !scales.has_value() || !scales->defined() ||
      scales->dim() != 2) {
    return {nullptr, 0};
  }
  check_tensor(*scales, "scales", 2, at::kFloat);
  check_size(*scales, "scales", 0, rows);
  const int64_t groups = scales->size(1);
  TORCH_CHECK(groups >= 1 && groups <= cols && cols % groups == 0, "scales of shape ",
              scales->sizes(), " must hold one scale per row and group, their number of groups "
              "dividing in_features=", cols, " (groups of at least one input)");
  return {scales->data_ptr<float>(), cols / groups};
}

// The bias of `rows` outputs (nullptr without one), checked to be contiguous float32.
inline const float* bias_data(const std::optional<at::Tensor>& bias, int64_t rows) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_tensor(*bias, "bias", 1, at::kFloat);
  check_size(*bias, "bias", 0, rows);
  return bias->data_ptr<float>();
}

// The OpenMP thread count of a `threads` argument (at least one).
// At most the processors this process may run on: more never ran faster, and a count the
// system cannot start (2000 threads under a memory limit) made libgomp end the process
// ("Thread creation failed"), no exception raised. The outputs do not depend on the count.
inline int num_threads(int64_t threads) {
  TORCH_CHECK(threads >= 1 && threads <= 65536, "threads must be in [1, 65536], got ", threads);
  return static_cast<int>(std::min<int64_t>(threads, std::max(1, omp_get_num_procs())));
}


// -- value types ------------------------------------------------------------------------------

// bf16 values in op code (the cores use bf16_bits, the same layout without inline code).
using bf16 = c10::BFloat16;

// x as float32: a bf16 input is widened once per call (the kernels read fp32 inputs).
inline at::Tensor as_float32(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
}

// The float32 result y in the dtype of the input x.
inline at::Tensor like_input(const at::Tensor& y, const at::Tensor& x) {
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// The core's name for the element type of `values` (see check_values).
inline Value value_type(const at::Tensor& values) {
  if (values.scalar_type() == at::kBFloat16) return Value::bf16;
  if (values.scalar_type() == at::kChar) return Value::i8;
  return Value::f32;
}

// The input/output part of a core's arguments for x (..., cols) and y (..., rows), both
// float32: batch is the rows of x.
inline Linear linear_io(const at::Tensor& x, at::Tensor& y, Output out, int threads) {
  return Linear{x.data_ptr<float>(), y.data_ptr<float>(), input_rows(x), y.size(-1), x.size(-1),
                out, threads};
}

// A bf16 input of at most this many rows is widened, and its output narrowed, in this
// thread's buffers inside the op (a decoded token: two tensor conversions, with their
// allocations and dispatches, cost more than the loops); more rows take the tensor
// conversions, which run on all threads.
constexpr int64_t kConvertInOpRows = 16;

// src (n bf16) widened to float32 into dst: exact.
inline void widen_bf16(const bf16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// src (n float32) rounded to bf16 into dst, to nearest even as Tensor.to(torch.bfloat16).
inline void narrow_bf16(const float* src, bf16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16(src[i]);
}

// The shared body of the linear ops whose stored `values` may be int8 with per-row `scales`
// (`grouped`: per-group scales the op passes its core itself, checked by group_scales):
// checks scales, bias and threads (after the op's own checks), widens x to float32, allocates
// y (..., rows), calls run(io) with the core's input/output arguments unless there is
// nothing to compute, and returns y in x's dtype (a bf16 x of few rows: see
// kConvertInOpRows).
template <typename Run>
at::Tensor scaled_linear(const at::Tensor& x_in, const at::Tensor& values,
                         const std::optional<at::Tensor>& scales,
                         const std::optional<at::Tensor>& bias, int64_t rows, int64_t threads,
                         Run&& run, bool grouped = false) {
  const Output out{grouped ? nullptr : scales_data(scales, values, rows), bias_data(bias, rows)};
  const int T = num_threads(threads);
  const int64_t batch = input_rows(x_in), cols = x_in.size(-1);
  if (x_in.scalar_type() == at::kBFloat16 && batch <= kConvertInOpRows) {
    thread_local std::vector<float> xf, yf;  // grow only: no allocation per call
    xf.resize(batch * cols);
    yf.resize(batch * rows);
    auto y = linear_output(x_in, rows);
    if (y.numel() == 0) return y;
    widen_bf16(x_in.data_ptr<bf16>(), xf.data(), batch * cols);
    run(Linear{xf.data(), yf.data(), batch, rows, cols, out, T});
    narrow_bf16(yf.data(), y.data_ptr<bf16>(), batch * rows);
    return y;
  }
  const at::Tensor x = as_float32(x_in);
  auto y = linear_output(x, rows);
  if (y.numel() != 0) run(linear_io(x, y, out, T));
  return like_input(y, x_in);
}

}  // namespace sparsekit
