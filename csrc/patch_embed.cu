// Patch embedding, part 1 of 2 (part 2 is one cuBLASLt GEMM with the BIAS epilogue and beta = 1,
// issued by bindings.cpp): a single pass that
//   * gathers the image into im2col rows, cols[(b, gy, gx), (c, i, j)] = x[b, c, gy*ph+i, gx*pw+j],
//     cast to the compute dtype, zero past the image edge (timm's dynamic_img_pad), and
//   * initialises the token rows of the output: prefix rows, then the position embedding (or 0)
//     on every patch row, which the GEMM then accumulates onto through its C operand.
// x may be any float dtype or uint8 and any strides (channels-last images need no copy).

#include "common.cuh"

namespace fastvit {
namespace {

template <typename TX, typename T>
__global__ void patch_embed_prep_kernel(const TX* __restrict__ x, int64_t xs0, int64_t xs1, int64_t xs2, int64_t xs3,
                                        int C, int H, int W, int ph, int pw, int gh, int gw, T* __restrict__ cols,
                                        int64_t n_cols, const T* __restrict__ pos, const T* __restrict__ prefix,
                                        int T_, int64_t D, T* __restrict__ out, int64_t n_out) {
  const int64_t Kc = static_cast<int64_t>(C) * ph * pw;
  const int64_t L = static_cast<int64_t>(gh) * gw;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_cols + n_out; i += stride) {
    if (i < n_cols) {
      const int64_t row = i / Kc, col = i % Kc;  // row = (b, gy, gx), col = (c, py, px) as the conv weight
      const int64_t b = row / L, l = row % L;
      const int gy = static_cast<int>(l / gw), gx = static_cast<int>(l % gw);
      const int c = static_cast<int>(col / (ph * pw)), pyx = static_cast<int>(col % (ph * pw));
      const int yy = gy * ph + pyx / pw, xx = gx * pw + pyx % pw;
      float v = 0.f;
      if (yy < H && xx < W) v = to_float(x[b * xs0 + c * xs1 + yy * xs2 + xx * xs3]);
      cols[i] = from_float<T>(v);
    } else {
      const int64_t j = i - n_cols;  // out is (B, T_ + L, D) contiguous
      const int64_t t = (j / D) % (T_ + L), n = j % D;
      T v;
      if (t < T_) v = prefix[t * D + n];
      else v = pos != nullptr ? pos[(t - T_) * D + n] : from_float<T>(0.f);
      out[j] = v;
    }
  }
}

template <typename T>
int launch(DType x_dt, const void* x, const int64_t* xs, int B, int C, int H, int W, int ph, int pw, int gh, int gw,
           void* cols, const void* pos, const void* prefix, int T_, int64_t D, void* out, cudaStream_t stream) {
  const int64_t L = static_cast<int64_t>(gh) * gw;
  const int64_t n_cols = static_cast<int64_t>(B) * L * C * ph * pw;
  // The output rows need initialising only when something is accumulated onto them (pos) or
  // written besides the GEMM (prefix); otherwise the GEMM runs with beta = 0.
  const int64_t n_out = (pos != nullptr || T_ > 0) ? static_cast<int64_t>(B) * (T_ + L) * D : 0;
  constexpr int kThreads = 256;
  const unsigned grid = grid_for(n_cols + n_out, kThreads);
  T* o = static_cast<T*>(out);
  const T* p = static_cast<const T*>(pos);
  const T* pf = static_cast<const T*>(prefix);
  switch (x_dt) {
#define FASTVIT_PE_CASE(DT, TX)                                                                                \
  case DT:                                                                                                     \
    patch_embed_prep_kernel<TX, T><<<grid, kThreads, 0, stream>>>(static_cast<const TX*>(x), xs[0], xs[1],    \
                                                                  xs[2], xs[3], C, H, W, ph, pw, gh, gw,       \
                                                                  static_cast<T*>(cols), n_cols, p, pf, T_, D, \
                                                                  o, n_out);                                   \
    break;
    FASTVIT_PE_CASE(kFloat32, float)
    FASTVIT_PE_CASE(kFloat16, __half)
    FASTVIT_PE_CASE(kBFloat16, __nv_bfloat16)
    FASTVIT_PE_CASE(kUInt8, uint8_t)
#undef FASTVIT_PE_CASE
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

int patch_embed_prep(DType x_dt, DType dt, const void* x, const int64_t* xs, int B, int C, int H, int W, int ph,
                     int pw, int gh, int gw, void* cols, const void* pos, const void* prefix, int n_prefix,
                     int64_t D, void* out, cudaStream_t stream) {
  if (B < 1 || C < 1 || ph < 1 || pw < 1 || gh < 1 || gw < 1 || D < 1 || n_prefix < 0) return cudaErrorInvalidValue;
  if (n_prefix > 0 && prefix == nullptr) return cudaErrorInvalidValue;
  FASTVIT_DISPATCH(dt, return launch<T>(x_dt, x, xs, B, C, H, W, ph, pw, gh, gw, cols, pos, prefix, n_prefix, D, out,
                                        stream));
  return cudaSuccess;
}

}  // namespace fastvit
