// Attention forward, flash style: one block owns 64 query rows of one (batch, head), streams the
// keys / values in tiles of 64 through shared memory with an online softmax, and never writes an
// N x N matrix to global memory.
//
// Launch order: a 1-D grid of B * H * num_m blocks, blockIdx.x = (b * H + h) * num_m + m, so the
// num_m query blocks of one (batch, head) are consecutive, as in kernels/attention.py `_attn_fwd`
// (pid_bh = pid // num_m, pid_m = pid % num_m). The GPU dispatches blocks in about blockIdx order,
// so the blocks resident at one time share a few heads: a head's K / V come from HBM once and the
// head's other query blocks find them in L2. With the former (B * H, num_m) grid, x fastest,
// consecutive blocks belonged to different heads and each head's K / V were re-read from HBM once
// per query block (~9x at ViT-B, batch 256, N = 1025, whose K / V are far larger than L2).
//
// fp16 / bf16 run on tensor cores through WMMA (16x16x16 fragments, fp32 accumulation). WMMA does
// not specify which accumulator element a lane holds, so the per-row softmax rescale cannot be done
// on fragments: scores S and the output accumulator O make a round trip through shared memory
// (fp32). That costs shared-memory bandwidth, not correctness; this backend is the fallback and the
// independent check of the Triton kernels, the Triton kernel is the fast path.
//
// Head dims 1..128: tiles are padded to DP = d rounded up to 16 with zeros, so 48 / 80 / 96 / 112
// or odd dims need nothing special. q / k / v are arbitrary strided views (unit stride on d), e.g.
// the q, k, v slices of a packed (B, N, 3, H, d) qkv buffer. The output is (B, N, H, d)
// contiguous, i.e. [B, N, H * d] ready for the projection.
//
// fp32 takes a simpler CUDA-core kernel (one warp per query row, keys 32 at a time, one per lane).
//
// Position terms of the ViT families, both optional (null pointer = absent, a launch-uniform branch):
// * an additive logit bias (BEiT's relative position bias), read in its own dtype and added after
//   the scale. The kernels work in the log2 domain (exp2), so the bias enters as bias * log2(e).
// * RoPE on q and k (EVA-02, timm RoPE ViTs, DINOv3): rotated where they are loaded (the Q tile once,
//   each K tile as it arrives; the fp32 kernel rotates q into shared memory and each key inside its
//   dot product), so no extra pass over q / k in global memory. The rotation is float32 with separate
//   roundings (no FMA contraction) and rounded to the input dtype before QK^T, as fastvit.reference's
//   apply_rope computes it, so the rotated q / k equal the reference's bit for bit.

#include <mma.h>

#include <cmath>

#include "common.cuh"

namespace fastvit {
namespace {

using namespace nvcuda;

constexpr int kBlockM = kAttnBlockM;  // query rows per block: 4 warps x 16 rows (one WMMA row tile each)
constexpr int kBlockN = 64;  // keys per shared-memory tile
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kBlockM == kThreads / 32 * 16, "one 16-row WMMA tile per warp");

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int H, N, Nkv, d;
  int num_m;                    // query blocks per (batch, head)
  int64_t qs[3], ks[3], vs[3];  // element strides of (B, H, N)
  float scale_log2;             // softmax scale * log2(e): exp2 instead of exp
  bool vec;                     // 16-byte loads: d, every stride and every base are multiples of 8 elements
  AttnBias bias;                // bias.ptr null: no bias
  AttnRope rope;                // rope.ptr null: no rotation
};

// Element i of a bias / rope table of dtype dt, as float (dt is launch-uniform: no divergence).
__device__ __forceinline__ float load_as_float(const void* ptr, DType dt, int64_t i) {
  if (dt == kFloat16) return __half2float(static_cast<const __half*>(ptr)[i]);
  if (dt == kBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(ptr)[i]);
  return static_cast<const float*>(ptr)[i];
}

