"""NaFlex families: Hugging Face Siglip2VisionModel / Siglip2Model and timm NaFlexVit.

* processors bit-exact: Siglip2ImageProcessor (``pixel_values``, ``pixel_attention_mask``,
  ``spatial_shapes``) and timm's NaFlex eval transform + collator, over the scikit-image photos
  cropped to several aspect ratios, at several patch budgets;
* parity in fp32 with random weights (small widths) over those images, one batch mixing them:
  HF through :func:`fastvit.hf_outputs` (the padded inputs, packed inside), timm through its
  padded NaFlex forward (``patch_coord`` / ``patch_valid``) against ``forward_packed``;
* ``forward_packed`` against the padded (per-image) path, pre-patchified input, plain ViTs;
* strict key mapping, saved folders, presets, ``fastvit convert``, ``fastvit embed`` with a token
  budget, the refusals; the packed model on the Triton interpreter against the torch backend.
"""

import json
import os

import numpy as np
import pytest
import torch

import fastvit
from fastvit import NaFlexPreprocessor, NaFlexVisionTransformer, VisionTransformer
from fastvit.checkpoint import CheckpointError
from fastvit.naflex import fit_to_patches, patchify
from utils import assert_rel_close, randomise_params, skip_reason

timm = pytest.importorskip("timm")
T = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.usefixtures("hub_offline")

REL_TOL = 1e-4  # max |diff| / max |reference| (the bound)
# (photo, crop (top, left, height, width)): aspect ratios from 1 : 3.3 to 4 : 1, and tiny
_CROPS = [("astronaut", (0, 0, 512, 512)), ("chelsea", (0, 0, 300, 451)), ("coffee", (100, 0, 90, 300)),
          ("rocket", (0, 100, 427, 110)), ("astronaut", (200, 200, 7, 23))]


@pytest.fixture(scope="module")
def photos():
    out = []
    for name, (t, l, h, w) in _CROPS:
        img = getattr(skdata, name)()
        out.append(np.ascontiguousarray(img[t:t + h, l:l + w, :3]))
    return out


def _siglip2_config(**kw):
    cfg = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_patches=16,
               patch_size=8)
    cfg.update(kw)
    return T.Siglip2VisionConfig(**cfg)


def _hf_siglip2(**kw):
    torch.manual_seed(0)
    return randomise_params(T.Siglip2VisionModel(_siglip2_config(**kw))).eval()


