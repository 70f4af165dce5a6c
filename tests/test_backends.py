"""Backend selection: explicit > per-model > set_backend > FASTVIT_BACKEND > auto; resolve returns the
backend module; reasons derived from each backend's declared LIMITS; lazy imports."""

import dataclasses
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import fastvit
from fastvit import backends, ops, reference
from fastvit.facts import BackendLimits


@pytest.fixture(autouse=True)
def _clean_choice(monkeypatch):
    monkeypatch.delenv("FASTVIT_BACKEND", raising=False)
    fastvit.set_backend(None)
    yield
    fastvit.set_backend(None)


def test_auto_on_cpu_is_torch_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("attention", torch.device("cpu")) is reference


def test_resolve_returns_the_backend_module():
    assert backends.resolve("linear", torch.device("cpu"), "torch") is reference is backends.module("torch")
    if os.environ.get("TRITON_INTERPRET") == "1":
        import fastvit.kernels

        assert backends.resolve("linear", torch.device("cpu"), "triton") is fastvit.kernels
    for name in backends.BACKENDS:
        mod = backends.module(name)
        assert mod is None or (mod.LIMITS.name == name and backends.limits(name) is mod.LIMITS)


def test_auto_on_unusable_cuda_device_falls_back_and_warns_once():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    backends.reset()  # forget earlier warnings
    with pytest.warns(RuntimeWarning) as caught:
        assert backends.resolve("linear", torch.device("cuda")) is reference
    said = sorted(str(w.message) for w in caught)
    for name in ("cuda", "triton"):  # each skipped backend once, with its reasons
        why = "; ".join(backends.reasons(name, "linear", torch.device("cuda")))
        assert f"fastvit: backend {name!r} skipped for linear: {why}" in said, said
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: no second warning
        assert backends.resolve("linear", torch.device("cuda")) is reference


def test_explicit_unavailable_backend_raises_with_reason():
    q = torch.randn(1, 1, 4, 8)
    why = "; ".join(backends.reasons("cuda", "attention", torch.device("cpu"), dtype=torch.float32, head_dim=8))
    assert why, "the cuda backend cannot run CPU tensors"
    expected = re.escape(f"backend 'cuda' cannot run attention on cpu: {why}")
    with pytest.raises(backends.BackendUnavailable, match=expected):
        ops.attention(q, q, q, backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends.reset()  # the plan cache may hold an interpreter-era plan for this signature
    ok, reason = fastvit.available_backends(torch.device("cpu"))["triton"]
    assert not ok and "TRITON_INTERPRET=1" in reason
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(backends.BackendUnavailable, match="interpreter"):
        ops.attention(q, q, q, backend="triton")


def test_precedence_env_global_model_explicit(monkeypatch):
    x = torch.randn(1, 3, 16, 16)
    model = fastvit.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=2)
    monkeypatch.setenv("FASTVIT_BACKEND", "cuda")
    backends.reset()  # FASTVIT_BACKEND is read again after a reset
    assert backends.get_backend() == "cuda"
    with pytest.raises(backends.BackendUnavailable):
        model(x)  # env var says cuda, which cannot run on the CPU: an error, never a silent fallback
    fastvit.set_backend("torch")  # set_backend beats the environment
    assert model(x).shape == (1, 2)
    model.set_backend("cuda")  # the per-model setting beats set_backend
    with pytest.raises(backends.BackendUnavailable):
        model(x)
    q = torch.randn(1, 1, 4, 8)
    fastvit.set_backend("cuda")
    assert ops.attention(q, q, q, backend="torch").shape == q.shape  # explicit beats everything
    model.set_backend("auto")
    assert model.backend is None


def test_bad_env_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTVIT_BACKEND", "tpu")
    backends.reset()
    with pytest.raises(ValueError, match=r"FASTVIT_BACKEND: expected one of .* got 'tpu'"):
        backends.get_backend()
    with pytest.raises(ValueError, match="backend: expected one of"):
        fastvit.set_backend("fast")


def test_available_backends_reports_every_backend():
    cpu = torch.device("cpu")
    av = fastvit.available_backends(cpu)
    assert set(av) == {"triton", "cuda", "torch"}
    assert av["torch"] == (True, None)
    assert av["cuda"][0] is False and av["cuda"][1] == "; ".join(backends.reasons("cuda", None, cpu))


