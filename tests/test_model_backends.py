"""A whole VisionTransformer on every non-reference backend against the torch backend, backends
agreeing with each other, and bit-identical reruns on every GPU backend.

The model API takes no float64, so a whole network's oracle is the torch backend in float32
(TF32 off); 16-bit logits are held to the DESIGN.md rule with the torch run in the same dtype as
the baseline. Per-op accuracy is in tests/test_op_<op>.py. A backend that cannot run the model
here is skipped with the reason from fastvit.backends.reasons.
"""

import pytest
import torch

import fastvit
from fastvit import ops
from utils import BACKENDS, DEV, DTYPES, assert_close_rule, realistic_init_, skip_reason

pytestmark = pytest.mark.usefixtures("full_precision")

FAST_BACKENDS = [b for b in BACKENDS if b != "torch"]  # compared against the torch backend


def require_model(backend, model, dtype, device=DEV):
    """Skip unless ``backend`` runs every op ``model`` calls (with its head dim) in ``dtype``."""
    head_dim = model.embed_dim // model.blocks[0].attn.num_heads
    for op, props in (("patch_embed", {}), ("attention", {"head_dim": head_dim}), ("linear", {"act": None}),
                      ("mlp", {"act": model.blocks[0].mlp.act}), ("layer_norm", {})):
        why = skip_reason(backend, op, device, dtype=dtype, **props)
        if why:
            pytest.skip(why)


def _model(variant):
    """(model on DEV in float32, input image batch)."""
    torch.manual_seed(0)
    if variant == "tiny":  # default init, LayerScale, 2 register tokens, non-square image
        m = fastvit.VisionTransformer(img_size=(32, 48), patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                      num_classes=10, init_values=0.1, reg_tokens=2)
        return m.to(DEV).eval(), torch.randn(3, 3, 32, 48, device=DEV)
    kw = dict(init_values=0.1, reg_tokens=4, act="gelu_tanh") if variant == "ls-reg" else {}
    m = fastvit.VisionTransformer(img_size=(48, 64), patch_size=16, embed_dim=192, depth=3, num_heads=3,
                                  num_classes=10, **kw).eval()
    return realistic_init_(m).to(DEV), torch.randn(3, 3, 48, 64, device=DEV)


def _logits(m, x, backend, dtype):
    with torch.no_grad():
        return m.to(dtype).set_backend(backend)(x.to(dtype))


@pytest.mark.parametrize("variant", ["tiny", "vit", "ls-reg"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_model_matches_torch_backend(backend, dtype, atol, rtol, variant):
    m, x = _model(variant)
    require_model(backend, m, dtype)
    ref32 = _logits(m, x, "torch", torch.float32)
    lowp = _logits(m, x, "torch", dtype)
    got = _logits(m, x, backend, dtype)
    assert got.dtype == dtype and got.shape == ref32.shape
    if dtype == torch.float32:
        # float32 against float32: summation-order differences compound over the blocks
        assert_close_rule(got, ref32, None, atol=1e-4, rtol=rtol, name=f"{backend} logits")
    else:
        assert_close_rule(got, ref32, lowp, atol=atol, rtol=rtol, name=f"{backend} logits")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_vit_base_model(backend, dtype):
    m = fastvit.VisionTransformer(num_classes=1000).cuda().eval()
    require_model(backend, m, dtype)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    ref32 = _logits(m, x, "torch", torch.float32)
    lowp = _logits(m, x, "torch", dtype)
    assert_close_rule(_logits(m, x, backend, dtype), ref32, lowp, name=f"{backend} ViT-B/16 logits")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_backends_agree(dtype):
    """Each fast backend is held to the rule against float32; then any two differ by at most the
    sum of their bounds."""
    m, x = _model("vit")
    ref32 = _logits(m, x, "torch", torch.float32)
    lowp = _logits(m, x, "torch", dtype)
    ran = {}
    for backend in FAST_BACKENDS:
        if skip_reason(backend, "attention", DEV, dtype=dtype, head_dim=64) is None:
            ran[backend] = _logits(m, x, backend, dtype).float()
    if len(ran) < 2:
        pytest.skip(f"fewer than two fast backends run here: {sorted(ran)}")
    for name, out in ran.items():
        assert_close_rule(out.to(dtype), ref32, lowp, name=name)
    base = (lowp.float() - ref32).abs().max().item()
    bound = 2 * (2 * base + torch.finfo(dtype).eps * ref32.abs().max().item())
    names = sorted(ran)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = (ran[a] - ran[b]).abs().max().item()
            assert diff <= bound, f"{a} vs {b}: max abs diff {diff:.3e} > {bound:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_fifty_reruns_bit_identical(backend):
    """attention, linear (LN + GELU prologue / epilogue) and a whole ViT-B in bf16: 50 reruns
    give the first result bit for bit."""
    dtype = torch.bfloat16
    m = fastvit.VisionTransformer().cuda().eval().to(dtype)
    require_model(backend, m, dtype)
    m.set_backend(backend)
    q, k, v = torch.randn(8, 197, 3, 12, 64, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
    x = torch.randn(8 * 197, 768, device="cuda", dtype=dtype)
    w, lw = torch.randn(2304, 768, device="cuda", dtype=dtype), torch.randn(768, device="cuda", dtype=dtype)
    img = torch.randn(2, 3, 224, 224, device="cuda", dtype=dtype)

    def run():
        with torch.no_grad():
            return (ops.attention(q, k, v, backend=backend).clone(),
                    ops.linear(x, w, None, "gelu", None, None, lw, lw, backend=backend).clone(), m(img).clone())

    first = run()
    for i in range(49):
        for name, a, b in zip(("attention", "linear", "model"), first, run()):
            assert torch.equal(a, b), f"{backend} {name}: rerun {i + 2} differs from the first"
