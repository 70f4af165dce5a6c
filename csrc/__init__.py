"""The ``cuda`` backend of fastvit: the CUDA C++ extension in this folder (installed as
``fastvit.cuda``).

Its face is every backend's (:mod:`fastvit.backends`): :data:`LIMITS` (what it runs, as data),
:func:`available` (whether the extension loads in this process) and one function per op with the
op's signature. Inputs arrive validated by :mod:`fastvit.ops`, which also owns each op's
``torch.library`` op, fake and autograd; the functions here are plain calls into the extension
(which validates again with TORCH_CHECK, since it is also callable directly).

The extension is found, on the first :func:`available` (the dispatcher asks only for CUDA
devices, so CPU machines never build), in this order: a prebuilt ``fastvit._C`` (``pip install``
with a toolkit around, see setup.py) compiled from the sources in this folder, else a JIT build
of them (:func:`fastvit.cuda.build.build`: a cache folder per hash of sources and flags, a file
lock, a message on stderr while it builds). Any failure becomes :func:`available`'s reason,
recorded once; importing this module needs only torch and never builds.

Environment: ``FASTVIT_CUDA_JIT=0`` (never build at run time: a prebuilt ``fastvit._C`` or
nothing), ``FASTVIT_CUDA_CACHE`` (JIT cache root), ``FASTVIT_CSRC`` (source folder), ``CUDA_HOME``,
``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS`` (see :mod:`fastvit.cuda.build`);
``FASTVIT_CUDA_PLAIN_GEMM=1`` (read by the extension on each call) forces the fallbacks used when
cuBLASLt offers no algorithm for an epilogue, so tests cover them; ``FASTVIT_CUDA_LT_STATUS=<code>``
makes those cuBLASLt calls report that ``cublasStatus_t`` instead (a status that falls back takes
the same fallbacks, any other raises an error naming the op, the status and the shapes).

The extension keeps one cuBLASLt handle per device and one 32 MiB workspace per (device, stream),
both made at the first eager call: a CUDA graph captured before any eager linear / mlp /
patch_embed call on its device raises (warm up first).
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Optional

import torch

from fastvit.facts import ACT_CODES, ACTIVATIONS, ATTENTION_FEATURES, OPS, BackendLimits

from . import build as _build

__all__ = ["LIMITS", "available", "patch_embed", "attention", "layer_norm", "linear", "mlp"]

LIMITS = BackendLimits(
    name="cuda",
    # attention_probs would materialise N x N probabilities: the torch backend does it; attention_varlen
    # (packed sequences) has no CUDA C++ kernel yet: the triton backend runs it, else torch
    ops=frozenset(OPS) - {"attention_probs", "attention_varlen"},
    devices=("cuda",),
    min_capability=(8, 0),  # bf16 wmma tiles, and the attention tiles' shared memory (sm_80's 163 KiB)
    max_head_dim=128,  # csrc/fastvit_cuda.h kMaxHeadDim: the attention tiles are sized for it
    acts=ACTIVATIONS,  # swiglu: the GEMM writes gate and value, one elementwise pass combines them
    # logit bias, RoPE with a shared or per-head table, fused in the attention kernels (attention.cu)
    features=frozenset(f"attention.{f}" for f in ATTENTION_FEATURES),
    note="csrc/ (fastvit.cuda): C++/CUDA extension, prebuilt as fastvit._C or JIT-built on first use",
)

_lock = threading.Lock()
_ext = None  # the extension module, once loaded
_error: Optional[str] = None  # why it cannot be loaded, once known (not retried)


def _import_or_build():
    """The prebuilt extension when it matches the sources here, else a JIT build of them."""
    srcs = _build.sources()
    have_sources = all(os.path.isfile(s) for s in srcs)
    try:
        ext = importlib.import_module(_build.EXTENSION_NAME)
    except (ImportError, OSError) as e:
        why = f"no prebuilt {_build.EXTENSION_NAME} ({e})"
    else:
        if not have_sources or f"{getattr(ext, 'SOURCES_DIGEST', 0):016x}" == _build.sources_digest():
            return ext
        why = f"the prebuilt {_build.EXTENSION_NAME} was compiled from other sources than {_build.source_dir()}"
    if os.environ.get("FASTVIT_CUDA_JIT", "1") == "0":
        raise RuntimeError(f"{why} and FASTVIT_CUDA_JIT=0")
    if not have_sources:
        raise RuntimeError(f"{why} and no CUDA sources in {_build.source_dir()}")
    return _build.build()


def _load():
    """The extension module (loading it once), or None with the reason in ``_error``."""
    global _ext, _error
    if _ext is None and _error is None:
        with _lock:
            if _ext is None and _error is None:
                try:
                    _ext = _import_or_build()
                except Exception as e:  # any build / load failure is the backend's reason
                    lines = str(e).strip().splitlines()
                    _error = f"CUDA extension unavailable: {type(e).__name__}: " + (lines[-1] if lines else "")
    return _ext


def _loaded():
    """The extension, for the op functions (the dispatcher asked :func:`available` first)."""
    ext = _ext if _ext is not None else _load()
    if ext is None:
        raise RuntimeError(_error)
    return ext


def available() -> Optional[str]:
    """None when the extension is loaded (JIT-building it on the first call), else why not."""
    return None if _load() is not None else _error


def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                pos_embed: Optional[torch.Tensor], prefix: Optional[torch.Tensor], pad: bool) -> torch.Tensor:
    """Image x (B, C, H, W) -> tokens (B, T + gh * gw, D), contiguous, in ``weight.dtype``.

    weight (D, C, ph, pw), bias (D,), pos_embed (gh * gw, D), prefix (T, D) (class / register
    tokens, written first). One im2col + init pass, then one cuBLASLt GEMM adding bias and the
    position embedding in its epilogue."""
    return _loaded().patch_embed(x, weight, bias, pos_embed, prefix, pad)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None,
              rope: Optional[torch.Tensor] = None, rope_half: bool = False) -> torch.Tensor:
    """softmax(R(q) R(k)^T * scale + bias) v: q (B, H, N, d), k / v (B, H, N_kv, d), any strides
    with a unit-stride d (views of a packed qkv buffer).

    bias (H, N, N_kv) or (B, H, N, N_kv), any float dtype, is added to the scaled logits; rope
    (N_r, 2 d) or (H, N_r, 2 d) = ``cat([sin, cos], -1)`` rotates the last N_r tokens of q and k
    (interleaved pairs, or halves with ``rope_half``) as they are loaded.

    Returns (B, H, N, d), a transposed view of a contiguous (B, N, H, d) buffer, so
    ``out.transpose(1, 2).reshape(B, N, H * d)`` is free."""
    return _loaded().attention(q, k, v, scale, bias, rope, rope_half)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float) -> torch.Tensor:
    """LayerNorm of x (..., D) over D, statistics in float32; weight, bias (D,) or None.
    Returns (..., D) contiguous."""
    return _loaded().layer_norm(x, weight, bias, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: Optional[str],
           gamma: Optional[torch.Tensor], residual: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
           ln_bias: Optional[torch.Tensor], ln_eps: float) -> torch.Tensor:
    """``act(LN?(x) @ weight.T + bias) * gamma + residual``: x (..., K), weight (N, K), bias and
    gamma (N,), residual (..., N), ln_weight / ln_bias (K,) -> (..., N). With 'swiglu' weight and
    bias have 2 N rows (gate, then value) and the output N columns."""
    return _loaded().linear(x, weight, bias, ACT_CODES[act], gamma, residual, ln_weight, ln_bias, ln_eps)


def mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
        fc2_bias: Optional[torch.Tensor], act: Optional[str], gamma: Optional[torch.Tensor],
        residual: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
        ln_eps: float, hidden_ln_weight: Optional[torch.Tensor] = None, hidden_ln_bias: Optional[torch.Tensor] = None,
        hidden_ln_eps: float = 1e-6) -> torch.Tensor:
    """``residual + gamma * fc2(LN_h?(act(fc1(LN?(x)))))``: x (..., D), fc1_weight (Hd, D), fc2_weight
    (D_out, Hd) -> (..., D_out); the hidden activation is rounded to x's dtype."""
    if hidden_ln_weight is not None:  # the sub-LN is fc2's LN prologue: two linears
        h = linear(x, fc1_weight, fc1_bias, act, None, None, ln_weight, ln_bias, ln_eps)
        return linear(h, fc2_weight, fc2_bias, None, gamma, residual, hidden_ln_weight, hidden_ln_bias,
                      hidden_ln_eps)
    return _loaded().mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ACT_CODES[act], gamma, residual, ln_weight,
                    ln_bias, ln_eps)