# --------------------------------------------------------------------------- geometry + processors
def test_fit_to_patches_matches_both_libraries():
    from timm.data.naflex_transforms import get_image_size_for_seq
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 2000, (300, 2), generator=g).tolist() + [[1, 1], [16, 16], [15, 4000], [4000, 15]]
    for i, (h, w) in enumerate(sizes):
        p = (8, 14, 16)[i % 3]
        n = (1, 16, 64, 256, 576, 1024)[i % 6]
        got = fit_to_patches(h, w, p, n)
        assert got == tuple(get_image_size_for_max_num_patches(h, w, p, n)), (h, w, p, n)
        assert got == tuple(get_image_size_for_seq((h, w), p, n)[1]), (h, w, p, n)
        assert (got[0] // p) * (got[1] // p) <= n and got[0] % p == 0 and got[1] % p == 0


@pytest.mark.parametrize("budget", [16, 64, 256])
@pytest.mark.parametrize("pil_backend", [False, True], ids=["torch", "pil"])
def test_hf_processor_bit_exact(photos, budget, pil_backend):
    cls = T.Siglip2ImageProcessorPil if pil_backend else T.Siglip2ImageProcessor
    hp = cls(patch_size=16, max_num_patches=budget)
    # a saved config names the class without its backend suffix: a config asking for PIL says so
    cfg = dict(json.loads(hp.to_json_string()), image_processor_type=cls.__name__)
    pre = NaFlexPreprocessor.from_hf(cfg)
    assert pre.backend == ("pil" if pil_backend else "torch") and pre.max_num_patches == budget
    ref = hp([Image.fromarray(p) for p in photos], return_tensors="pt")
    as_tensors = [torch.from_numpy(p).permute(2, 0, 1) for p in photos]
    for inputs in (photos, [Image.fromarray(p) for p in photos], as_tensors):
        got = pre.hf_inputs(inputs)
        for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
            assert got[k].dtype == ref[k].dtype, k
            assert torch.equal(got[k], ref[k]), f"{k}: max diff {(got[k].float() - ref[k].float()).abs().max()}"


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("budget", [24, 100])
def test_timm_eval_transform_bit_exact(photos, interpolation, budget):
    from timm.data import create_transform
    from timm.data.naflex_dataset import NaFlexCollator

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    cfg = dict(interpolation=interpolation, mean=mean, std=std)
    tf = create_transform(is_training=False, naflex=True, patch_size=14, max_seq_len=budget, patchify=True, **cfg)
    ref, _ = NaFlexCollator(max_seq_len=budget)([(tf(Image.fromarray(p)), 0) for p in photos])
    got = NaFlexPreprocessor.from_timm(cfg, patch_size=14, max_seq_len=budget).timm_inputs(photos)
    for k in ("patches", "patch_coord", "patch_valid"):
        assert got[k].dtype == ref[k].dtype, k
        assert torch.equal(got[k], ref[k]), f"{k}: max diff {(got[k].float() - ref[k].float()).abs().max()}"


def test_processor_dict_round_trip_and_errors():
    pre = NaFlexPreprocessor(patch_size=(14, 14), max_num_patches=100, resample="bicubic", backend="pil",
                             fuse_rescale=False)
    assert NaFlexPreprocessor.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    with pytest.raises(ValueError, match="max_num_patches: expected an int >= 1"):
        NaFlexPreprocessor(max_num_patches=0)
    with pytest.raises(ValueError, match="resample: expected one of"):
        NaFlexPreprocessor(resample="sinc")
    with pytest.raises(ValueError, match="kind 'naflex'"):
        NaFlexPreprocessor.from_dict(dict(patch_size=16))
    with pytest.raises(ValueError, match="Siglip2ImageProcessor"):
        NaFlexPreprocessor.from_hf(dict(image_processor_type="SiglipImageProcessor"))
    with pytest.raises(ValueError, match="max_num_patches: 4 is less than image 0's"):
        NaFlexPreprocessor(patch_size=8, max_num_patches=16).hf_inputs([np.zeros((64, 64, 3), np.uint8)], 4)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        patchify(torch.zeros(3, 10, 16), 8)


# --------------------------------------------------------------------------- Hugging Face parity
@pytest.mark.parametrize("budget", [16, 40, 96])
def test_hf_siglip2_parity_mixed_batch(photos, budget):
    hf = _hf_siglip2()
    fast = fastvit.from_hf(hf)
    assert isinstance(fast, NaFlexVisionTransformer) and fast.pos_embed_interp == "bilinear"
    pre = NaFlexPreprocessor(patch_size=8, max_num_patches=budget)
    inputs = pre.hf_inputs(photos)
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True)
        out = fastvit.hf_outputs(fast, **inputs, output_hidden_states=True)
        images = pre(photos)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert len(out.hidden_states) == len(ref.hidden_states) == 3  # the embeddings, then each layer
    for i, (gh, gw) in enumerate(inputs["spatial_shapes"].tolist()):
        n = gh * gw
        assert_rel_close(out.last_hidden_state[i, :n], ref.last_hidden_state[i, :n], f"image {i} tokens", REL_TOL)
        for j, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            assert_rel_close(a[i, :n], b[i, :n], f"image {i} hidden state {j}", REL_TOL)
        assert not out.last_hidden_state[i, n:].any()  # padding rows: nothing computed
        with torch.no_grad():  # the padded (one image at a time) path of the same model
            alone = fast.forward_features(images[i][None])
            pooled = fast.forward_head(alone, pre_logits=True)
        assert_rel_close(alone[0], ref.last_hidden_state[i, :n], f"image {i} alone", REL_TOL)
        assert_rel_close(pooled[0], ref.pooler_output[i], f"image {i} pooled alone", REL_TOL)
    assert_rel_close(out.pooler_output, ref.pooler_output, "pooler_output", REL_TOL)


