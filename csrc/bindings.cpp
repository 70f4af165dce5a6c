// pybind11 entry points of the fastvit CUDA backend (module fastvit._C, or the JIT-built
// equivalent). Everything torch lives here: argument validation (TORCH_CHECK messages name the
// argument, what was expected and what was given), output / workspace allocation on the current
// stream's device, reshapes to 2-D, and the choice between cuBLASLt epilogues and the elementwise
// epilogue pass. The kernels in the .cu files only see raw pointers and strides.
//
// csrc/__init__.py (the backend module fastvit.cuda) calls these functions as they are;
// fastvit.ops wraps each op once, for every backend, in a torch.library op with its fake and
// autograd, so nothing torch.compile-related lives here. The functions validate again although
// fastvit.ops already did, because the module is also callable directly.

// ATen + the pybind casters only: torch/extension.h would also pull the whole C++ frontend
// (autograd, nn, optim) and cost ~30% more compile time for nothing used here.
#include <ATen/ATen.h>
#include <torch/python.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "fastvit_cuda.h"

// Hash of the sources this module was compiled from (csrc/build.py passes it); the backend uses
// it to skip a prebuilt module that is older than the sources next to it.
#ifndef FASTVIT_SOURCES_DIGEST
#define FASTVIT_SOURCES_DIGEST 0ULL
#endif

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

fastvit::DType dtype_of(const Tensor& t, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return fastvit::kFloat32;
    case at::kHalf: return fastvit::kFloat16;
    case at::kBFloat16: return fastvit::kBFloat16;
    default: TORCH_CHECK_TYPE(false, arg, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return fastvit::kFloat32;
}

// patch_embed's image: a float dtype or uint8 pixels
fastvit::DType image_dtype_of(const Tensor& t, const char* arg) {
  if (t.scalar_type() == at::kByte) return fastvit::kUInt8;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                   arg, ": expected dtype float32, float16, bfloat16 or uint8, got ", t.scalar_type());
  return dtype_of(t, arg);
}

void check_cuda(const Tensor& t, const char* arg) {
  TORCH_CHECK(t.is_cuda(), arg, ": expected a CUDA tensor, got device ", t.device());
}

void check_dim(const Tensor& t, const char* arg, int64_t ndim) {
  TORCH_CHECK(t.dim() == ndim, arg, ": expected a ", ndim, "-D tensor, got shape ", t.sizes());
}

void check_like(const Tensor& t, const char* arg, const Tensor& ref, const char* ref_arg) {
  TORCH_CHECK(t.device() == ref.device(), arg, ": expected device ", ref.device(), " (as ", ref_arg, "), got device ",
              t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), arg, ": expected dtype ", ref.scalar_type(), " (as ", ref_arg,
                   "), got dtype ", t.scalar_type());
}

void check_shape(const Tensor& t, const char* arg, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, arg, ": expected shape ", shape, ", got shape ", t.sizes());
}

void check_opt(const OptTensor& t, const char* arg, const Tensor& ref, const char* ref_arg, at::IntArrayRef shape) {
  if (!t.has_value()) return;
  check_like(*t, arg, ref, ref_arg);
  check_shape(*t, arg, shape);
}

void check_last_dim(const Tensor& t, const char* arg) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, arg, ": expected a last dim with stride 1, got strides ",
              t.strides());
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "fastvit cuda backend: ", what, " launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

const char* dtype_name(fastvit::DType dt) {
  switch (dt) {
    case fastvit::kFloat16: return "float16";
    case fastvit::kBFloat16: return "bfloat16";
    default: return "float32";
  }
}

// What the cuBLASLt call computed on top of the plain GEMM, for error messages.
std::string gemm_extras(const fastvit::GemmArgs& g) {
  std::string s;
  if (g.bias != nullptr) s += " + bias";
  if (g.gelu) s += " + gelu";
  if (g.alpha_vec != nullptr) s += " + vector alpha";
  if (g.c != nullptr) s += " + C operand";
  return s.empty() ? " (none)" : s;
}

