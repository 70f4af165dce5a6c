"""What a ViT sees: patch grids, position-embedding similarity, attention maps and rollout (PNG).

The maps are plain functions of tensors (testable, reusable); the ``plot_*`` functions draw them
with matplotlib's Agg backend at fixed pixel sizes (``figsize * dpi``, no tight bounding box).
Attention probabilities come from :meth:`VisionTransformer.forward_intermediates` with
``attn_layers``: only the requested layers run :func:`fastvit.ops.attention_probs`, the others stay
on the fast path, so memory stays bounded at high resolution.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["pos_embed_similarity", "attention_maps", "cls_attention", "query_attention", "attention_rollout",
           "attention_with_rollout",
           "upsample_map", "plot_patch_grid", "plot_pos_embed_similarity", "plot_attention",
           "plot_query_attention", "plot_rollout", "render_all", "add_viz_parser", "cmd_viz"]

DPI = 100
CELL = 2.0  # inches per small picture in the grids


# --------------------------------------------------------------------------- maps
def pos_embed_similarity(model) -> torch.Tensor:
    """Cosine similarity between the patch position embeddings: (gh, gw, gh, gw), float32.

    ``[i, j, k, l]`` is the similarity of patch (i, j)'s embedding with patch (k, l)'s, as in
    figure 7 of the ViT paper. Prefix tokens' positions (class, registers) are left out.
    """
    if model.pos_embed is None:
        raise ValueError("model: expected a learned pos_embed, got a model without position embeddings")
    gh, gw = model.patch_embed.grid_size
    pos = model.pos_embed[0].detach().float()
    if not model.no_embed_class:
        pos = pos[model.num_prefix_tokens:]
    if pos.shape[0] != gh * gw:
        raise ValueError(f"model: pos_embed has {pos.shape[0]} patch rows, expected grid {gh}x{gw}")
    pos = F.normalize(pos, dim=-1)
    return (pos @ pos.T).reshape(gh, gw, gh, gw)


def attention_maps(model, x: torch.Tensor, layers: Sequence[int]) -> Dict[int, torch.Tensor]:
    """Attention probabilities of ``layers`` for images x (B, C, H, W): layer -> (B, heads, T+N, T+N).

    Blocks after the last requested layer are not run.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("layers: expected at least one layer index, got []")
    with torch.no_grad():
        _, attns = model.forward_intermediates(x, indices=[max(model._take_indices(layers))], stop_early=True,
                                               intermediates_only=True, attn_layers=layers)
    n = len(model.blocks)
    return {(i + n if i < 0 else i): attns[i + n if i < 0 else i].float() for i in layers}


def _check_attn(attn: torch.Tensor, num_prefix: int, grid: Tuple[int, int]) -> None:
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn: expected (B, heads, N, N), got shape {tuple(attn.shape)}")
    if attn.shape[-1] != num_prefix + grid[0] * grid[1]:
        raise ValueError(f"attn: expected N = {num_prefix} prefix + {grid[0]}x{grid[1]} patches = "
                         f"{num_prefix + grid[0] * grid[1]}, got {attn.shape[-1]}")


def cls_attention(attn: torch.Tensor, num_prefix: int, grid: Tuple[int, int]) -> torch.Tensor:
    """How much the class token (token 0) attends to each patch: (B, heads, N, N) -> (B, heads, gh, gw)."""
    if num_prefix < 1:
        raise ValueError("num_prefix: expected a class token (>= 1 prefix token), got 0")
    _check_attn(attn, num_prefix, grid)
    return attn[:, :, 0, num_prefix:].reshape(*attn.shape[:2], *grid)


def query_attention(attn: torch.Tensor, query: Union[int, Tuple[int, int]], num_prefix: int,
                    grid: Tuple[int, int]) -> torch.Tensor:
    """Attention of patch ``query`` (flat index or (row, col)) to every patch: (B, heads, gh, gw)."""
    _check_attn(attn, num_prefix, grid)
    q = query[0] * grid[1] + query[1] if isinstance(query, (tuple, list)) else int(query)
    if not 0 <= q < grid[0] * grid[1]:
        raise ValueError(f"query: expected a patch index in [0, {grid[0] * grid[1]}) or (row, col) inside "
                         f"{grid}, got {query}")
    return attn[:, :, num_prefix + q, num_prefix:].reshape(*attn.shape[:2], *grid)


