"""Checkpoint round trips through files (timm / transformers save -> fastvit load), hub names from
a local cache only, and checkpoints that must be refused. No network is ever used here."""

import json
import os
import pickle

import pytest
import torch

import fastvit
from fastvit.checkpoint import CheckpointError, read_state_dict
from fastvit.convert import model_kwargs
from fastvit.factory import convert, from_pretrained, hf_outputs, load_model

timm = pytest.importorskip("timm")
T = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("hub_offline")


def _img(size=32, b=2):
    return torch.randn(b, 3, size, size) if isinstance(size, int) else torch.randn(b, 3, *size)


def _timm_tiny(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**args).eval()


def _close(a, b, what):
    err = (a.float() - b.float()).abs().max().item()
    assert err <= 1e-5 * max(1.0, b.abs().max().item()), f"{what}: max abs err {err:.3e}"


# --------------------------------------------------------------------------- Hugging Face folders
def _hf_tiny(kind):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                  attn_implementation="eager")
    if kind == "vit":
        return T.ViTForImageClassification(T.ViTConfig(intermediate_size=64, num_labels=3, **common))
    if kind == "deit_teacher":
        return T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(intermediate_size=64, num_labels=4, **common))
    if kind == "deit":
        return T.DeiTForImageClassification(T.DeiTConfig(intermediate_size=64, num_labels=4, **common))
    if kind == "dinov2":
        return T.Dinov2Model(T.Dinov2Config(mlp_ratio=2, **common))
    if kind == "dinov2_reg":
        return T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4, **common))
    raise KeyError(kind)


def _save_hf(model, path, fmt):
    if fmt == "safetensors":
        model.save_pretrained(path)
    elif fmt == "sharded":
        model.save_pretrained(path, max_shard_size="20KB")
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    else:  # what transformers < 5 wrote by default: a pickled state dict beside config.json
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))


@pytest.mark.parametrize("kind,fmt", [("vit", "safetensors"), ("vit", "bin"), ("deit_teacher", "sharded"),
                                      ("deit", "bin"), ("dinov2", "safetensors"), ("dinov2_reg", "sharded")])
def test_hf_folder_round_trip(kind, fmt, tmp_path):
    torch.manual_seed(0)
    hf = _hf_tiny(kind).eval()
    _save_hf(hf, str(tmp_path), fmt)
    fast = fastvit.from_pretrained(str(tmp_path))
    x = _img(32)
    with torch.no_grad():
        ref = hf(x)
        if kind.startswith("dinov2"):
            _close(fast.forward_features(x), ref.last_hidden_state, f"{kind}/{fmt} last_hidden_state")
        else:
            _close(fast(x), ref.logits, f"{kind}/{fmt} logits")


def test_hf_style_outputs_match_transformers(tmp_path):
    hf = _hf_tiny("vit").eval()
    hf.save_pretrained(str(tmp_path))
    fast = fastvit.from_pretrained(str(tmp_path))
    x = _img(32)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True, output_attentions=True)
        out = hf_outputs(fast, x, output_hidden_states=True, output_attentions=[1])
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        _close(a, b, f"hidden_states[{i}]")
    assert out.attentions[0] is None, "layer 0 was not requested: it must stay on the fast path"
    _close(out.attentions[1], ref.attentions[1], "attentions[1]")
    _close(out.logits, ref.logits, "logits")
    assert out.pooler_output.shape == (2, 32)


# --------------------------------------------------------------------------- timm state-dict files
@pytest.mark.parametrize("fmt", ["safetensors", "pth_wrapped", "bin_module_prefix"])
def test_timm_file_round_trip(fmt, tmp_path):
    from safetensors.torch import save_file

    ref = _timm_tiny()
    sd = ref.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pth_wrapped":  # a training checkpoint: weights under 'model' beside optimizer state
        path = tmp_path / "checkpoint.pth"
        torch.save({"model": sd, "epoch": 3}, str(path))
    else:  # saved from DistributedDataParallel
        path = tmp_path / "pytorch_model.bin"
        torch.save({"module." + k: v for k, v in sd.items()}, str(path))
    fast = fastvit.create_model("vit_tiny_patch16_224", checkpoint=str(path), img_size=32, patch_size=8,
                                embed_dim=32, depth=2, num_heads=2, num_classes=5)
    x = _img(32)
    with torch.no_grad():
        _close(fast(x), ref(x), fmt)


