"""CLIP and SigLIP vision towers: parity with timm and transformers (fp32, random weights), the MAP
head on fastvit's own ops (and on the Triton interpreter against the torch backend), presets,
Hugging Face folders with strict loading, and the refusals.

Shapes are kept small where the architecture allows (depth 1-2, narrow CLIP towers, few tokens);
the SigLIP cases keep their real widths: base (768 / 12 heads, head dim 64) and so400m (1152 / 16
heads, head dim 72, MLP 4304).
"""

from functools import partial

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit import VisionTransformer
from fastvit.checkpoint import CheckpointError
from fastvit.factory import hf_outputs, load_model
from fastvit.model import AttentionPoolLatent
from fastvit.preprocess import Preprocessor
from utils import DEV, DTYPES, assert_close_rule, assert_rel_close, randomise_params, skip_reason

timm = pytest.importorskip("timm")
T = pytest.importorskip("transformers")

REL_TOL = 1e-4  # max |diff| / max |reference| (the bound)


pytestmark = pytest.mark.usefixtures("hub_offline")


_randomise = randomise_params


def _rel(out: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    return assert_rel_close(out, ref, what, REL_TOL)


# --------------------------------------------------------------------------- timm
_NARROW = dict(embed_dim=64, num_heads=4, depth=2)
TIMM_CASES = [
    # OpenAI CLIP: QuickGELU, pre-norm, the projection head
    ("clip-openai-quickgelu", "vit_base_patch16_clip_quickgelu_224", dict(img_size=64, num_classes=32, **_NARROW),
     (2, 64, 64)),
    # LAION-style CLIP (GELU); LayerScale on so every gamma is randomised
    ("clip-laion-gelu", "vit_base_patch32_clip_224", dict(img_size=96, num_classes=24, init_values=0.1, **_NARROW),
     (3, 96, 96)),
    ("siglip-base", "vit_base_patch16_siglip_224", dict(depth=2, img_size=64), (2, 64, 64)),
    ("siglip-base-tanh", "vit_base_patch32_siglip_256", dict(depth=1, img_size=64), (3, 64, 64)),
    ("siglip-so400m", "vit_so400m_patch14_siglip_224", dict(depth=1, img_size=56), (2, 56, 56)),
    # 60 = 4 * 14 + 4: the border a strided conv drops, as so400m/14 at 384
    ("siglip-so400m-border", "vit_so400m_patch14_siglip_384", dict(depth=1, img_size=60), (1, 60, 60)),
    ("siglip-gap", "vit_base_patch16_siglip_gap_224", dict(img_size=32, **_NARROW), (2, 32, 32)),
]


@pytest.mark.parametrize("case", TIMM_CASES, ids=lambda c: c[0])
def test_timm_parity(case):
    what, name, kw, (b, h, w) = case
    ref = _randomise(timm.create_model(name, pretrained=False, **kw)).eval()
    fast = fastvit.from_timm(ref)
    preset = fastvit.create_model(name, **kw)  # the preset is timm's architecture: same names, same outputs
    preset.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(b, 3, h, w)
    with torch.no_grad():
        out, feats = ref(x), ref.forward_features(x)
        pooled = ref.forward_head(feats, pre_logits=True)
        for m, src in ((fast, "from_timm"), (preset, "preset")):
            _rel(m(x), out, f"{what} {src} output")
            _rel(m.forward_features(x), feats, f"{what} {src} forward_features")
            _rel(m.forward_head(m.forward_features(x), pre_logits=True), pooled, f"{what} {src} pre_logits")
        # forward_intermediates is untouched by the head
        fa, ia = ref.forward_intermediates(x, indices=[0], output_fmt="NLC")
        fb, ib = fast.forward_intermediates(x, indices=[0], output_fmt="NLC")
        _rel(fb, fa, f"{what} forward_intermediates final")
        _rel(ib[0], ia[0], f"{what} forward_intermediates block 0")


@pytest.mark.parametrize("latent_len,pool", [(1, "token"), (4, "avg"), (4, "token"), (3, "")])
def test_timm_attention_pool_latent_len(latent_len, pool):
    """timm's AttentionPoolLatent with several latent rows and each pooling, on a class-token model."""
    from timm.layers import AttentionPoolLatent as TimmPool

    ref = timm.create_model("vit_base_patch16_siglip_224", embed_dim=96, num_heads=2, depth=1, img_size=32,
                            class_token=True)
    ref.attn_pool = TimmPool(96, num_heads=2, mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             act_layer=nn.GELU, latent_len=latent_len, pool_type=pool)
    ref = _randomise(ref).eval()
    fast = fastvit.from_timm(ref)
    assert isinstance(fast.attn_pool, AttentionPoolLatent)
    assert fast.attn_pool.latent_len == latent_len and fast.attn_pool.pool == pool
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        _rel(fast(x), ref(x), f"latent_len={latent_len} pool={pool!r}")


def test_map_head_runs_on_fastvit_ops(monkeypatch):
    """q / kv / proj through ops.linear, one ops.attention with N_q = latent_len != N_kv, ops.mlp
    with the LayerNorm prologue and the residual."""
    from fastvit import ops

    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, class_token=False,
                          global_pool="map", num_classes=0, attn_pool_latent_len=3, attn_pool_type="avg").eval()
    seen = {"attention": [], "mlp": []}
    real_attention, real_mlp = ops.attention, ops.mlp

    def attention(q, k, v, scale=None, **kw):
        seen["attention"].append((tuple(q.shape), tuple(k.shape)))
        return real_attention(q, k, v, scale, **kw)

    def mlp(x, *args, **kw):
        seen["mlp"].append((tuple(x.shape), kw.get("ln_weight") is not None, kw.get("residual") is x))
        return real_mlp(x, *args, **kw)

    monkeypatch.setattr(ops, "attention", attention)
    monkeypatch.setattr(ops, "mlp", mlp)
    with torch.no_grad():
        y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 64)
    assert seen["attention"] == [((2, 2, 16, 32), (2, 2, 16, 32)), ((2, 2, 3, 32), (2, 2, 16, 32))]
    assert seen["mlp"][-1] == ((2, 3, 64), True, True)


