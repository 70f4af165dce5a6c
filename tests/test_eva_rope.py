"""The EVA family (timm's ``Eva`` class: EVA-02, DINOv3, timm / naver RoPE ViTs) and Hugging Face
``DINOv3ViTModel``: RoPE tables bit-identical to timm / HF, parity in fp32 (random weights), dynamic
image sizes, presets and checkpoint files, attention maps that include the rotation, the Triton
interpreter against the torch backend, a fullgraph compile, and the refusals.

Models are shrunk (depth 2, width 64 in 2 heads of 32, 32-64 px images) so the file runs in
seconds; every parameter is moved off its init (zero q / v biases, constant LayerScale and learnt
RoPE frequencies would hide a wrong mapping).
"""

import json

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit import VisionTransformer
from fastvit.checkpoint import CheckpointError, load_state_dict
from fastvit.convert import convert_timm_state_dict, model_kwargs, timm_model_kwargs
from fastvit.factory import hf_outputs
from fastvit.rope import RopeCat, RopeDinoV3, RopeMixed
from utils import assert_rel_close, check_compiles_fullgraph, check_model_on_backend, randomise_params

timm = pytest.importorskip("timm")
T = pytest.importorskip("transformers")
from timm.layers import pos_embed_sincos as timm_rope  # noqa: E402

REL_TOL = 1e-4  # max |diff| / max |reference| (the bound)
_SMALL = dict(embed_dim=64, num_heads=2, depth=2)


pytestmark = pytest.mark.usefixtures("hub_offline")


_randomise = randomise_params


