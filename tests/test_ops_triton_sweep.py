"""Seeded randomized shape sweep of every Triton op: >= 200 cases per op, 0 failures allowed.

Tiny sizes so the interpreter runs it in about a minute. Each case also draws a random launch
config from the kernel's full ``_configs()`` list (not only what ``keep()`` would pick for the
shape), so every tile shape's masking / clamping logic meets odd sizes: N and K below, at and
just above the tile, d not a power of two, K not a multiple of BLOCK_K, padded images.
Outputs are NaN-poisoned; failures are collected and reported together with their case.
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch

from fastvit import reference as R
from utils import assert_all_written, assert_close_rule

pytest.importorskip("fastvit.kernels")
att = importlib.import_module("fastvit.kernels.attention")
lin = importlib.import_module("fastvit.kernels.linear")
lnm = importlib.import_module("fastvit.kernels.layer_norm")
pem = importlib.import_module("fastvit.kernels.patch_embed")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CASES = 200


def _check(out, ref32, ref_lowp):
    assert_all_written(out)
    if out.dtype == torch.float32:
        assert_close_rule(out, ref32, None, atol=1e-5 * max(1.0, ref32.abs().max().item()))
    else:
        assert_close_rule(out, ref32, ref_lowp)


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _maybe(rng, t, p=0.5):
    return t if rng.random() < p else None


def case_attention(rng: random.Random, probs: bool):
    dtype = rng.choice([torch.float32, torch.float16])
    # the interpreter's cost is per program (B * H * q blocks): mostly one head, sometimes 3
    B, H = rng.choice([(1, 1), (1, 1), (2, 1), (1, 2), (3, 1)])
    N = rng.randint(1, 24 if probs else 40)
    Nkv = N if rng.random() < 0.7 else rng.randint(1, 40)
    d = rng.choice([8, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128])
    scale = rng.choice([None, 0.05, 0.5])
    if Nkv == N and rng.random() < 0.7:
        q, k, v = torch.randn(B, N, 3, H, d, dtype=dtype, device=DEV).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = torch.randn(B, H, N, d, dtype=dtype, device=DEV)
        k, v = (torch.randn(B, H, Nkv, d, dtype=dtype, device=DEV) for _ in range(2))
    cfg = rng.choice(att._configs())
    desc = f"B={B} H={H} N={N} Nkv={Nkv} d={d} scale={scale} {dtype} {cfg}"

    def run():
        out = _nan(B, N, H, d, dtype=dtype).transpose(1, 2)
        if probs:
            p = _nan(B, H, N, Nkv, dtype=torch.float32)
            att.attention_probs_fwd(q, k, v, scale, out=out, probs=p, config=cfg)
            o32, p32 = R.attention_probs(q, k, v, scale)
            assert_all_written(p, "probs")
            perr = (p - p32).abs().max().item()
            assert perr <= (5e-6 if dtype == torch.float32 else 2e-3), f"probs max abs err {perr:.3e}"
        else:
            att.attention_fwd(q, k, v, scale, out=out, config=cfg)
            o32 = R.attention(q, k, v, scale, upcast=True)
        _check(out, o32.float(), R.attention(q, k, v, scale))

    return desc, run


def case_linear(rng: random.Random):
    dtype = rng.choice([torch.float32, torch.float16])
    M, K, N = rng.randint(1, 40), rng.randint(1, 80), rng.randint(1, 80)
    lead = rng.choice([(M,), (1, M), (M, 1)])
    x = torch.randn(*lead, K, dtype=dtype, device=DEV) + rng.choice([0.0, 1.0])
    w = torch.randn(N, K, dtype=dtype, device=DEV) * K ** -0.5
    t = lambda *s: torch.randn(*s, dtype=dtype, device=DEV)  # noqa: E731
    b, g = _maybe(rng, t(N)), _maybe(rng, t(N))
    r = _maybe(rng, t(*lead, N))
    lw = _maybe(rng, t(K))
    lb = _maybe(rng, t(K)) if lw is not None else None
    act = rng.choice([None, "gelu", "gelu_tanh"])
    cfg = rng.choice(lin._configs())
    args = (x, w, b, act, g, r, lw, lb, 1e-5)
    desc = (f"x{tuple(x.shape)} N={N} bias={b is not None} act={act} gamma={g is not None} res={r is not None} "
            f"ln={lw is not None}/{lb is not None} {dtype} {cfg}")

    def run():
        out = _nan(*lead, N, dtype=dtype)
        lin.linear_fwd(*args, out=out, config=cfg)
        _check(out, R.linear(*args, upcast=True).float(), R.linear(*args))

    return desc, run


def case_mlp(rng: random.Random):
    dtype = rng.choice([torch.float32, torch.float16])
    M, D, Hd, Do = rng.randint(1, 20), rng.randint(1, 40), rng.randint(1, 72), rng.randint(1, 40)
    t = lambda *s: torch.randn(*s, dtype=dtype, device=DEV)  # noqa: E731
    x = t(M, D)
    lw = _maybe(rng, t(D))
    args = (x, t(Hd, D) * D ** -0.5, _maybe(rng, t(Hd)), t(Do, Hd) * Hd ** -0.5, _maybe(rng, t(Do)),
            rng.choice(["gelu", "gelu_tanh", None]), _maybe(rng, t(Do)), _maybe(rng, t(M, Do)),
            lw, _maybe(rng, t(D)) if lw is not None else None, 1e-6)
    desc = f"M={M} D={D} hidden={Hd} D_out={Do} act={args[5]} {dtype}"

    def run():
        out = _nan(M, Do, dtype=dtype)
        lin.mlp_fwd(*args, out=out)
        _check(out, R.mlp(*args, upcast=True).float(), R.mlp(*args))

    return desc, run


def case_layer_norm(rng: random.Random):
    dtype = rng.choice([torch.float32, torch.float16])
    M, D = rng.randint(1, 20), rng.randint(1, 300)
    x = torch.randn(M, D, dtype=dtype, device=DEV) * rng.choice([1.0, 10.0]) + rng.choice([0.0, 5.0])
    w = _maybe(rng, torch.randn(D, dtype=dtype, device=DEV), 0.7)
    b = _maybe(rng, torch.randn(D, dtype=dtype, device=DEV), 0.7)
    eps = rng.choice([1e-6, 1e-5, 1e-12])
    cfg = rng.choice(lnm._configs())
    desc = f"M={M} D={D} w={w is not None} b={b is not None} eps={eps} {dtype} {cfg}"

    def run():
        out = _nan(M, D, dtype=dtype)
        lnm.layer_norm_fwd(x, w, b, eps, out=out, config=cfg)
        _check(out, R.layer_norm(x, w, b, eps, upcast=True).float(), R.layer_norm(x, w, b, eps))

    return desc, run


def case_patch_embed(rng: random.Random):
    dtype = rng.choice([torch.float32, torch.float16])
    B, C = rng.randint(1, 3), rng.randint(1, 4)
    ph, pw = rng.choice([(2, 2), (4, 4), (8, 8), (14, 14), (16, 16), (4, 8)])
    gh, gw = rng.randint(1, 4), rng.randint(1, 4)
    pad = rng.random() < 0.3
    H = gh * ph - (rng.randint(0, ph - 1) if pad else 0)
    W = gw * pw - (rng.randint(0, pw - 1) if pad else 0)
    D, T = rng.randint(1, 40), rng.choice([0, 0, 1, 2, 5])
    x = torch.randn(B, C, H, W, device=DEV, dtype=rng.choice([torch.float32, dtype]))
    if rng.random() < 0.3:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(D, C, ph, pw, dtype=dtype, device=DEV) * (C * ph * pw) ** -0.5
    b = _maybe(rng, torch.randn(D, dtype=dtype, device=DEV), 0.7)
    pos = _maybe(rng, torch.randn(gh * gw, D, dtype=dtype, device=DEV), 0.7)
    pre = torch.randn(T, D, dtype=dtype, device=DEV) if T else None
    cfg = rng.choice(pem._configs())
    args = (x, w, b, pos, pre, pad)
    desc = f"x{tuple(x.shape)} {x.dtype} P={(ph, pw)} pad={pad} D={D} T={T} {dtype} {cfg}"

    def run():
        out = _nan(B, T + gh * gw, D, dtype=dtype)
        pem.patch_embed_fwd(*args, out=out, config=cfg)
        _check(out, R.patch_embed(*args, upcast=True).float(), R.patch_embed(*args))

    return desc, run


SWEEPS = {
    "attention": lambda rng: case_attention(rng, False),
    "attention_probs": lambda rng: case_attention(rng, True),
    "linear": case_linear,
    "mlp": case_mlp,
    "layer_norm": case_layer_norm,
    "patch_embed": case_patch_embed,
}


@pytest.mark.parametrize("op", list(SWEEPS))
def test_random_sweep(op):
    rng = random.Random(f"fastvit-sweep-{op}")  # seeded per op: reruns see the same cases
    torch.manual_seed(1234)
    failures = []
    for i in range(CASES):
        desc, run = SWEEPS[op](rng)
        try:
            run()
        except AssertionError as e:
            failures.append(f"case {i}: {desc}\n    {str(e).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {CASES} {op} cases failed:\n" + "\n".join(failures[:10])
