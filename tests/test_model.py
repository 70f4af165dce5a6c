"""Parity of fastvit.VisionTransformer with timm and Hugging Face (fp32, random weights, eval)."""

from functools import partial

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit import VisionTransformer
from fastvit.checkpoint import load_state_dict

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5  # max |diff| relative to the output scale (issue 2)


def _perturb(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Random weights everywhere (timm inits LayerScale / biases to constants, which hides bugs)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _assert_parity(a: torch.Tensor, b: torch.Tensor, what: str):
    scale = a.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= REL_TOL * max(scale, 1.0), f"{what}: max |diff| {err:.3e}, output scale {scale:.3e}"


TIMM_CASES = [
    ("vit_tiny_patch16_224", {}, (2, 224, 224)),
    ("vit_small_patch16_224", {}, (1, 224, 224)),
    ("vit_base_patch16_224", {}, (1, 224, 224)),
    ("vit_small_patch14_dinov2", dict(img_size=70), (2, 70, 70)),  # patch 14 + LayerScale
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56), (2, 56, 56)),  # registers, no_embed_class
    ("vit_tiny_patch16_224", dict(global_pool="avg", img_size=64), (3, 64, 64)),  # fc_norm
    ("vit_tiny_patch16_224", dict(reg_tokens=3, init_values=0.1, img_size=48), (3, 48, 48)),
    ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg", no_embed_class=True, img_size=32), (2, 32, 32)),
    ("vit_tiny_patch16_224", dict(pre_norm=True, img_size=(32, 48)), (2, 32, 48)),  # CLIP-style, no patch bias
    ("vit_tiny_patch16_224", dict(act_layer="gelu_tanh", global_pool="max", img_size=32), (1, 32, 32)),
    ("deit_tiny_patch16_224", {}, (2, 224, 224)),
    ("deit_tiny_distilled_patch16_224", dict(img_size=64), (2, 64, 64)),
    ("vit_base_patch32_224", dict(img_size=96, global_pool=""), (1, 96, 96)),
]


@pytest.mark.parametrize("name,kwargs,shape", TIMM_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(TIMM_CASES)])
def test_timm_parity(name, kwargs, shape):
    ref = _perturb(timm.create_model(name, pretrained=False, **kwargs)).eval()
    fast = VisionTransformer(**_ctor_args(ref))
    fast.load_state_dict(ref.state_dict(), strict=True)  # the checkpoint contract: same names and shapes
    fast.eval()
    x = torch.randn(shape[0], 3, shape[1], shape[2])
    with torch.no_grad():
        _assert_parity(ref(x), fast(x), f"{name} {kwargs} logits")
        _assert_parity(ref.forward_features(x), fast.forward_features(x), f"{name} {kwargs} features")
        conv = fastvit.from_timm(ref)
        _assert_parity(ref(x), conv(x), f"{name} {kwargs} from_timm")


