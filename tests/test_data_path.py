"""The data path (#20): uint8 input with the normalisation folded into the patch projection, the
exact / fast decoders, batched (GPU) decode, pinned overlapped batches, and the jobs' options.

* uint8 vs float per family (plain, DeiT distilled, registers, CLIP pre-norm, SigLIP MAP, BEiT
  relative positions, EVA-02 RoPE + SwiGLU, dynamic_img_pad borders, hybrid stem) and backend
  (torch; triton in the interpreter; cuda on a GPU), the DESIGN.md rule in 16-bit on a GPU;
  torch.compile(fullgraph=True) with a uint8 input; a uint8 input without normalisation refused.
* ``Preprocessor.load``: exact mode bit-exact with ``geometry`` (timm / HF parity is
  tests/test_preprocess.py's); fast mode within a few grey levels, on OpenCV and on the PIL
  fallback; every bad input a DecodeError with its reason (empty, truncated, not an image,
  1 x 1, too many pixels); PNG / grey / CMYK / EXIF-rotated inputs.
* ``decode_batch`` on the CPU (the GPU decoder's code path): JPEGs batched, others alone, a bad
  file does not fail its batch; GPU-marked on CUDA.
* ``DeviceBatches`` and the jobs: uint8 crosses to the device (bytes counted), outputs equal the
  float pipeline's; ``--preprocess`` / ``--decode`` on the command line.
"""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastvit
from fastvit.data import decode as D
from fastvit.data.batches import DeviceBatches, stack_images
from fastvit.preprocess import Preprocessor
from utils import BACKENDS, DEV, HAS_CUDA, assert_close_rule, check_compiles_fullgraph, skip_reason

pytestmark = pytest.mark.usefixtures("full_precision")


# --------------------------------------------------------------------------- images
def _photo(h=375, w=500, seed=0):
    """A real photo (scikit-image's astronaut) resized to (h, w): natural image statistics."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.BICUBIC))


def _encode(arr, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


TIMM_PRE = Preprocessor.from_timm(dict(input_size=(3, 64, 64), crop_pct=0.9, interpolation="bicubic",
                                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
HF_PRE = Preprocessor(size=(64, 64), crop_size=None, resample="bilinear", backend="torch", crop_rounding="floor",
                      fuse_rescale=True, mean=(0.5,) * 3, std=(0.5,) * 3)


# --------------------------------------------------------------------------- uint8 into the model
FAMILIES = {
    "vit": dict(),
    "deit_distilled": dict(distilled=True),
    "registers_no_embed_class": dict(reg_tokens=2, no_embed_class=True, global_pool="avg"),
    "clip_pre_norm": dict(pre_norm=True, act="quick_gelu", norm_eps=1e-5),
    "siglip_map": dict(class_token=False, global_pool="map"),
    "beit_rel_pos": dict(use_rel_pos_bias=True, pos_embed="none", global_pool="avg", init_values=0.1),
    "eva02_rope": dict(rope_type="cat", act="swiglu", scale_mlp=True, global_pool="avg", ref_feat_shape=(4, 4)),
}


def _tiny(**kw):
    torch.manual_seed(0)
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    base.update(kw)
    m = fastvit.VisionTransformer(**base).eval()
    with torch.no_grad():  # weights well away from their init (a zero bias would hide a wrong fold)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _u8(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def _norm(x, mean, std, r=1 / 255):
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x.double() * r - m) / s


MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_equals_float_per_family_and_backend(family, backend):
    for op in ("patch_embed", "linear", "layer_norm"):
        why = skip_reason(backend, op, DEV, dtype=torch.float32)
        if why:
            pytest.skip(why)
    m = _tiny(**FAMILIES[family]).to(DEV).set_backend(backend)
    m.set_input_normalization(MEAN, STD)
    x = _u8(3, 3, 32, 32).to(DEV)
    with torch.no_grad():
        want = m(_norm(x.cpu(), MEAN, STD).float().to(DEV))
        got = m(x)
    assert_close_rule(got, want, None, atol=1e-5, rtol=1e-5, name=f"{family} uint8 on {backend}")


@pytest.mark.parametrize("size", [(30, 45), (32, 40), (17, 33)])
def test_uint8_dynamic_img_pad_borders(size):
    """Padded borders: a normalised image pads with normalised zeros; the folded path's raw zeros
    are corrected through the border patches' position rows (with and without pos_embed)."""
    for kw in (dict(), dict(pos_embed="none", global_pool="avg")):
        m = _tiny(dynamic_img_size=True, dynamic_img_pad=True, **kw)
        m.set_input_normalization(MEAN, STD)
        x = _u8(2, 3, *size)
        with torch.no_grad():
            want = m.forward_features(_norm(x, MEAN, STD).float())
            got = m.forward_features(x)
        assert_close_rule(got, want, None, atol=1e-5, rtol=1e-5, name=f"pad {size} {kw}")


