"""`fastvit embed` / fastvit.embed: shards + sidecars in input order, bad files skipped with their
reason and counted, byte-identical resumption after a killed run, rank splits whose union is the
single-process output, npy / safetensors, L2 normalisation, the embedding choice, the iterator."""

import json
import os
import shutil

import pytest
import torch

import fastvit
from fastvit import embed as E
from fastvit.cli import main
from fastvit.convert import model_kwargs
from fastvit.factory import load_model
from fastvit.imagefiles import expand_inputs
from fastvit.preprocess import Preprocessor

Image = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")

OPTS = dict(shard_size=3, batch_size=2)  # 7 inputs -> shards of 3, 3, 1; batches never cross a shard


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny fastvit model folder (5-class head), a folder of 5 photos + a broken and an empty
    file, and the uninterrupted single-process output ('ref') to compare everything with."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)
    m = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    (root / "model").mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(root / "model" / "model.safetensors"))
    cfg = dict(architecture="fastvit", model_args=model_kwargs(m), num_classes=5,
               preprocess=Preprocessor.for_model(m).to_dict())
    (root / "model" / "config.json").write_text(json.dumps(cfg))
    imgs = root / "images"
    (imgs / "sub").mkdir(parents=True)
    Image.fromarray(skdata.chelsea()).save(imgs / "a_chelsea.png")
    Image.fromarray(skdata.astronaut()).save(imgs / "b_astronaut.jpg")
    (imgs / "c_broken.jpg").write_bytes(torch.randint(0, 256, (2000,), dtype=torch.uint8).numpy().tobytes())
    Image.fromarray(skdata.coffee()).save(imgs / "d_coffee.jpg")
    (imgs / "e_empty.png").write_bytes(b"")
    Image.fromarray(skdata.camera()).save(imgs / "sub" / "camera.png")  # grayscale: converted to RGB
    Image.fromarray(skdata.coins()).save(imgs / "sub" / "coins.png")
    (imgs / "notes.txt").write_text("not an image")  # not an image extension: not an input
    model, pre = load_model(str(root / "model"))
    summary = E.embed_to_dir(model, pre, [str(imgs)], str(root / "ref"), **OPTS, log=False)
    return root, summary


def _model(setup):
    return load_model(str(setup[0] / "model"))


def _files(d, skip=("manifest.json",)):
    """Every output file's bytes, except run reports (summary*.json, the lock) and ``skip``."""
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))
            if not f.startswith("summary") and f != ".lock" and f not in skip}


def _expected(setup, normalize=False):
    """(good paths, direct pooled features) in input order."""
    root = setup[0]
    files = expand_inputs([str(root / "images")])
    good = [f for f in files if "broken" not in f and "empty" not in f]
    model, pre = _model(setup)
    with torch.no_grad():
        out = model.forward_head(model.forward_features(pre(good)), pre_logits=True)
    return good, torch.nn.functional.normalize(out, dim=-1) if normalize else out


def test_outputs_order_sidecars_skipped_summary(setup):
    root, summary = setup
    ref = root / "ref"
    assert summary["complete"] and summary["shards_written"] == 3 and summary["shards_reused"] == 0
    assert (summary["embedded"], summary["skipped"]) == (5, 2)
    assert sorted(os.listdir(ref)) == [".lock", "manifest.json"] + [f"shard-0000{i}.{x}" for i in range(3)
                                                                      for x in ("json", "safetensors")] \
        + ["skipped.jsonl", "summary.json"]
    good, want = _expected(setup)
    paths, emb = E.load_embeddings(str(ref))
    assert paths == good and emb.shape == (5, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, want, atol=1e-5, rtol=1e-5)
    # shard 0 = inputs 0..2 (2 good, the broken file skipped), shard 1 = 3..5, shard 2 = 6
    from safetensors.torch import load_file

    files = expand_inputs([str(root / "images")])
    side = [json.loads((ref / f"shard-0000{i}.json").read_text()) for i in range(3)]
    assert [(s["start"], s["stop"], s["rows"]) for s in side] == [(0, 3, 2), (3, 6, 2), (6, 7, 1)]
    assert side[0]["paths"] == [files[0], files[1]] and side[0]["indices"] == [0, 1]
    assert [(s["index"], s["path"]) for s in side[0]["skipped"]] == [(2, files[2])]
    t = load_file(str(ref / "shard-00000.safetensors"))
    assert t["index"].tolist() == [0, 1] and t["embeddings"].shape == (2, 32)
    skipped = [json.loads(line) for line in open(ref / "skipped.jsonl")]
    assert [(s["index"], os.path.basename(s["path"])) for s in skipped] == [(2, "c_broken.jpg"), (4, "e_empty.png")]
    assert "cannot identify image file" in skipped[0]["reason"] and "empty file" in skipped[1]["reason"]
    total = json.loads((ref / "summary.json").read_text())
    assert (total["inputs"], total["embedded"], total["skipped"], total["shards"], total["dim"]) == (7, 5, 2, 3, 32)
    assert total["complete"] and total["run"]["img_per_s"] > 0 and total["embedding"] == "pooled"


