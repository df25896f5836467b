// The bitmap-row op: y = x @ W.T + bias on CPU.
//
// Per row one bit per input (16-bit words, zero-padded per row), the fp32, bf16 or int8
// values of the set bits packed row by row and int32 row pointers into them: 4 (bf16: 2,
// int8: 1) bytes per nonzero plus 1 bit per weight (int8: plus a float32 scale per row).
// The arithmetic is bitmap_core.h, compiled per instruction set: AVX2 and AVX-512 move each
// byte's packed values into the lanes of their inputs with one shuffle whose controls come
// from a table indexed by the byte, so the GEMV is a dense-like streaming loop over the row
// (bf16 values on Intel CPUs with VBMI2: one vpexpandw per word, the bitmap expansion
// "vpexpand", isa.cpp; int8 codes there: vpexpandb, qlinear_core.h).
// int8 values on an AVX-512 CPU with VBMI take the W8A8 cores' GEMV row instead
// (qlinear_core.h, BitmapFloat): 64 codes per byte permute.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "common.h"
#include "qlinear.h"

namespace {

// y = x @ W.T (+ bias); W as (fp32/bf16/int8 values, int16 bitmap (rows, ceil(in_features /
// 16)), int32 row pointers), with no bit set at or beyond in_features (checked where the
// format is built); int8 values times scales[r]; x fp32 or bf16, y in its dtype.
at::Tensor bitmap_linear(const at::Tensor& values, const at::Tensor& bitmap,
                         const at::Tensor& rowptr, const at::Tensor& x,
                         const std::optional<at::Tensor>& bias, int64_t in_features,
                         int64_t threads, const std::optional<at::Tensor>& scales) {
  sparsekit::check_input_or_bf16(x, in_features);
  sparsekit::check_values(values, 1);
  sparsekit::check_tensor(bitmap, "bitmap", 2, at::kShort);
  sparsekit::check_size(bitmap, "bitmap", 1, (in_features + 15) / 16);
  sparsekit::check_rowptr(rowptr, "rowptr", bitmap.size(0), values.numel());
  const int64_t rows = bitmap.size(0);
  const auto groups = sparsekit::group_scales(scales, values, rows, in_features);
  TORCH_CHECK(groups.size % 16 == 0, "scales of shape ", scales->sizes(), " make groups of ",
              groups.size, " inputs; the bitmap kernel takes groups of a multiple of 16 "
              "(whole bitmap words)");
  return sparsekit::scaled_linear(
      x, values, scales, bias, rows, threads, [&](const sparsekit::Linear& io) {
        const sparsekit::Value value = sparsekit::value_type(values);
        const sparsekit::BitmapArgs args{io,
                                         value,
                                         values.data_ptr(),
                                         reinterpret_cast<const uint16_t*>(bitmap.data_ptr()),
                                         rowptr.data_ptr<int32_t>(),
                                         bitmap.size(1),
                                         sparsekit::bitmap_vpexpand(value),
                                         false,
                                         groups.data,
                                         groups.size};
        // int8 codes expand faster with the byte permutes of the W8A8 cores' instruction
        // set, where it is the active one
        const auto& q = sparsekit::qcores();
        const bool same_isa = std::strcmp(q.isa, sparsekit::cores().isa) == 0;
        if (args.value == sparsekit::Value::i8 && same_isa) {
          q.bitmap_int8_linear(args);
        } else {
          sparsekit::cores().bitmap_linear(args);
        }
      },
      groups.data != nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("bitmap_linear", &bitmap_linear); }
