// flush_cache: write back and evict tensors' memory from every CPU cache level, for
// autotune's cold timing (sparsekit/engine/autotune.py). Reading several times the cache
// between calls evicts most data, but not reliably a layer timed again and again: on an
// Intel Xeon with a 300 MiB L3 (Emerald Rapids class, two vCPUs) a 5632 x 2048 dense int8
// product timed 0.43 ms after such a read in one process and 0.24 ms in the next, the
// last-level cache keeping the lines it saw reused; after this flush of the layer's own
// tensors it took 0.41-0.43 ms in both, as from memory.

#include <ATen/ATen.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace sparsekit {

namespace {

constexpr int64_t kLine = 64;  // the smallest cache line of the CPUs served: a step never skips one

#if defined(__x86_64__) || defined(_M_X64)
// clflushopt where the CPU has it (CPUID leaf 7, EBX bit 23): its flushes overlap, where
// clflush's are ordered one after another — a 46 MB layer took 1.7 ms against 90-150 ms
// with clflush on the Intel Xeon above, and clflush made every cold timing pay that.
bool has_clflushopt() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 23)) != 0;
}

__attribute__((target("clflushopt"))) void flush_range_opt(const char* p, int64_t n) {
  for (int64_t o = 0; o < n; o += kLine) _mm_clflushopt(const_cast<char*>(p + o));
  _mm_clflushopt(const_cast<char*>(p + n - 1));  // the last line, where p is not aligned to one
  _mm_sfence();
}
#endif

// Whether this build can flush (flush_range does nothing elsewhere).
constexpr bool kFlushes =
#if defined(__x86_64__) || defined(_M_X64) || defined(__aarch64__)
    true;
#else
    false;
#endif

void flush_range(const char* p, int64_t n) {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool opt = has_clflushopt();
  if (opt) return flush_range_opt(p, n);
  for (int64_t o = 0; o < n; o += kLine) _mm_clflush(p + o);
  _mm_clflush(p + n - 1);
  _mm_mfence();
#elif defined(__aarch64__)
  for (int64_t o = 0; o < n; o += kLine) asm volatile("dc civac, %0" : : "r"(p + o) : "memory");
  asm volatile("dc civac, %0" : : "r"(p + n - 1) : "memory");
  asm volatile("dsb ish" : : : "memory");
#else
  (void)p;  // no portable flush: the caller's eviction by reading stands alone
  (void)n;
#endif
}

}  // namespace

// Every tensor is checked (CPU, strided) before any is flushed; each one's whole storage is
// flushed, not only its view's elements. Values are unchanged. Returns whether it flushed.
bool flush_cache(const std::vector<at::Tensor>& tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.layout() == at::kStrided,
                "flush_cache: tensors must be strided CPU tensors, got tensors[", i, "] ",
                t.defined() ? t.toString() : "undefined", " on ",
                t.defined() ? t.device().str() : "no device");
  }
  for (const at::Tensor& t : tensors) {
    const int64_t n = static_cast<int64_t>(t.storage().nbytes());
    if (n > 0) flush_range(static_cast<const char*>(t.storage().data()), n);
  }
  return kFlushes;
}

}  // namespace sparsekit

// Schema and implementation together, like isa.cpp's: no tensor output, nothing to trace.
TORCH_LIBRARY_FRAGMENT(sparsekit, m) {
  m.def("flush_cache(Tensor[] tensors) -> bool", &sparsekit::flush_cache);
}
