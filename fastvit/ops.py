"""Public ops: each op's contract, written once, then validation and dispatch.

For every op this file holds, side by side (as flash-attention's ``flash_attn_interface``):

* the public function (its docstring is the contract: shapes, dtypes, output layout),
* its ``torch.library`` custom op under the one namespace ``fastvit`` (``fastvit::<op>``),
  whose last argument names the backend that runs it, with its fake (meta) function and its
  autograd (the backward differentiates the PyTorch reference at the saved inputs).

Backends (:mod:`fastvit.backends`) supply implementations only. The custom op is what
``torch.compile`` sees (opaque, traced through its fake: no graph break) and what autograd
records; an eager inference call skips the dispatcher and calls the backend function directly.
The ``torch`` backend never needs the custom op: its functions are traceable and differentiable.

Validation happens here, before dispatch: errors are ``ValueError`` / ``TypeError`` naming the
argument, what was expected and what was given. It runs the first time a call signature is seen
(the tensor arguments' shapes, strides, dtypes and devices, see :mod:`fastvit.signature`, plus
flags and the backend argument); the result - the backend function to call - is cached as a
*plan*, so a repeated call costs one signature and one dict lookup.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends, reference
from .signature import signature as _signature
from .facts import ACTIVATIONS, FLOAT_DTYPES, GATED_ACTS, IMAGE_DTYPES, MAX_HEAD_DIM, dtype_name, patch_grid

__all__ = ["patch_embed", "attention", "attention_probs", "attention_varlen", "varlen_offsets", "linear", "mlp",
           "layer_norm", "clear_plans"]


# --------------------------------------------------------------------------- validation helpers
def _fail(arg: str, expected: str, got, exc=ValueError):
    raise exc(f"{arg}: expected {expected}, got {got}")


def _tensor(t, arg: str, ndim: Optional[int] = None, min_ndim: Optional[int] = None, optional=False,
            dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES):
    if t is None:
        if optional:
            return
        _fail(arg, "a torch.Tensor", "None", TypeError)
    if not isinstance(t, torch.Tensor):
        _fail(arg, "a torch.Tensor", type(t).__name__, TypeError)
    if t.layout is not torch.strided or t.is_nested:
        _fail(arg, "a dense (strided) tensor", f"layout {t.layout}{' (nested)' if t.is_nested else ''}", TypeError)
    if t.dtype not in dtypes:
        _fail(arg, "dtype " + ", ".join(dtype_name(d) for d in dtypes[:-1]) + f" or {dtype_name(dtypes[-1])}",
              t.dtype, TypeError)
    if ndim is not None and t.dim() != ndim:
        _fail(arg, f"a {ndim}-D tensor", f"shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        _fail(arg, f"at least {min_ndim} dims", f"shape {tuple(t.shape)}")


def _shape(t, arg: str, shape: Sequence[int]):
    if t is not None and tuple(t.shape) != tuple(shape):
        _fail(arg, f"shape {tuple(shape)}", f"shape {tuple(t.shape)}")


def _same(ref: Tensor, ref_arg: str, **others):
    for arg, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            _fail(arg, f"device {ref.device} (as {ref_arg})", f"device {t.device}")
        if t.dtype != ref.dtype:
            _fail(arg, f"dtype {ref.dtype} (as {ref_arg})", f"dtype {t.dtype}", TypeError)


def _last_dim_contiguous(t, arg: str):
    if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(arg, "a last dim with stride 1", f"strides {tuple(t.stride())}")


def _act(act):
    try:
        ok = act in ACTIVATIONS
    except TypeError:  # unhashable
        ok = False
    if not ok:
        _fail("act", f"one of {ACTIVATIONS}", repr(act))


def _scale(scale, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        _fail("scale", "a float or None", type(scale).__name__, TypeError)
    return float(scale)


# --------------------------------------------------------------------------- plans
_PLANS: Dict[tuple, Callable] = {}
# The hot path's first call. torch.compile's tracer (dynamo) folds it to True, so a traced call never
# reaches the C++ signature (a graph break) nor the plan cache; in eager it is a bare `return False`
# (torch.compiler.is_compiling also reads torch.jit state: twice the cost). Tracing without dynamo
# (non-strict export, make_fx) passes FakeTensors, which have no signature: validated every call.
_is_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_MAX_PLANS = 4096  # call signatures are few in a served model; this bounds a pathological caller


def clear_plans() -> None:
    """Forget every cached plan (the next call of each signature validates and resolves again)."""
    _PLANS.clear()


backends.on_reset(clear_plans)


def _build(op: str, key, backend, call_args: tuple, validate: Callable, *args) -> Callable:
    """A cache miss: ``validate(*args)`` raises on bad input or returns (device, props) for the
    backend choice; the resolved plan is remembered under ``key`` (None: not cacheable, e.g. an
    argument that is not a tensor, or torch.compile tracing, where dynamo traces this once).

    A backend may bind a plan to the call signature: ``<op>_for(*call_args)`` (the plan's
    arguments of this call) returns a function for every call of that signature, which reads
    what the signature fixes (strides, constexprs, tuning key, config) once instead of per call.
    Only cacheable calls are bound."""
    device, props = validate(*args)
    mod = backends.resolve(op, device, backend, **props)
    make = getattr(mod, op + "_for", None) if key is not None else None
    fn = getattr(mod, op) if make is None else make(*call_args)
    plan = fn if mod is reference else _plan(op, mod.LIMITS.name, fn, make is not None, CUSTOM_OPS[op],
                                             _TENSOR_ARGS[op])
    if key is not None and not torch.compiler.is_compiling():
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _plan(op: str, name: str, fn: Callable, bound: bool, custom_op, grad_args: Tuple[int, ...]) -> Callable:
    """The callable that runs ``op`` with ``fn`` of backend ``name`` (not the torch backend,
    whose functions are called directly: traceable, differentiable).

    ``fn`` is called directly for inference, the backend's custom op when torch.compile traces
    or when an input needs a gradient (``grad_args``: positions of tensor arguments)."""
    if op in ("attention", "attention_probs"):  # the plan gets scale=None for the default d ** -0.5
        def run(q, k, v, scale, bias, rope, rope_half):
            if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                    q.requires_grad or k.requires_grad or v.requires_grad
                    or (bias is not None and bias.requires_grad) or (rope is not None and rope.requires_grad))):
                scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
                return custom_op(q, k, v, scale, bias, rope, rope_half, name)
            if not bound:  # a bound function computes the default scale once
                scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
            return fn(q, k, v, scale, bias, rope, rope_half)

        return run

    def run(*args):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
                args[i] is not None and args[i].requires_grad for i in grad_args)):
            return custom_op(*args, name)
        return fn(*args)

    return run


# --------------------------------------------------------------------------- the contract
def _register_reference_backward(op, reference_fn: Callable, tensor_args: Sequence[int]) -> None:
    """Give custom op ``op`` a backward that differentiates ``reference_fn`` (same arguments,
    minus the trailing backend name) at the saved inputs: exact gradients of the reference
    formula for kernels that are forward-only."""
    tensor_args = tuple(tensor_args)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in tensor_args))
        ctx.others = [None if i in tensor_args else a for i, a in enumerate(inputs[:-1])]

    def backward(ctx, *grads):
        args = list(ctx.others)
        leaves, where = [], []
        for i, t in zip(tensor_args, ctx.saved_tensors):
            if t is not None and ctx.needs_input_grad[i]:
                t = t.detach().requires_grad_(True)
                leaves.append(t)
                where.append(i)
            args[i] = t
        result = [None] * (len(args) + 1)
        if not leaves:
            return tuple(result)
        with torch.enable_grad():
            outs = reference_fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
        for i, g in zip(where, got):
            result[i] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


def _attention_layout(q: Tensor) -> Tensor:
    """A (B, H, N, d) view of a fresh (B, N, H, d) buffer: the layout every backend returns."""
    B, H, N, d = q.shape
    return q.new_empty(B, N, H, d).transpose(1, 2)


def _call_backend(op: str, backend: str, *args):
    return getattr(backends.module(backend), op)(*args)


@torch.library.custom_op("fastvit::patch_embed", mutates_args=())
def _patch_embed_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
                    prefix: Optional[Tensor], pad: bool, backend: str) -> Tensor:
    return _call_backend("patch_embed", backend, x, weight, bias, pos_embed, prefix, pad)


@_patch_embed_op.register_fake
def _(x, weight, bias, pos_embed, prefix, pad, backend):
    D, _, ph, pw = weight.shape
    gh, gw = patch_grid(x.shape[2], x.shape[3], (ph, pw), pad)
    T = 0 if prefix is None else prefix.shape[0]
    return weight.new_empty(x.shape[0], T + gh * gw, D)


@torch.library.custom_op("fastvit::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Optional[Tensor], rope: Optional[Tensor],
                  rope_half: bool, backend: str) -> Tensor:
    return _call_backend("attention", backend, q, k, v, scale, bias, rope, rope_half)


@_attention_op.register_fake
def _(q, k, v, scale, bias, rope, rope_half, backend):
    return _attention_layout(q)


@torch.library.custom_op("fastvit::attention_probs", mutates_args=())
def _attention_probs_op(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Optional[Tensor],
                        rope: Optional[Tensor], rope_half: bool, backend: str) -> Tuple[Tensor, Tensor]:
    return _call_backend("attention_probs", backend, q, k, v, scale, bias, rope, rope_half)


@_attention_probs_op.register_fake
def _(q, k, v, scale, bias, rope, rope_half, backend):
    B, H, N, _ = q.shape
    return _attention_layout(q), q.new_empty(B, H, N, k.shape[2], dtype=torch.float32)


@torch.library.custom_op("fastvit::attention_varlen", mutates_args=())
def _attention_varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, scale: float, rope: Optional[Tensor], rope_half: bool,
                         backend: str) -> Tensor:
    return _call_backend("attention_varlen", backend, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, scale, rope, rope_half)


@_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, rope, rope_half, backend):
    return q.new_empty(q.shape)  # (total_q, H, d), contiguous


@torch.library.custom_op("fastvit::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, backend: str) -> Tensor:
    return _call_backend("layer_norm", backend, x, weight, bias, eps)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastvit::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Optional[str], gamma: Optional[Tensor],
               residual: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], ln_eps: float,
               backend: str) -> Tensor:
    return _call_backend("linear", backend, x, weight, bias, act, gamma, residual, ln_weight, ln_bias, ln_eps)


@_linear_op.register_fake
def _(x, weight, bias, act, gamma, residual, ln_weight, ln_bias, ln_eps, backend):
    return x.new_empty(*x.shape[:-1], _out_features(weight, act))


@torch.library.custom_op("fastvit::mlp", mutates_args=())
def _mlp_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
            act: Optional[str], gamma: Optional[Tensor], residual: Optional[Tensor], ln_weight: Optional[Tensor],
            ln_bias: Optional[Tensor], ln_eps: float, hidden_ln_weight: Optional[Tensor],
            hidden_ln_bias: Optional[Tensor], hidden_ln_eps: float, backend: str) -> Tensor:
    return _call_backend("mlp", backend, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual,
                         ln_weight, ln_bias, ln_eps, hidden_ln_weight, hidden_ln_bias, hidden_ln_eps)


@_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual, ln_weight, ln_bias, ln_eps,
      hidden_ln_weight, hidden_ln_bias, hidden_ln_eps, backend):
    return x.new_empty(*x.shape[:-1], fc2_weight.shape[0])


# positions of the tensor arguments of each op (saved for backward, checked for requires_grad)
_TENSOR_ARGS = {
    "patch_embed": (0, 1, 2, 3, 4),
    "attention": (0, 1, 2, 4, 5),
    "attention_probs": (0, 1, 2, 4, 5),
    "attention_varlen": (0, 1, 2, 3, 4, 8),  # the offsets are saved for the backward, never differentiated
    "layer_norm": (0, 1, 2),
    "linear": (0, 1, 2, 4, 5, 6, 7),
    "mlp": (0, 1, 2, 3, 4, 6, 7, 8, 9, 11, 12),
}
CUSTOM_OPS = {
    "patch_embed": _patch_embed_op, "attention": _attention_op, "attention_probs": _attention_probs_op,
    "attention_varlen": _attention_varlen_op, "layer_norm": _layer_norm_op, "linear": _linear_op, "mlp": _mlp_op,
}
for _name, _op in CUSTOM_OPS.items():
    _register_reference_backward(_op, getattr(reference, _name), _TENSOR_ARGS[_name])


# --------------------------------------------------------------------------- ops
# Each op: the plan key is the tensor arguments' signature (fastvit.signature: shapes, strides,
# dtypes, devices, read in C++ when fastvit._signature is built) plus its non-tensor arguments;
# the hot path of a repeated call is that signature, one tuple, one dict lookup. Validate and
# resolve only on a miss. No signature (a tensor subclass, a non-tensor, torch.compile tracing):
# validate every call.
def patch_embed(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, pos_embed: Optional[Tensor] = None,
    prefix: Optional[Tensor] = None, pad: bool = False, *, backend: Optional[str] = None,
) -> Tensor:
    """Image -> tokens: patchify + project + bias + position embedding + prefix token rows.

    Args:
        x: (B, C, H, W) image, float32 / float16 / bfloat16 or uint8 (cast to ``weight.dtype`` in the
            load; 0..255 are exact in every float dtype, so a uint8 image costs a quarter of the
            bytes of a float32 one and no separate cast pass). Normalisation is not this op's: the
            model folds it into ``weight`` / ``bias`` / ``pos_embed``
            (:meth:`fastvit.VisionTransformer.set_input_normalization`).
        weight: (D, C, Ph, Pw) conv weight of the patch projection.
        bias: (D,) or None.
        pos_embed: (gh * gw, D) position embedding of the patch tokens for this grid, or None.
        prefix: (T, D) rows put before the patch tokens (class / distillation / register tokens
            with their position embedding already added), or None.
        pad: zero-pad H, W up to multiples of the patch (timm ``dynamic_img_pad``).
        backend: 'triton', 'cuda', 'torch' or None (selection rules in :mod:`fastvit.backends`).

    Returns:
        (B, T + gh * gw, D) contiguous, in ``weight.dtype``.
    """
    pad = bool(pad)
    sig = None if _is_compiling() else _signature(x, weight, bias, pos_embed, prefix)
    key = plan = None
    if sig is not None:
        key = ("patch_embed", backend, pad, sig)
        try:
            plan = _PLANS.get(key)
        except TypeError:  # an unhashable argument: validation names it
            key = None
    if plan is None:
        plan = _build("patch_embed", key, backend, (x, weight, bias, pos_embed, prefix, pad), _validate_patch_embed, x,
                      weight, bias, pos_embed, prefix, pad)
    return plan(x, weight, bias, pos_embed, prefix, pad)


def _validate_patch_embed(x, weight, bias, pos_embed, prefix, pad):
    _tensor(x, "x", ndim=4, dtypes=IMAGE_DTYPES)
    _tensor(weight, "weight", ndim=4)
    D, C, ph, pw = weight.shape
    if x.shape[1] != C:
        _fail("x", f"{C} input channels (B, {C}, H, W)", f"shape {tuple(x.shape)}")
    if x.device != weight.device:
        _fail("x", f"device {weight.device} (as weight)", f"device {x.device}")
    H, W = x.shape[2:]
    if not pad and (H % ph or W % pw):
        _fail("x", f"height and width multiples of the patch size {(ph, pw)} (or pad=True / dynamic_img_pad)",
              f"image size {(H, W)}")
    gh, gw = patch_grid(H, W, (ph, pw), pad)
    if gh == 0 or gw == 0:
        _fail("x", f"an image at least one patch {(ph, pw)} large", f"image size {(H, W)}")
    for name, t, shp in (("bias", bias, (D,)), ("pos_embed", pos_embed, (gh * gw, D))):
        _tensor(t, name, optional=True)
        _shape(t, name, shp)
    _tensor(prefix, "prefix", ndim=2, optional=True)
    if prefix is not None and prefix.shape[1] != D:
        _fail("prefix", f"shape (T, {D})", f"shape {tuple(prefix.shape)}")
    _same(weight, "weight", bias=bias, pos_embed=pos_embed, prefix=prefix)
    return x.device, dict(dtype=weight.dtype)


def attention(
    q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, *, bias: Optional[Tensor] = None,
    rope: Optional[Tensor] = None, rope_half: bool = False, backend: Optional[str] = None,
) -> Tensor:
    """Softmax attention like ``F.scaled_dot_product_attention`` (no dropout), with the two
    position schemes of the ViT families fused in: ``softmax(R(q) R(k)^T * scale + bias) v``.

    Args:
        q: (B, H, N, d); k, v: (B, H, N_kv, d). Any strides with a unit-stride last dim, so
            strided views of a packed (B, N, 3, H, d) qkv buffer need no copy.
        scale: softmax scale, default ``d ** -0.5``.
        bias: additive logit bias after the scale (BEiT's relative position bias): (H, N, N_kv)
            broadcast over the batch, or (B, H, N, N_kv); any float dtype, unit-stride last dim.
        rope: rotary position embedding ``cat([sin, cos], -1)`` as timm builds it: (N_r, 2 d)
            for every head or (H, N_r, 2 d) per head (timm's mixed RoPE). The last N_r tokens of
            q and of k are rotated (N_r <= N and <= N_kv; the prefix tokens before them, class /
            registers, are not), in float32 and rounded to q's dtype, as timm does. d must be even.
        rope_half: rotate dim i with i + d / 2 (timm ``rotate_half``, DINOv3) instead of the
            interleaved pairs (2 i, 2 i + 1) (EVA-02, timm RoPE ViTs).
        backend: see :func:`patch_embed`.

    Returns:
        (B, H, N, d) in q's dtype, from every backend a transposed view of a (B, N, H, d)
        buffer, so ``out.transpose(1, 2).reshape(B, N, H * d)`` needs no copy.
    """
    sig = None if _is_compiling() else _signature(q, k, v, bias, rope)
    key = plan = None
    if sig is not None:
        key = ("attention", backend, scale.__class__, rope_half.__class__, rope_half, sig)
        try:
            plan = _PLANS.get(key)
        except TypeError:
            key = None
    if plan is None:
        plan = _build("attention", key, backend, (q, k, v, scale, bias, rope, rope_half), _validate_attention,
                      "attention", q, k, v, scale, bias, rope, rope_half)
    return plan(q, k, v, scale, bias, rope, rope_half)


def attention_probs(
    q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, *, bias: Optional[Tensor] = None,
    rope: Optional[Tensor] = None, rope_half: bool = False, backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention that also returns the softmax probabilities, for pictures (opt-in, slow path).

    Args: as :func:`attention`.

    Returns:
        out (B, H, N, d) in q's dtype (layout as :func:`attention`) and probs (B, H, N, N_kv)
        in float32 (after the RoPE rotation and the bias).
    """
    sig = None if _is_compiling() else _signature(q, k, v, bias, rope)
    key = plan = None
    if sig is not None:
        key = ("attention_probs", backend, scale.__class__, rope_half.__class__, rope_half, sig)
        try:
            plan = _PLANS.get(key)
        except TypeError:
            key = None
    if plan is None:
        plan = _build("attention_probs", key, backend, (q, k, v, scale, bias, rope, rope_half), _validate_attention,
                      "attention_probs", q, k, v, scale, bias, rope, rope_half)
    return plan(q, k, v, scale, bias, rope, rope_half)


def _validate_attention(op, q, k, v, scale, bias=None, rope=None, rope_half=False):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(t, name, ndim=4)
        _last_dim_contiguous(t, name)
    B, H, N, d = q.shape
    if k.shape[:2] != q.shape[:2] or k.shape[3] != d:
        _fail("k", f"shape ({B}, {H}, N_kv, {d}) matching q (B, H, N, d)", f"shape {tuple(k.shape)}")
    _shape(v, "v", k.shape)
    _same(q, "q", k=k, v=v)
    if d > MAX_HEAD_DIM:
        _fail("q", f"head dim <= {MAX_HEAD_DIM}", f"head dim {d}")
    _scale(scale, d)  # argument errors before backend errors (the plan key holds its type)
    features = []
    N_kv = k.shape[2]
    if bias is not None:
        _tensor(bias, "bias")
        if bias.dim() == 3:
            want = (H, N, N_kv)
        elif bias.dim() == 4 and bias.shape[0] in (1, B):
            want = (bias.shape[0], H, N, N_kv)
        else:
            want = None
        if want is None or tuple(bias.shape) != want:
            _fail("bias", f"shape ({H}, {N}, {N_kv}) or ({B}, {H}, {N}, {N_kv}) (H, N, N_kv of q / k)",
                  f"shape {tuple(bias.shape)}")
        _last_dim_contiguous(bias, "bias")
        if bias.device != q.device:
            _fail("bias", f"device {q.device} (as q)", f"device {bias.device}")
        features.append(op + ".bias")
    if not isinstance(rope_half, bool):
        _fail("rope_half", "a bool", type(rope_half).__name__, TypeError)
    if rope is not None:
        _tensor(rope, "rope")
        if d % 2:
            _fail("q", "an even head dim with rope", f"head dim {d}")
        if rope.dim() not in (2, 3) or rope.shape[-1] != 2 * d or (rope.dim() == 3 and rope.shape[0] != H) \
                or not 0 < rope.shape[-2] <= min(N, N_kv):
            _fail("rope", f"shape (N_r, {2 * d}) or ({H}, N_r, {2 * d}) (cat([sin, cos], -1) with "
                          f"0 < N_r <= min(N, N_kv) = {min(N, N_kv)})", f"shape {tuple(rope.shape)}")
        _last_dim_contiguous(rope, "rope")
        if rope.device != q.device:
            _fail("rope", f"device {q.device} (as q)", f"device {rope.device}")
        features.append(op + ".rope")
        if rope.dim() == 3:
            features.append(op + ".rope_per_head")
    return q.device, dict(dtype=q.dtype, head_dim=d, features=tuple(features))


# --------------------------------------------------------------------------- attention_varlen
def attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, scale: Optional[float] = None, *, bias: Optional[Tensor] = None, rope: Optional[Tensor] = None,
    rope_half: bool = False, backend: Optional[str] = None,
) -> Tensor:
    """Softmax attention over packed variable-length sequences, flash-attention's
    ``flash_attn_varlen_func`` semantics (no dropout, not causal): sequence i's queries
    ``q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]`` attend to ``k`` / ``v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]]``
    only, ``softmax(q k^T * scale) v`` per sequence; no attention across sequences.

    Args:
        q: (total_q, H, d); k, v: (total_k, H, d). Any strides with a unit-stride last dim, so
            views of a packed (total, 3, H, d) qkv buffer need no copy. d <= 256.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 cumulative offsets on q's device: 0 first,
            total_q / total_k last, non-decreasing (empty sequences are allowed; a sequence with
            queries must have keys). Build them with :func:`varlen_offsets`.
        max_seqlen_q, max_seqlen_k: Python ints >= the longest query / key sequence (they size
            the launch grid; a larger value only costs idle programs).
        scale: softmax scale, default ``d ** -0.5``.
        bias: not supported for packed sequences (a per-sequence (H, N_i, N_i) logit bias has no
            single packed layout); must be None.
        rope: rotary embedding per packed token, ``cat([sin, cos], -1)`` as timm builds it:
            (total_q, 2 d) for every head or (H, total_q, 2 d) per head; q and k are rotated in
            float32 and rounded to q's dtype (as :func:`attention`'s RoPE). Self attention only:
            k's tokens are q's (same offsets, total_k == total_q). Tokens not to rotate (class /
            register tokens) carry sin 0, cos 1. d must be even.
        rope_half: rotate dim i with i + d / 2 (timm ``rotate_half``) instead of the interleaved
            pairs (2 i, 2 i + 1).
        backend: see :func:`patch_embed`. The triton and torch backends run it; the cuda backend
            declares no attention_varlen kernel (auto falls back triton -> torch).

    Returns:
        (total_q, H, d) contiguous, in q's dtype (the projection reads it as (total_q, H * d)).

    Offsets are checked by value (the first entry, order, totals against q / k, the longest
    sequence against max_seqlen), once per offsets tensor: the facts are cached on the tensor
    object and its version counter (an in-place change re-checks; inference tensors have no
    counter and are checked once). A new CUDA offsets tensor costs
    one device-to-host copy of its B + 1 entries (a sync) on its first use; offsets made by
    :func:`varlen_offsets` from host lengths are registered there and never read back. Skipped
    where the values cannot be read: while torch.compile traces (FakeTensors), during CUDA-graph
    capture (check them eagerly first: ``fastvit.warmup`` does), for tensor subclasses.
    """
    if bias is not None:
        _fail("bias", "None (attention_varlen takes no logit bias: a per-sequence (H, N_i, N_i) bias has no "
                      "packed layout)", f"a {type(bias).__name__}")
    sig = None if _is_compiling() else _signature(q, k, v, cu_seqlens_q, cu_seqlens_k, rope)
    key = plan = None
    if sig is not None:
        key = ("attention_varlen", backend, scale.__class__, rope_half.__class__, rope_half, sig)
        try:
            plan = _PLANS.get(key)
        except TypeError:
            key = None
    if plan is None:
        plan = _build("attention_varlen", key, backend,
                      (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, rope, rope_half),
                      _validate_attention_varlen, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      scale, rope, rope_half)
    else:  # the plan fixed shapes and dtypes; the offsets' values and the max lengths are per call
        _check_seqlen_args(max_seqlen_q, max_seqlen_k)
        _check_offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rope is not None)
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, s, rope, rope_half)


