"""fastvit.data: brace patterns, the tar reader against the webdataset package's own parsing
(tars written by webdataset.TarWriter and by tarfile for the corner cases), the parquet reader
(bytes / path / Hugging Face struct columns, written by pyarrow), bad samples and unreadable shards
listed with their reasons, every output format read back (pyarrow for parquet), a shard made
visible only by its sidecar, the local engine (one process and rank splits) and embed_batch."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

import fastvit
from fastvit import embed as E
from fastvit.cli import main
from fastvit.convert import model_kwargs
from fastvit.data import sources as S
from fastvit.data import writers as W
from fastvit.factory import load_model
from fastvit.preprocess import Preprocessor

Image = pytest.importorskip("PIL.Image")
wds = pytest.importorskip("webdataset")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _jpeg(rng, fmt="JPEG", size=(40, 48)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny headless fastvit model folder; two img2dataset-style tars written by webdataset's
    TarWriter (jpg / png / webp images, json, txt; one truncated JPEG, one sample without image);
    a parquet file of image bytes written by pyarrow."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("data")
    torch.manual_seed(0)
    m = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    (root / "model").mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(root / "model" / "model.safetensors"))
    cfg = dict(architecture="fastvit", model_args=model_kwargs(m), num_classes=0,
               preprocess=Preprocessor.for_model(m).to_dict())
    (root / "model" / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    (root / "shards").mkdir()
    images = {}
    for s in range(2):
        with wds.TarWriter(str(root / "shards" / f"{s:05d}.tar")) as w:
            for i in range(6):
                key = f"{s:04d}{i:05d}"
                ext = ("jpg", "png", "webp")[i % 3]
                sample = {"__key__": key, "txt": f"caption {key}", "json": {"url": f"http://x/{key}", "key": key}}
                if (s, i) == (1, 2):
                    pass  # a sample without an image: json + txt only
                else:
                    img = _jpeg(rng, "JPEG" if ext == "jpg" else ext.upper())
                    if (s, i) == (0, 3):
                        img = img[: len(img) // 2]  # a truncated image
                    sample[ext] = img
                    images[key] = img
                w.write(sample)
    keys = [f"p{i:03d}" for i in range(5)]
    blobs = [_jpeg(rng) for _ in keys]
    pq.write_table(pa.table({"key": keys, "jpg": blobs, "caption": ["c"] * 5}), str(root / "table.parquet"))
    model, pre = load_model(str(root / "model"))
    return dict(root=root, model=model, pre=pre, images=images, pq_keys=keys, pq_blobs=blobs)


def _direct(data, blobs):
    """The model's pooled features of encoded images, computed directly (the oracle)."""
    x = torch.stack([data["pre"].process(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    with torch.no_grad():
        return data["model"].forward_head(data["model"].forward_features(x), pre_logits=True)


# --------------------------------------------------------------------------- inputs
def test_brace_patterns():
    assert S.expand_braces("s/{00000..00003}.tar") == [f"s/{i:05d}.tar" for i in range(4)]
    assert S.expand_braces("s/{8..11}.tar") == ["s/8.tar", "s/9.tar", "s/10.tar", "s/11.tar"]
    assert S.expand_braces("{a,b}/{0..4..2}.tar") == ["a/0.tar", "a/2.tar", "a/4.tar", "b/0.tar", "b/2.tar",
                                                      "b/4.tar"]
    assert S.expand_braces("s/{3..1}.tar") == ["s/3.tar", "s/2.tar", "s/1.tar"]
    assert S.expand_braces("plain.tar") == ["plain.tar"]
    assert S.expand_braces("odd{x}name_{0..1}.tar") == ["odd{x}name_0.tar", "odd{x}name_1.tar"]
    with pytest.raises(ValueError, match="non-zero step"):
        S.expand_braces("{0..4..0}.tar")


def test_resolve_shards(data, tmp_path):
    root = data["root"]
    shards = S.resolve_shards([str(root / "shards" / "{00000..00001}.tar"), str(root / "table.parquet")],
                              image_column="jpg")
    assert [(s.kind, s.name, s.index) for s in shards] == [("tar", "00000", 0), ("tar", "00001", 1),
                                                           ("parquet", "table", 2)]
    assert shards[2].image_column == "jpg" and shards[0].image_column is None
    assert shards[0].identity()["bytes"] == os.path.getsize(root / "shards" / "00000.tar")
    # the same stem in two folders: names stay unique
    twice = S.resolve_shards(["a/00000.tar", "b/00000.tar"])
    assert [s.name for s in twice] == ["00000-00000", "00001-00000"]
    with pytest.raises(ValueError, match="named twice"):
        S.resolve_shards([str(root / "shards" / "00000.tar")] * 2)
    with pytest.raises(ValueError, match="either tar / parquet shards or image files"):
        S.resolve_shards([str(root / "shards" / "00000.tar"), str(root / "model")])
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(b"x")
    sl = S.resolve_shards([str(tmp_path / "imgs")], shard_size=2)
    assert [(s.name, s.source, len(s.files)) for s in sl] == [("shard-00000", "inputs[0:2]", 2),
                                                              ("shard-00001", "inputs[2:4]", 2),
                                                              ("shard-00002", "inputs[4:5]", 1)]


# --------------------------------------------------------------------------- readers
def _webdataset_samples(path):
    """The webdataset package's own parsing of a tar: [(key, {ext: bytes})]."""
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in ds]


def _expected_from_webdataset(path):
    out = []
    for key, members in _webdataset_samples(path):
        img = next((members[e] for e in S.IMAGE_SUFFIXES if e in members), None)
        out.append((key, img))
    return out


def test_tar_reader_matches_webdataset(data):
    for s in range(2):
        path = data["root"] / "shards" / f"{s:05d}.tar"
        got = list(S.iter_samples(S.Shard("tar", str(path), 0, "x")))
        want = _expected_from_webdataset(path)
        assert [(k, d) for k, d, _ in got] == want
        assert all((d is None) == (r is not None) for _, d, r in got)
    no_image = [r for k, d, r in S.iter_samples(S.Shard("tar", str(data["root"] / "shards" / "00001.tar"), 0, "x"))
                if k == "000100002"]
    assert no_image and "no image" in no_image[0] and "json, txt" in no_image[0]


def test_tar_reader_corner_cases_match_webdataset(tmp_path):
    """Member paths with folders and several dots, upper-case extensions, a key that comes back
    after another (a new sample), webdataset metadata members, a member without a dot."""
    path = tmp_path / "corner.tar"
    members = [("dir/a.jpg", b"A1"), ("dir/a.json", b"{}"), ("dir/a.seg.png", b"A2"), ("b.PNG", b"B"),
               ("b.TXT", b"bt"), ("__meta__", b"m"), ("README", b"r"), ("a.webp", b"A3"), ("c.txt", b"ct"),
               ("b.jpeg", b"B2"), ("x.y.z.gif", b"X")]
    with tarfile.open(path, "w") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    got = list(S.iter_samples(S.Shard("tar", str(path), 0, "x")))
    assert [(k, d) for k, d, _ in got] == _expected_from_webdataset(path)
    assert [k for k, _, _ in got] == ["dir/a", "b", "a", "c", "b", "x"]
    assert dict((k, d) for k, d, _ in got[:2]) == {"dir/a": b"A1", "b": b"B"}  # .seg.png is not the image


def test_unreadable_shards_never_raise(data, tmp_path):
    good = data["root"] / "shards" / "00000.tar"
    raw = good.read_bytes()
    (tmp_path / "garbage.tar").write_bytes(os.urandom(3000))
    (tmp_path / "cut_inside.tar").write_bytes(raw[:2000])  # inside the first image's data
    # cut at a member boundary: tarfile alone would take this for a complete, shorter archive
    with tarfile.open(good) as t:
        third = t.getmembers()[9]  # members: 3 per sample; the 4th sample's first member
    (tmp_path / "cut_boundary.tar").write_bytes(raw[:third.offset])

    def read(name):
        return list(S.iter_samples(S.Shard("tar", str(tmp_path / name), 0, "x")))

    g = read("garbage.tar")
    assert len(g) == 1 and g[0][0] is None and "unreadable tar shard after 0 samples" in g[0][2]
    c = read("cut_inside.tar")
    assert c[-1][0] is None and "unreadable tar shard" in c[-1][2]
    b = read("cut_boundary.tar")
    assert [k for k, d, _ in b if d is not None] == ["000000000", "000000001"]
    assert b[2][0] == "000000002" and b[2][1] is None and "ends inside this sample" in b[2][2]
    assert b[3][0] is None and "truncated tar shard" in b[3][2]
    m = read("missing.tar")
    assert len(m) == 1 and m[0][0] is None and "No such file" in m[0][2]


def test_parquet_reader_columns(data, tmp_path):
    got = list(S.iter_samples(S.Shard("parquet", str(data["root"] / "table.parquet"), 0, "t")))
    assert [(k, d) for k, d, _ in got] == list(zip(data["pq_keys"], data["pq_blobs"]))
    # paths relative to the parquet file's folder, HF {"bytes", "path"} structs, nulls, custom names
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "one.jpg").write_bytes(data["pq_blobs"][0])
    pq.write_table(pa.table({"id": [1, 2, 3], "file": ["img/one.jpg", "img/none.jpg", None]}),
                   str(tmp_path / "paths.parquet"))
    got = list(S.iter_samples(S.Shard("parquet", str(tmp_path / "paths.parquet"), 0, "p", image_column="file",
                                      key_column="id")))
    assert [(k, d) for k, d, _ in got] == [("1", data["pq_blobs"][0]), ("2", None), ("3", None)]
    assert "No such file" in got[1][2] and "null" in got[2][2]
    struct = pa.array([{"bytes": data["pq_blobs"][1], "path": "x.jpg"}, {"bytes": None, "path": "img/one.jpg"}])
    pq.write_table(pa.table({"image": struct}), str(tmp_path / "hf.parquet"))
    got = list(S.iter_samples(S.Shard("parquet", str(tmp_path / "hf.parquet"), 0, "h")))
    assert got == [("000000000", data["pq_blobs"][1], None), ("000000001", data["pq_blobs"][0], None)]
    got = list(S.iter_samples(S.Shard("parquet", str(tmp_path / "hf.parquet"), 0, "h", image_column="jpg")))
    assert len(got) == 1 and got[0][0] is None and "no image column 'jpg'" in got[0][2] and "['image']" in got[0][2]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + os.urandom(200))
    got = list(S.iter_samples(S.Shard("parquet", str(tmp_path / "bad.parquet"), 0, "b")))
    assert len(got) == 1 and got[0][0] is None and "unreadable parquet shard" in got[0][2]


