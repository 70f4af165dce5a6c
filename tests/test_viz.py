"""The maps behind the pictures are right, and the pictures are written at their sizes."""

import numpy as np
import pytest
import torch

import fastvit
from fastvit import viz

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")


def _tiny(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4)
    args.update(kw)
    torch.manual_seed(0)
    return fastvit.VisionTransformer(**args).eval()


# --------------------------------------------------------------------------- maps
@pytest.mark.parametrize("kw", [dict(), dict(reg_tokens=2, no_embed_class=True), dict(img_size=(32, 48)),
                                dict(distilled=True)], ids=["vit", "reg_no_embed_class", "3x4", "distilled"])
def test_pos_embed_similarity(kw):
    m = _tiny(**kw)
    gh, gw = m.patch_embed.grid_size
    sim = viz.pos_embed_similarity(m)
    assert sim.shape == (gh, gw, gh, gw)
    flat = sim.reshape(gh * gw, gh * gw)
    assert torch.allclose(flat.diagonal(), torch.ones(gh * gw), atol=1e-6), "self-similarity must be 1"
    assert torch.allclose(flat, flat.T, atol=1e-6)
    # with one-hot position rows (one direction per patch) every other patch is orthogonal
    n = m.pos_embed.shape[1]
    with torch.no_grad():
        m.pos_embed.copy_(torch.eye(n, m.embed_dim)[None] * 3.0)
    assert torch.equal(viz.pos_embed_similarity(m).reshape(gh * gw, gh * gw), torch.eye(gh * gw))


def test_rollout_identity_and_uniform():
    B, H, N, L = 2, 3, 7, 4
    eye = torch.eye(N).expand(B, H, N, N)
    assert torch.allclose(viz.attention_rollout([eye] * L), torch.eye(N).expand(B, N, N))
    uni = torch.full((B, H, N, N), 1.0 / N)
    # (0.5 U + 0.5 I)^L = (1 - 0.5^L) U + 0.5^L I, since U is idempotent
    expect = (1 - 0.5 ** L) * torch.full((N, N), 1.0 / N) + 0.5 ** L * torch.eye(N)
    assert torch.allclose(viz.attention_rollout([uni] * L)[0], expect, atol=1e-6)
    # without the residual term, uniform attention rolls out to uniform
    assert torch.allclose(viz.attention_rollout([uni] * L, residual=False)[0], torch.full((N, N), 1.0 / N))


