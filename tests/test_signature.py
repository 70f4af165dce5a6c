"""fastvit.signature: the plan key of an op call (C++ fastvit._signature and its Python fallback).

Both implementations must give equal keys exactly when every tensor argument's shape, strides,
dtype, device and None-ness are equal, and no key (None: validate every call) for anything
that is not a plain tensor. The ops must behave the same whichever one runs, and a cached plan
must never let bad input through: a call whose facts differ from every validated one is
validated.
"""

import itertools
import os

import pytest
import torch

import fastvit
from fastvit import ops, signature
from utils import load_setup_py

IMPLS = {"python": signature.python_signature}
if signature.load_native()[0] is not None:
    IMPLS["c++"] = signature.load_native()[0]


@pytest.fixture(params=["c++", "python"])
def sig(request):
    if request.param not in IMPLS:
        pytest.skip(f"fastvit._signature: {signature.IMPL}")
    return IMPLS[request.param]


def test_native_signature_is_built():
    """make test sets FASTVIT_REQUIRE_SIGNATURE=1: CI must run the C++ host path it ships."""
    if os.environ.get("FASTVIT_REQUIRE_SIGNATURE") == "1":
        assert signature.IMPL.startswith("c++"), signature.IMPL
        assert ops._signature is IMPLS["c++"]
    elif "c++" not in IMPLS:
        pytest.skip(signature.IMPL)


def _facts(args):
    return tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype, str(t.device)) for t in args)


def _variants():
    base = torch.randn(4, 6, 8)
    return {
        "base": base,
        "copy": base.clone(),  # same facts, other storage
        "parameter": torch.nn.Parameter(base.clone()),  # same facts, Parameter type
        "fp16": base.half(),
        "bf16": base.bfloat16(),
        "transposed": base.transpose(0, 1),  # (6, 4, 8): other shape and strides
        "permuted same shape": torch.randn(6, 4, 8).transpose(0, 1),  # (4, 6, 8), other strides
        "sliced": torch.randn(4, 6, 16)[..., ::2],  # (4, 6, 8), last stride 2
        "offset view": torch.randn(5, 6, 8)[1:],  # same shape and strides as base, storage offset
        "2-D": base.reshape(24, 8),
        "3-D of 1s": torch.randn(1, 1, 8),
        "0-D": torch.tensor(1.0),
        "empty": torch.randn(0, 6, 8),
        "meta": torch.empty(4, 6, 8, device="meta"),
    }


def test_equal_exactly_when_the_facts_are(sig):
    v = _variants()
    lists = [(a,) for a in v.values()] + [(None,), (v["base"], None), (None, v["base"]), (v["base"], v["fp16"]),
                                          (v["fp16"], v["base"]), (v["base"], v["base"], None)]
    for a, b in itertools.product(lists, repeat=2):
        sa, sb = sig(*a), sig(*b)
        assert sa is not None and sb is not None
        hash(sa)
        assert (sa == sb) == (_facts(a) == _facts(b)), (_facts(a), _facts(b))


class _Sub(torch.Tensor):
    pass


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("what", ["subclass", "float", "list", "sparse", "nested", "nested_jagged", "string"])
def test_not_a_plain_tensor_is_not_cached(sig, what):
    x = torch.randn(3, 4)
    other = {
        "subclass": lambda: x.as_subclass(_Sub),
        "float": lambda: 1.5,
        "list": lambda: [x],
        "sparse": lambda: x.to_sparse(),
        "nested": lambda: torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)]),  # a plain Tensor type
        "nested_jagged": lambda: torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)], layout=torch.jagged),
        "string": lambda: "x",
    }[what]()
    assert sig(x, other) is None
    assert sig(other, x) is None


def test_native_decodes_to_what_python_reads():
    if "c++" not in IMPLS:
        pytest.skip(signature.IMPL)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        dims = int(torch.randint(0, 6, (1,), generator=g))
        shape = [int(s) for s in torch.randint(1, 5, (dims,), generator=g)]
        t = torch.randn(shape, generator=g)
        if dims >= 2:
            t = t.transpose(0, dims - 1)
        got = signature._decode(IMPLS["c++"](t, None, t))
        assert got == [(tuple(t.shape), t.stride()), None, (tuple(t.shape), t.stride())]


def test_native_refuses_another_torch(monkeypatch):
    if "c++" not in IMPLS:
        pytest.skip(signature.IMPL)
    from fastvit import _signature

    monkeypatch.setattr(_signature, "TORCH_VERSION", (1, 13, 0))
    fn, why = signature.load_native()
    assert fn is None and "built for torch (1, 13, 0)" in why and torch.__version__ in why


def _count_builds(monkeypatch):
    calls = []
    real = ops._build

    def counting(op, key, *args):
        calls.append((op, key is not None))
        return real(op, key, *args)

    monkeypatch.setattr(ops, "_build", counting)
    return calls