_REG = dict(reg_tokens=2, no_embed_class=True, init_values=1e-5)  # DINOv2-with-registers layout


@pytest.mark.parametrize("new,arch", [(dict(img_size=48), {}), (dict(img_size=(40, 56)), {}),
                                      (dict(img_size=32, patch_size=4), {}), (dict(img_size=48), _REG)],
                         ids=["grid6", "grid5x7", "patch4", "registers_grid6"])
def test_timm_file_resampled_like_timm(new, arch, tmp_path):
    """A checkpoint trained at 32 px / patch 8 loaded at another grid or patch equals timm's own resampling."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    src = _timm_tiny(**arch)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    ref = _timm_tiny(**arch, **new)
    ref.load_state_dict(checkpoint_filter_fn(read_state_dict(str(path)), ref))
    args = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **arch)
    args.update(new)
    fast = fastvit.create_model("vit_tiny_patch16_224", checkpoint=str(path), **args)
    x = _img(ref.patch_embed.img_size)
    with torch.no_grad():
        _close(fast.pos_embed, ref.pos_embed, "pos_embed")
        _close(fast(x), ref(x), f"resampled {new}")


def test_timm_hub_layout_folder(tmp_path):
    """timm's own hub export (config.json + model_args + pretrained_cfg) loads with its preprocessing."""
    from timm.models._hub import save_for_hf

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=7).eval()
    save_for_hf(ref, str(tmp_path), safe_serialization="both")
    fast = fastvit.from_pretrained(str(tmp_path))
    x = _img(32)
    with torch.no_grad():
        _close(fast(x), ref(x), "timm hub layout")
    _, pre = load_model(str(tmp_path))
    assert pre.crop_size == (32, 32) and pre.size == int(32 / 0.9) and pre.resample == "bicubic"


# --------------------------------------------------------------------------- fastvit convert
def _fast_kwargs_cases():
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    return [
        dict(base),
        dict(base, distilled=True, act="gelu_tanh", norm_eps=1e-12, qkv_bias=False),
        dict(base, global_pool="avg", class_token=False, reg_tokens=2, no_embed_class=True, init_values=1e-5),
        dict(base, num_classes=0, pre_norm=True, dynamic_img_size=True, img_size=(32, 24), mlp_ratio=2.5),
    ]


@pytest.mark.parametrize("kw", _fast_kwargs_cases(), ids=["vit", "deit_distilled", "avgpool_reg", "prenorm_dyn"])
def test_model_kwargs_rebuild_same_model(kw):
    torch.manual_seed(0)
    m = fastvit.VisionTransformer(**kw).eval()
    again = fastvit.VisionTransformer(**json.loads(json.dumps(model_kwargs(m)))).eval()
    again.load_state_dict(m.state_dict(), strict=True)
    x = _img(m.patch_embed.img_size)
    with torch.no_grad():
        assert torch.equal(again(x), m(x))


def test_convert_hf_folder_and_cli(tmp_path):
    hf = _hf_tiny("vit").eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(tmp_path / "hf"))
    from fastvit.cli import main

    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "fv")]) == 0
    cfg = json.loads((tmp_path / "fv" / "config.json").read_text())
    assert cfg["architecture"] == "fastvit" and cfg["id2label"] == {str(k): v for k, v in hf.config.id2label.items()}
    fast, pre = load_model(str(tmp_path / "fv"))
    assert pre.id2label == hf.config.id2label and pre.backend == "torch" and pre.output_size == (32, 32)
    x = _img(32)
    with torch.no_grad():
        _close(fast(x), hf(x).logits, "converted")


def test_convert_state_dict_file_needs_model_name(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_timm_tiny().state_dict(), str(path))
    with pytest.raises(ValueError, match="model_name"):
        convert(str(path), str(tmp_path / "out"))


