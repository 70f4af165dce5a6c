"""BEiT / BEiT v2: parity with timm ``Beit`` and transformers ``BeitModel`` /
``BeitForImageClassification`` (fp32, random weights), the relative position bias (per block,
shared, both; at the stored grid and fitted to another one as each library does), attention maps
with the bias, a fullgraph compile, the Triton interpreter against the torch backend, presets,
folders and the refusals.

Models are shrunk (depth 2, width 64, 4 heads of 16, 32-64 px images on 16 px patches) so the whole
file runs in seconds; the relative position tables, LayerScale and q / v biases are randomised
(both libraries initialise them to constants that would hide a wrong mapping).
"""

import json

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit import VisionTransformer
from fastvit.checkpoint import CheckpointError
from fastvit.convert import convert_timm_state_dict, timm_model_kwargs
from fastvit.factory import hf_outputs
from fastvit.relpos import relative_position_index
from utils import assert_rel_close, check_compiles_fullgraph, check_model_on_backend, randomise_params

timm = pytest.importorskip("timm")
T = pytest.importorskip("transformers")

REL_TOL = 1e-4  # max |diff| / max |reference| (the bound)
_SMALL = dict(embed_dim=64, num_heads=4, depth=2, img_size=64)


pytestmark = pytest.mark.usefixtures("hub_offline")


def _randomise(model: nn.Module) -> nn.Module:
    """Every parameter off its init; the relative position tables get logits of order 1, so the
    bias shapes the attention."""
    return randomise_params(model, std_for={"relative_position_bias_table": 1.0})


def _rel(out: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    return assert_rel_close(out, ref, what, REL_TOL)


def _timm_beit(name="beit_base_patch16_224", **kw):
    return _randomise(timm.create_model(name, pretrained=False, **dict(_SMALL, **kw))).eval()


def _check_timm(fast, ref, x, what):
    with torch.no_grad():
        feats = ref.forward_features(x)
        _rel(fast.forward_features(x), feats, f"{what} forward_features")
        _rel(fast(x), ref(x), f"{what} logits")
        _rel(fast.forward_head(fast.forward_features(x), pre_logits=True), ref.forward_head(feats, pre_logits=True),
             f"{what} pre_logits")


# --------------------------------------------------------------------------- timm
TIMM_CASES = [
    ("beit-per-block", "beit_base_patch16_224", dict(), (2, 64, 64)),
    ("beitv2-per-block", "beitv2_base_patch16_224", dict(), (2, 64, 64)),
    ("beit-shared-abs", "beit_base_patch16_224",
     dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_abs_pos_emb=True), (3, 64, 64)),
    ("beit-both-token", "beit_base_patch16_224",
     dict(use_shared_rel_pos_bias=True, global_pool="token", init_values=None), (1, 64, 64)),
    ("beit-non-square-no-qkv-bias", "beitv2_base_patch16_224", dict(img_size=(48, 80), qkv_bias=False), (2, 48, 80)),
]


@pytest.mark.parametrize("case", TIMM_CASES, ids=lambda c: c[0])
def test_timm_parity(case):
    what, name, kw, (b, h, w) = case
    ref = _timm_beit(name, **kw)
    fast = fastvit.from_timm(ref)
    assert isinstance(fast, VisionTransformer) and not fast.training
    x = torch.randn(b, 3, h, w)
    _check_timm(fast, ref, x, what)
    with torch.no_grad():  # forward_intermediates carries the bias too
        fa, ia = ref.forward_intermediates(x, indices=[0], output_fmt="NLC")
        fb, ib = fast.forward_intermediates(x, indices=[0], output_fmt="NLC")
    _rel(fb, fa, f"{what} forward_intermediates final")
    _rel(ib[0], ia[0], f"{what} forward_intermediates block 0")


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "beitv2_base_patch16_224"])
def test_preset_loads_a_timm_checkpoint_file(name, tmp_path):
    """create_model(name, checkpoint=timm file): q / v biases, gammas and tables take fastvit's names."""
    from safetensors.torch import save_file

    ref = _timm_beit(name)
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    fast = fastvit.create_model(name, checkpoint=path, **_SMALL)
    _check_timm(fast, ref, torch.randn(2, 3, 64, 64), f"{name} preset + checkpoint")