def test_decode_reasons_have_no_addresses(data):
    _, x, r = S.decode_sample("k", b"not an image", None, data["pre"])
    assert x is None and r.startswith("UnidentifiedImageError") and "0x" not in r
    _, x, r = S.decode_sample("k", data["pq_blobs"][0], None, data["pre"])
    assert r is None and x.shape == (3, 32, 32) and x.dtype == torch.uint8  # pixels: the model normalises


# --------------------------------------------------------------------------- writers + the local engine
@pytest.mark.parametrize("fmt,edtype", [("parquet", "float32"), ("parquet", "float16"), ("safetensors", "float32"),
                                        ("npy", "float16"), ("clip-retrieval", "float32")])
def test_local_engine_every_format(data, tmp_path, fmt, edtype):
    root = data["root"]
    out = tmp_path / "out"
    corrupt = tmp_path / "00002.tar"
    corrupt.write_bytes(os.urandom(1500))
    pattern = str(root / "shards" / "{00000..00001}.tar")
    res = E.embed_shards(data["model"], data["pre"], [pattern, str(corrupt)], str(out), fmt=fmt,
                         embedding_dtype=edtype, batch_size=4, log=False)
    assert res["complete"] and res["shards_written"] == 3
    keys, emb = E.load_embeddings(str(out))
    want_keys = [k for k in sorted(data["images"]) if k != "000000003"]  # the truncated JPEG
    assert keys == want_keys and emb.dtype == getattr(torch, edtype)
    want = _direct(data, [data["images"][k] for k in want_keys])
    tol = 1e-5 if edtype == "float32" else 2e-3
    torch.testing.assert_close(emb.float(), want, atol=tol, rtol=tol)
    k2, src, _ = E.load_embeddings(str(out), with_sources=True)
    assert src == [str(root / "shards" / f"{int(k[:4]):05d}.tar") for k in k2]
    skipped = [json.loads(line) for line in open(out / "skipped.jsonl")]
    assert [(s["shard"], s["key"]) for s in skipped] == [("00000", "000000003"), ("00001", "000100002"),
                                                         ("00002", None)]
    assert skipped[0]["reason"].startswith("OSError") and "truncated" in skipped[0]["reason"]
    assert "no image" in skipped[1]["reason"] and "unreadable tar shard" in skipped[2]["reason"]
    total = json.loads((out / "summary.json").read_text())
    assert (total["shards"], total["samples"], total["embedded"], total["skipped"], total["dim"]) == (3, 12, 10, 3, 32)
    assert total["run"]["engine"] == "local" and total["embedding_dtype"] == edtype
    side = json.loads((out / "00000.json").read_text())
    assert side["rows"] == 5 and side["samples"] == 6 and side["source"] == str(root / "shards" / "00000.tar")
    if fmt == "parquet":
        t = pq.read_table(out / "00001.parquet")
        assert t.column_names == ["key", "source", "embedding"]
        assert t.schema.field("embedding").type == pa.list_(getattr(pa, edtype)(), 32)
        assert t.column("source").to_pylist() == [str(root / "shards" / "00001.tar")] * 5
    if fmt == "clip-retrieval":
        assert sorted(os.listdir(out / "img_emb")) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
        arr = np.load(out / "img_emb" / "img_emb_1.npy")
        meta = pq.read_table(out / "metadata" / "metadata_1.parquet")
        assert arr.shape == (5, 32) and meta.num_rows == 5 and meta.column("key").to_pylist() == want_keys[5:]
        assert np.load(out / "img_emb" / "img_emb_2.npy").shape == (0, 32)
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        assert load_file(str(out / "00001.safetensors"))["embeddings"].shape == (5, 32)


