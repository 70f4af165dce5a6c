"""Facts stated once: the op names, activations, head-dim limits, the patch-grid formula, and
the data type every backend uses to declare what it can run.

Everything else reads these. C++ cannot import Python, so ``tests/test_facts.py`` checks the
copies ``csrc/`` needs (activation codes, the CUDA head-dim limit) against this module and
fails on drift.

A backend describes itself with a :class:`BackendLimits` (its *face*, together with one
function per op). :func:`not_supported_reasons` derives every "why not" from that data, as
xformers' ``not_supported_reasons`` does: dispatch, :class:`fastvit.backends.BackendUnavailable`,
auto fallback and ``fastvit info`` all print what it returns.

This module is a leaf: it imports only torch and the standard library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import FrozenSet, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "OPS", "ACTIVATIONS", "ACT_CODES", "GATED_ACTS", "ATTENTION_FEATURES", "FLOAT_DTYPES", "IMAGE_DTYPES",
    "MAX_HEAD_DIM", "BackendLimits", "not_supported_reasons", "patch_grid", "interpret_mode", "dtype_name",
]

# The public ops, in data-flow order. Every backend implements a subset (declared in its limits).
# attention_varlen is attention over packed sequences (flash-attention's varlen layout: (total,
# H, d) tokens, int32 cumulative offsets), the NaFlex models' mixed-size batches.
OPS = ("patch_embed", "attention", "attention_probs", "attention_varlen", "layer_norm", "linear", "mlp")

# Epilogue activations of linear / mlp. The integer codes cross into the kernels (Triton
# constexpr ACT, csrc/fastvit_cuda.h enum Act): their order is part of the contract.
# quick_gelu is OpenAI CLIP's x * sigmoid(1.702 x) (timm QuickGELU, HF "quick_gelu").
# swiglu is gated: the product has 2 N columns (gate rows first, then value rows of the weight)
# and the output silu(gate) * value has N (timm SwiGLU / GluMlp(gate_last=False), EVA-02).
ACTIVATIONS: Tuple[Optional[str], ...] = (None, "gelu", "gelu_tanh", "quick_gelu", "swiglu")
ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
# activations whose weight has two row blocks (gate, value) and whose output is half as wide
GATED_ACTS = frozenset({"swiglu"})

# Optional op features a call may need (``BackendLimits.features``; '<op>.<feature>'):
#   attention.bias           additive logit bias (H, N, N_kv) / (B, H, N, N_kv) (BEiT relative position)
#   attention.rope           rotary embedding of q / k in the prologue, one (N_r, 2 d) table for all heads
#   attention.rope_per_head  a (H, N_r, 2 d) table (timm's mixed RoPE: learnt frequencies per head)
# and the same three for attention_probs; attention_varlen.rope / .rope_per_head (a table per packed
# token, self attention). A call names exactly the ones it uses.
ATTENTION_FEATURES = ("bias", "rope", "rope_per_head")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# dtypes of patch_embed's image: the float dtypes, or uint8 pixels (cast in the load, exact in
# every float dtype; the model folds the normalisation into the projection)
IMAGE_DTYPES = FLOAT_DTYPES + (torch.uint8,)

# Op-level head-dim limit (validation in fastvit.ops); backends may declare less.
MAX_HEAD_DIM = 256


def patch_grid(height: int, width: int, patch: Tuple[int, int], pad: bool) -> Tuple[int, int]:
    """Token grid (rows, cols) of an ``height x width`` image cut in ``patch`` = (ph, pw) patches.

    With ``pad`` (timm ``dynamic_img_pad``) the image is zero-padded at the bottom / right up to
    whole patches; without it, a partial patch at the border is dropped (as a strided conv does;
    :func:`fastvit.ops.patch_embed` refuses such images before they get here).
    """
    ph, pw = patch
    if pad:
        return -(-height // ph), -(-width // pw)
    return height // ph, width // pw


def interpret_mode() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): read at call time,
    since tests set it before the first kernel import."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_DTYPE_NAMES = {d: str(d).replace("torch.", "") for d in FLOAT_DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'float16', 'bfloat16' ... (messages and tuning keys; a dict hit on the hot path)."""
    name = _DTYPE_NAMES.get(dtype)
    return name if name is not None else str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class BackendLimits:
    """What a backend can run, as data. Reasons are derived from it, never hand-written per op."""

    name: str
    # ops this backend implements (a subset of OPS)
    ops: FrozenSet[str]
    # tensor device types it runs on ('cuda', 'cpu')
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES
    # minimum CUDA compute capability on 'cuda' devices
    min_capability: Optional[Tuple[int, int]] = None
    # attention / attention_probs head dims
    max_head_dim: int = MAX_HEAD_DIM
    # tighter head-dim limits per dtype on a GPU (register-file bound; the CPU interpreter has none)
    gpu_max_head_dim: Mapping[torch.dtype, int] = field(default_factory=dict)
    # epilogue activations of linear / mlp
    acts: Tuple[Optional[str], ...] = ACTIVATIONS
    # optional op features, named '<op>.<feature>' (e.g. 'attention.kv_len'); an op call lists
    # the features it needs and each missing one is a reason
    features: FrozenSet[str] = frozenset()
    # CPU tensors run only in Triton's interpreter (TRITON_INTERPRET=1), in these dtypes
    cpu_needs_interpreter: bool = False
    interpreter_dtypes: Tuple[torch.dtype, ...] = ()
    # a note shown by ``fastvit info`` (where the code lives, how it is built)
    note: str = ""