def _ctor_args(ref) -> dict:
    """The timm model's constructor arguments, spelled out by hand (independent of from_timm)."""
    blk = ref.blocks[0]
    act = "gelu_tanh" if getattr(blk.mlp.act, "approximate", "none") == "tanh" or "Tanh" in type(blk.mlp.act).__name__ \
        else "gelu"
    return dict(
        img_size=ref.patch_embed.img_size, patch_size=ref.patch_embed.patch_size, num_classes=ref.num_classes,
        global_pool=ref.global_pool, embed_dim=ref.embed_dim, depth=len(ref.blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / ref.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        init_values=1.0 if hasattr(blk.ls1, "gamma") else None, class_token=ref.cls_token is not None,
        no_embed_class=ref.no_embed_class, reg_tokens=ref.num_reg_tokens,
        pre_norm=not isinstance(ref.norm_pre, nn.Identity), fc_norm=not isinstance(ref.fc_norm, nn.Identity),
        act=act, distilled=getattr(ref, "dist_token", None) is not None,
    )


def test_deit_distilled_train_and_eval():
    ref = _perturb(timm.create_model("deit_tiny_distilled_patch16_224", img_size=32)).eval()
    fast = fastvit.from_timm(ref)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _assert_parity(ref(x), fast(x), "eval average of heads")
        ref.train(), fast.train()
        _assert_parity(ref(x), fast(x), "train without distilled_training")
        ref.set_distilled_training(True), fast.set_distilled_training(True)
        (a, a_d), (b, b_d) = ref(x), fast(x)
        _assert_parity(a, b, "train cls head")
        _assert_parity(a_d, b_d, "train distillation head")
        ref.eval(), fast.eval()
        assert isinstance(fast(x), torch.Tensor), "eval mode averages the heads even with distilled_training"
        _assert_parity(ref.forward_head(ref.forward_features(x), pre_logits=True),
                       fast.forward_head(fast.forward_features(x), pre_logits=True), "pre_logits")


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (112, 32)])
def test_dynamic_img_size_matches_timm(size):
    ref = _perturb(timm.create_model("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True)).eval()
    fast = fastvit.from_timm(ref)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        _assert_parity(ref(x), fast(x), f"dynamic size {size}")
        _assert_parity(ref(x), fast(x), f"dynamic size {size} (cached grid)")


def test_dynamic_img_pad_matches_timm():
    ref = _perturb(timm.create_model("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True,
                                     dynamic_img_pad=True)).eval()
    fast = fastvit.from_timm(ref)
    x = torch.randn(2, 3, 50, 71)
    with torch.no_grad():
        _assert_parity(ref(x), fast(x), "dynamic_img_pad")


def test_pos_embed_cache_follows_weight_changes():
    fast = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                             dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        y0 = fast(x)
        fast.pos_embed.add_(1.0)  # in-place update bumps the version: the cached resample is stale
        y1 = fast(x)
        fast._embed_cache.clear()
        y2 = fast(x)
    assert not torch.equal(y0, y1)
    assert torch.equal(y1, y2)


def test_hybrid_resnet_stem_matches_timm():
    from timm.layers import HybridEmbed
    from torchvision.models import resnet18

    r = resnet18()
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)  # stride 4, 64 channels
    ref = timm.models.VisionTransformer(img_size=64, patch_size=1, embed_dim=64, depth=2, num_heads=2, num_classes=7,
                                        embed_layer=partial(HybridEmbed, backbone=stem))
    ref = _perturb(ref).eval()
    fast = fastvit.from_timm(ref)
    assert fast.patch_embed.grid_size == (16, 16)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _assert_parity(ref(x), fast(x), "hybrid")
    assert set(fast.state_dict()) == set(ref.state_dict())


def test_get_intermediate_layers_match_timm():
    ref = _perturb(timm.create_model("vit_small_patch14_reg4_dinov2", img_size=42)).eval()
    fast = fastvit.from_timm(ref)
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        for kw in (dict(n=2), dict(n=[0, 5], reshape=True, norm=True), dict(n=1, return_prefix_tokens=True)):
            a, b = ref.get_intermediate_layers(x, **kw), fast.get_intermediate_layers(x, **kw)
            assert len(a) == len(b)
            for ya, yb in zip(a, b):
                for ta, tb in (zip(ya, yb) if isinstance(ya, tuple) else [(ya, yb)]):
                    assert ta.shape == tb.shape
                    _assert_parity(ta, tb, f"intermediates {kw}")
        fa, ia = ref.forward_intermediates(x, indices=[1, 3])
        fb, ib = fast.forward_intermediates(x, indices=[1, 3])
        _assert_parity(fa, fb, "forward_intermediates final")
        for ta, tb in zip(ia, ib):
            _assert_parity(ta, tb, "forward_intermediates NCHW")


def test_forward_intermediates_attention_probs():
    fast = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, inter, attns = fast.forward_intermediates(x, indices=1, attn_layers=[0, -1])
        assert torch.allclose(out, fast.forward_features(x), atol=1e-6)
    assert sorted(attns) == [0, 2]
    for p in attns.values():
        assert p.shape == (2, 4, 17, 17) and p.dtype == torch.float32
        assert torch.allclose(p.sum(-1), torch.ones(2, 4, 17), atol=1e-5)


# ------------------------------------------------------------------------- Hugging Face
def _hf_cases():
    T = transformers
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=8)
    dino = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14)
    return [
        ("vit-cls", lambda: T.ViTForImageClassification(T.ViTConfig(num_labels=5, **kw)), [(32, 32)]),
        ("vit-model", lambda: T.ViTModel(T.ViTConfig(**kw)), [(32, 32)]),
        ("vit-tanh", lambda: T.ViTForImageClassification(T.ViTConfig(num_labels=3, hidden_act="gelu_pytorch_tanh", **kw)),
         [(32, 32)]),
        ("deit-teacher", lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(num_labels=5, **kw)), [(32, 32)]),
        ("deit-cls", lambda: T.DeiTForImageClassification(T.DeiTConfig(num_labels=5, **kw)), [(32, 32)]),
        ("dinov2", lambda: T.Dinov2Model(T.Dinov2Config(**dino)), [(28, 28), (42, 56), (70, 28)]),
        ("dinov2-reg", lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**dino)),
         [(28, 28), (42, 56), (56, 42)]),
    ]


