"""Internals of the triton backend (fastvit.kernels) that no op contract states.

Op correctness on every backend lives in tests/test_op_<op>.py; compile-ability, spills and
wgmma of every config in tests/test_aot.py. Here: launchers write a caller's ``out=`` buffer;
the declared limits and the reasons derived from them; config pruning (``keep()``) and
heuristics on real shape keys (recorded from the launchers); heuristic mode without tuning;
the on-disk tuning cache; no tuning / compiling inside a CUDA-graph capture; tuning keys
ignore the batch within a bucket; LayerNorm row statistics; fastvit.warmup; attention
probabilities and intermediates of a model (the triton-only attention_probs path); warmup then
CUDA-graph capture (GPU).
"""

import importlib
import json
import os

import pytest
import torch

import fastvit
from fastvit import backends, ops
from utils import DEV, TOLERANCES, assert_all_written, assert_close_rule, check_op, require

kernels = pytest.importorskip("fastvit.kernels")
att = importlib.import_module("fastvit.kernels.attention")
lin = importlib.import_module("fastvit.kernels.linear")
lnm = importlib.import_module("fastvit.kernels.layer_norm")
pem = importlib.import_module("fastvit.kernels.patch_embed")
autotune = importlib.import_module("fastvit.kernels.autotune")


@pytest.fixture(autouse=True)
def _triton_runs_here():
    require("triton", None, dtype=torch.float32)


# --------------------------------------------------------------------------- launchers
def test_launchers_write_the_given_out():
    """``out=`` is written in place (any strides with a unit last stride) and returned."""
    q, k, v = torch.randn(3, 21, 3, 2, 32, device=DEV).permute(2, 0, 3, 1, 4).unbind(0)
    out = torch.full((3, 21, 2, 32), float("nan"), device=DEV).transpose(1, 2)
    assert att.attention_fwd(q, k, v, None, out=out) is out
    check_op("attention", "triton", (q, k, v, None), out, *TOLERANCES[torch.float32])
    probs = torch.full((3, 2, 21, 21), float("nan"), device=DEV)
    o2, p2 = att.attention_probs_fwd(q, k, v, 0.2, out=torch.empty_like(out), probs=probs)
    assert p2 is probs
    check_op("attention_probs", "triton", (q, k, v, 0.2), (o2, p2), *TOLERANCES[torch.float32])
    x = torch.randn(5, 40, device=DEV)
    y = torch.full((5, 40), float("nan"), device=DEV)
    assert lnm.layer_norm_fwd(x, None, None, 1e-6, out=y) is y
    assert_all_written(y)


# --------------------------------------------------------------------------- limits and reasons
def test_backend_reasons_come_from_its_limits():
    lim = backends.limits("triton")
    assert lim is kernels.LIMITS and lim.name == "triton" and set(lim.ops) == set(fastvit.facts.OPS)
    cpu = torch.device("cpu")
    big = backends.reasons("triton", "attention", DEV, dtype=torch.float16, head_dim=512)
    assert any("head dim <= 256, got 512" in r for r in big), big
    assert backends.reasons("triton", "linear", DEV, dtype=torch.float16, act="gelu") == []
    if os.environ.get("TRITON_INTERPRET") == "1":
        bf16 = backends.reasons("triton", "linear", cpu, dtype=torch.bfloat16)
        assert any("bfloat16 is not run by the Triton interpreter" in r for r in bf16), bf16
        assert backends.reasons("triton", None, cpu) == []
    else:  # on a GPU: the float32 attention head-dim limit (register-bound tiles)
        r = backends.reasons("triton", "attention", torch.device("cuda"), dtype=torch.float32, head_dim=128)
        assert any(f"head dim <= {att.FP32_MAX_HEAD_DIM} on a GPU" in s for s in r), r


def test_explicit_triton_backend_refuses_bf16_in_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter only")
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(backends.BackendUnavailable, match="backend 'triton' cannot run layer_norm on cpu: "
                                                          "bfloat16 is not run by the Triton interpreter"):
        ops.layer_norm(x, None, None, backend="triton")