// One rotated element x * cos + xp * sin, where xp is the element's RoPE partner, negated for the
// first element of the pair (reference.rotate_pairs). __fmul_rn / __fadd_rn keep the compiler from
// contracting it into an FMA: the reference's elementwise mul, mul, add round three times.
__device__ __forceinline__ float rope_rotate(float x, float xp, float sin_c, float cos_c) {
  return __fadd_rn(__fmul_rn(x, cos_c), __fmul_rn(xp, sin_c));
}

// Offset (elements) of the table row of token t (of a sequence of ntok tokens) for head h, or -1
// when t is not rotated: the last n_rot tokens use rows 0..n_rot-1, the prefix before them none.
__device__ __forceinline__ int64_t rope_row(const AttnRope& r, int h, int t, int ntok) {
  const int row = t - (ntok - r.n_rot);
  return row < 0 || t >= ntok ? -1 : h * r.strides[0] + row * r.strides[1];
}

constexpr size_t align128(size_t n) { return (n + 127) / 128 * 128; }

// (batch, head, query block) of this block in the m-fastest 1-D launch order (see the top). All
// 32-bit: the launcher keeps B * H * num_m <= 2^31 - 1, so blockIdx.x and every quotient fit.
__device__ __forceinline__ void block_coords(const AttnParams& p, int* b, int* h, int* m_blk) {
  const unsigned bh = blockIdx.x / static_cast<unsigned>(p.num_m);
  *m_blk = static_cast<int>(blockIdx.x - bh * static_cast<unsigned>(p.num_m));
  *b = static_cast<int>(bh / static_cast<unsigned>(p.H));
  *h = static_cast<int>(bh - static_cast<unsigned>(*b) * static_cast<unsigned>(p.H));
}

template <int DP>
struct Smem {
  // Leading dims: 16-bit tiles get +8 elements (rows shift by 16 bytes, which spreads WMMA row
  // loads over the banks) and stay multiples of 8 as WMMA requires; float tiles get +4.
  static constexpr int LD = DP + 8;        // Q, K, V: (rows, DP) 16-bit
  static constexpr int LDS = kBlockN + 4;  // S: (kBlockM, kBlockN) fp32
  static constexpr int LDP = kBlockN + 8;  // P: (kBlockM, kBlockN) 16-bit
  static constexpr int LDO = DP + 4;       // O: (kBlockM, DP) fp32
  static constexpr size_t q_off = 0;
  static constexpr size_t k_off = q_off + align128(sizeof(__half) * kBlockM * LD);
  static constexpr size_t v_off = k_off + align128(sizeof(__half) * kBlockN * LD);
  static constexpr size_t s_off = v_off + align128(sizeof(__half) * kBlockN * LD);
  static constexpr size_t p_off = s_off + align128(sizeof(float) * kBlockM * LDS);
  static constexpr size_t o_off = p_off + align128(sizeof(__half) * kBlockM * LDP);
  static constexpr size_t bytes = o_off + align128(sizeof(float) * kBlockM * LDO);
};
// The largest tile set must fit sm_80's 163 KiB of opt-in shared memory per block (sm_90: 227).
static_assert(Smem<kMaxHeadDim>::bytes <= 163 * 1024, "attention tiles exceed sm_80 shared memory");

// rows x DP tile from global (row stride `stride`, unit column stride) into shared memory with
// leading dim LD; rows >= valid_rows and columns >= d are zero so padded products add nothing.
// With `vec` (a launch-uniform flag) the copy moves 8 elements (16 bytes) per load: shared rows
// are 16-byte aligned because LD * 2 bytes is a multiple of 16 and d % 8 == 0 keeps every 8-wide
// chunk either entirely inside or entirely outside the head dim.
template <typename T, int DP, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int rows, int valid_rows, int d,
                                          bool vec) {
  if (vec) {
    constexpr int kChunks = DP / 8;
#pragma unroll 2
    for (int i = threadIdx.x; i < rows * kChunks; i += kThreads) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are 0.0 in fp16 and bf16
      if (r < valid_rows && c < d) val = *reinterpret_cast<const uint4*>(src + r * stride + c);
      *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
    }
    return;
  }
  const T zero = from_float<T>(0.f);
  for (int i = threadIdx.x; i < rows * DP; i += kThreads) {
    const int r = i / DP, c = i % DP;
    dst[r * LD + c] = (r < valid_rows && c < d) ? src[r * stride + c] : zero;
  }
}

