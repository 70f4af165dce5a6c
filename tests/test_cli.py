"""`fastvit demo`: the table it prints is computed, every available backend agrees with the
float32 reference, and the pictures are written."""

import os
import re

import torch

from fastvit import cli


def test_demo_runs_every_available_backend_and_writes_pictures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^(triton|cuda|torch)\s+cpu\s+float32\s+(\S+)", text, re.M)}
    assert set(rows) == {"triton", "cuda", "torch"}, text
    assert float(rows["torch"]) == 0.0  # the torch backend is the reference
    assert float(rows["triton"]) < 1e-4, "the Triton kernels (interpreter) disagree with the reference"
    assert rows["cuda"] == "-"  # no GPU here: reported with its reason, not run
    assert "needs a CUDA tensor" in text
    for photo in ("chelsea", "astronaut"):
        for pic in ("patches", "pos_embed_similarity", "attention_cls", "attention_query", "attention_rollout"):
            path = out / photo / f"{pic}.png"
            assert path.is_file() and os.path.getsize(path) > 10_000, path


def test_sincos_pos_embed_structure():
    e = cli.sincos_pos_embed((5, 7), 32, temperature=30.0)
    assert e.shape == (35, 32)
    sim = torch.nn.functional.normalize(e, dim=1) @ torch.nn.functional.normalize(e, dim=1).T
    assert torch.allclose(sim.diagonal(), torch.ones(35), atol=1e-6)
    # similarity falls off with distance, the same along a row (index 0, 1, 2) and a column (0, 7, 14)
    assert sim[0, 1] > sim[0, 2] > sim[0, 3] > sim[0, 4]
    assert torch.allclose(sim[0, [1, 2, 3, 4]], sim[0, [7, 14, 21, 28]], atol=1e-6)


def test_subcommands_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"info", "demo", "bench", "viz", "classify", "embed", "convert"} <= set(sub.choices)
    args = parser.parse_args(["embed", "imgs", "-o", "out", "--model", "vit_tiny_patch16_224"])
    # --format defaults by the inputs: safetensors for image folders, parquet for tar / parquet shards
    assert (args.embedding, args.format, args.shard_size, args.normalize) == ("auto", None, 10000, False)
    assert (args.engine, args.embedding_dtype, args.actors) == ("local", "float32", None)
    # the options classify and embed share
    for cmd in ("classify", "embed"):
        a = parser.parse_args([cmd, "x", "--list", "l1.txt", "--list", "l2.txt", "--batch-size", "8", "--dtype",
                               "bf16", "--backend", "torch", "--device", "cpu", "--workers", "0", "--no-progress"]
                              + (["-o", "out"] if cmd == "embed" else []))
        assert (a.list_files, a.batch_size, a.workers, a.no_progress) == (["l1.txt", "l2.txt"], 8, 0, True)
