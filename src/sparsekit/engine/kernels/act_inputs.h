// What the activation-sparse ops (act_gemv.cpp, act_sparse_gemv.cpp, act_bitmap_gemv.cpp)
// share: the checks of their input row, thresholds, bias, scales and column offsets, and the
// kept inputs of the row.
//
// Stored weights are float32, bfloat16 or int8 codes. With float32 or bfloat16 weights, x,
// threshold and bias have the weights' dtype; with int8 codes x is float32 or bfloat16,
// threshold and bias have x's dtype, and float32 `scales` (out,) scale each output's sum or,
// in the ops that take groups, `scales` (groups, out) each group of in / groups inputs' sum
// (the transposed (out, groups) grid: a group's scales of consecutive outputs are one run).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "common.h"

namespace sparsekit {

// The arguments of an activation-sparse op beside its stored weights, checked.
struct ActInputs {
  const float* scale;  // int8 weights: per output, else nullptr
  const void* bias;    // x's dtype, or nullptr
  bool bf16;           // x (and threshold, bias) bfloat16
  int threads;
  const float* group_scales = nullptr;  // int8 weights: (groups, out) instead of `scale`
  int64_t group_size = 0;
};

// Checks `values` (the stored weights of `name`: float32, bf16 or int8), x (in,) and
// threshold (in,) before anything is written.
inline void check_act_inputs(const at::Tensor& values, const char* name, const at::Tensor& x,
                             const at::Tensor& threshold, int64_t in) {
  const auto vtype = values.scalar_type();
  TORCH_CHECK(vtype == at::kFloat || vtype == at::kBFloat16 || vtype == at::kChar, name,
              " must be ", at::kFloat, ", ", at::kBFloat16, " or ", at::kChar, ", got ", vtype);
  check_tensor(x, "x", 1);
  if (vtype == at::kChar) {
    check_float_or_bf16(x, "x");
  } else {
    TORCH_CHECK(x.scalar_type() == vtype, "x must be ", vtype, " like ", name, ", got ",
                x.scalar_type());
  }
  check_size(x, "x", 0, in);
  check_tensor(threshold, "threshold", 1, x.scalar_type());
  check_size(threshold, "threshold", 0, in);
}

// Checks bias (out,) of x's dtype and the scales of int8 `values` — (out,), or where the op
// takes groups (`in`: its inputs; -1: it does not) (groups, out) with groups dividing in —
// and the thread count, before anything is written; the checked arguments of the core.
inline ActInputs check_act_outputs(const at::Tensor& values, const at::Tensor& x,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& scales, int64_t out,
                                   int64_t threads, int64_t in = -1) {
  const void* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_tensor(*bias, "bias", 1, x.scalar_type());
    check_size(*bias, "bias", 0, out);
    b = bias->data_ptr();
  }
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (in >= 0 && values.scalar_type() == at::kChar && scales.has_value() && scales->defined() &&
      scales->dim() == 2) {
    check_tensor(*scales, "scales", 2, at::kFloat);
    check_size(*scales, "scales", 1, out);
    const int64_t groups = scales->size(0);
    TORCH_CHECK(groups >= 1 && groups <= in && in % groups == 0, "scales of shape ",
                scales->sizes(), " must hold one scale per group of inputs and output (groups, "
                "out_features), their number of groups dividing in_features=", in,
                " (groups of at least one input)");
    return ActInputs{nullptr, b, bf16, num_threads(threads), scales->data_ptr<float>(),
                     in / groups};
  }
  const float* scale = scales_data(scales, values, out);
  return ActInputs{scale, b, bf16, num_threads(threads)};
}

// Whether some p[i] < p[i - 1] (i < n): a vectorized scan of every offset, compiled for the
// widest instruction set the CPU runs (act_bitmap_gemv.cpp, target_clones).
bool offsets_fall(const int32_t* p, int64_t n);

// Column offsets (2-D, row after row) into `stored` values, read as one sequence: they must start
// at 0, never fall and end at `stored`, so that every column a kernel reads lies inside the
// values. One vectorized pass, on every call (a falling offset once let a kernel read past
// the values' end): for the 47k offsets of a 5632 x 2048 bitmap-column layer the scalar loop
// took 12 us, a third of a call that keeps no column, the SSE one 5 and the AVX-512 one ~2
// (Intel Xeon, warm).
inline void check_offsets(const at::Tensor& offsets, const char* name, int64_t stored) {
  const int32_t* p = offsets.data_ptr<int32_t>();
  const int64_t n = offsets.numel();
  if (n == 0) {
    TORCH_CHECK(stored == 0, "values must be empty without ", name, ", got ", stored);
    return;
  }
  const bool falls = offsets_fall(p, n);
  TORCH_CHECK(p[0] == 0 && p[n - 1] == stored && !falls, name, " must rise from 0 to ", stored,
              " without falling, got ", p[0], " .. ", p[n - 1],
              falls ? " with a fall" : "");
}

// The inputs of x with |x_j| >= threshold_j (and x_j != 0), NaN ones included (the product
// of a NaN input is NaN, as the thresholded dense product's is): their rising indices and
// values (as float32).
// Without a branch: which inputs survive is as good as random (half of them under TEAL 50 %),
// and a mispredicted branch per input cost ~4 us of a 0.1 ms 2048x2048 layer.
template <typename T>
void kept_inputs(const T* x, const T* threshold, int64_t in, std::vector<int32_t>* idx,
                 std::vector<float>* val) {
  idx->resize(in);
  val->resize(in);
  int32_t* i = idx->data();
  float* v = val->data();
  int64_t n = 0;
  for (int64_t j = 0; j < in; ++j) {
    const float xj = static_cast<float>(x[j]);
    i[n] = static_cast<int32_t>(j);
    v[n] = xj;
    n += static_cast<int64_t>(xj != 0.f && !(std::fabs(xj) < static_cast<float>(threshold[j])));
  }
  idx->resize(n);
  val->resize(n);
}

// Whether every entry of a float32 or bfloat16 x is finite (read in place, no copy).
inline bool all_finite(const at::Tensor& x) {
  bool finite = true;
  if (x.scalar_type() == at::kBFloat16) {
    const c10::BFloat16* p = x.data_ptr<c10::BFloat16>();
    for (int64_t j = 0; j < x.numel(); ++j) finite &= std::isfinite(static_cast<float>(p[j]));
  } else {
    const float* p = x.data_ptr<float>();
    for (int64_t j = 0; j < x.numel(); ++j) finite &= std::isfinite(p[j]);
  }
  return finite;
}

// kept_inputs of a float32 or bfloat16 x.
inline void kept_inputs(const at::Tensor& x, const at::Tensor& threshold,
                        std::vector<int32_t>* idx, std::vector<float>* val) {
  if (x.scalar_type() == at::kBFloat16) {
    kept_inputs(x.data_ptr<c10::BFloat16>(), threshold.data_ptr<c10::BFloat16>(), x.size(0),
                idx, val);
  } else {
    kept_inputs(x.data_ptr<float>(), threshold.data_ptr<float>(), x.size(0), idx, val);
  }
}

}  // namespace sparsekit
