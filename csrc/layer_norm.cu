// LayerNorm over the last dim, the prologue of the fused linear: one block per row, float32
// statistics with the two-pass (mean, then centred sum of squares) form, which has no
// cancellation problem for rows with a large mean. The row is re-read from global memory for each
// pass; a row is at most a few KiB, so the re-reads hit L1 / L2.

#include "common.cuh"

namespace fastvit {
namespace {

constexpr int kThreads = 256;

// Sum over the block; every thread gets the result. `red` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = warp_sum(v);
  __syncthreads();  // red may still be read from the previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? red[lane] : 0.f;
  return warp_sum(v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(const T* __restrict__ x, int64_t ldx,
                                                              const T* __restrict__ w, const T* __restrict__ b,
                                                              T* __restrict__ y, int64_t D, float eps) {
  __shared__ float red[kThreads / 32];
  const T* xr = x + static_cast<int64_t>(blockIdx.x) * ldx;
  T* yr = y + static_cast<int64_t>(blockIdx.x) * D;
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < D; i += kThreads) s += to_float(xr[i]);
  const float mean = block_sum(s, red) / static_cast<float>(D);
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < D; i += kThreads) {
    const float c = to_float(xr[i]) - mean;
    ss = fmaf(c, c, ss);
  }
  const float rstd = rsqrtf(block_sum(ss, red) / static_cast<float>(D) + eps);
  for (int64_t i = threadIdx.x; i < D; i += kThreads) {
    float o = (to_float(xr[i]) - mean) * rstd;
    if (w != nullptr) o *= to_float(w[i]);
    if (b != nullptr) o += to_float(b[i]);
    yr[i] = from_float<T>(o);
  }
}

}  // namespace

int layer_norm_fwd(DType dt, const void* x, int64_t ldx, const void* weight, const void* bias, void* y, int64_t M,
                   int64_t D, float eps, cudaStream_t stream) {
  if (M < 1 || D < 1 || M > 0x7fffffff) return cudaErrorInvalidValue;
  FASTVIT_DISPATCH(dt, layer_norm_kernel<T><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(
                           static_cast<const T*>(x), ldx, static_cast<const T*>(weight),
                           static_cast<const T*>(bias), static_cast<T*>(y), D, eps));
  return cudaGetLastError();
}

}  // namespace fastvit