void check_lt(int st, const char* op, const fastvit::GemmArgs& g) {
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "fastvit cuda backend: cuBLASLt matmul for ", op, " failed with ",
              fastvit::lt_status_name(st), " (", st, "): x (M, K) = (", g.M, ", ", g.K, "), weight (N, K) = (", g.N,
              ", ", g.K, "), batch ", g.batch, ", dtype ", dtype_name(g.dt), ", epilogue", gemm_extras(g));
}

// Whether a failed call is retried as the plainer one: false on success, true for the statuses
// fastvit::lt_status_falls_back names (see linear.cu), and it raises for every other failure.
bool falls_back(int st, const char* op, const fastvit::GemmArgs& g) {
  if (st == CUBLAS_STATUS_SUCCESS) return false;
  if (fastvit::lt_status_falls_back(st)) return true;
  check_lt(st, op, g);
  return false;
}

const void* ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// (rows, cols) view with unit column stride and a row stride >= cols that cuBLASLt accepts as a
// leading dimension; copies only when the input cannot be viewed that way.
Tensor as_matrix(const Tensor& t, int64_t rows, int64_t cols) {
  Tensor m = t.reshape({rows, cols});
  if ((cols > 1 && m.stride(1) != 1) || (rows > 1 && m.stride(0) < cols)) m = m.contiguous();
  return m;
}
int64_t ld_of(const Tensor& m) { return m.size(0) > 1 ? m.stride(0) : m.size(1); }

OptTensor contig(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt;
}

// Testing hooks, read per call (tests flip them at run time). Every cuBLASLt call that has a
// plainer alternative (an epilogue, a vector alpha, a C operand, a strided batch) then reports a
// status without running, so the GPU tests cover the paths cuBLASLt rarely takes on their GPU:
// FASTVIT_CUDA_PLAIN_GEMM=1 reports CUBLAS_STATUS_NOT_SUPPORTED (plain GEMM + the elementwise
// epilogue, one GEMM per image); FASTVIT_CUDA_LT_STATUS=<cublasStatus_t code> reports that
// status (the fallback for the statuses that fall back, the error for the others). 0: neither.
int forced_lt_status() {
  const char* plain = std::getenv("FASTVIT_CUDA_PLAIN_GEMM");
  if (plain != nullptr && plain[0] == '1') return CUBLAS_STATUS_NOT_SUPPORTED;
  const char* v = std::getenv("FASTVIT_CUDA_LT_STATUS");
  if (v == nullptr || v[0] == '\0') return 0;
  char* end = nullptr;
  const long code = std::strtol(v, &end, 10);
  TORCH_CHECK(*end == '\0' && code >= 0 && code <= 0x7fffffff,
              "FASTVIT_CUDA_LT_STATUS: expected a cublasStatus_t code such as 7, got '", v, "'");
  return static_cast<int>(code);
}

// The cuBLASLt workspaces: one kWorkspaceBytes buffer per (device, stream), made at the first
// eager call on that stream through the caching allocator and kept for the process. One per
// stream because a GEMM uses it until the stream reaches the GEMM's end: calls on one stream are
// ordered and can share it, calls on two streams cannot. The map is never destroyed (no ordering
// with the allocator's teardown at exit).
struct Workspaces {
  std::mutex mu;
  std::map<std::pair<int, uintptr_t>, Tensor> bufs;
};
Workspaces& workspaces() {
  static auto* w = new Workspaces();
  return *w;
}