// Rotates in place the rows of a shared-memory tile (leading dim LD) that hold rotated tokens: tile
// row r is token tok0 + r of a sequence of ntok tokens, rows >= valid_rows are padding. Thread t
// owns pair t % kRopePairs of rows t / kRopePairs, + kRopeRows, ...: both elements of a pair are
// read before either is written, and nothing divides.
constexpr int kRopePairs = kMaxHeadDim / 2;
constexpr int kRopeRows = kThreads / kRopePairs;
static_assert(kThreads % kRopePairs == 0, "whole rows of pairs per pass");

template <typename T, int LD>
__device__ __forceinline__ void rope_tile(T* tile, const AttnParams& p, int h, int tok0, int valid_rows, int ntok) {
  const int hd = p.d / 2, j = threadIdx.x % kRopePairs;
  if (j >= hd) return;
  const int c0 = p.rope.half ? j : 2 * j, c1 = p.rope.half ? j + hd : 2 * j + 1;
  for (int r = threadIdx.x / kRopePairs; r < valid_rows; r += kRopeRows) {
    const int64_t row = rope_row(p.rope, h, tok0 + r, ntok);
    if (row < 0) continue;
    const float x0 = to_float(tile[r * LD + c0]), x1 = to_float(tile[r * LD + c1]);
    const void* tab = p.rope.ptr;
    const DType dt = p.rope.dt;
    // sin in columns [0, d), cos in [d, 2 d)
    tile[r * LD + c0] = from_float<T>(rope_rotate(x0, -x1, load_as_float(tab, dt, row + c0),
                                                  load_as_float(tab, dt, row + p.d + c0)));
    tile[r * LD + c1] = from_float<T>(rope_rotate(x1, x0, load_as_float(tab, dt, row + c1),
                                                  load_as_float(tab, dt, row + p.d + c1)));
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attn_fwd_tc(const AttnParams p) {
  using L = Smem<DP>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::q_off);
  T* Ks = reinterpret_cast<T*>(smem + L::k_off);
  T* Vs = reinterpret_cast<T*>(smem + L::v_off);
  float* Ss = reinterpret_cast<float*>(smem + L::s_off);
  T* Ps = reinterpret_cast<T*>(smem + L::p_off);
  float* Os = reinterpret_cast<float*>(smem + L::o_off);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int b, h, m_blk;
  block_coords(p, &b, &h, &m_blk);
  const int m0 = m_blk * kBlockM;
  const T* q = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1];
  const T* k = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1];
  const T* v = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1];

  load_tile<T, DP, L::LD>(Qs, q + m0 * p.qs[2], p.qs[2], kBlockM, min(kBlockM, p.N - m0), p.d, p.vec);
  for (int i = threadIdx.x; i < kBlockM * DP; i += kThreads) Os[(i / DP) * L::LDO + i % DP] = 0.f;
  if (p.rope.ptr != nullptr) {
    __syncthreads();  // the Q tile is complete (a pair may have been loaded by two threads)
    rope_tile<T, L::LD>(Qs, p, h, m0, min(kBlockM, p.N - m0), p.N);
  }

  // Softmax state: lanes 2r and 2r+1 own row r of this warp's 16 rows, 32 score columns each;
  // both keep identical copies of the row max m_i and the row sum l_i.
  const int r = lane >> 1, half = lane & 1;
  const int row = warp * 16 + r;
  float m_i = -INFINITY, l_i = 0.f;
  float* srow = Ss + row * L::LDS + half * 32;
  T* prow = Ps + row * L::LDP + half * 32;
  float* orow = Os + row * L::LDO;

  for (int n0 = 0; n0 < p.Nkv; n0 += kBlockN) {
    const int kv_rows = min(kBlockN, p.Nkv - n0);
    __syncthreads();  // every warp is done with the previous K / V tile (and Q / O are written)
    load_tile<T, DP, L::LD>(Ks, k + n0 * p.ks[2], p.ks[2], kBlockN, kv_rows, p.d, p.vec);
    load_tile<T, DP, L::LD>(Vs, v + n0 * p.vs[2], p.vs[2], kBlockN, kv_rows, p.d, p.vec);
    __syncthreads();
    if (p.rope.ptr != nullptr) {
      rope_tile<T, L::LD>(Ks, p, h, n0, kv_rows, p.Nkv);
      __syncthreads();
    }

    // S (16 x kBlockN per warp) = Q K^T. K is stored (key, d) row-major = K^T column-major.
#pragma unroll
    for (int j = 0; j < kBlockN / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
      wmma::fill_fragment(s, 0.f);
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
        wmma::load_matrix_sync(a, Qs + warp * 16 * L::LD + kk * 16, L::LD);
        wmma::load_matrix_sync(bt, Ks + j * 16 * L::LD + kk * 16, L::LD);
        wmma::mma_sync(s, a, bt, s);
      }
      wmma::store_matrix_sync(Ss + warp * 16 * L::LDS + j * 16, s, L::LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // The warp's 16 score rows become log2-domain logits in place: S * scale * log2(e), plus
    // bias * log2(e). Row by row across the lanes, so each bias read is one coalesced row segment;
    // rows past N and columns past N_kv read no bias (the former are never written out, the latter
    // are masked below).
#pragma unroll 1
    for (int i = 0; i < 16; ++i) {
      float* s = Ss + (warp * 16 + i) * L::LDS;
      const int qi = m0 + warp * 16 + i;  // query row
      const bool bias_row = p.bias.ptr != nullptr && qi < p.N;
      const int64_t brow = b * p.bias.strides[0] + h * p.bias.strides[1] + qi * p.bias.strides[2] + n0;
#pragma unroll
      for (int c = lane; c < kBlockN; c += 32) {
        float t = s[c] * p.scale_log2;
        if (bias_row && c < kv_rows) t = fmaf(load_as_float(p.bias.ptr, p.bias.dt, brow + c), kLog2e, t);
        s[c] = t;
      }
    }
    __syncwarp();

    // Online softmax on this lane's 32 columns; columns past Nkv get probability 0. m_new is
    // -inf only while every logit so far is -inf (a bias may mask keys): exponents are then taken
    // against 0, so such keys and the empty accumulator get weight 0 instead of exp2(-inf + inf).
    const int valid = kv_rows - half * 32;
    float mx = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < 32; ++c)
      if (c < valid) mx = fmaxf(mx, srow[c]);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_i, mx);
    const float m_ref = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m_i - m_ref);  // 0 on the first tile (m_i = -inf)
    float sum = 0.f;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      // P is rounded to the 16-bit type for the tensor-core product; the row sum uses the rounded
      // values so the final normalisation matches what was multiplied.
      const T pt = from_float<T>(c < valid ? exp2f(srow[c] - m_ref) : 0.f);
      prow[c] = pt;
      sum += to_float(pt);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_i = l_i * alpha + sum;
    m_i = m_new;
    for (int c = half; c < DP; c += 2) orow[c] *= alpha;
    __syncwarp();

    // O (16 x DP per warp) += P V, accumulator round-tripped through shared memory.