# --------------------------------------------------------------------------- autotune
class _Key(Exception):
    pass


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def key_of(tunable, launch, mp):
    """The shape key ``launch()`` asks ``tunable`` for (recorded on meta tensors, nothing runs)."""
    def pick(key, device, run):
        raise _Key(key)

    with mp.context() as m:
        m.setattr(tunable, "pick", pick)
        m.setattr(lnm, "_ln_fwd", _NoLaunch())  # the LN prologue's row statistics
        try:
            launch()
        except _Key as e:
            return e.args[0]
    raise AssertionError(f"{tunable.name}: the launcher asked for no config")


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_configs_keep_and_heuristics(monkeypatch):
    """keep() prunes by shared memory and problem size; candidates are unique configs of the
    kernel's list or its heuristic; on keys recorded from the launchers at ViT shapes."""
    autotune.set_target(90)  # prune for sm_90 whatever this machine is
    try:
        _check_keep_and_heuristics(monkeypatch)
    finally:
        autotune.set_target(None)


def _check_keep_and_heuristics(mp):
    qkv = _meta(64, 257, 3, 12, 64).permute(2, 0, 3, 1, 4).unbind(0)
    q32 = _meta(2, 4, 16, 128, dtype=torch.float32)
    cases = [  # (tunable, kernel module, shape keys)
        (att.TUNE_FWD, att, [key_of(att.TUNE_FWD, lambda: att.attention_fwd(*qkv), mp),
                             key_of(att.TUNE_FWD, lambda: att.attention_fwd(q32, q32, q32), mp)]),
        (att.TUNE_PROBS, att, [key_of(att.TUNE_PROBS, lambda: att.attention_probs_fwd(*qkv), mp)]),
        (lin.TUNE, lin, [key_of(lin.TUNE, lambda: lin.linear_fwd(_meta(8192, 768), _meta(2304, 768), _meta(2304),
                                                                 "gelu", None, _meta(8192, 2304), _meta(768),
                                                                 _meta(768)), mp),
                         key_of(lin.TUNE, lambda: lin.linear_fwd(_meta(16, 768, dtype=torch.float32),
                                                                 _meta(10, 768, dtype=torch.float32)), mp)]),
        (pem.TUNE, pem, [key_of(pem.TUNE, lambda: pem.patch_embed_fwd(_meta(32, 3, 224, 224, dtype=torch.float32),
                                                                      _meta(768, 3, 16, 16), _meta(768),
                                                                      _meta(196, 768), _meta(1, 768)), mp)]),
        (lnm.TUNE, lnm, [key_of(lnm.TUNE, lambda: lnm.layer_norm_fwd(_meta(8, 768), _meta(768), _meta(768)), mp),
                         key_of(lnm.TUNE, lambda: lnm.row_stats(_meta(4, 5000, dtype=torch.float32), 1e-6), mp)]),
    ]
    for tun, mod, ks in cases:
        for key in ks:
            cands = tun.candidates(key)
            assert cands and len(set(cands)) == len(cands), (tun.name, key, cands)
            assert all(c in mod._configs() or c == mod.heuristic(key) for c in cands), (tun.name, key)
    # float32 halves what fits: a 3-stage 128x256x64 tile is 288 KiB in fp32, never kept
    big = autotune.Config.make(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8)
    k16 = key_of(lin.TUNE, lambda: lin.linear_fwd(_meta(8192, 4096), _meta(4096, 4096)), mp)
    k32 = key_of(lin.TUNE, lambda: lin.linear_fwd(_meta(8192, 4096, dtype=torch.float32),
                                                  _meta(4096, 4096, dtype=torch.float32)), mp)
    assert lin.keep(big, k16) and not lin.keep(big, k32)
    # tiny M never gets a 128-row tile
    tiny = key_of(lin.TUNE, lambda: lin.linear_fwd(_meta(16, 768), _meta(768, 768)), mp)
    assert all(c["BLOCK_M"] <= 32 for c in lin.TUNE.candidates(tiny))


@pytest.fixture
def scratch_tunables(monkeypatch):
    """Probe Tunables register in a copy of autotune.TUNABLES, dropped after the test."""
    monkeypatch.setattr(autotune, "TUNABLES", list(autotune.TUNABLES))


def test_heuristic_mode_in_interpreter(monkeypatch, scratch_tunables):
    """No tuning in the interpreter / with FASTVIT_AUTOTUNE=0: the heuristic config is used."""
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "0")
    monkeypatch.setattr(autotune, "in_capture", lambda: False)
    assert not autotune.autotune_enabled()
    calls = []
    t = autotune.Tunable("probe", lambda: [autotune.Config.make(4, 2, B=1), autotune.Config.make(4, 2, B=2)],
                         lambda c, k: True, lambda k: autotune.Config.make(4, 2, B=7))
    assert t.pick(("k",), torch.device("cuda", 0), calls.append)["B"] == 7
    assert not calls


