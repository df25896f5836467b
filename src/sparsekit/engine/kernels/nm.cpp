// The packed N:M op: y = x @ W.T + bias on CPU.
//
// Per row ceil(cols / M) groups of N fp32, bf16 or int8 values (zero-padded; int8 with a
// float32 scale per row) and one log2(M)-bit field per value (M=8 uses 4 bits) giving its
// input within the group; the fields of every 16 values fill one (M=4) or two (M=8) 32-bit
// words. int8 values may instead be scaled per row and group of inputs (scales (rows,
// groups)) whose values fill whole words of fields (16 values). The arithmetic is nm_core.h, compiled per instruction set; its GEMV/SpMM drivers
// are shared with the bitmap rows (decoded_rows.h).

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common.h"

namespace {

// y = x @ W.T (+ bias); W as packed N:M fp32/bf16/int8 values (rows, ceil(in_features / M)
// * N) and int32 fields (rows, words), each naming an input below in_features (checked where
// the format is built); int8 values times scales[r], or scales[r, g] per group g of
// in_features / groups inputs; x fp32 or bf16, y in its dtype.
at::Tensor nm_linear(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& x,
                     const std::optional<at::Tensor>& bias, int64_t n, int64_t m,
                     int64_t in_features, int64_t threads,
                     const std::optional<at::Tensor>& scales) {
  sparsekit::check_input_or_bf16(x, in_features);
  // the patterns PackedNM builds: 1:8 gave wrong sums at 1-3 rows on AVX-512 (a span of
  // 16 values reaches 128 inputs, past the 64 its input permutes pick from)
  TORCH_CHECK((m == 4 && (n == 1 || n == 2)) || (m == 8 && n == 4), "unsupported N:M ", n, ":",
              m, " (n, m): 1:4, 2:4 or 4:8");
  sparsekit::check_values(values, 2);
  sparsekit::check_tensor(indices, "indices", 2, at::kInt);
  const int64_t fbits = m == 4 ? 2 : 4, width = (in_features + m - 1) / m * n;
  sparsekit::check_size(values, "values", 1, width);
  sparsekit::check_size(indices, "indices", 0, values.size(0));
  sparsekit::check_size(indices, "indices", 1, (width + 15) / 16 * fbits / 2);
  const int64_t rows = values.size(0);
  const auto groups = sparsekit::group_scales(scales, values, rows, in_features);
  TORCH_CHECK(groups.size % m == 0 && groups.size / m * n % 16 == 0, "scales of shape ",
              scales->sizes(), " make groups of ", groups.size, " inputs; the ", n, ":", m,
              " kernel takes groups of a multiple of ", 16 / n * m, " inputs (16 values)");
  return sparsekit::scaled_linear(
      x, values, scales, bias, rows, threads, [&](const sparsekit::Linear& io) {
        sparsekit::cores().nm_linear(sparsekit::NMArgs{
            io, sparsekit::value_type(values), values.data_ptr(),
            reinterpret_cast<const uint32_t*>(indices.data_ptr()), n, m, fbits, width,
            indices.size(1), groups.data, groups.size});
      },
      groups.data != nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("nm_linear", &nm_linear); }