def test_hf_siglip2_mixed_budgets_in_one_pack(photos):
    """Images preprocessed at different budgets (16 to 96 patches) in one packed forward, each
    against Siglip2VisionModel run on that image alone at its own budget."""
    hf = _hf_siglip2()
    fast = fastvit.from_hf(hf)
    budgets = [16, 96, 40, 64, 24]
    pres = [NaFlexPreprocessor(patch_size=8, max_num_patches=b) for b in budgets]
    images = [p.process(x) for p, x in zip(pres, photos)]
    with torch.no_grad():
        out = fast.forward_packed(images)
        for i, (p, x) in enumerate(zip(pres, photos)):
            ref = hf(**p.hf_inputs([x]))
            n = out.split()[i].shape[0]
            assert_rel_close(out.split()[i], ref.last_hidden_state[0, :n], f"budget {budgets[i]} tokens", REL_TOL)
            assert_rel_close(out.pooled[i], ref.pooler_output[0], f"budget {budgets[i]} pooled", REL_TOL)


def test_hf_siglip2_without_head_and_two_tower_folders(tmp_path, photos):
    hf = _hf_siglip2(vision_use_head=False, num_patches=25, hidden_act="gelu")
    fast = fastvit.from_hf(hf)
    assert fast.attn_pool is None and fast.global_pool == "" and fast.blocks[0].mlp.act == "gelu"
    inputs = NaFlexPreprocessor(patch_size=8, max_num_patches=30).hf_inputs(photos[:3])
    with torch.no_grad():
        ref, out = hf(**inputs), fastvit.hf_outputs(fast, **inputs)
    assert out.pooler_output is None and ref.pooler_output is None
    for i, (gh, gw) in enumerate(inputs["spatial_shapes"].tolist()):
        assert_rel_close(out.last_hidden_state[i, :gh * gw], ref.last_hidden_state[i, :gh * gw], "no head", REL_TOL)

    # a Siglip2Model folder (two towers: the text tower is dropped), with its processor
    torch.manual_seed(0)
    cfg = T.Siglip2Config(vision_config=_siglip2_config().to_dict(),
                          text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=64, bos_token_id=1, eos_token_id=2,
                                           pad_token_id=0))
    two = randomise_params(T.Siglip2Model(cfg)).eval()
    folder = str(tmp_path / "siglip2")
    two.save_pretrained(folder)
    T.Siglip2ImageProcessor(patch_size=8, max_num_patches=40).save_pretrained(folder)
    model, pre = fastvit.factory.load_model(folder)
    assert isinstance(model, NaFlexVisionTransformer) and isinstance(pre, NaFlexPreprocessor)
    assert pre.max_num_patches == 40 and pre.patch_size == (8, 8)
    inputs = pre.hf_inputs(photos)
    with torch.no_grad():
        ref = two.vision_model(**inputs)
        out = fastvit.hf_outputs(model, **inputs)
        from_object = fastvit.hf_outputs(fastvit.from_hf(two), **inputs)
    assert_rel_close(out.pooler_output, ref.pooler_output, "Siglip2Model folder pooled", REL_TOL)
    assert torch.equal(from_object.pooler_output, out.pooler_output)
    # fastvit convert writes a fastvit folder that reads back with the same processor and outputs
    dst = fastvit.factory.convert(folder, str(tmp_path / "converted"))
    again, pre2 = fastvit.factory.load_model(dst)
    assert isinstance(again, NaFlexVisionTransformer) and pre2 == pre
    with torch.no_grad():
        assert torch.equal(fastvit.hf_outputs(again, **inputs).pooler_output, out.pooler_output)


def test_hf_siglip2_strict_key_mapping():
    hf = _hf_siglip2(num_hidden_layers=1)
    sd = dict(hf.state_dict())
    cfg = hf.config.to_dict()
    fast = fastvit.from_hf(sd, config=cfg)  # a state dict + config.json dict
    assert fast.patch_embed.proj.weight.shape == (64, 3, 8, 8)
    # the linear patch weight over (ph, pw, C) patches is the conv weight permuted
    w = sd["embeddings.patch_embedding.weight"].reshape(64, 8, 8, 3).permute(0, 3, 1, 2)
    assert torch.equal(fast.patch_embed.proj.weight, w)
    with pytest.raises(CheckpointError, match=r"unexpected Hugging Face keys.*embeddings\.extra"):
        fastvit.from_hf(dict(sd, **{"embeddings.extra": torch.zeros(1)}), config=cfg)
    missing = {k: v for k, v in sd.items() if "head.mlp.fc2" not in k}
    with pytest.raises(CheckpointError, match="attn_pool.mlp.fc2"):
        fastvit.from_hf(missing, config=cfg)
    with pytest.raises(ValueError, match="num_patches expected a square number"):
        fastvit.from_hf(sd, config=dict(cfg, num_patches=20))
    with pytest.raises(ValueError, match="Siglip2ForImageClassification.*Siglip2VisionModel"):
        fastvit.from_hf(sd, config=dict(cfg, architectures=["Siglip2ForImageClassification"]))