# --------------------------------------------------------------------------- the MAP head on every backend
@pytest.mark.usefixtures("full_precision")
@pytest.mark.parametrize("head_dim", [64, 72])
@pytest.mark.parametrize("latent_len", [1, 4])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", [b for b in fastvit.backends.BACKENDS if b != "torch"])
def test_siglip_model_matches_torch_backend(backend, dtype, atol, rtol, latent_len, head_dim):
    """A SigLIP-style model (no class token, tanh GELU, MAP head) on a fast backend (Triton's CPU
    interpreter here) against the torch backend; tolerances as tests/test_model_backends.py."""
    for op, props in (("patch_embed", {}), ("attention", {"head_dim": head_dim}), ("linear", {"act": None}),
                      ("mlp", {"act": "gelu_tanh"}), ("layer_norm", {})):
        why = skip_reason(backend, op, DEV, dtype=dtype, **props)
        if why:
            pytest.skip(why)
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=2 * head_dim, depth=1, num_heads=2, mlp_ratio=2.0,
                          class_token=False, global_pool="map", num_classes=5, act="gelu_tanh",
                          attn_pool_latent_len=latent_len, attn_pool_type="avg" if latent_len > 1 else "token")
    with torch.no_grad():  # weights of realistic scale (LN weights near 1, the rest small)
        for name, p in m.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    m = m.to(DEV).eval()
    x = torch.randn(3, 3, 32, 32, device=DEV)

    def run(b, dt):
        with torch.no_grad():
            return m.to(dt).set_backend(b)(x.to(dt))

    ref32, lowp, got = run("torch", torch.float32), run("torch", dtype), run(backend, dtype)
    assert got.dtype == dtype and got.shape == (3, 5)
    if dtype == torch.float32:
        assert_close_rule(got, ref32, None, atol=1e-4, rtol=rtol, name=f"{backend} SigLIP logits")
    else:
        assert_close_rule(got, ref32, lowp, atol=atol, rtol=rtol, name=f"{backend} SigLIP logits")