def attention_rollout(attns: Sequence[torch.Tensor], head_fusion: str = "mean", residual: bool = True) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) over consecutive layers, first to last.

    Each layer's heads are fused (mean, max or min), the identity is added for the residual
    connection (``0.5 A + 0.5 I``), rows are renormalised, and the layers are multiplied:
    ``R = A'_L ... A'_1``. ``R[b, i, j]`` is how much output token i draws on input token j.

    Args:
        attns: list of (B, heads, N, N) probabilities, in layer order.
    Returns:
        (B, N, N) float32, rows summing to 1.
    """
    if not attns:
        raise ValueError("attns: expected at least one (B, heads, N, N) tensor, got none")
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fuse:
        raise ValueError(f"head_fusion: expected one of {sorted(fuse)}, got {head_fusion!r}")
    result = None
    for i, a in enumerate(attns):
        if a.dim() != 4 or a.shape[-1] != a.shape[-2] or (result is not None and a.shape[-1] != result.shape[-1]):
            raise ValueError(f"attns[{i}]: expected (B, heads, N, N) like the others, got {tuple(a.shape)}")
        a = fuse[head_fusion](a.float())  # (B, N, N)
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def attention_with_rollout(model, x: torch.Tensor, layers: Sequence[int], head_fusion: str = "mean"):
    """One forward pass giving the probabilities of ``layers`` and the rollout up to the last of them.

    Every block up to ``max(layers)`` computes its probabilities (rollout needs them all), but
    each is folded into the (B, N, N) rollout and dropped at once: memory holds the requested
    layers' (B, heads, N, N) maps plus one (B, N, N), not every layer's.

    Returns:
        ({layer: (B, heads, N, N) float32}, rollout (B, N, N) float32)
    """
    n = len(model.blocks)
    want = sorted({i + n if i < 0 else i for i in model._take_indices(list(layers))})
    maps, roll = {}, None
    with torch.no_grad():
        grid = model._grid_for(x)
        pos = model._block_pos_inputs(grid)  # RoPE / attention bias per block, or None
        h = model.embed(x, grid)
        for i, blk in enumerate(model.blocks):
            if i > want[-1]:
                break
            rope, bias = (None, None) if pos is None else pos[i]
            h, p = blk(h, model.backend, return_attn=True, rope=rope, attn_bias=bias)
            p = p.float()
            if i in want:
                maps[i] = p
            step = attention_rollout([p], head_fusion=head_fusion)  # (B, N, N): fused, residual, renormalised
            roll = step if roll is None else step @ roll
            del p
    return maps, roll


def upsample_map(m: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(..., gh, gw) -> (..., H, W), bilinear: a patch map laid over the image."""
    lead = m.shape[:-2]
    out = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]).float(), size=tuple(size), mode="bilinear",
                        align_corners=False)
    return out.reshape(*lead, *size)


def _minmax(m: torch.Tensor) -> torch.Tensor:
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


# --------------------------------------------------------------------------- drawing
def _plt():
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # files only: never open a window or need a display
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, dpi: int) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def plot_patch_grid(image: np.ndarray, patch_size: Tuple[int, int], path: str, size: float = 6.0,
                    dpi: int = DPI) -> str:
    """The image (H, W, 3) uint8 cut into its patches, each labelled with its token index."""
    plt = _plt()
    H, W = image.shape[:2]
    ph, pw = patch_size
    gh, gw = H // ph, W // pw
    fig = plt.figure(figsize=(size, size))
    ax = fig.add_axes([0.02, 0.02, 0.96, 0.9])
    ax.imshow(image)
    for r in range(gh + 1):
        ax.axhline(r * ph - 0.5, color="white", lw=0.6)
    for c in range(gw + 1):
        ax.axvline(c * pw - 0.5, color="white", lw=0.6)
    if gh * gw <= 400:  # beyond that the labels cannot be read
        fs = max(3.0, min(9.0, 300.0 / max(gh, gw) / 3))
        for r in range(gh):
            for c in range(gw):
                ax.text(c * pw + pw / 2, r * ph + ph / 2, str(r * gw + c), color="yellow", ha="center",
                        va="center", fontsize=fs)
    ax.set_axis_off()
    fig.suptitle(f"{gh} x {gw} patches of {ph} x {pw} px = {gh * gw} tokens", fontsize=10)
    return _save(fig, path, dpi)


def _mosaic(sim: np.ndarray) -> np.ndarray:
    """(gh, gw, gh, gw) -> one image of gh x gw small maps separated by NaN lines."""
    gh, gw = sim.shape[:2]
    out = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan, dtype=np.float32)
    for i in range(gh):
        for j in range(gw):
            out[i * (gh + 1):i * (gh + 1) + gh, j * (gw + 1):j * (gw + 1) + gw] = sim[i, j]
    return out