def test_disk_cache_roundtrip(tmp_path, monkeypatch, scratch_tunables):
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
    with open(path) as f:
        assert json.load(f) == {"probe|197|64|float16": cfgs[1].to_json()}
    autotune.clear_memory_cache()
    monkeypatch.setattr(t, "_tune", lambda key, run: pytest.fail("re-tuned despite the disk cache"))
    assert t.pick((197, 64, "float16"), dev, lambda c: None) == cfgs[1]
    autotune.clear_memory_cache()


def test_no_tuning_during_graph_capture(tmp_path, monkeypatch, scratch_tunables):
    """Inside a capture nothing is tuned, compiled or written: a shape that never ran eagerly
    raises NotWarmedUp before any launch; one chosen eagerly before keeps its choice."""
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(autotune, "_device_name", lambda dev: "FakeGPU_Y")
    capturing = [False]
    monkeypatch.setattr(autotune, "in_capture", lambda: capturing[0])
    h, tuned = autotune.Config.make(4, 2, B=5), autotune.Config.make(8, 2, B=6)
    t = autotune.Tunable("probe2", lambda: [h, tuned], lambda c, k: True, lambda k: h)
    dev = torch.device("cuda", 0)
    autotune.clear_memory_cache()
    monkeypatch.setattr(t, "_tune", lambda key, run: pytest.fail("tuned inside a CUDA graph capture"))
    launched = []
    capturing[0] = True
    with pytest.raises(autotune.NotWarmedUp, match=r"probe2 kernel .* fastvit.warmup"):
        t.pick((1,), dev, launched.append)
    assert not launched and not os.path.exists(autotune.cache_path(dev))
    capturing[0] = False
    monkeypatch.setattr(t, "_tune", lambda key, run: tuned)
    assert t.pick((2,), dev, launched.append) == tuned  # eager: tuned and remembered
    capturing[0] = True
    monkeypatch.setattr(t, "_tune", lambda key, run: pytest.fail("tuned inside a CUDA graph capture"))
    assert t.pick((2,), dev, launched.append) == tuned
    autotune.clear_memory_cache()


def test_key_ignores_batch_alone():
    """Batch sizes within one bucket share a key; the sequence bucket changes it."""
    assert lin._m_bucket(8 * 197) == lin._m_bucket(9 * 197 - 100)
    q = lambda B, N=197: torch.empty(B, 3, N, 64, device="meta")  # noqa: E731
    assert att._key(q(9), q(9), False) == att._key(q(10), q(10), False)  # 27 and 30 heads: one bucket
    assert att._key(q(512), q(512), False) == att._key(q(2048), q(2048), False)  # past the cap
    assert att._key(q(2), q(2), False) != att._key(q(2, 577), q(2, 577), False)


def test_row_stats():
    x = torch.randn(9, 300, device=DEV) * 4 + 2
    mean, rstd = lnm.row_stats(x, 1e-6)
    xd = x.double()
    atol, rtol = TOLERANCES[torch.float32]
    assert_close_rule(mean, xd.mean(-1), None, atol=atol, rtol=rtol, name="mean")
    assert_close_rule(rstd, torch.rsqrt(xd.var(-1, unbiased=False) + 1e-6), None, atol=atol, rtol=rtol, name="rstd")


# --------------------------------------------------------------------------- model-level (triton only)
def test_warmup_runs_every_batch_size():
    m = fastvit.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                                  backend="triton").to(DEV).eval()
    report = fastvit.warmup(m, batch_sizes=[1, 3])
    assert report["batch_sizes"] == [1, 3] and report["seconds"] > 0
    assert report["autotune"] is (DEV.type == "cuda" and autotune.autotune_enabled())
    with pytest.raises(ValueError, match="dtype"):
        fastvit.warmup(m, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="batch_sizes"):
        fastvit.warmup(m, [0])


