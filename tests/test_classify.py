"""Folder inference: input order, batching with workers, CSV / JSONL, and torchrun over 2 gloo processes."""

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fastvit.classify import classify, expand_inputs, write_results
from fastvit.factory import convert, load_model

Image = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny converted classifier with labels and a HF preprocessor, and a folder of photos."""
    root = tmp_path_factory.mktemp("classify")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=6,
                                 id2label={i: f"class_{i}" for i in range(6)},
                                 label2id={f"class_{i}": i for i in range(6)})
    hf = transformers.ViTForImageClassification(cfg).eval()
    hf.save_pretrained(str(root / "hf"))
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(root / "hf"))
    convert(str(root / "hf"), str(root / "model"))
    imgs = root / "images"
    (imgs / "sub").mkdir(parents=True)
    Image.fromarray(skdata.chelsea()).save(imgs / "b_chelsea.png")
    Image.fromarray(skdata.astronaut()).save(imgs / "a_astronaut.jpg")
    Image.fromarray(skdata.camera()).save(imgs / "sub" / "camera.png")  # grayscale: converted to RGB
    Image.fromarray(skdata.coffee()).save(imgs / "c_coffee.png")
    Image.fromarray(skdata.coins()).save(imgs / "sub" / "coins.png")  # 5 images: an uneven 2-way shard
    (imgs / "notes.txt").write_text("not an image")
    return root


def _direct(files, model, pre, k):
    with torch.no_grad():
        probs = model(pre(files)).softmax(-1)
    p, i = probs.topk(k, -1)
    return p, i


def test_expand_inputs_order(setup):
    imgs = setup / "images"
    files = expand_inputs([str(imgs / "c_coffee.png"), str(imgs)])
    names = [os.path.relpath(f, imgs) for f in files]
    assert names == ["c_coffee.png", "a_astronaut.jpg", "b_chelsea.png", "c_coffee.png", "sub/camera.png",
                     "sub/coins.png"]
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_inputs([str(imgs / "nope")])
    (setup / "empty").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="no image files"):
        expand_inputs([str(setup / "empty")])


@pytest.mark.parametrize("batch_size,workers", [(1, 0), (3, 2)])
def test_classify_matches_model(setup, batch_size, workers):
    model, pre = load_model(str(setup / "model"))
    res = classify([str(setup / "images")], model, pre, batch_size=batch_size, topk=3, num_workers=workers)
    files = expand_inputs([str(setup / "images")])
    assert [r["path"] for r in res] == files
    p, i = _direct(files, model, pre, 3)
    for r, pr, ix in zip(res, p, i):
        assert [t["index"] for t in r["topk"]] == ix.tolist()
        assert [t["label"] for t in r["topk"]] == [f"class_{j}" for j in ix.tolist()]
        assert torch.allclose(torch.tensor([t["prob"] for t in r["topk"]]), pr, atol=1e-6)


def test_write_results_formats(tmp_path):
    res = [{"path": "x,1.png", "topk": [{"index": 2, "label": "cat", "prob": 0.75}, {"index": 0, "label": "a",
                                                                                     "prob": 0.25}]}]
    write_results(res, str(tmp_path / "r.csv"))
    rows = list(csv.reader(open(tmp_path / "r.csv")))
    assert rows[0] == ["path", "top1_index", "top1_label", "top1_prob", "top2_index", "top2_label", "top2_prob"]
    assert rows[1] == ["x,1.png", "2", "cat", "0.75", "0", "a", "0.25"]
    write_results(res, str(tmp_path / "r.jsonl"))
    assert [json.loads(line) for line in open(tmp_path / "r.jsonl")] == res
    with pytest.raises(ValueError, match="output"):
        write_results(res, str(tmp_path / "r.txt"))


def test_cli_classify(setup, tmp_path, capsys):
    from fastvit.cli import main

    out = tmp_path / "res.csv"
    assert main(["classify", str(setup / "images"), "--checkpoint", str(setup / "model"), "--batch-size", "2",
                 "--topk", "2", "--workers", "0", "--output", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out)))
    files = expand_inputs([str(setup / "images")])
    assert [r["path"] for r in rows] == files
    model, pre = load_model(str(setup / "model"))
    _, i = _direct(files, model, pre, 2)
    assert [int(r["top1_index"]) for r in rows] == i[:, 0].tolist()
    assert main(["classify", str(setup / "images" / "b_chelsea.png"), "--checkpoint", str(setup / "model"),
                 "--workers", "0", "--no-progress", "--topk", "1"]) == 0
    assert "b_chelsea.png\tclass_" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["classify", str(setup / "images"), "--checkpoint", str(setup / "model"), "--output", "x.txt"])


def test_headless_model_is_refused(setup):
    import fastvit
    from fastvit.preprocess import Preprocessor

    m = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    with pytest.raises(ValueError, match="num_classes"):
        classify([str(setup / "images")], m, Preprocessor.for_model(m))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_torchrun_two_gloo_processes(setup, tmp_path):
    """`torchrun --nproc-per-node 2 -m fastvit classify` shards the images and merges them in input
    order; a broken file on rank 1 is skipped there and reported once, by rank 0."""
    import shutil

    imgs = tmp_path / "images"
    shutil.copytree(setup / "images", imgs)
    (imgs / "b_broken.jpg").write_bytes(os.urandom(3000))  # input 1 of 6: rank 1's first
    out = tmp_path / "dist.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "fastvit", "classify", str(imgs),
           "--checkpoint", str(setup / "model"), "--batch-size", "2", "--topk", "3", "--workers", "1",
           "--device", "cpu", "--no-progress", "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # each rank did its strided share, not the whole list
    for rank, n in ((0, "3 of 6 images"), (1, "2 of 6 images (1 skipped)")):
        assert f"rank {rank} of 2 classified {n}" in proc.stderr, proc.stderr[-3000:]
    got = [json.loads(line) for line in open(out)]
    model, pre = load_model(str(setup / "model"))
    ref = classify([str(setup / "images")], model, pre, batch_size=5, topk=3)
    assert [r["path"] for r in got] == [str(imgs / os.path.relpath(r["path"], setup / "images")) for r in ref]
    for g, r in zip(got, ref):
        assert [t["index"] for t in g["topk"]] == [t["index"] for t in r["topk"]]
        assert max(abs(a["prob"] - b["prob"]) for a, b in zip(g["topk"], r["topk"])) < 1e-5
    assert [json.loads(line)["path"] for line in open(tmp_path / "dist.skipped.jsonl")] == [str(imgs / "b_broken.jpg")]
    assert proc.stderr.count("skipped 1 unreadable input(s)") == 1

def test_bad_file_is_skipped_and_reported(setup, tmp_path, capsys):
    """6 images, 1 of them broken: 5 results, the broken one reported with its reason (API and CLI)."""
    import shutil

    from fastvit.cli import main

    imgs = tmp_path / "images"
    shutil.copytree(setup / "images", imgs)
    (imgs / "b_broken.jpg").write_bytes(os.urandom(3000))  # random bytes with an image extension
    files = expand_inputs([str(imgs)])
    assert len(files) == 6
    good = [f for f in files if "broken" not in f]
    model, pre = load_model(str(setup / "model"))
    for workers in (0, 2):
        res = classify([str(imgs)], model, pre, batch_size=2, topk=2, num_workers=workers)
        assert [r["path"] for r in res] == good
        assert [s["path"] for s in res.skipped] == [str(imgs / "b_broken.jpg")]
        assert "cannot identify image file" in res.skipped[0]["reason"]
    _, i = _direct(good, model, pre, 2)
    assert [[t["index"] for t in r["topk"]] for r in res] == i.tolist()

    out = tmp_path / "preds.csv"
    assert main(["classify", str(imgs), "--checkpoint", str(setup / "model"), "--batch-size", "4", "--workers", "0",
                 "--no-progress", "-o", str(out)]) == 0
    assert [r["path"] for r in csv.DictReader(open(out))] == good
    skipped = [json.loads(line) for line in open(tmp_path / "preds.skipped.jsonl")]
    assert [s["path"] for s in skipped] == [str(imgs / "b_broken.jpg")]
    err = capsys.readouterr().err
    assert "skipped 1 unreadable input(s), listed in" in err and "b_broken.jpg: UnidentifiedImageError" in err
    # printed to stdout: the good ones, and the bad one on stderr
    assert main(["classify", str(imgs), "--checkpoint", str(setup / "model"), "--workers", "0", "--no-progress",
                 "--topk", "1"]) == 0
    cap = capsys.readouterr()
    assert len(cap.out.strip().splitlines()) == 5 and "b_broken.jpg" not in cap.out and "b_broken.jpg" in cap.err
