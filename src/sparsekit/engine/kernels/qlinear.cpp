// The W8A8 ops: dense_qlinear, bitmap_qlinear and nm_qlinear take the arguments of
// dense_linear, bitmap_linear and nm_linear with int8 weight codes and their float32 per-row
// `scales`, and also quantize the input: each row of x to symmetric int8 codes with its own
// scale (sparsekit.quantize's grid: max |x| / 127, rounded half to even), so the products
// are exact integer dot products (int32 sums) instead of int8 weights widened to fp32 FMAs:
// y[b, r] = sx[b] * scales[r] * sum_k q[r, k] * qx[b, k] (+ bias[r]), y in x's dtype.
// The arithmetic is qlinear_core.h, compiled per instruction set; the AVX-512 one needs
// VNNI, VBMI, VBMI2 and BITALG (Ice Lake, Zen 4 and later), so an AVX-512 CPU without them
// runs the AVX2 one for these ops.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "common.h"
#include "qlinear.h"

namespace sparsekit {
namespace {

// Integer sums stay within int32: at most 255 * 128 per product (the biased AVX-512 codes).
constexpr int64_t kMaxInFeatures = 65536;

}  // namespace

const QCores& qcores() {
  const char* isa = cores().isa;
  if (std::strcmp(isa, "avx512") == 0) {
#if defined(__x86_64__) || defined(__i386__)
    static const bool vnni = __builtin_cpu_supports("avx512vnni") &&
                             __builtin_cpu_supports("avx512vbmi") &&
                             __builtin_cpu_supports("avx512vbmi2") &&
                             __builtin_cpu_supports("avx512bitalg");
    return vnni ? avx512::kQCores : avx2::kQCores;
#endif
  }
  return std::strcmp(isa, "avx2") == 0 ? avx2::kQCores : scalar::kQCores;
}

namespace {

// x of a W8A8 op (fp32 or bf16, in_features columns, at most kMaxInFeatures) and its
// int8 weight codes `name`.
void check_q(const at::Tensor& x, int64_t in_features, const at::Tensor& codes,
             const char* name, int64_t dim) {
  check_input_or_bf16(x, in_features);
  TORCH_CHECK(in_features <= kMaxInFeatures, "in_features must be at most ", kMaxInFeatures,
              " (int32 sums of int8 products), got ", in_features);
  check_tensor(codes, name, dim, at::kChar);
}

at::Tensor dense_qlinear(const at::Tensor& weight, const at::Tensor& x,
                         const std::optional<at::Tensor>& bias, int64_t in_features,
                         int64_t threads, const std::optional<at::Tensor>& scales) {
  check_q(x, in_features, weight, "weight", 2);
  check_size(weight, "weight", 1, in_features);
  const int64_t rows = weight.size(0);
  return scaled_linear(x, weight, scales, bias, rows, threads, [&](const Linear& io) {
    qcores().dense_qlinear(DenseArgs{io, Value::i8, weight.data_ptr()});
  });
}

at::Tensor bitmap_qlinear(const at::Tensor& values, const at::Tensor& bitmap,
                          const at::Tensor& rowptr, const at::Tensor& x,
                          const std::optional<at::Tensor>& bias, int64_t in_features,
                          int64_t threads, const std::optional<at::Tensor>& scales) {
  check_q(x, in_features, values, "values", 1);
  check_tensor(bitmap, "bitmap", 2, at::kShort);
  check_size(bitmap, "bitmap", 1, (in_features + 15) / 16);
  check_rowptr(rowptr, "rowptr", bitmap.size(0), values.numel());
  const int64_t rows = bitmap.size(0);
  return scaled_linear(x, values, scales, bias, rows, threads, [&](const Linear& io) {
    qcores().bitmap_qlinear(BitmapArgs{io, Value::i8, values.data_ptr(),
                                       reinterpret_cast<const uint16_t*>(bitmap.data_ptr()),
                                       rowptr.data_ptr<int32_t>(), bitmap.size(1),
                                       bitmap_vpexpand(Value::i8), bitmap_vpexpand_halves()});
  });
}

at::Tensor nm_qlinear(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& x,
                      const std::optional<at::Tensor>& bias, int64_t n, int64_t m,
                      int64_t in_features, int64_t threads,
                      const std::optional<at::Tensor>& scales) {
  check_q(x, in_features, values, "values", 2);
  TORCH_CHECK((m == 4 && (n == 1 || n == 2)) || (m == 8 && n == 4), "unsupported N:M ", n, ":",
              m, " (n, m): 1:4, 2:4 or 4:8");
  check_tensor(indices, "indices", 2, at::kInt);
  const int64_t fbits = m == 4 ? 2 : 4, width = (in_features + m - 1) / m * n;
  check_size(values, "values", 1, width);
  check_size(indices, "indices", 0, values.size(0));
  check_size(indices, "indices", 1, (width + 15) / 16 * fbits / 2);
  const int64_t rows = values.size(0);
  return scaled_linear(x, values, scales, bias, rows, threads, [&](const Linear& io) {
    qcores().nm_qlinear(NMArgs{io, Value::i8, values.data_ptr(),
                               reinterpret_cast<const uint32_t*>(indices.data_ptr()), n, m,
                               fbits, width, indices.size(1)});
  });
}

}  // namespace
}  // namespace sparsekit

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("dense_qlinear", &sparsekit::dense_qlinear);
  m.impl("bitmap_qlinear", &sparsekit::bitmap_qlinear);
  m.impl("nm_qlinear", &sparsekit::nm_qlinear);
}
