"""VisionTransformer with timm's constructor arguments, module names and parameter shapes.

Modules hold parameters and call :mod:`fastvit.ops`; they never call torch functional ops on
the hot path themselves, so a backend swap changes every kernel. The per-block data flow:

    qkv = linear(LN1(x), qkv)            # LN fused as prologue
    o   = attention(q, k, v)              # q, k, v strided views of qkv; o in (B, N, H, d) memory
    x   = linear(o, proj, gamma=ls1, residual=x)
    x   = mlp(LN2(x), fc1, GELU, fc2, gamma=ls2, residual=x)

and the MAP head (``global_pool='map'``, SigLIP) on the same ops: a learned latent query of
``latent_len`` rows attends over all tokens (attention with N_q = latent_len != N_kv = N).

Inference only: dropout / drop-path rates other than 0 are refused rather than ignored.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, ops
from .facts import ACTIVATIONS, GATED_ACTS, patch_grid
from .reference import resample_pos_embed
from .relpos import RESIZE_MODES, RelativePositionBias
from .rope import build_rope

__all__ = ["VisionTransformer", "Block", "Attention", "Mlp", "PatchEmbed", "HybridEmbed", "LayerScale", "LayerNorm",
           "AttentionPoolLatent", "PackedOutput"]

_ACTS = tuple(a for a in ACTIVATIONS if a is not None)  # an MLP always has one
_POOLS = ("", "avg", "avgmax", "max", "token", "map")  # timm's, less 'prr'


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _cached(cache: Dict[Any, Tuple[Any, Any]], grid: Tuple[int, int], params: List[torch.Tensor], compute):
    """``compute(grid)``, kept in ``cache`` per (grid, dtype, device) for inference.

    The cache is bypassed when autograd records through ``params`` or torch.compile traces, and
    refreshed when one of ``params`` changes (its storage or version); it holds one grid at a time,
    which keeps memory bounded at high resolution.
    """
    use_cache = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(p.requires_grad for p in params))
    if use_cache:
        ref = params[0] if params else None
        key = (tuple(grid), None if ref is None else (ref.dtype, ref.device))
        stamp = tuple((p.data_ptr(), p._version) for p in params)
        hit = cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    res = compute(grid)
    if use_cache:
        cache.clear()
        cache[key] = (stamp, res)
    return res


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) whose forward goes through :func:`fastvit.ops.layer_norm`."""

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=backend)


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (timm's LayerScale; applied inside the fused epilogues)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PatchEmbed(nn.Module):
    """Image -> patch tokens (conv weight held as timm's ``patch_embed.proj``).

    Args:
        img_size: the training image size (int or (H, W)); sets the stored position grid.
        patch_size: int or (Ph, Pw).
        in_chans: image channels. embed_dim: token width D.
        bias: projection bias (timm drops it with ``pre_norm``).
        dynamic_img_pad: zero-pad images whose size is not a multiple of the patch.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, dynamic_img_pad=False):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size, bias=bias)

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Token grid (rows, cols) for an image of ``img_size`` (H, W)."""
        return patch_grid(img_size[0], img_size[1], self.patch_size, self.dynamic_img_pad)

    def forward(self, x, pos_embed=None, prefix=None, backend=None) -> torch.Tensor:
        """x (B, C, H, W) -> (B, T + gh * gw, D); see :func:`fastvit.ops.patch_embed`."""
        return ops.patch_embed(x, self.proj.weight, self.proj.bias, pos_embed, prefix, self.dynamic_img_pad,
                               backend=backend)


class HybridEmbed(nn.Module):
    """CNN feature map as the patch source (timm's ``HybridEmbed``): backbone -> proj.

    Args:
        backbone: a module mapping (B, in_chans, H, W) to a feature map (B, C', h, w), or a
            list / tuple of them (the last is used).
        img_size: training image size. patch_size: patch size on the feature map (1 usually).
        feature_size: (h, w) of the feature map at ``img_size``; measured with a dummy forward
            when None. feature_dim: C', measured likewise when None.
    """

    def __init__(self, backbone: nn.Module, img_size=224, patch_size=1, feature_size=None, feature_dim=None,
                 in_chans=3, embed_dim=768, bias=True):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.backbone = backbone
        if feature_size is None or feature_dim is None:
            with torch.no_grad():
                was_training = backbone.training
                backbone.eval()
                o = self._features(torch.zeros(1, in_chans, *self.img_size))
                backbone.train(was_training)
            feature_size, feature_dim = o.shape[-2:], o.shape[1]
        self.feature_size = _pair(feature_size)
        self.feature_ratio = (self.img_size[0] // self.feature_size[0], self.img_size[1] // self.feature_size[1])
        self.grid_size = (self.feature_size[0] // self.patch_size[0], self.feature_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.dynamic_img_pad = False
        self.proj = nn.Conv2d(feature_dim, embed_dim, self.patch_size, stride=self.patch_size, bias=bias)

    def _features(self, x):
        f = self.backbone(x)
        return f[-1] if isinstance(f, (list, tuple)) else f

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        H, W = img_size
        return (H // self.feature_ratio[0] // self.patch_size[0], W // self.feature_ratio[1] // self.patch_size[1])

    def forward(self, x, pos_embed=None, prefix=None, backend=None) -> torch.Tensor:
        """x (B, C, H, W) -> (B, T + gh * gw, D) through the backbone and the projection."""
        f = self._features(x)
        return ops.patch_embed(f, self.proj.weight, self.proj.bias, pos_embed, prefix, False, backend=backend)


class Attention(nn.Module):
    """Multi-head self-attention parameters: ``qkv`` (dim -> 3 dim), optional ``norm`` and ``proj``.

    The block runs it through the fused ops; calling this module alone computes
    ``proj(norm(attention(qkv(x))))`` without the block's norm or residual.

    Args:
        rope_half: RoPE pairs dims (i, i + d / 2) (DINOv3) instead of (2 i, 2 i + 1).
        inner_norm: a LayerNorm of the attention output before ``proj`` (timm ``scale_attn_inner``,
            EVA-02 CLIP's ``attn.norm``), fused as proj's prologue.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 rope_half: bool = False, inner_norm: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of dim={dim}, got {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.rope_half = rope_half
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = LayerNorm(dim, eps=norm_eps) if inner_norm else None
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        # BEiT's per-block relative position table (VisionTransformer(use_rel_pos_bias=True) sets it);
        # the model gathers it into the attention bias once per grid and passes that in
        self.rel_pos_bias: Optional[RelativePositionBias] = None

    def attend(self, qkv: torch.Tensor, backend=None, probs: bool = False, rope: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None):
        """qkv (B, N, 3 * dim) -> (B, N, dim) attention output before proj (+ probs if asked).

        rope: (N_r, 2 d) or (H, N_r, 2 d) table for the last N_r tokens (see
        :func:`fastvit.ops.attention`); bias: additive logits (H, N, N) or (B, H, N, N)."""
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
        if probs:
            o, p = ops.attention_probs(q, k, v, self.scale, bias=bias, rope=rope, rope_half=self.rope_half,
                                       backend=backend)
        elif rope is None and bias is None:
            o, p = ops.attention(q, k, v, self.scale, backend=backend), None
        else:
            o, p = ops.attention(q, k, v, self.scale, bias=bias, rope=rope, rope_half=self.rope_half,
                                 backend=backend), None
        o = o.transpose(1, 2).reshape(B, N, -1)  # free when o is a view of (B, N, H, d) memory
        return o, p

    def forward(self, x: torch.Tensor, backend: Optional[str] = None, rope: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        qkv = ops.linear(x, self.qkv.weight, self.qkv.bias, backend=backend)
        o, _ = self.attend(qkv, backend, rope=rope, bias=bias)
        n = self.norm
        if n is None:
            return ops.linear(o, self.proj.weight, self.proj.bias, backend=backend)
        return ops.linear(o, self.proj.weight, self.proj.bias, ln_weight=n.weight, ln_bias=n.bias, ln_eps=n.eps,
                          backend=backend)


class Mlp(nn.Module):
    """``fc1`` -> activation -> optional ``norm`` -> ``fc2`` parameters (timm's Mlp names).

    With act='swiglu' ``fc1`` holds 2 * hidden_features rows, gate rows then value rows (timm
    ``GluMlp(gate_last=False)``'s packed fc1, or ``SwiGLU``'s fc1_g over fc1_x), and the
    activation ``silu(gate) * value`` has hidden_features columns.

    Args:
        norm: a LayerNorm of the hidden activation before ``fc2`` (timm ``scale_mlp``, EVA-02's
            sub-LN), fused as fc2's prologue.
    """

    def __init__(self, in_features: int, hidden_features: int, act: str = "gelu", bias: bool = True,
                 norm: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"act: expected one of {_ACTS}, got {act!r}")
        self.act = act
        self.fc1 = nn.Linear(in_features, hidden_features * (2 if act in GATED_ACTS else 1), bias=bias)
        self.norm = LayerNorm(hidden_features, eps=norm_eps) if norm else None
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        n = self.norm
        if n is None:
            return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.act,
                           backend=backend)
        return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.act,
                       hidden_ln_weight=n.weight, hidden_ln_bias=n.bias, hidden_ln_eps=n.eps, backend=backend)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``.

    EVA-family options: ``rope_half`` (the RoPE layout, see :class:`Attention`),
    ``scale_attn_inner`` (``attn.norm``) and ``scale_mlp`` (``mlp.norm``), each a LayerNorm fused
    as the prologue of the next GEMM; act='swiglu' gives the gated MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, init_values: Optional[float] = None, act: str = "gelu",
                 norm_eps: float = 1e-6, rope_half: bool = False, scale_attn_inner: bool = False,
                 scale_mlp: bool = False):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, rope_half=rope_half,
                              inner_norm=scale_attn_inner, norm_eps=norm_eps)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, bias=proj_bias, norm=scale_mlp, norm_eps=norm_eps)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def _gamma(self, ls) -> Optional[torch.Tensor]:
        return ls.gamma if isinstance(ls, LayerScale) else None

    def forward(self, x: torch.Tensor, backend: Optional[str] = None, return_attn: bool = False,
                rope: Optional[torch.Tensor] = None, attn_bias: Optional[torch.Tensor] = None):
        """x (B, N, D) -> (B, N, D); with ``return_attn`` also the probs (B, H, N, N), float32.

        rope, attn_bias: this block's position inputs of the attention (see :meth:`Attention.attend`)."""
        n1 = self.norm1
        qkv = ops.linear(x, self.attn.qkv.weight, self.attn.qkv.bias, ln_weight=n1.weight, ln_bias=n1.bias,
                         ln_eps=n1.eps, backend=backend)  # (B, N, 3D)
        o, probs = self.attn.attend(qkv, backend, probs=return_attn, rope=rope, bias=attn_bias)  # (B, N, D)
        x = self._proj_mlp(o, x, backend)
        return (x, probs) if return_attn else x

    def forward_varlen(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       backend: Optional[str] = None) -> torch.Tensor:
        """Packed sequences x (T, D) -> (T, D): the block over the tokens of many images at once, the
        GEMMs over all T tokens and the attention within each sequence (:func:`fastvit.ops.attention_varlen`).

        cu_seqlens: (S + 1,) int32 offsets of the S sequences in x; max_seqlen: the longest one."""
        n1, a = self.norm1, self.attn
        T = x.shape[0]
        qkv = ops.linear(x, a.qkv.weight, a.qkv.bias, ln_weight=n1.weight, ln_bias=n1.bias, ln_eps=n1.eps,
                         backend=backend)  # (T, 3D)
        q, k, v = qkv.view(T, 3, a.num_heads, a.head_dim).unbind(1)  # (T, H, d) strided views
        o = ops.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, a.scale, backend=backend)
        return self._proj_mlp(o.reshape(T, -1), x, backend)

    def _proj_mlp(self, o: torch.Tensor, x: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
        """The rest of the block after the attention: o, x (..., D) -> x + ls1(proj(o)), then the MLP branch."""
        n2 = self.norm2
        an = self.attn.norm
        if an is None:
            x = ops.linear(o, self.attn.proj.weight, self.attn.proj.bias, gamma=self._gamma(self.ls1), residual=x,
                           backend=backend)
        else:
            x = ops.linear(o, self.attn.proj.weight, self.attn.proj.bias, gamma=self._gamma(self.ls1), residual=x,
                           ln_weight=an.weight, ln_bias=an.bias, ln_eps=an.eps, backend=backend)
        m = self.mlp
        hn = m.norm
        if hn is None:
            return ops.mlp(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, m.act, gamma=self._gamma(self.ls2),
                           residual=x, ln_weight=n2.weight, ln_bias=n2.bias, ln_eps=n2.eps, backend=backend)
        return ops.mlp(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, m.act, gamma=self._gamma(self.ls2),
                       residual=x, ln_weight=n2.weight, ln_bias=n2.bias, ln_eps=n2.eps, hidden_ln_weight=hn.weight,
                       hidden_ln_bias=hn.bias, hidden_ln_eps=hn.eps, backend=backend)


class AttentionPoolLatent(nn.Module):
    """Multi-head attention pooling with a learned latent query (timm's ``AttentionPoolLatent``,
    the MAP head of SigLIP; Hugging Face ``SiglipMultiheadAttentionPoolingHead``).

    ``latent`` (1, L, D) is projected by ``q``; the tokens by ``kv`` (one fused (2D, D) linear,
    k and v read as strided views of its output); the attended latent goes through ``proj``, then
    ``x + mlp(norm(x))``, then pooling over the L latent rows. Parameter names are timm's, so
    ``attn_pool.*`` of a timm checkpoint loads strictly.

    Args:
        dim: token width D (timm's in_features = embed_dim = out_features).
        num_heads: attention heads; head dim D / num_heads (72 for SigLIP so400m).
        mlp_ratio: hidden width of ``mlp`` over D.
        qkv_bias: bias of ``q`` and ``kv`` (timm: always True).
        latent_len: L, the number of latent query rows.
        pool_type: 'token' (first latent row), 'avg' (mean of the L rows) or '' (keep (B, L, D)).
        act: the MLP activation. norm_eps: epsilon of ``norm``.
    """

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 latent_len: int = 1, pool_type: str = "token", act: str = "gelu", norm_eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of dim={dim}, got {num_heads}")
        if pool_type not in ("token", "avg", ""):
            raise ValueError(f"attn_pool_type: expected 'token', 'avg' or '', got {pool_type!r}")
        if int(latent_len) < 1:
            raise ValueError(f"attn_pool_latent_len: expected an int >= 1, got {latent_len!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.latent_len = int(latent_len)
        self.pool = pool_type
        self.latent = nn.Parameter(torch.zeros(1, self.latent_len, dim))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        nn.init.trunc_normal_(self.latent, std=dim ** -0.5)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """Tokens (B, N, D) -> (B, D) ('token' / 'avg' pooling) or (B, L, D) (pool_type '')."""
        B, N, D = x.shape
        H, d, L = self.num_heads, self.head_dim, self.latent_len
        # the query does not depend on the image: one (L, D) GEMM, broadcast over the batch
        q = ops.linear(self.latent[0], self.q.weight, self.q.bias, backend=backend)  # (L, D)
        q = q.view(1, L, H, d).expand(B, L, H, d).transpose(1, 2)  # (B, H, L, d), batch stride 0
        kv = ops.linear(x, self.kv.weight, self.kv.bias, backend=backend)  # (B, N, 2D)
        k, v = kv.view(B, N, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) views
        o = ops.attention(q, k, v, self.scale, backend=backend)  # (B, H, L, d) view of (B, L, H, d)
        return self._head(o.transpose(1, 2).reshape(B, L, D), backend)

    def forward_varlen(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       backend: Optional[str] = None) -> torch.Tensor:
        """Packed tokens x (T, D) of B images -> (B, D) (or (B, L, D) for pool_type ''): each image's
        latent queries attend over that image's tokens only (:func:`fastvit.ops.attention_varlen`).

        cu_seqlens: (B + 1,) int32 offsets of the images' tokens in x; max_seqlen: the most tokens of one."""
        T, D = x.shape
        B = cu_seqlens.shape[0] - 1
        H, d, L = self.num_heads, self.head_dim, self.latent_len
        q = ops.linear(self.latent[0], self.q.weight, self.q.bias, backend=backend)  # (L, D), one GEMM for all
        q = q.view(1, L, H, d).expand(B, L, H, d).reshape(B * L, H, d)
        kv = ops.linear(x, self.kv.weight, self.kv.bias, backend=backend)  # (T, 2D)
        k, v = kv.view(T, 2, H, d).unbind(1)  # (T, H, d) views
        cu_q, _ = ops.varlen_offsets([L] * B, device=x.device)
        o = ops.attention_varlen(q, k, v, cu_q, cu_seqlens, L, max_seqlen, self.scale, backend=backend)
        return self._head(o.reshape(B, L, D), backend)

    def _head(self, o: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
        """Attended latents o (B, L, D) -> proj, ``x + mlp(norm(x))``, then the pooling over L."""
        x = ops.linear(o, self.proj.weight, self.proj.bias, backend=backend)  # (B, L, D)
        m, n = self.mlp, self.norm
        x = ops.mlp(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, m.act, residual=x, ln_weight=n.weight,
                    ln_bias=n.bias, ln_eps=n.eps, backend=backend)
        if self.pool == "token":
            return x[:, 0]
        if self.pool == "avg":
            return x.mean(dim=1)
        return x


class VisionTransformer(nn.Module):
    """ViT / DeiT / DINOv2 / CLIP / SigLIP-style encoder, drop-in for timm's ``VisionTransformer``.

    Constructor arguments follow timm (names and meaning); parameters carry timm's names so
    ``load_state_dict(timm_model.state_dict(), strict=True)`` works. Additions:

    ``global_pool='map'`` pools with :class:`AttentionPoolLatent` (``attn_pool``, timm's SigLIP head).

    Args:
        act: MLP activation: 'gelu' (erf, timm's nn.GELU), 'gelu_tanh' or 'quick_gelu' (OpenAI
            CLIP's x * sigmoid(1.702 x)); the choices are :data:`fastvit.facts.ACTIVATIONS`.
        norm_eps: LayerNorm epsilon (timm 1e-6; CLIP 1e-5; Hugging Face ViT 1e-12).
        head_bias: the classifier ``head`` has a bias; False for a projection head (Hugging Face
            CLIP's ``visual_projection``).
        attn_pool_latent_len, attn_pool_type: latent rows and pooling of the MAP head
            (timm's AttentionPoolLatent ``latent_len`` / ``pool_type``; 1 / 'token' in every timm preset).
        rope_type: rotary position embedding of the patch tokens in every block (timm ``Eva``'s
            ``use_rot_pos_emb`` + ``rope_type``): None, 'cat' (EVA-02, timm / naver RoPE ViTs),
            'mixed' (learnt per-block, per-head frequencies ``rope.freqs``) or 'dinov3'; see
            :mod:`fastvit.rope`. The prefix tokens are not rotated.
        rope_temperature, rope_grid_indexing, rope_grid_offset, ref_feat_shape: timm ``Eva``'s RoPE
            settings (temperature None: the kind's default).
        rope_rotate_half: pair dims (i, i + d / 2) instead of (2 i, 2 i + 1); None: True for
            'dinov3', else False.
        rope_hf: compute the 'dinov3' table as Hugging Face's DINOv3ViTModel rounds it.
        scale_attn_inner: LayerNorm of the attention output before ``proj`` (``attn.norm``).
        scale_mlp: LayerNorm of the MLP hidden activation before ``fc2`` (``mlp.norm``, EVA-02).
        distilled: DeiT distillation token + ``head_dist`` (timm's VisionTransformerDistilled).
        pos_embed_antialias: resample position embeddings with antialias (timm True, HF False).
        embed_layer: a pre-built patch-embedding module (e.g. :class:`HybridEmbed`), or None.
        use_rel_pos_bias: BEiT's relative position bias table in every block
            (``blocks.i.attn.rel_pos_bias``; timm ``Beit(use_rel_pos_bias=True)``).
        use_shared_rel_pos_bias: one table for all blocks (``rel_pos_bias``; timm
            ``use_shared_rel_pos_bias``); added to the per-block ones when both are on. Either
            needs exactly one prefix token, the class token, and a patch grid. The gathered
            (H, 1 + N, 1 + N) biases are kept for the current grid, one per block with per-block
            tables: depth x H x (1 + N)^2 elements (beit_large_patch16_512: 0.8 GB in bf16).
        rel_pos_resize: how the tables are fitted to another grid with ``dynamic_img_size``:
            'timm' (``resize_rel_pos_bias_table``, as ``Beit.set_input_size``) or 'bilinear' (HF BEiT).
        backend: per-model backend ('triton', 'cuda', 'torch') or None for the global choice.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        init_values: Optional[float] = None,
        class_token: bool = True,
        pos_embed: str = "learn",
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: Optional[bool] = None,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        act: str = "gelu",
        norm_eps: float = 1e-6,
        distilled: bool = False,
        pos_embed_antialias: bool = True,
        head_bias: bool = True,
        attn_pool_latent_len: int = 1,
        attn_pool_type: str = "token",
        rope_type: Optional[str] = None,
        rope_temperature: Optional[float] = None,
        rope_grid_indexing: str = "ij",
        rope_grid_offset: float = 0.0,
        rope_rotate_half: Optional[bool] = None,
        ref_feat_shape: Optional[Union[int, Tuple[int, int]]] = None,
        rope_hf: bool = False,
        scale_attn_inner: bool = False,
        scale_mlp: bool = False,
        embed_layer: Optional[nn.Module] = None,
        use_rel_pos_bias: bool = False,
        use_shared_rel_pos_bias: bool = False,
        rel_pos_resize: str = "timm",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool: expected one of {', '.join(map(repr, _POOLS))}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool: 'token' needs class_token=True")
        if distilled and (global_pool != "token" or not class_token):
            raise ValueError(f"distilled: needs global_pool='token' and class_token=True, got {global_pool!r}")
        if pos_embed not in ("", "none", "learn"):
            raise ValueError(f"pos_embed: expected 'learn', 'none' or '', got {pos_embed!r}")
        if drop_rate or drop_path_rate:
            raise ValueError("drop_rate / drop_path_rate: fastvit is an inference model and expects 0, "
                             f"got {drop_rate} / {drop_path_rate}")
        if act not in _ACTS:
            raise ValueError(f"act: expected one of {_ACTS}, got {act!r}")
        self.backend = backends._check_name(backend, "backend")
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.has_class_token = class_token
        self.num_reg_tokens = reg_tokens
        self.distilled = distilled
        self.distilled_training = False
        self.num_prefix_tokens = int(class_token) + int(distilled) + reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.pos_embed_antialias = pos_embed_antialias

        if embed_layer is None:
            embed_layer = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm,
                                     dynamic_img_pad=dynamic_img_pad)
        self.patch_embed = embed_layer
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = None if pos_embed in ("", "none") else nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
        self.norm_pre = LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        if rope_rotate_half is None:
            rope_rotate_half = rope_type == "dinov3"
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, init_values, act, norm_eps,
                  rope_half=bool(rope_type) and rope_rotate_half, scale_attn_inner=scale_attn_inner,
                  scale_mlp=scale_mlp)
            for _ in range(depth)
        ])
        self.rel_pos_bias = self._rel_pos_tables(use_rel_pos_bias, use_shared_rel_pos_bias, rel_pos_resize)
        self.norm = LayerNorm(embed_dim, eps=norm_eps) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = AttentionPoolLatent(
            embed_dim, num_heads, mlp_ratio, latent_len=attn_pool_latent_len, pool_type=attn_pool_type, act=act,
            norm_eps=norm_eps) if global_pool == "map" else None
        self.fc_norm = LayerNorm(embed_dim, eps=norm_eps) if final_norm and use_fc_norm else nn.Identity()
        self.head_bias = head_bias
        self.head = nn.Linear(embed_dim, num_classes, bias=head_bias) if num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()) if distilled else None
        self._embed_cache: Dict[Any, Tuple[Any, Tuple[torch.Tensor, Optional[torch.Tensor]]]] = {}
        # a RoPE module (fastvit.rope) giving each block's table, for the families that use one
        self.rope = build_rope(rope_type, embed_dim // num_heads, depth, num_heads, rope_temperature,
                               rope_grid_indexing, rope_grid_offset,
                               None if ref_feat_shape is None else _pair(ref_feat_shape), rope_rotate_half,
                               hf=rope_hf)
        # the modules the blocks' position inputs come from, found once (not per forward: the
        # plain ViT path then costs one attribute read)
        self._pos_sources = tuple(m for m in (self.rope, self.rel_pos_bias,
                                              *(b.attn.rel_pos_bias for b in self.blocks)) if m is not None)
        self._pos_cache: Dict[Any, Tuple[Any, Any]] = {}
        # uint8 input: (mean, std, rescale) of the checkpoint's preprocessing, folded into the
        # patch projection (set_input_normalization); None = float input only
        self.input_norm: Optional[Tuple[Tuple[float, ...], Tuple[float, ...], float]] = None
        self._fold_cache: Dict[Any, Tuple[Any, Any]] = {}
        self._init_weights()

    # ------------------------------------------------------------------ setup
    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for t in (self.cls_token, self.reg_token, self.dist_token):
            if t is not None:
                nn.init.normal_(t, std=1e-6)

    def _rel_pos_tables(self, per_block: bool, shared: bool, resize: str) -> Optional[RelativePositionBias]:
        """BEiT's relative position tables, for the training grid: one per block's attention when
        ``per_block``; the shared one is returned (None without)."""
        if not (per_block or shared):
            return None
        what = "use_rel_pos_bias" if per_block else "use_shared_rel_pos_bias"
        if resize not in RESIZE_MODES:
            raise ValueError(f"rel_pos_resize: expected one of {RESIZE_MODES}, got {resize!r}")
        if self.cls_token is None or self.num_prefix_tokens != 1:
            raise ValueError(f"{what}: BEiT's table has rows for exactly one prefix token, the class token; got "
                             f"class_token={self.cls_token is not None}, reg_tokens={self.num_reg_tokens}, "
                             f"distilled={self.distilled}")
        if not isinstance(self.patch_embed, PatchEmbed):
            raise ValueError(f"{what}: expected a PatchEmbed patch grid, got {type(self.patch_embed).__name__}")
        grid = self.patch_embed.grid_size
        if per_block:
            for blk in self.blocks:
                blk.attn.rel_pos_bias = RelativePositionBias(grid, self.num_heads, resize)
        return RelativePositionBias(grid, self.num_heads, resize) if shared else None

    def set_backend(self, backend: Optional[str]) -> "VisionTransformer":
        """Per-model backend: 'triton', 'cuda', 'torch', or None / 'auto' to follow the global choice."""
        self.backend = backends._check_name(backend, "backend")
        return self

    def set_distilled_training(self, enable: bool = True) -> None:
        """DeiT: in training mode with this on, forward returns (cls_logits, dist_logits)."""
        self.distilled_training = enable

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New ``head`` for ``num_classes`` (0: none); ``global_pool`` as timm: leaving 'map' drops
        ``attn_pool``, and a MAP head cannot be added here."""
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool: expected one of {', '.join(map(repr, _POOLS))}, got {global_pool!r}")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool: 'token' needs class_token=True")
            if global_pool == "map" and self.attn_pool is None:
                raise ValueError("global_pool: 'map' cannot be added by reset_classifier (build the model with "
                                 "global_pool='map')")
            if global_pool != "map":
                self.attn_pool = None
            self.global_pool = global_pool
        ref = self.norm.weight if isinstance(self.norm, LayerNorm) else self.patch_embed.proj.weight
        self.num_classes = num_classes
        self.head = (nn.Linear(self.embed_dim, num_classes, bias=self.head_bias) if num_classes > 0
                     else nn.Identity()).to(ref)
        if self.distilled:
            self.head_dist = (nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()).to(ref)

    # ------------------------------------------------------------------ uint8 input
    def set_input_normalization(self, mean=None, std=None, rescale: float = 1 / 255) -> "VisionTransformer":
        """Let the model take uint8 images: (B, C, H, W) pixels 0..255, normalised inside as
        ``(x * rescale - mean) / std`` per channel (the checkpoint's preprocessing).

        The affine map is folded into the patch projection, so it costs no pass over the image:
        ``W' = W * rescale / std`` (per input channel) and ``b' = b - sum(W * mean / std)``, exact
        in real arithmetic (one rounding of W' in the model dtype); with ``dynamic_img_pad`` the
        border patches' position rows get back what the padded pixels (normalised zero, raw
        ``mean / rescale``) would have contributed. A float input is taken as already normalised,
        exactly as before. Hybrid (CNN stem) models normalise the uint8 image explicitly first.

        Args:
            mean: per-channel mean of the [0, 1]-scaled image, or a :class:`fastvit.Preprocessor`
                (its ``mean``, ``std`` and ``rescale_factor``), or None to clear (uint8 input refused).
            std: per-channel standard deviation.
            rescale: pixel scale before normalising (1 / 255).

        Returns:
            the model.
        """
        if mean is not None and hasattr(mean, "rescale_factor") and hasattr(mean, "std"):
            mean, std, rescale = mean.mean, mean.std, mean.rescale_factor
        if mean is None:
            self.input_norm = None
            self._fold_cache.clear()
            return self
        C = self.patch_embed.proj.weight.shape[1] if isinstance(self.patch_embed, PatchEmbed) else None
        mean = tuple(float(m) for m in mean)
        std = tuple(float(s) for s in (std if std is not None else ()))
        n = C if C is not None else len(mean)
        if len(mean) != n or len(std) != n:
            raise ValueError(f"mean / std: expected {n} values each (one per input channel), got {mean} / {std}")
        if any(not s > 0 for s in std) or not float(rescale) > 0:
            raise ValueError(f"std / rescale: expected positive values, got std={std}, rescale={rescale}")
        self.input_norm = (mean, std, float(rescale))
        self._fold_cache.clear()
        return self

    def _norm_tensors(self, device) -> Tuple[torch.Tensor, torch.Tensor, float]:
        mean, std, r = self.input_norm
        return (torch.tensor(mean, dtype=torch.float32, device=device),
                torch.tensor(std, dtype=torch.float32, device=device), r)

    def _folded_proj(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Patch projection with the input normalisation folded in: (W', b'), model dtype, cached
        for inference (refreshed when the projection or the normalisation changes)."""
        proj = self.patch_embed.proj
        params = [proj.weight] + ([proj.bias] if proj.bias is not None else [])

        def compute(_):
            w = proj.weight
            mean, std, r = self._norm_tensors(w.device)
            w32 = w.float()
            w_f = w32 * (r / std).view(1, -1, 1, 1)
            b_f = -(w32 * (mean / std).view(1, -1, 1, 1)).sum((1, 2, 3))
            if proj.bias is not None:
                b_f = b_f + proj.bias.float()
            return w_f.to(w.dtype), b_f.to(w.dtype)

        return _cached(self._fold_cache, (0, 0) + (self.input_norm,), params, compute)

    def _pad_correction(self, grid: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
        """(gh * gw, D) float32: what the zero-padded border pixels of a normalised image give
        (normalised zero) minus what the folded projection gives them (raw zero = ``-mean / std``)."""
        w = self.patch_embed.proj.weight
        mean, std, _ = self._norm_tensors(w.device)
        ph, pw = w.shape[-2:]
        gh, gw = grid
        vh, vw = size[0] - (gh - 1) * ph, size[1] - (gw - 1) * pw  # valid rows / cols of the last patch
        m = (w.float() * (mean / std).view(1, -1, 1, 1)).sum(1)  # (D, ph, pw): each pixel's share of the bias
        corr = torch.zeros(gh, gw, w.shape[0], dtype=torch.float32, device=w.device)
        if vh < ph:
            corr[-1, :] += m[:, vh:, :].sum((1, 2))
        if vw < pw:
            corr[:, -1] += m[:, :, vw:].sum((1, 2))
        if vh < ph and vw < pw:
            corr[-1, -1] -= m[:, vh:, vw:].sum((1, 2))  # counted by both
        return corr.reshape(gh * gw, -1)

    def _normalize_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float image in the model dtype (the explicit path)."""
        mean, std, r = self._norm_tensors(x.device)
        y = (x.float() * r - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return y.to(self.patch_embed.proj.weight.dtype)

    def _check_uint8(self, x: torch.Tensor) -> None:
        if self.input_norm is None:
            raise ValueError("x: a uint8 image batch needs the model's input normalisation (the checkpoint's mean / "
                             "std): call model.set_input_normalization(mean, std) or "
                             "model.set_input_normalization(preprocessor), or pass a normalised float image; got "
                             f"dtype uint8 shape {tuple(x.shape)} on a model without one")

    # ------------------------------------------------------------------ embedding
    def _prefix_params(self) -> List[torch.Tensor]:
        out = []
        if self.cls_token is not None:
            out.append(self.cls_token[0])
        if self.dist_token is not None:
            out.append(self.dist_token[0])
        if self.reg_token is not None:
            out.append(self.reg_token[0])
        return out

    def _embed_inputs(self, grid: Tuple[int, int]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Position embedding of the patch tokens for ``grid`` (gh * gw, D) and the prefix rows (T, D).

        Resampled in float32 (bicubic) when the grid differs from the stored one, and cached
        per (grid, dtype, device) for inference; the cache is bypassed when autograd records
        or torch.compile traces, and refreshed when a parameter changes.
        """
        params = [p for p in (self.pos_embed, *self._prefix_params()) if p is not None]
        return _cached(self._embed_cache, grid, params, self._compute_embed_inputs)

    def _block_pos_inputs(self, grid: Tuple[int, int]) -> Optional[List[Tuple[Optional[torch.Tensor],
                                                                               Optional[torch.Tensor]]]]:
        """Per-block position inputs of the attention for ``grid``: a list of (rope, attn_bias),
        one per block, or None when no block takes any (the plain ViT path does no extra work).

        rope: (N_r, 2 d) or (H, N_r, 2 d) ``cat([sin, cos], -1)`` table of the patch tokens;
        attn_bias: (H, N, N) additive logits. Computed once per grid and cached as
        :meth:`_embed_inputs` (refreshed when a parameter they come from changes).
        """
        params = self._pos_input_params()
        if params is None:
            return None
        return _cached(self._pos_cache, grid, params, self._compute_block_pos_inputs)

    def _pos_input_params(self) -> Optional[List[torch.Tensor]]:
        """The tensors the per-block position inputs are computed from (the cache stamp), or None
        when the model has no per-block position inputs."""
        srcs = self._pos_sources
        if not srcs:
            return None
        return [t for m in srcs for t in (*m.parameters(), *m.buffers())]

    def _compute_block_pos_inputs(self, grid):
        depth = len(self.blocks)
        rope = self.rope(grid) if self.rope is not None else None  # one table for all blocks, or one per block
        ropes = rope if isinstance(rope, (list, tuple)) else [rope] * depth
        # BEiT: (H, 1 + N, 1 + N) per block, the shared table's added (one tensor for all blocks when
        # only that one is on)
        shared = self.rel_pos_bias(grid) if self.rel_pos_bias is not None else None
        biases = []
        for blk in self.blocks:
            own = blk.attn.rel_pos_bias
            bias = own(grid) if own is not None else None
            biases.append(shared if bias is None else bias if shared is None else bias + shared)
        return list(zip(ropes, biases))

    def _compute_embed_inputs(self, grid):
        prefix = self._prefix_params()
        prefix = torch.cat(prefix, 0) if prefix else None  # (T, D) in cls, dist, reg order
        pos = None
        if self.pos_embed is not None:
            pos = self.pos_embed[0]
            if not self.no_embed_class:
                n = self.num_prefix_tokens
                pos_prefix, pos = pos[:n], pos[n:]
                prefix = prefix + pos_prefix if prefix is not None else None
            pos = resample_pos_embed(pos, grid, self.patch_embed.grid_size, antialias=self.pos_embed_antialias)
        return pos, prefix

    def _grid_for(self, x: torch.Tensor) -> Tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor image batch (B, C, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected an image batch of shape (B, C, H, W), got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        pe = self.patch_embed
        if not self.dynamic_img_size and (H, W) != tuple(pe.img_size):
            raise ValueError(f"x: expected image size {tuple(pe.img_size)} (set dynamic_img_size=True to accept "
                             f"other sizes), got {(H, W)}")
        # a training size that is not a multiple of the patch (SigLIP so400m/14 at 384) loses its
        # border as in timm's / HF's strided conv; other sizes must be multiples, as timm asks
        if isinstance(pe, PatchEmbed) and not pe.dynamic_img_pad and (H, W) != tuple(pe.img_size) and (
                H % pe.patch_size[0] or W % pe.patch_size[1]):
            raise ValueError(f"x: expected height and width multiples of the patch size {pe.patch_size} "
                             f"(or dynamic_img_pad=True), got image size {(H, W)}")
        return pe.dynamic_feat_size((H, W))

    def embed(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Image (B, C, H, W) -> tokens after position embedding and pre-norm, (B, T + N, D).

        x: a normalised float image, or uint8 pixels once :meth:`set_input_normalization` is set.

        grid: the token grid of x when the caller has it (from ``_grid_for``)."""
        if grid is None:
            grid = self._grid_for(x)
        pos, prefix = self._embed_inputs(grid)
        pe = self.patch_embed
        if isinstance(pe, PatchEmbed) and not pe.dynamic_img_pad:
            h, w = grid[0] * pe.patch_size[0], grid[1] * pe.patch_size[1]
            if (h, w) != tuple(x.shape[-2:]):
                x = x[..., :h, :w]  # the border a strided conv drops (a view: every backend reads strides)
        if x.dtype == torch.uint8:
            self._check_uint8(x)
            if isinstance(pe, PatchEmbed):
                # the normalisation folded into the projection: the kernel reads the uint8 pixels
                weight, bias = self._folded_proj()
                H, W = x.shape[-2:]
                if pe.dynamic_img_pad and (H % pe.patch_size[0] or W % pe.patch_size[1]):
                    corr = self._pad_correction(grid, (H, W))
                    pos = (corr if pos is None else pos.float() + corr).to(weight.dtype)
                x = ops.patch_embed(x, weight, bias, pos, prefix, pe.dynamic_img_pad, backend=self.backend)
            else:
                x = pe(self._normalize_uint8(x), pos, prefix, backend=self.backend)
        else:
            x = pe(x, pos, prefix, backend=self.backend)
        if isinstance(self.norm_pre, LayerNorm):
            x = self.norm_pre(x, backend=self.backend)
        return x

    # ------------------------------------------------------------------ forward
    def _norm(self, x):
        return self.norm(x, backend=self.backend) if isinstance(self.norm, LayerNorm) else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> normalised tokens (B, T + N, D)."""
        grid = self._grid_for(x)
        pos = self._block_pos_inputs(grid)
        x = self.embed(x, grid)
        if pos is None:
            for blk in self.blocks:
                x = blk(x, self.backend)
        else:
            for blk, (rope, bias) in zip(self.blocks, pos):
                x = blk(x, self.backend, rope=rope, attn_bias=bias)
        return self._norm(x)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """Tokens (B, T + N, D) -> (B, D) as ``global_pool`` says ('' keeps (B, T + N, D)).

        With a MAP head (``attn_pool``) the patch tokens go through it, whatever ``pool_type`` (as timm)."""
        if self.attn_pool is not None:
            return self.attn_pool(x[:, self.num_prefix_tokens:], backend=self.backend)
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        x = x[:, self.num_prefix_tokens:]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def _head(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(head, nn.Linear):
            return ops.linear(x, head.weight, head.bias, backend=self.backend)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Tokens (B, T + N, D) -> logits (B, num_classes) (or pooled features with ``pre_logits``)."""
        if self.distilled:
            x, x_dist = x[:, 0], x[:, 1]
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = self._head(self.head, x), self._head(self.head_dist, x_dist)
            if self.distilled_training and self.training:
                return x, x_dist
            return (x + x_dist) / 2
        x = self.pool(x)
        if isinstance(self.fc_norm, LayerNorm):
            x = self.fc_norm(x, backend=self.backend)
        return x if pre_logits else self._head(self.head, x)

    def forward(self, x: torch.Tensor):
        """Image (B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ packed batches (mixed image sizes)
    def forward_packed(self, images: Union[torch.Tensor, Sequence[torch.Tensor]],
                       grids: Optional[Sequence[Tuple[int, int]]] = None, pre_logits: bool = False,
                       hidden_states: bool = False) -> "PackedOutput":
        """Images of different sizes in one packed sequence: no padding token is computed.

        Every block runs once over the tokens of all images (the GEMMs over the total token count
        T, the attention within each image: :func:`fastvit.ops.attention_varlen`); each image gets
        the position embedding of its own grid, as :meth:`forward_features` would give it alone.

        Args:
            images: a list of B images (C, H_i, W_i) (float, any device; sizes multiples of the patch,
                or any with ``dynamic_img_pad``; other sizes than ``img_size`` need ``dynamic_img_size``);
                or, with ``grids``, pre-patchified input: a list of B (N_i, ph * pw * C) tensors or one
                packed (sum N_i, ph * pw * C) tensor, each patch flattened (ph, pw, C) (channel fastest,
                the layout of Hugging Face's Siglip2ImageProcessor and timm's NaFlex ``Patchify``),
                patches row-major over the grid.
            grids: (gh_i, gw_i) of each image's patches, with pre-patchified input only.
            pre_logits: skip the head (``logits`` None).
            hidden_states: also return the packed embeddings and every block's output, depth + 1
                tensors (T, D) (Hugging Face's ``hidden_states``), in ``hidden_states``.

        Returns:
            :class:`PackedOutput`: ``tokens`` (T, D) normalised, image i's T_p + N_i tokens (prefix
            first) at ``cu_seqlens[i]:cu_seqlens[i + 1]``; ``pooled`` (B, D) (``forward_head(...,
            pre_logits=True)`` per image; None with ``global_pool=''``); ``logits`` (B, num_classes)
            from the head, or None.
        """
        pe = self.patch_embed
        if not isinstance(pe, PatchEmbed):
            raise ValueError(f"forward_packed: expected a PatchEmbed patch embedding, got {type(pe).__name__}")
        if self.distilled:
            raise ValueError("forward_packed: DeiT distillation (two heads over the class and distillation tokens) "
                             "is not supported in packed batches; use forward")
        if self._pos_sources:
            raise ValueError("forward_packed: models with RoPE or a relative position bias are not supported in packed "
                             "batches (the per-image tables are not packed); use forward")
        patches, grids = self._packed_patches(images, grids)  # (P, ph * pw * C), [(gh, gw)] * B
        x, cu, max_len, lens, patch_rows = self._packed_embed(patches, grids)
        states = [x] if hidden_states else None
        for blk in self.blocks:
            x = blk.forward_varlen(x, cu, max_len, self.backend)
            if states is not None:
                states.append(x)
        x = self._norm(x)
        pooled = self._packed_pool(x, cu, lens, patch_rows)
        if pooled is not None and isinstance(self.fc_norm, LayerNorm):
            pooled = self.fc_norm(pooled, backend=self.backend)
        logits = None
        if not pre_logits and pooled is not None and isinstance(self.head, nn.Linear):
            logits = self._head(self.head, pooled)
        out = PackedOutput(tokens=x, cu_seqlens=cu, grids=grids, num_prefix_tokens=self.num_prefix_tokens,
                           pooled=pooled, logits=logits)
        if states is not None:
            out["hidden_states"] = states
        return out

    def _packed_patches(self, images, grids) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """The packed patch rows (P, ph * pw * C) in the projection's dtype and device, and the grids."""
        pe = self.patch_embed
        w = pe.proj.weight
        C = w.shape[1]
        ph, pw = pe.patch_size
        K = C * ph * pw
        if grids is not None:
            grids = [_pair(g) for g in grids]
            if not grids or any(g[0] < 1 or g[1] < 1 for g in grids):
                raise ValueError(f"grids: expected one (rows, cols) >= 1 per image, got {grids}")
            n = [g[0] * g[1] for g in grids]
            if isinstance(images, torch.Tensor):
                if images.dim() != 2 or images.shape != (sum(n), K):
                    raise ValueError(f"images: expected packed patches ({sum(n)}, {K}) (sum of the grids' patches, "
                                     f"ph * pw * C), got shape {tuple(images.shape)}")
                return images.to(device=w.device, dtype=w.dtype).contiguous(), grids
            if not isinstance(images, (list, tuple)) or len(images) != len(grids):
                raise ValueError(f"images: expected {len(grids)} patch tensors (one per grid), got "
                                 f"{len(images) if isinstance(images, (list, tuple)) else type(images).__name__}")
            for i, (t, k) in enumerate(zip(images, n)):
                if not isinstance(t, torch.Tensor) or t.shape != (k, K):
                    raise ValueError(f"images[{i}]: expected patches ({k}, {K}) for grid {grids[i]}, got "
                                     f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            return torch.cat([t.to(device=w.device, dtype=w.dtype) for t in images]), grids
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images.unbind(0))
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError(f"images: expected a non-empty list of images (C, H, W), got "
                            f"{type(images).__name__ if not isinstance(images, (list, tuple)) else 'an empty list'}")
        grids = []
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != C:
                raise ValueError(f"images[{i}]: expected an image ({C}, H, W), got "
                                 f"{tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__}")
            if not img.is_floating_point():
                raise TypeError(f"images[{i}]: expected a float image (normalised), got dtype {img.dtype}")
            H, W = img.shape[1:]
            if not self.dynamic_img_size and (H, W) != tuple(pe.img_size):
                raise ValueError(f"images[{i}]: expected image size {tuple(pe.img_size)} (set dynamic_img_size=True "
                                 f"to accept other sizes), got {(H, W)}")
            if not pe.dynamic_img_pad and (H % ph or W % pw):
                raise ValueError(f"images[{i}]: expected height and width multiples of the patch size {(ph, pw)} "
                                 f"(or dynamic_img_pad=True), got image size {(H, W)}")
            grids.append(pe.dynamic_feat_size((H, W)))
        n = [g[0] * g[1] for g in grids]
        out = torch.empty(sum(n), K, device=w.device, dtype=w.dtype)
        start = 0
        for img, (gh, gw), k in zip(images, grids, n):
            H, W = img.shape[1:]
            if (H, W) != (gh * ph, gw * pw):  # dynamic_img_pad: zeros below and right, as the conv path
                img = F.pad(img, (0, gw * pw - W, 0, gh * ph - H))
            # (C, gh, ph, gw, pw) -> (gh, gw, ph, pw, C), written in place (one copy, cast included)
            out[start:start + k].view(gh, gw, ph, pw, C).copy_(img.view(C, gh, ph, gw, pw).permute(1, 3, 2, 4, 0))
            start += k
        return out, grids

    def _packed_inputs(self, grids: Sequence[Tuple[int, int]]):
        """Per grid (pos (gh * gw, D) or None, prefix (T, D) or None), and the projection weight as
        (D, ph * pw * C) (the patch rows' layout); kept per grid for inference (refreshed when a
        parameter changes, bypassed when autograd records or torch.compile traces)."""
        w = self.patch_embed.proj.weight
        params = [p for p in (w, self.pos_embed, *self._prefix_params()) if p is not None]
        use_cache = not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in params))
        cache = getattr(self, "_packed_cache", None)
        stamp = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if cache is None or cache.get("stamp") != stamp:
            cache = {"stamp": stamp}
            if use_cache:
                self._packed_cache = cache
        w_rows = cache.get("weight") if use_cache else None
        if w_rows is None:
            w_rows = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (D, C, ph, pw) -> (D, ph * pw * C)
            if use_cache:
                cache["weight"] = w_rows
        per_grid = []
        for g in grids:
            hit = cache.get(g) if use_cache else None
            if hit is None:
                hit = self._compute_embed_inputs(g)
                if use_cache and len(cache) < 258:  # a bounded number of grids (a token budget allows few)
                    cache[g] = hit
            per_grid.append(hit)
        return w_rows, per_grid

    def _packed_embed(self, patches: torch.Tensor, grids: List[Tuple[int, int]]):
        """Patch rows (P, K) -> packed tokens (P + B * T, D) after position embedding, prefix rows
        and pre-norm; the int32 offsets (B + 1,), the longest sequence, each image's patch count, and
        the patch tokens' rows (P,) (None without prefix tokens: then every row is a patch)."""
        pe = self.patch_embed
        w_rows, per_grid = self._packed_inputs(grids)
        lens = [g[0] * g[1] for g in grids]
        pos = [p for p, _ in per_grid]
        pos = torch.cat(pos) if pos[0] is not None else None  # (P, D), added in the GEMM's epilogue
        y = ops.linear(patches, w_rows, pe.proj.bias, residual=pos, backend=self.backend)  # (P, D)
        T = self.num_prefix_tokens
        # offsets built on the host: attention_varlen never reads them back from the GPU
        cu, max_len = ops.varlen_offsets([T + n for n in lens], device=y.device)
        patch_rows = None
        if T:  # each sequence is [prefix, patches]: rows found on the host, so no device sync
            prefix = per_grid[0][1]  # (T, D), the same for every grid
            total = y.shape[0] + T * len(lens)
            starts = torch.tensor([0] + [T + n for n in lens[:-1]]).cumsum(0)
            is_prefix = torch.zeros(total, dtype=torch.bool)
            is_prefix[(starts[:, None] + torch.arange(T)).flatten()] = True
            patch_rows = (~is_prefix).nonzero().squeeze(1).to(y.device, non_blocking=True)
            prefix_rows = is_prefix.nonzero().squeeze(1).to(y.device, non_blocking=True)
            x = y.new_empty(total, y.shape[1])
            x.index_copy_(0, patch_rows, y)
            x.index_copy_(0, prefix_rows, prefix.to(y.dtype).repeat(len(lens), 1))
            y = x
        if isinstance(self.norm_pre, LayerNorm):
            y = self.norm_pre(y, backend=self.backend)
        return y, cu, max_len, lens, patch_rows

    def _packed_pool(self, x: torch.Tensor, cu: torch.Tensor, lens: List[int],
                     patch_rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Packed tokens (T_all, D) -> (B, D) per image as :meth:`pool` (None for global_pool '')."""
        B = len(lens)
        if self.attn_pool is None and self.global_pool == "token":
            return x[cu[:-1].long()]
        if self.attn_pool is None and not self.global_pool:
            return None
        if patch_rows is not None:  # the patch tokens only, as pool() takes them
            x = x.index_select(0, patch_rows)
        if self.attn_pool is not None:
            cu_p, max_len = ops.varlen_offsets(lens, device=x.device)
            return self.attn_pool.forward_varlen(x, cu_p, max_len, backend=self.backend)
        counts = torch.tensor(lens, device=x.device)
        seg = torch.repeat_interleave(torch.arange(B, device=x.device), counts, output_size=sum(lens))
        D = x.shape[1]
        out = []
        if self.global_pool in ("avg", "avgmax"):
            sums = torch.zeros(B, D, device=x.device, dtype=torch.float32).index_add_(0, seg, x.float())
            out.append((sums / counts[:, None].float()).to(x.dtype))
        if self.global_pool in ("max", "avgmax"):
            mx = torch.full((B, D), float("-inf"), device=x.device, dtype=x.dtype)
            out.append(mx.scatter_reduce_(0, seg[:, None].expand(-1, D), x, "amax"))
        return out[0] if len(out) == 1 else 0.5 * (out[1] + out[0])

    # ------------------------------------------------------------------ intermediates and attention
    def _take_indices(self, indices) -> List[int]:
        n = len(self.blocks)
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices: expected 1..{n} last blocks, got {indices}")
            return list(range(n - indices, n))
        out = [i + n if i < 0 else i for i in indices]
        bad = [i for i in out if not 0 <= i < n]
        if bad:
            raise ValueError(f"indices: expected block indices in [-{n}, {n}), got {list(indices)}")
        return out

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        attn_layers: Optional[Sequence[int]] = None,
    ):
        """timm's ``forward_intermediates``, plus attention probabilities for ``attn_layers``.

        Returns (as timm) ``(final_features, intermediates)`` or, with ``intermediates_only``,
        the list; each intermediate is (B, D, gh, gw) for 'NCHW' or (B, N, D) for 'NLC'. With
        ``attn_layers`` a third item / second element is a dict layer -> probs (B, H, T+N, T+N).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt: expected 'NCHW' or 'NLC', got {output_fmt!r}")
        take = self._take_indices(indices)
        want_attn = set(self._take_indices(list(attn_layers))) if attn_layers is not None else set()
        B, _, H, W = x.shape
        grid = self._grid_for(x)
        pos = self._block_pos_inputs(grid)
        x = self.embed(x, grid)
        last = max(take + list(want_attn)) if stop_early else len(self.blocks) - 1
        inter, attns = [], {}
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            rope, bias = (None, None) if pos is None else pos[i]
            if i in want_attn:
                x, attns[i] = blk(x, self.backend, return_attn=True, rope=rope, attn_bias=bias)
            else:
                x = blk(x, self.backend, rope=rope, attn_bias=bias)
            if i in take:
                inter.append(self._norm(x) if norm else x)
        n = self.num_prefix_tokens
        prefix = [y[:, :n] for y in inter]
        inter = [y[:, n:] for y in inter]
        if output_fmt == "NCHW":
            inter = [y.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in inter]
        if return_prefix_tokens and n:
            inter = list(zip(inter, prefix))
        if intermediates_only:
            return (inter, attns) if attn_layers is not None else inter
        out = self._norm(x)
        return (out, inter, attns) if attn_layers is not None else (out, inter)

    def get_intermediate_layers(self, x, n: Union[int, Sequence[int]] = 1, reshape: bool = False,
                                return_prefix_tokens: bool = False, norm: bool = False):
        """DINO-style interface (as timm): outputs of the last ``n`` blocks (or the listed ones)."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True)


class PackedOutput(dict):
    """What :meth:`VisionTransformer.forward_packed` returns (a dict with attribute access):
    ``tokens`` (T, D), ``cu_seqlens`` (B + 1,) int32, ``grids`` [(gh, gw)] * B, ``num_prefix_tokens``,
    ``pooled`` (B, D) or None, ``logits`` (B, num_classes) or None; ``hidden_states`` (depth + 1
    packed (T, D) tensors) when asked for."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def split(self, packed: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Each image's tokens (T_p + gh * gw, D) (prefix first), views of ``tokens`` (or of another
        packed (T, D) tensor of the same layout, e.g. one of ``hidden_states``)."""
        cu = self["cu_seqlens"].tolist()
        t = self["tokens"] if packed is None else packed
        return [t[a:b] for a, b in zip(cu[:-1], cu[1:])]
