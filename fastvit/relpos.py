"""BEiT's relative position bias: a learned table, gathered once per token grid into the
(H, N, N) additive logit bias that :func:`fastvit.ops.attention` takes (``bias=``).

The table (timm ``relative_position_bias_table``, Hugging Face the same name) has one row per
2-D offset between two patches, (2 gh - 1) * (2 gw - 1) rows, plus 3 for the class token:
class -> patch, patch -> class and class -> class, in that order. The index that maps every
(query, key) pair of a grid to its row is built here (timm ``gen_relative_position_index``);
the model gathers the bias once per grid and keeps it, so a forward at a grid already seen
costs nothing.

At a grid other than the table's, the table is first fitted to the new grid's offsets, as the
library the weights came from does it:

* ``'timm'``: timm's ``resize_rel_pos_bias_table`` (BEiT's fine-tuning code: the source offsets are
  spread on a geometric progression and read by linear interpolation), what timm's
  ``checkpoint_filter_fn`` and ``Beit.set_input_size`` apply;
* ``'bilinear'``: Hugging Face ``BeitRelativePositionBias``: a bilinear resize of the offset grid
  at every forward whose resolution differs.

The 3 class-token rows are kept as they are by both.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RESIZE_MODES", "num_relative_distance", "relative_position_index", "resize_table",
           "RelativePositionBias"]

RESIZE_MODES = ("timm", "bilinear")
NUM_EXTRA = 3  # class -> patch, patch -> class, class -> class


def _pair(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def num_relative_distance(grid: Sequence[int]) -> int:
    """Rows of the table of a (gh, gw) grid: (2 gh - 1)(2 gw - 1) offsets + 3 class-token rows."""
    gh, gw = _pair(grid)
    return (2 * gh - 1) * (2 * gw - 1) + NUM_EXTRA


def relative_position_index(grid: Sequence[int], device=None) -> torch.Tensor:
    """(N + 1, N + 1) int64 row of the table for each (query, key) pair, token 0 the class token
    and N = gh * gw patches in row-major order (timm / HF ``relative_position_index``)."""
    gh, gw = _pair(grid)
    rows = torch.arange(gh, device=device).repeat_interleave(gw)  # (N,)
    cols = torch.arange(gw, device=device).repeat(gh)
    dr = rows[:, None] - rows[None, :] + gh - 1  # (N, N) in [0, 2 gh - 2]
    dc = cols[:, None] - cols[None, :] + gw - 1
    n = num_relative_distance((gh, gw))
    index = torch.empty(gh * gw + 1, gh * gw + 1, dtype=torch.long, device=device)
    index[1:, 1:] = dr * (2 * gw - 1) + dc
    index[0, :] = n - 3  # class -> patch
    index[:, 0] = n - 2  # patch -> class
    index[0, 0] = n - 1  # class -> class
    return index


def _progression(src: int, dst: int):
    """Source offsets of timm's resize: 0, then +-(1, 1 + q, 1 + q + q^2, ...) with q bisected so
    the src // 2 steps reach dst // 2 (BEiT's ``geometric_progression``), as a float32 tensor."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return torch.tensor([-d for d in reversed(dis)] + [0] + dis)


def _interp_linear(points, values: torch.Tensor, targets) -> torch.Tensor:
    """Linear interpolation on a rectilinear (unevenly spaced) 2-D grid, every head at once:
    values (len(p0), len(p1), H) at targets (t0, t1) of shape (h, w) -> (h, w, H). The same
    arithmetic, in the same order, as timm's ``RegularGridInterpolator`` (one head at a time)."""
    idxs, dists, overall = [], [], []
    for p, x in zip(points, targets):
        right = torch.bucketize(x, p)
        right[right >= p.shape[0]] = p.shape[0] - 1
        left = (right - 1).clamp(0, p.shape[0] - 1)
        d_left, d_right = x - p[left], p[right] - x
        d_left[d_left < 0] = 0.0
        d_right[d_right < 0] = 0.0
        both = (d_left == 0) & (d_right == 0)
        d_left[both] = d_right[both] = 1.0
        idxs.append((left, right))
        dists.append((d_left, d_right))
        overall.append(d_left + d_right)
    num = 0.0
    for a in (0, 1):
        for b in (0, 1):
            w = torch.prod(torch.stack([dists[0][1 - a], dists[1][1 - b]]), dim=0)
            num = num + values[idxs[0][a], idxs[1][b]] * w[..., None]
    return num / torch.prod(torch.stack(overall), dim=0)[..., None]