// The workspace of the current (device, stream); the first eager call on the device also creates
// the device's cuBLASLt handle. Inside a CUDA graph capture nothing is created for the cache:
// * the handle must exist already (creating one allocates device memory, which a capture
//   forbids): otherwise this raises, asking to run the model eagerly first;
// * the capture stream's workspace is used if that stream ran eagerly before; else the call gets
//   a temporary from the caching allocator, which during a capture comes from the graph's private
//   pool like every tensor made in the captured region (the graph keeps it) and stays out of the
//   cache so that pool can be released with the graph. fastvit.graphs warms up on one stream and
//   torch.cuda.graph captures on another, so this is the usual case there.
Tensor lt_workspace(const Tensor& like, cudaStream_t stream) {
  Workspaces& ws = workspaces();
  const std::pair<int, uintptr_t> key{like.get_device(), reinterpret_cast<uintptr_t>(stream)};
  const auto opts = like.options().dtype(at::kByte);
  const int64_t bytes = static_cast<int64_t>(fastvit::kWorkspaceBytes);
  std::lock_guard<std::mutex> lock(ws.mu);
  auto it = ws.bufs.find(key);
  if (it != ws.bufs.end()) return it->second;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(stream, &capture);
  TORCH_CHECK(err == cudaSuccess, "fastvit cuda backend: cudaStreamIsCapturing failed: ", cudaGetErrorString(err));
  if (capture == cudaStreamCaptureStatusNone) {
    const int st = fastvit::lt_init(true);
    TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "fastvit cuda backend: creating the cuBLASLt handle on ", like.device(),
                " failed with ", fastvit::lt_status_name(st), " (", st, ")");
    return ws.bufs.emplace(key, at::empty({bytes}, opts)).first->second;
  }
  TORCH_CHECK(fastvit::lt_init(false) == CUBLAS_STATUS_SUCCESS, "fastvit cuda backend: a CUDA graph is being captured "
              "on ", like.device(), " before any eager cuBLASLt call there: expected the cuBLASLt handle to exist, got "
              "none (creating it inside a capture is not allowed); warm up first: run the model (or the linear / mlp / "
              "patch_embed op) once eagerly on this device before capturing");
  return at::empty({bytes}, opts);
}

// [(device, stream, data_ptr)] of the cached workspaces, for tests.
std::vector<std::tuple<int64_t, int64_t, int64_t>> lt_workspaces() {
  Workspaces& ws = workspaces();
  std::lock_guard<std::mutex> lock(ws.mu);
  std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
  for (const auto& kv : ws.bufs)
    out.emplace_back(kv.first.first, static_cast<int64_t>(kv.first.second),
                     static_cast<int64_t>(reinterpret_cast<uintptr_t>(kv.second.data_ptr())));
  return out;
}

// ------------------------------------------------------------------------------------ ops

