"""The ``torch`` backend: pure PyTorch, and the oracle of every test.

This module is two things at once:

* the ``torch`` backend, i.e. the production CPU path (it uses the fused ATen entry points
  ``F.scaled_dot_product_attention``, ``F.linear``, ``F.layer_norm``), and
* the oracle of every test: call an op with ``upcast=True`` and it runs in float32 with the
  explicit (math) formulation, whatever the input dtype, and casts the result back.

Its face is every backend's (:mod:`fastvit.backends`): ``LIMITS``, ``available()`` and one
function per op with the op's signature; inputs arrive validated by :mod:`fastvit.ops`. The
semantics defined here are the ones every other backend must reproduce.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .facts import ACTIVATIONS, ATTENTION_FEATURES, OPS, BackendLimits

__all__ = [
    "LIMITS",
    "available",
    "patch_embed",
    "attention",
    "attention_probs",
    "attention_for",
    "attention_varlen",
    "apply_rope_tokens",
    "layer_norm_for",
    "linear",
    "mlp",
    "layer_norm",
    "gelu",
    "swiglu",
    "apply_rope",
    "rotate_pairs",
    "resample_pos_embed",
]

LIMITS = BackendLimits(
    name="torch",
    ops=frozenset(OPS),
    devices=("cpu", "cuda"),
    features=frozenset(f"{op}.{f}" for op in ("attention", "attention_probs") for f in ATTENTION_FEATURES)
    | {"attention_varlen.rope", "attention_varlen.rope_per_head"},
    note="fastvit/reference.py: ATen calls (SDPA, F.linear, F.layer_norm); the CPU path and the test oracle",
)


def available() -> Optional[str]:
    """The torch backend always runs."""
    return None


_ACT_FNS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    # OpenAI CLIP's QuickGELU: the formula of timm QuickGELU and HF ACT2FN["quick_gelu"] (bit-for-bit)
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    # SwiGLU: the product's first half is the gate, the second the value (timm GluMlp
    # gate_last=False / SwiGLU's fc1_g, fc1_x stacked): silu(gate) * value, half the width
    "swiglu": lambda x: swiglu(x),
}


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :n]) * x[..., n:]`` with n = x.shape[-1] // 2 (gate first)."""
    gate, value = x.chunk(2, dim=-1)
    if x.dtype == torch.float32:
        return F.silu(gate) * value
    # 16-bit: one rounding at the end, as the fused epilogues (not one after silu and one after the product)
    return (F.silu(gate.float()) * value.float()).to(x.dtype)


def gelu(x: torch.Tensor, act: Optional[str]) -> torch.Tensor:
    """Apply the activation named ``act`` (None, 'gelu' = exact erf form, 'gelu_tanh', 'quick_gelu',
    'swiglu' = gated, halves the last dim)."""
    if act is None:
        return x
    fn = _ACT_FNS.get(act)
    if fn is None:
        raise ValueError(f"act: expected one of {ACTIVATIONS}, got {act!r}")
    return fn(x)