def test_timm_checkpoint_loaded_at_another_size(tmp_path):
    """A checkpoint stored at 64 px loaded into models at 96 px and (48, 80) px: tables fitted by timm's
    resize_rel_pos_bias_table, pos_embed resampled, as timm's checkpoint_filter_fn does."""
    from safetensors.torch import save_file
    from timm.models.beit import checkpoint_filter_fn

    src = _timm_beit(use_shared_rel_pos_bias=True, use_abs_pos_emb=True)
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    for size in (96, (48, 80)):
        ref = timm.create_model("beit_base_patch16_224", pretrained=False, **dict(
            _SMALL, img_size=size, use_shared_rel_pos_bias=True, use_abs_pos_emb=True)).eval()
        ref.load_state_dict(checkpoint_filter_fn(src.state_dict(), ref), strict=True)
        fast = fastvit.create_model("beit_base_patch16_224", checkpoint=path, **dict(
            _SMALL, img_size=size, use_shared_rel_pos_bias=True, pos_embed="learn"))
        fast.load_state_dict(convert_timm_state_dict(src.state_dict(), fast), strict=True)  # the same, in memory
        h, w = size if isinstance(size, tuple) else (size, size)
        _check_timm(fast, ref, torch.randn(2, 3, h, w), f"checkpoint at 64 loaded at {size}")


def test_dynamic_img_size_matches_timm_set_input_size():
    """dynamic_img_size=True: a model stored at 64 px runs at other grids as timm's Beit after
    set_input_size (tables fitted by resize_rel_pos_bias_table, pos_embed resampled), and back."""
    src = _timm_beit(use_shared_rel_pos_bias=True, use_abs_pos_emb=True)
    fast = VisionTransformer(**dict(timm_model_kwargs(src), dynamic_img_size=True)).eval()
    fast.load_state_dict(convert_timm_state_dict(src.state_dict(), fast), strict=True)
    for size in ((96, 96), (64, 112), (64, 64)):
        ref = _timm_beit(use_shared_rel_pos_bias=True, use_abs_pos_emb=True)
        ref.load_state_dict(src.state_dict())
        ref.set_input_size(img_size=size)
        _check_timm(fast, ref, torch.randn(2, 3, *size), f"dynamic {size}")


def test_bias_is_gathered_once_per_grid(monkeypatch):
    """The (H, N, N) bias comes from the cache at a grid already seen; a new grid or a changed table
    recomputes it; one tensor serves every block when the table is shared."""
    import fastvit.relpos as relpos

    m = VisionTransformer(**dict(_SMALL, patch_size=16, use_shared_rel_pos_bias=True, pos_embed="none",
                                 global_pool="avg", dynamic_img_size=True)).eval()
    calls = []
    real = relpos.relative_position_index
    monkeypatch.setattr(relpos, "relative_position_index", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    seen = []
    real_attention = fastvit.ops.attention
    monkeypatch.setattr(fastvit.ops, "attention",
                        lambda *a, bias=None, **k: seen.append(bias) or real_attention(*a, bias=bias, **k))
    with torch.no_grad():
        for size in (64, 64, 96, 96):
            m(torch.randn(1, 3, size, size))
        assert calls == [(4, 4), (6, 6)]
        assert len(seen) == 8 and seen[0] is seen[1] is seen[2] is seen[3] and seen[4] is seen[7]
        assert seen[4].shape == (4, 37, 37)
        m.rel_pos_bias.relative_position_bias_table.add_(1.0)
        m(torch.randn(1, 3, 96, 96))
    assert calls == [(4, 4), (6, 6), (6, 6)]


def test_relative_position_index_is_timms():
    from timm.models.beit import gen_relative_position_index

    for grid in ((1, 1), (4, 4), (3, 5), (14, 14)):
        assert torch.equal(relative_position_index(grid), gen_relative_position_index(grid)), grid


# --------------------------------------------------------------------------- Hugging Face
def _beit_cfg(**kw):
    args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, attn_implementation="eager")
    args.update(kw)
    return T.BeitConfig(**args)


HF_CASES = [
    ("per-block-mean", lambda: T.BeitModel(_beit_cfg(use_relative_position_bias=True))),
    ("shared-abs-cls", lambda: T.BeitModel(_beit_cfg(use_shared_relative_position_bias=True, use_mask_token=True,
                                                     use_absolute_position_embeddings=True, use_mean_pooling=False))),
    ("both-no-layerscale", lambda: T.BeitModel(_beit_cfg(use_relative_position_bias=True, layer_scale_init_value=0.0,
                                                         use_shared_relative_position_bias=True))),
    ("classifier", lambda: T.BeitForImageClassification(_beit_cfg(use_relative_position_bias=True, num_labels=5))),
]