def test_rollout_order_and_head_fusion():
    torch.manual_seed(0)
    a1, a2 = torch.rand(1, 2, 5, 5).softmax(-1), torch.rand(1, 2, 5, 5).softmax(-1)

    def layer(a):
        a = 0.5 * a.mean(1) + 0.5 * torch.eye(5)
        return a / a.sum(-1, keepdim=True)

    got = viz.attention_rollout([a1, a2])
    assert torch.allclose(got, layer(a2) @ layer(a1), atol=1e-6), "later layers multiply from the left"
    assert not torch.allclose(got, layer(a1) @ layer(a2), atol=1e-4)
    assert torch.allclose(got.sum(-1), torch.ones(1, 5), atol=1e-6)
    mx = viz.attention_rollout([a1], head_fusion="max")
    ref = 0.5 * a1.amax(1) + 0.5 * torch.eye(5)
    assert torch.allclose(mx, ref / ref.sum(-1, keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="head_fusion"):
        viz.attention_rollout([a1], head_fusion="median")


def test_cls_and_query_attention_pick_the_right_row():
    n_prefix, grid = 2, (3, 4)
    N = n_prefix + 12
    attn = torch.zeros(1, 2, N, N)
    attn[0, :, 0, n_prefix + 6] = 1.0  # class token looks at patch 6 = (row 1, col 2)
    attn[0, :, n_prefix + 9, n_prefix + 3] = 1.0  # patch 9 = (2, 1) looks at patch 3 = (0, 3)
    cls = viz.cls_attention(attn, n_prefix, grid)
    assert cls.shape == (1, 2, 3, 4) and cls[0, 0, 1, 2] == 1 and cls.sum() == 2
    q = viz.query_attention(attn, (2, 1), n_prefix, grid)
    assert torch.equal(q, viz.query_attention(attn, 9, n_prefix, grid))
    assert q[0, 1, 0, 3] == 1 and q.sum() == 2
    with pytest.raises(ValueError, match="query"):
        viz.query_attention(attn, (3, 0), n_prefix, grid)
    with pytest.raises(ValueError, match="attn"):
        viz.cls_attention(attn, 1, grid)


def test_attention_maps_only_requested_layers(monkeypatch):
    m = _tiny()
    x = torch.randn(1, 3, 32, 32)
    calls = []
    real = fastvit.ops.attention_probs

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(fastvit.ops, "attention_probs", counting)
    maps = viz.attention_maps(m, x, [1])
    assert list(maps) == [1] and len(calls) == 1, "attention probabilities computed for unrequested layers"
    # the probabilities are softmax(q k^T / sqrt(d)) of that block's input
    with torch.no_grad():
        h = m.blocks[0](m.embed(x))
        qkv = torch.nn.functional.linear(m.blocks[1].norm1(h), m.blocks[1].attn.qkv.weight,
                                         m.blocks[1].attn.qkv.bias)
        q, k, _ = qkv.view(1, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        ref = (q @ k.transpose(-1, -2) * 16 ** -0.5).softmax(-1)
    assert torch.allclose(maps[1], ref, atol=1e-5)
    assert list(viz.attention_maps(m, x, [-1])) == [2]


def test_attention_with_rollout_matches_parts():
    m = _tiny(depth=4)
    x = torch.randn(2, 3, 32, 32)
    maps, roll = viz.attention_with_rollout(m, x, [0, 2])
    every = viz.attention_maps(m, x, [0, 1, 2])
    assert sorted(maps) == [0, 2] and torch.equal(maps[2], every[2])
    assert torch.allclose(roll, viz.attention_rollout([every[0], every[1], every[2]]), atol=1e-6)


def test_upsample_map():
    m = torch.arange(6.0).reshape(1, 2, 3)
    up = viz.upsample_map(m, (8, 12))
    assert up.shape == (1, 8, 12)
    assert torch.allclose(viz.upsample_map(torch.full((2, 3), 0.25), (5, 7)), torch.full((5, 7), 0.25))
    assert up[0, 0, 0] == 0 and up[0, -1, -1] == 5  # corners keep the corner patches' values


# --------------------------------------------------------------------------- pictures
def _png(path):
    with Image.open(path) as im:
        return im.size, np.asarray(im.convert("RGB"))


def test_render_all_files_and_sizes(tmp_path):
    m = _tiny()
    files = viz.render_all(m, skdata.chelsea(), str(tmp_path), layers=[0, 2], heads=[1])
    assert sorted(files) == ["attention_cls", "attention_query", "attention_rollout", "patches",
                             "pos_embed_similarity"]
    cols, rows = 2, 2  # head mean + head 1; layers 0 and 2
    expected = {
        "patches": (600, 600),
        "pos_embed_similarity": (700, 700),
        "attention_cls": (int(viz.CELL * cols * 100), int(round((viz.CELL * rows + 0.4) * 100))),
        "attention_query": (int(viz.CELL * cols * 100), int(round((viz.CELL * rows + 0.4) * 100))),
        "attention_rollout": (600, 340),
    }
    for name, path in files.items():
        size, pixels = _png(path)
        assert size == expected[name], f"{name}: {size}"
        assert pixels.std() > 10, f"{name}: the picture is blank"


def test_render_all_normalised_tensor_and_no_class_token(tmp_path):
    """`fastvit demo` passes normalised tensors; a model without class token has no class-token picture."""
    m = _tiny(class_token=False, global_pool="avg", img_size=(32, 48))
    x = torch.randn(3, 32, 48)
    files = viz.render_all(m, x, str(tmp_path), layers=[1])
    assert "attention_cls" not in files and "attention_rollout" in files
    size, _ = _png(files["patches"])
    assert size == (600, 600)


def test_cli_viz(tmp_path):
    from fastvit.cli import main
    from fastvit.factory import convert

    transformers = pytest.importorskip("transformers")
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3))
    hf.save_pretrained(str(tmp_path / "hf"))
    convert(str(tmp_path / "hf"), str(tmp_path / "fv"))
    img = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(img)
    assert main(["viz", str(img), "--checkpoint", str(tmp_path / "fv"), "--layers", "0,1", "--query", "1,2",
                 "--out", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out" / "astronaut").iterdir())
    assert written == ["attention_cls.png", "attention_query.png", "attention_rollout.png", "patches.png",
                       "pos_embed_similarity.png"]