#pragma unroll
    for (int j = 0; j < DP / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
      wmma::load_matrix_sync(o, Os + warp * 16 * L::LDO + j * 16, L::LDO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, Ps + warp * 16 * L::LDP + kk * 16, L::LDP);
        wmma::load_matrix_sync(bv, Vs + kk * 16 * L::LD + j * 16, L::LD);
        wmma::mma_sync(o, a, bv, o);
      }
      wmma::store_matrix_sync(Os + warp * 16 * L::LDO + j * 16, o, L::LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (m0 + row < p.N) {
    const float inv = 1.f / l_i;
    T* out = static_cast<T*>(p.o) + ((static_cast<int64_t>(b) * p.N + m0 + row) * p.H + h) * p.d;
    for (int c = half; c < p.d; c += 2) out[c] = from_float<T>(orow[c] * inv);
  }
}

constexpr int kF32Warps = kAttnBlockMF32;

// The RoPE partner column of column c and whether c is the first of its pair (whose partner term
// is negated): (2 i, 2 i + 1), or (i, i + d / 2) with `half`.
__device__ __forceinline__ int rope_partner(int c, int d, bool half, bool* first) {
  if (half) {
    *first = c < d / 2;
    return *first ? c + d / 2 : c - d / 2;
  }
  *first = (c & 1) == 0;
  return c ^ 1;
}