@pytest.mark.parametrize("impl", ["c++", "python"])
def test_plans_are_reused_only_for_the_same_facts(monkeypatch, impl):
    if impl not in IMPLS:
        pytest.skip(signature.IMPL)
    monkeypatch.setattr(ops, "_signature", IMPLS[impl])
    ops.clear_plans()
    calls = _count_builds(monkeypatch)
    x, w, b = torch.randn(2, 5, 16), torch.randn(8, 16), torch.randn(8)
    ops.linear(x, w, b, backend="torch")
    ops.linear(torch.randn(2, 5, 16), torch.randn(8, 16), torch.randn(8), backend="torch")  # same facts: cached
    assert calls == [("linear", True)]
    ops.linear(torch.randn(2, 5, 32)[..., :16], w, b, backend="torch")  # other strides: validated
    assert len(calls) == 2
    # bad input with the shapes of a cached call still gets the op's own errors
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.float32 \(as x\), got dtype torch.float16"):
        ops.linear(x, w.half(), b, backend="torch")
    with pytest.raises(ValueError, match=r"x: expected a last dim with stride 1"):
        ops.linear(torch.randn(2, 5, 32)[..., ::2], w, b, backend="torch")
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\)"):
        ops.linear(x, w, torch.randn(1), backend="torch")
    # sparse (COO strides read (0, 0, 0), as an expanded dense tensor's) and nested tensors are refused
    expanded = torch.randn(1, 1, 16).expand(2, 5, 16)
    ops.linear(expanded, w, b, backend="torch")
    with pytest.raises(TypeError, match=r"x: expected a dense \(strided\) tensor, got layout torch.sparse_coo"):
        ops.linear(torch.zeros(2, 5, 16).to_sparse(), w, b, backend="torch")
    # a tensor subclass: never cached, validated each call
    n = len(calls)
    for _ in range(2):
        ops.linear(x.as_subclass(_Sub), w, b, backend="torch")
    assert calls[n:] == [("linear", False)] * 2
    ops.clear_plans()


@pytest.mark.parametrize("impl", ["c++", "python"])
def test_ops_agree_whichever_signature_runs(monkeypatch, impl):
    if impl not in IMPLS:
        pytest.skip(signature.IMPL)
    monkeypatch.setattr(ops, "_signature", IMPLS[impl])
    ops.clear_plans()
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, w, b, lnw, lnb = r(2, 7, 16), r(24, 16), r(24), r(16), r(16)
    qkv = r(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    rope, bias = r(6, 16), r(2, 7, 7)
    for _ in range(2):  # the first call builds the plan, the second uses it
        torch.testing.assert_close(ops.linear(x, w, b, "gelu", ln_weight=lnw, ln_bias=lnb, backend="torch"),
                                   fastvit.reference.linear(x, w, b, "gelu", ln_weight=lnw, ln_bias=lnb),
                                   rtol=0, atol=0)
        q, k, v = qkv.unbind(0)
        torch.testing.assert_close(ops.attention(q, k, v, bias=bias, rope=rope, backend="torch"),
                                   fastvit.reference.attention(q, k, v, None, bias, rope), rtol=0, atol=0)
        torch.testing.assert_close(ops.layer_norm(x, lnw, lnb, backend="torch"),
                                   torch.nn.functional.layer_norm(x, (16,), lnw, lnb, 1e-6), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"rope: expected shape \(N_r, 16\)"):
        ops.attention(q, k, v, rope=r(6, 8), backend="torch")
    ops.clear_plans()


def test_setup_builds_the_signature_optionally(monkeypatch, capsys):
    from torch.utils.cpp_extension import BuildExtension

    setup = load_setup_py()
    monkeypatch.setenv("FASTVIT_BUILD_EXT", "0")
    assert setup.signature_extension() is None
    monkeypatch.delenv("FASTVIT_BUILD_EXT")
    ext = setup.signature_extension()
    assert ext.name == "fastvit._signature" == setup.SIGNATURE_EXT
    assert all(os.path.exists(os.path.join(os.path.dirname(setup.__file__), s)) for s in ext.sources)

    def broken(self, e):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(BuildExtension, "build_extension", broken)
    build = setup.build_ext_class()
    builder = build.__new__(build)
    builder.build_extension(ext)  # optional: a note, no failure
    assert "building fastvit._signature failed (RuntimeError: no compiler)" in capsys.readouterr().err
    monkeypatch.setenv("FASTVIT_BUILD_EXT", "1")
    with pytest.raises(RuntimeError, match="no compiler"):
        builder.build_extension(ext)  # required (make install / CI)
    monkeypatch.delenv("FASTVIT_BUILD_EXT")
    other = type(ext)("fastvit._C", ext.sources)
    with pytest.raises(RuntimeError, match="no compiler"):
        builder.build_extension(other)  # the CUDA extension's own rules stay
