"""patch_embed on every backend (torch, triton, cuda), one shape set, one oracle.

Covers: image -> tokens (patchify + project + bias + pos_embed + prefix rows) against the oracle
(``utils.check_op``) over utils.PATCH_EMBED_SHAPES (patches 5 / 8 / 14 / 16 / 32 and 8 x 4,
non-square images, odd batch, padding, no bias / no pos / no prefix, channels_last images,
float32, float16 or uint8 images into a model of another dtype) x float32 / float16 / bfloat16,
outputs poisoned; an independent formulation (F.unfold + matmul); pad and cast; an image
smaller than one patch with pad; resample_pos_embed (a reference helper); the validation errors
(argument, expected, actual); the cuda backend's plain-GEMM fallback (GPU); and a seeded random
sweep. A backend that cannot run a case here is skipped with the reason from
fastvit.backends.reasons.
"""

import pytest
import torch
import torch.nn.functional as F

from fastvit import ops, reference
from fastvit.facts import patch_grid
from utils import (BACKENDS, DEV, DTYPES, PATCH_EMBED_SHAPES, TOLERANCES, assert_close_rule, maybe, randn, require,
                   run_checked, run_plain_gemm_fallback, run_sweep, validation_errors_test)

pytestmark = pytest.mark.usefixtures("full_precision")


