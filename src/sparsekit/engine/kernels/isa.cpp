// Which kernel cores run: the best instruction set this CPU supports (detected when the
// library loads), or one that set_isa chose (tests and benchmarks of every path). Also the
// ops that report and choose it, torch.ops.sparsekit.isa / isas / set_isa, and the same for
// the bitmap expansion of the AVX-512 cores (bitmap_expansion / bitmap_expansions /
// set_bitmap_expansion).

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <vector>

#include "cores.h"

namespace sparsekit {
namespace {

// The cores of every instruction set this CPU (and its OS) runs, the best last.
std::vector<const Cores*> detect() {
  std::vector<const Cores*> found{&scalar::kCores};
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi") &&
                    __builtin_cpu_supports("bmi2");
  if (avx2) found.push_back(&avx2::kCores);
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    found.push_back(&avx512::kCores);
  }
#endif
  return found;
}

const std::vector<const Cores*>& runnable() {
  static const std::vector<const Cores*> found = detect();
  return found;
}

std::atomic<const Cores*> chosen{nullptr};

std::string isa() { return cores().isa; }

std::vector<std::string> isas() {
  std::vector<std::string> names;
  for (const Cores* c : runnable()) names.emplace_back(c->isa);
  return names;
}

// Makes `name` the active instruction set; returns the one it replaces.
std::string set_isa(const std::string& name) {
  for (const Cores* c : runnable()) {
    if (name == c->isa) {
      const std::string before = cores().isa;
      chosen.store(c);
      return before;
    }
  }
  std::string accepted;
  for (const std::string& n : isas()) accepted += (accepted.empty() ? "" : ", ") + n;
  TORCH_CHECK(false, "isa must be one this CPU runs (", accepted, "), got '", name, "'");
}

// The bitmap expansions this CPU runs: "tables" (pshufb by tables of byte ranks, any CPU) and
// "vpexpand" (VBMI2 vpexpandw for bf16 words, bitmap_core.h; vpexpandb for int8 codes,
// qlinear_core.h; both and vexpandps for the bitmap columns, with VBMI vpermb for int8,
// act_bitmap_gemv_core.h) where the AVX-512 cores run and VBMI and VBMI2 are there.
std::vector<std::string> bitmap_expansions() {
  std::vector<std::string> names{"tables"};
#if defined(__x86_64__) || defined(__i386__)
  if (runnable().back() == &avx512::kCores && __builtin_cpu_supports("avx512vbmi") &&
      __builtin_cpu_supports("avx512vbmi2")) {
    names.emplace_back("vpexpand");
  }
#endif
  return names;
}

// Whether the bitmap expansion "auto" takes "vpexpand" for int8 codes (`codes`) or for bf16
// words and fp32 values, in the bitmap rows or in the bitmap columns of act_bitmap_gemv
// (`columns`): on Intel CPUs that run it, for every dtype (1.2-1.4x faster bf16 GEMVs there,
// bitmap_core.h; 1.1-1.6x W8A8 bitmap rows at batch 1-8, 1.2-1.4x float-input int8,
// qlinear_core.h); on AMD Zen 4 (family 19h: its AVX-512 CPUs) for int8 codes and for the
// columns — vpexpandb ran every int8 bitmap kernel faster there (float-input rows
// 1.24-1.29x, W8A8 rows 1.06-1.1x, bitmap columns 1.2-1.45x; 5632x2048, 2048x5632, 2048x2048
// and 11008x4096 at 50 %, one and two threads, weights from memory), and the expand-loads
// the fp32 and bf16 columns (median 1.16-1.24x fp32, 1.02-1.19x bf16 over the tables on the
// LLaMA shapes 6144x2048, 11264x2048, 2048x5632 and 2048x2048 at 50 % x 50 %, two threads,
// weights from memory, 25 interleaved rounds, session 51), while vpexpandw ran the bf16 rows
// 1.3x slower; "tables" elsewhere (AMD Zen 5 ran vpexpandw and expand-loads 2-3x slower than
// the tables, vpexpandb 1.3-2.7x slower).
bool vpexpand_by_default(bool codes, bool columns) {
#if defined(__x86_64__) || defined(__i386__)
  if (bitmap_expansions().size() < 2) return false;
  return __builtin_cpu_is("intel") || ((codes || columns) && __builtin_cpu_is("amdfam19h"));
#else
  (void)codes;
  (void)columns;
  return false;
#endif
}

constexpr int kAuto = -1, kTables = 0, kVpexpand = 1;  // the bitmap expansion setting
std::atomic<int> expansion{kAuto};

std::string bitmap_expansion() {
  const int e = expansion.load(std::memory_order_relaxed);
  return e == kAuto ? "auto" : e == kVpexpand ? "vpexpand" : "tables";
}

// The expansion the kernels use for `values` ("bf16", "fp32" or "int8") now, in the bitmap
// rows or (`columns`) in the bitmap columns of act_bitmap_gemv.
std::string bitmap_expansion_of(const std::string& values, bool columns) {
  TORCH_CHECK(values == "bf16" || values == "fp32" || values == "int8",
              "values must be 'bf16', 'fp32' or 'int8', got '", values, "'");
  const Value v = values == "int8" ? Value::i8 : values == "bf16" ? Value::bf16 : Value::f32;
  return bitmap_vpexpand(v, columns) ? "vpexpand" : "tables";
}

// Makes `name` ("auto" or one of bitmap_expansions) the bitmap expansion; returns the one it
// replaces.
std::string set_bitmap_expansion(const std::string& name) {
  std::string accepted = "auto";
  bool runs = name == "auto";
  for (const std::string& n : bitmap_expansions()) {
    accepted += ", " + n;
    runs |= name == n;
  }
  TORCH_CHECK(runs, "bitmap expansion must be one this CPU runs (", accepted, "), got '", name,
              "'");
  const std::string before = bitmap_expansion();
  expansion.store(name == "auto" ? kAuto : name == "vpexpand" ? kVpexpand : kTables);
  return before;
}

}  // namespace

