"""Shared test helpers: the DESIGN.md tolerance rule and error reports that say where."""

from __future__ import annotations

from typing import Optional

import torch


def error_report(out: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (out.float() - ref.float()).abs()
    flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return (f"max abs err {diff.max().item():.3e} at {idx} (out {out.float().flatten()[flat].item():.6g}, "
            f"ref {ref.float().flatten()[flat].item():.6g}), mean abs err {diff.mean().item():.3e}, "
            f"ref max {ref.float().abs().max().item():.3e}, shape {tuple(out.shape)}")


def assert_all_written(out: torch.Tensor, name: str = "out") -> None:
    """The output was NaN-poisoned before the kernel ran: every element must have been written."""
    bad = torch.isnan(out)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {out.numel()} elements never written (first at {first})")


def assert_close_rule(out: torch.Tensor, ref32: torch.Tensor, ref_lowp: Optional[torch.Tensor] = None,
                      atol: float = 0.0, name: str = "out") -> None:
    """DESIGN.md rule: |out - ref32| <= 2 * |ref_lowp - ref32| + one rounding step of out.dtype, + atol.

    ``ref32`` is the float32 reference; ``ref_lowp`` the torch reference run in out's dtype
    (omit it for float32 outputs, then only ``atol`` and the rounding step apply).
    """
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} vs reference {tuple(ref32.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output; " + error_report(out, ref32)
    scale = ref32.float().abs().max().item()
    rounding = torch.finfo(out.dtype).eps * max(scale, 1e-6)
    base = 0.0 if ref_lowp is None else (ref_lowp.float() - ref32.float()).abs().max().item()
    err = (out.float() - ref32.float()).abs().max().item()
    tol = 2 * base + rounding + atol
    assert err <= tol, f"{name}: error {err:.3e} > tolerance {tol:.3e} (2 x torch {base:.3e} + rounding " \
                       f"{rounding:.3e} + atol {atol:.1e}); " + error_report(out, ref32)