def _rel(out: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    return assert_rel_close(out, ref, what, REL_TOL)


def _timm(name, **kw):
    return _randomise(timm.create_model(name, pretrained=False, **kw)).eval()


# --------------------------------------------------------------------------- RoPE tables
GRIDS = [(4, 4), (3, 5), (16, 16)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_rope_tables_are_timms_bit_for_bit(grid, indexing):
    """fp32 tables equal timm's exactly: axial 'cat' (with / without EVA's ref_feat_shape, both
    layouts), mixed (learnt per block and head) and DINOv3 (each coordinate normalisation)."""
    for ref_shape in (None, (16, 16)):
        for temp in (10000.0, 100.0):
            for half in (False, True):
                timm_cat = timm_rope.RotaryEmbeddingCat(dim=32, temperature=temp, in_pixels=False,
                                                        ref_feat_shape=ref_shape, grid_indexing=indexing,
                                                        rotate_half=half)
                want = timm_cat.get_embed(shape=list(grid))
                got = RopeCat(32, temp, indexing, 0.0, ref_shape, half)(grid)
                assert got.dtype == torch.float32 and torch.equal(got, want), (ref_shape, temp, half)
    mixed = timm_rope.RotaryEmbeddingMixed(dim=96, depth=3, num_heads=3, temperature=10.0, grid_indexing=indexing)
    ours = RopeMixed(32, 3, 3, 10.0, indexing)
    with torch.no_grad():
        ours.freqs.copy_(mixed.freqs)
    assert torch.equal(torch.stack(ours(grid)), mixed.get_embed(shape=list(grid)))  # (depth, H, N, 2 d)
    for norm in ("separate", "min", "max"):
        want = timm_rope.RotaryEmbeddingDinoV3(dim=32, temperature=100.0, normalize_coords=norm, grid_indexing=indexing,
                                               grid_offset=0.25).get_embed(shape=list(grid))
        assert torch.equal(RopeDinoV3(32, 100.0, normalize_coords=norm, grid_offset=0.25, grid_indexing=indexing)(grid),
                           want), norm
    want = timm_rope.RotaryEmbeddingDinoV3(dim=32, min_period=0.5, max_period=50.0).get_embed(shape=list(grid))
    assert torch.equal(RopeDinoV3(32, None, min_period=0.5, max_period=50.0)(grid), want)


@pytest.mark.parametrize("grid", [(4, 4), (6, 3)], ids=str)
def test_hf_dinov3_rope_is_hfs_bit_for_bit(grid):
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

    cfg = T.DINOv3ViTConfig(hidden_size=64, num_attention_heads=2, patch_size=8, rope_theta=100.0)
    rope = DINOv3ViTRopePositionEmbedding(cfg).eval()  # training mode would augment the coordinates
    cos, sin = rope(torch.zeros(1, 3, grid[0] * 8, grid[1] * 8))
    assert torch.equal(RopeDinoV3(32, 100.0, hf=True)(grid), torch.cat([sin, cos], -1))


def test_rope_tables_are_computed_once_per_grid_and_stay_float32(monkeypatch):
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=0, rope_type="cat", ref_feat_shape=4,
                          dynamic_img_size=True, **_SMALL).eval()
    calls = []
    real = RopeCat.forward

    def counting(self, grid):
        calls.append(tuple(grid))
        return real(self, grid)

    monkeypatch.setattr(RopeCat, "forward", counting)
    with torch.no_grad():
        for size in (32, 32, 48, 48, 32):
            m(torch.randn(1, 3, size, size))
    assert calls == [(4, 4), (6, 6), (4, 4)], "one table per new grid, not per forward"
    m.half()
    assert m.rope.bands.dtype == torch.float32, "frequencies stay float32 under .half()"
    assert m._block_pos_inputs((4, 4))[0][0].dtype == torch.float32


# --------------------------------------------------------------------------- timm parity
TIMM_CASES = [
    # SwiGLU packed (GluMlp), q / v biases, ref_feat_shape 16 x 16 over a 4 x 4 grid, mean pool + fc_norm
    ("eva02-tiny", "eva02_tiny_patch14_224", dict(img_size=56, num_classes=10, **_SMALL), (2, 56, 56)),
    # separate q / k / v projections, SwiGLU split (fc1_g / fc1_x) with the sub-LN
    ("eva02-base", "eva02_base_patch14_224", dict(img_size=56, num_classes=10, **_SMALL), (2, 56, 56)),
    # EVA-02 CLIP: + scale_attn_inner (attn.norm), class-token pooling, projection head
    ("eva02-clip", "eva02_base_patch16_clip_224", dict(img_size=64, num_classes=12, **_SMALL), (2, 64, 64)),
    # DINOv3: 4 registers, LayerScale, rotate_half RoPE on centred coordinates, eps 1e-5
    ("dinov3", "vit_small_patch16_dinov3", dict(img_size=64, num_classes=10, **_SMALL), (2, 64, 48)),
    ("dinov3-qkvb", "vit_small_patch16_dinov3_qkvb", dict(img_size=64, num_classes=10, **_SMALL), (2, 64, 64)),
    ("dinov3-plus", "vit_small_plus_patch16_dinov3", dict(img_size=64, num_classes=10, **_SMALL), (2, 64, 64)),
    # naver RoPE-ViT: 'xy' axial at temperature 100, class token, no position embedding
    ("rope-axial", "vit_base_patch16_rope_224", dict(img_size=64, num_classes=10, **_SMALL), (2, 64, 64)),
    # learnt per-block per-head frequencies (rope.freqs)
    ("rope-mixed", "vit_base_patch16_rope_mixed_224", dict(img_size=64, num_classes=10, **_SMALL), (2, 64, 64)),
    # learnt position embedding beside the class token + RoPE
    ("rope-ape", "vit_small_patch16_rope_ape_224", dict(img_size=64, num_classes=10, **_SMALL), (2, 64, 64)),
    # timm SBB: one register, no class token, mean pool + fc_norm
    ("rope-reg1-gap", "vit_base_patch16_rope_reg1_gap_256", dict(img_size=64, num_classes=10, **_SMALL), (2, 64, 64)),
]


@pytest.mark.parametrize("case", TIMM_CASES, ids=lambda c: c[0])
def test_timm_parity(case):
    what, name, kw, (b, h, w) = case
    ref = _timm(name, **kw)
    models = [(fastvit.from_timm(ref), "from_timm")]
    if name in fastvit.list_models():
        preset = fastvit.create_model(name, **kw)  # the preset is timm's architecture
        load_state_dict(preset, convert_timm_state_dict(ref.state_dict(), preset), source="timm")
        models.append((preset, "preset"))
    fast = models[0][0]
    x = torch.randn(b, 3, h, w)
    with torch.no_grad():
        out, feats = ref(x), ref.forward_features(x)
        pooled = ref.forward_head(feats, pre_logits=True)
        for m, src in models:
            _rel(m.forward_features(x), feats, f"{what} {src} forward_features")
            _rel(m(x), out, f"{what} {src} logits")
            _rel(m.forward_head(m.forward_features(x), pre_logits=True), pooled, f"{what} {src} pre_logits")
        fa, ia = ref.forward_intermediates(x, indices=[0], output_fmt="NCHW")
        fb, ib = fast.forward_intermediates(x, indices=[0], output_fmt="NCHW")
        _rel(fb, fa, f"{what} forward_intermediates final")
        _rel(ib[0], ia[0], f"{what} forward_intermediates block 0")


@pytest.mark.parametrize("name,kw,sizes", [
    ("vit_small_patch16_dinov3", dict(img_size=64, **_SMALL), [(48, 80), (96, 32)]),
    ("eva02_tiny_patch14_224", dict(img_size=56, dynamic_img_size=True, **_SMALL), [(84, 42), (28, 28)]),
    ("vit_base_patch16_rope_mixed_224", dict(img_size=64, dynamic_img_size=True, **_SMALL), [(80, 48)]),
    ("vit_small_patch16_rope_ape_224", dict(img_size=64, dynamic_img_size=True, **_SMALL), [(48, 96)]),
], ids=["dinov3", "eva02", "rope-mixed", "rope-ape"])
def test_dynamic_img_size_matches_timm(name, kw, sizes):
    """Other image sizes than the training one: timm rebuilds the RoPE table for the grid (EVA-02
    rescales positions to ref_feat_shape, DINOv3 renormalises) and resamples any position embedding."""
    ref = _timm(name, **kw)
    fast = fastvit.from_timm(ref)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            _rel(fast.forward_features(x), ref.forward_features(x), f"{name} at {h}x{w} forward_features")
            _rel(fast(x), ref(x), f"{name} at {h}x{w} output")


def test_preset_loads_a_timm_checkpoint_file(tmp_path):
    """create_model(name, checkpoint=timm .safetensors): split q / k / v, fc1_g / fc1_x and the
    q / v biases are fused at loading, strictly."""
    from safetensors.torch import save_file

    kw = dict(img_size=56, num_classes=10, **_SMALL)
    ref = _timm("eva02_base_patch14_224", **kw)
    path = str(tmp_path / "eva02.safetensors")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(".q_proj." in k for k in sd) and any(".fc1_g." in k for k in sd)
    save_file(sd, path)
    fast = fastvit.create_model("eva02_base_patch14_224", checkpoint=path, **kw)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        _rel(fast(x), ref(x), "eva02 preset from a timm checkpoint file")
    sd.pop("blocks.1.attn.v_proj.bias")
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.qkv has the bias of \['k', 'q'\] only"):
        fastvit.create_model("eva02_base_patch14_224", checkpoint=path, **kw)


def test_convert_round_trip(tmp_path):
    """model_kwargs (what `fastvit convert` stores) rebuilds every RoPE kind, SwiGLU, the sub-LNs."""
    models = [fastvit.from_timm(_timm(n, img_size=64, **_SMALL)) for n in
              ("eva02_base_patch16_clip_224", "vit_base_patch16_rope_mixed_224", "vit_small_plus_patch16_dinov3")]
    models.append(fastvit.from_hf(_randomise(T.DINOv3ViTModel(_dinov3_cfg()))))
    for m in models:
        again = VisionTransformer(**json.loads(json.dumps(model_kwargs(m)))).eval()
        again.load_state_dict(m.state_dict(), strict=True)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(again(x), m(x))


# --------------------------------------------------------------------------- Hugging Face DINOv3
def _dinov3_cfg(**kw):
    base = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2,
                num_register_tokens=4, image_size=32, patch_size=8, layer_norm_eps=1e-5)
    return T.DINOv3ViTConfig(**dict(base, **kw))


