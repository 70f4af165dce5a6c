"""Preprocessing equals transformers' image processors and timm's eval transform, bit for bit."""

import json

import numpy as np
import pytest
import torch

from fastvit.preprocess import Preprocessor, load_labels, topk_predictions

skdata = pytest.importorskip("skimage.data")
Image = pytest.importorskip("PIL.Image")

PHOTOS = {"chelsea": skdata.chelsea(), "astronaut": skdata.astronaut()}  # (300, 451, 3), (512, 512, 3)


@pytest.fixture(params=sorted(PHOTOS))
def photo(request):
    return PHOTOS[request.param]


HF_CONFIGS = [
    ("ViTImageProcessor", dict()),  # 224 x 224 squash, bilinear, mean = std = 0.5
    ("ViTImageProcessor", dict(size={"height": 96, "width": 128}, resample=3)),
    ("BitImageProcessor", dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})),  # DINOv2
    ("BitImageProcessor", dict(size={"shortest_edge": 97}, crop_size={"height": 63, "width": 64}, resample=2)),
    ("DeiTImageProcessor", dict(size={"height": 73, "width": 71}, crop_size={"height": 64, "width": 64})),
    ("CLIPImageProcessor", dict()),  # shortest side 224 bicubic, center crop 224, CLIP mean / std
    ("CLIPImageProcessor", dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})),
    ("SiglipImageProcessor", dict()),  # 224 x 224 squash, bicubic, mean = std = 0.5
    ("SiglipImageProcessor", dict(size={"height": 384, "width": 384})),
]


@pytest.mark.parametrize("cls_name,kwargs", HF_CONFIGS)
def test_equals_hf_image_processor(photo, cls_name, kwargs, tmp_path):
    transformers = pytest.importorskip("transformers")
    hp = getattr(transformers, cls_name)(**kwargs)
    ref = hp(Image.fromarray(photo), return_tensors="pt")["pixel_values"]
    hp.save_pretrained(tmp_path)  # through the file, as a checkpoint folder carries it
    pre = Preprocessor.from_hf(str(tmp_path))
    for inp in (Image.fromarray(photo), photo, torch.from_numpy(photo).permute(2, 0, 1)):
        out = pre(inp)
        assert out.shape == ref.shape
        assert torch.equal(out, ref), f"{cls_name} {kwargs}: max diff {(out - ref).abs().max().item()}"


TIMM_CFGS = [
    dict(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.9),
    dict(input_size=(3, 97, 97), interpolation="bilinear", crop_pct=0.875),
    dict(input_size=(3, 64, 80), interpolation="bicubic", crop_pct=0.95, crop_mode="squash"),
    dict(input_size=(3, 50, 50), interpolation="bicubic", crop_pct=1.0),
]


@pytest.mark.parametrize("cfg", TIMM_CFGS, ids=lambda c: "x".join(map(str, c["input_size"][1:])))
def test_equals_timm_eval_transform(photo, cfg, tmp_path):
    tdata = pytest.importorskip("timm.data")
    t = tdata.create_transform(**tdata.resolve_data_config(pretrained_cfg=cfg))
    ref = t(Image.fromarray(photo))
    pre = Preprocessor.from_timm(cfg)
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    for inp in (Image.fromarray(photo), str(path), torch.from_numpy(photo).permute(2, 0, 1)):
        out = pre(inp)[0]
        assert torch.equal(out, ref), f"{cfg}: max diff {(out - ref).abs().max().item()}"
    # a round trip through to_dict (what `fastvit convert` stores) keeps the pipeline
    again = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert torch.equal(again(str(path))[0], ref)


# CLIP / SigLIP presets: their processor equals timm's eval transform of the same data config and
# transformers' PIL-backend processor of the checkpoint family, bit for bit
PRESET_PROCESSORS = [
    ("vit_base_patch16_clip_224.openai", "CLIPImageProcessorPil", dict()),
    ("vit_large_patch14_clip_quickgelu_336.openai", "CLIPImageProcessorPil",
     dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})),
    ("vit_base_patch16_siglip_224", "SiglipImageProcessorPil", dict()),
    ("vit_so400m_patch14_siglip_384", "SiglipImageProcessorPil", dict(size={"height": 384, "width": 384})),
]