@pytest.mark.parametrize("field,value,props,reason", [
    ("max_head_dim", 8, dict(head_dim=16), "torch attention supports head dim <= 8, got 16"),
    ("dtypes", (torch.float32,), dict(dtype=torch.float16), "torch has no float16 kernels"),
    ("ops", frozenset({"linear"}), {}, "torch has no attention kernel"),
])
def test_declared_limit_produces_the_reason(monkeypatch, field, value, props, reason):
    """A backend's declared limit (its LIMITS data) is the reason: resolve and the op both raise it."""
    limits = dataclasses.replace(reference.LIMITS, **{field: value})
    assert isinstance(limits, BackendLimits)
    try:
        with monkeypatch.context() as m:
            m.setattr(reference, "LIMITS", limits)
            backends.reset()  # drop cached plans resolved with the real limits
            with pytest.raises(backends.BackendUnavailable, match=re.escape(reason)):
                backends.resolve("attention", torch.device("cpu"), "torch", **props)
            q = torch.randn(1, 2, 4, 16, dtype=props.get("dtype", torch.float32))
            with pytest.raises(backends.BackendUnavailable, match=re.escape(reason)):
                ops.attention(q, q, q, backend="torch")
            assert reason in backends.reasons("torch", "attention", torch.device("cpu"), dtype=q.dtype, head_dim=16)
    finally:
        backends.reset()
    assert ops.attention(q, q, q, backend="torch").shape == q.shape  # the real limits again


@pytest.mark.parametrize("feature,kwargs", [
    ("attention.bias", lambda q: dict(bias=torch.zeros(2, 4, 4))),
    ("attention.rope", lambda q: dict(rope=torch.zeros(4, 32))),
    ("attention.rope_per_head", lambda q: dict(rope=torch.zeros(2, 4, 32))),
])
def test_undeclared_feature_is_the_reason(monkeypatch, feature, kwargs):
    """An op call needing a feature the backend does not declare is refused with that reason (an
    explicit backend), and the plain call on the same shapes still runs."""
    q = torch.randn(1, 2, 4, 16)
    declared = reference.LIMITS.features - {feature}
    try:
        with monkeypatch.context() as m:
            m.setattr(reference, "LIMITS", dataclasses.replace(reference.LIMITS, features=declared))
            backends.reset()
            with pytest.raises(backends.BackendUnavailable, match=re.escape(f"torch does not support {feature}")):
                ops.attention(q, q, q, backend="torch", **kwargs(q))
            assert ops.attention(q, q, q, backend="torch").shape == q.shape
    finally:
        backends.reset()
    assert ops.attention(q, q, q, backend="torch", **kwargs(q)).shape == q.shape


def _run(code: str, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_fastvit_without_triton_and_lazy_backends():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import fastvit, torch\n"
        "assert 'fastvit.kernels' not in sys.modules and 'fastvit.cuda' not in sys.modules\n"
        "ok, why = fastvit.available_backends(torch.device('cpu'))['triton']\n"
        "assert not ok and 'cannot import fastvit.kernels' in why, why\n"
        "m = fastvit.create_model('vit_tiny_patch16_224', img_size=32, depth=1)\n"
        "print(tuple(m(torch.randn(1, 3, 32, 32)).shape))\n"
    )
    r = _run(code, {"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 1000)"


def test_import_fastvit_does_not_import_triton():
    r = _run("import sys, fastvit; print('triton' in sys.modules, 'fastvit.kernels' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False False"


def test_cli_info_lists_backends_and_reasons():
    r = subprocess.run([sys.executable, "-m", "fastvit", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "backends:" in r.stdout and "torch" in r.stdout
    # every backend's reason on the CPU, as fastvit.backends derives it from the limits
    for name, (ok, why) in fastvit.available_backends(torch.device("cpu")).items():
        assert ok or (why and why.split(";")[0] in r.stdout), (name, why, r.stdout)
    # and what each backend lacks of the optional op features (here: nothing; derived from LIMITS)
    assert "op features" in r.stdout
    for name in fastvit.backends.BACKENDS:
        assert f"  {name:<7} all" in r.stdout, r.stdout
    # which op-call signature the host fast path runs (C++ or the Python fallback, and why)
    assert f"op signature {fastvit.signature.IMPL}" in r.stdout, r.stdout


def test_feature_support_names_what_a_backend_lacks(monkeypatch):
    """A backend declaring fewer features / activations is listed with exactly those missing."""
    import dataclasses

    from fastvit import backends, cli

    real = backends.limits
    fake = dataclasses.replace(real("torch"), features=frozenset({"attention.bias"}), acts=(None, "gelu"))
    monkeypatch.setattr(backends, "limits", lambda n: fake if n == "torch" else real(n))
    line = cli.feature_support()["torch"]
    assert line.startswith("lacks ")
    lacks = set(line[len("lacks "):].split(", "))
    assert lacks == {"attention.rope", "attention.rope_per_head", "attention_probs.bias", "attention_probs.rope",
                     "attention_probs.rope_per_head", "act 'gelu_tanh'", "act 'quick_gelu'", "act 'swiglu'"}
