// XLA FFI CPU handler: normalized Hadamard transform of any LLM size n = K * 2^m.
//
//   y[r, :] = (A ⊗ H_{2^m}) x[r, :] / sqrt(n),   A = H_K (transpose=false) or H_K^T (true)
//
// x: [..., n] float32 / bfloat16 / float16 (dense row-major, rows = product of the leading
// dims), H_K: float32 [K, K] (leading dims of size 1 allowed, as added by vmap), y: like x.
// Numerics follow resq_jax.transforms.fwht.hadamard_transform: float32 accumulation, the Sylvester
// butterflies in natural order (bitwise the same adds as the jnp reference), then the K x K
// product, then one multiply by float32(1 / sqrt(n)), then rounding to the output dtype
// (round to nearest even).
//
// Per row: load into a float32 scratch, in-place radix-4 butterflies on each of the K segments
// of length M = 2^m, then the K x K product with a register-tiled micro-kernel writing straight
// to the output. Rows are split over XLA's intra-op thread pool when the call is large.
// The hot code is compiled three times on x86-64 (baseline SSE2, AVX2+FMA, AVX-512) and picked
// at run time with __builtin_cpu_supports, so the library runs on any x86-64 machine.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "hadamard_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if !defined(__GNUC__) && !defined(__clang__)
#error "hadamard_cpu.cc needs GCC (>= 12) or Clang: it uses vector extensions and __builtin_shufflevector"
#endif
#define RESQ_INLINE inline __attribute__((always_inline))
#define RESQ_RESTRICT __restrict__

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(_WIN32)
#define RESQ_X86_DISPATCH 1
#define RESQ_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define RESQ_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define RESQ_X86_DISPATCH 0
#endif

