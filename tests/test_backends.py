"""Backend selection: explicit > per-model > set_backend > FASTVIT_BACKEND > auto; reasons; lazy imports."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastvit
from fastvit import backends, ops, reference


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


def test_auto_on_unusable_cuda_device_falls_back_and_warns_once():
    backends._warned.clear()
    with pytest.warns(RuntimeWarning, match="backend 'triton' skipped for linear"):
        assert backends.resolve("linear", torch.device("cuda")) is reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: no second warning
        assert backends.resolve("linear", torch.device("cuda")) is reference


def test_explicit_unavailable_backend_raises_with_reason():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(backends.BackendUnavailable, match=r"backend 'cuda' cannot run attention on cpu: .*CUDA tensor"):
        ops.attention(q, q, q, backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = fastvit.available_backends(torch.device("cpu"))["triton"]
    assert not ok and "TRITON_INTERPRET=1" in reason
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(backends.BackendUnavailable, match="interpreter"):
        ops.attention(q, q, q, backend="triton")


def test_precedence_env_global_model_explicit(monkeypatch):
    x = torch.randn(1, 3, 16, 16)
    model = fastvit.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=2)
    monkeypatch.setenv("FASTVIT_BACKEND", "cuda")
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
    with pytest.raises(ValueError, match=r"FASTVIT_BACKEND: expected one of .* got 'tpu'"):
        backends.get_backend()
    with pytest.raises(ValueError, match="backend: expected one of"):
        fastvit.set_backend("fast")


def test_available_backends_reports_every_backend():
    av = fastvit.available_backends(torch.device("cpu"))
    assert set(av) == {"triton", "cuda", "torch"}
    assert av["torch"] == (True, None)
    assert av["cuda"][0] is False and "CUDA" in av["cuda"][1]


def test_op_level_unsupported_reason_is_used(monkeypatch):
    class FakeMod:
        @staticmethod
        def unsupported(op, **info):
            return f"head dim {info.get('head_dim')} not compiled" if op == "attention" else None

    b = backends._REGISTRY["torch"]
    monkeypatch.setattr(b, "_mod", FakeMod)
    monkeypatch.setattr(b, "_loaded", True)
    with pytest.raises(backends.BackendUnavailable, match="head dim 8 not compiled"):
        backends.resolve("attention", torch.device("cpu"), "torch", head_dim=8)


def _run(code: str, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_fastvit_without_triton_and_lazy_backends():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import fastvit, torch\n"
        "assert 'fastvit.kernels' not in sys.modules and 'fastvit.cuda_ext' not in sys.modules\n"
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
    assert "backends:" in r.stdout and "torch" in r.stdout and "needs a CUDA tensor" in r.stdout
