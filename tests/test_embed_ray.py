"""fastvit.ray on a real local Ray cluster (one per module, 2 CPUs): the Ray engine writes what
the single-process engine writes; a model actor killed mid-run (os._exit on its 3rd batch) costs
nothing: every key exactly once; a driver SIGKILLed after some shards: the same command again
finishes the rest, every key exactly once, finished shards untouched and not recomputed; a corrupt
shard, a corrupt image and a sample without an image are listed with their reasons; Embedder /
embed_dataset on a user's dataset equal embed_batch."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastvit
from fastvit import embed as E
from fastvit.cli import main
from fastvit.convert import model_kwargs
from fastvit.factory import load_model
from fastvit.preprocess import Preprocessor

ray = pytest.importorskip("ray")
fray = pytest.importorskip("fastvit.ray")
Image = pytest.importorskip("PIL.Image")
wds = pytest.importorskip("webdataset")
pq = pytest.importorskip("pyarrow.parquet")

pytestmark = pytest.mark.timeout(300)
# --preprocess exact: the API default the local reference run used (the command defaults to fast)
RAY = ["--engine", "ray", "--actors", "1", "--gpus-per-actor", "0", "--preprocess", "exact"]


@pytest.fixture(scope="module")
def cluster():
    ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _jpeg(rng):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write_tar(path, s, n, rng, images, bad=()):
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            key = f"{s:04d}{i:05d}"
            sample = {"__key__": key, "txt": f"caption {key}", "json": {"key": key}}
            if ("noimage", i) not in bad:
                img = _jpeg(rng)
                sample["jpg"] = img[: len(img) // 3] if ("corrupt", i) in bad else img
                images[key] = sample["jpg"]
            w.write(sample)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny headless model folder; shards 00000..00002 (6 samples each; a corrupt JPEG in 00000,
    a sample without an image in 00001), 00003 a corrupt shard; the single-process output."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ray")
    torch.manual_seed(0)
    m = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    (root / "model").mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(root / "model" / "model.safetensors"))
    cfg = dict(architecture="fastvit", model_args=model_kwargs(m), num_classes=0,
               preprocess=Preprocessor.for_model(m).to_dict())
    (root / "model" / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    images = {}
    (root / "shards").mkdir()
    for s, bad in enumerate([{("corrupt", 2)}, {("noimage", 4)}, set()]):
        _write_tar(root / "shards" / f"{s:05d}.tar", s, 6, rng, images, bad)
    (root / "shards" / "00003.tar").write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    pattern = str(root / "shards" / "{00000..00003}.tar")
    model, pre = load_model(str(root / "model"))
    E.embed_shards(model, pre, [pattern], str(root / "local"), batch_size=4, log=False)
    return dict(root=root, pattern=pattern, images=images, model=model, pre=pre,
                spec=fastvit.embed.ModelSpec(checkpoint=str(root / "model"), device="cpu"))


GOOD = 16  # 18 samples, less the corrupt JPEG and the sample without an image


def _check_exactly_once(out, data):
    keys, emb = E.load_embeddings(str(out))
    ref_keys, ref = E.load_embeddings(str(data["root"] / "local"))
    assert len(keys) == len(set(keys)) == GOOD and keys == ref_keys
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    for name in ("00000", "00001", "00002"):  # each output shard: its input shard's keys, once, in order
        t = pq.read_table(out / f"{name}.parquet")
        assert t.column("key").to_pylist() == [k for k in ref_keys if k.startswith(f"{int(name):04d}")]


def test_ray_cli_equals_local_and_lists_bad_inputs(cluster, data, tmp_path, capsys):
    out = tmp_path / "ray"
    common = ["--checkpoint", str(data["root"] / "model"), "--batch-size", "4", "-o", str(out)]
    assert main(["embed", data["pattern"]] + RAY + common) == 0
    err = capsys.readouterr().err
    assert "0 of 4 shards already done" in err and "all 4 shards done: 16 of 18 samples embedded" in err
    assert "4/4" in err and "img_s" in err  # the progress bar: shards done / total, img/s, skipped
    _check_exactly_once(out, data)
    local = data["root"] / "local"
    assert (out / "skipped.jsonl").read_text() == (local / "skipped.jsonl").read_text()
    skipped = [json.loads(line) for line in open(out / "skipped.jsonl")]
    assert [(s["shard"], s["key"]) for s in skipped] == [("00000", "000000002"), ("00001", "000100004"),
                                                         ("00003", None)]
    assert skipped[0]["reason"].startswith("OSError") and "no image" in skipped[1]["reason"]
    assert "unreadable tar shard" in skipped[2]["reason"]
    for name in ("00000", "00001", "00002", "00003"):
        a, b = (json.loads((d / f"{name}.json").read_text()) for d in (out, local))
        assert {k: a[k] for k in ("run_key", "rows", "samples", "skipped", "identity")} == \
            {k: b[k] for k in ("run_key", "rows", "samples", "skipped", "identity")}
    total = json.loads((out / "summary.json").read_text())
    assert total["run"]["engine"] == "ray" and (total["embedded"], total["skipped"]) == (16, 3)
    # a rerun (either engine) finds every shard finished and computes nothing
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".parquet")}
    res = fray.embed_shards_ray(data["spec"], [data["pattern"]], str(out), batch_size=4, actors=1, gpus_per_actor=0,
                                log=False)
    assert (res["shards_reused"], res["shards_written"], res["embedded"], res["complete"]) == (4, 0, 0, True)
    res = E.embed_shards(data["model"], data["pre"], [data["pattern"]], str(out), batch_size=4, log=False)
    assert (res["shards_reused"], res["shards_written"]) == (4, 0)
    assert mtimes == {f: os.stat(out / f).st_mtime_ns for f in mtimes}


def test_actor_killed_mid_run(cluster, data, tmp_path):
    calls, marker = tmp_path / "calls.txt", tmp_path / "killed"

    class DiesOnThirdBatch(fray.Embedder):  # defined here: Ray ships it by value to the actors
        def embed(self, x):
            with open(calls, "a") as f:
                f.write(f"{os.getpid()} {len(x)}\n")
            n = sum(1 for _ in open(calls))
            if n == 3 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)  # the actor process dies mid-batch, its results never sent
            return super().embed(x)

    out = tmp_path / "out"
    res = fray.embed_shards_ray(data["spec"], [data["pattern"]], str(out), batch_size=2, actors=1, gpus_per_actor=0,
                                embedder_cls=DiesOnThirdBatch, log=False)
    assert res["complete"] and res["shards_written"] == 4
    assert marker.exists()
    lines = [line.split() for line in calls.read_text().splitlines()]
    assert len({pid for pid, _ in lines}) >= 2  # the actor was restarted ...
    assert sum(int(n) for _, n in lines) > GOOD  # ... and its lost batch computed again
    _check_exactly_once(out, data)


def test_driver_sigkilled_then_rerun_finishes_the_rest(cluster, data, tmp_path):
    """Shards 00000..00002 are tars, 00003 a named pipe nobody writes: its read task blocks, so
    the driver is caught after exactly 3 shards; then it is SIGKILLed, the pipe replaced by a tar."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        (shards / f"{s:05d}.tar").write_bytes((data["root"] / "shards" / f"{s:05d}.tar").read_bytes())
    os.mkfifo(shards / "00003.tar")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastvit", "embed", str(shards / "{00000..00003}.tar"), "-o", str(out),
           "--checkpoint", str(data["root"] / "model"), "--batch-size", "2", "--no-progress", "--address",
           cluster] + RAY
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = [out / f"{s:05d}.json" for s in range(3)]
    deadline = time.monotonic() + 150
    while not all(p.exists() for p in done):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the first 3 shards were not written in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "00003.json").exists() and not (out / "summary.json").exists()
    before = {f: (os.stat(out / f).st_mtime_ns, os.stat(out / f).st_ino) for f in os.listdir(out)
              if f[:5] in ("00000", "00001", "00002")}
    assert len(before) == 6  # data + sidecar of each
    os.remove(shards / "00003.tar")
    rng = np.random.default_rng(1)
    extra = {}
    _write_tar(shards / "00003.tar", 3, 5, rng, extra)

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 of 4 shards already done" in res.stderr
    after = {f: (os.stat(out / f).st_mtime_ns, os.stat(out / f).st_ino) for f in before}
    assert after == before  # finished shards untouched
    run = json.loads((out / "summary.json").read_text())["run"]
    # the model ran on shard 00003's 5 images only: the rerun embedded nothing else
    assert (run["engine"], run["shards_reused"], run["shards_written"], run["embedded"]) == ("ray", 3, 1, 5)
    keys, emb = E.load_embeddings(str(out))
    ref_keys, ref = E.load_embeddings(str(data["root"] / "local"))
    assert len(keys) == len(set(keys)) == GOOD + 5 and keys == ref_keys + sorted(extra)
    torch.testing.assert_close(emb[:GOOD], ref, atol=1e-5, rtol=1e-5)
    want = E.embed_batch(data["model"], [extra[k] for k in sorted(extra)], data["pre"])
    torch.testing.assert_close(emb[GOOD:], want, atol=1e-5, rtol=1e-5)