def _up(t: Optional[torch.Tensor], upcast: bool) -> Optional[torch.Tensor]:
    if t is None or not upcast:
        return t
    return t.float()


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    prefix: Optional[torch.Tensor] = None,
    pad: bool = False,
    upcast: bool = False,
) -> torch.Tensor:
    """Image -> token sequence: conv-as-GEMM + bias + position embedding + prefix rows.

    Args:
        x: image, (B, C, H, W), any float dtype or uint8 (cast to ``weight.dtype``: exact for uint8).
        weight: patch projection, (D, C, Ph, Pw) (the conv weight).
        bias: (D,) or None.
        pos_embed: position embedding of the patch tokens for *this* grid, (gh * gw, D), or None.
        prefix: rows written before the patch tokens of every image (class / distillation /
            register tokens, their position embedding already added), (T, D), or None.
        pad: pad H and W at the bottom / right with zeros up to a multiple of the patch size
            (timm's ``dynamic_img_pad``); otherwise they must already be multiples.
        upcast: compute in float32 (oracle mode).

    Returns:
        (B, T + gh * gw, D), contiguous, dtype of ``weight`` (float32 when ``upcast``).
    """
    out_dtype = torch.float32 if upcast else weight.dtype
    ph, pw = weight.shape[-2:]
    x = x.to(out_dtype)
    if pad:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
    y = F.conv2d(x, weight.to(out_dtype), None if bias is None else bias.to(out_dtype), stride=(ph, pw))
    y = y.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
    if pos_embed is not None:
        y = y + pos_embed.to(out_dtype)
    if prefix is not None and prefix.shape[0] > 0:
        y = torch.cat([prefix.to(out_dtype).unsqueeze(0).expand(y.shape[0], -1, -1), y], dim=1)
    return y.contiguous()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    rope: Optional[torch.Tensor] = None,
    rope_half: bool = False,
    upcast: bool = False,
) -> torch.Tensor:
    """Softmax attention, no dropout: ``softmax(rope(q) rope(k)^T * scale + bias) v``.

    Args:
        q, k, v: (B, H, N, d) / (B, H, N_kv, d), any strides (e.g. views of a packed qkv buffer).
        scale: softmax scale, default ``d ** -0.5``.
        bias: additive logit bias (BEiT's relative position bias), (H, N, N_kv) broadcast over
            the batch or (B, H, N, N_kv); added after the scale. Any float dtype (the fast path
            adds it in q's dtype, as ``F.scaled_dot_product_attention(attn_mask=...)`` does).
        rope: rotary embedding table, ``cat([sin, cos], -1)`` as timm builds it: (N_r, 2 d)
            shared by the heads or (H, N_r, 2 d) per head. The *last* N_r tokens of q and of k
            are rotated (the prefix tokens before them are not), in float32, then rounded to
            q's dtype, as timm's ``apply_rot_embed_cat(...).type_as(v)``.
        rope_half: pair dim i with i + d / 2 (timm ``rotate_half``) instead of 2 i with 2 i + 1.
        upcast: explicit float32 math formulation (oracle mode).

    Returns:
        (B, H, N, d). On the fast path this is a transposed view of a (B, N, H, d) buffer so
        ``out.transpose(1, 2).reshape(B, N, H * d)`` is free.
    """
    if bias is None and rope is None and not upcast:  # the hot path: one ATen call, no keyword it does not need
        out = F.scaled_dot_product_attention(q, k, v) if scale is None else \
            F.scaled_dot_product_attention(q, k, v, scale=scale)
        return _contract_layout(out)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if rope is not None:
        q, k = apply_rope(q, rope, rope_half), apply_rope(k, rope, rope_half)
    if upcast:
        out, _ = _attention_math(q, k, v, scale, bias)
        return _contract_layout(out.to(q.dtype))
    if bias is not None:
        bias = bias.to(q.dtype)
    return _contract_layout(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale))


def apply_rope_tokens(x: torch.Tensor, rope: torch.Tensor, half: bool = False) -> torch.Tensor:
    """Rotate packed tokens x (total, H, d) by a per-token table ``rope`` ((total, 2 d), or (H,
    total, 2 d) per head, ``cat([sin, cos], -1)``): the rotation of :func:`apply_rope` in float32
    (float64 for float64 x), returned in x's dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)
    sin, cos = rope.to(ct).tensor_split(2, dim=-1)
    if rope.dim() == 3:
        sin, cos = sin.transpose(0, 1), cos.transpose(0, 1)  # (total, H, d)
    else:
        sin, cos = sin[:, None], cos[:, None]
    xf = x.to(ct)
    return (xf * cos + rotate_pairs(xf, half) * sin).to(x.dtype)


def rotate_pairs(x: torch.Tensor, half: bool) -> torch.Tensor:
    """The RoPE partner of every element with its sign: interleaved pairs (2 i, 2 i + 1) ->
    (-x[2 i + 1], x[2 i]) (timm ``rot``), or halves (i, i + d / 2) -> (-x[i + d / 2], x[i])
    (timm ``rope_rotate_half``)."""
    if half:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, half: bool = False) -> torch.Tensor:
    """Rotate the last ``rope.shape[-2]`` tokens of x (B, H, N, d) by ``rope`` ((N_r, 2 d) or
    (H, N_r, 2 d), ``cat([sin, cos], -1)``); computed in float32, returned in x's dtype."""
    n_rot = rope.shape[-2]
    npt = x.shape[2] - n_rot
    sin, cos = rope.float().tensor_split(2, dim=-1)
    xr = x[:, :, npt:].float()
    xr = (xr * cos + rotate_pairs(xr, half) * sin).to(x.dtype)
    return xr if npt == 0 else torch.cat([x[:, :, :npt], xr], dim=2)


def attention_for(q, k=None, v=None, scale=None, bias=None, rope=None, rope_half=False) -> Callable:
    """:func:`attention` bound to the call signature of these arguments (q's shape: (B, H, N, d)):
    the op layer's cached plan. Same arguments and result; the hot path (no bias, no RoPE)
    compares the output's strides with the contract layout's, computed here once, instead of
    reading its shape per call."""
    B, H, N, d = q.shape
    want = (N * H * d, d, H * d, 1)  # (B, H, N, d) view of (B, N, H, d) memory
    empty = B * H * N * d == 0

    def run(q, k, v, scale=None, bias=None, rope=None, rope_half=False):
        if bias is not None or rope is not None:
            return attention(q, k, v, scale, bias, rope, rope_half)
        out = F.scaled_dot_product_attention(q, k, v) if scale is None else \
            F.scaled_dot_product_attention(q, k, v, scale=scale)
        if empty or out.stride() == want:
            return out
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    return run