def varlen_offsets(seqlens, device=None) -> Tuple[Tensor, int]:
    """(cu_seqlens, max_seqlen) for sequences of lengths ``seqlens`` (a sequence of ints or a
    1-D integer CPU tensor): cu_seqlens (B + 1,) int32 on ``device``, 0 first. Computed on the
    host and registered as checked, so :func:`attention_varlen` never reads them back from the GPU."""
    if isinstance(seqlens, Tensor):
        if seqlens.dim() != 1 or seqlens.is_floating_point() or seqlens.is_complex():
            _fail("seqlens", "a 1-D integer tensor or a sequence of ints",
                  f"a {seqlens.dim()}-D {seqlens.dtype} tensor")
        seqlens = seqlens.tolist()
    lengths = []
    for i, n in enumerate(seqlens):
        if isinstance(n, bool) or not isinstance(n, int):
            _fail(f"seqlens[{i}]", "an int", type(n).__name__, TypeError)
        if n < 0:
            _fail(f"seqlens[{i}]", "a length >= 0", n)
        lengths.append(n)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    if cu[-1] >= 2 ** 31:
        _fail("seqlens", "a total below 2 ** 31 (int32 offsets)", f"total {cu[-1]}")
    t = torch.tensor(cu, dtype=torch.int32, device=device)
    _remember_offsets(t, _OffsetFacts(cu[-1], tuple(lengths)))
    return t, max(lengths, default=0)