def test_uint8_hybrid_stem_and_preprocessor_argument():
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU())
    embed = fastvit.HybridEmbed(backbone, img_size=32, patch_size=2, embed_dim=32)
    m = _tiny(embed_layer=embed)
    pre = Preprocessor(mean=MEAN, std=STD, fuse_rescale=True)
    m.set_input_normalization(pre)
    assert m.input_norm == (MEAN, STD, 1 / 255)
    x = _u8(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(pre.normalize(x)), atol=1e-5, rtol=1e-5)


def test_uint8_refused_without_normalization_and_bad_settings():
    m = _tiny()
    with pytest.raises(ValueError, match="x: a uint8 image batch needs the model's input normalisation"):
        m(_u8(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"mean / std: expected 3 values each"):
        m.set_input_normalization((0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="std / rescale: expected positive values"):
        m.set_input_normalization(MEAN, (0.2, 0.0, 0.3))
    m.set_input_normalization(MEAN, STD)
    m.set_input_normalization(None)
    with pytest.raises(ValueError, match="uint8 image batch needs"):
        m(_u8(1, 3, 32, 32))


def test_fold_follows_weight_changes_and_float_path_unchanged():
    m = _tiny()
    x = _u8(2, 3, 32, 32)
    xf = _norm(x, MEAN, STD).float()
    with torch.no_grad():
        before = m(xf)
        m.set_input_normalization(MEAN, STD)
        assert torch.equal(m(xf), before)  # a float input is taken as normalised, exactly as before
        m(x)
        m.patch_embed.proj.weight.mul_(2)  # the cached fold is refreshed (version stamp)
        torch.testing.assert_close(m(x), m(xf), atol=1e-5, rtol=1e-5)


def test_presets_and_loaders_set_the_normalization(tmp_path):
    m = fastvit.create_model("vit_tiny_patch16_224", depth=1)
    assert m.input_norm == ((0.5,) * 3, (0.5,) * 3, 1 / 255)
    model, pre = fastvit.factory.load_model(None, "deit_tiny_patch16_224")
    assert model.input_norm == (pre.mean, pre.std, pre.rescale_factor)
    clip = fastvit.create_model("vit_base_patch16_clip_224.openai", depth=1)
    assert clip.input_norm[0] == pytest.approx(MEAN)


def test_from_pretrained_folder_sets_the_normalization(tmp_path):
    m = _tiny()
    pre = Preprocessor.for_model(m, mean=MEAN, std=STD)
    from safetensors.torch import save_file

    from fastvit.factory import model_kwargs

    d = tmp_path / "fv"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(dict(architecture="fastvit", model_args=model_kwargs(m),
                                                   num_classes=5, preprocess=pre.to_dict())))
    loaded = fastvit.from_pretrained(str(d))
    assert loaded.input_norm == (MEAN, STD, 1 / 255)
    x = _u8(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(pre.normalize(x)), atol=1e-5, rtol=1e-5)


def test_uint8_compiles_fullgraph():
    import subprocess
    import sys

    script = """
import torch
from fastvit import VisionTransformer
torch.manual_seed(0)
m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                      dynamic_img_size=True, dynamic_img_pad=True, backend="torch").eval()
m.set_input_normalization((0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
for size in ((32, 32), (30, 45)):
    x = torch.randint(0, 256, (2, 3) + size, dtype=torch.uint8)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = m(x)
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_compiles_fullgraph(dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), (32,))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_low_precision_rule_gpu(backend, dtype):
    """16-bit: the uint8 path's error vs the float64 reference <= 2 x the float path's (+ rounding)."""
    why = skip_reason(backend, "patch_embed", DEV, dtype=dtype)
    if why:
        pytest.skip(why)
    m = _tiny(img_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3)
    m.set_input_normalization(MEAN, STD)
    x = _u8(8, 3, 224, 224)
    with torch.no_grad():
        ref = m.double().set_backend("torch")(_norm(x, MEAN, STD))
        low = m.to("cuda", dtype).set_backend(backend)
        base = low(_norm(x, MEAN, STD).to("cuda", dtype)).double().cpu()
        got = low(x.cuda()).double().cpu()
    assert_close_rule(got, ref, base, name=f"uint8 {dtype} {backend}")


# --------------------------------------------------------------------------- decoders
@pytest.mark.parametrize("pre", [TIMM_PRE, HF_PRE], ids=["timm", "hf"])
@pytest.mark.parametrize("hw", [(375, 500), (1024, 768), (64, 64), (40, 90)])
def test_exact_load_is_geometry_and_fast_is_close(pre, hw):
    arr = _photo(*hw)
    data = _encode(arr, quality=92)
    exact = pre.load(data, "exact")
    assert exact.dtype == torch.uint8 and torch.equal(exact, pre.geometry(Image.open(io.BytesIO(data))))
    fast = pre.load(data, "fast")
    assert fast.shape == exact.shape and fast.dtype == torch.uint8
    diff = (fast.float() - exact.float()).abs()
    assert diff.mean() < 6.0, (hw, diff.mean())  # a 64 px target: the strongest reduction (README: at 224)


def test_fast_on_the_pil_fallback(monkeypatch):
    """Without OpenCV the fast path is PIL's draft (DCT scaling) + reducing_gap resize."""
    data = _encode(_photo(1024, 768), quality=92)
    with_cv = TIMM_PRE.load(data, "fast")
    monkeypatch.setattr(D, "_CV2", False)
    assert D.fast_backend() == "pil"
    pil = TIMM_PRE.load(data, "fast")
    exact = TIMM_PRE.load(data, "exact")
    assert pil.shape == exact.shape
    assert (pil.float() - exact.float()).abs().mean() < 3.0
    assert (with_cv.float() - pil.float()).abs().mean() < 3.0


@pytest.mark.parametrize("mode", D.MODES)
def test_other_formats_and_modes(mode):
    arr = _photo(120, 160)
    exact = TIMM_PRE.geometry(Image.fromarray(arr))
    for fmt, kw in (("PNG", {}), ("WEBP", dict(quality=95)), ("BMP", {})):
        got = TIMM_PRE.load(_encode(arr, fmt, **kw), mode)
        assert got.shape == exact.shape and (got.float() - exact.float()).abs().mean() < 4.0, fmt
    grey = _encode(arr[..., 0], quality=95)
    g = TIMM_PRE.load(grey, mode)
    assert g.shape == (3, 64, 64) and torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, "JPEG", quality=95)
    c = TIMM_PRE.load(cmyk.getvalue(), mode)
    ref = TIMM_PRE.geometry(Image.open(io.BytesIO(cmyk.getvalue())))
    assert (c.float() - ref.float()).abs().mean() < 3.0
    # EXIF orientation is not applied (as timm / HF, which read the stored pixels)
    rot = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(rot, "JPEG", quality=95, exif=exif)
    r = TIMM_PRE.load(rot.getvalue(), mode)
    assert (r.float() - exact.float()).abs().mean() < 4.0
    # path, PIL image and array sources
    assert TIMM_PRE.load(Image.fromarray(arr), mode).shape == (3, 64, 64)
    assert torch.equal(TIMM_PRE.load(arr, mode), exact)