def test_hf_outputs_refusals():
    fast = fastvit.from_hf(_hf_siglip2(num_hidden_layers=1))
    inputs = NaFlexPreprocessor(patch_size=8, max_num_patches=16).hf_inputs([np.zeros((40, 16, 3), np.uint8)])
    assert fastvit.hf_outputs is fastvit.factory.hf_outputs
    with pytest.raises(ValueError, match="output_attentions: not available"):
        fastvit.hf_outputs(fast, **inputs, output_attentions=True)
    bad = inputs["pixel_attention_mask"].clone()
    bad[0, 0] = 0
    with pytest.raises(ValueError, match="pixel_attention_mask: image 0 expected 10 valid positions"):
        fastvit.hf_outputs(fast, inputs["pixel_values"], pixel_attention_mask=bad,
                           spatial_shapes=inputs["spatial_shapes"])
    bad = inputs["pixel_attention_mask"].clone()
    bad[0, 0], bad[0, 12] = 0, 1
    with pytest.raises(ValueError, match="valid positions first"):
        fastvit.hf_outputs(fast, inputs["pixel_values"], pixel_attention_mask=bad,
                           spatial_shapes=inputs["spatial_shapes"])
    with pytest.raises(ValueError, match=r"spatial_shapes: expected \(1, 2\)"):
        fastvit.hf_outputs(fast, inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"],
                           spatial_shapes=torch.tensor([[5, 2], [1, 1]]))
    with pytest.raises(ValueError, match="pixel_attention_mask: expected"):
        fastvit.hf_outputs(fast, inputs["pixel_values"], spatial_shapes=inputs["spatial_shapes"])


# --------------------------------------------------------------------------- timm parity
_TIMM_SMALL = dict(embed_dim=64, num_heads=4, depth=2, patch_size=8, pos_embed_grid_size=(4, 4))
TIMM_CASES = [
    ("gap-reg4", "naflexvit_base_patch16_gap", {}),
    ("ar-preserving", "naflexvit_base_patch16_par_gap", {}),
    ("map-reg1", "naflexvit_base_patch16_map", {}),
    ("siglip-bilinear", "naflexvit_base_patch16_siglip", {}),
    ("so150m2-no-qkv-bias", "naflexvit_so150m2_patch16_reg1_map", dict(mlp_ratio=2.5)),
    ("cls-token-align-corners-noaa", "naflexvit_base_patch16_gap",
     dict(class_token=True, global_pool="token", fc_norm=False, pos_embed_align_corners=True,
          pos_embed_antialias=False)),
    ("avgmax-pre-norm", "naflexvit_base_patch16_gap", dict(global_pool="avgmax", pre_norm=True, reg_tokens=0)),
]


@pytest.mark.parametrize("case", TIMM_CASES, ids=lambda c: c[0])
def test_timm_naflexvit_parity_mixed_batch(photos, case):
    what, name, kw = case
    torch.manual_seed(0)
    ref = randomise_params(timm.create_model(name, pretrained=False, **dict(_TIMM_SMALL, **kw))).eval()
    fast = fastvit.from_timm(ref)
    assert isinstance(fast, NaFlexVisionTransformer)
    cfg = ref.pretrained_cfg
    pre = NaFlexPreprocessor.from_timm(cfg, patch_size=8, max_seq_len=48)
    batch = pre.timm_inputs(photos)
    with torch.no_grad():
        feats = ref.forward_features(batch["patches"], patch_coord=batch["patch_coord"],
                                     patch_valid=batch["patch_valid"])["patches"]
        out_ref = ref.forward_head(feats, patch_valid=batch["patch_valid"])
        images = pre(photos)
        packed = fast.forward_packed(images)
        pre_patched = fast.forward_packed([patchify(x, 8) for x in images], packed.grids)
    got = packed.logits if packed.logits is not None else packed.pooled
    assert_rel_close(got, out_ref, f"{what} head output", REL_TOL)
    for i, t in enumerate(packed.split()):
        assert_rel_close(t, feats[i, :t.shape[0]], f"{what} image {i} tokens", REL_TOL)
        with torch.no_grad():
            alone = fast.forward_features(images[i][None])
        assert_rel_close(alone[0], t, f"{what} image {i} padded path", REL_TOL)
    assert torch.equal(pre_patched.tokens, packed.tokens)