def test_killed_run_resumes_to_identical_files(setup, tmp_path, monkeypatch, capsys):
    root, _ = setup
    model, pre = _model(setup)
    out = tmp_path / "out"
    real_write = E._atomic_write

    def killed_while_writing_shard_2(path, data):
        if path.endswith("shard-00002.safetensors"):  # half a temp file, then the process dies
            with open(f"{path}.tmp-{os.getpid()}", "wb") as f:
                f.write(data[: len(data) // 2])
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(E, "_atomic_write", killed_while_writing_shard_2)
    with pytest.raises(KeyboardInterrupt):
        E.embed_to_dir(model, pre, [str(root / "images")], str(out), **OPTS, log=False)
    monkeypatch.setattr(E, "_atomic_write", real_write)
    assert any(".tmp-" in f for f in os.listdir(out)) and not (out / "shard-00002.json").exists()
    assert not (out / "summary.json").exists()
    with pytest.raises(FileNotFoundError, match="shard 2 of 3 is not finished"):
        E.load_embeddings(str(out))
    # a torn shard 1 (data no longer the size its sidecar records) is not taken as finished
    data = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").write_bytes(data[:-10])

    res = E.embed_to_dir(model, pre, [str(root / "images")], str(out), **OPTS)
    assert (res["shards_reused"], res["shards_written"], res["complete"]) == (1, 2, True)
    assert "1 of 3 shards already done" in capsys.readouterr().err
    assert not any(".tmp-" in f for f in os.listdir(out))
    assert _files(out, skip=()) == _files(root / "ref", skip=())  # manifest included

    res = E.embed_to_dir(model, pre, [str(root / "images")], str(out), **OPTS)  # nothing left to do
    assert (res["shards_reused"], res["shards_written"]) == (3, 0)
    assert "3 of 3 shards already done" in capsys.readouterr().err
    assert _files(out, skip=()) == _files(root / "ref", skip=())


def test_rank_split_union_equals_single_process(setup, tmp_path, monkeypatch):
    """Ranks 0 and 1 of 2, one after the other (rank 1 from torchrun's RANK / WORLD_SIZE, with 2
    DataLoader workers): together the same files as one process."""
    root, _ = setup
    model, pre = _model(setup)
    out = tmp_path / "out"
    r0 = E.embed_to_dir(model, pre, [str(root / "images")], str(out), **OPTS, rank=0, world_size=2, log=False)
    assert (r0["shards"], r0["shards_written"], r0["complete"]) == (2, 2, False)  # shards 0 and 2
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["shard-00000.safetensors",
                                                                                "shard-00002.safetensors"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r1 = E.embed_to_dir(model, pre, [str(root / "images")], str(out), **OPTS, num_workers=2, log=False)
    assert (r1["rank"], r1["shards"], r1["shards_written"], r1["complete"]) == (1, 1, 1, True)
    assert _files(out, skip=()) == _files(root / "ref", skip=())
    total = json.loads((out / "summary.json").read_text())
    assert (total["embedded"], total["skipped"], total["run"]["processes"]) == (5, 2, 2)
    assert sorted(f for f in os.listdir(out) if f.startswith("summary-")) == ["summary-rank0-of-2.json",
                                                                             "summary-rank1-of-2.json"]


def test_npy_format_and_l2_normalisation(setup, tmp_path):
    import numpy as np

    root, _ = setup
    model, pre = _model(setup)
    out = tmp_path / "npy"
    E.embed_to_dir(model, pre, [str(root / "images")], str(out), **OPTS, fmt="npy", normalize=True, log=False)
    arr = np.load(out / "shard-00000.npy", allow_pickle=False)
    assert arr.shape == (2, 32) and arr.dtype == np.float32
    paths, emb = E.load_embeddings(str(out))
    good, want = _expected(setup, normalize=True)
    assert paths == good
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(emb, want, atol=1e-5, rtol=1e-5)
    side = json.loads((out / "shard-00001.json").read_text())
    assert side["file"] == "shard-00001.npy" and side["normalize"] is True


def test_other_run_in_folder_is_refused_unless_overwrite(setup, tmp_path):
    root, _ = setup
    model, pre = _model(setup)
    out = tmp_path / "out"
    shutil.copytree(root / "ref", out)
    fewer = [str(root / "images" / "a_chelsea.png"), str(root / "images" / "d_coffee.jpg")]
    with pytest.raises(E.RunMismatch, match="differs in inputs, inputs_sha256.*overwrite"):
        E.embed_to_dir(model, pre, fewer, str(out), **OPTS, log=False)
    with pytest.raises(E.RunMismatch, match="normalize"):
        E.embed_to_dir(model, pre, [str(root / "images")], str(out), **OPTS, normalize=True, log=False)
    res = E.embed_to_dir(model, pre, fewer, str(out), **OPTS, overwrite=True, log=False)
    assert res["complete"] and res["shards_written"] == 1
    # the replaced run's shards 1 and 2 are gone, not left to be mistaken for this run's
    assert sorted(os.listdir(out)) == [".lock", "manifest.json", "shard-00000.json", "shard-00000.safetensors",
                                       "skipped.jsonl", "summary.json"]
    res = E.embed_to_dir(model, pre, fewer, str(out), **OPTS, overwrite=True, log=False)  # same run: resumed
    assert (res["shards_reused"], res["shards_written"]) == (1, 0)
    paths, emb = E.load_embeddings(str(out))
    assert paths == fewer and emb.shape == (2, 32)
    assert json.loads((out / "summary.json").read_text())["inputs"] == 2
    assert (out / "skipped.jsonl").read_text() == ""


def test_embedding_choice_and_projection(setup):
    model, pre = _model(setup)
    x = torch.randn(2, 3, 32, 32)
    fn, name = E.embedding_fn(model)
    assert name == "pooled" and fn(x).shape == (2, 32)
    fn, name = E.embedding_fn(model, "logits")
    torch.testing.assert_close(fn(x), model(x))
    with pytest.raises(ValueError, match="'projected' needs a model whose head is a projection.*5-class classifier"):
        E.embedding_fn(model, "projected")
    headless = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    with pytest.raises(ValueError, match="'logits' needs a classifier head.*num_classes=0"):
        E.embedding_fn(headless, "logits")
    with pytest.raises(ValueError, match="expected one of"):
        E.embedding_fn(model, "cls")
    # a CLIP-style tower: the head is a projection; 'auto' picks it
    tower = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=16)
    tower.has_projection = True
    fn, name = E.embedding_fn(tower)
    assert name == "projected"
    torch.testing.assert_close(fn(x), tower(x))
    with pytest.raises(ValueError, match="'logits' needs a classifier"):
        E.embedding_fn(tower, "logits")
    # Hugging Face CLIP's visual_projection: a linear head without bias
    hf_tower = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=16)
    hf_tower.head = torch.nn.Linear(32, 16, bias=False)
    assert E.has_projection(hf_tower) and E.embedding_fn(hf_tower)[1] == "projected"
    assert not E.has_projection(model) and not E.has_projection(headless)
    tokens = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                                       global_pool="")
    with pytest.raises(ValueError, match=r"expected \(B, D\)"):
        E.embedding_fn(tokens)[0](x)


