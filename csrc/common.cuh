// Device helpers shared by the kernels: float <-> storage type conversions and warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastvit_cuda.h"

namespace fastvit {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(uint8_t v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Grid size for grid-stride loops: enough blocks to fill any current GPU, never zero.
inline unsigned grid_for(int64_t n, int threads, int64_t cap = 65535) {
  int64_t g = (n + threads - 1) / threads;
  if (g < 1) g = 1;
  if (g > cap) g = cap;
  return static_cast<unsigned>(g);
}

}  // namespace fastvit

// Dispatch a storage DType to a C++ type named T inside the lambda-free body.
#define FASTVIT_DISPATCH(DT, ...)                     \
  switch (DT) {                                       \
    case ::fastvit::kFloat32: {                       \
      using T = float;                                \
      __VA_ARGS__;                                    \
    } break;                                          \
    case ::fastvit::kFloat16: {                       \
      using T = __half;                               \
      __VA_ARGS__;                                    \
    } break;                                          \
    case ::fastvit::kBFloat16: {                      \
      using T = __nv_bfloat16;                        \
      __VA_ARGS__;                                    \
    } break;                                          \
    default:                                          \
      return static_cast<int>(cudaErrorInvalidValue); \
  }