def _contract_layout(out: torch.Tensor) -> torch.Tensor:
    """``out`` (B, H, N, d) as a view of (B, N, H, d) memory: the attention output layout of every
    backend. SDPA's flash paths already return it (no copy); other paths are copied once."""
    B, H, N, d = out.shape
    s0, s1, s2, s3 = out.stride()
    if (s1 == d and s2 == H * d and s3 == 1 and s0 == N * H * d) or out.numel() == 0:
        return out
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _attention_math(q, k, v, scale, bias=None) -> Tuple[torch.Tensor, torch.Tensor]:
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, N, N_kv)
    if bias is not None:
        s = s + bias.float()
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.float()), p


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
    bias: Optional[torch.Tensor] = None, rope: Optional[torch.Tensor] = None, rope_half: bool = False,
    upcast: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns its softmax probabilities (for pictures, not the fast path).

    Args: as :func:`attention` (the probabilities include the RoPE rotation and the bias).

    Returns:
        out (B, H, N, d) in the input dtype, probs (B, H, N, N_kv) in float32 (rows sum to 1).
    """
    del upcast  # always computed in float32
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if rope is not None:
        q, k = apply_rope(q, rope, rope_half), apply_rope(k, rope, rope_half)
    out, p = _attention_math(q, k, v, scale, bias)
    return _contract_layout(out.to(q.dtype)), p


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: Optional[float] = None,
    rope: Optional[torch.Tensor] = None,
    rope_half: bool = False,
    upcast: bool = False,
) -> torch.Tensor:
    """Softmax attention over packed sequences (flash-attention's varlen layout), no dropout:
    sequence i's queries ``q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]`` attend to its keys / values
    ``k, v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]]`` and to nothing else.

    Args:
        q: (total_q, H, d); k, v: (total_k, H, d); any strides (views of a packed qkv buffer).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) integer cumulative offsets, 0 first, the totals
            last, non-decreasing (a sequence may be empty; one with queries has keys).
        max_seqlen_q, max_seqlen_k: at least the longest query / key sequence (the padded
            length this formulation works at).
        scale: softmax scale, default ``d ** -0.5``.
        rope: rotary table per packed token, ``cat([sin, cos], -1)``: (total_q, 2 d) for every
            head or (H, total_q, 2 d) per head; rotates q and k (self attention: k's tokens are
            q's), see :func:`apply_rope_tokens`. Tokens that are not rotated (class / register
            tokens) carry sin 0, cos 1.
        rope_half: pair dim i with i + d / 2 (timm ``rotate_half``) instead of 2 i with 2 i + 1.
        upcast: explicit float32 math formulation (oracle mode).

    Returns:
        (total_q, H, d) contiguous, in q's dtype.

    The sequences are gathered into a padded (B, H, max_seqlen, d) batch by index (no host read
    of the offsets: no GPU sync, traceable by torch.compile), attended with the padding keys
    masked out, and the valid rows gathered back. Padding query rows attend to their sequence's
    keys (any valid row would do) and are dropped, so no row is all-masked and the backward
    sees no NaN.
    """
    total_q, H, d = q.shape
    if scale is None:
        scale = d ** -0.5
    if total_q == 0:
        return q.new_empty(0, H, d)
    if rope is not None:
        q, k = apply_rope_tokens(q, rope, rope_half), apply_rope_tokens(k, rope, rope_half)
    dev = q.device
    cq, ck = cu_seqlens_q.long().contiguous(), cu_seqlens_k.long().contiguous()
    len_k = ck[1:] - ck[:-1]  # (B,)
    pos_q = torch.arange(max_seqlen_q, device=dev)
    pos_k = torch.arange(max_seqlen_k, device=dev)
    idx_q = (cq[:-1, None] + pos_q).clamp(max=total_q - 1)  # (B, Mq): padding rows read a valid token
    idx_k = (ck[:-1, None] + pos_k).clamp(max=max(k.shape[0] - 1, 0))
    qp, kp, vp = q[idx_q].transpose(1, 2), k[idx_k].transpose(1, 2), v[idx_k].transpose(1, 2)  # (B, H, M, d)
    # (B, 1, 1, Mk): keys of the sequence; an empty sequence (no queries either) attends to its
    # padding rather than to nothing, so its dropped rows are finite
    keep = (pos_k < len_k[:, None]) | (len_k == 0)[:, None]
    keep = keep[:, None, None, :]
    if upcast:
        s = torch.matmul(qp.float(), kp.float().transpose(-2, -1)) * scale  # (B, H, Mq, Mk)
        s = s.masked_fill(~keep, float("-inf"))
        out = torch.matmul(torch.softmax(s, dim=-1), vp.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep, scale=scale)
    # each packed token's (sequence, position): the rows to keep, in packed order
    tok = torch.arange(total_q, device=dev)
    seq = torch.searchsorted(cq[1:], tok, right=True)
    return out.transpose(1, 2)[seq, tok - cq[seq]]


def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    upcast: bool = False,
) -> torch.Tensor:
    """LayerNorm over the last dim. x: (..., D); weight, bias: (D,) or None. Returns x's shape."""
    if upcast:
        return F.layer_norm(x.float(), x.shape[-1:], _up(weight, True), _up(bias, True), eps).to(x.dtype)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def layer_norm_for(x, weight=None, bias=None, eps=1e-6) -> Callable:
    """:func:`layer_norm` bound to the call signature of these arguments (x: (..., D)): the op
    layer's cached plan (the normalised shape built once, not sliced from x per call)."""
    normalized = tuple(x.shape[-1:])

    def run(x, weight, bias, eps=1e-6):
        return F.layer_norm(x, normalized, weight, bias, eps)

    return run


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
    upcast: bool = False,
) -> torch.Tensor:
    """``y = act(LN?(x) @ weight.T + bias) * gamma + residual``.

    Args:
        x: (..., K).
        weight: (N, K), or (2 N, K) for 'swiglu' (gate rows, then value rows). bias: (N,) / (2 N,) or None.
        act: None, 'gelu' (erf), 'gelu_tanh', 'quick_gelu' (x * sigmoid(1.702 x)) or 'swiglu'
            (``silu(gate) * value`` of the two halves of the product: the output has N columns).
        gamma: LayerScale, (N,) or None.
        residual: (..., N) or None, added last.
        ln_weight, ln_bias: (K,); when ``ln_weight`` is given, x is layer-normalised (eps
            ``ln_eps``) before the product (the prologue the Triton kernel fuses).
        upcast: float32 oracle mode.

    Returns:
        (..., N) in x's dtype (N = weight.shape[0], or half of it for 'swiglu').
    """
    if upcast:
        dt = x.dtype
        x, weight, bias, gamma, residual, ln_weight, ln_bias = (
            _up(t, True) for t in (x, weight, bias, gamma, residual, ln_weight, ln_bias))
        return linear(x, weight, bias, act, gamma, residual, ln_weight, ln_bias, ln_eps).to(dt)
    if ln_weight is not None:
        x = F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, ln_eps)
    y = F.linear(x, weight, bias)
    if act is not None:
        y = gelu(y, act)
    if gamma is not None:
        y = y * gamma
    return y if residual is None else y + residual