def test_timm_naflex_presets_and_preprocessing():
    names = fastvit.list_models("naflexvit_*")
    assert len(names) == 7
    from fastvit.convert_naflex import convert_timm as convert_timm_state_dict

    for name in names:
        with torch.device("meta"):
            ref = timm.create_model(name, pretrained=False)
            fast = fastvit.create_model(name)
        assert isinstance(fast, NaFlexVisionTransformer)
        assert {k: tuple(v.shape) for k, v in convert_timm_state_dict(ref.state_dict(), fast).items()} == \
            {k: tuple(v.shape) for k, v in fast.state_dict().items()}, name
        pre = NaFlexPreprocessor.from_preset(name)
        if name.endswith("_siglip"):  # SigLIP 2's own processor
            assert (pre.backend, pre.resample, pre.max_num_patches) == ("torch", "bilinear", 256)
        else:  # timm's NaFlex eval transform at its default budget
            cfg = ref.pretrained_cfg
            assert (pre.backend, pre.resample, pre.max_num_patches) == ("pil", cfg["interpolation"], 576)
            assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])


def test_timm_checkpoint_file_and_hub_folder(tmp_path, photos):
    from safetensors.torch import save_file

    small = dict(_TIMM_SMALL, depth=1)
    torch.manual_seed(0)
    ref = randomise_params(timm.create_model("naflexvit_base_patch16_map", pretrained=False, **small)).eval()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    path = str(tmp_path / "naflex.safetensors")
    save_file(sd, path)
    fast = fastvit.create_model("naflexvit_base_patch16_map", checkpoint=path, embed_dim=64, num_heads=4, depth=1,
                                patch_size=8, img_size=32)
    # timm's hub layout: config.json (architecture, model_args, pretrained_cfg) + timm-named weights
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    cfg = dict(architecture="naflexvit_base_patch16_map", num_classes=1000, pretrained_cfg=dict(ref.pretrained_cfg),
               model_args=dict(embed_dim=64, num_heads=4, depth=1, patch_size=8, img_size=32))
    (folder / "config.json").write_text(json.dumps(cfg, default=list))
    hub, pre = fastvit.factory.load_model(str(folder))
    assert isinstance(hub, NaFlexVisionTransformer) and (pre.backend, pre.max_num_patches) == ("pil", 576)
    images = NaFlexPreprocessor.from_timm(ref.pretrained_cfg, patch_size=8, max_seq_len=48)(photos)
    with torch.no_grad():
        want = torch.cat([ref(x[None]) for x in images])  # timm's own fixed-size path, one image at a time
        for m, what in ((fast, "checkpoint file"), (hub, "hub folder")):
            assert_rel_close(m.forward_packed(images).logits, want, what, REL_TOL)