@pytest.mark.parametrize("backend", fastvit.backends.BACKENDS)
def test_siglip_model_compiles_fullgraph(backend):
    """torch.compile(fullgraph=True) through the MAP head: no graph break (the batch-broadcast
    latent query included), same output as eager."""
    why = skip_reason(backend, "attention", DEV, dtype=torch.float32, head_dim=32)
    if why:
        pytest.skip(why)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, class_token=False,
                          global_pool="map", num_classes=3, attn_pool_latent_len=2, attn_pool_type="avg",
                          backend=backend).to(DEV).eval()
    x = torch.randn(2, 3, 32, 32, device=DEV)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = m(x)  # imports the backend outside the trace
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- Hugging Face
def _clip_cfg(**kw):
    args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, projection_dim=24)
    args.update(kw)
    return T.CLIPVisionConfig(**args)


def _siglip_cfg(**kw):
    args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8)
    args.update(kw)
    return T.SiglipVisionConfig(**args)


HF_CASES = [
    ("clip-vision-quickgelu", lambda: T.CLIPVisionModel(_clip_cfg()), 32),
    ("clip-vision-gelu", lambda: T.CLIPVisionModel(_clip_cfg(hidden_act="gelu")), 32),
    ("clip-projection", lambda: T.CLIPVisionModelWithProjection(_clip_cfg()), 32),
    ("siglip-base", lambda: T.SiglipVisionModel(_siglip_cfg(hidden_size=768, intermediate_size=3072,
                                                            num_attention_heads=12, num_hidden_layers=1,
                                                            patch_size=16, image_size=64)), 64),
    ("siglip-so400m", lambda: T.SiglipVisionModel(_siglip_cfg(hidden_size=1152, intermediate_size=4304,
                                                              num_attention_heads=16, num_hidden_layers=1,
                                                              patch_size=14, image_size=60)), 60),
    ("siglip-no-head", lambda: T.SiglipVisionModel(_siglip_cfg(vision_use_head=False)), 32),
]


@pytest.mark.parametrize("source", ["model", "folder"])
@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: c[0])
def test_hf_parity(case, source, tmp_path):
    what, build, size = case
    hf = _randomise(build()).eval()
    if source == "folder":
        hf.save_pretrained(str(tmp_path))
        fast = fastvit.from_pretrained(str(tmp_path))
    else:
        fast = fastvit.from_hf(hf)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        out = hf_outputs(fast, x)
        _rel(out.last_hidden_state, ref.last_hidden_state, f"{what} last_hidden_state")
        _rel(fast.forward_features(x), ref.last_hidden_state, f"{what} forward_features")
        if hasattr(ref, "image_embeds"):
            _rel(out.image_embeds, ref.image_embeds, f"{what} image_embeds")
            _rel(fast(x), ref.image_embeds, f"{what} forward")
            assert "logits" not in out
        elif ref.pooler_output is not None:
            _rel(out.pooler_output, ref.pooler_output, f"{what} pooler_output")
            _rel(fast(x), ref.pooler_output, f"{what} forward")
        else:
            assert out.pooler_output is None


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_two_tower_folder_takes_the_vision_tower(kind, tmp_path):
    """CLIPModel / SiglipModel folders (what the hub holds): the vision tower and the projection load,
    the text tower's keys are left out by name."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    if kind == "clip":
        hf = T.CLIPModel(T.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    else:
        hf = T.SiglipModel(T.SiglipConfig(vision_config=vision, text_config=text))
    hf = _randomise(hf).eval()
    hf.save_pretrained(str(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    for fast in (fastvit.from_pretrained(str(tmp_path)), fastvit.from_hf(hf)):
        assert not any(k.startswith("text") for k in fast.state_dict())
        with torch.no_grad():
            ref = hf.get_image_features(pixel_values=x)
            ref = getattr(ref, "pooler_output", ref)
            _rel(fast(x), ref, f"{kind} image features")


def test_hf_clip_hidden_states_and_attentions():
    hf = _randomise(T.CLIPVisionModelWithProjection(_clip_cfg(attn_implementation="eager"))).eval()
    fast = fastvit.from_hf(hf)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True, output_attentions=True)
        out = hf_outputs(fast, x, output_hidden_states=True, output_attentions=[1])
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        _rel(a, b, f"hidden_states[{i}]")
    assert out.attentions[0] is None
    _rel(out.attentions[1], ref.attentions[1], "attentions[1]")


def test_hf_strict_loading_lists_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = T.SiglipVisionModel(_siglip_cfg())
    hf.save_pretrained(str(tmp_path))
    path = tmp_path / "model.safetensors"
    sd = load_file(str(path))
    bias = next(k for k in sd if k.endswith("head.attention.in_proj_bias"))
    sd.pop(bias)
    sd[bias.replace("head.attention.in_proj_bias", "encoder.layers.0.extra.weight")] = torch.zeros(1)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected Hugging Face keys \(1\): .*encoder\.layers\.0\.extra"):
        fastvit.from_pretrained(str(tmp_path))
    sd.pop(next(k for k in sd if k.endswith("extra.weight")))
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): \['attn_pool\.kv\.bias', 'attn_pool\.q\.bias'\]"):
        fastvit.from_pretrained(str(tmp_path))


def test_hf_folder_with_processor_loads_both(tmp_path):
    """A CLIP folder with its CLIPImageProcessor: load_model gives the model and a bit-exact processor."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    hf = _randomise(T.CLIPVisionModelWithProjection(_clip_cfg())).eval()
    hf.save_pretrained(str(tmp_path))
    hp = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    hp.save_pretrained(str(tmp_path))
    fast, pre = load_model(str(tmp_path))
    photo = Image.fromarray(skdata.chelsea())
    x = hp(photo, return_tensors="pt")["pixel_values"]
    assert torch.equal(pre(photo), x)
    with torch.no_grad():
        _rel(fast(x), hf(pixel_values=x).image_embeds, "CLIP folder image_embeds")