namespace resq {
namespace {

// ------------------------------------------------------------------------------------------
// Element conversions (round to nearest even, NaN stays NaN, overflow goes to inf).
// ------------------------------------------------------------------------------------------

RESQ_INLINE uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

RESQ_INLINE float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

struct F32IO {
  using T = float;
  static RESQ_INLINE float Load(T v) { return v; }
  static RESQ_INLINE T Store(float v) { return v; }
};

struct BF16IO {
  using T = uint16_t;
  static RESQ_INLINE float Load(T v) { return BitsFloat(static_cast<uint32_t>(v) << 16); }
  static RESQ_INLINE T Store(float v) {
    uint32_t u = FloatBits(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<T>((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<T>(u >> 16);
  }
};

struct F16IO {
  using T = uint16_t;
  static RESQ_INLINE float Load(T h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    if (exp == 0x1fu) return BitsFloat(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float32
      const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;
      return BitsFloat(sign | FloatBits(mag));
    }
    return BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  }
  static RESQ_INLINE T Store(float f) {
    const uint32_t u = FloatBits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return static_cast<T>(sign | 0x7e00u);  // NaN
    if (a >= 0x477ff000u) return static_cast<T>(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (a < 0x38800000u) {
      // |f| < 2^-14: subnormal half. Adding 0.5f (ulp 2^-24) rounds to a multiple of 2^-24
      // with the FPU's round-to-nearest-even; the low mantissa bits are the half's bits.
      const float t = BitsFloat(a) + 0.5f;
      return static_cast<T>(sign | (FloatBits(t) - 0x3f000000u));
    }
    a += 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent (-112 << 23) and round to even
    return static_cast<T>(sign | (a >> 13));
  }
};

// ------------------------------------------------------------------------------------------
// Kernels (always inlined into the per-ISA entry points below).
// ------------------------------------------------------------------------------------------

struct Job {
  const void* x = nullptr;
  void* y = nullptr;
  const float* panels = nullptr;  // A packed in panels of 4 rows: [K/4][K][4], then tail rows [K]
  int64_t rows = 0;
  int64_t n = 0;
  int64_t k = 0;
  int64_t m = 0;  // power of two, n = k * m
  float scale = 1.0f;
};


// Vector types (GCC/Clang vector extensions; each ISA entry point below compiles them to its
// own registers: xmm for the baseline, ymm for AVX2, zmm for AVX-512).
typedef float V4 __attribute__((vector_size(16)));
typedef float V8 __attribute__((vector_size(32)));
typedef float V16 __attribute__((vector_size(64)));

template <class V>
constexpr int kLanes = static_cast<int>(sizeof(V) / sizeof(float));

template <class V>
RESQ_INLINE V LoadV(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V>
RESQ_INLINE void StoreV(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <class V>
RESQ_INLINE V Splat(float a) {
  return V{} + a;  // scalar operand broadcasts to every lane (plain float: V{} + a == a)
}

// One butterfly stage of distance h inside a vector (h < lanes): lane i gets
// x[i] + x[i + h] if bit h of i is clear, x[i - h] - x[i] if it is set (a + (-b) == a - b
// exactly, so the result equals the scalar radix-2 stage bit for bit).
template <int H, class V, size_t... I>
RESQ_INLINE V LaneStage(V x, std::index_sequence<I...>) {
  const V lo = __builtin_shufflevector(x, x, static_cast<int>(I & ~static_cast<size_t>(H))...);
  const V hi = __builtin_shufflevector(x, x, static_cast<int>(I | static_cast<size_t>(H))...);
  const V sign = {((I & static_cast<size_t>(H)) ? -1.0f : 1.0f)...};
  return lo + hi * sign;
}

// Stages h = 1, 2, ..., min(lanes, m) / 2 on every vector of x[0, len) (len % lanes == 0).
template <class V>
RESQ_INLINE void InLaneStages(float* RESQ_RESTRICT x, int64_t len, int64_t m) {
  constexpr int W = kLanes<V>;
  using Seq = std::make_index_sequence<W>;
  const int64_t top = std::min<int64_t>(W, m);
  for (int64_t i = 0; i < len; i += W) {
    V v = LoadV<V>(x + i);
    if constexpr (W >= 2) {
      if (top >= 2) v = LaneStage<1>(v, Seq{});
    }
    if constexpr (W >= 4) {
      if (top >= 4) v = LaneStage<2>(v, Seq{});
    }
    if constexpr (W >= 8) {
      if (top >= 8) v = LaneStage<4>(v, Seq{});
    }
    if constexpr (W >= 16) {
      if (top >= 16) v = LaneStage<8>(v, Seq{});
    }
    StoreV(x + i, v);
  }
}

// Butterflies of stages h and 2h fused in one pass over x[0, len) (h a multiple of the lanes of
// V): exactly the adds and subtracts of two radix-2 stages, so results match the jnp reference.
template <class V>
RESQ_INLINE void Radix4(float* RESQ_RESTRICT x, int64_t len, int64_t h) {
  constexpr int W = kLanes<V>;
  for (int64_t i = 0; i < len; i += 4 * h) {
    float* RESQ_RESTRICT p0 = x + i;
    float* RESQ_RESTRICT p1 = p0 + h;
    float* RESQ_RESTRICT p2 = p1 + h;
    float* RESQ_RESTRICT p3 = p2 + h;
    for (int64_t j = 0; j < h; j += W) {
      const V x0 = LoadV<V>(p0 + j), x1 = LoadV<V>(p1 + j);
      const V x2 = LoadV<V>(p2 + j), x3 = LoadV<V>(p3 + j);
      const V a0 = x0 + x1, a1 = x0 - x1, a2 = x2 + x3, a3 = x2 - x3;
      StoreV(p0 + j, a0 + a2);
      StoreV(p1 + j, a1 + a3);
      StoreV(p2 + j, a0 - a2);
      StoreV(p3 + j, a1 - a3);
    }
  }
}

template <class V>
RESQ_INLINE void Radix2(float* RESQ_RESTRICT x, int64_t len, int64_t h) {
  constexpr int W = kLanes<V>;
  for (int64_t i = 0; i < len; i += 2 * h) {
    float* RESQ_RESTRICT p0 = x + i;
    float* RESQ_RESTRICT p1 = p0 + h;
    for (int64_t j = 0; j < h; j += W) {
      const V a = LoadV<V>(p0 + j), b = LoadV<V>(p1 + j);
      StoreV(p0 + j, a + b);
      StoreV(p1 + j, a - b);
    }
  }
}

// Stages h in [h, h_end) (powers of two, h >= lanes of V) on x[0, len), two per pass.
template <class V>
RESQ_INLINE void WideStages(float* RESQ_RESTRICT x, int64_t len, int64_t h, int64_t h_end) {
  for (; 4 * h <= h_end; h *= 4) Radix4<V>(x, len, h);
  if (h < h_end) Radix2<V>(x, len, h);
}

constexpr int64_t kFwhtBlock = 2048;  // floats (8 KiB): stages below this run block by block in L1

// Unnormalized Sylvester transform (natural order) of every length-m segment of x[0, len)
// (m a power of two, m | len). A stage with h < m never crosses a segment boundary, so each
// stage runs over all segments at once; stages h < kFwhtBlock run one L1-sized block at a time.
template <class V>
RESQ_INLINE void FwhtSegments(float* RESQ_RESTRICT x, int64_t len, int64_t m) {
  constexpr int W = kLanes<V>;
  if (m < 2) return;
  if (len % W != 0) {  // tiny n (< lanes): scalar stages
    for (int64_t h = 1; h < m; h *= 2) Radix2<float>(x, len, h);
    return;
  }
  const int64_t inner = std::min<int64_t>(m, kFwhtBlock);  // stages h < inner run per block
  const int64_t block = inner * std::max<int64_t>(1, kFwhtBlock / inner);
  for (int64_t b = 0; b < len; b += block) {
    const int64_t bl = std::min<int64_t>(block, len - b);  // a multiple of inner
    InLaneStages<V>(x + b, bl, inner);
    if (inner > W) WideStages<V>(x + b, bl, W, inner);
  }
  if (m > inner) WideStages<V>(x, len, inner, m);
}

// Output tile y[k0 + r, c0 + c] for r < KB, c < NV * lanes(V) (row stride m):
//   sum_j A[k0 + r, j] z[j, c0 + c], times scale, rounded to the output dtype.
// panel: A rows k0..k0+KB-1 interleaved, [K][KB].
template <class IO, class V, int KB, int NV>
RESQ_INLINE void ProductTile(const float* RESQ_RESTRICT panel, const float* RESQ_RESTRICT z,
                             int64_t k, int64_t m, int64_t c0, typename IO::T* RESQ_RESTRICT y,
                             float scale) {
  constexpr int W = kLanes<V>;
  V acc[KB][NV];
  for (int r = 0; r < KB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t j = 0; j < k; ++j) {
    const float* RESQ_RESTRICT zj = z + j * m + c0;
    V zv[NV];
    for (int v = 0; v < NV; ++v) zv[v] = LoadV<V>(zj + v * W);
    const float* RESQ_RESTRICT aj = panel + j * KB;
    for (int r = 0; r < KB; ++r) {
      const V a = Splat<V>(aj[r]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * zv[v];
    }
  }
  const V s = Splat<V>(scale);
  for (int r = 0; r < KB; ++r) {
    typename IO::T* RESQ_RESTRICT yr = y + r * m + c0;
    for (int v = 0; v < NV; ++v) {
      float out[W];
      StoreV(out, acc[r][v] * s);
      for (int c = 0; c < W; ++c) yr[v * W + c] = IO::Store(out[c]);
    }
  }
}

constexpr int kPanel = 4;  // rows of A per register tile

template <class IO, class V, int NV>
RESQ_INLINE void ProductRow(const Job& job, const float* RESQ_RESTRICT z,
                            typename IO::T* RESQ_RESTRICT y) {
  constexpr int CB = kLanes<V> * NV;
  const int64_t k = job.k, m = job.m;
  const int64_t k_main = k - k % kPanel;
  for (int64_t k0 = 0; k0 < k_main; k0 += kPanel) {
    const float* panel = job.panels + k0 * k;
    for (int64_t c0 = 0; c0 < m; c0 += CB)
      ProductTile<IO, V, kPanel, NV>(panel, z, k, m, c0, y + k0 * m, job.scale);
  }
  for (int64_t k0 = k_main; k0 < k; ++k0) {
    const float* panel = job.panels + k0 * k;
    for (int64_t c0 = 0; c0 < m; c0 += CB)
      ProductTile<IO, V, 1, NV>(panel, z, k, m, c0, y + k0 * m, job.scale);
  }
}

// Rows [r0, r1) of the job; z: float32 scratch of job.n elements. VW: the ISA's widest vector.
template <class IO, class VW>
RESQ_INLINE void RunRows(const Job& job, int64_t r0, int64_t r1, float* RESQ_RESTRICT z) {
  using T = typename IO::T;
  constexpr int W = kLanes<VW>;
  const int64_t n = job.n, m = job.m;
  const T* x = static_cast<const T*>(job.x);
  T* y = static_cast<T*>(job.y);
  for (int64_t r = r0; r < r1; ++r) {
    const T* RESQ_RESTRICT xr = x + r * n;
    T* RESQ_RESTRICT yr = y + r * n;
    for (int64_t i = 0; i < n; ++i) z[i] = IO::Load(xr[i]);
    if (m >= W || n % W != 0) {
      FwhtSegments<VW>(z, n, m);
    } else if (m >= 4 && n % 4 == 0) {
      FwhtSegments<V4>(z, n, m);
    } else {
      FwhtSegments<float>(z, n, m);
    }
    if (job.k == 1) {
      const float s = job.scale;
      for (int64_t i = 0; i < n; ++i) yr[i] = IO::Store(z[i] * s);
      continue;
    }
    // Column tiles of two vectors (m is a power of two: the widest tile that divides it).
    if (m >= 2 * W) {
      ProductRow<IO, VW, 2>(job, z, yr);
    } else if (W > 8 && m >= 16) {
      ProductRow<IO, V8, 2>(job, z, yr);
    } else if (W > 4 && m >= 8) {
      ProductRow<IO, V4, 2>(job, z, yr);
    } else if (m >= 4) {
      ProductRow<IO, V4, 1>(job, z, yr);
    } else if (m == 2) {
      ProductRow<IO, float, 2>(job, z, yr);
    } else {
      ProductRow<IO, float, 1>(job, z, yr);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Per-ISA entry points and run-time selection.
// ------------------------------------------------------------------------------------------

using RowsFn = void (*)(const Job&, int64_t, int64_t, float*);

template <class IO>
void RowsBaseline(const Job& job, int64_t r0, int64_t r1, float* z) {
  RunRows<IO, V4>(job, r0, r1, z);  // 4x8 product tile: 8 xmm accumulators
}

#if RESQ_X86_DISPATCH
template <class IO>
RESQ_TARGET_AVX2 void RowsAvx2(const Job& job, int64_t r0, int64_t r1, float* z) {
  RunRows<IO, V8>(job, r0, r1, z);  // 4x16 product tile: 8 ymm accumulators
}

template <class IO>
RESQ_TARGET_AVX512 void RowsAvx512(const Job& job, int64_t r0, int64_t r1, float* z) {
  RunRows<IO, V16>(job, r0, r1, z);  // 4x32 product tile: 8 zmm accumulators
}
#endif

enum Isa : int32_t { kIsaAuto = 0, kIsaBaseline = 1, kIsaAvx2 = 2, kIsaAvx512 = 3 };

// Best ISA this CPU supports (the request is capped to it).
int32_t ResolveIsa(int32_t requested) {
  int32_t best = kIsaBaseline;
#if RESQ_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = kIsaAvx2;
  if (best == kIsaAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    best = kIsaAvx512;
#endif
  if (requested <= kIsaAuto) return best;
  return std::min(requested, best);
}

template <class IO>
RowsFn SelectRows(int32_t isa) {
#if RESQ_X86_DISPATCH
  if (isa == kIsaAvx512) return &RowsAvx512<IO>;
  if (isa == kIsaAvx2) return &RowsAvx2<IO>;
#endif
  (void)isa;
  return &RowsBaseline<IO>;
}

// ------------------------------------------------------------------------------------------
// Row partitioning over XLA's intra-op thread pool.
//
// Chunks of rows are claimed from an atomic counter by the calling thread and by helper
// tasks; the caller only waits for chunks already claimed (which are running), so the call
// cannot deadlock even if the pool never runs a helper. Helpers that start late find no work.
// ------------------------------------------------------------------------------------------

struct AlignedFloats {
  explicit AlignedFloats(int64_t count)
      : data(static_cast<float*>(::operator new[](static_cast<size_t>(count) * sizeof(float),
                                                   std::align_val_t(64)))) {}
  ~AlignedFloats() { ::operator delete[](data, std::align_val_t(64)); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  float* data;
};

struct Shared {
  Job job;
  RowsFn rows_fn = nullptr;
  std::vector<float> panels;
  int64_t chunk_rows = 1;
  int64_t num_chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Work() {
    int64_t c = next.fetch_add(1, std::memory_order_relaxed);
    if (c >= num_chunks) return;
    AlignedFloats scratch(job.n);
    for (; c < num_chunks; c = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t r0 = c * chunk_rows;
      const int64_t r1 = std::min(job.rows, r0 + chunk_rows);
      rows_fn(job, r0, r1, scratch.data);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == num_chunks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }

  void WaitAll() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done.load(std::memory_order_acquire) == num_chunks; });
  }
};

constexpr int64_t kMinWorkPerThread = int64_t{1} << 18;  // ~ flops; below this, stay serial

int64_t Log2(int64_t v) {
  int64_t l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

ffi::Error HadamardCpuImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> hk,
                           ffi::Result<ffi::AnyBuffer> y, bool transpose, int32_t isa) {
  int64_t rows = 0, n = 0, k = 0, m = 0;
  if (ffi::Error err = CheckShapes(x, hk, *y, &rows, &n, &k, &m); err.failure()) return err;
  if (rows == 0 || n == 0) return ffi::Error::Success();

  auto shared = std::make_shared<Shared>();
  Shared& s = *shared;
  const int32_t resolved = ResolveIsa(isa);
  switch (x.element_type()) {
    case ffi::DataType::F32:
      s.rows_fn = SelectRows<F32IO>(resolved);
      break;
    case ffi::DataType::BF16:
      s.rows_fn = SelectRows<BF16IO>(resolved);
      break;
    default:
      s.rows_fn = SelectRows<F16IO>(resolved);
      break;
  }

  // Pack A = H_K or H_K^T: panels of kPanel rows interleaved [K/kPanel][K][kPanel], then the
  // remaining K % kPanel rows one after another.
  const float* h = hk.typed_data();
  s.panels.resize(static_cast<size_t>(k * k));
  const int64_t k_main = k - k % kPanel;
  auto a_at = [&](int64_t row, int64_t col) { return transpose ? h[col * k + row] : h[row * k + col]; };
  for (int64_t k0 = 0; k0 < k_main; k0 += kPanel)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t r = 0; r < kPanel; ++r) s.panels[k0 * k + j * kPanel + r] = a_at(k0 + r, j);
  for (int64_t k0 = k_main; k0 < k; ++k0)
    for (int64_t j = 0; j < k; ++j) s.panels[k0 * k + j] = a_at(k0, j);

  s.job.x = x.untyped_data();
  s.job.y = y->untyped_data();
  s.job.panels = s.panels.data();
  s.job.rows = rows;
  s.job.n = n;
  s.job.k = k;
  s.job.m = m;
  s.job.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));

  const int64_t work_per_row = n * (Log2(m) + (k > 1 ? 2 * k : 1));
  const int64_t total_work = rows * work_per_row;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, total_work / kMinWorkPerThread));
  threads = std::min<int64_t>(threads, rows);
  // A few chunks per thread for balance, each at least one row.
  const int64_t target_chunks = threads == 1 ? 1 : threads * 4;
  s.chunk_rows = std::max<int64_t>(1, (rows + target_chunks - 1) / target_chunks);
  s.num_chunks = (rows + s.chunk_rows - 1) / s.chunk_rows;

  for (int64_t t = 1; t < threads; ++t) pool.Schedule([shared] { shared->Work(); });
  s.Work();
  s.WaitAll();
  return ffi::Error::Success();
}

}  // namespace
}  // namespace resq

extern "C" RESQ_EXPORT XLA_FFI_Error* ResqHadamardCpu(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResqHadamardCpu, resq::HadamardCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x: [..., n]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // H_K: [(1, ...,) K, K]
                                  .Ret<ffi::AnyBuffer>()          // y: like x
                                  .Attr<bool>("transpose")
                                  .Attr<int32_t>("isa"));  // 0 auto, 1 baseline, 2 avx2, 3 avx512

// The ISA the handler would use on this CPU for a request (0 = auto): for tests and benchmarks.
extern "C" RESQ_EXPORT int32_t ResqHadamardCpuIsa(int32_t requested) {
  return resq::ResolveIsa(requested);
}
