"""The torch backend (reference ops): semantics against independent formulations, the output
layout contract, and validation errors (argument, expected, actual)."""

import pytest
import torch
import torch.nn.functional as F

from fastvit import ops, reference
from utils import assert_close_rule

DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)]


def _manual_attention(q, k, v, scale):
    s = torch.einsum("bhnd,bhmd->bhnm", q.double(), k.double()) * scale
    return torch.einsum("bhnm,bhmd->bhnd", s.softmax(-1), v.double())


@pytest.mark.parametrize("N", [1, 2, 50, 197])
@pytest.mark.parametrize("d", [32, 48, 80])
def test_attention_matches_math_and_layout(N, d):
    B, H = 3, 2
    qkv = torch.randn(B, N, 3, H, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as the model passes them
    out = ops.attention(q, k, v, backend="torch")
    ref = _manual_attention(q, k, v, d ** -0.5)
    assert (out.double() - ref).abs().max() < 1e-5
    assert out.shape == (B, H, N, d)
    assert out.transpose(1, 2).is_contiguous(), "output must be a (B, H, N, d) view of (B, N, H, d) memory"
    up = reference.attention(q, k, v, upcast=True)
    assert (up.double() - ref).abs().max() < 1e-5
    out2 = ops.attention(q, k, v, scale=0.3, backend="torch")
    assert (out2.double() - _manual_attention(q, k, v, 0.3)).abs().max() < 1e-5


@pytest.mark.parametrize("dtype,_tol", DTYPES)
def test_attention_low_precision_rule(dtype, _tol):
    q, k, v = (torch.randn(2, 3, 33, 64) for _ in range(3))
    ref32 = reference.attention(q, k, v, upcast=True)
    out = ops.attention(q.to(dtype), k.to(dtype), v.to(dtype), backend="torch")
    assert out.dtype == dtype
    lowp = reference.attention(q.to(dtype), k.to(dtype), v.to(dtype), upcast=True)
    assert_close_rule(out, ref32, lowp if dtype != torch.float32 else None, atol=1e-6)


def test_attention_probs_rows_and_output():
    q, k, v = (torch.randn(2, 4, 10, 32) for _ in range(3))
    out, p = ops.attention_probs(q, k, v, backend="torch")
    assert p.shape == (2, 4, 10, 10) and p.dtype == torch.float32
    assert torch.allclose(p.sum(-1), torch.ones(2, 4, 10), atol=1e-6)
    assert torch.allclose(out, p @ v, atol=1e-6)
    assert torch.allclose(out, ops.attention(q, k, v, backend="torch"), atol=1e-5)


@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("with_ln,with_gamma,with_res,with_bias", [
    (False, False, False, True), (True, False, False, True), (False, True, True, True), (True, True, True, False)])
def test_linear_epilogues(act, with_ln, with_gamma, with_res, with_bias):
    B, N, K, M = 3, 7, 24, 40
    x = torch.randn(B, N, K).double()
    w, b = torch.randn(M, K).double(), torch.randn(M).double() if with_bias else None
    g = torch.randn(M).double() if with_gamma else None
    r = torch.randn(B, N, M).double() if with_res else None
    lw, lb = (torch.randn(K).double(), torch.randn(K).double()) if with_ln else (None, None)
    # independent formulation
    h = x
    if with_ln:
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-6) * lw + lb
    y = h @ w.T + (b if b is not None else 0)
    if act == "gelu":
        y = 0.5 * y * (1 + torch.erf(y / 2 ** 0.5))
    elif act == "gelu_tanh":
        y = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3)))
    if g is not None:
        y = y * g
    if r is not None:
        y = y + r
    f = lambda t: None if t is None else t.float()  # noqa: E731
    out = ops.linear(f(x), f(w), f(b), act, f(g), f(r), f(lw), f(lb), 1e-6, backend="torch")
    assert (out.double() - y).abs().max() < 1e-4 * max(1, y.abs().max().item())


def test_mlp_is_two_linears():
    x = torch.randn(2, 5, 16)
    w1, b1, w2, b2 = torch.randn(64, 16), torch.randn(64), torch.randn(16, 64), torch.randn(16)
    g, r, lw, lb = torch.randn(16), torch.randn(2, 5, 16), torch.randn(16), torch.randn(16)
    out = ops.mlp(x, w1, b1, w2, b2, "gelu", g, r, lw, lb, 1e-5, backend="torch")
    h = F.gelu(F.linear(F.layer_norm(x, (16,), lw, lb, 1e-5), w1, b1))
    assert torch.allclose(out, F.linear(h, w2, b2) * g + r, atol=1e-4)


def test_layer_norm_matches_torch():
    x = torch.randn(4, 9, 33)
    w, b = torch.randn(33), torch.randn(33)
    assert torch.allclose(ops.layer_norm(x, w, b, 1e-6, backend="torch"), F.layer_norm(x, (33,), w, b, 1e-6))