HF_CASES = [
    ("dinov3-gelu", dict()),
    ("dinov3-swiglu", dict(use_gated_mlp=True, hidden_act="silu")),
    ("dinov3-qkv-biases", dict(key_bias=True, num_register_tokens=0)),
]


@pytest.mark.parametrize("source", ["model", "folder"])
@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: c[0])
def test_hf_dinov3_parity(case, source, tmp_path):
    what, kw = case
    hf = _randomise(T.DINOv3ViTModel(_dinov3_cfg(**kw))).eval()
    if source == "folder":
        hf.save_pretrained(str(tmp_path))
        fast = fastvit.from_pretrained(str(tmp_path))
    else:
        fast = fastvit.from_hf(hf)
    for h, w in ((32, 32), (48, 24)):  # HF computes RoPE for any size: so does fastvit
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            want = hf(pixel_values=x)
            got = hf_outputs(fast, x)
        _rel(got.last_hidden_state, want.last_hidden_state, f"{what} last_hidden_state {h}x{w}")
        _rel(got.pooler_output, want.pooler_output, f"{what} pooler_output {h}x{w}")


def test_hf_dinov3_config_defaults_are_transformers():
    """A config.json that omits a field means DINOv3ViTConfig's default."""
    from fastvit.convert import _HF_DINOV3_DEFAULTS, hf_config_to_kwargs

    cfg = T.DINOv3ViTConfig()
    assert {k: getattr(cfg, k) for k in _HF_DINOV3_DEFAULTS} == _HF_DINOV3_DEFAULTS
    assert hf_config_to_kwargs({"model_type": "dinov3_vit"}) == hf_config_to_kwargs(cfg)