Tensor layer_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps) {
  const auto dt = dtype_of(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dim, got shape ", x.sizes());
  check_last_dim(x, "x");
  const int64_t D = x.size(-1);
  check_opt(weight, "weight", x, "x", {D});
  check_opt(bias, "bias", x, "x", {D});
  check_cuda(x, "x");  // last, so that every other check can be exercised without a GPU
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t M = D > 0 ? x.numel() / D : 0;
  if (M == 0 || D == 0) return y;
  const Tensor w = contig(weight).value_or(Tensor()), b = contig(bias).value_or(Tensor());
  const Tensor x2 = as_matrix(x, M, D);
  check_launch(fastvit::layer_norm_fwd(dt, x2.data_ptr(), ld_of(x2), w.defined() ? w.data_ptr() : nullptr,
                                       b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), M, D,
                                       static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
               "layer_norm");
  return y;
}

Tensor linear(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t act, const OptTensor& gamma,
              const OptTensor& residual, const OptTensor& ln_weight, const OptTensor& ln_bias, double ln_eps) {
  const auto dt = dtype_of(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dim, got shape ", x.sizes());
  check_last_dim(x, "x");
  check_dim(weight, "weight", 2);
  check_like(weight, "weight", x, "x");
  TORCH_CHECK(act >= fastvit::kActNone && act <= fastvit::kActLast,
              "act: expected 0 (none), 1 (gelu), 2 (gelu_tanh), 3 (quick_gelu) or 4 (swiglu), got ", act);
  // Nw weight rows = GEMM columns; a gated activation halves them (gate rows, then value rows).
  const bool gated = act == fastvit::kActSwiglu;
  const int64_t Nw = weight.size(0), K = weight.size(1), N = gated ? Nw / 2 : Nw;
  TORCH_CHECK(!gated || Nw % 2 == 0, "weight: expected an even number of rows with act 4 (swiglu: gate rows, then "
              "value rows), got shape ", weight.sizes());
  TORCH_CHECK(x.size(-1) == K, "x: expected last dim ", K, " (= weight.shape[1]), got shape ", x.sizes());
  check_opt(bias, "bias", x, "x", {Nw});
  check_opt(gamma, "gamma", x, "x", {N});
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  check_opt(residual, "residual", x, "x", out_shape);
  if (residual.has_value()) check_last_dim(*residual, "residual");
  check_opt(ln_weight, "ln_weight", x, "x", {K});
  check_opt(ln_bias, "ln_bias", x, "x", {K});
  TORCH_CHECK(!ln_bias.has_value() || ln_weight.has_value(), "ln_weight: expected a tensor when ln_bias is given, got None");
  TORCH_CHECK(K >= 1, "weight: expected at least one input feature, got shape ", weight.sizes());
  check_cuda(x, "x");

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t M = x.numel() / K;
  Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.view(out_shape);

  Tensor x2 = as_matrix(x, M, K);
  if (ln_weight.has_value()) {
    Tensor xn = at::empty({M, K}, x.options());
    const Tensor lw = ln_weight->contiguous();
    const OptTensor lb = contig(ln_bias);
    check_launch(fastvit::layer_norm_fwd(dt, x2.data_ptr(), ld_of(x2), lw.data_ptr(), ptr(lb), xn.data_ptr(), M, K,
                                         static_cast<float>(ln_eps), stream),
                 "layer_norm (linear prologue)");
    x2 = xn;
  }
  const Tensor w = as_matrix(weight, Nw, K);
  const OptTensor b = contig(bias), g = contig(gamma);
  OptTensor r;
  if (residual.has_value()) {
    r = residual->reshape({M, N});
    // As the C operand it shares Y's layout (row stride N); otherwise copy once.
    if ((N > 1 && r->stride(1) != 1) || (M > 1 && r->stride(0) != N)) r = r->contiguous();
  }
  const Tensor ws = lt_workspace(x, stream);
  const int forced = forced_lt_status();
  // A call that has a plainer alternative reports the forced status (testing hook) instead of running.
  auto attempt = [&](const fastvit::GemmArgs& a, bool has_plainer) {
    return has_plainer && forced != 0 ? forced : fastvit::lt_gemm(a, stream);
  };

  if (gated) {
    // SwiGLU: the GEMM (+ the (2 N,) bias in cuBLASLt's epilogue) writes both halves to a temporary
    // (M, 2 N); swiglu_fwd reads gate and value and writes silu(g) * v * gamma + residual.
    Tensor h = at::empty({M, Nw}, x.options());
    fastvit::GemmArgs ga{dt, M, Nw, K, 1, x2.data_ptr(), ld_of(x2), 0, w.data_ptr(), ld_of(w), h.data_ptr(), Nw, 0,
                         nullptr, ptr(b), false, nullptr, ws.data_ptr(), fastvit::kWorkspaceBytes};
    int st = attempt(ga, ga.bias != nullptr);
    bool bias_done = true;
    if (ga.bias != nullptr && falls_back(st, "linear (swiglu)", ga)) {
      ga.bias = nullptr;  // plain GEMM, the bias added by swiglu_fwd
      bias_done = false;
      st = fastvit::lt_gemm(ga, stream);
    }
    check_lt(st, "linear (swiglu)", ga);
    check_launch(fastvit::swiglu_fwd(dt, h.data_ptr(), Nw, out.data_ptr(), N, M, N, bias_done ? nullptr : ptr(b),
                                     ptr(g), ptr(r), N, stream),
                 "linear swiglu epilogue");
    return out.view(out_shape);
  }

  // Without an activation, the whole op is one cuBLASLt call: gamma * (x W^T + b) + r =
  // alpha_vec * (x W^T) + 1 * C + (gamma * b) with alpha_vec = gamma, C = r.
  if (act == fastvit::kActNone && g.has_value()) {
    const Tensor alpha_vec = g->to(at::kFloat).contiguous();
    const OptTensor bg = b.has_value() ? OptTensor((b->to(at::kFloat) * alpha_vec).to(x.scalar_type())) : std::nullopt;
    const fastvit::GemmArgs gf{dt, M, N, K, 1, x2.data_ptr(), ld_of(x2), 0, w.data_ptr(), ld_of(w), out.data_ptr(), N,
                               0, ptr(r), ptr(bg), false, alpha_vec.data_ptr<float>(), ws.data_ptr(),
                               fastvit::kWorkspaceBytes};
    // Done unless cuBLASLt turned the vector alpha down (then unfold below); other failures raise.
    if (!falls_back(attempt(gf, true), "linear (gamma folded into alpha)", gf)) return out.view(out_shape);
  }
  // cuBLASLt does bias, erf GELU and (for act == none, no gamma) the residual through beta = 1.
  const bool residual_in_gemm = r.has_value() && act == fastvit::kActNone && !g.has_value();
  fastvit::GemmArgs ga{dt, M, N, K, 1, x2.data_ptr(), ld_of(x2), 0, w.data_ptr(), ld_of(w), out.data_ptr(), N, 0,
                       residual_in_gemm ? r->data_ptr() : nullptr, ptr(b), act == fastvit::kActGelu, nullptr,
                       ws.data_ptr(), fastvit::kWorkspaceBytes};
  const bool has_plainer = ga.bias != nullptr || ga.gelu || ga.c != nullptr;
  int st = attempt(ga, has_plainer);
  // Only none and erf GELU have cuBLASLt epilogues; tanh GELU and QuickGELU go to epilogue_fwd.
  bool bias_done = true, act_done = act == fastvit::kActNone || act == fastvit::kActGelu,
       residual_done = residual_in_gemm;
  if (has_plainer && falls_back(st, "linear", ga)) {
    // cuBLASLt turned this epilogue down on this GPU / shape: plain GEMM, the rest elementwise.
    ga.bias = nullptr;
    ga.gelu = false;
    ga.c = nullptr;
    bias_done = !b.has_value();
    act_done = act == fastvit::kActNone;
    residual_done = false;
    st = fastvit::lt_gemm(ga, stream);
  }
  check_lt(st, "linear", ga);
  if (!bias_done || !act_done || g.has_value() || (r.has_value() && !residual_done)) {
    check_launch(fastvit::epilogue_fwd(dt, out.data_ptr(), N, fastvit::RowMap{M, 0, 0}, M, N,
                                       bias_done ? nullptr : ptr(b),
                                       act_done ? fastvit::kActNone : static_cast<fastvit::Act>(act), ptr(g),
                                       residual_done ? nullptr : ptr(r), N, stream),
                 "linear epilogue");
  }
  return out.view(out_shape);
}

Tensor mlp(const Tensor& x, const Tensor& fc1_weight, const OptTensor& fc1_bias, const Tensor& fc2_weight,
           const OptTensor& fc2_bias, int64_t act, const OptTensor& gamma, const OptTensor& residual,
           const OptTensor& ln_weight, const OptTensor& ln_bias, double ln_eps) {
  check_dim(fc2_weight, "fc2_weight", 2);
  check_dim(fc1_weight, "fc1_weight", 2);
  const bool gated = act == fastvit::kActSwiglu;
  TORCH_CHECK(!gated || fc1_weight.size(0) % 2 == 0, "fc1_weight: expected an even number of rows with act 4 (swiglu: "
              "gate rows, then value rows), got shape ", fc1_weight.sizes());
  const int64_t hidden = gated ? fc1_weight.size(0) / 2 : fc1_weight.size(0);
  TORCH_CHECK(fc2_weight.size(1) == hidden, "fc2_weight: expected shape (D_out, ", hidden, "), got shape ",
              fc2_weight.sizes());
  // The hidden activation is materialised in x's dtype, as the unfused composition rounds it.
  const Tensor h = linear(x, fc1_weight, fc1_bias, act, std::nullopt, std::nullopt, ln_weight, ln_bias, ln_eps);
  return linear(h, fc2_weight, fc2_bias, fastvit::kActNone, gamma, residual, std::nullopt, std::nullopt, 0.0);
}

// Returns (B, H, N, d): the transposed view of a contiguous (B, N, H, d) buffer, the layout every
// backend returns, so the output projection reads it as [B, N, H * d] with no copy.
// bias: (H, N, N_kv) or (1 | B, H, N, N_kv), any float dtype, unit last stride, read in place.
// rope: (N_r, 2 d) or (H, N_r, 2 d) = cat([sin, cos], -1), any float dtype, unit last stride.
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const OptTensor& bias,
                 const OptTensor& rope, bool rope_half) {
  const auto dt = dtype_of(q, "q");
  check_dim(q, "q", 4);
  check_dim(k, "k", 4);
  check_dim(v, "v", 4);
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), Nkv = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == d, "k: expected shape (", B, ", ", H, ", N_kv, ", d,
              ") matching q (B, H, N, d), got shape ", k.sizes());
  check_shape(v, "v", k.sizes());
  check_last_dim(q, "q");
  check_last_dim(k, "k");
  check_last_dim(v, "v");
  TORCH_CHECK(d >= 1 && d <= fastvit::kMaxHeadDim, "q: expected head dim 1..", fastvit::kMaxHeadDim, ", got head dim ",
              d);
  TORCH_CHECK(Nkv >= 1 || N == 0, "k: expected at least one key (N_kv >= 1), got shape ", k.sizes());
  TORCH_CHECK(N <= 0x7fffffff, "q: expected N below 2^31, got shape ", q.sizes());
  fastvit::AttnBias ab{nullptr, fastvit::kFloat32, {0, 0, 0}};
  if (bias.has_value()) {
    const Tensor& t = *bias;
    ab.dt = dtype_of(t, "bias");
    const bool ok = (t.dim() == 3 && t.sizes() == at::IntArrayRef({H, N, Nkv})) ||
                    (t.dim() == 4 && (t.size(0) == 1 || t.size(0) == B) && t.sizes().slice(1) == at::IntArrayRef({H, N, Nkv}));
    TORCH_CHECK(ok, "bias: expected shape (", H, ", ", N, ", ", Nkv, ") or (", B, ", ", H, ", ", N, ", ", Nkv,
                ") (H, N, N_kv of q / k), got shape ", t.sizes());
    check_last_dim(t, "bias");
    TORCH_CHECK(t.device() == q.device(), "bias: expected device ", q.device(), " (as q), got device ", t.device());
    const int o = t.dim() - 3;  // (H, N, N_kv) strides; a batch of 1 (or none) is broadcast with stride 0
    ab.strides[0] = (t.dim() == 4 && t.size(0) > 1) ? t.stride(0) : 0;
    ab.strides[1] = t.stride(o);
    ab.strides[2] = t.stride(o + 1);
  }
  fastvit::AttnRope ar{nullptr, fastvit::kFloat32, {0, 0}, 0, rope_half};
  if (rope.has_value()) {
    const Tensor& t = *rope;
    ar.dt = dtype_of(t, "rope");
    TORCH_CHECK(d % 2 == 0, "q: expected an even head dim with rope, got head dim ", d);
    const bool ok = (t.dim() == 2 || (t.dim() == 3 && t.size(0) == H)) && t.size(-1) == 2 * d && t.size(-2) >= 1 &&
                    t.size(-2) <= std::min(N, Nkv);
    TORCH_CHECK(ok, "rope: expected shape (N_r, ", 2 * d, ") or (", H, ", N_r, ", 2 * d,
                ") (cat([sin, cos], -1) with 0 < N_r <= min(N, N_kv) = ", std::min(N, Nkv), "), got shape ",
                t.sizes());
    check_last_dim(t, "rope");
    TORCH_CHECK(t.device() == q.device(), "rope: expected device ", q.device(), " (as q), got device ", t.device());
    ar.strides[0] = t.dim() == 3 ? t.stride(0) : 0;
    ar.strides[1] = t.stride(-2);
    ar.n_rot = static_cast<int>(t.size(-2));
  }
  // One block per (batch, head, block of query rows) on gridDim.x (attention.cu: launch order).
  const int64_t blocks = fastvit::attention_grid_blocks(dt, B, H, N);
  TORCH_CHECK(blocks <= fastvit::kMaxGridX, "q: expected B * H * ceil(N / ", fastvit::attention_block_m(dt), ") <= ",
              fastvit::kMaxGridX, " (the launch's gridDim.x limit), got shape ", q.sizes(), ", i.e. ", blocks,
              " blocks");
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty({B, N, H, d}, q.options());
  if (B == 0 || H == 0 || N == 0) return out.transpose(1, 2);
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  if (bias.has_value()) ab.ptr = bias->data_ptr();
  if (rope.has_value()) ar.ptr = rope->data_ptr();
  check_launch(fastvit::attention_fwd(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                      static_cast<int>(B), static_cast<int>(H), static_cast<int>(N),
                                      static_cast<int>(Nkv), static_cast<int>(d), qs, ks, vs,
                                      static_cast<float>(scale), ab, ar, c10::cuda::getCurrentCUDAStream()),
               "attention");
  return out.transpose(1, 2);
}