def test_fastvit_convert_of_a_siglip_folder(tmp_path):
    """`fastvit convert` writes the MAP head and the processor; the converted folder loads back."""
    from fastvit.factory import convert

    hf = _randomise(T.SiglipVisionModel(_siglip_cfg())).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    T.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(tmp_path / "hf"))
    convert(str(tmp_path / "hf"), str(tmp_path / "fv"))
    fast, pre = load_model(str(tmp_path / "fv"))
    _, pre_hf = load_model(str(tmp_path / "hf"))
    assert fast.global_pool == "map" and pre.to_dict() == pre_hf.to_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _rel(fast(x), hf(pixel_values=x).pooler_output, "converted SigLIP pooler_output")


# --------------------------------------------------------------------------- presets
# the ViT-class CLIP / SigLIP towers (timm's own key names); EVA-02's CLIP towers are timm Eva models,
# checked through the key conversion in tests/test_eva_rope.py
PRESETS = [n for n in fastvit.list_models() if ("_clip_" in n or "_siglip_" in n) and not n.startswith("eva02")]


def _act_name(mod) -> str:
    name = type(mod).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    return "gelu_tanh" if name == "GELUTanh" or getattr(mod, "approximate", "none") == "tanh" else "gelu"


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_timm_architectures(name):
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
        fast = fastvit.create_model(name)
    assert {k: tuple(v.shape) for k, v in fast.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert fast.blocks[0].mlp.act == _act_name(ref.blocks[0].mlp.act)
    assert fast.blocks[0].norm1.eps == ref.blocks[0].norm1.eps
    assert (fast.global_pool, fast.num_classes) == (ref.global_pool, ref.num_classes)
    pre = Preprocessor.from_preset(name)
    mean = (0.5,) * 3 if "siglip" in name else fastvit.registry.CLIP_MEAN
    assert pre.crop_size == fast.patch_embed.img_size and pre.mean == mean and pre.resample == "bicubic"
    if "siglip" in name:  # resize to the square input size, no crop
        assert pre.size == fast.patch_embed.img_size


def test_preset_runs_and_load_model_names_its_processor():
    with torch.device("meta"):  # the architecture only: no 400M-parameter init on the CPU
        m, pre = load_model(None, "vit_so400m_patch14_siglip_384")
        assert pre.to_dict() == Preprocessor.from_preset("vit_so400m_patch14_siglip_384").to_dict()
        assert pre.size == (384, 384) and pre.crop_size == (384, 384)
        m, pre = load_model(None, "vit_base_patch16_clip_quickgelu_224.openai")
        assert m.num_classes == 512 and m.blocks[0].mlp.act == "quick_gelu"
        assert pre.size == 224 and pre.crop_size == (224, 224) and pre.mean == fastvit.registry.CLIP_MEAN
        # a tag that is no preset: the architecture's preset, and its processor
        m, pre = load_model(None, "vit_base_patch16_siglip_224.webli")
        assert m.global_pool == "map" and pre.size == (224, 224)
    m = fastvit.create_model("vit_so400m_patch14_siglip_384", depth=1)  # 384 px on patch 14: border dropped
    with torch.no_grad():
        assert m(torch.randn(1, 3, 384, 384)).shape == (1, 1152)


# --------------------------------------------------------------------------- model API
def test_convert_round_trip_keeps_map_head_and_projection(tmp_path):
    import json

    from fastvit.convert import model_kwargs

    for kw in (dict(class_token=False, global_pool="map", attn_pool_latent_len=2, attn_pool_type="avg",
                    act="gelu_tanh"),
               dict(pre_norm=True, fc_norm=True, head_bias=False, act="quick_gelu", norm_eps=1e-5)):
        m = _randomise(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                         num_classes=7, **kw)).eval()
        again = VisionTransformer(**json.loads(json.dumps(model_kwargs(m)))).eval()
        again.load_state_dict(m.state_dict(), strict=True)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(again(x), m(x))


