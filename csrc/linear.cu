// Linear layers on cuBLASLt: y = epi(x @ W^T + beta * C), with bias and exact-erf GELU done by
// cuBLASLt's BIAS / GELU_BIAS epilogues and a residual added through beta = 1 on the C operand.
// What cuBLASLt has no epilogue for (tanh GELU, QuickGELU, LayerScale gamma after the activation, a
// residual after an activation) is done by one small elementwise pass, `epilogue_fwd`, in place on y.
// SwiGLU is gated: the GEMM writes its 2 N columns (gate, value) to a temporary and `swiglu_fwd`
// reads both halves and writes the N output columns.
//
// cuBLASLt is column-major: a row-major (M, N) matrix is a column-major (N, M) one, so
// Y^T = W X^T is computed with A = W (row-major (N, K) = col-major (K, N), op T) and B = X
// (row-major (M, K) = col-major (K, M), op N). The bias then runs along the rows of the
// column-major D, which is what cuBLASLt's bias epilogue broadcasts over.

#include <cublasLt.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "common.cuh"

namespace fastvit {
namespace {

constexpr int kMaxDevices = 64;

// One handle per device, created on first use (lt_init, from an eager call: creating one inside a
// CUDA graph capture is not allowed) and kept for the process (cuBLASLt handles are thread safe
// once created).
cublasStatus_t get_handle(cublasLtHandle_t* out, bool create) {
  static std::mutex mu;
  static cublasLtHandle_t handles[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return CUBLAS_STATUS_NOT_INITIALIZED;
  std::lock_guard<std::mutex> lock(mu);
  if (handles[dev] == nullptr) {
    if (!create) return CUBLAS_STATUS_NOT_INITIALIZED;
    cublasStatus_t st = cublasLtCreate(&handles[dev]);
    if (st != CUBLAS_STATUS_SUCCESS) {
      handles[dev] = nullptr;
      return st;
    }
  }
  *out = handles[dev];
  return CUBLAS_STATUS_SUCCESS;
}

cudaDataType_t cuda_type(DType dt) {
  switch (dt) {
    case kFloat16: return CUDA_R_16F;
    case kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

// Largest power of two (<= 256) dividing the address: cuBLASLt's heuristic assumes 256-byte
// aligned operands unless told otherwise, and views such as out[:, T:] are not.
uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al) != 0) al >>= 1;
  return al;
}

// RAII holders so that every early return releases the descriptors.
struct Desc {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Desc() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

#define LT_TRY(expr)                                  \
  do {                                                \
    cublasStatus_t st_ = (expr);                      \
    if (st_ != CUBLAS_STATUS_SUCCESS) return st_;     \
  } while (0)

cublasStatus_t set_batch(cublasLtMatrixLayout_t l, int32_t batch, int64_t stride) {
  if (batch <= 1) return CUBLAS_STATUS_SUCCESS;
  LT_TRY(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
  return cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride));
}

template <typename T>
__device__ __forceinline__ float apply_act(float v, Act act) {
  if (act == kActGelu) return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  if (act == kActGeluTanh) {
    const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);  // sqrt(2/pi) (v + 0.044715 v^3)
    return 0.5f * v * (1.f + tanhf(u));
  }
  // x * sigmoid(1.702 x) = x / (1 + exp(-1.702 x)); for large negative x expf overflows to inf and
  // the quotient is -0 (never inf / inf or 0 * inf)
  if (act == kActQuickGelu) return v / (1.f + expf(-1.702f * v));
  return v;
}

// Block shape of the epilogue: kEpiThreads threads as (tx columns) x (kEpiThreads / tx rows).
constexpr int kEpiThreads = 256;

// Rows on y (each thread walks rows m0, m0 + m_step, ...), columns on x (n0, n0 + n_step, ...), so
// the row -> (batch, row in batch) mapping happens once per row and nothing divides per element.
// Even per row nothing divides: m0 and m_step are below 65535 * kEpiThreads < 2^24, so their
// quotient / remainder by rows_per_batch are 32-bit divisions (a divisor clamped to 2^32 - 1 gives
// the same result for dividends that small), done once per thread; each further row adds the step's
// quotient / remainder with one carry. Columns are 32-bit: the launcher keeps N <= 2^31 - 1, and
// n + n_step < 2^31 + 2^24 fits an unsigned int.
template <typename T>
__global__ void __launch_bounds__(kEpiThreads) epilogue_kernel(T* __restrict__ y, int64_t ldy, RowMap map, int64_t rows,
                                                               unsigned N, const T* __restrict__ bias, Act act,
                                                               const T* __restrict__ gamma,
                                                               const T* __restrict__ residual, int64_t ldr) {
  const unsigned n0 = blockIdx.x * blockDim.x + threadIdx.x, n_step = gridDim.x * blockDim.x;
  const unsigned m0 = blockIdx.y * blockDim.y + threadIdx.y, m_step = gridDim.y * blockDim.y;
  const unsigned rpb = static_cast<unsigned>(map.rows_per_batch < UINT32_MAX ? map.rows_per_batch : UINT32_MAX);
  int64_t b = m0 / rpb, r = m0 % rpb;
  const int64_t b_step = m_step / rpb, r_step = m_step % rpb;
  for (int64_t m = m0; m < rows; m += m_step) {
    T* yrow = y + (b * map.batch_row_stride + map.row_offset + r) * ldy;
    const T* rrow = residual != nullptr ? residual + m * ldr : nullptr;
    for (unsigned n = n0; n < N; n += n_step) {
      float v = to_float(yrow[n]);
      if (bias != nullptr) v += to_float(bias[n]);
      v = apply_act<T>(v, act);
      if (gamma != nullptr) v *= to_float(gamma[n]);
      if (rrow != nullptr) v += to_float(rrow[n]);
      yrow[n] = from_float<T>(v);
    }
    b += b_step;
    r += r_step;
    if (r >= map.rows_per_batch) {  // r, r_step < rows_per_batch: one carry at most
      r -= map.rows_per_batch;
      ++b;
    }
  }
}

// SwiGLU epilogue, out of place: the same 2-D grid-stride mapping as epilogue_kernel without the row
// map (rows of y are packed). Columns are 32-bit: N <= 2^30 - 1 keeps N + n (the value column) and
// n + n_step below 2^32.
template <typename T>
__global__ void __launch_bounds__(kEpiThreads) swiglu_kernel(const T* __restrict__ h, int64_t ldh, T* __restrict__ y,
                                                             int64_t ldy, int64_t rows, unsigned N,
                                                             const T* __restrict__ bias, const T* __restrict__ gamma,
                                                             const T* __restrict__ residual, int64_t ldr) {
  const unsigned n0 = blockIdx.x * blockDim.x + threadIdx.x, n_step = gridDim.x * blockDim.x;
  const unsigned m0 = blockIdx.y * blockDim.y + threadIdx.y, m_step = gridDim.y * blockDim.y;
  for (int64_t m = m0; m < rows; m += m_step) {
    const T* hrow = h + m * ldh;
    T* yrow = y + m * ldy;
    const T* rrow = residual != nullptr ? residual + m * ldr : nullptr;
    for (unsigned n = n0; n < N; n += n_step) {
      float g = to_float(hrow[n]), v = to_float(hrow[N + n]);
      if (bias != nullptr) {
        g += to_float(bias[n]);
        v += to_float(bias[N + n]);
      }
      // silu(g) = g / (1 + exp(-g)): for large negative g expf overflows to inf and the quotient is
      // -0 (never inf / inf or 0 * inf)
      float o = g / (1.f + expf(-g)) * v;
      if (gamma != nullptr) o *= to_float(gamma[n]);
      if (rrow != nullptr) o += to_float(rrow[n]);
      yrow[n] = from_float<T>(o);
    }
  }
}

// (block, grid) of the elementwise epilogues for rows x N outputs: column threads the smallest power
// of two >= N in [32, kEpiThreads], the rest of the block on rows, so narrow outputs do not leave
// most of each block idle; about as many blocks as fill any current GPU several times (the loops
// cover the rest).
void epilogue_shape(int64_t rows, int64_t N, dim3* block, dim3* grid) {
  int tx = 32;
  while (tx < kEpiThreads && tx < N) tx *= 2;
  const int ty = kEpiThreads / tx;
  const unsigned gx = grid_for(N, tx, 1024);
  const unsigned gy = grid_for(rows, ty, std::max<int64_t>(1, 65535 / gx));
  *block = dim3(tx, ty);
  *grid = dim3(gx, gy);
}

}  // namespace