def test_timm_naflex_refusals():
    small = dict(_TIMM_SMALL, depth=1)
    for kw, feature in ((dict(pos_embed="factorized"), "pos_embed='factorized'"),
                        (dict(pos_embed_use_grid_sample=True), "grid_sample"),
                        (dict(rope_type="axial"), "RoPE"),
                        (dict(qk_norm=True), "q_norm"),
                        (dict(patchify_channels_last=False), "patchify_channels_last=False"),
                        (dict(pool_include_prefix=True, reg_tokens=1), "pool_include_prefix")):
        ref = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, **dict(small, **kw))
        with pytest.raises(ValueError, match=feature):
            fastvit.from_timm(ref)
    sd = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, **small).state_dict()
    fast = fastvit.create_model("naflexvit_base_patch16_gap", embed_dim=64, num_heads=4, depth=1, patch_size=8,
                                img_size=32)
    from fastvit.checkpoint import load_state_dict
    from fastvit.convert_naflex import convert_timm as convert_timm_state_dict

    load_state_dict(fast, convert_timm_state_dict(sd, fast), source="timm")  # strict: every key mapped
    with pytest.raises(CheckpointError, match=r"embeds\.patch_interp"):
        convert_timm_state_dict(dict(sd, **{"embeds.patch_interp": torch.zeros(1)}), fast)
    with pytest.raises(ValueError, match="pos_embed_interp: expected one of"):
        NaFlexVisionTransformer(depth=1, pos_embed_interp="nearest")
    with pytest.raises(ValueError, match="no_embed_class / dynamic_img_size"):
        NaFlexVisionTransformer(depth=1, no_embed_class=False)


# --------------------------------------------------------------------------- forward_packed
def _small_vit(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, dynamic_img_size=True)
    args.update(kw)
    torch.manual_seed(0)
    return randomise_params(VisionTransformer(**args)).eval()


@pytest.mark.parametrize("kw", [dict(), dict(global_pool="avg", fc_norm=True, reg_tokens=2),
                                dict(global_pool="map", class_token=False, attn_pool_latent_len=3,
                                     attn_pool_type="avg"),
                                dict(global_pool="max", init_values=0.5), dict(global_pool="", num_classes=0),
                                dict(dynamic_img_pad=True, global_pool="avgmax", pre_norm=True)],
                         ids=["token", "avg-reg", "map-latent3", "max-ls", "no-pool", "pad-avgmax"])
def test_forward_packed_equals_padded_path(kw):
    m = _small_vit(**kw)
    sizes = [(8, 40), (32, 32), (24, 8), (8, 8)] if not kw.get("dynamic_img_pad") else [(7, 40), (30, 33), (1, 1)]
    imgs = [torch.randn(3, h, w) for h, w in sizes]
    with torch.no_grad():
        out = m.forward_packed(imgs)
        assert out.cu_seqlens.dtype == torch.int32 and out.cu_seqlens[-1] == out.tokens.shape[0]
        for i, (img, t) in enumerate(zip(imgs, out.split())):
            f = m.forward_features(img[None])
            assert_rel_close(t, f[0], f"image {i} tokens", 1e-5)
            if out.pooled is None:
                assert not m.global_pool
                continue
            assert_rel_close(out.pooled[i], m.forward_head(f, pre_logits=True)[0], f"image {i} pooled", 1e-5)
            assert_rel_close(out.logits[i], m(img[None])[0], f"image {i} logits", 1e-5)
        if out.pooled is not None:
            assert m.forward_packed(imgs, pre_logits=True).logits is None