def test_bad_inputs_are_decode_errors_with_reasons(tmp_path):
    good = _encode(_photo(200, 300), quality=90)
    cases = {
        "empty": (b"", "empty input"),
        "truncated": (good[: len(good) // 2], "truncated"),
        "not an image": (b"hello, this is text" * 10, "cannot identify image file"),
        "1x1": (_encode(np.zeros((1, 1, 3), np.uint8), "PNG"), "image too small: 1 x 1"),
    }
    for mode in D.MODES:
        for what, (data, reason) in cases.items():
            with pytest.raises(D.DecodeError, match=reason):
                TIMM_PRE.load(data, mode)
        with pytest.raises(D.DecodeError, match=r"too many pixels: 300 x 200 = 60000 > the limit 50000"):
            TIMM_PRE.load(good, mode, max_pixels=50_000)
    with pytest.raises(D.DecodeError, match="No such file or directory"):
        TIMM_PRE.load(str(tmp_path / "missing.jpg"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(D.DecodeError, match=r"empty file \(0 bytes\)"):
        TIMM_PRE.load(str(tmp_path / "empty.jpg"))
    with pytest.raises(ValueError, match="mode: expected one of"):
        TIMM_PRE.load(good, "quick")
    dino = Preprocessor(size=(64, 64), crop_size=None, backend="torch", resample="bilinear", rescale_first=True)
    assert not dino.uint8_exact
    with pytest.raises(ValueError, match="'exact' has no uint8 result for this processor"):
        dino.load(good, "exact")
    assert dino.load(good, "fast").shape == (3, 64, 64)


def test_sniff():
    arr = _photo(32, 32)
    assert D.sniff(_encode(arr)) == "jpeg" and D.sniff(_encode(arr, "PNG")) == "png"
    assert D.sniff(_encode(arr, "WEBP")) == "webp" and D.sniff(b"nothing") is None


# --------------------------------------------------------------------------- batched decode
def _batch_items():
    arr = _photo(300, 400)
    return [_encode(arr, quality=90), _encode(arr, "PNG"), b"garbage" * 20, _encode(_photo(100, 80), quality=80),
            _encode(arr, quality=90)[:3000]]


def _check_batch(out, device):
    assert isinstance(out[0], torch.Tensor) and out[0].device.type == torch.device(device).type
    assert isinstance(out[1], torch.Tensor) and isinstance(out[3], torch.Tensor)
    assert isinstance(out[2], D.DecodeError) and "cannot identify image file" in str(out[2])
    assert isinstance(out[4], D.DecodeError) and "truncated" in str(out[4])


@pytest.mark.parametrize("pre", [TIMM_PRE, HF_PRE], ids=["timm", "hf"])
def test_decode_batch_cpu(pre):
    """The GPU decoder's code path with CPU tensors: JPEGs batched through torchvision, the PNG
    alone, bad files reported per item without failing the others; results within one grey
    level of the exact path for tensor-resizing (HF) processors, a few for PIL (timm) ones."""
    items = _batch_items()
    out = D.decode_batch(items, pre, "cpu")
    _check_batch(out, "cpu")
    for i in (0, 1, 3):
        ref = pre.load(items[i], "exact")
        d = (out[i].float() - ref.float()).abs()
        assert out[i].shape == ref.shape
        assert (d.max() <= 1 if pre.backend == "torch" else d.mean() < 3.0), (i, d.max(), d.mean())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_decode_batch_cuda():
    items = _batch_items()
    out = D.decode_batch(items, HF_PRE, "cuda")
    _check_batch(out, "cuda")
    ref = D.decode_batch(items, HF_PRE, "cpu")
    for i in (0, 1, 3):
        assert (out[i].cpu().float() - ref[i].float()).abs().max() <= 2


# --------------------------------------------------------------------------- batches and jobs
def test_stack_and_device_batches_cpu():
    imgs = [_u8(3, 8, 8, seed=i) for i in range(3)]
    x = stack_images(imgs)
    assert torch.equal(x[1], imgs[1])
    with pytest.raises(ValueError, match="preprocessed sizes / dtypes differ"):
        stack_images([imgs[0], _u8(3, 8, 9)])
    feed = DeviceBatches([("a", x), ("b", None), ("c", x.float())], "cpu", torch.float16)
    got = list(feed)
    assert [m for m, _ in got] == ["a", "b", "c"] and got[1][1] is None
    assert got[0][1].dtype == torch.uint8 and got[2][1].dtype == torch.float16
    assert feed.copies == 2 and feed.bytes == x.numel() * 5  # uint8 then float32


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_device_batches_cuda_overlap_and_reuse():
    """Every batch arrives intact although its staging buffer is reused two batches later."""
    batches = [(i, _u8(16, 3, 64, 64, seed=i)) for i in range(6)]
    feed = DeviceBatches(batches, "cuda")
    for (i, y), (_, x) in zip(feed, batches):
        y = y.float().mul_(2)  # compute on the consumer stream while the next copy runs
        assert torch.equal(y.cpu(), x.float() * 2), i
    assert feed.copies == 6 and sum(len(r) for r in feed._staging.values()) == 2


def _folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, hw in enumerate([(375, 500), (600, 400), (128, 128)]):
        (d / f"p{i}.jpg").write_bytes(_encode(_photo(*hw, seed=i), quality=90))
    (d / "p9_bad.jpg").write_bytes(b"no image here")
    return d


def test_jobs_send_uint8_and_match_the_float_pipeline(tmp_path):
    from fastvit.embed import iter_embeddings
    from fastvit.imagefiles import expand_inputs, run_batches

    d = _folder(tmp_path)
    m = _tiny(img_size=64, patch_size=16, num_classes=0)
    pre = Preprocessor.from_timm(dict(input_size=(3, 64, 64), crop_pct=0.9, mean=MEAN, std=STD))
    files = expand_inputs([str(d)])
    good = [f for f in files if "bad" not in f]
    with torch.no_grad():
        want = m.forward_head(m.forward_features(pre(good)), pre_logits=True)
    skipped = []
    (paths, emb), = list(iter_embeddings(m, pre, [str(d)], batch_size=8, on_skip=lambda p, r: skipped.append(r)))
    assert paths == good and "cannot identify image file" in skipped[0]
    torch.testing.assert_close(emb, want, atol=1e-5, rtol=1e-5)
    assert m.input_norm == (MEAN, STD, 1 / 255)
    stats = {}
    seen = []
    list(run_batches(lambda x: seen.append(x.dtype) or x.float().mean((1, 2, 3)), files, pre, [[0, 1], [2, 3]],
                     torch.device("cpu"), torch.float32, stats=stats))
    assert seen == [torch.uint8, torch.uint8] and stats == dict(copies=2, bytes=3 * 3 * 64 * 64)
    (_, fast), = list(iter_embeddings(m, pre, [str(d)], batch_size=8, preprocess="fast",
                                      on_skip=lambda p, r: None))
    cos = torch.nn.functional.cosine_similarity(fast, want, dim=-1)
    assert cos.min() > 0.99, cos
    with pytest.raises(ValueError, match="decode: 'cuda' decodes on the GPU and needs a CUDA device"):
        list(iter_embeddings(m, pre, [str(d)], decode="cuda", device="cpu"))


def test_rescale_first_processor_keeps_its_float_path(tmp_path):
    from fastvit.embed import iter_embeddings

    d = _folder(tmp_path)
    m = _tiny(img_size=64, patch_size=16, num_classes=0)
    pre = Preprocessor(size=(64, 64), crop_size=None, backend="torch", resample="bilinear", rescale_first=True,
                       mean=MEAN, std=STD)
    good = [str(d / f"p{i}.jpg") for i in range(3)]
    with torch.no_grad():
        want = m.forward_head(m.forward_features(pre(good)), pre_logits=True)
    (_, emb), = list(iter_embeddings(m, pre, good, batch_size=8))
    torch.testing.assert_close(emb, want, atol=1e-6, rtol=1e-6)


def test_cli_preprocess_and_decode_options(tmp_path, capsys):
    from fastvit.cli import main

    d = _folder(tmp_path)
    out = tmp_path / "emb"
    args = ["embed", str(d), "--model", "vit_tiny_patch16_224", "--batch-size", "4", "--workers", "0",
            "--no-progress", "-o", str(out)]
    assert main(args + ["--preprocess", "fast"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["preprocess"]["mode"] == "fast" and man["preprocess"]["decode"] == "cpu"
    with pytest.raises(SystemExit, match="another embedding run"):
        main(args + ["--preprocess", "exact"])  # another preprocessing is another run
    with pytest.raises(SystemExit, match="--decode cuda expected a CUDA device"):
        main(args + ["--decode", "cuda", "--device", "cpu", "--overwrite"])
    assert main(["classify", str(d), "--model", "vit_tiny_patch16_224", "--workers", "2", "--no-progress",
                 "--preprocess", "fast", "-o", str(tmp_path / "p.csv")]) == 0