def test_model_attention_probs_and_intermediates():
    """forward_intermediates with attention maps goes through attention_probs (no cuda kernel)."""
    m = fastvit.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=0, class_token=True).to(DEV).eval()
    x = torch.randn(1, 3, 32, 32, device=DEV)
    with torch.no_grad():
        out_t, inter_t, attn_t = m.forward_intermediates(x, attn_layers=[1])
        m.backend = "triton"
        out, inter, attn = m.forward_intermediates(x, attn_layers=[1])
    torch.testing.assert_close(attn[1], attn_t[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, out_t, atol=1e-4, rtol=1e-4)
    for a, b in zip(inter, inter_t):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_warmup_then_cuda_graph_capture():
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


class _Recorder:
    """Stands in for a Triton kernel: records each launch's grid and keyword arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


@pytest.mark.parametrize("op", ["attention", "linear", "layer_norm", "mlp"])
def test_bound_launchers_match_the_generic_ones(op, monkeypatch):
    """fastvit.ops binds a launcher per call signature (<op>_for): it launches what the generic
    launcher launches (same grid, scalars, constexprs and config), picks a config once, and
    picks again after clear_memory_cache."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, w, b, lnw, lnb = r(2, 7, 32), r(48, 32), r(48), r(32), r(32)
    q, k, v = r(2, 7, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    cases = {
        "attention": ("_attn_fwd", att, lambda: ops.attention(q, k, v, 0.3, backend="triton"),
                      lambda: att.attention_fwd(q, k, v, 0.3)),
        "linear": ("_linear_fwd", lin, lambda: ops.linear(x, w, b, "gelu", ln_weight=lnw, ln_bias=lnb, backend="triton"),
                   lambda: lin.linear_fwd(x, w, b, "gelu", ln_weight=lnw, ln_bias=lnb)),
        "layer_norm": ("_ln_fwd", lnm, lambda: ops.layer_norm(x, lnw, lnb, 1e-5, backend="triton"),
                       lambda: lnm.layer_norm_fwd(x, lnw, lnb, 1e-5)),
        "mlp": ("_linear_fwd", lin, lambda: ops.mlp(x, r(64, 32), None, r(32, 64), r(32), residual=x, backend="triton"),
                None),
    }
    name, mod, bound_call, generic_call = cases[op]
    if backends.reasons("triton", op, torch.device("cpu"), dtype=torch.float32):
        pytest.skip("the triton backend cannot take CPU tensors here (TRITON_INTERPRET unset)")
    picks = []
    for t in autotune.TUNABLES:
        real = t.pick
        monkeypatch.setattr(t, "pick", lambda key, dev, run, real=real, t=t: picks.append(t.name) or real(key, dev, run))
    rec = _Recorder()
    monkeypatch.setattr(mod, name, rec)
    monkeypatch.setattr(lnm, "_ln_fwd", rec)  # the LN statistics of linear's prologue
    ops.clear_plans()
    with torch.inference_mode():
        for _ in range(3):
            bound_call()
        n = len(picks)
        assert n in (1, 2, 3), picks  # once per kernel the op launches (linear: stats + GEMM; mlp: 2 GEMMs)
        bound = rec.launches[-n:]
        autotune.clear_memory_cache()
        bound_call()
        assert len(picks) == 2 * n  # the bindings were forgotten
        if generic_call is not None:
            rec.launches.clear()
            generic_call()
            generic = rec.launches
            assert len(generic) == len(bound)
            for (gg, ga, gk), (bg, ba, bk) in zip(generic, bound):
                assert gg == bg and gk == bk
                same = [a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                                   and a.shape == b.shape and a.stride() == b.stride()) or a == b
                        for a, b in zip(ga, ba)]
                assert len(ga) == len(ba) and all(same), (ga, ba)
    ops.clear_plans()


def test_bound_fp32_launch_follows_allow_tf32(monkeypatch):
    """The fp32 product precision is read at each call of a bound launcher, not frozen at binding."""
    if backends.reasons("triton", "linear", torch.device("cpu"), dtype=torch.float32):
        pytest.skip("the triton backend cannot take CPU tensors here (TRITON_INTERPRET unset)")
    rec = _Recorder()
    monkeypatch.setattr(lin, "_linear_fwd", rec)
    monkeypatch.setattr(att, "_attn_fwd", rec)
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    q = torch.randn(1, 2, 4, 16)
    ops.clear_plans()
    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module: set, then restored
    try:
        for allow in (False, True, False):
            torch.backends.cuda.matmul.allow_tf32 = allow
            ops.linear(x, w, backend="triton")
            ops.attention(q, q, q, backend="triton")
            assert [kw["PRECISION"] for _, _, kw in rec.launches[-2:]] == ["tf32" if allow else "ieee"] * 2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
        ops.clear_plans()