def mlp(
    x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor], act: Optional[str] = "gelu", gamma: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None, ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None, ln_eps: float = 1e-6, hidden_ln_weight: Optional[torch.Tensor] = None,
    hidden_ln_bias: Optional[torch.Tensor] = None, hidden_ln_eps: float = 1e-6, upcast: bool = False,
) -> torch.Tensor:
    """Transformer MLP: ``residual + gamma * fc2(LN_h?(act(fc1(LN?(x)))))``.

    Args:
        x: (..., D). fc1_weight: (Hd, D) ((2 Hd, D) for 'swiglu'), fc1_bias: (Hd,) / (2 Hd,).
            fc2_weight: (D_out, Hd), fc2_bias: (D_out,).
        act, gamma, residual, ln_*: as :func:`linear` (the LN applies to x, gamma/residual to
            the fc2 output).
        hidden_ln_weight, hidden_ln_bias, hidden_ln_eps: a LayerNorm of the hidden activation
            (Hd,) before fc2 (EVA-02's sub-LN, timm ``scale_mlp``), or None.

    Returns:
        (..., D_out) in x's dtype. The hidden activation is rounded to x's dtype between the
        two products, as an unfused composition would (unless ``upcast``).
    """
    h = linear(x, fc1_weight, fc1_bias, act=act, ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps, upcast=upcast)
    return linear(h, fc2_weight, fc2_bias, gamma=gamma, residual=residual, ln_weight=hidden_ln_weight,
                  ln_bias=hidden_ln_bias, ln_eps=hidden_ln_eps, upcast=upcast)


def resample_pos_embed(
    pos: torch.Tensor,
    new_size: Tuple[int, int],
    old_size: Tuple[int, int],
    antialias: bool = True,
) -> torch.Tensor:
    """Bicubic resample of a patch position embedding grid, computed in float32.

    Args:
        pos: (old_h * old_w, D).
        new_size, old_size: (rows, cols) of the grids.
        antialias: timm resamples with antialias=True; Hugging Face models without.

    Returns:
        (new_h * new_w, D) in pos's dtype.
    """
    if tuple(new_size) == tuple(old_size):
        return pos
    D = pos.shape[-1]
    grid = pos.float().reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_size), mode="bicubic", antialias=antialias, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(-1, D).to(pos.dtype)

