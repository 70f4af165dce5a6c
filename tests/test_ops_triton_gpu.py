"""Triton backend on a CUDA GPU: bf16 / fp16 at full ViT-B / ViT-L shapes, determinism (50 reruns
bit-identical), warmup + CUDA-graph capture. Skipped without CUDA (conftest)."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastvit import reference as R
from utils import assert_all_written, assert_close_rule

pytestmark = pytest.mark.gpu

LOWP = [torch.float16, torch.bfloat16]
# (batch, tokens, heads, head dim): ViT-B/16 @224, ViT-L/14 @224, ViT-B/16 @384, DeiT-S, ViT-H/14-ish d=80
ATTN_SHAPES = [(8, 197, 12, 64), (4, 257, 16, 64), (2, 577, 12, 64), (16, 198, 6, 64), (2, 257, 16, 80),
               (2, 1025, 8, 128), (3, 50, 12, 96), (2, 197, 24, 48), (4, 65, 8, 32)]


def _mods():
    return (importlib.import_module("fastvit.kernels.attention"), importlib.import_module("fastvit.kernels.linear"),
            importlib.import_module("fastvit.kernels.layer_norm"), importlib.import_module("fastvit.kernels.patch_embed"))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("B,N,H,d", ATTN_SHAPES)
def test_attention_full_shapes(B, N, H, d, dtype):
    att = _mods()[0]
    q, k, v = torch.randn(B, N, 3, H, d, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
    out = torch.full((B, N, H, d), float("nan"), device="cuda", dtype=dtype).transpose(1, 2)
    att.attention_fwd(q, k, v, None, out=out)
    assert_all_written(out)
    assert_close_rule(out, R.attention(q, k, v, None, upcast=True).float(), R.attention(q, k, v, None))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("M,K,N,act,ln,res", [
    (8 * 197, 768, 2304, None, True, False),     # ViT-B qkv with LN prologue
    (8 * 197, 768, 768, None, False, True),      # proj + residual
    (8 * 197, 768, 3072, "gelu", True, False),   # fc1 + LN + GELU
    (8 * 197, 3072, 768, None, False, True),     # fc2 + residual
    (4 * 257, 1024, 4096, "gelu_tanh", True, False),  # ViT-L fc1
    (7, 1024, 1000, None, False, False),         # classifier head, tiny M
])
def test_linear_full_shapes(M, K, N, act, ln, res, dtype):
    lin = _mods()[1]
    t = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    args = (t(M, K), t(N, K) * K ** -0.5, t(N), act, t(N) * 0.1, t(M, N) if res else None,
            t(K) if ln else None, t(K) if ln else None, 1e-6)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
    lin.linear_fwd(*args, out=out)
    assert_all_written(out)
    assert_close_rule(out, R.linear(*args, upcast=True).float(), R.linear(*args))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("shape", [(8 * 197, 768), (4 * 257, 1024), (3, 1664), (5, 6000)])
def test_layer_norm_full_shapes(shape, dtype):
    lnm = _mods()[2]
    x = torch.randn(*shape, device="cuda", dtype=dtype) * 2 + 1
    w, b = torch.randn(shape[-1], device="cuda", dtype=dtype), torch.randn(shape[-1], device="cuda", dtype=dtype)
    out = lnm.layer_norm_fwd(x, w, b, 1e-6)
    assert_close_rule(out, R.layer_norm(x, w, b, 1e-6, upcast=True).float(), R.layer_norm(x, w, b, 1e-6))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("P,img,D,T", [(16, 224, 768, 1), (14, 224, 1024, 5), (16, 384, 768, 2), (32, 224, 768, 1)])
def test_patch_embed_full_shapes(P, img, D, T, dtype):
    pem = _mods()[3]
    x = torch.randn(8, 3, img, img, device="cuda")
    g = img // P
    args = (x, torch.randn(D, 3, P, P, device="cuda", dtype=dtype) * 0.02, torch.randn(D, device="cuda", dtype=dtype),
            torch.randn(g * g, D, device="cuda", dtype=dtype), torch.randn(T, D, device="cuda", dtype=dtype), False)
    out = pem.patch_embed_fwd(*args)
    assert_close_rule(out, R.patch_embed(*args, upcast=True).float(), R.patch_embed(*args))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_vit_base_model(dtype):
    import fastvit

    m = fastvit.VisionTransformer(num_classes=1000, backend="torch").cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref32 = m(x)
        m = m.to(dtype)
        ref_lowp = m(x.to(dtype))
        m.backend = "triton"
        got = m(x.to(dtype))
    assert_close_rule(got, ref32, ref_lowp)


def test_fifty_reruns_bit_identical():
    import fastvit

    att, lin = _mods()[:2]
    q, k, v = torch.randn(8, 197, 3, 12, 64, device="cuda", dtype=torch.bfloat16).permute(2, 0, 3, 1, 4).unbind(0)
    x, w = torch.randn(8 * 197, 768, device="cuda", dtype=torch.bfloat16), torch.randn(2304, 768, device="cuda",
                                                                                       dtype=torch.bfloat16)
    lw = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    m = fastvit.VisionTransformer(backend="triton").cuda().eval().to(torch.bfloat16)
    img = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        first = (att.attention_fwd(q, k, v).clone(), lin.linear_fwd(x, w, None, "gelu", None, None, lw, lw),
                 m(img))
        for _ in range(49):
            again = (att.attention_fwd(q, k, v), lin.linear_fwd(x, w, None, "gelu", None, None, lw, lw), m(img))
            for a, b in zip(first, again):
                assert torch.equal(a, b), "non-deterministic rerun"


def test_warmup_then_cuda_graph_capture():
    import fastvit

    m = fastvit.VisionTransformer(depth=2, backend="triton").cuda().eval().half()
    report = fastvit.warmup(m, batch_sizes=[2], dtype=torch.float16)
    assert report["batch_sizes"] == [2]
    x = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = m(x)
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m(x)  # one more warm run on the capture stream, as torch's docs recommend
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            static_out = m(x)
        g.replay()
        torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