def plot_pos_embed_similarity(sim: torch.Tensor, path: str, size: float = 7.0, dpi: int = DPI) -> str:
    """The (gh, gw, gh, gw) similarity as gh x gw small heat maps (ViT paper, figure 7)."""
    plt = _plt()
    gh, gw = sim.shape[:2]
    fig = plt.figure(figsize=(size, size))
    ax = fig.add_axes([0.08, 0.06, 0.74, 0.84])
    im = ax.imshow(_mosaic(sim.cpu().numpy()), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([j * (gw + 1) + gw / 2 - 0.5 for j in range(gw)], [str(j) for j in range(gw)], fontsize=6)
    ax.set_yticks([i * (gh + 1) + gh / 2 - 0.5 for i in range(gh)], [str(i) for i in range(gh)], fontsize=6)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    cax = fig.add_axes([0.84, 0.06, 0.03, 0.84])
    fig.colorbar(im, cax=cax, label="cosine similarity")
    fig.suptitle("position embedding similarity", fontsize=10)
    return _save(fig, path, dpi)


def _overlay_grid(image: np.ndarray, maps: torch.Tensor, row_names: List[str], col_names: List[str], title: str,
                  path: str, dpi: int, marker: Optional[Tuple[float, float]] = None) -> str:
    """maps (rows, cols, gh, gw) drawn over the image, each normalised to its own [0, 1]."""
    plt = _plt()
    rows, cols = maps.shape[:2]
    H, W = image.shape[:2]
    up = upsample_map(maps, (H, W))
    fig, axes = plt.subplots(rows, cols, figsize=(CELL * cols, CELL * rows + 0.4), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.4 / (CELL * rows + 0.4) - 0.04,
                        wspace=0.04, hspace=0.15)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(image)
            ax.imshow(_minmax(up[r, c]).numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            if marker is not None:
                ax.plot([marker[1]], [marker[0]], marker="s", ms=5, mec="cyan", mfc="none", mew=1.2)
            ax.set_title(f"{row_names[r]}, {col_names[c]}", fontsize=7)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi)


def plot_attention(image: np.ndarray, attns: Mapping[int, torch.Tensor], num_prefix: int, grid: Tuple[int, int],
                   path: str, heads: Optional[Sequence[int]] = None, dpi: int = DPI) -> str:
    """Class-token attention to the patches: one row per layer, columns = head mean + chosen heads."""
    layers = sorted(attns)
    nh = attns[layers[0]].shape[1]
    heads = list(range(min(nh, 4))) if heads is None else list(heads)
    maps = torch.stack([torch.cat([cls_attention(attns[l][:1], num_prefix, grid).mean(1),
                                   cls_attention(attns[l][:1], num_prefix, grid)[0, heads]]) for l in layers])
    return _overlay_grid(image, maps, [f"layer {l}" for l in layers], ["mean"] + [f"head {h}" for h in heads],
                         "class token -> patch attention", path, dpi)


def plot_query_attention(image: np.ndarray, attns: Mapping[int, torch.Tensor], query: Tuple[int, int],
                         num_prefix: int, grid: Tuple[int, int], patch_size: Tuple[int, int], path: str,
                         heads: Optional[Sequence[int]] = None, dpi: int = DPI) -> str:
    """Attention of one query patch (marked) to all patches, per layer and head."""
    layers = sorted(attns)
    nh = attns[layers[0]].shape[1]
    heads = list(range(min(nh, 4))) if heads is None else list(heads)
    maps = torch.stack([torch.cat([query_attention(attns[l][:1], query, num_prefix, grid).mean(1),
                                   query_attention(attns[l][:1], query, num_prefix, grid)[0, heads]])
                        for l in layers])
    centre = ((query[0] + 0.5) * patch_size[0], (query[1] + 0.5) * patch_size[1])
    return _overlay_grid(image, maps, [f"layer {l}" for l in layers], ["mean"] + [f"head {h}" for h in heads],
                         f"attention of patch {tuple(query)} (row, col)", path, dpi, marker=centre)


def plot_rollout(image: np.ndarray, rollout: torch.Tensor, num_prefix: int, grid: Tuple[int, int], path: str,
                 dpi: int = DPI) -> str:
    """Image beside the rollout map of the class token (or the mean over tokens without one)."""
    plt = _plt()
    r = rollout[0]
    m = r[0, num_prefix:] if num_prefix else r[:, num_prefix:].mean(0)
    m = _minmax(upsample_map(m.reshape(grid), image.shape[:2]))
    fig, axes = plt.subplots(1, 2, figsize=(2 * CELL * 1.5, CELL * 1.5 + 0.4))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.85, wspace=0.04)
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=8)
    axes[1].imshow(image)
    axes[1].imshow(m.numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
    axes[1].set_title("attention rollout" + (" (class token)" if num_prefix else " (mean over tokens)"), fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    return _save(fig, path, dpi)


# --------------------------------------------------------------------------- everything at once
def _default_layers(depth: int) -> List[int]:
    return sorted({0, depth // 2, depth - 1})


def render_all(model, image, out_dir: str, layers: Optional[Sequence[int]] = None,
               heads: Optional[Sequence[int]] = None, query: Optional[Tuple[int, int]] = None,
               preprocessor=None, dpi: int = DPI) -> Dict[str, str]:
    """Write every picture for one image into ``out_dir``; returns name -> PNG path.

    Args:
        image: a normalised model input (3, H, W) float tensor, or anything a
            :class:`~fastvit.preprocess.Preprocessor` takes (PIL, path, uint8 array / tensor).
        layers: layers for the attention pictures (default: first, middle, last).
        heads: heads shown beside the head mean (default: the first 4).
        query: (row, col) patch for the query-attention picture (default: the grid centre).
        preprocessor: how ``image`` becomes the model input; defaults to :meth:`Preprocessor.for_model`.

    Pictures: ``patches.png``, ``pos_embed_similarity.png`` (models with a learned position
    embedding), ``attention_cls.png`` (models with a class token), ``attention_query.png``,
    ``attention_rollout.png`` (rollout over every layer up to the last requested one).
    """
    from .preprocess import Preprocessor

    model.eval()
    p = next(model.parameters())
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if image.dim() != 3:
            raise ValueError(f"image: expected a normalised (3, H, W) tensor, got shape {tuple(image.shape)}")
        x = image
        shown = (preprocessor.denormalize(image) if preprocessor is not None else
                 (_minmax(image.detach().float().cpu()) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    else:
        pre = preprocessor or Preprocessor.for_model(model)
        geo = pre.geometry(image)
        x, shown = pre.normalize(geo), geo.permute(1, 2, 0).numpy()
    x = x.unsqueeze(0).to(device=p.device, dtype=p.dtype)
    grid = model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    patch = model.patch_embed.patch_size
    n = model.num_prefix_tokens
    depth = len(model.blocks)
    layers = sorted({(l + depth if l < 0 else l) for l in (_default_layers(depth) if layers is None else layers)})
    query = (grid[0] // 2, grid[1] // 2) if query is None else tuple(query)
    os.makedirs(out_dir, exist_ok=True)
    out = {"patches": plot_patch_grid(shown, patch, os.path.join(out_dir, "patches.png"), dpi=dpi)}
    if model.pos_embed is not None:
        out["pos_embed_similarity"] = plot_pos_embed_similarity(
            pos_embed_similarity(model), os.path.join(out_dir, "pos_embed_similarity.png"), dpi=dpi)
    chosen, roll = attention_with_rollout(model, x, layers)
    if n:
        out["attention_cls"] = plot_attention(shown, chosen, n, grid, os.path.join(out_dir, "attention_cls.png"),
                                              heads=heads, dpi=dpi)
    out["attention_query"] = plot_query_attention(shown, chosen, query, n, grid, patch,
                                                  os.path.join(out_dir, "attention_query.png"), heads=heads, dpi=dpi)
    out["attention_rollout"] = plot_rollout(shown, roll, n, grid, os.path.join(out_dir, "attention_rollout.png"),
                                            dpi=dpi)
    return out


# --------------------------------------------------------------------------- command line
def _int_list(s: str) -> List[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def add_viz_parser(sub) -> None:
    """Register ``fastvit viz IMAGE --checkpoint ... --layers ... --out DIR``."""
    s = sub.add_parser("viz", help="patch grid, position-embedding similarity, attention maps and rollout (PNG)")
    s.add_argument("image", nargs="+", help="image file(s)")
    s.add_argument("--checkpoint", help="model folder, hub name 'org/name', or a state-dict file (with --model)")
    s.add_argument("--model", help="preset name (fastvit.list_models()); alone: random weights")
    s.add_argument("--layers", type=_int_list, help="comma-separated layer indices (default: first, middle, last)")
    s.add_argument("--heads", type=_int_list, help="comma-separated heads to show beside the mean (default 0-3)")
    s.add_argument("--query", type=_int_list, help="query patch 'row,col' (default: grid centre)")
    s.add_argument("--out", default="viz_out", help="output folder (one subfolder per image)")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    s.add_argument("--backend", help="triton, cuda or torch (default: auto)")
    s.set_defaults(func=cmd_viz)


def cmd_viz(args) -> int:
    from .factory import load_model

    if args.checkpoint is None and args.model is None:
        raise SystemExit("fastvit viz: expected --checkpoint and/or --model, got neither")
    if args.checkpoint is None:
        print(f"fastvit viz: no --checkpoint, so {args.model} has random weights", file=sys.stderr)
    model, pre = load_model(args.checkpoint, args.model, backend=args.backend)
    model.to(args.device)
    if args.query is not None and len(args.query) != 2:
        raise SystemExit(f"fastvit viz: --query expected 'row,col', got {args.query}")
    for img in args.image:
        name = os.path.splitext(os.path.basename(img))[0]
        files = render_all(model, img, os.path.join(args.out, name), layers=args.layers, heads=args.heads,
                           query=tuple(args.query) if args.query else None, preprocessor=pre)
        for path in files.values():
            print(path)
    return 0