def test_sidecar_last_and_rerun_skips_finished(data, tmp_path, monkeypatch):
    root = data["root"]
    out = tmp_path / "out"
    pattern = [str(root / "shards" / "{00000..00001}.tar"), str(root / "table.parquet")]
    real = W.atomic_write

    def die_before_sidecar_of_00001(path, blob):
        if path.endswith("00001.json"):
            raise KeyboardInterrupt  # the process dies between the data file and the sidecar
        real(path, blob)

    monkeypatch.setattr(W, "atomic_write", die_before_sidecar_of_00001)
    with pytest.raises(KeyboardInterrupt):
        E.embed_shards(data["model"], data["pre"], pattern, str(out), batch_size=4, log=False)
    monkeypatch.setattr(W, "atomic_write", real)
    assert (out / "00001.parquet").exists() and not (out / "00001.json").exists()
    with pytest.raises(FileNotFoundError, match="shard 00001 .* not finished"):
        E.load_embeddings(str(out))
    (out / "table.parquet.tmp-999").write_bytes(b"half")  # a killed writer's temporary file
    first = (out / "00000.parquet").stat().st_mtime_ns
    seen = []  # images through the model: the finished shard 00000 is not recomputed
    hook = data["model"].blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        res = E.embed_shards(data["model"], data["pre"], pattern, str(out), batch_size=4, log=False)
    finally:
        hook.remove()
    assert sum(seen) == 1 + 10  # the dimension probe + shard 00001's 5 images + the parquet file's 5
    assert (res["shards_reused"], res["shards_written"], res["embedded"]) == (1, 2, 10)
    assert (out / "00000.parquet").stat().st_mtime_ns == first and not (out / "table.parquet.tmp-999").exists()
    keys, emb = E.load_embeddings(str(out))
    assert keys == [k for k in sorted(data["images"]) if k != "000000003"] + data["pq_keys"]
    torch.testing.assert_close(emb[-5:], _direct(data, data["pq_blobs"]), atol=1e-5, rtol=1e-5)
    # nothing left to do; other options are another run
    res = E.embed_shards(data["model"], data["pre"], pattern, str(out), batch_size=4, log=False)
    assert (res["shards_reused"], res["shards_written"]) == (3, 0)
    with pytest.raises(E.RunMismatch, match="normalize"):
        E.embed_shards(data["model"], data["pre"], pattern, str(out), normalize=True, log=False)


