"""The ``triton`` backend of fastvit (installed as ``fastvit.kernels``).

Its face is every backend's (:mod:`fastvit.backends`): ``LIMITS`` (what it runs, as data),
``available()`` (a runtime reason, e.g. a too-old triton) and one function per op with the
signature of :mod:`fastvit.reference`; inputs arrive validated by :mod:`fastvit.ops`, which
also owns each op's custom op, fake and autograd. Importing this module imports triton;
importing :mod:`fastvit` does not (backends load it lazily).

Layering (as flash-attn's ``ops/triton``): kernel (``_*_fwd`` in the op files) -> launcher
(``*_fwd``: reshape, allocate, grid, config, launch; takes ``out=`` so tests can poison it).
The launchers are the op functions. ``<op>_for(*args)`` binds a launcher to the call signature of
``args`` (what fastvit.ops caches per signature): it reads strides, constexprs, key and config
once, then each call allocates and launches.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from fastvit.facts import ACTIVATIONS, OPS, BackendLimits

from .attention import FP32_MAX_HEAD_DIM, attention_for, attention_fwd as attention, attention_probs_fwd as attention_probs
from .attention_varlen import attention_varlen_for, attention_varlen_fwd as attention_varlen
from .layer_norm import layer_norm_for, layer_norm_fwd as layer_norm
from .linear import linear_for, linear_fwd as linear, mlp_for, mlp_fwd as mlp
from .patch_embed import patch_embed_fwd as patch_embed

__all__ = ["LIMITS", "available", "patch_embed", "attention", "attention_probs", "attention_varlen", "layer_norm",
           "linear", "mlp", "attention_for", "attention_varlen_for", "layer_norm_for", "linear_for", "mlp_for"]

_TRITON_MIN = (3, 0)

LIMITS = BackendLimits(
    name="triton",
    ops=frozenset(OPS),
    devices=("cuda", "cpu"),
    min_capability=(8, 0),
    max_head_dim=256,  # q and the accumulator tiles (BLOCK_M x 256) must stay on chip
    # float32 ('ieee' products on FMA units, q / k tiles in registers): every config with a
    # larger head spills (tests/test_aot.py)
    gpu_max_head_dim={torch.float32: FP32_MAX_HEAD_DIM},
    # every activation, the gated swiglu too (two accumulators in the GEMM, kernels/linear.py)
    acts=ACTIVATIONS,
    # bias and RoPE (shared or per-head tables) fused into both attention kernels; RoPE (per packed
    # token) into the varlen kernel
    features=frozenset({"attention.bias", "attention.rope", "attention.rope_per_head",
                        "attention_probs.bias", "attention_probs.rope", "attention_probs.rope_per_head",
                        "attention_varlen.rope", "attention_varlen.rope_per_head"}),
    cpu_needs_interpreter=True,
    # the interpreter computes bfloat16 through numpy float32 bit tricks that round wrongly
    interpreter_dtypes=(torch.float32, torch.float16),
    note="kernels/ (fastvit.kernels): fused Triton kernels, autotuned per shape key",
)


def _version(v: str) -> Tuple[int, int]:
    parts = v.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def available() -> Optional[str]:
    """Why these kernels cannot run in this process (None when they can)."""
    if _version(triton.__version__) < _TRITON_MIN:
        return f"triton >= {_TRITON_MIN[0]}.{_TRITON_MIN[1]} needed, found {triton.__version__}"
    return None
