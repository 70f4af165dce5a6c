"""Public ops: validate once, then dispatch to a backend.

Every op has the same signature and semantics in every backend; :mod:`fastvit.reference`
defines them. Validation happens here, before dispatch, so a backend receives only inputs it
was promised: errors are ``ValueError`` / ``TypeError`` naming the argument, what was expected
and what was given.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import backends
from .reference import ACTIVATIONS

__all__ = ["patch_embed", "attention", "attention_probs", "linear", "mlp", "layer_norm"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- validation helpers
def _fail(arg: str, expected: str, got, exc=ValueError):
    raise exc(f"{arg}: expected {expected}, got {got}")


def _tensor(t, arg: str, ndim: Optional[int] = None, min_ndim: Optional[int] = None, optional=False):
    if t is None:
        if optional:
            return
        _fail(arg, "a torch.Tensor", "None", TypeError)
    if not isinstance(t, torch.Tensor):
        _fail(arg, "a torch.Tensor", type(t).__name__, TypeError)
    if t.dtype not in _FLOATS:
        _fail(arg, "dtype float32, float16 or bfloat16", t.dtype, TypeError)
    if ndim is not None and t.dim() != ndim:
        _fail(arg, f"a {ndim}-D tensor", f"shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        _fail(arg, f"at least {min_ndim} dims", f"shape {tuple(t.shape)}")


def _shape(t, arg: str, shape: Sequence[int]):
    if t is not None and tuple(t.shape) != tuple(shape):
        _fail(arg, f"shape {tuple(shape)}", f"shape {tuple(t.shape)}")


def _same(ref: torch.Tensor, ref_arg: str, **others):
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
    if act not in ACTIVATIONS:
        _fail("act", f"one of {ACTIVATIONS}", repr(act))


def _device(t: torch.Tensor) -> torch.device:
    return t.device


# --------------------------------------------------------------------------- ops
def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    prefix: Optional[torch.Tensor] = None,
    pad: bool = False,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Image -> tokens: patchify + project + bias + position embedding + prefix token rows.

    Args:
        x: (B, C, H, W) image, float32 / float16 / bfloat16 (cast to ``weight.dtype`` in the load).
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
    _tensor(x, "x", ndim=4)
    _tensor(weight, "weight", ndim=4)
    D, C, ph, pw = weight.shape
    if x.shape[1] != C:
        _fail("x", f"{C} input channels (B, {C}, H, W)", f"shape {tuple(x.shape)}")
    if x.device != weight.device:
        _fail("x", f"device {weight.device} (as weight)", f"device {x.device}")
    B, _, H, W = x.shape
    if pad:
        gh, gw = -(-H // ph), -(-W // pw)
    else:
        if H % ph or W % pw:
            _fail("x", f"height and width multiples of the patch size {(ph, pw)} (or pad=True / "
                  "dynamic_img_pad)", f"image size {(H, W)}")
        gh, gw = H // ph, W // pw
    if gh == 0 or gw == 0:
        _fail("x", f"an image at least one patch {(ph, pw)} large", f"image size {(H, W)}")
    for name, t, shp in (("bias", bias, (D,)), ("pos_embed", pos_embed, (gh * gw, D))):
        _tensor(t, name, optional=True)
        _shape(t, name, shp)
    _tensor(prefix, "prefix", ndim=2, optional=True)
    if prefix is not None and prefix.shape[1] != D:
        _fail("prefix", f"shape (T, {D})", f"shape {tuple(prefix.shape)}")
    _same(weight, "weight", bias=bias, pos_embed=pos_embed, prefix=prefix)
    impl = backends.resolve("patch_embed", _device(x), backend, patch=(ph, pw), dtype=weight.dtype)
    return impl.patch_embed(x, weight, bias, pos_embed, prefix, pad)


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(t, name, ndim=4)
        _last_dim_contiguous(t, name)
    B, H, N, d = q.shape
    if k.shape[:2] != q.shape[:2] or k.shape[3] != d:
        _fail("k", f"shape ({B}, {H}, N_kv, {d}) matching q (B, H, N, d)", f"shape {tuple(k.shape)}")
    _shape(v, "v", k.shape)
    _same(q, "q", k=k, v=v)
    if d > 256:
        _fail("q", "head dim <= 256", f"head dim {d}")
    return d


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Softmax attention like ``F.scaled_dot_product_attention`` (no mask, no dropout).

    Args:
        q: (B, H, N, d); k, v: (B, H, N_kv, d). Any strides with a unit-stride last dim, so
            strided views of a packed (B, N, 3, H, d) qkv buffer need no copy.
        scale: softmax scale, default ``d ** -0.5``.
        backend: see :func:`patch_embed`.

    Returns:
        (B, H, N, d). On the fast paths a transposed view of a (B, N, H, d) buffer, so
        ``out.transpose(1, 2).reshape(B, N, H * d)`` needs no copy.
    """
    d = _check_qkv(q, k, v)
    impl = backends.resolve("attention", _device(q), backend, head_dim=d, dtype=q.dtype)
    return impl.attention(q, k, v, scale)


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the softmax probabilities, for pictures (opt-in, slow path).

    Args: as :func:`attention`.

    Returns:
        out (B, H, N, d) in q's dtype and probs (B, H, N, N_kv) in float32.
    """
    d = _check_qkv(q, k, v)
    impl = backends.resolve("attention_probs", _device(q), backend, head_dim=d, dtype=q.dtype)
    return impl.attention_probs(q, k, v, scale)


def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """LayerNorm over the last dim. x: (..., D); weight, bias: (D,) or None. Returns (..., D)."""
    _tensor(x, "x", min_ndim=1)
    _last_dim_contiguous(x, "x")
    for name, t in (("weight", weight), ("bias", bias)):
        _tensor(t, name, optional=True)
        _shape(t, name, x.shape[-1:])
    _same(x, "x", weight=weight, bias=bias)
    impl = backends.resolve("layer_norm", _device(x), backend, dtype=x.dtype)
    return impl.layer_norm(x, weight, bias, eps)


def _check_linear_args(x, weight, bias, ln_weight, ln_bias, w_name="weight", b_name="bias"):
    _tensor(weight, w_name, ndim=2)
    Nout, K = weight.shape
    if x.shape[-1] != K:
        _fail("x", f"last dim {K} (= {w_name}.shape[1])", f"shape {tuple(x.shape)}")
    _tensor(bias, b_name, optional=True)
    _shape(bias, b_name, (Nout,))
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


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act: Optional[str] = None,
    gamma: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    ln_eps: float = 1e-6,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``y = act(LN?(x) @ weight.T + bias) * gamma + residual`` in one GEMM on the fast paths.

    Args:
        x: (..., K), unit-stride last dim.
        weight: (N, K); bias: (N,) or None.
        act: None, 'gelu' (exact erf) or 'gelu_tanh'.
        gamma: (N,) LayerScale or None. residual: (..., N) or None (added last).
        ln_weight, ln_bias: (K,) LayerNorm of x fused as prologue when ``ln_weight`` is given.
        ln_eps: the LayerNorm epsilon.
        backend: see :func:`patch_embed`.

    Returns:
        (..., N) in x's dtype.
    """
    _tensor(x, "x", min_ndim=1)
    _last_dim_contiguous(x, "x")
    _act(act)
    Nout, K = _check_linear_args(x, weight, bias, ln_weight, ln_bias)
    _check_epilogue(x, Nout, gamma, residual)
    impl = backends.resolve("linear", _device(x), backend, K=K, N=Nout, dtype=x.dtype)
    return impl.linear(x, weight, bias, act, gamma, residual, ln_weight, ln_bias, ln_eps)


def mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    act: Optional[str] = "gelu",
    gamma: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    ln_eps: float = 1e-6,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Transformer MLP ``residual + gamma * fc2(act(fc1(LN?(x))))``.

    Args:
        x: (..., D). fc1_weight: (Hd, D); fc1_bias: (Hd,) or None.
        fc2_weight: (D_out, Hd); fc2_bias: (D_out,) or None.
        act, gamma (D_out,), residual (..., D_out), ln_weight / ln_bias (D,), ln_eps: as
            :func:`linear`.
        backend: see :func:`patch_embed`.

    Returns:
        (..., D_out) in x's dtype.
    """
    _tensor(x, "x", min_ndim=1)
    _last_dim_contiguous(x, "x")
    _act(act)
    hid, D = _check_linear_args(x, fc1_weight, fc1_bias, ln_weight, ln_bias, "fc1_weight", "fc1_bias")
    _tensor(fc2_weight, "fc2_weight", ndim=2)
    if fc2_weight.shape[1] != hid:
        _fail("fc2_weight", f"shape (D_out, {hid})", f"shape {tuple(fc2_weight.shape)}")
    Nout = fc2_weight.shape[0]
    _tensor(fc2_bias, "fc2_bias", optional=True)
    _shape(fc2_bias, "fc2_bias", (Nout,))
    _same(x, "x", fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    _check_epilogue(x, Nout, gamma, residual)
    impl = backends.resolve("mlp", _device(x), backend, K=D, hidden=hid, N=Nout, dtype=x.dtype)
    return impl.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual, ln_weight, ln_bias, ln_eps)