@pytest.mark.parametrize("source", ["model", "folder"])
@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: c[0])
def test_hf_parity(case, source, tmp_path):
    what, build = case
    hf = _randomise(build()).eval()
    if source == "folder":
        hf.save_pretrained(str(tmp_path))
        fast = fastvit.from_pretrained(str(tmp_path))
    else:
        fast = fastvit.from_hf(hf)
    for size in (32, 48):  # HF BEiT runs at any size: tables resized bilinearly, pos_embed bicubic
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = hf(pixel_values=x)
            out = hf_outputs(fast, x)
            if hasattr(ref, "logits"):
                _rel(out.logits, ref.logits, f"{what} {size} logits")
                _rel(fast(x), ref.logits, f"{what} {size} forward")
                continue
            _rel(out.last_hidden_state, ref.last_hidden_state, f"{what} {size} last_hidden_state")
            _rel(out.pooler_output, ref.pooler_output, f"{what} {size} pooler_output")
            _rel(fast(x), ref.pooler_output, f"{what} {size} forward")


def test_hf_attentions_include_the_bias():
    """hf_outputs(output_attentions=...) equals HF's eager attention probabilities (bias inside)."""
    hf = _randomise(T.BeitModel(_beit_cfg(use_relative_position_bias=True,
                                          use_shared_relative_position_bias=True))).eval()
    fast = fastvit.from_hf(hf)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True)
        out = hf_outputs(fast, x, output_attentions=True)
    for i in range(2):
        _rel(out.attentions[i], ref.attentions[i], f"attentions[{i}]")


def test_hf_without_pooler():
    hf = _randomise(T.BeitModel(_beit_cfg(use_relative_position_bias=True), add_pooling_layer=False)).eval()
    fast = fastvit.from_hf(hf)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        out = hf_outputs(fast, x)
    assert ref.pooler_output is None and out.pooler_output is None
    _rel(out.last_hidden_state, ref.last_hidden_state, "no pooler last_hidden_state")