def test_iter_embeddings(setup):
    root, _ = setup
    model, pre = _model(setup)
    bad = []
    batches = list(E.iter_embeddings(model, pre, [str(root / "images")], batch_size=3, on_skip=lambda p, r:
                                     bad.append((os.path.basename(p), r))))
    good, want = _expected(setup)
    assert [len(p) for p, _ in batches] == [2, 2, 1]  # inputs in threes, the bad ones left out
    assert [p for ps, _ in batches for p in ps] == good
    torch.testing.assert_close(torch.cat([e for _, e in batches]), want, atol=1e-5, rtol=1e-5)
    assert [b for b, _ in bad] == ["c_broken.jpg", "e_empty.png"]
    # an exact list (expand=False): a missing file is skipped with a warning by default
    listed = [good[0], str(root / "images" / "missing.jpg")]
    with pytest.warns(UserWarning, match="missing.jpg.*No such file"):
        out = list(E.iter_embeddings(model, pre, listed, batch_size=4, expand=False, normalize=True))
    assert out[0][0] == [good[0]]
    torch.testing.assert_close(out[0][1], torch.nn.functional.normalize(want[:1], dim=-1), atol=1e-5, rtol=1e-5)


def test_cli_embed_folder_and_list_file(setup, tmp_path, capsys, monkeypatch):
    root, _ = setup
    # --preprocess exact: the API's default (the command's is fast), so the files equal the API's run
    common = ["--checkpoint", str(root / "model"), "--shard-size", "3", "--batch-size", "2", "--workers", "0",
              "--no-progress", "--preprocess", "exact"]
    out = tmp_path / "cli"
    assert main(["embed", str(root / "images"), "-o", str(out)] + common) == 0
    err = capsys.readouterr().err
    assert "5 images embedded, 2 skipped" in err and "all 3 shards done" in err and "skipped.jsonl" in err
    assert _files(out) == _files(root / "ref")
    # the same inputs as a list file (a comment and a blank line in it): the same shards
    lst = tmp_path / "list.txt"
    lst.write_text("# my images\n" + "\n".join(expand_inputs([str(root / "images")])) + "\n\n")
    out2 = tmp_path / "cli_list"
    assert main(["embed", "--list", str(lst), "-o", str(out2)] + common) == 0
    assert _files(out2) == _files(root / "ref")
    # a rank of a torchrun-style launch: RANK / WORLD_SIZE from the environment
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out3 = tmp_path / "cli_rank1"
    assert main(["embed", str(root / "images"), "-o", str(out3)] + common) == 0
    assert "rank 1/2: 0 of 1 shards already done" in capsys.readouterr().err
    assert _files(out3) == {k: v for k, v in _files(root / "ref").items() if k.startswith("shard-00001")}
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit, match="'projected' needs a model whose head is a projection"):
        main(["embed", str(root / "images"), "-o", str(tmp_path / "x"), "--embedding", "projected"] + common)
    with pytest.raises(SystemExit, match="holds another embedding run"):
        main(["embed", str(root / "images"), "-o", str(out), "--normalize"] + common)
    with pytest.raises(SystemExit, match="expected image files, folders or --list"):
        main(["embed", "-o", str(out)] + common)


def test_cli_embed_preset_random_weights(setup, tmp_path, capsys):
    root, _ = setup
    out = tmp_path / "preset"
    assert main(["embed", str(root / "images" / "a_chelsea.png"), "--model", "vit_tiny_patch16_224", "-o", str(out),
                 "--workers", "0", "--no-progress", "--format", "npy", "--normalize"]) == 0
    assert "vit_tiny_patch16_224 has random weights (seed 0)" in capsys.readouterr().err
    paths, emb = E.load_embeddings(str(out))
    assert emb.shape == (1, 192)