@pytest.mark.parametrize("name,hf_cls,kwargs", PRESET_PROCESSORS, ids=[c[0] for c in PRESET_PROCESSORS])
def test_clip_siglip_presets_equal_timm_and_hf(photo, name, hf_cls, kwargs):
    tdata = pytest.importorskip("timm.data")
    transformers = pytest.importorskip("transformers")
    from fastvit.registry import preprocess_config

    pre = Preprocessor.from_preset(name)
    img = Image.fromarray(photo)
    out = pre(img)[0]
    ref = tdata.create_transform(**tdata.resolve_data_config(pretrained_cfg=preprocess_config(name)))(img)
    assert torch.equal(out, ref), f"{name} vs timm: max diff {(out - ref).abs().max().item()}"
    hp = getattr(transformers, hf_cls, None)
    if hp is None:
        pytest.skip(f"transformers {transformers.__version__} has no {hf_cls}")
    ref = hp(**kwargs)(img, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(out, ref), f"{name} vs {hf_cls}: max diff {(out - ref).abs().max().item()}"


def test_shapes_batch_and_denormalize(photo):
    pre = Preprocessor(size=(40, 60), crop_size=(32, 48), mean=(0.5,) * 3, std=(0.25,) * 3)
    x = pre([photo, photo[::-1].copy()])
    assert x.shape == (2, 3, 32, 48) and x.dtype == torch.float32
    back = pre.denormalize(x[0])
    assert back.shape == (32, 48, 3) and back.dtype == np.uint8
    assert np.array_equal(back, pre.geometry(photo).permute(1, 2, 0).numpy())


def test_geometry_crop_rounding():
    # a 5-pixel margin: torchvision (timm) rounds the offset to 2 (round half to even), HF floors it to 2
    # too; a 3-pixel margin: round -> 2, floor -> 1
    img = torch.arange(10 * 7, dtype=torch.uint8).reshape(1, 10, 7).expand(3, 10, 7).contiguous()
    r = Preprocessor(size=None, crop_size=(7, 4), backend="torch", crop_rounding="round").geometry(img)
    f = Preprocessor(size=None, crop_size=(7, 4), backend="torch", crop_rounding="floor").geometry(img)
    assert r[0, 0, 0].item() == 2 * 7 + 2 and f[0, 0, 0].item() == 1 * 7 + 1


def test_every_preset_has_timms_preprocessing():
    """Every preset names its preprocessing; the plain ViT / DeiT / DINOv2 ones (the default tag's
    pretrained_cfg) equal timm's wherever timm has a cfg for the name (the CLIP / SigLIP towers keep
    the original processors on purpose: tests above)."""
    timm = pytest.importorskip("timm")
    from fastvit.registry import follows_timm_tags, list_models, preprocess_config

    fields = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
    checked = 0
    for name in list_models():
        cfg = preprocess_config(name)
        assert cfg is not None, name
        Preprocessor.from_preset(name)  # builds
        if not follows_timm_tags(name):
            continue
        try:
            ref = timm.models.get_pretrained_cfg(name)
        except Exception:  # a name timm has no cfg for (tagged towers, fastvit-only sizes)
            ref = None
        if ref is None:
            continue
        ref = ref.to_dict()
        got = {k: (tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]) for k in fields}
        want = {k: (tuple(ref[k]) if isinstance(ref[k], (list, tuple)) else ref[k]) for k in fields}
        assert got == want, name
        checked += 1
    assert checked > 30


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="name: expected one of fastvit.list_models"):
        Preprocessor.from_preset("vit_nonexistent")
    with pytest.raises(ValueError, match="resample"):
        Preprocessor(resample="cubic")
    with pytest.raises(TypeError, match="uint8"):
        Preprocessor().process(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        Preprocessor().process(torch.zeros(5, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="crop_size"):
        Preprocessor(size=16, crop_size=(32, 32)).process(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        Preprocessor().process("missing.png")


def test_labels_and_topk(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "cat", "1": "dog", "2": "bird"}}))
    labels = load_labels(str(tmp_path))
    assert labels == {0: "cat", 1: "dog", 2: "bird"}
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    top = topk_predictions(logits, 2, labels)
    assert [p["label"] for p in top[0]] == ["dog", "bird"] and top[1][0]["label"] == "cat"
    assert abs(top[0][0]["prob"] - torch.softmax(logits[0], 0)[1].item()) < 1e-7
    (tmp_path / "config.json").write_text(json.dumps({"label_names": ["a", "b"]}))
    assert load_labels(str(tmp_path)) == {0: "a", 1: "b"}