@pytest.mark.parametrize("C,P,H,W", [(3, 16, 32, 48), (1, 14, 28, 14), (4, 8, 24, 16), (3, 32, 64, 32)])
def test_patch_embed_matches_unfold(C, P, H, W):
    B, D, T = 2, 24, 3
    x = torch.randn(B, C, H, W)
    w, b = torch.randn(D, C, P, P), torch.randn(D)
    gh, gw = H // P, W // P
    pos, prefix = torch.randn(gh * gw, D), torch.randn(T, D)
    out = ops.patch_embed(x, w, b, pos, prefix, backend="torch")
    cols = F.unfold(x, P, stride=P).transpose(1, 2)  # (B, gh*gw, C*P*P), row-major grid
    tokens = cols @ w.reshape(D, -1).T + b + pos
    want = torch.cat([prefix.expand(B, T, D), tokens], 1)
    assert out.shape == (B, T + gh * gw, D) and out.is_contiguous()
    assert torch.allclose(out, want, atol=1e-4)


def test_patch_embed_pad_and_cast():
    x = torch.randn(1, 3, 20, 13, dtype=torch.float16)
    w = torch.randn(8, 3, 8, 8)
    out = ops.patch_embed(x, w, None, None, None, True, backend="torch")
    assert out.shape == (1, 3 * 2, 8) and out.dtype == torch.float32
    xp = F.pad(x.float(), (0, 3, 0, 4))
    assert torch.allclose(out, F.conv2d(xp, w, stride=8).flatten(2).transpose(1, 2), atol=1e-4)


def test_patch_embed_pad_image_smaller_than_patch():
    # padded, an image smaller than one patch is exactly one patch
    assert ops.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(8, 3, 16, 16), pad=True).shape == (1, 1, 8)


def test_resample_pos_embed_identity_and_shape():
    pos = torch.randn(4 * 6, 16)
    assert reference.resample_pos_embed(pos, (4, 6), (4, 6)) is pos
    out = reference.resample_pos_embed(pos.half(), (8, 3), (4, 6))
    assert out.shape == (24, 16) and out.dtype == torch.float16
    const = torch.ones(4 * 6, 16)  # bicubic keeps a constant field constant
    assert torch.allclose(reference.resample_pos_embed(const, (7, 9), (4, 6), antialias=False), torch.ones(63, 16),
                          atol=1e-5)


# ------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: ops.attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError,
     r"q: expected a 4-D tensor, got shape \(2, 3, 4\)"),
    (lambda: ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)), ValueError,
     r"k: expected shape \(1, 2, N_kv, 8\)"),
    (lambda: ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8).half(), torch.randn(1, 2, 4, 8)),
     TypeError, r"k: expected dtype torch.float32 \(as q\), got dtype torch.float16"),
    (lambda: ops.attention(torch.randn(1, 2, 8, 4).transpose(-1, -2), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)),
     ValueError, r"q: expected a last dim with stride 1"),
    (lambda: ops.attention(torch.randn(1, 1, 2, 300), torch.randn(1, 1, 2, 300), torch.randn(1, 1, 2, 300)),
     ValueError, r"q: expected head dim <= 256, got head dim 300"),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 9)), ValueError, r"x: expected last dim 9"),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), ValueError,
     r"bias: expected shape \(4,\), got shape \(5,\)"),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 8), act="relu"), ValueError, r"act: expected one of"),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 8), residual=torch.randn(3, 4)), ValueError,
     r"residual: expected shape \(2, 4\), got shape \(3, 4\)"),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 8), ln_bias=torch.randn(8)), ValueError,
     r"ln_weight: expected a tensor when ln_bias is given"),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 8), gamma=torch.randn(8)), ValueError,
     r"gamma: expected shape \(4,\), got shape \(8,\)"),
    (lambda: ops.linear(torch.randn(2, 8), "w"), TypeError, r"weight: expected a torch.Tensor, got str"),
    (lambda: ops.mlp(torch.randn(2, 8), torch.randn(16, 8), None, torch.randn(8, 15), None), ValueError,
     r"fc2_weight: expected shape \(D_out, 16\), got shape \(8, 15\)"),
    (lambda: ops.layer_norm(torch.randn(2, 8), torch.randn(7), None), ValueError,
     r"weight: expected shape \(8,\), got shape \(7,\)"),
    (lambda: ops.patch_embed(torch.randn(1, 3, 30, 32), torch.randn(8, 3, 16, 16)), ValueError,
     r"x: expected height and width multiples of the patch size \(16, 16\).*got image size \(30, 32\)"),
    (lambda: ops.patch_embed(torch.randn(1, 3, 32, 32), torch.randn(8, 3, 16, 16), pos_embed=torch.randn(5, 8)),
     ValueError, r"pos_embed: expected shape \(4, 8\), got shape \(5, 8\)"),
    (lambda: ops.patch_embed(torch.randn(1, 3, 32, 32), torch.randn(8, 3, 16, 16), prefix=torch.randn(1, 7)),
     ValueError, r"prefix: expected shape \(T, 8\), got shape \(1, 7\)"),
    (lambda: ops.attention(*(torch.randn(1, 1, 2, 8),) * 3, backend="tensorrt"), ValueError,
     r"backend: expected one of \('triton', 'cuda', 'torch', 'auto'\) or None, got 'tensorrt'"),
])
def test_validation_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
