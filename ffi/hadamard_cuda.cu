// XLA FFI CUDA handler: normalized Hadamard transform of any LLM size n = K * 2^m.
//
//   y[r, :] = (A ⊗ H_{2^m}) x[r, :] / sqrt(n),   A = H_K (transpose=false) or H_K^T (true)
//
// Same contract and numerics as ffi/hadamard_cpu.cc (see hadamard_common.h): x: [..., n]
// float32 / bfloat16 / float16, H_K: float32 [K, K] device buffer (leading dims of size 1
// allowed), y like x; float32 accumulation, radix-2 butterflies in natural order, then the
// K x K product, then one multiply by float32(1 / sqrt(n)), then round-to-nearest-even.
//
// Fast path: one thread block per row; the row lives in shared memory as float32 (n * 4 bytes,
// up to the device's opt-in limit, e.g. 227 KiB on sm_90 -> n <= 58K); butterflies with
// __syncthreads between stages, then each thread computes outputs of the K x K product from
// shared memory. Rows too large for shared memory take a global-memory path (float32 scratch
// from XLA's allocator, one launch per butterfly stage).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "hadamard_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace resq {
namespace {

template <typename T>
struct IO;

template <>
struct IO<float> {
  static __device__ __forceinline__ float Load(float v) { return v; }
  static __device__ __forceinline__ float Store(float v) { return v; }
};

template <>
struct IO<__nv_bfloat16> {
  static __device__ __forceinline__ float Load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 Store(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct IO<__half> {
  static __device__ __forceinline__ float Load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half Store(float v) { return __float2half_rn(v); }
};

struct Params {
  int64_t rows;
  int64_t n;
  int64_t k;
  int64_t m;  // power of two
  int log2m;
  bool transpose;
  float scale;
};

__device__ __forceinline__ float CoefA(const float* __restrict__ hk, int64_t k, int64_t row,
                                       int64_t col, bool transpose) {
  return transpose ? hk[col * k + row] : hk[row * k + col];
}

// y[e] for e = kk * m + c of one row: sum_j A[kk, j] z[j * m + c], scaled and rounded.
template <typename T>
__device__ __forceinline__ T ProductElement(const float* __restrict__ z, const float* __restrict__ hk,
                                            const Params& p, int64_t e) {
  if (p.k == 1) return IO<T>::Store(z[e] * p.scale);
  const int64_t kk = e >> p.log2m;
  const int64_t c = e & (p.m - 1);
  float acc = 0.0f;
  for (int64_t j = 0; j < p.k; ++j) acc += CoefA(hk, p.k, kk, j, p.transpose) * z[j * p.m + c];
  return IO<T>::Store(acc * p.scale);
}

// One block per row, the row in dynamic shared memory.
template <typename T>
__global__ void HadamardSmemKernel(const T* __restrict__ x, T* __restrict__ y,
                                   const float* __restrict__ hk, Params p) {
  extern __shared__ float z[];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * p.n;
  T* yr = y + row * p.n;
  for (int64_t i = threadIdx.x; i < p.n; i += blockDim.x) z[i] = IO<T>::Load(xr[i]);
  __syncthreads();
  // Stage h pairs element i (bit h of its segment offset clear) with i + h; h < m never crosses a
  // segment boundary, so all K segments are transformed together.
  const int64_t pairs = p.n >> 1;
  for (int lh = 0; lh < p.log2m; ++lh) {
    const int64_t h = int64_t{1} << lh;
    for (int64_t q = threadIdx.x; q < pairs; q += blockDim.x) {
      const int64_t i = ((q >> lh) << (lh + 1)) | (q & (h - 1));
      const float a = z[i], b = z[i + h];
      z[i] = a + b;
      z[i + h] = a - b;
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < p.n; e += blockDim.x) yr[e] = ProductElement<T>(z, hk, p, e);
}

// Global-memory path for rows that do not fit in shared memory.
template <typename T>
__global__ void LoadKernel(const T* __restrict__ x, float* __restrict__ w, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x)
    w[i] = IO<T>::Load(x[i]);
}

__global__ void StageKernel(float* __restrict__ w, int64_t total_pairs, int lh) {
  const int64_t h = int64_t{1} << lh;
  for (int64_t q = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; q < total_pairs;
       q += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = ((q >> lh) << (lh + 1)) | (q & (h - 1));  // rows are multiples of 2h too
    const float a = w[i], b = w[i + h];
    w[i] = a + b;
    w[i + h] = a - b;
  }
}

template <typename T>
__global__ void ProductKernel(const float* __restrict__ w, T* __restrict__ y,
                              const float* __restrict__ hk, Params p) {
  const int64_t total = p.rows * p.n;
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g < total;
       g += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = g / p.n;
    const int64_t e = g - row * p.n;
    y[g] = ProductElement<T>(w + row * p.n, hk, p, e);
  }
}

constexpr int kThreads = 256;

int GridFor(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

ffi::Error LastCudaError(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("resq_hadamard_cuda: ") + what + ": " +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

template <typename T>
ffi::Error Launch(cudaStream_t stream, ffi::ScratchAllocator& scratch, const void* x_raw,
                  void* y_raw, const float* hk, const Params& p) {
  const T* x = static_cast<const T*>(x_raw);
  T* y = static_cast<T*>(y_raw);
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return LastCudaError("cudaGetDevice");
  int smem_optin = 0;
  if (cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess)
    return LastCudaError("cudaDeviceGetAttribute");
  const size_t smem = static_cast<size_t>(p.n) * sizeof(float);
  if (smem <= static_cast<size_t>(smem_optin) && p.rows <= 0x7fffffff) {
    if (smem > 48 * 1024 &&
        cudaFuncSetAttribute(HadamardSmemKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess)
      return LastCudaError("cudaFuncSetAttribute");
    HadamardSmemKernel<T><<<static_cast<unsigned>(p.rows), kThreads, smem, stream>>>(x, y, hk, p);
    return LastCudaError("HadamardSmemKernel launch");
  }
  const int64_t total = p.rows * p.n;
  std::optional<void*> buf = scratch.Allocate(static_cast<size_t>(total) * sizeof(float), 256);
  if (!buf.has_value())
    return ffi::Error::Internal("resq_hadamard_cuda: cannot allocate " +
                                std::to_string(total * 4) + " bytes of scratch");
  float* w = static_cast<float*>(*buf);
  LoadKernel<T><<<GridFor(total), kThreads, 0, stream>>>(x, w, total);
  for (int lh = 0; lh < p.log2m; ++lh)
    StageKernel<<<GridFor(total / 2), kThreads, 0, stream>>>(w, total / 2, lh);
  ProductKernel<T><<<GridFor(total), kThreads, 0, stream>>>(w, y, hk, p);
  return LastCudaError("global-memory path launch");
}

ffi::Error HadamardCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                            ffi::Buffer<ffi::F32> hk, ffi::Result<ffi::AnyBuffer> y,
                            bool transpose) {
  int64_t rows = 0, n = 0, k = 0, m = 0;
  if (ffi::Error err = CheckShapes(x, hk, *y, &rows, &n, &k, &m); err.failure()) return err;
  if (rows == 0 || n == 0) return ffi::Error::Success();
  Params p;
  p.rows = rows;
  p.n = n;
  p.k = k;
  p.m = m;
  p.log2m = 0;
  while ((int64_t{1} << p.log2m) < m) ++p.log2m;
  p.transpose = transpose;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return Launch<float>(stream, scratch, x.untyped_data(), y->untyped_data(), hk.typed_data(), p);
    case ffi::DataType::BF16:
      return Launch<__nv_bfloat16>(stream, scratch, x.untyped_data(), y->untyped_data(),
                                   hk.typed_data(), p);
    default:
      return Launch<__half>(stream, scratch, x.untyped_data(), y->untyped_data(), hk.typed_data(),
                            p);
  }
}

}  // namespace
}  // namespace resq

extern "C" RESQ_EXPORT XLA_FFI_Error* ResqHadamardCuda(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResqHadamardCuda, resq::HadamardCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()          // x: [..., n]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // H_K: [(1, ...,) K, K]
                                  .Ret<ffi::AnyBuffer>()          // y: like x
                                  .Attr<bool>("transpose"));