def test_reset_classifier_and_pooling_as_timm():
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, class_token=False,
                          global_pool="map", num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = m(x)
        assert torch.equal(m.pool(m.forward_features(x), "avg"), pooled), "the MAP head pools whatever pool_type"
        m.reset_classifier(4)
        assert m.attn_pool is not None and m(x).shape == (2, 4)
        m.reset_classifier(4, "avg")
        assert m.attn_pool is None and m.global_pool == "avg" and m(x).shape == (2, 4)
    with pytest.raises(ValueError, match="global_pool: 'map' cannot be added"):
        m.reset_classifier(4, "map")
    p = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                          head_bias=False)
    assert p.head.bias is None
    p.reset_classifier(5)
    assert p.head.bias is None and p.head.out_features == 5


# --------------------------------------------------------------------------- refusals
def test_refusals_are_value_errors_naming_the_feature():
    from timm.layers import AttentionPoolLatent as TimmPool

    with pytest.raises(ValueError, match="attn_pool_type: expected 'token', 'avg' or ''"):
        VisionTransformer(depth=1, class_token=False, global_pool="map", attn_pool_type="max")
    with pytest.raises(ValueError, match="global_pool: expected one of"):
        VisionTransformer(depth=1, global_pool="prr")
    small = dict(embed_dim=64, num_heads=2, depth=1, img_size=32)
    with pytest.raises(ValueError, match=r"global_pool='prr'"):
        fastvit.from_timm(timm.create_model("vit_base_patch16_224", global_pool="prr", **small))
    variants = ((dict(qk_norm=True), "qk_norm"), (dict(pos_embed="abs", feat_size=4), "position embedding"),
                (dict(q_proj=False), "q_proj=False"), (dict(latent_dim=32), "latent_dim"))
    for pool_kw, feature in variants:
        ref = timm.create_model("vit_base_patch16_siglip_224", **small)
        ref.attn_pool = TimmPool(64, num_heads=2, norm_layer=nn.LayerNorm, **pool_kw)
        with pytest.raises(ValueError, match=feature):
            fastvit.from_timm(ref)
    cfg = T.SiglipConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=8),
                         text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2))
    with pytest.raises(ValueError, match="SiglipForImageClassification.*SiglipVisionModel"):
        fastvit.from_hf(T.SiglipForImageClassification(cfg))