# --------------------------------------------------------------------------- hub names, offline
def _fake_hub_cache(cache, repo_id, files):
    """The layout huggingface_hub's cache has after a download (refs/main -> snapshot folder)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, writer in files.items():
        writer(snap / name)
    return snap


def test_hub_name_offline_error_names_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        from_pretrained("google/vit-base-patch16-224", cache_dir=str(tmp_path), local_files_only=True)
    msg = str(e.value)
    assert "'config.json'" in msg and "google/vit-base-patch16-224" in msg and "local cache" in msg
    # a timm model name with its tag resolves to its hub repo (through timm's table), then the same error
    with pytest.raises(FileNotFoundError, match=r"'config.json'.*timm/vit_base_patch16_224\.augreg2_in21k_ft_in1k"):
        from_pretrained("vit_base_patch16_224.augreg2_in21k_ft_in1k", cache_dir=str(tmp_path), local_files_only=True)


def test_hub_name_from_cache(tmp_path):
    from safetensors.torch import save_file

    ref = _timm_tiny(num_classes=4)
    cfg = dict(architecture="vit_tiny_patch16_224", num_classes=4,
               model_args=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
               pretrained_cfg=dict(input_size=[3, 32, 32], interpolation="bicubic", crop_pct=1.0,
                                   mean=[0.5] * 3, std=[0.5] * 3),
               label_names=["a", "b", "c", "d"])
    _fake_hub_cache(tmp_path, "timm/vit_tiny_test", {
        "config.json": lambda p: p.write_text(json.dumps(cfg)),
        "model.safetensors": lambda p: save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(p)),
    })
    for name in ("timm/vit_tiny_test", "hf-hub:timm/vit_tiny_test"):
        fast = from_pretrained(name, cache_dir=str(tmp_path), local_files_only=True)
        x = _img(32)
        with torch.no_grad():
            _close(fast(x), ref(x), name)
    # cached config but no weights: the error lists the weight files looked for
    _fake_hub_cache(tmp_path, "timm/no_weights", {"config.json": lambda p: p.write_text(json.dumps(cfg))})
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained("timm/no_weights", cache_dir=str(tmp_path), local_files_only=True)


# --------------------------------------------------------------------------- refused checkpoints
class _Payload:
    """Unpickling this runs a shell command; torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"model": {"w": _Payload(marker)}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(str(bad))
    with pytest.raises(CheckpointError):
        fastvit.create_model("vit_tiny_patch16_224", checkpoint=str(bad))
    folder = tmp_path / "hf"
    folder.mkdir()
    T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        str(folder))
    os.replace(bad, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError):
        fastvit.from_pretrained(str(folder))
    assert not marker.exists(), "the pickle payload ran"


def test_corrupted_and_truncated_files(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _timm_tiny().state_dict().items()}
    st, pt = tmp_path / "m.safetensors", tmp_path / "m.pth"
    save_file(sd, str(st))
    torch.save(sd, str(pt))
    for path in (st, pt):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=path.name):
            read_state_dict(str(path))
        path.write_bytes(os.urandom(4096))
        with pytest.raises(CheckpointError, match=path.name):
            read_state_dict(str(path))
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        read_state_dict(str(tmp_path / "nothing.safetensors"))
    torch.save([torch.zeros(1)], str(pt))
    with pytest.raises(CheckpointError, match="dict of tensors"):
        read_state_dict(str(pt))


def test_wrong_architecture_lists_keys(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in _timm_tiny(depth=3).state_dict().items()}, str(path))
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): \['blocks\.2\."):
        fastvit.create_model("vit_tiny_patch16_224", checkpoint=str(path), **args)
    with pytest.raises(CheckpointError, match=r"missing keys \(12\): \[.blocks\.3\."):
        fastvit.create_model("vit_tiny_patch16_224", checkpoint=str(path), **dict(args, depth=4))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*head\.weight: checkpoint \(5, 32\) vs model \(9, 32\)"):
        fastvit.create_model("vit_tiny_patch16_224", checkpoint=str(path), **dict(args, depth=3, num_classes=9))
    # a Hugging Face state dict given as a timm file is named as such
    hf = _hf_tiny("vit")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="Hugging Face"):
        fastvit.create_model("vit_tiny_patch16_224", checkpoint=str(path), **args)
    # an HF folder missing a weight: no silent re-initialisation
    folder = tmp_path / "hf"
    hf.save_pretrained(str(folder))
    sd = read_state_dict(str(folder / "model.safetensors"))
    sd.pop("vit.encoder.layer.1.output.dense.bias")
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys .*blocks\.1\.mlp\.fc2\.bias"):
        fastvit.from_pretrained(str(folder))