def not_supported_reasons(
    limits: BackendLimits,
    op: Optional[str],
    device: torch.device,
    dtype: Optional[torch.dtype] = None,
    head_dim: Optional[int] = None,
    act: Optional[str] = None,
    features: Tuple[str, ...] = (),
    capability: Optional[Tuple[int, int]] = None,
) -> List[str]:
    """Every reason ``limits`` gives for not running ``op`` with these properties (empty = can).

    Args:
        limits: the backend's declared limits.
        op: one of :data:`OPS`, or None for the reasons that hold for every op (``fastvit info``).
        device: the tensors' device.
        dtype: the compute dtype, or None to skip dtype checks (``fastvit info``).
        head_dim: attention head dim, or None.
        act: the linear / mlp activation.
        features: op features the call needs ('<op>.<feature>').
        capability: the CUDA device's compute capability (asked by the caller, which caches it).
    """
    name = limits.name
    out: List[str] = []
    if op is not None and op not in limits.ops:
        out.append(f"{name} has no {op} kernel")
    if device.type not in limits.devices:
        out.append(f"{name} needs a {' or '.join(d.upper() for d in limits.devices)} tensor, got device "
                   f"{device.type!r}")
    elif device.type == "cpu" and limits.cpu_needs_interpreter:
        if not interpret_mode():
            out.append(f"CPU tensors run on {name} only in the Triton interpreter (TRITON_INTERPRET=1)")
        elif dtype is not None and dtype not in limits.interpreter_dtypes:
            out.append(f"{dtype_name(dtype)} is not run by the Triton interpreter (its arithmetic is wrong for "
                       f"it); supported there: {', '.join(dtype_name(d) for d in limits.interpreter_dtypes)}")
    if device.type == "cuda" and limits.min_capability is not None and capability is not None:
        if tuple(capability) < tuple(limits.min_capability):
            need = limits.min_capability
            out.append(f"{name} needs compute capability >= {need[0]}.{need[1]}, device has "
                       f"{capability[0]}.{capability[1]}")
    if dtype is not None and dtype not in limits.dtypes:
        out.append(f"{name} has no {dtype_name(dtype)} kernels")
    if head_dim is not None:
        if head_dim > limits.max_head_dim:
            out.append(f"{name} {op} supports head dim <= {limits.max_head_dim}, got {head_dim}")
        gpu_max = limits.gpu_max_head_dim.get(dtype) if dtype is not None else None
        if gpu_max is not None and device.type == "cuda" and head_dim > gpu_max:
            out.append(f"{name} {op} in {dtype_name(dtype)} supports head dim <= {gpu_max} on a GPU (larger tiles "
                       f"spill registers), got {head_dim}")
    if op in ("linear", "mlp") and act not in limits.acts:
        out.append(f"{name} {op} has no activation {act!r} (supported: {limits.acts})")
    for feat in features:
        if feat not in limits.features:
            out.append(f"{name} does not support {feat}")
    return out
