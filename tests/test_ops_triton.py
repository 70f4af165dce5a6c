"""Triton backend vs the PyTorch reference, in the interpreter (CPU) or on a GPU.

CPU: ``TRITON_INTERPRET=1`` (set by conftest), float32 and float16 only (the interpreter's
bf16 is wrong, DESIGN.md 5.4), small shapes. Outputs are NaN-poisoned before the kernel runs.
Tolerances: DESIGN.md rule for 16-bit (``assert_close_rule`` against the float32 reference and
the torch reference run in the same dtype); float32 allows 1e-5 of the output scale (exact
fp32 products, different summation order).
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from fastvit import reference as R
from utils import assert_all_written, assert_close_rule

kernels = pytest.importorskip("fastvit.kernels")
att = importlib.import_module("fastvit.kernels.attention")
lin = importlib.import_module("fastvit.kernels.linear")
lnm = importlib.import_module("fastvit.kernels.layer_norm")
pem = importlib.import_module("fastvit.kernels.patch_embed")
autotune = importlib.import_module("fastvit.kernels.autotune")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]


def check(out, ref32, ref_lowp, name="out"):
    """float32: 1e-5 of the output scale; 16-bit: the DESIGN.md rule."""
    assert_all_written(out, name)
    if out.dtype == torch.float32:
        assert_close_rule(out, ref32, None, atol=1e-5 * max(1.0, ref32.abs().max().item()), name=name)
    else:
        assert_close_rule(out, ref32, ref_lowp, name=name)


def poison(*shape, dtype, device=DEV):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def qkv_views(B, N, H, d, dtype, Nkv=None):
    """q, k, v as strided (B, H, N, d) views of packed buffers, as the model passes them."""
    if Nkv is None or Nkv == N:
        qkv = torch.randn(B, N, 3, H, d, dtype=dtype, device=DEV)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = torch.randn(B, N, H, d, dtype=dtype, device=DEV).transpose(1, 2)
    kv = torch.randn(B, Nkv, 2, H, d, dtype=dtype, device=DEV).permute(2, 0, 3, 1, 4)
    return q, kv[0], kv[1]


# --------------------------------------------------------------------------- attention
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [32, 48, 64, 80, 96, 128])
@pytest.mark.parametrize("N", [1, 2, 50, 197, 257])
def test_attention(N, d, dtype):
    B, H = (3, 1) if N < 100 else (1, 1)  # odd batch where the interpreter can afford it
    q, k, v = qkv_views(B, N, H, d, dtype)
    out = poison(B, N, H, d, dtype=dtype).transpose(1, 2)
    got = att.attention_fwd(q, k, v, None, out=out)
    assert got.data_ptr() == out.data_ptr()
    check(out, R.attention(q, k, v, None, upcast=True).float(), R.attention(q, k, v, None))


def test_attention_layout_and_scale():
    """Default output is a (B, H, N, d) view of (B, N, H, d) memory; scale is honoured;
    N_kv != N and separately allocated q / k / v work."""
    q, k, v = qkv_views(2, 37, 3, 48, torch.float32, Nkv=21)
    out = kernels.attention(q, k, v, 0.3)
    assert out.shape == (2, 3, 37, 48) and out.transpose(1, 2).is_contiguous()
    check(out, R.attention(q, k, v, 0.3, upcast=True), None)
    wrong = R.attention(q, k, v, None, upcast=True)
    assert (out - wrong).abs().max() > 1e-3, "scale argument ignored"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,d", [(1, 32), (50, 80), (197, 64)])
def test_attention_probs(N, d, dtype):
    q, k, v = qkv_views(3 if N < 100 else 1, N, 2, d, dtype)
    B, H = q.shape[:2]
    out = poison(B, N, H, d, dtype=dtype).transpose(1, 2)
    probs = poison(B, H, N, N, dtype=torch.float32)
    att.attention_probs_fwd(q, k, v, None, out=out, probs=probs)
    o32, p32 = R.attention_probs(q, k, v)
    check(out, o32, R.attention(q, k, v, None))
    assert_all_written(probs, "probs")
    perr = (probs - p32).abs().max().item()
    assert perr <= (2e-6 if dtype == torch.float32 else 2e-3), f"probs max abs err {perr:.3e}"
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


# --------------------------------------------------------------------------- linear / mlp
LINEAR_SHAPES = [(1, 8, 5), (50, 40, 120), (197, 96, 288), (97, 200, 33)]  # (M, K, N): none a block multiple


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", LINEAR_SHAPES)
@pytest.mark.parametrize("act,gamma,residual,ln", [
    (None, False, False, False), (None, False, False, True), ("gelu", False, False, True),
    ("gelu_tanh", False, False, False), (None, True, True, False), ("gelu", True, True, True),
])
def test_linear(M, K, N, act, gamma, residual, ln, dtype):
    x = torch.randn(M, K, dtype=dtype, device=DEV) * 2 + 0.5  # non-zero mean: the LN prologue matters
    w = torch.randn(N, K, dtype=dtype, device=DEV) * K ** -0.5
    b = torch.randn(N, dtype=dtype, device=DEV)
    g = torch.randn(N, dtype=dtype, device=DEV) if gamma else None
    r = torch.randn(M, N, dtype=dtype, device=DEV) if residual else None
    lw = torch.randn(K, dtype=dtype, device=DEV) if ln else None
    lb = torch.randn(K, dtype=dtype, device=DEV) if ln else None
    out = poison(M, N, dtype=dtype)
    lin.linear_fwd(x, w, b, act, g, r, lw, lb, 1e-5, out=out)
    args = (x, w, b, act, g, r, lw, lb, 1e-5)
    check(out, R.linear(*args, upcast=True).float(), R.linear(*args))


def test_linear_3d_and_strided_input():
    """(B, N, K) input, a non-contiguous row stride, no bias, LN without bias."""
    base = torch.randn(3, 17, 70, device=DEV)
    x = base[..., :64]  # row stride 70, unit last stride
    w = torch.randn(24, 64, device=DEV) * 0.1
    lw = torch.randn(64, device=DEV)
    got = kernels.linear(x, w, None, None, None, None, lw, None, 1e-6)
    check(got, R.linear(x, w, None, None, None, None, lw, None, 1e-6, upcast=True), None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,D,hid", [(3, 32, 128), (197, 48, 100)])
def test_mlp(M, D, hid, dtype):
    x = torch.randn(1, M, D, dtype=dtype, device=DEV)
    f1w, f1b = torch.randn(hid, D, dtype=dtype, device=DEV) * D ** -0.5, torch.randn(hid, dtype=dtype, device=DEV)
    f2w, f2b = torch.randn(D, hid, dtype=dtype, device=DEV) * hid ** -0.5, torch.randn(D, dtype=dtype, device=DEV)
    g, r = torch.randn(D, dtype=dtype, device=DEV), torch.randn(1, M, D, dtype=dtype, device=DEV)
    lw, lb = torch.randn(D, dtype=dtype, device=DEV), torch.randn(D, dtype=dtype, device=DEV)
    args = (x, f1w, f1b, f2w, f2b, "gelu", g, r, lw, lb, 1e-6)
    out = poison(1, M, D, dtype=dtype)
    lin.mlp_fwd(*args, out=out)
    check(out, R.mlp(*args, upcast=True).float(), R.mlp(*args))


# --------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 48), (5, 768), (2, 5000)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(shape, affine, dtype):
    x = torch.randn(*shape, dtype=dtype, device=DEV) * 3 + 1
    D = shape[-1]
    w = torch.randn(D, dtype=dtype, device=DEV) if affine else None
    b = torch.randn(D, dtype=dtype, device=DEV) if affine else None
    out = poison(*shape, dtype=dtype)
    lnm.layer_norm_fwd(x, w, b, 1e-6, out=out)
    check(out, R.layer_norm(x, w, b, 1e-6, upcast=True).float(), R.layer_norm(x, w, b, 1e-6))


def test_row_stats():
    x = torch.randn(9, 300, device=DEV) * 4 + 2
    mean, rstd = lnm.row_stats(x, 1e-6)
    torch.testing.assert_close(mean, x.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(x.var(-1, unbiased=False) + 1e-6), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- patch embed
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,H,W,P,D,T,pad", [
    (1, 3, 32, 48, 16, 40, 1, False),   # non-square grid, class token
    (3, 3, 28, 42, 14, 24, 2, False),   # P=14, odd batch, cls + dist
    (2, 1, 33, 20, 8, 16, 0, True),     # padding, no prefix
    (2, 3, 64, 32, 32, 20, 5, False),   # P=32, cls + 4 registers
])
def test_patch_embed(B, C, H, W, P, D, T, pad, dtype):
    x = torch.randn(B, C, H, W, device=DEV)  # float32 image into a (maybe) 16-bit model: cast in the load
    w = torch.randn(D, C, P, P, dtype=dtype, device=DEV) * (C * P * P) ** -0.5
    b = torch.randn(D, dtype=dtype, device=DEV)
    gh, gw = (-(-H // P), -(-W // P)) if pad else (H // P, W // P)
    pos = torch.randn(gh * gw, D, dtype=dtype, device=DEV)
    pre = torch.randn(T, D, dtype=dtype, device=DEV) if T else None
    out = poison(B, T + gh * gw, D, dtype=dtype)
    pem.patch_embed_fwd(x, w, b, pos, pre, pad, out=out)
    args = (x, w, b, pos, pre, pad)
    check(out, R.patch_embed(*args, upcast=True).float(), R.patch_embed(*args))


def test_patch_embed_channels_last_no_bias_no_pos():
    x = torch.randn(2, 4, 16, 24, device=DEV).to(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 8, 8, device=DEV) * 0.1
    got = kernels.patch_embed(x, w, None, None, None, False)
    check(got, R.patch_embed(x, w, None, None, None, False, upcast=True), None)


# --------------------------------------------------------------------------- model
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_model_triton_vs_torch(dtype):
    import fastvit

    torch.manual_seed(0)
    m = fastvit.VisionTransformer(img_size=(32, 48), patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                  num_classes=10, init_values=0.1, reg_tokens=2).to(DEV).eval()
    x = torch.randn(3, 3, 32, 48, device=DEV)
    with torch.no_grad():
        ref32 = m.float()(x)
        m = m.to(dtype)
        ref_lowp = m(x.to(dtype))
        m.backend = "triton"
        got = m(x.to(dtype))
    # a whole network compounds roundings: the rule is applied to the logits with the
    # torch low-precision run as the comparison point
    if dtype == torch.float32:
        assert_close_rule(got, ref32, None, atol=1e-5 * max(1.0, ref32.abs().max().item()))
    else:
        assert_close_rule(got, ref32, ref_lowp)


def test_model_attention_probs_and_intermediates():
    import fastvit

    m = fastvit.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=0, class_token=True).to(DEV).eval()
    x = torch.randn(1, 3, 32, 32, device=DEV)
    with torch.no_grad():
        out_t, inter_t, attn_t = m.forward_intermediates(x, attn_layers=[1])
        m.backend = "triton"
        out, inter, attn = m.forward_intermediates(x, attn_layers=[1])
    torch.testing.assert_close(attn[1], attn_t[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, out_t, atol=1e-4, rtol=1e-4)


def test_warmup_runs_every_batch_size():
    import fastvit

    m = fastvit.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                                  backend="triton").to(DEV).eval()
    report = fastvit.warmup(m, batch_sizes=[1, 3])
    assert report["batch_sizes"] == [1, 3] and report["seconds"] > 0
    assert report["autotune"] is (DEV == "cuda" and autotune.autotune_enabled())
    with pytest.raises(ValueError, match="dtype"):
        fastvit.warmup(m, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="batch_sizes"):
        fastvit.warmup(m, [0])


# autograd through the registered ops: tests/test_compile.py (run in a fresh process)


# --------------------------------------------------------------------------- backend contract
def test_backend_reasons():
    assert kernels.unsupported("attention", head_dim=512, dtype=torch.float16) is not None
    assert "512" in kernels.unsupported("attention", head_dim=512)
    assert kernels.unsupported("linear", K=64, N=64, dtype=torch.float16) is None
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert "interpreter" in kernels.unsupported("linear", dtype=torch.bfloat16)
        assert kernels.availability(torch.device("cpu")) is None


def test_explicit_triton_backend_refuses_bf16_in_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter only")
    from fastvit import backends, ops

    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(backends.BackendUnavailable, match="bfloat16"):
        ops.layer_norm(x, None, None, backend="triton")


# --------------------------------------------------------------------------- autotune
def test_configs_keep_and_heuristics():
    """keep() prunes by shared memory and problem size; heuristics are always valid configs."""
    for mod, keys in ((att, [(256, 256, 64, "float16", False), (16, 16, 128, "float32", True)]),
                      (lin, [(8192, 2304, 768, "float16", "101011"), (16, 10, 768, "float32", "100000")]),
                      (pem, [(8192, 768, 768, (16, 16), "float16", "110")]),
                      (lnm, [(768, "float16", "y"), (5000, "float32", "stats")])):
        tun = [t for t in vars(mod).values() if isinstance(t, autotune.Tunable)]
        assert tun
        for key in keys:
            cands = tun[0].candidates(key)
            assert cands and len(set(cands)) == len(cands)
            assert all(c in mod._configs() or c == mod.heuristic(key) for c in cands)
    # float32 halves what fits: a 3-stage 128x256x64 tile is 288 KiB in fp32, never kept
    big = autotune.Config.make(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8)
    assert lin.keep(big, (8192, 4096, 4096, "float16", "x")) and not lin.keep(big, (8192, 4096, 4096, "float32", "x"))
    # tiny M never gets a 128-row tile
    assert all(c["BLOCK_M"] <= 32 for c in lin.TUNE.candidates((16, 768, 768, "float16", "x")))


def test_heuristic_mode_in_interpreter(monkeypatch):
    """No tuning in the interpreter / with FASTVIT_AUTOTUNE=0: the heuristic config is used."""
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "0")
    assert not autotune.autotune_enabled()
    calls = []
    t = autotune.Tunable("probe", lambda: [autotune.Config.make(4, 2, B=1), autotune.Config.make(4, 2, B=2)],
                         lambda c, k: True, lambda k: autotune.Config.make(4, 2, B=7))
    assert t.pick(("k",), torch.device("cuda", 0), calls.append)["B"] == 7
    assert not calls


def test_disk_cache_roundtrip(tmp_path, monkeypatch):
    """A tuned choice is persisted per GPU name / key and read back by a fresh process state."""
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(autotune, "_device_name", lambda dev: "FakeGPU_X")
    monkeypatch.setattr(autotune, "in_capture", lambda: False)
    cfgs = [autotune.Config.make(4, 2, B=1), autotune.Config.make(8, 3, B=2)]
    t = autotune.Tunable("probe", lambda: cfgs, lambda c, k: True, lambda k: cfgs[0])
    monkeypatch.setattr(t, "_tune", lambda key, run: cfgs[1])
    autotune.clear_memory_cache()
    dev = torch.device("cuda", 0)
    assert t.pick((197, 64, "float16"), dev, lambda c: None) == cfgs[1]
    path = autotune.cache_path(dev)
    assert "FakeGPU_X" in os.path.basename(path)
    saved = json.load(open(path))
    assert saved == {"probe|197|64|float16": cfgs[1].to_json()}
    autotune.clear_memory_cache()
    monkeypatch.setattr(t, "_tune", lambda key, run: pytest.fail("re-tuned despite the disk cache"))
    assert t.pick((197, 64, "float16"), dev, lambda c: None) == cfgs[1]
    autotune.clear_memory_cache()


def test_no_tuning_during_graph_capture(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(autotune, "_device_name", lambda dev: "FakeGPU_Y")
    monkeypatch.setattr(autotune, "in_capture", lambda: True)
    h = autotune.Config.make(4, 2, B=5)
    t = autotune.Tunable("probe2", lambda: [h], lambda c, k: True, lambda k: h)
    monkeypatch.setattr(t, "_tune", lambda key, run: pytest.fail("tuned inside a CUDA graph capture"))
    autotune.clear_memory_cache()
    assert t.pick((1,), torch.device("cuda", 0), lambda c: None) == h
    assert not os.path.exists(autotune.cache_path(torch.device("cuda", 0)))
    autotune.clear_memory_cache()


def test_key_ignores_batch_alone():
    """Batch sizes within one M bucket share a key; the sequence bucket changes it."""
    assert lin._m_bucket(8 * 197) == lin._m_bucket(9 * 197 - 100)
    q1 = torch.empty(2, 3, 197, 64)
    q2 = torch.empty(64, 3, 197, 64)
    assert att._key(q1, q1, False) == att._key(q2, q2, False)
    assert att._key(q1, q1, False) != att._key(torch.empty(2, 3, 577, 64), torch.empty(2, 3, 577, 64), False)