// Column c of the rotated row x (float32) with table row offset `row` (>= 0).
__device__ __forceinline__ float rope_at(const float* x, int c, int64_t row, const AttnParams& p) {
  bool first;
  const int pc = rope_partner(c, p.d, p.rope.half, &first);
  return rope_rotate(x[c], first ? -x[pc] : x[pc], load_as_float(p.rope.ptr, p.rope.dt, row + c),
                     load_as_float(p.rope.ptr, p.rope.dt, row + p.d + c));
}

// fp32: one warp per query row. Each lane scores one key of a 32-key chunk against q (kept in
// shared memory, rotated and pre-scaled), then the chunk's probabilities are broadcast lane by lane
// and every lane accumulates its d / 32 output columns. A rotated key is rotated inside the lane's
// dot product (recomputed per query row: this is the simple fp32 path).
__global__ void __launch_bounds__(kF32Warps * 32) attn_fwd_f32(const AttnParams p) {
  __shared__ float qsh[kF32Warps][kMaxHeadDim];
  constexpr int kPerLane = kMaxHeadDim / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int b, h, m_blk;
  block_coords(p, &b, &h, &m_blk);
  const int row = m_blk * kF32Warps + warp;
  if (row >= p.N) return;  // whole warp leaves together; no block-level barrier below
  const float* q = static_cast<const float*>(p.q) + b * p.qs[0] + h * p.qs[1] + row * p.qs[2];
  const float* k = static_cast<const float*>(p.k) + b * p.ks[0] + h * p.ks[1];
  const float* v = static_cast<const float*>(p.v) + b * p.vs[0] + h * p.vs[1];
  const int64_t q_rope = p.rope.ptr != nullptr ? rope_row(p.rope, h, row, p.N) : -1;
  for (int c = lane; c < p.d; c += 32) qsh[warp][c] = (q_rope < 0 ? q[c] : rope_at(q, c, q_rope, p)) * p.scale_log2;
  __syncwarp();
  const int64_t brow = b * p.bias.strides[0] + h * p.bias.strides[1] + row * p.bias.strides[2];

  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
  float m_i = -INFINITY, l_i = 0.f;
  for (int n0 = 0; n0 < p.Nkv; n0 += 32) {
    const int key = n0 + lane;
    float s = -INFINITY;
    if (key < p.Nkv) {
      const float* kr = k + key * p.ks[2];
      const int64_t k_rope = p.rope.ptr != nullptr ? rope_row(p.rope, h, key, p.Nkv) : -1;
      s = 0.f;
      if (k_rope < 0) {
        for (int c = 0; c < p.d; ++c) s = fmaf(qsh[warp][c], kr[c], s);
      } else {
        for (int c = 0; c < p.d; ++c) s = fmaf(qsh[warp][c], rope_at(kr, c, k_rope, p), s);
      }
      if (p.bias.ptr != nullptr) s = fmaf(load_as_float(p.bias.ptr, p.bias.dt, brow + key), kLog2e, s);
    }
    // -inf only while every logit so far is -inf (masked by the bias): exponents against 0 then,
    // as in the tensor-core kernel
    const float m_new = fmaxf(m_i, warp_max(s));
    const float m_ref = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m_i - m_ref);
    const float pr = key < p.Nkv ? exp2f(s - m_ref) : 0.f;
    l_i = l_i * alpha + warp_sum(pr);
    m_i = m_new;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] *= alpha;
    const int cnt = min(32, p.Nkv - n0);
    for (int j = 0; j < cnt; ++j) {
      const float pj = __shfl_sync(0xffffffffu, pr, j);
      const float* vr = v + (n0 + j) * p.vs[2];
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int c = lane + 32 * i;
        if (c < p.d) acc[i] = fmaf(pj, vr[c], acc[i]);
      }
    }
  }
  float* out = static_cast<float*>(p.o) + ((static_cast<int64_t>(b) * p.N + row) * p.H + h) * p.d;
  const float inv = 1.f / l_i;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < p.d) out[c] = acc[i] * inv;
  }
}