def test_forward_packed_patch_inputs_and_refusals():
    m = _small_vit()
    imgs = [torch.randn(3, 16, 40), torch.randn(3, 8, 8)]
    grids = [(2, 5), (1, 1)]
    with torch.no_grad():
        ref = m.forward_packed(imgs)
        rows = [patchify(x, 8) for x in imgs]
        assert ref.grids == grids
        assert torch.equal(m.forward_packed(rows, grids).tokens, ref.tokens)
        assert torch.equal(m.forward_packed(torch.cat(rows), grids).tokens, ref.tokens)
    with pytest.raises(ValueError, match=r"images\[1\]: expected patches \(1, 192\)"):
        m.forward_packed([rows[0], rows[0]], grids)
    with pytest.raises(ValueError, match=r"expected packed patches \(11, 192\)"):
        m.forward_packed(torch.cat(rows)[:-1], grids)
    with pytest.raises(ValueError, match=r"grids: expected one \(rows, cols\) >= 1"):
        m.forward_packed(rows, [(2, 5), (0, 1)])
    with pytest.raises(TypeError, match="images: expected a non-empty list"):
        m.forward_packed([])
    with pytest.raises(ValueError, match=r"images\[0\]: expected an image \(3, H, W\)"):
        m.forward_packed([torch.randn(1, 8, 8)])
    with pytest.raises(TypeError, match="expected a float image"):
        m.forward_packed([torch.zeros(3, 8, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="multiples of the patch size"):
        m.forward_packed([torch.randn(3, 9, 8)])
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        _small_vit(dynamic_img_size=False).forward_packed([torch.randn(3, 16, 16)])
    with pytest.raises(ValueError, match="RoPE or a relative position bias"):
        _small_vit(rope_type="cat", pos_embed="none").forward_packed(imgs)
    with pytest.raises(ValueError, match="DeiT distillation"):
        _small_vit(distilled=True).forward_packed(imgs)


def test_forward_packed_triton_interpreter():
    reason = skip_reason("triton", "attention_varlen", dtype=torch.float32, head_dim=16)
    if reason:
        pytest.skip(reason)
    m = fastvit.from_hf(_hf_siglip2(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2))
    imgs = [torch.randn(3, 8, 24), torch.randn(3, 16, 16), torch.randn(3, 8, 8)]
    with torch.no_grad():
        ref = m.set_backend("torch").forward_packed(imgs)
        out = m.set_backend("triton").forward_packed(imgs)
        assert_rel_close(out.tokens, ref.tokens, "triton tokens", 1e-4)
        assert_rel_close(out.pooled, ref.pooled, "triton MAP head", 1e-4)
        # fp16 (the interpreter's other exact dtype): within a few fp16 roundings of the fp32 reference
        half = m.half().forward_packed([x.half() for x in imgs])
        low = m.set_backend("torch").forward_packed([x.half() for x in imgs])
    assert half.tokens.dtype == torch.float16
    err = (half.tokens.float() - ref.tokens).abs().max().item()
    base = (low.tokens.float() - ref.tokens).abs().max().item()
    assert err <= 2 * base + 2e-3, f"triton fp16 tokens: max error {err:.2e}, torch fp16 {base:.2e}"


# --------------------------------------------------------------------------- fastvit embed
def test_embed_packs_with_a_token_budget(tmp_path, photos):
    from fastvit.embed import embed_to_dir, iter_embeddings, load_embeddings

    hf = _hf_siglip2()
    folder = str(tmp_path / "siglip2")
    hf.save_pretrained(folder)
    T.Siglip2ImageProcessor(patch_size=8, max_num_patches=30).save_pretrained(folder)
    files = []
    for i, p in enumerate(photos):
        files.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(p).save(files[-1])
    bad = str(tmp_path / "broken.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG not really")
    model, pre = fastvit.factory.load_model(folder)
    with torch.no_grad():
        ref = hf(**pre.hf_inputs([Image.open(f) for f in files])).pooler_output
    # a budget of 40 tokens: runs of one or two images per packed forward
    out = str(tmp_path / "emb")
    summary = embed_to_dir(model, pre, files + [bad], out, batch_size=4, shard_size=3, max_tokens=40, log=False)
    assert summary["embedded"] == len(files) and summary["skipped"] == 1
    paths, emb = load_embeddings(out)
    assert paths == files
    assert_rel_close(emb, ref, "embed_to_dir vs Siglip2VisionModel pooler_output", REL_TOL)
    got = torch.cat([e for _, e in iter_embeddings(model, pre, files, batch_size=8, on_skip=lambda *a: None)])
    assert_rel_close(got, ref, "iter_embeddings (no budget)", REL_TOL)

    from fastvit.cli import main

    out2 = str(tmp_path / "emb-cli")
    assert main(["embed", *files, "--checkpoint", folder, "-o", out2, "--max-tokens", "25", "--no-progress"]) == 0
    assert_rel_close(load_embeddings(out2)[1], emb, "fastvit embed --max-tokens 25", 1e-5)
    fixed = fastvit.create_model("vit_tiny_patch16_224", depth=1)
    from fastvit.preprocess import Preprocessor

    with pytest.raises(ValueError, match="max_tokens: a token budget is for NaFlex models"):
        embed_to_dir(fixed, Preprocessor.for_model(fixed), files, str(tmp_path / "x"), max_tokens=100, log=False)
    with pytest.raises(ValueError, match="max_tokens: expected an int >= 1"):
        embed_to_dir(model, pre, files, str(tmp_path / "y"), max_tokens=0, log=False)
    assert os.path.isfile(os.path.join(out, "summary.json"))