def _check_seqlen_args(max_seqlen_q, max_seqlen_k):
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m.__class__ is not int and not isinstance(m, torch.SymInt):
            if isinstance(m, bool) or not isinstance(m, int):
                _fail(name, "an int", type(m).__name__, TypeError)
        if m < 0:
            _fail(name, "an int >= 0", m)


def _offsets_tensor(t, arg: str):
    if not isinstance(t, torch.Tensor):
        _fail(arg, "a torch.Tensor", type(t).__name__, TypeError)
    if t.dtype != torch.int32:
        _fail(arg, "dtype int32 (flash-attention's cu_seqlens)", t.dtype, TypeError)
    if t.dim() != 1 or t.shape[0] < 1:
        _fail(arg, "a 1-D tensor of B + 1 offsets", f"shape {tuple(t.shape)}")


def _validate_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, rope=None,
                               rope_half=False):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(t, name, ndim=3)
        _last_dim_contiguous(t, name)
    total_q, H, d = q.shape
    if k.shape[1:] != q.shape[1:]:
        _fail("k", f"shape (total_k, {H}, {d}) matching q (total_q, H, d)", f"shape {tuple(k.shape)}")
    _shape(v, "v", k.shape)
    _same(q, "q", k=k, v=v)
    if d > MAX_HEAD_DIM:
        _fail("q", f"head dim <= {MAX_HEAD_DIM}", f"head dim {d}")
    _offsets_tensor(cu_seqlens_q, "cu_seqlens_q")
    _offsets_tensor(cu_seqlens_k, "cu_seqlens_k")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        _fail("cu_seqlens_k", f"shape {tuple(cu_seqlens_q.shape)} (B + 1 as cu_seqlens_q)",
              f"shape {tuple(cu_seqlens_k.shape)}")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.device != q.device:
            _fail(name, f"device {q.device} (as q)", f"device {t.device}")
    _check_seqlen_args(max_seqlen_q, max_seqlen_k)
    _scale(scale, d)
    if not isinstance(rope_half, bool):
        _fail("rope_half", "a bool", type(rope_half).__name__, TypeError)
    features = []
    if rope is not None:
        _tensor(rope, "rope")
        if d % 2:
            _fail("q", "an even head dim with rope", f"head dim {d}")
        if rope.dim() not in (2, 3) or rope.shape[-1] != 2 * d or rope.shape[-2] != total_q \
                or (rope.dim() == 3 and rope.shape[0] != H):
            _fail("rope", f"shape ({total_q}, {2 * d}) or ({H}, {total_q}, {2 * d}) (cat([sin, cos], -1) per packed "
                          "token)", f"shape {tuple(rope.shape)}")
        _last_dim_contiguous(rope, "rope")
        if rope.device != q.device:
            _fail("rope", f"device {q.device} (as q)", f"device {rope.device}")
        if k.shape[0] != total_q:
            _fail("k", f"total_k == total_q = {total_q} with rope (self attention: k's tokens are q's)",
                  f"shape {tuple(k.shape)}")
        features.append("attention_varlen.rope")
        if rope.dim() == 3:
            features.append("attention_varlen.rope_per_head")
    if not torch.compiler.is_compiling():  # traced offsets have no values
        _check_offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rope is not None)
    return q.device, dict(dtype=q.dtype, head_dim=d, features=tuple(features))


