"""torch.library registration of the Triton ops: opcheck every op, and torch.compile(fullgraph=True)
of a tiny model on the triton backend (CPU: through the interpreter) with no graph break."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels
kernels = pytest.importorskip("fastvit.kernels")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

if not kernels.OPS:
    pytest.skip("torch < 2.4: no torch.library.custom_op, ops are not registered", allow_module_level=True)


def _t(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEV).requires_grad_(grad)


def _samples():
    """op name -> list of argument tuples (with and without optional tensors / grads)."""
    qkv = _t(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return {
        "patch_embed": [
            (_t(2, 3, 16, 24), _t(8, 3, 8, 8, grad=True), _t(8, grad=True), _t(6, 8), _t(1, 8), False),
            (_t(1, 2, 9, 15), _t(4, 2, 8, 8), None, None, None, True),
        ],
        "attention": [(q, k, v, None), (_t(1, 2, 3, 32, grad=True), _t(1, 2, 7, 32, grad=True),
                                        _t(1, 2, 7, 32, grad=True), 0.25)],
        "attention_probs": [(q, k, v, 0.3), (_t(1, 1, 4, 16, grad=True), _t(1, 1, 4, 16), _t(1, 1, 4, 16), None)],
        "layer_norm": [(_t(3, 40, grad=True), _t(40, grad=True), _t(40), 1e-6), (_t(2, 3, 10), None, None, 1e-5)],
        "linear": [
            (_t(2, 5, 24, grad=True), _t(16, 24, grad=True), _t(16), "gelu", _t(16), _t(2, 5, 16), _t(24), _t(24), 1e-6),
            (_t(7, 9), _t(5, 9), None, None, None, None, None, None, 1e-6),
        ],
        "mlp": [(_t(1, 4, 8, grad=True), _t(32, 8, grad=True), _t(32), _t(8, 32), _t(8), "gelu", _t(8), _t(1, 4, 8),
                 _t(8), _t(8), 1e-6)],
    }


OP_NAMES = ["patch_embed", "attention", "attention_probs", "layer_norm", "linear", "mlp"]


# --------------------------------------------------------------------------- checks (run in a fresh process)
def _opcheck(name):
    """Schema, fake-tensor (shapes and strides), autograd registration and AOT dispatch."""
    for args in _samples()[name]:
        torch.library.opcheck(kernels.OPS[name], args)


def check_grad_through_registered_op():
    """With requires_grad inputs the public function goes through the custom op (autograd)."""
    x = _t(4, 8, grad=True)
    w = _t(3, 8, grad=True)
    y = kernels.linear(x, w, None, "gelu_tanh", None, None, None, None, 1e-6)
    assert y.grad_fn is not None
    y.sum().backward()
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    torch.nn.functional.gelu(xr @ wr.T, approximate="tanh").sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


def check_model_gradients_match_torch():
    """requires_grad inputs: the triton forward + reference backward equals torch's gradients."""
    import fastvit

    torch.manual_seed(0)
    m = fastvit.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                  num_classes=5, init_values=0.5).to(DEV)
    x = torch.randn(2, 3, 32, 32, device=DEV, requires_grad=True)
    grads = {}
    for backend in ("torch", "triton"):
        m.zero_grad()
        x.grad = None
        m.backend = backend
        m(x).square().sum().backward()
        grads[backend] = [x.grad.clone()] + [p.grad.clone() for p in m.parameters() if p.grad is not None]
    assert len(grads["torch"]) == len(grads["triton"]) > 5
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _compile_tiny_model(compiler):
    import fastvit

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = fastvit.VisionTransformer(img_size=(32, 48), patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=10, init_values=0.1, reg_tokens=1, backend="triton").to(DEV).eval()
    x = torch.randn(2, 3, 32, 48, device=DEV)
    with torch.no_grad():
        ref = m(x)
        explanation = torch._dynamo.explain(m)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        got = torch.compile(m, fullgraph=True, backend=compiler)(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the compiled graph calls the registered triton ops, not the reference
    gm_ops = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("fastvit.triton_attention" in t for t in gm_ops), sorted(gm_ops)[:20]
    assert any("fastvit.triton_linear" in t for t in gm_ops)


CHECKS = {
    **{f"opcheck_{n}": (lambda n=n: _opcheck(n)) for n in OP_NAMES},
    "grad_through_registered_op": check_grad_through_registered_op,
    "model_gradients_match_torch": check_model_gradients_match_torch,
    "compile_fullgraph_aot_eager": lambda: _compile_tiny_model("aot_eager"),
    "compile_fullgraph_inductor": lambda: _compile_tiny_model("inductor"),
}


def _run_all() -> dict:
    out = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            out[name] = None
        except Exception as e:  # reported per check by the tests
            out[name] = f"{type(e).__name__}: {e}"[:3000]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # A fresh process. In this torch build, after tests/test_classify.py's module fixture ran in
    # the same pytest process, calls of these custom ops with requires_grad inputs raised
    # "ValueError: vector::reserve" from the dispatcher and opcheck's SchemaCheckMode segfaulted;
    # neither happens in a clean process or when the probe runs after that fixture in a
    # separate file, so the cause is still open (reported to the lead).
    out = tmp_path_factory.mktemp("compile") / "results.json"
    env = dict(os.environ)
    if DEV == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--run", str(out)], env=env,
                          capture_output=True, text=True, timeout=1200, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, f"check subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CHECKS))
def test_registered_ops(name, results):
    assert results[name] is None, results[name]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run":
        with open(sys.argv[2], "w") as f:
            json.dump(_run_all(), f)
    else:
        sys.exit(f"usage: {sys.argv[0]} --run OUT.json")
