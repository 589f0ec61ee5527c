// Shared helpers for the Hadamard XLA FFI handlers (CPU and CUDA).
//
// Transform (docs/algorithms.md, Hadamard sizes; resq_jax/transforms/fwht.py): for x: [rows, n] with
// n = K * M, M = 2^m, each row is viewed as z: [K, M] (K index slowest);
//   z <- z @ H_M                    (unnormalized Sylvester, symmetric, natural order)
//   y[k, :] = sum_j A[k, j] z[j, :]  with A = H_K (transpose=false) or H_K^T (transpose=true)
//   y <- y * (1 / sqrt(n))           (scale rounded to float32 first, as the jnp reference)
// H_K: float32 [K, K] input buffer (any K, including orthogonal non-Hadamard substitutes).
#ifndef RESQ_JAX_FFI_HADAMARD_COMMON_H_
#define RESQ_JAX_FFI_HADAMARD_COMMON_H_

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

#if defined(_WIN32)
#define RESQ_EXPORT __declspec(dllexport)
#else
#define RESQ_EXPORT __attribute__((visibility("default")))
#endif

namespace resq {

// Splits n = k * m with m the power of two n / k. Returns false (and leaves m = 0) when k does
// not divide n or n / k is not a power of two.
inline bool SplitSize(int64_t n, int64_t k, int64_t* m) {
  *m = 0;
  if (n <= 0 || k <= 0 || n % k != 0) return false;
  const int64_t q = n / k;
  if ((q & (q - 1)) != 0) return false;
  *m = q;
  return true;
}

// Validates x: [..., n] (f32/bf16/f16), H_K: [(1,...,) K, K] f32, y like x; sets rows = product of
// the leading dims of x, n, K and M = n / K (a power of two).
inline xla::ffi::Error CheckShapes(const xla::ffi::AnyBuffer& x, const xla::ffi::Buffer<xla::ffi::F32>& hk,
                       const xla::ffi::AnyBuffer& y, int64_t* rows, int64_t* n, int64_t* k,
                       int64_t* m) {
  const auto dt = x.element_type();
  if (dt != xla::ffi::DataType::F32 && dt != xla::ffi::DataType::BF16 && dt != xla::ffi::DataType::F16)
    return xla::ffi::Error::InvalidArgument(
        "resq_hadamard: x must be float32, bfloat16 or float16 (cast other dtypes first)");
  if (y.element_type() != dt)
    return xla::ffi::Error::InvalidArgument("resq_hadamard: output dtype must equal the input dtype");
  const auto xd = x.dimensions();
  const auto yd = y.dimensions();
  if (xd.size() < 1) return xla::ffi::Error::InvalidArgument("resq_hadamard: x must have rank >= 1");
  if (yd.size() != xd.size())
    return xla::ffi::Error::InvalidArgument("resq_hadamard: output shape must equal the input shape");
  for (size_t i = 0; i < xd.size(); ++i)
    if (xd[i] != yd[i])
      return xla::ffi::Error::InvalidArgument("resq_hadamard: output shape must equal the input shape");
  *n = xd.back();
  *rows = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) *rows *= xd[i];
  const auto hd = hk.dimensions();
  if (hd.size() < 2 || hd[hd.size() - 1] != hd[hd.size() - 2])
    return xla::ffi::Error::InvalidArgument("resq_hadamard: H_K must be a square float32 [K, K] matrix");
  for (size_t i = 0; i + 2 < hd.size(); ++i)
    if (hd[i] != 1)
      return xla::ffi::Error::InvalidArgument(
          "resq_hadamard: H_K may only have leading dimensions of size 1 (it is not batched)");
  *k = hd.back();
  if (!SplitSize(*n, *k, m))
    return xla::ffi::Error::InvalidArgument("resq_hadamard: the last axis n = " + std::to_string(*n) +
                                       " is not K * 2^m for K = " + std::to_string(*k));
  return xla::ffi::Error::Success();
}

}  // namespace resq

#endif  // RESQ_JAX_FFI_HADAMARD_COMMON_H_