def test_hf_older_key_names(tmp_path):
    """Checkpoints written before transformers 5 (encoder.layer.i.attention.attention.query ...,
    encoder.relative_position_bias) load to the same model."""
    from safetensors.torch import load_file, save_file

    hf = _randomise(T.BeitModel(_beit_cfg(use_relative_position_bias=True,
                                          use_shared_relative_position_bias=True))).eval()
    hf.save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    old = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
           "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
           "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
           "relative_position_bias.": "attention.attention.relative_position_bias."}
    renamed = {}
    for k, v in sd.items():
        if k.startswith("layers."):
            k = "encoder.layer." + k[len("layers."):]
            for a, b in old.items():
                k = k.replace(a, b)
        renamed[k.replace("shared_position_bias.", "encoder.relative_position_bias.")] = v
    renamed["encoder.layer.0.attention.attention.relative_position_index"] = relative_position_index((4, 4))
    assert renamed.keys() != sd.keys()
    save_file(renamed, str(tmp_path / "model.safetensors"))
    fast = fastvit.from_pretrained(str(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _rel(hf_outputs(fast, x).last_hidden_state, hf(pixel_values=x).last_hidden_state, "older names")


def test_fastvit_convert_round_trip(tmp_path):
    """`fastvit convert` of an HF BEiT folder keeps the tables, their resize mode and the pooling."""
    from fastvit.factory import convert, load_model

    hf = _randomise(T.BeitModel(_beit_cfg(use_relative_position_bias=True,
                                          use_shared_relative_position_bias=True))).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    convert(str(tmp_path / "hf"), str(tmp_path / "fv"))
    args = json.loads((tmp_path / "fv" / "config.json").read_text())["model_args"]
    assert args["use_rel_pos_bias"] and args["use_shared_rel_pos_bias"] and args["rel_pos_resize"] == "bilinear"
    fast, _ = load_model(str(tmp_path / "fv"))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        _rel(fast(x), hf(pixel_values=x).pooler_output, "converted BEiT pooler_output at 48 px")


# --------------------------------------------------------------------------- attention maps
def test_attention_probs_include_the_bias():
    """Probabilities from forward_intermediates / viz: rows sum to 1 and equal
    softmax(q k^T * scale + table[index]) with timm's own bias, layer by layer."""
    from fastvit import viz

    ref = _timm_beit(use_shared_rel_pos_bias=True)
    fast = fastvit.from_timm(ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = viz.attention_maps(fast, x, [0, 1])
        rolled, roll = viz.attention_with_rollout(fast, x, [0, 1])
        h = fast.embed(x)
        shared = ref.rel_pos_bias()
        for i, blk in enumerate(ref.blocks):
            a = blk.attn
            y = blk.norm1(h)
            qkv = nn.functional.linear(y, a.qkv.weight, torch.cat([a.q_bias, a.k_bias, a.v_bias]))
            q, k, _ = qkv.reshape(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
            want = torch.softmax(q @ k.transpose(-1, -2) * a.scale + a._get_rel_pos_bias() + shared, -1)
            assert maps[i].shape == (2, 4, 17, 17)
            torch.testing.assert_close(maps[i].sum(-1), torch.ones(2, 4, 17), atol=1e-5, rtol=0)
            torch.testing.assert_close(maps[i], want, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(rolled[i], maps[i], atol=1e-6, rtol=0)
            h = blk(h, shared_rel_pos_bias=shared)
    torch.testing.assert_close(roll, viz.attention_rollout([maps[0], maps[1]]), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- backends and compile
@pytest.mark.usefixtures("full_precision")
@pytest.mark.parametrize("backend", [b for b in fastvit.backends.BACKENDS if b != "torch"])
def test_beit_on_kernel_backend_matches_torch(backend):
    """A BEiT (per-block + shared tables) on a kernel backend (Triton's interpreter here, once it
    declares attention.bias) against the torch backend, fp32."""
    check_model_on_backend(lambda: fastvit.from_timm(_timm_beit(use_shared_rel_pos_bias=True, depth=1, img_size=32)),
                           backend, "BEiT", ("attention.bias",), "gelu")


def test_compile_fullgraph_no_graph_break():
    """torch.compile(fullgraph=True) of a BEiT with per-block and shared tables: no graph break,
    eager's output, at the stored grid and another one (48: the tables fitted to the 3 x 3 grid
    inside the graph)."""
    check_compiles_fullgraph(dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                                  global_pool="avg", pos_embed="none", init_values=0.1, use_rel_pos_bias=True,
                                  use_shared_rel_pos_bias=True, dynamic_img_size=True), sizes=(32, 48))


# --------------------------------------------------------------------------- presets
PRESETS = [n for n in fastvit.list_models() if n.startswith("beit")]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_timm_architectures(name):
    """Every parameter of timm's model, under fastvit's names, with the same shapes; timm's preprocessing."""
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
        fast = fastvit.create_model(name)
        sd = convert_timm_state_dict(ref.state_dict(), fast)
    assert {k: tuple(v.shape) for k, v in fast.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert (fast.global_pool, fast.num_classes, fast.patch_embed.img_size) == \
        (ref.global_pool, ref.num_classes, tuple(ref.patch_embed.img_size))
    assert fastvit.model_config(name)["init_values"] == ref.blocks[0].init_values
    cfg = timm.models.get_pretrained_cfg(name)
    pre = fastvit.registry.preprocess_config(name)
    assert (pre["crop_pct"], tuple(pre["mean"]), tuple(pre["std"]), tuple(pre["input_size"])) == \
        (cfg.crop_pct, tuple(cfg.mean), tuple(cfg.std), tuple(cfg.input_size))


# --------------------------------------------------------------------------- refusals
def test_refusals_are_value_errors_naming_the_feature():
    small = dict(_SMALL, depth=1)
    with pytest.raises(ValueError, match="BEiT-3 .*beit3_base_patch16_224"):
        fastvit.from_timm(timm.create_model("beit3_base_patch16_224", pretrained=False, **small))
    with pytest.raises(ValueError, match="swiglu_mlp"):
        fastvit.from_timm(timm.create_model("beit_base_patch16_224", pretrained=False, swiglu_mlp=True, **small))
    with pytest.raises(ValueError, match="scale_mlp"):
        fastvit.from_timm(timm.create_model("beit_base_patch16_224", pretrained=False, scale_mlp=True, **small))
    mim = T.BeitForMaskedImageModeling(_beit_cfg(num_hidden_layers=1, use_relative_position_bias=True))
    with pytest.raises(ValueError, match="BeitForMaskedImageModeling .*not supported"):
        fastvit.from_hf(mim)
    for cls in ("BeitForMaskedImageModeling", "BeitForSemanticSegmentation", "BeitBackbone"):
        with pytest.raises(ValueError, match=f"{cls} .*not supported"):
            fastvit.from_hf({}, config={"model_type": "beit", "architectures": [cls]})
    with pytest.raises(ValueError, match="use_rel_pos_bias.*class token"):
        VisionTransformer(depth=1, class_token=False, global_pool="avg", use_rel_pos_bias=True)
    with pytest.raises(ValueError, match="use_shared_rel_pos_bias.*reg_tokens"):
        VisionTransformer(depth=1, reg_tokens=4, use_shared_rel_pos_bias=True)
    with pytest.raises(ValueError, match="rel_pos_resize"):
        VisionTransformer(depth=1, use_rel_pos_bias=True, rel_pos_resize="nearest")
    with pytest.raises(CheckpointError, match="relative_position_bias_table"):
        m = VisionTransformer(**dict(_SMALL, patch_size=16, use_shared_rel_pos_bias=True))
        convert_timm_state_dict({"rel_pos_bias.relative_position_bias_table": torch.zeros(50, 4)}, m)