def test_embed_dataset_on_a_users_dataset(cluster, data):
    keys = sorted(data["images"])[:5]
    blobs = [data["images"][k] for k in keys]
    ds = ray.data.from_items([{"key": k, "image": b} for k, b in zip(keys, blobs)]
                             + [{"key": "broken", "image": b"not an image"}])
    want = E.embed_batch(data["model"], [b for k, b in zip(keys, blobs) if k != "000000002"], data["pre"])
    for decode in ("cpu", "actor"):
        res = fray.embed_dataset(ds, data["spec"], batch_size=3, actors=1, num_gpus=0, decode=decode)
        rows = res.take_all()
        if decode == "cpu":  # decoding in CPU tasks feeding the actors, not fused into them
            stats = res.stats()
            assert "MapBatches(Embedder)" in stats and "MapBatches(_decode_batch)" in stats
            assert "MapBatches(_decode_batch)->MapBatches(Embedder)" not in stats
        by_key = {r["key"]: r for r in rows}
        assert sorted(by_key) == sorted(keys + ["broken"]) and len(rows) == 6
        assert "image" not in rows[0]
        assert by_key["broken"]["skip_reason"].startswith("UnidentifiedImageError")
        assert np.isnan(by_key["broken"]["embedding"]).all()
        assert by_key["000000002"]["skip_reason"].startswith("OSError")  # the truncated JPEG
        good = [k for k in keys if k != "000000002"]
        got = torch.from_numpy(np.stack([by_key[k]["embedding"] for k in good]))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert all(by_key[k]["skip_reason"] == "" for k in good)
    with pytest.raises(TypeError, match="model_spec: expected a fastvit.embed.ModelSpec"):
        fray.embed_dataset(ds, {"checkpoint": "x"})
    with pytest.raises(ValueError, match="decode: expected 'cpu', 'actor' or 'cuda'"):
        fray.embed_dataset(ds, data["spec"], decode="gpu")