Tensor patch_embed(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& pos_embed,
                   const OptTensor& prefix, bool pad) {
  check_dim(x, "x", 4);
  const auto x_dt = image_dtype_of(x, "x");
  check_dim(weight, "weight", 4);
  TORCH_CHECK(weight.device() == x.device(), "weight: expected device ", x.device(), " (as x), got device ",
              weight.device());
  const auto dt = dtype_of(weight, "weight");
  const int64_t D = weight.size(0), C = weight.size(1), ph = weight.size(2), pw = weight.size(3);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  TORCH_CHECK(x.size(1) == C, "x: expected ", C, " input channels (B, ", C, ", H, W), got shape ", x.sizes());
  TORCH_CHECK(ph >= 1 && pw >= 1 && D >= 1, "weight: expected a non-empty (D, C, Ph, Pw) kernel, got shape ",
              weight.sizes());
  if (!pad)
    TORCH_CHECK(H % ph == 0 && W % pw == 0, "x: expected height and width multiples of the patch size (", ph, ", ",
                pw, ") (or pad=True), got image size (", H, ", ", W, ")");
  const int64_t gh = (H + ph - 1) / ph, gw = (W + pw - 1) / pw, L = gh * gw;
  TORCH_CHECK(gh >= 1 && gw >= 1, "x: expected an image at least one patch (", ph, ", ", pw,
              ") large, got image size (", H, ", ", W, ")");
  check_opt(bias, "bias", weight, "weight", {D});
  check_opt(pos_embed, "pos_embed", weight, "weight", {L, D});
  int64_t T = 0;
  if (prefix.has_value()) {
    check_dim(*prefix, "prefix", 2);
    check_like(*prefix, "prefix", weight, "weight");
    TORCH_CHECK(prefix->size(1) == D, "prefix: expected shape (T, ", D, "), got shape ", prefix->sizes());
    T = prefix->size(0);
  }
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor out = at::empty({B, T + L, D}, weight.options());
  if (B == 0) return out;
  const int64_t Kc = C * ph * pw;
  const Tensor w = weight.reshape({D, Kc}).contiguous();
  const OptTensor b = contig(bias), pos = contig(pos_embed), pf = contig(prefix);
  Tensor cols = at::empty({B * L, Kc}, weight.options());
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  check_launch(fastvit::patch_embed_prep(x_dt, dt, x.data_ptr(), xs, static_cast<int>(B), static_cast<int>(C),
                                         static_cast<int>(H), static_cast<int>(W), static_cast<int>(ph),
                                         static_cast<int>(pw), static_cast<int>(gh), static_cast<int>(gw),
                                         cols.data_ptr(), ptr(pos), ptr(pf), static_cast<int>(T), D, out.data_ptr(),
                                         stream),
               "patch_embed im2col");
  const Tensor ws = lt_workspace(weight, stream);
  // Without prefix rows the tokens of all images are one (B * L, D) matrix; with them, a strided
  // batch of B (L, D) matrices whose rows start after the prefix rows of each image.
  char* y0 = static_cast<char*>(out.data_ptr()) + T * D * out.element_size();
  fastvit::GemmArgs ga{dt, T > 0 ? L : B * L, D, Kc, T > 0 ? B : 1, cols.data_ptr(), Kc, L * Kc, w.data_ptr(), Kc,
                       y0, D, (T + L) * D, pos.has_value() ? y0 : nullptr, ptr(b), false, nullptr, ws.data_ptr(),
                       fastvit::kWorkspaceBytes};
  const int forced = forced_lt_status();
  // A call that has a plainer alternative reports the forced status (testing hook) instead of running.
  auto attempt = [&](const fastvit::GemmArgs& a, bool has_plainer) {
    return has_plainer && forced != 0 ? forced : fastvit::lt_gemm(a, stream);
  };
  int st = attempt(ga, ga.bias != nullptr || ga.batch > 1);
  bool bias_done = true;
  if (ga.bias != nullptr && falls_back(st, "patch_embed", ga)) {
    ga.bias = nullptr;
    bias_done = false;
    st = attempt(ga, ga.batch > 1);
  }
  if (ga.batch > 1 && falls_back(st, "patch_embed", ga)) {
    // No strided-batch algorithm (the weight is broadcast with batch stride 0): one GEMM per image.
    const int64_t batch = ga.batch;
    ga.batch = 1;
    for (int64_t i = 0; i < batch; ++i) {
      fastvit::GemmArgs gi = ga;
      gi.x = static_cast<const char*>(ga.x) + i * L * Kc * cols.element_size();
      gi.y = static_cast<char*>(ga.y) + i * (T + L) * D * out.element_size();
      gi.c = ga.c != nullptr ? gi.y : nullptr;
      check_lt(fastvit::lt_gemm(gi, stream), "patch_embed (one GEMM per image)", gi);
    }
    st = CUBLAS_STATUS_SUCCESS;
  }
  check_lt(st, "patch_embed", ga);
  if (!bias_done) {
    check_launch(fastvit::epilogue_fwd(dt, out.data_ptr(), D, fastvit::RowMap{L, T + L, T}, B * L, D, ptr(b),
                                       fastvit::kActNone, nullptr, nullptr, 0, stream),
                 "patch_embed bias");
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvit CUDA backend: patch_embed, attention (flash-style, tensor cores), cuBLASLt linear / mlp, "
            "layer_norm";
  m.def("patch_embed", &patch_embed, "x (B,C,H,W), weight (D,C,Ph,Pw), bias (D,)?, pos_embed (L,D)?, prefix (T,D)?, pad "
        "-> (B, T + L, D)", py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("pos_embed"), py::arg("prefix"),
        py::arg("pad"));
  m.def("attention", &attention,
        "softmax(R(q) R(k)^T * scale + bias) v: q (B,H,N,d), k, v (B,H,Nkv,d), scale, bias (H,N,Nkv) / (B,H,N,Nkv)?, "
        "rope (N_r,2d) / (H,N_r,2d) = cat([sin, cos], -1)?, rope_half -> (B,H,N,d): a transposed view of a "
        "contiguous (B,N,H,d) buffer",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("bias") = py::none(),
        py::arg("rope") = py::none(), py::arg("rope_half") = false);
  m.def("layer_norm", &layer_norm, "x (..., D), weight (D,)?, bias (D,)?, eps -> (..., D)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("linear", &linear, "act(LN?(x) @ W^T + b) * gamma + residual; act 0 none / 1 gelu / 2 gelu_tanh / 3 quick_gelu / 4 swiglu "
        "(weight (2N, K), gate rows first)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("act"), py::arg("gamma"), py::arg("residual"),
        py::arg("ln_weight"), py::arg("ln_bias"), py::arg("ln_eps"));
  m.def("mlp", &mlp, "residual + gamma * fc2(act(fc1(LN?(x))))", py::arg("x"), py::arg("fc1_weight"),
        py::arg("fc1_bias"), py::arg("fc2_weight"), py::arg("fc2_bias"), py::arg("act"), py::arg("gamma"),
        py::arg("residual"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("ln_eps"));
  m.def("cublas_status_name", &fastvit::lt_status_name, "cublasStatus_t code -> its name (error messages)",
        py::arg("status"));
  m.def("cublas_status_falls_back", &fastvit::lt_status_falls_back,
        "whether a cuBLASLt call failing with this status is retried as a plainer call rather than raised",
        py::arg("status"));
  m.def("lt_workspaces", &lt_workspaces, "[(device, stream, data_ptr)] of the cached cuBLASLt workspaces");
  m.attr("MAX_HEAD_DIM") = fastvit::kMaxHeadDim;
  m.attr("SOURCES_DIGEST") = py::int_(static_cast<unsigned long long>(FASTVIT_SOURCES_DIGEST));
}