def test_hf_dinov3_attentions_and_strict_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _randomise(T.DINOv3ViTModel(_dinov3_cfg())).eval()
    hf.config._attn_implementation = "eager"
    fast = fastvit.from_hf(hf)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = hf(pixel_values=x, output_attentions=True).attentions
        got = hf_outputs(fast, x, output_attentions=True).attentions
    for i in range(2):
        torch.testing.assert_close(got[i], want[i], atol=1e-5, rtol=1e-4)
    hf.save_pretrained(str(tmp_path))
    path = tmp_path / "model.safetensors"
    sd = load_file(str(path))
    sd["model.layer.0.attention.extra.weight"] = torch.zeros(1)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected Hugging Face DINOv3 keys \(1\)"):
        fastvit.from_pretrained(str(tmp_path))


def test_hf_dinov3_folder_with_processor_loads_both(tmp_path):
    """load_model on a DINOv3 folder: the model and a processor bit-exact with DINOv3ViTImageProcessor
    (which rescales before resizing, so the resize runs on float pixels), through `fastvit convert` too."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    from fastvit.factory import convert, load_model

    hf = _randomise(T.DINOv3ViTModel(_dinov3_cfg())).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    hp = T.DINOv3ViTImageProcessor(size={"height": 48, "width": 32}, resample=3)
    hp.save_pretrained(str(tmp_path / "hf"))
    convert(str(tmp_path / "hf"), str(tmp_path / "fv"))
    for folder in ("hf", "fv"):
        fast, pre = load_model(str(tmp_path / folder))
        for photo in (Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.astronaut())):
            x = hp(photo, return_tensors="pt")["pixel_values"]
            assert torch.equal(pre(photo), x), folder
        with torch.no_grad():
            _rel(fast(x), hf(pixel_values=x).pooler_output, f"DINOv3 {folder} folder pooler_output")


# --------------------------------------------------------------------------- attention maps
def _timm_probs(ref, x):
    """Per block softmax(R(q) R(k)^T * scale) from timm's own modules (its RoPE, its rotation)."""
    h, rope = ref._pos_embed(ref.patch_embed(x))
    h = ref.norm_pre(h)
    out = []
    for i, blk in enumerate(ref.blocks):
        a = blk.attn
        r = rope[i] if ref.rope_mixed else rope
        B, N, _ = h.shape
        bias = a.qkv.bias if getattr(a, "q_bias", None) is None else torch.cat([a.q_bias, a.k_bias, a.v_bias])
        qkv = nn.functional.linear(blk.norm1(h), a.qkv.weight, bias)
        qkv = qkv.reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        n = a.num_prefix_tokens
        q = torch.cat([q[:, :, :n], timm_rope.apply_rot_embed_cat(q[:, :, n:], r, half=a.rotate_half)], 2)
        k = torch.cat([k[:, :, :n], timm_rope.apply_rot_embed_cat(k[:, :, n:], r, half=a.rotate_half)], 2)
        out.append(torch.softmax(q @ k.transpose(-1, -2) * a.scale, -1))
        h = blk(h, rope=r)
    return out


