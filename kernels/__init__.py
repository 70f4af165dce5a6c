"""The ``triton`` backend of fastvit (installed as ``fastvit.kernels``).

Exposes the op functions with the signatures of :mod:`fastvit.reference` (inputs arrive
validated by :mod:`fastvit.ops`), plus ``availability(device)`` and ``unsupported(op, ...)``,
which :mod:`fastvit.backends` asks for reasons. Importing this module imports triton; importing
:mod:`fastvit` does not (backends load it lazily).

Layering (as flash-attn's ``ops/triton``): kernel (``_*_fwd`` in the op files) -> launcher
(``*_fwd``: reshape, allocate, grid, config, launch; takes ``out=`` so tests can poison it) ->
``torch.library`` custom op (opaque to torch.compile, with a fake for shape propagation and an
autograd formula) -> the functions below.

Autograd: the kernels are forward-only. When an input requires grad, the op's backward
recomputes the op with the PyTorch reference (:mod:`fastvit.reference`) under autograd and
differentiates that, so gradients are exact for the reference formula (and cost an extra
reference forward). Inference never pays for it: with no input requiring grad and outside
``torch.compile`` tracing, the functions call the launchers directly, skipping the dispatcher.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple

import torch

from fastvit._autograd import register_reference_backward
import triton

from fastvit import reference as _ref

from .attention import FP32_MAX_HEAD_DIM, attention_fwd, attention_probs_fwd, empty_out
from .layer_norm import layer_norm_fwd
from .linear import linear_fwd, mlp_fwd
from .patch_embed import patch_embed_fwd

__all__ = [
    "patch_embed", "attention", "attention_probs", "layer_norm", "linear", "mlp",
    "availability", "unsupported", "OPS",
]

MAX_HEAD_DIM = 256
_TRITON_MIN = (3, 0)


def _version(v: str) -> Tuple[int, int]:
    parts = v.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def availability(device: torch.device) -> Optional[str]:
    """Why these kernels cannot run on ``device`` (None when they can)."""
    if _version(triton.__version__) < _TRITON_MIN:
        return f"triton >= {_TRITON_MIN[0]}.{_TRITON_MIN[1]} needed, found {triton.__version__}"
    if device.type == "cpu" and not _interpreting():
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    return None


def unsupported(op: str, head_dim: Optional[int] = None, dtype: Optional[torch.dtype] = None, **_) -> Optional[str]:
    """Why ``op`` with these shapes cannot run here (None when it can)."""
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM} (the q / acc tiles would not fit on chip)"
    if (op in ("attention", "attention_probs") and dtype == torch.float32 and head_dim is not None
            and head_dim > FP32_MAX_HEAD_DIM and not _interpreting()):
        return (f"float32 attention with head dim {head_dim} > {FP32_MAX_HEAD_DIM}: every Triton config spills "
                "registers (tests/test_aot.py); use float16 / bfloat16 or another backend")
    if dtype == torch.bfloat16 and _interpreting():
        # the interpreter computes bf16 through numpy float32 bit tricks that round wrongly
        return "bfloat16 is silently wrong in the Triton interpreter (TRITON_INTERPRET=1); use a GPU"
    return None


# --------------------------------------------------------------------------- torch.library
def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _compiling() -> bool:
    f = getattr(torch.compiler, "is_compiling", None)
    return bool(f and f())


_HAS_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")
OPS = {}  # op name -> torch.ops handle (empty on torch < 2.4: then torch.compile graph-breaks here)

if _HAS_CUSTOM_OP:
    from torch import Tensor

    @torch.library.custom_op("fastvit::triton_patch_embed", mutates_args=())
    def _patch_embed_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
                        prefix: Optional[Tensor], pad: bool) -> Tensor:
        return patch_embed_fwd(x, weight, bias, pos_embed, prefix, pad)

    @_patch_embed_op.register_fake
    def _(x, weight, bias, pos_embed, prefix, pad):
        B, _, H, W = x.shape
        D, _, ph, pw = weight.shape
        gh, gw = (-(-H // ph), -(-W // pw)) if pad else (H // ph, W // pw)
        T = 0 if prefix is None else prefix.shape[0]
        return weight.new_empty(B, T + gh * gw, D)

    @torch.library.custom_op("fastvit::triton_attention", mutates_args=())
    def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
        return attention_fwd(q, k, v, scale)

    @_attention_op.register_fake
    def _(q, k, v, scale):
        return empty_out(q)

    @torch.library.custom_op("fastvit::triton_attention_probs", mutates_args=())
    def _attention_probs_op(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tuple[Tensor, Tensor]:
        return attention_probs_fwd(q, k, v, scale)

    @_attention_probs_op.register_fake
    def _(q, k, v, scale):
        B, H, N, _ = q.shape
        return empty_out(q), q.new_empty(B, H, N, k.shape[2], dtype=torch.float32)

    @torch.library.custom_op("fastvit::triton_layer_norm", mutates_args=())
    def _layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
        return layer_norm_fwd(x, weight, bias, eps)

    @_layer_norm_op.register_fake
    def _(x, weight, bias, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.custom_op("fastvit::triton_linear", mutates_args=())
    def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Optional[str], gamma: Optional[Tensor],
                   residual: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                   ln_eps: float) -> Tensor:
        return linear_fwd(x, weight, bias, act, gamma, residual, ln_weight, ln_bias, ln_eps)

    @_linear_op.register_fake
    def _(x, weight, bias, act, gamma, residual, ln_weight, ln_bias, ln_eps):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.custom_op("fastvit::triton_mlp", mutates_args=())
    def _mlp_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                fc2_bias: Optional[Tensor], act: Optional[str], gamma: Optional[Tensor], residual: Optional[Tensor],
                ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], ln_eps: float) -> Tensor:
        return mlp_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual, ln_weight, ln_bias, ln_eps)

    @_mlp_op.register_fake
    def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual, ln_weight, ln_bias, ln_eps):
        return x.new_empty(*x.shape[:-1], fc2_weight.shape[0])

    register_reference_backward(_patch_embed_op, _ref.patch_embed, (0, 1, 2, 3, 4))
    register_reference_backward(_attention_op, _ref.attention, (0, 1, 2))
    register_reference_backward(_attention_probs_op, _ref.attention_probs, (0, 1, 2))
    register_reference_backward(_layer_norm_op, _ref.layer_norm, (0, 1, 2))
    register_reference_backward(_linear_op, _ref.linear, (0, 1, 2, 4, 5, 6, 7))
    register_reference_backward(_mlp_op, _ref.mlp, (0, 1, 2, 3, 4, 6, 7, 8, 9))
    OPS = {"patch_embed": _patch_embed_op, "attention": _attention_op, "attention_probs": _attention_probs_op,
           "layer_norm": _layer_norm_op, "linear": _linear_op, "mlp": _mlp_op}


def _dispatch(name: str, direct: Callable, tensors: Sequence, args: tuple):
    op = OPS.get(name)
    if op is not None and (_compiling() or _needs_grad(*tensors)):
        return op(*args)
    return direct(*args)


# --------------------------------------------------------------------------- backend functions
def patch_embed(x, weight, bias=None, pos_embed=None, prefix=None, pad=False):
    """Image (B, C, H, W) -> tokens (B, T + gh * gw, D); see :func:`fastvit.reference.patch_embed`."""
    args = (x, weight, bias, pos_embed, prefix, bool(pad))
    return _dispatch("patch_embed", patch_embed_fwd, args[:5], args)


def attention(q, k, v, scale=None):
    """q (B, H, N, d), k / v (B, H, N_kv, d) -> (B, H, N, d) view of a (B, N, H, d) buffer."""
    args = (q, k, v, None if scale is None else float(scale))
    return _dispatch("attention", attention_fwd, args[:3], args)


def attention_probs(q, k, v, scale=None):
    """As :func:`attention`, plus probabilities (B, H, N, N_kv) float32."""
    args = (q, k, v, None if scale is None else float(scale))
    return _dispatch("attention_probs", attention_probs_fwd, args[:3], args)


def layer_norm(x, weight, bias, eps=1e-6):
    """LayerNorm of x (..., D) over D."""
    args = (x, weight, bias, float(eps))
    return _dispatch("layer_norm", layer_norm_fwd, args[:3], args)


def linear(x, weight, bias=None, act=None, gamma=None, residual=None, ln_weight=None, ln_bias=None, ln_eps=1e-6):
    """``act(LN?(x) @ weight.T + bias) * gamma + residual``; x (..., K) -> (..., N)."""
    args = (x, weight, bias, act, gamma, residual, ln_weight, ln_bias, float(ln_eps))
    return _dispatch("linear", linear_fwd, (x, weight, bias, gamma, residual, ln_weight, ln_bias), args)


def mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act="gelu", gamma=None, residual=None,
        ln_weight=None, ln_bias=None, ln_eps=1e-6):
    """``residual + gamma * fc2(act(fc1(LN?(x))))``; x (..., D) -> (..., D_out)."""
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual, ln_weight, ln_bias, float(ln_eps))
    return _dispatch("mlp", mlp_fwd, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual, ln_weight,
                                      ln_bias), args)