def test_rank_split_and_threads_equal_one_process(data, tmp_path):
    root = data["root"]
    pattern = [str(root / "shards" / "{00000..00001}.tar"), str(root / "table.parquet")]
    E.embed_shards(data["model"], data["pre"], pattern, str(tmp_path / "one"), batch_size=4, log=False)
    r0 = E.embed_shards(data["model"], data["pre"], pattern, str(tmp_path / "two"), batch_size=4, rank=0,
                        world_size=2, log=False)
    assert (r0["shards_written"], r0["complete"]) == (2, False)  # shards 0 and 2
    r1 = E.embed_shards(data["model"], data["pre"], pattern, str(tmp_path / "two"), batch_size=4, rank=1,
                        world_size=2, num_workers=2, log=False)
    assert r1["complete"] and r1["totals"]["run"]["processes"] == 2
    for name in ("00000.parquet", "00001.parquet", "table.parquet"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_cli_shards_and_folder_formats(data, tmp_path, capsys):
    root = data["root"]
    common = ["--checkpoint", str(root / "model"), "--batch-size", "4", "--workers", "0", "--no-progress"]
    out = tmp_path / "cli"
    assert main(["embed", str(root / "shards" / "{00000..00001}.tar"), "-o", str(out)] + common[:-1]) == 0
    err = capsys.readouterr().err
    assert "all 2 shards done: 10 of 12 samples embedded (32-d pooled, parquet), 2 skipped" in err
    assert "2/2" in err and "img_s" in err and "skipped=2" in err  # progress: shards done / total, img/s, skipped
    assert sorted(f for f in os.listdir(out) if f.endswith(".parquet")) == ["00000.parquet", "00001.parquet"]
    out2 = tmp_path / "cli_pq"
    assert main(["embed", str(root / "table.parquet"), "-o", str(out2), "--image-column", "jpg", "--key-column",
                 "key", "--format", "npy", "--embedding-dtype", "float16"] + common) == 0
    keys, emb = E.load_embeddings(str(out2))
    assert keys == data["pq_keys"] and emb.dtype == torch.float16
    # an image folder: safetensors shards of --shard-size as always, or a sharded run with --format parquet
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, b in list(data["images"].items())[:3]:
        (folder / f"{k}.jpg").write_bytes(b)
    assert main(["embed", str(folder), "-o", str(tmp_path / "legacy"), "--shard-size", "2"] + common) == 0
    assert json.loads((tmp_path / "legacy" / "manifest.json").read_text())["layout"] == 1
    assert main(["embed", str(folder), "-o", str(tmp_path / "fp"), "--shard-size", "2", "--format", "parquet"]
                + common) == 0
    assert sorted(f for f in os.listdir(tmp_path / "fp") if f.endswith(".parquet")) == ["shard-00000.parquet",
                                                                                        "shard-00001.parquet"]
    p1, e1 = E.load_embeddings(str(tmp_path / "legacy"))
    p2, e2 = E.load_embeddings(str(tmp_path / "fp"))
    assert p1 == p2
    torch.testing.assert_close(e1, e2)
    with pytest.raises(SystemExit, match="need --engine ray"):
        main(["embed", str(folder), "-o", str(tmp_path / "x"), "--actors", "2"] + common)


def test_embed_batch(data):
    blobs = data["pq_blobs"][:3]
    want = _direct(data, blobs)
    torch.testing.assert_close(E.embed_batch(data["model"], blobs, data["pre"]), want, atol=1e-5, rtol=1e-5)
    arr = np.array(blobs + [b"broken"], dtype=object)  # what a Spark / pandas binary column gives
    out = E.embed_batch(data["model"], arr, data["pre"], on_error="nan", normalize=True)
    assert out.shape == (4, 32) and torch.isnan(out[3]).all()
    torch.testing.assert_close(out[:3], torch.nn.functional.normalize(want, dim=-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="item 3 is not a readable image"):
        E.embed_batch(data["model"], arr, data["pre"])
    x = torch.stack([data["pre"].process(Image.open(io.BytesIO(b))) for b in blobs])
    torch.testing.assert_close(E.embed_batch(data["model"], x.numpy()), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="preprocessor: expected"):
        E.embed_batch(data["model"], blobs)


def test_import_stays_light_and_a_missing_extra_is_named():
    code = ("import sys, fastvit, fastvit.embed, fastvit.data, fastvit.cli; "
            "bad = [m for m in ('ray', 'pyarrow', 'webdataset') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys\nsys.modules['ray'] = None\ntry:\n    import fastvit.ray\nexcept ImportError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "fastvit[ray]"' in out