def test_ray_on_an_image_folder_equals_the_folder_layout(cluster, data, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    keys = sorted(data["images"])[:5]
    for k in keys:
        (folder / f"{k}.jpg").write_bytes(data["images"][k])
    common = ["--checkpoint", str(data["root"] / "model"), "--batch-size", "2", "--shard-size", "2", "--no-progress",
              "--preprocess", "exact"]
    assert main(["embed", str(folder), "-o", str(tmp_path / "legacy")] + common) == 0  # local: safetensors, layout 1
    assert main(["embed", str(folder), "-o", str(tmp_path / "ray"), "--format", "clip-retrieval"] + RAY + common) == 0
    p1, e1 = E.load_embeddings(str(tmp_path / "legacy"))
    p2, e2 = E.load_embeddings(str(tmp_path / "ray"))
    assert p1 == p2 and len(p1) == 4  # 000000002 is the corrupt JPEG
    torch.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-5)
    assert sorted(os.listdir(tmp_path / "ray" / "img_emb")) == [f"img_emb_{i}.npy" for i in range(3)]
    meta = pq.read_table(tmp_path / "ray" / "metadata" / "metadata_1.parquet")
    assert meta.column("key").to_pylist() == [str(folder / f"{keys[3]}.jpg")]  # slice [2:4], the corrupt one skipped


def test_embedder_batched_decode_path_and_fast_mode(data):
    """The actor's batched decode (``decode='cuda'``: nvJPEG on a GPU; here the same code on the
    CPU device) gives the one-by-one decoder's embeddings; fast mode stays close; a bad row keeps
    its reason. No cluster needed: the Embedder is a plain class."""
    from fastvit.ray import SKIP, Embedder

    keys = sorted(data["images"])[:4]
    images = np.array([data["images"][k] for k in keys] + [b"not an image"], dtype=object)
    batch = {"image": images, "key": np.array(keys + ["bad"], dtype=object)}
    one = Embedder(data["spec"], decode="cpu")(dict(batch))
    many = Embedder(data["spec"], decode="cuda")(dict(batch))
    fast = Embedder(data["spec"], preprocess="fast")(dict(batch))
    bad = [i for i, r in enumerate(one[SKIP]) if r]
    assert bad == [i for i, r in enumerate(many[SKIP]) if r] and 4 in bad
    ok = [i for i in range(5) if i not in bad]
    np.testing.assert_allclose(many["embedding"][ok], one["embedding"][ok], atol=2e-2)  # torch vs PIL resize
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(fast["embedding"][ok]),
                                                torch.from_numpy(one["embedding"][ok]), dim=-1)
    assert cos.min() > 0.95, cos  # pixel-noise JPEGs resized 40 x 48 -> 32: the hardest case for fast mode
    with pytest.raises(ValueError, match="decode: 'cuda' decodes on the GPU and needs a CUDA device"):
        E.embed_shards(data["model"], data["pre"], [data["pattern"]], "/nonexistent", decode="cuda", device="cpu",
                       log=False)