def patch_embed_args(B, C, H, W, patch, D, T, pad, pos, bias, x_dtype, channels_last, dtype):
    scale = (C * patch[0] * patch[1]) ** -0.5
    if x_dtype == "uint8":  # pixels 0..255; the weight scaled as a folded normalisation would be
        x = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, device=DEV)
        scale /= 64
    else:
        x = randn(B, C, H, W, dtype=getattr(torch, x_dtype) if x_dtype else dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    gh, gw = patch_grid(H, W, patch, pad)
    return (x, randn(D, C, *patch, dtype=dtype, scale=scale),
            maybe(bias, lambda: randn(D, dtype=dtype)), maybe(pos, lambda: randn(gh * gw, D, dtype=dtype)),
            maybe(T, lambda: randn(T, D, dtype=dtype)), pad)


@pytest.mark.parametrize("B,C,H,W,patch,D,T,pad,pos,bias,x_dtype,channels_last", PATCH_EMBED_SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed(backend, dtype, atol, rtol, B, C, H, W, patch, D, T, pad, pos, bias, x_dtype, channels_last,
                     poison):
    require(backend, "patch_embed", dtype=dtype)
    args = patch_embed_args(B, C, H, W, patch, D, T, pad, pos, bias, x_dtype, channels_last, dtype)
    out = run_checked("patch_embed", backend, args, poison, atol, rtol)
    gh, gw = patch_grid(H, W, patch, pad)
    assert out.shape == (B, T + gh * gw, D) and out.dtype == dtype and out.is_contiguous()


@pytest.mark.parametrize("C,P,H,W", [(3, 16, 32, 48), (1, 14, 28, 14), (4, 8, 24, 16), (3, 32, 64, 32)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_matches_unfold(backend, C, P, H, W):
    """float32 against an independent formulation: F.unfold columns @ W.T + b + pos, prefix rows first."""
    require(backend, "patch_embed", dtype=torch.float32)
    B, D, T = 2, 24, 3
    x = torch.randn(B, C, H, W, device=DEV)
    w, b = torch.randn(D, C, P, P, device=DEV), torch.randn(D, device=DEV)
    gh, gw = H // P, W // P
    pos, prefix = torch.randn(gh * gw, D, device=DEV), torch.randn(T, D, device=DEV)
    out = ops.patch_embed(x, w, b, pos, prefix, backend=backend)
    cols = F.unfold(x.double(), P, stride=P).transpose(1, 2)  # (B, gh*gw, C*P*P), row-major grid
    tokens = cols @ w.double().reshape(D, -1).T + b.double() + pos.double()
    want = torch.cat([prefix.double().expand(B, T, D), tokens], 1)
    assert out.shape == (B, T + gh * gw, D) and out.is_contiguous()
    atol, rtol = TOLERANCES[torch.float32]
    assert_close_rule(out, want, None, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_pad_and_cast(backend, poison):
    """A float16 image into float32 weights, padded bottom / right with zeros to whole patches."""
    require(backend, "patch_embed", dtype=torch.float32)
    x = torch.randn(1, 3, 20, 13, device=DEV, dtype=torch.float16)
    w = torch.randn(8, 3, 8, 8, device=DEV)
    with poison():
        out = ops.patch_embed(x, w, None, None, None, True, backend=backend)
    assert out.shape == (1, 3 * 2, 8) and out.dtype == torch.float32
    xp = F.pad(x.double(), (0, 3, 0, 4))
    atol, rtol = TOLERANCES[torch.float32]
    assert_close_rule(out, F.conv2d(xp, w.double(), stride=8).flatten(2).transpose(1, 2), None, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_pad_image_smaller_than_patch(backend, poison):
    """Padded, an image smaller than one patch is exactly one patch (zeros around the image)."""
    require(backend, "patch_embed", dtype=torch.float32)
    args = (torch.randn(1, 3, 8, 8, device=DEV), torch.randn(8, 3, 16, 16, device=DEV) * 0.1,
            torch.randn(8, device=DEV), None, None, True)
    out = run_checked("patch_embed", backend, args, poison, *TOLERANCES[torch.float32])
    assert out.shape == (1, 1, 8)
    want = (args[0].double() * args[1][:, :, :8, :8].double()).sum((1, 2, 3)) + args[2].double()
    atol, rtol = TOLERANCES[torch.float32]
    assert_close_rule(out[0, 0], want, None, atol=atol, rtol=rtol, name="the one patch")


def test_resample_pos_embed_identity_and_shape():
    """reference.resample_pos_embed (a helper of the torch backend only, no backend op)."""
    pos = torch.randn(4 * 6, 16)
    assert reference.resample_pos_embed(pos, (4, 6), (4, 6)) is pos
    out = reference.resample_pos_embed(pos.half(), (8, 3), (4, 6))
    assert out.shape == (24, 16) and out.dtype == torch.float16
    const = torch.ones(4 * 6, 16)  # bicubic keeps a constant field constant
    assert torch.allclose(reference.resample_pos_embed(const, (7, 9), (4, 6), antialias=False), torch.ones(63, 16),
                          atol=1e-5)
    ramp = torch.arange(4.0).repeat_interleave(6)[:, None].expand(24, 16)  # rows 0..3: resampled rows stay ordered
    rows = reference.resample_pos_embed(ramp, (8, 6), (4, 6), antialias=False).reshape(8, 6, 16)[:, 0, 0]
    assert (rows[1:] >= rows[:-1]).all() and rows[0] < rows[-1]


@pytest.mark.gpu
@pytest.mark.parametrize("case", [0, 6, 9])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_patch_embed_cuda_plain_gemm_fallback(dtype, atol, rtol, case, poison, monkeypatch):
    """FASTVIT_CUDA_PLAIN_GEMM=1: the cuda backend's patch GEMM without a cuBLASLt epilogue."""
    require("cuda", "patch_embed", dtype=dtype)
    args = patch_embed_args(*PATCH_EMBED_SHAPES[case].values, dtype)
    run_plain_gemm_fallback("patch_embed", args, poison, monkeypatch, atol, rtol)


# --------------------------------------------------------------------------- validation
def _r(*shape):
    return torch.randn(*shape)


VALIDATION = [
    ("not-multiple", lambda b: ops.patch_embed(_r(1, 3, 30, 32), _r(8, 3, 16, 16), backend=b), ValueError,
     r"x: expected height and width multiples of the patch size \(16, 16\).*got image size \(30, 32\)"),
    ("pos-shape", lambda b: ops.patch_embed(_r(1, 3, 32, 32), _r(8, 3, 16, 16), pos_embed=_r(5, 8), backend=b),
     ValueError, r"pos_embed: expected shape \(4, 8\), got shape \(5, 8\)"),
    ("prefix-shape", lambda b: ops.patch_embed(_r(1, 3, 32, 32), _r(8, 3, 16, 16), prefix=_r(1, 7), backend=b),
     ValueError, r"prefix: expected shape \(T, 8\), got shape \(1, 7\)"),
    ("channels", lambda b: ops.patch_embed(_r(1, 4, 32, 32), _r(8, 3, 16, 16), backend=b), ValueError,
     r"x: expected 3 input channels \(B, 3, H, W\), got shape \(1, 4, 32, 32\)"),
    ("pad-pos-shape", lambda b: ops.patch_embed(_r(1, 3, 30, 32), _r(8, 3, 16, 16), pos_embed=_r(3, 8), pad=True,
                                                backend=b), ValueError,
     r"pos_embed: expected shape \(4, 8\), got shape \(3, 8\)"),
    ("weight-3d", lambda b: ops.patch_embed(_r(1, 3, 32, 32), _r(8, 3, 16), backend=b), ValueError,
     r"weight: expected a 4-D tensor, got shape \(8, 3, 16\)"),
    ("bias-dtype", lambda b: ops.patch_embed(_r(1, 3, 32, 32), _r(8, 3, 16, 16), _r(8).half(), backend=b),
     TypeError, r"bias: expected dtype torch.float32 \(as weight\), got dtype torch.float16"),
]

test_validation_errors = validation_errors_test(VALIDATION)


# --------------------------------------------------------------------------- random sweep
def _sweep_case(rng, dtype):
    B, C = rng.randint(1, 3), rng.randint(1, 4)
    ph, pw = rng.choice([(2, 2), (4, 4), (8, 8), (14, 14), (16, 16), (4, 8)])
    gh, gw = rng.randint(1, 4), rng.randint(1, 4)
    pad = rng.random() < 0.3
    H = gh * ph - (rng.randint(0, ph - 1) if pad else 0)
    W = gw * pw - (rng.randint(0, pw - 1) if pad else 0)
    D, T = rng.randint(1, 40), rng.choice([0, 0, 1, 2, 5])
    x_dtype = rng.choice([torch.float32, dtype])
    channels_last = rng.random() < 0.3
    has_b, has_pos = rng.random() < 0.7, rng.random() < 0.7
    x = randn(B, C, H, W, dtype=x_dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    args = (x, randn(D, C, ph, pw, dtype=dtype, scale=(C * ph * pw) ** -0.5),
            maybe(has_b, lambda: randn(D, dtype=dtype)),
            maybe(has_pos, lambda: randn(gh * gw, D, dtype=dtype)), maybe(T, lambda: randn(T, D, dtype=dtype)), pad)
    desc = (f"x{tuple(x.shape)} {x_dtype} channels_last={channels_last} P={(ph, pw)} pad={pad} D={D} T={T} "
            f"bias={has_b} pos={has_pos}")

    def shape(out):
        assert out.shape == (B, T + gh * gw, D), f"shape {tuple(out.shape)}"

    return desc, args, {}, shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_sweep(backend, poison):
    run_sweep("patch_embed", backend, _sweep_case, poison)