def resize_table(table: torch.Tensor, new_grid: Sequence[int], old_grid: Optional[Sequence[int]] = None,
                 mode: str = "timm") -> torch.Tensor:
    """A (num_relative_distance(old), H) table fitted to ``new_grid``: (num_relative_distance(new), H).

    Args:
        table: the learned table, class-token rows last.
        new_grid, old_grid: (rows, cols) of the patch grids; ``old_grid`` None (a checkpoint whose
            grid is not stored) means square, or ``new_grid`` when the table cannot be square (as timm).
        mode: ``'timm'`` (timm's ``resize_rel_pos_bias_table``, float32 on the CPU and cast back)
            or ``'bilinear'`` (Hugging Face BEiT).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode: expected one of {RESIZE_MODES}, got {mode!r}")
    nh, nw = _pair(new_grid)
    dst = (2 * nh - 1, 2 * nw - 1)
    n_old = table.shape[0] - NUM_EXTRA
    if old_grid is not None:
        src = (2 * _pair(old_grid)[0] - 1, 2 * _pair(old_grid)[1] - 1)
    else:
        side = int(n_old ** 0.5)
        if side * side == n_old:
            src = (side, side)
        elif n_old == dst[0] * dst[1]:
            src = dst
        else:
            raise ValueError(f"table: {table.shape[0]} rows are no square grid of offsets + {NUM_EXTRA}; pass "
                             "old_grid")
    if src[0] * src[1] != n_old:
        raise ValueError(f"table: expected {src[0] * src[1] + NUM_EXTRA} rows for the old grid, got {table.shape[0]}")
    H = table.shape[1]
    offsets, extra = table[:n_old], table[n_old:]
    if mode == "bilinear":
        # HF reads the offsets as (cols, rows) and resizes at every resolution: an identity on the
        # square grids it is used with, a transposition (as HF) on a non-square one
        grid = offsets.reshape(1, src[1], src[0], H).permute(0, 3, 1, 2)
        new = F.interpolate(grid, size=dst, mode="bilinear")
        return torch.cat([new.permute(0, 2, 3, 1).reshape(dst[0] * dst[1], H), extra])
    if src == dst:
        return table
    ys, xs = _progression(src[0], dst[0]), _progression(src[1], dst[1])
    ty, tx = dst[0] // 2.0, dst[1] // 2.0
    dy, dx = torch.arange(-ty, ty + 0.1, 1.0), torch.arange(-tx, tx + 0.1, 1.0)
    target = [t.contiguous() for t in torch.meshgrid(dy, dx, indexing="ij")]
    z = offsets.detach().float().cpu().reshape(src[0], src[1], H)
    new = _interp_linear((ys, xs), z, target).reshape(dst[0] * dst[1], H)
    return torch.cat([new.to(device=table.device, dtype=table.dtype), extra])


class RelativePositionBias(nn.Module):
    """BEiT relative position bias of one attention (per block) or of all blocks (shared).

    Args:
        window_size: the (rows, cols) patch grid the table is stored for (the model's training grid).
        num_heads: H.
        resize: how the table is fitted to another grid, ``'timm'`` or ``'bilinear'`` (see the module).

    ``forward(grid)`` returns the (H, 1 + gh * gw, 1 + gh * gw) bias, the class token first, in
    the table's dtype. It gathers on every call: the model calls it once per grid and keeps the
    result (:meth:`fastvit.model.VisionTransformer._block_pos_inputs`).
    """

    def __init__(self, window_size, num_heads: int, resize: str = "timm"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"rel_pos_resize: expected one of {RESIZE_MODES}, got {resize!r}")
        self.window_size = _pair(window_size)
        self.num_heads = num_heads
        self.resize = resize
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distance(self.window_size),
                                                                     num_heads))

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, num_heads={self.num_heads}, resize={self.resize!r}"

    def forward(self, grid: Sequence[int]) -> torch.Tensor:
        """The bias for a (gh, gw) token grid: (H, N + 1, N + 1), N = gh * gw."""
        grid = _pair(grid)
        table = self.relative_position_bias_table
        if grid != self.window_size or (self.resize == "bilinear" and grid[0] != grid[1]):
            table = resize_table(table, grid, self.window_size, self.resize)
        index = relative_position_index(grid, device=table.device)
        n = index.shape[0]
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