bool bitmap_vpexpand(Value values, bool columns) {
  const int e = expansion.load(std::memory_order_relaxed);
  if (e != kAuto) return e == kVpexpand;
  static const bool for_codes = vpexpand_by_default(true, false),
                    for_words = vpexpand_by_default(false, false),
                    for_columns = vpexpand_by_default(false, true);
  return values == Value::i8 ? for_codes : columns ? for_columns : for_words;
}

// AMD Zen 4 runs a 512-bit vpexpandb as two dependent 256-bit halves (5 cycles' latency
// against 4 for a 256-bit one, 2.6 cycles a vector with its mask loaded from memory): two
// 256-bit expansions with 256-bit dot products ran the W8A8 bitmap rows 1.22-1.28x faster at
// batch 1 and 1.08-1.15x at batch 2 (11008x4096 and 5632x2048 at 50 % and 30 % density, two
// threads, weights from memory; a one-thread kernel alone: 32 -> 40 weights per ns from L2). Intel CPUs do not split 512-bit operations: there it stays whole (not measured).
bool bitmap_vpexpand_halves() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool zen4 = __builtin_cpu_is("amdfam19h");
  return zen4 && bitmap_vpexpand(Value::i8);
#else
  return false;
#endif
}

const Cores& cores() {
  const Cores* c = chosen.load(std::memory_order_relaxed);
  if (c == nullptr) {
    c = runnable().back();
    const Cores* expected = nullptr;
    chosen.compare_exchange_strong(expected, c);
    c = chosen.load();
  }
  return *c;
}

}  // namespace sparsekit

// Schemas and implementations together: these ops take no tensors, so they have one
// implementation for every dispatch key.
TORCH_LIBRARY_FRAGMENT(sparsekit, m) {
  m.def("isa() -> str", &sparsekit::isa);
  m.def("isas() -> str[]", &sparsekit::isas);
  m.def("set_isa(str name) -> str", &sparsekit::set_isa);
  m.def("bitmap_expansion() -> str", &sparsekit::bitmap_expansion);
  m.def("bitmap_expansions() -> str[]", &sparsekit::bitmap_expansions);
  m.def("bitmap_expansion_of(str values, bool columns=False) -> str",
        &sparsekit::bitmap_expansion_of);
  m.def("set_bitmap_expansion(str name) -> str", &sparsekit::set_bitmap_expansion);
}