@pytest.mark.parametrize("case", _hf_cases(), ids=lambda c: c[0])
def test_hf_parity(case):
    name, build, sizes = case
    hf = _perturb(build(), std=0.1).eval()
    fast = fastvit.from_hf(hf)
    for size in sizes:
        x = torch.randn(3, 3, *size)
        with torch.no_grad():
            o = hf(pixel_values=x)
            if hasattr(o, "logits"):
                _assert_parity(o.logits, fast(x), f"{name} {size} logits")
            else:
                _assert_parity(o.last_hidden_state, fast.forward_features(x), f"{name} {size} last_hidden_state")
                if name.startswith("dinov2"):
                    _assert_parity(o.pooler_output, fast(x), f"{name} {size} pooler_output")


def test_hf_layer_norm_eps_is_taken_from_config():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=8)
    fast = fastvit.from_hf(transformers.ViTModel(cfg))
    assert fast.blocks[0].norm1.eps == 1e-12 and fast.norm.eps == 1e-12


# ------------------------------------------------------------------------- registry
def test_registry_presets_match_timm_shapes():
    names = fastvit.list_models()
    for required in ("vit_tiny_patch16_224", "vit_small_patch16_384", "vit_base_patch32_224", "vit_large_patch14_224",
                     "vit_huge_patch14_224", "deit_small_patch16_224", "deit_base_distilled_patch16_224",
                     "vit_small_patch14_dinov2", "vit_base_patch14_reg4_dinov2"):
        assert required in names
    for name in ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_patch14_reg4_dinov2",
                 "vit_base_patch32_384"):
        ref = timm.create_model(name, pretrained=False)
        fast = fastvit.create_model(name)
        a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in fast.state_dict().items()}
        assert a == b, name


def test_create_model_overrides_and_unknown_name():
    m = fastvit.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32)
    assert m.head.out_features == 10 and m.patch_embed.grid_size == (2, 2)
    with pytest.raises(ValueError, match="name: expected one of fastvit.list_models"):
        fastvit.create_model("vit_gigantic_patch3_9000")


# ------------------------------------------------------------------------- bad input
def _tiny(**kw):
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3, **kw).eval()


def test_bad_input_errors_name_argument_expected_actual():
    m = _tiny()
    with pytest.raises(ValueError, match=r"x: expected 3 input channels .* got shape \(1, 4, 32, 32\)"):
        m(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match=r"x: expected dtype float32, float16, bfloat16 or uint8, got torch.int64"):
        m(torch.zeros(1, 3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x: expected image size \(32, 32\).* got \(40, 32\)"):
        m(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"x: expected an image batch of shape \(B, C, H, W\), got shape \(3, 32, 32\)"):
        m(torch.randn(3, 32, 32))
    dyn = _tiny(dynamic_img_size=True)
    with pytest.raises(ValueError, match=r"multiples of the patch size \(8, 8\).*got image size \(30, 32\)"):
        dyn(torch.randn(1, 3, 30, 32))
    assert _tiny(dynamic_img_size=True, dynamic_img_pad=True)(torch.randn(1, 3, 30, 33)).shape == (1, 3)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        m([1, 2, 3])


def test_constructor_rejects_unsupported_settings():
    with pytest.raises(ValueError, match="drop_rate / drop_path_rate"):
        VisionTransformer(drop_path_rate=0.1, depth=1)
    with pytest.raises(ValueError, match="global_pool: expected one of"):
        VisionTransformer(global_pool="prr", depth=1)
    with pytest.raises(ValueError, match="act: expected one of"):
        VisionTransformer(act="relu", depth=1)
    with pytest.raises(ValueError, match="num_heads: expected a divisor of dim=768, got 5"):
        VisionTransformer(num_heads=5, depth=1)


def test_wrong_checkpoint_keys_listed():
    m = _tiny()
    sd = m.state_dict()
    sd.pop("blocks.0.attn.qkv.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(5, 32)
    with pytest.raises(ValueError) as e:
        load_state_dict(m, sd)
    msg = str(e.value)
    assert "missing keys (1): ['blocks.0.attn.qkv.bias']" in msg
    assert "unexpected keys (1): ['blocks.0.extra.weight']" in msg
    assert "head.weight: checkpoint (5, 32) vs model (3, 32)" in msg


def test_from_timm_refuses_unsupported_architectures():
    ref = timm.create_model("vit_tiny_patch16_224", qk_norm=True, img_size=32)
    with pytest.raises(ValueError, match="attention q_norm is not supported"):
        fastvit.from_timm(ref)
    with pytest.raises(TypeError, match="timm_model: expected a timm VisionTransformer"):
        fastvit.from_timm(nn.Linear(2, 2))