@pytest.mark.parametrize("name", ["vit_base_patch16_rope_mixed_224", "vit_small_patch16_dinov3_qkvb"],
                         ids=["rope-mixed", "dinov3"])
def test_attention_probs_include_the_rope(name):
    """viz / forward_intermediates probabilities: rows sum to 1 and equal the formula with timm's
    RoPE (per-head tables for mixed, rotate_half for DINOv3); rollout folds the same maps."""
    from fastvit import viz

    ref = _timm(name, img_size=48, **_SMALL)
    fast = fastvit.from_timm(ref)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        maps = viz.attention_maps(fast, x, [0, 1])
        rolled, roll = viz.attention_with_rollout(fast, x, [0, 1])
        want = _timm_probs(ref, x)
    N = fast.num_prefix_tokens + 9
    for i in range(2):
        assert maps[i].shape == (2, 2, N, N)
        torch.testing.assert_close(maps[i].sum(-1), torch.ones(2, 2, N), atol=1e-5, rtol=0)
        torch.testing.assert_close(maps[i], want[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rolled[i], maps[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(roll, viz.attention_rollout([maps[0], maps[1]]), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- backends and compile
KERNEL_CASES = [
    # rope 'cat' (one table), SwiGLU with sub-LN, attention inner norm, q / v biases
    ("eva02", "eva02_base_patch16_clip_224", ("attention.rope",), "swiglu"),
    # rotate_half table, 4 registers, LayerScale
    ("dinov3", "vit_small_patch16_dinov3_qkvb", ("attention.rope",), "gelu"),
    # per-head tables
    ("rope-mixed", "vit_base_patch16_rope_mixed_224", ("attention.rope", "attention.rope_per_head"), "gelu"),
]


@pytest.mark.usefixtures("full_precision")
@pytest.mark.parametrize("backend", [b for b in fastvit.backends.BACKENDS if b != "torch"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c[0])
def test_family_on_kernel_backend_matches_torch(case, backend):
    """One tiny model per family on a kernel backend (Triton's interpreter here, once it declares
    the RoPE features) against the torch backend, fp32."""
    what, name, features, act = case
    check_model_on_backend(lambda: fastvit.from_timm(_timm(name, img_size=32, embed_dim=32, num_heads=2, depth=1,
                                                           num_classes=5)), backend, what, features, act)


def test_eva02_compiles_fullgraph():
    """torch.compile(fullgraph=True) of an EVA-02 (RoPE, SwiGLU + sub-LN, attention inner norm): no
    graph break, eager's output, at two grids (42: its table built inside the graph)."""
    check_compiles_fullgraph(dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                                  global_pool="avg", act="swiglu", mlp_ratio=8 / 3, scale_mlp=True,
                                  scale_attn_inner=True, rope_type="cat", ref_feat_shape=16, dynamic_img_size=True),
                             sizes=(28, 42), scale=0.1)


# --------------------------------------------------------------------------- presets
PRESETS = [n for n in fastvit.list_models() if n.startswith("eva02") or "dinov3" in n or "_rope_" in n]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_timm_architectures(name):
    """timm's architecture (its model described by timm_model_kwargs) and every parameter of its
    state dict under fastvit's names; timm's preprocessing."""
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
        fast = fastvit.create_model(name)
        described = VisionTransformer(**timm_model_kwargs(ref))
        sd = convert_timm_state_dict(ref.state_dict(), fast)
    assert model_kwargs(fast) == model_kwargs(described)
    assert {k: tuple(v.shape) for k, v in fast.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    cfg = timm.models.get_pretrained_cfg(name)
    pre = fastvit.registry.preprocess_config(name)
    assert (pre["crop_pct"], pre["crop_mode"], tuple(pre["mean"]), tuple(pre["std"]), tuple(pre["input_size"])) == \
        (cfg.crop_pct, cfg.crop_mode, tuple(cfg.mean), tuple(cfg.std), tuple(cfg.input_size))


# --------------------------------------------------------------------------- refusals
def test_refusals_are_value_errors_naming_the_feature():
    small = dict(img_size=32, **_SMALL)
    timm_variants = [
        ("vit_base_patch16_rope_224", dict(qk_norm=True), "qk_norm"),
        ("vit_base_patch16_rope_224", dict(qkv_fused=False, num_kv_heads=1), "grouped-query attention"),
        ("eva02_tiny_patch14_224", dict(use_post_norm=True), "use_post_norm"),
        ("vit_small_patch16_dinov3", dict(attn_only_layer_scale=True), "attn_only_layer_scale"),
        ("vit_base_patch16_rope_224", dict(rope_type="mrope", rope_grid_indexing="ij"), "RotaryEmbeddingMRope"),
        ("eva02_tiny_patch14_224", dict(global_pool="map"), "global_pool='map'"),
        ("vit_base_patch16_rope_224", dict(norm_layer=timm.layers.RmsNorm), "norm layer RmsNorm"),
    ]
    for name, kw, feature in timm_variants:
        ref = timm.create_model(name, pretrained=False, **dict(small, **kw))
        with pytest.raises(ValueError, match=feature):
            fastvit.from_timm(ref)
    ref = timm.create_model("vit_base_patch16_rope_224", pretrained=False, **small)
    ref.blocks[1].attn.gate = nn.Linear(64, 64)  # timm's gated=True (Sapiens2-style), on one block
    with pytest.raises(ValueError, match="gated attention"):
        fastvit.from_timm(ref)
    with pytest.raises(ValueError, match="rope_type: expected one of 'cat', 'mixed', 'dinov3'"):
        VisionTransformer(depth=1, rope_type="mrope")
    with pytest.raises(ValueError, match="rope_rotate_half: rope_type='dinov3' rotates halves"):
        VisionTransformer(depth=1, rope_type="dinov3", rope_rotate_half=False)
    with pytest.raises(ValueError, match="rope_hf: only rope_type='dinov3'"):
        VisionTransformer(depth=1, rope_type="cat", rope_hf=True)
    with pytest.raises(ValueError, match="head_dim: expected a multiple of 4"):
        VisionTransformer(embed_dim=60, num_heads=6, depth=1, rope_type="cat")
    with pytest.raises(ValueError, match="DINOv3ViTBackbone"):
        fastvit.from_hf({}, config={"model_type": "dinov3_vit", "architectures": ["DINOv3ViTBackbone"],
                                    "hidden_size": 64})
    with pytest.raises(ValueError, match="use_gated_mlp with hidden_act='gelu'"):
        fastvit.from_hf(T.DINOv3ViTModel(_dinov3_cfg(use_gated_mlp=True, hidden_act="gelu")))
    with pytest.raises(ValueError, match="mlp_bias=False with proj_bias=True"):
        fastvit.from_hf(T.DINOv3ViTModel(_dinov3_cfg(mlp_bias=False)))