const char* lt_status_name(int status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

bool lt_status_falls_back(int status) {
  switch (status) {
    // The call's configuration is what failed: no algorithm for this epilogue / vector alpha /
    // strided batch / alignment on this GPU (NOT_SUPPORTED, also our "heuristic found nothing"),
    // an epilogue + pointer-mode + type combination this cuBLASLt version rejects
    // (INVALID_VALUE), or a feature this GPU lacks (ARCH_MISMATCH). A plainer call may well work.
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_INVALID_VALUE:
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return true;
    // The library, the device or memory failed (NOT_INITIALIZED, ALLOC_FAILED, MAPPING_ERROR,
    // EXECUTION_FAILED, INTERNAL_ERROR, LICENSE_ERROR, codes newer than this list): a plainer
    // GEMM would fail the same way or hide a broken device, so these raise.
    default:
      return false;
  }
}

int lt_init(bool create) {
  cublasLtHandle_t handle;
  return get_handle(&handle, create);
}

int lt_gemm(const GemmArgs& g, cudaStream_t stream) {
  cublasLtHandle_t handle;
  LT_TRY(get_handle(&handle, true));
  const cudaDataType_t t = cuda_type(g.dt);
  Desc d;
  // fp32 inputs use strict fp32 (no TF32) so the fp32 path matches the fp32 reference.
  LT_TRY(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
  if (g.bias != nullptr) epi = g.gelu ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
  else if (g.gelu) epi = CUBLASLT_EPILOGUE_GELU;
  LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  if (g.bias != nullptr)
    LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  if (g.alpha_vec != nullptr) {
    // alpha is a device vector over the rows of the column-major D, i.e. over output features.
    const cublasLtPointerMode_t mode = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST;
    LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, sizeof(mode)));
  }

  LT_TRY(cublasLtMatrixLayoutCreate(&d.a, t, g.K, g.N, g.ldw));  // W^T view, op T -> (N, K)
  LT_TRY(cublasLtMatrixLayoutCreate(&d.b, t, g.K, g.M, g.ldx));  // X^T
  LT_TRY(cublasLtMatrixLayoutCreate(&d.c, t, g.N, g.M, g.ldy));  // Y^T (C and D share it)
  const int32_t batch = static_cast<int32_t>(g.batch);
  LT_TRY(set_batch(d.a, batch, 0));  // the weight is shared by every batch
  LT_TRY(set_batch(d.b, batch, g.stride_x));
  LT_TRY(set_batch(d.c, batch, g.stride_y));

  LT_TRY(cublasLtMatmulPreferenceCreate(&d.pref));
  LT_TRY(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &g.workspace_bytes,
                                              sizeof(g.workspace_bytes)));
  const void* c = g.c != nullptr ? g.c : g.y;
  const uint32_t al[4] = {alignment(g.w), alignment(g.x), alignment(c), alignment(g.y)};
  LT_TRY(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], 4));
  LT_TRY(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], 4));
  LT_TRY(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], 4));
  LT_TRY(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[3], 4));

  cublasLtMatmulHeuristicResult_t res = {};
  int found = 0;
  LT_TRY(cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &res, &found));
  if (found == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
  const float one = 1.f, beta = g.c != nullptr ? 1.f : 0.f;
  const void* alpha = g.alpha_vec != nullptr ? static_cast<const void*>(g.alpha_vec) : &one;
  return cublasLtMatmul(handle, d.op, alpha, g.w, d.a, g.x, d.b, &beta, c, d.c, g.y, d.c, &res.algo, g.workspace,
                        g.workspace_bytes, stream);
}

int epilogue_fwd(DType dt, void* y, int64_t ldy, RowMap map, int64_t rows, int64_t N, const void* bias, Act act,
                 const void* gamma, const void* residual, int64_t ldr, cudaStream_t stream) {
  if (rows < 1 || N < 1 || N > INT32_MAX || map.rows_per_batch < 1) return cudaErrorInvalidValue;
  dim3 block, grid;
  epilogue_shape(rows, N, &block, &grid);
  FASTVIT_DISPATCH(dt, epilogue_kernel<T><<<grid, block, 0, stream>>>(
                           static_cast<T*>(y), ldy, map, rows, static_cast<unsigned>(N), static_cast<const T*>(bias),
                           act, static_cast<const T*>(gamma), static_cast<const T*>(residual), ldr));
  return cudaGetLastError();
}

int swiglu_fwd(DType dt, const void* h, int64_t ldh, void* y, int64_t ldy, int64_t rows, int64_t N, const void* bias,
               const void* gamma, const void* residual, int64_t ldr, cudaStream_t stream) {
  if (rows < 1 || N < 1 || N > (INT32_MAX >> 1)) return cudaErrorInvalidValue;
  dim3 block, grid;
  epilogue_shape(rows, N, &block, &grid);
  FASTVIT_DISPATCH(dt, swiglu_kernel<T><<<grid, block, 0, stream>>>(
                           static_cast<const T*>(h), ldh, static_cast<T*>(y), ldy, rows, static_cast<unsigned>(N),
                           static_cast<const T*>(bias), static_cast<const T*>(gamma),
                           static_cast<const T*>(residual), ldr));
  return cudaGetLastError();
}

}  // namespace fastvit