class _OffsetFacts:
    """What the values of one offsets tensor say: the total and each sequence's length."""

    __slots__ = ("total", "lengths", "longest", "argmax", "empty")

    def __init__(self, total: int, lengths: Tuple[int, ...]):
        self.total, self.lengths = total, lengths
        self.longest = max(lengths, default=0)
        self.argmax = lengths.index(self.longest) if lengths else -1
        self.empty = tuple(i for i, n in enumerate(lengths) if n == 0)


# id(tensor) -> (weakref to it, its _version when read, facts): an entry leaves with its tensor
_OFFSETS: Dict[int, tuple] = {}
_MAX_OFFSETS = 4096


def _version(t: Tensor) -> int:
    """The tensor's in-place version counter; -1 for an inference tensor, which has none (offsets
    made under torch.inference_mode are then checked once per tensor, not per in-place change)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _remember_offsets(t: Tensor, facts: _OffsetFacts) -> None:
    if len(_OFFSETS) >= _MAX_OFFSETS:
        _OFFSETS.clear()
    i = id(t)
    _OFFSETS[i] = (weakref.ref(t, lambda _, i=i: _OFFSETS.pop(i, None)), _version(t), facts)


def _offset_facts(t: Tensor, arg: str) -> Optional[_OffsetFacts]:
    """The checked facts of offsets tensor ``t`` (cached per tensor and version), or None where
    its values cannot be read (a tensor subclass, CUDA-graph capture)."""
    entry = _OFFSETS.get(id(t))
    if entry is not None and entry[0]() is t and entry[1] == _version(t):
        return entry[2]
    if t.__class__ is not torch.Tensor:
        return None
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    vals: List[int] = t.tolist()  # on CUDA one small device-to-host copy, once per tensor
    if vals[0] != 0:
        _fail(arg, f"{arg}[0] == 0", f"{arg}[0] = {vals[0]}")
    lengths = tuple(b - a for a, b in zip(vals, vals[1:]))
    for i, n in enumerate(lengths):
        if n < 0:
            _fail(arg, f"non-decreasing offsets ({arg}[i + 1] >= {arg}[i])",
                  f"{arg}[{i + 1}] = {vals[i + 1]} < {arg}[{i}] = {vals[i]}")
    facts = _OffsetFacts(vals[-1], lengths)
    _remember_offsets(t, facts)
    return facts


def _check_offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, self_attention=False) -> None:
    """The value checks of attention_varlen's offsets (cached facts: a few int compares a call);
    ``self_attention`` (RoPE): both offsets must be equal."""
    fq = _offset_facts(cu_seqlens_q, "cu_seqlens_q")
    fk = _offset_facts(cu_seqlens_k, "cu_seqlens_k")
    for f, name, t, tname, m, mname in ((fq, "cu_seqlens_q", q, "q", max_seqlen_q, "max_seqlen_q"),
                                        (fk, "cu_seqlens_k", k, "k", max_seqlen_k, "max_seqlen_k")):
        if f is None:
            continue
        if f.total != t.shape[0]:
            _fail(name, f"{name}[-1] == {tname}.shape[0] = {t.shape[0]} (the packed total)",
                  f"{name}[-1] = {f.total}")
        if f.longest > m:
            _fail(mname, f"an int >= the longest sequence ({f.longest}, sequence {f.argmax})", m)
    if fq is not None and fk is not None:
        for i in fk.empty:
            if fq.lengths[i]:
                _fail("cu_seqlens_k", "at least one key for every sequence with queries",
                      f"sequence {i} with 0 keys and {fq.lengths[i]} queries")
        if self_attention and cu_seqlens_k is not cu_seqlens_q and fk.lengths != fq.lengths:
            i = next(j for j, (a, b) in enumerate(zip(fq.lengths, fk.lengths)) if a != b)
            _fail("cu_seqlens_k", "the offsets of cu_seqlens_q with rope (self attention)",
                  f"sequence {i} with {fk.lengths[i]} keys and {fq.lengths[i]} queries")


def layer_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6, *, backend: Optional[str] = None,
) -> Tensor:
    """LayerNorm over the last dim. x: (..., D); weight, bias: (D,) or None. Returns (..., D)."""
    sig = None if _is_compiling() else _signature(x, weight, bias)
    key = plan = None
    if sig is not None:
        key = ("layer_norm", backend, sig)
        try:
            plan = _PLANS.get(key)
        except TypeError:
            key = None
    if plan is None:
        plan = _build("layer_norm", key, backend, (x, weight, bias, float(eps)), _validate_layer_norm, x, weight, bias)
    return plan(x, weight, bias, float(eps))


def _validate_layer_norm(x, weight, bias):
    _tensor(x, "x", min_ndim=1)
    _last_dim_contiguous(x, "x")
    for name, t in (("weight", weight), ("bias", bias)):
        _tensor(t, name, optional=True)
        _shape(t, name, x.shape[-1:])
    _same(x, "x", weight=weight, bias=bias)
    return x.device, dict(dtype=x.dtype)


def linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act: Optional[str] = None,
    gamma: Optional[Tensor] = None, residual: Optional[Tensor] = None, ln_weight: Optional[Tensor] = None,
    ln_bias: Optional[Tensor] = None, ln_eps: float = 1e-6, *, backend: Optional[str] = None,
) -> Tensor:
    """``y = act(LN?(x) @ weight.T + bias) * gamma + residual`` in one GEMM on the fast paths.

    Args:
        x: (..., K), unit-stride last dim.
        weight: (N, K); bias: (N,) or None.
        act: None or an activation of :data:`fastvit.facts.ACTIVATIONS` ('gelu' = exact erf,
            'gelu_tanh', ...).
        gamma: (N,) LayerScale or None. residual: (..., N) or None (added last).
        ln_weight, ln_bias: (K,) LayerNorm of x fused as prologue when ``ln_weight`` is given.
        ln_eps: the LayerNorm epsilon.
        backend: see :func:`patch_embed`.

    Returns:
        (..., N) in x's dtype.
    """
    sig = None if _is_compiling() else _signature(x, weight, bias, gamma, residual, ln_weight, ln_bias)
    key = plan = None
    if sig is not None:
        key = ("linear", backend, act, sig)
        try:
            plan = _PLANS.get(key)
        except TypeError:
            key = None
    if plan is None:
        plan = _build("linear", key, backend, (x, weight, bias, act, gamma, residual, ln_weight, ln_bias, float(ln_eps)),
                      _validate_linear, x, weight, bias, act, gamma, residual, ln_weight, ln_bias)
    return plan(x, weight, bias, act, gamma, residual, ln_weight, ln_bias, float(ln_eps))


def _validate_linear(x, weight, bias, act, gamma, residual, ln_weight, ln_bias):
    _tensor(x, "x", min_ndim=1)
    _last_dim_contiguous(x, "x")
    _act(act)
    Nout, _ = _check_linear_args(x, weight, bias, ln_weight, ln_bias, act=act)
    _check_epilogue(x, Nout, gamma, residual)
    return x.device, dict(dtype=x.dtype, act=act)


def mlp(
    x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
    act: Optional[str] = "gelu", gamma: Optional[Tensor] = None, residual: Optional[Tensor] = None,
    ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None, ln_eps: float = 1e-6,
    hidden_ln_weight: Optional[Tensor] = None, hidden_ln_bias: Optional[Tensor] = None, hidden_ln_eps: float = 1e-6,
    *, backend: Optional[str] = None,
) -> Tensor:
    """Transformer MLP ``residual + gamma * fc2(LN_h?(act(fc1(LN?(x)))))``.

    Args:
        x: (..., D). fc1_weight: (Hd, D) ((2 Hd, D) for 'swiglu': gate rows, then value rows);
            fc1_bias: (Hd,) / (2 Hd,) or None.
        fc2_weight: (D_out, Hd); fc2_bias: (D_out,) or None.
        act, gamma (D_out,), residual (..., D_out), ln_weight / ln_bias (D,), ln_eps: as
            :func:`linear`.
        hidden_ln_weight, hidden_ln_bias (Hd,), hidden_ln_eps: LayerNorm of the hidden activation
            before fc2 (EVA-02's sub-LN), fused as fc2's prologue; None for none.
        backend: see :func:`patch_embed`.

    Returns:
        (..., D_out) in x's dtype; the hidden activation is rounded to x's dtype between the
        two products, as the unfused composition rounds it.
    """
    sig = None if _is_compiling() else _signature(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual,
                                                  ln_weight, ln_bias, hidden_ln_weight, hidden_ln_bias)
    key = plan = None
    if sig is not None:
        key = ("mlp", backend, act, sig)
        try:
            plan = _PLANS.get(key)
        except TypeError:
            key = None
    if plan is None:
        plan = _build("mlp", key, backend, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual, ln_weight,
                                            ln_bias, float(ln_eps), hidden_ln_weight, hidden_ln_bias,
                                            float(hidden_ln_eps)),
                      _validate_mlp, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual, ln_weight,
                      ln_bias, hidden_ln_weight, hidden_ln_bias)
    return plan(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual, ln_weight, ln_bias,
                float(ln_eps), hidden_ln_weight, hidden_ln_bias, float(hidden_ln_eps))


def _validate_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual, ln_weight, ln_bias,
                  hidden_ln_weight=None, hidden_ln_bias=None):
    _tensor(x, "x", min_ndim=1)
    _last_dim_contiguous(x, "x")
    _act(act)
    hid, _ = _check_linear_args(x, fc1_weight, fc1_bias, ln_weight, ln_bias, "fc1_weight", "fc1_bias", act)
    _tensor(fc2_weight, "fc2_weight", ndim=2)
    if fc2_weight.shape[1] != hid:
        _fail("fc2_weight", f"shape (D_out, {hid})", f"shape {tuple(fc2_weight.shape)}")
    for name, t in (("hidden_ln_weight", hidden_ln_weight), ("hidden_ln_bias", hidden_ln_bias)):
        _tensor(t, name, optional=True)
        _shape(t, name, (hid,))
    if hidden_ln_bias is not None and hidden_ln_weight is None:
        _fail("hidden_ln_weight", "a tensor when hidden_ln_bias is given", "None")
    _same(x, "x", hidden_ln_weight=hidden_ln_weight, hidden_ln_bias=hidden_ln_bias)
    Nout = fc2_weight.shape[0]
    _tensor(fc2_bias, "fc2_bias", optional=True)
    _shape(fc2_bias, "fc2_bias", (Nout,))
    _same(x, "x", fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    _check_epilogue(x, Nout, gamma, residual)
    return x.device, dict(dtype=x.dtype, act=act)


def _out_features(weight: Tensor, act) -> int:
    """Output width of a linear with ``weight`` (N, K): N, or N / 2 for a gated activation."""
    return weight.shape[0] // 2 if act in GATED_ACTS else weight.shape[0]


def _check_linear_args(x, weight, bias, ln_weight, ln_bias, w_name="weight", b_name="bias", act=None):
    _tensor(weight, w_name, ndim=2)
    rows, K = weight.shape
    if act in GATED_ACTS and rows % 2:
        _fail(w_name, f"an even number of rows with act={act!r} (gate rows, then value rows)",
              f"shape {tuple(weight.shape)}")
    Nout = _out_features(weight, act)
    if x.shape[-1] != K:
        _fail("x", f"last dim {K} (= {w_name}.shape[1])", f"shape {tuple(x.shape)}")
    _tensor(bias, b_name, optional=True)
    _shape(bias, b_name, (rows,))
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _tensor(t, name, optional=True)
        _shape(t, name, (K,))
    if ln_bias is not None and ln_weight is None:
        _fail("ln_weight", "a tensor when ln_bias is given", "None")
    _same(x, "x", **{w_name: weight, b_name: bias, "ln_weight": ln_weight, "ln_bias": ln_bias})
    return Nout, K


def _check_epilogue(x, Nout, gamma, residual):
    _tensor(gamma, "gamma", optional=True)
    _shape(gamma, "gamma", (Nout,))
    _tensor(residual, "residual", optional=True)
    _shape(residual, "residual", tuple(x.shape[:-1]) + (Nout,))
    _last_dim_contiguous(residual, "residual")
    _same(x, "x", gamma=gamma, residual=residual)