template <typename T, int DP>
int launch_tc(const AttnParams& p, unsigned blocks, cudaStream_t stream) {
  constexpr size_t smem = Smem<DP>::bytes;
  // Above 48 KiB dynamic shared memory must be opted into (per function); sm_80 allows 163 KiB,
  // sm_90 227 KiB, and DP = 128 needs ~110 KiB.
  cudaError_t e = cudaFuncSetAttribute(attn_fwd_tc<T, DP>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  attn_fwd_tc<T, DP><<<blocks, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
int dispatch_dp(const AttnParams& p, unsigned blocks, cudaStream_t stream) {
  switch ((p.d + 15) / 16) {
    case 1: return launch_tc<T, 16>(p, blocks, stream);
    case 2: return launch_tc<T, 32>(p, blocks, stream);
    case 3: return launch_tc<T, 48>(p, blocks, stream);
    case 4: return launch_tc<T, 64>(p, blocks, stream);
    case 5: return launch_tc<T, 80>(p, blocks, stream);
    case 6: return launch_tc<T, 96>(p, blocks, stream);
    case 7: return launch_tc<T, 112>(p, blocks, stream);
    case 8: return launch_tc<T, 128>(p, blocks, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int attention_fwd(DType dt, const void* q, const void* k, const void* v, void* out, int B, int H, int N, int Nkv,
                  int d, const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides, float scale,
                  const AttnBias& bias, const AttnRope& rope, cudaStream_t stream) {
  if (d < 1 || d > kMaxHeadDim || N < 1 || Nkv < 1 || B < 1 || H < 1) return cudaErrorInvalidValue;
  if (rope.ptr != nullptr && (d % 2 != 0 || rope.n_rot < 1 || rope.n_rot > N || rope.n_rot > Nkv))
    return cudaErrorInvalidValue;
  // gridDim.x limit; bindings.cpp reports it with the shape before getting here.
  const int64_t blocks = attention_grid_blocks(dt, B, H, N);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  const int block_m = attention_block_m(dt);
  AttnParams p{q, k, v, out, H, N, Nkv, d, (N + block_m - 1) / block_m, {}, {}, {}, scale * kLog2e, false, bias, rope};
  // absent terms: zero strides, so the kernels' (unused) offsets stay in range
  if (bias.ptr == nullptr) p.bias = AttnBias{nullptr, kFloat32, {0, 0, 0}};
  if (rope.ptr == nullptr) p.rope = AttnRope{nullptr, kFloat32, {0, 0}, 0, false};
  bool vec = d % 8 == 0;
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = q_strides[i];
    p.ks[i] = k_strides[i];
    p.vs[i] = v_strides[i];
    vec = vec && q_strides[i] % 8 == 0 && k_strides[i] % 8 == 0 && v_strides[i] % 8 == 0;
  }
  for (const void* ptr : {q, k, v}) vec = vec && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  p.vec = vec && dt != kFloat32;
  switch (dt) {
    case kFloat16: return dispatch_dp<__half>(p, static_cast<unsigned>(blocks), stream);
    case kBFloat16: return dispatch_dp<__nv_bfloat16>(p, static_cast<unsigned>(blocks), stream);
    case kFloat32:
      attn_fwd_f32<<<static_cast<unsigned>(blocks), kF32Warps * 32, 0, stream>>>(p);
      return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastvit
