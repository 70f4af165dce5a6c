// Launchers shared by the .cu files and bindings.cpp.
//
// The .cu files include only CUDA headers (no torch): they compile in seconds per arch, so CI
// can run nvcc -Xptxas -v on each of them for sm_80 and sm_90. bindings.cpp owns every torch
// type: it validates arguments with TORCH_CHECK, allocates outputs and workspaces, and passes
// raw pointers, strides and the current stream here. Every launcher returns a cudaError_t-like
// int (0 = success) or, for the cuBLASLt paths, a cublasStatus_t; bindings.cpp turns failures
// into exceptions that name the op.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace fastvit {

// Element types crossing the boundary; the values are fixed (bindings.cpp maps torch dtypes).
// kUInt8: patch_embed's image only (pixels cast to the compute dtype in the im2col pass)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kUInt8 = 3 };

// Activations of the linear epilogue: the codes of fastvit.facts.ACT_CODES (tests/test_facts.py).
// kActQuickGelu is OpenAI CLIP's x * sigmoid(1.702 x). kActSwiglu is gated: the GEMM has 2 N output
// columns (gate rows of the weight first, then value rows) and swiglu_fwd writes silu(gate) * value.
enum Act : int { kActNone = 0, kActGelu = 1, kActGeluTanh = 2, kActQuickGelu = 3, kActSwiglu = 4 };
// The last activation code: bindings.cpp accepts kActNone..kActLast.
constexpr Act kActLast = kActSwiglu;

// ------------------------------------------------------------------ attention.cu
// q, k, v: (B, H, N | Nkv, d) with element strides (sb, sh, sn) and unit stride on d.
// out: (B, N, H, d) contiguous, i.e. [B, N, H * d]. d <= kMaxHeadDim, which fastvit.cuda declares
// as its LIMITS.max_head_dim (tests/test_facts.py checks the two agree).
constexpr int kMaxHeadDim = 128;
// Query rows per block: tensor-core kernel (fp16 / bf16) and fp32 kernel. The launch is a 1-D grid
// of B * H * ceil(N / rows) blocks, query blocks of one (batch, head) adjacent (attention.cu says
// why); gridDim.x allows at most kMaxGridX blocks, which bindings.cpp checks with the shape.
constexpr int kAttnBlockM = 64;
constexpr int kAttnBlockMF32 = 4;
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int attention_block_m(DType dt) { return dt == kFloat32 ? kAttnBlockMF32 : kAttnBlockM; }
constexpr int64_t attention_grid_blocks(DType dt, int64_t B, int64_t H, int64_t N) {
  return B * H * ((N + attention_block_m(dt) - 1) / attention_block_m(dt));
}
// Optional logit bias, added after the scale: bias[b, h, i, j] at
//   ptr + b * strides[0] + h * strides[1] + i * strides[2] + j   (elements of dtype dt)
// strides[0] = 0 broadcasts one (H, N, N_kv) bias over the batch. ptr null: no bias.
struct AttnBias {
  const void* ptr;
  DType dt;
  int64_t strides[3];
};
// Optional rotary embedding of q and k, table cat([sin, cos], -1): row t of head h at
//   ptr + h * strides[0] + t * strides[1]   (strides[0] = 0: one table for every head)
// holds sin in columns [0, d) and cos in [d, 2 d). The last n_rot tokens of q (of k) are rotated
// with table rows 0..n_rot-1; pairs (2 i, 2 i + 1), or (i, i + d / 2) with `half`. The rotation is
// float32 (no fused multiply-add, as the reference) and rounded to the input dtype. ptr null: none.
struct AttnRope {
  const void* ptr;
  DType dt;
  int64_t strides[2];
  int n_rot;
  bool half;
};
int attention_fwd(DType dt, const void* q, const void* k, const void* v, void* out, int B, int H, int N, int Nkv,
                  int d, const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides, float scale,
                  const AttnBias& bias, const AttnRope& rope, cudaStream_t stream);

// ------------------------------------------------------------------ layer_norm.cu
// x: (M, D) with row stride ldx (elements) and unit column stride; y: (M, D) contiguous.
// weight, bias: (D,) or null. Statistics in float32.
int layer_norm_fwd(DType dt, const void* x, int64_t ldx, const void* weight, const void* bias, void* y, int64_t M,
                   int64_t D, float eps, cudaStream_t stream);

// ------------------------------------------------------------------ linear.cu
// Row-major Y (rows x N) with rows = batch * rows_per_batch: row m lives at
//   Y + ((m / rows_per_batch) * batch_row_stride + row_offset + m % rows_per_batch) * ldy.
struct RowMap {
  int64_t rows_per_batch;
  int64_t batch_row_stride;
  int64_t row_offset;
};

// In place on Y: Y = act(Y + bias) * gamma + residual, each term optional (null pointer).
// residual is row-major with row stride ldr, indexed by the packed row m (not the mapped row).
// N <= 2^31 - 1 (columns are 32-bit in the kernel), else cudaErrorInvalidValue.
int epilogue_fwd(DType dt, void* y, int64_t ldy, RowMap map, int64_t rows, int64_t N, const void* bias, Act act,
                 const void* gamma, const void* residual, int64_t ldr, cudaStream_t stream);

// SwiGLU epilogue: y[m, n] = silu(h[m, n] + bias[n]) * (h[m, N + n] + bias[N + n]) * gamma[n]
// + residual[m, n] for n < N: h (rows, 2 N) row-major with row stride ldh (the GEMM's output, gate
// columns first), y (rows, N) with row stride ldy, residual with row stride ldr; bias (2 N,),
// gamma (N,) and residual optional (null). Float32 math. N <= 2^30 - 1, else cudaErrorInvalidValue.
int swiglu_fwd(DType dt, const void* h, int64_t ldh, void* y, int64_t ldy, int64_t rows, int64_t N, const void* bias,
               const void* gamma, const void* residual, int64_t ldr, cudaStream_t stream);

// One cuBLASLt call: for b in [0, batch):  Y_b = epi(alpha * X_b @ W^T + beta * C_b + bias)
//   X_b: (M, K) row-major, row stride ldx, batch stride stride_x.  W: (N, K) row-major, ldw,
//   shared by all batches.  Y_b: (M, N), row stride ldy, batch stride stride_y.  C_b: same
//   layout as Y_b (pass C == Y for in place) or null (beta ignored).  epi: bias (N,) added and
//   optionally exact-erf GELU applied by cuBLASLt's BIAS / GELU_BIAS epilogues.
// Returns a cublasStatus_t: CUBLAS_STATUS_NOT_SUPPORTED (15) also when the heuristic offers no
// algorithm. lt_status_falls_back says which failures the caller retries with a plainer call.
struct GemmArgs {
  DType dt;
  int64_t M, N, K, batch;
  const void* x;
  int64_t ldx, stride_x;
  const void* w;
  int64_t ldw;
  void* y;
  int64_t ldy, stride_y;
  const void* c;  // null: beta = 0
  const void* bias;
  bool gelu;  // exact erf GELU after the bias (cuBLASLt GELU / GELU_BIAS epilogue)
  // Per-output-feature alpha (N,) float32 on the device, or null for alpha = 1: LayerScale gamma
  // folded into the GEMM (the bias passed must then be bias * gamma; the bias is not scaled).
  const float* alpha_vec;
  void* workspace;
  size_t workspace_bytes;
};
int lt_gemm(const GemmArgs& a, cudaStream_t stream);
constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLAS recommends 32 MiB on Hopper

// The current device's cuBLASLt handle (one per device, kept for the process): CUBLAS_STATUS_SUCCESS
// when it exists, after creating it if `create`; else CUBLAS_STATUS_NOT_INITIALIZED (or the
// creation's failure). Callers create it from an eager call, never inside a CUDA graph capture.
int lt_init(bool create);
// "CUBLAS_STATUS_INVALID_VALUE" etc. for every cublasStatus_t, "CUBLAS_STATUS_UNKNOWN" otherwise.
const char* lt_status_name(int status);
// Whether a failed lt_gemm should be retried as a plainer call (no epilogue, no vector alpha, no C
// operand, no strided batch) followed by epilogue_fwd, rather than raised (linear.cu says which).
bool lt_status_falls_back(int status);

// ------------------------------------------------------------------ patch_embed.cu
// One pass over the image and the output: cols (B * gh * gw, C * ph * pw) row-major = im2col(x)
// in the output dtype (zero where pad reads past H / W), and the output rows initialised to
//   out[b, t] = prefix[t] (t < n_prefix),   out[b, n_prefix + l] = pos[l] (or 0 without pos),
// so that the GEMM that follows adds bias and x @ W^T on top with beta = 1 (the position
// embedding is fused through the GEMM's C operand, not a separate pass).
// x: (B, C, H, W) with element strides xs[4], dtype x_dt (any float).  out: (B, n_prefix + L, D).
int patch_embed_prep(DType x_dt, DType dt, const void* x, const int64_t* xs, int B, int C, int H, int W, int ph,
                     int pw, int gh, int gw, void* cols, const void* pos, const void* prefix, int n_prefix, int64_t D,
                     void* out, cudaStream_t stream);

}  // namespace fastvit
