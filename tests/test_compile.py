"""torch.library registration of the Triton ops: opcheck every op, and torch.compile(fullgraph=True)
of a tiny model on the triton backend (CPU: through the interpreter) with no graph break."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("name", ["patch_embed", "attention", "attention_probs", "layer_norm", "linear", "mlp"])
def test_opcheck(name):
    """Schema, fake-tensor (shapes and strides), autograd registration and AOT dispatch."""
    op = kernels.OPS[name]
    for args in _samples()[name]:
        torch.library.opcheck(op, args)


def test_ops_use_registered_op_under_grad():
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


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_tiny_model_fullgraph(compiler):
    import fastvit

    torch._dynamo.reset()
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
