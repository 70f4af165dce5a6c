"""Explicit FLOP and minimal-byte counts for every benchmarked kernel and model.

These formulas are the denominators of every TFLOP/s, GB/s and MFU number the suites report, and
they give the roofline floor ``max(FLOPs / GEMM peak, bytes / copy bandwidth)`` (DESIGN.md sec. 6).

Conventions (those of flash-attention and timm's GMAC counts, x2):
* a multiply-add is 2 FLOPs; only matrix products are counted (bias, GELU, LayerNorm, softmax,
  residual adds are O(elements) and listed separately as ``elementwise`` where they matter);
* "minimal bytes" = every input read once + every output written once, in the kernel's dtypes,
  i.e. what an ideally fused kernel must move; intermediates an unfused version round-trips
  through memory (the MLP hidden activation, attention scores) are *not* counted.

``python -m benchmarks.flops`` prints the ViT-B/16 batch-256 table that NOTES.md carries, then the
packed-vs-padded table of variable-resolution (NaFlex) batches (:func:`render_packing_table`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "Cost",
    "patch_embed_cost",
    "attention_cost",
    "linear_cost",
    "mlp_cost",
    "model_flops_per_image",
    "floor_ms",
    "vit_b16_table",
    "attention_varlen_cost",
    "encoder_cost",
    "naflex_grid",
    "skimage_photo_sizes",
    "uniform_aspect_sizes",
    "packing_rows",
    "render_packing_table",
]


@dataclass(frozen=True)
class Cost:
    """FLOPs and minimal bytes of one kernel call."""

    flops: float  # matrix-product FLOPs (2 per multiply-add)
    bytes: float  # each input read once + each output written once
    elementwise: float = 0.0  # O(elements) work not in ``flops`` (bias, GELU, LN, softmax, adds)

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte."""
        return self.flops / self.bytes if self.bytes else float("inf")


def patch_embed_cost(B: int, C: int, H: int, W: int, P: int, D: int, T: int = 1, esize: int = 2,
                     img_esize: Optional[int] = None) -> Cost:
    """Conv-as-GEMM patch embedding + bias + position embedding + T prefix rows.

    GEMM (B * L, C * P * P) x (C * P * P, D) with L = (H / P) * (W / P) patches.
    Bytes: image B*C*H*W, weight D*C*P*P, bias D, pos L*D, prefix T*D, output B*(T+L)*D.
    """
    img_esize = esize if img_esize is None else img_esize
    L = (H // P) * (W // P)
    K = C * P * P
    flops = 2.0 * B * L * K * D
    nbytes = B * C * H * W * img_esize + (D * K + D + L * D + T * D + B * (T + L) * D) * esize
    return Cost(flops, nbytes, elementwise=2.0 * B * L * D)


def attention_cost(B: int, H: int, N: int, d: int, N_kv: Optional[int] = None, esize: int = 2) -> Cost:
    """Softmax attention: S = Q K^T (2*B*H*N*N_kv*d) and O = P V (2*B*H*N*N_kv*d).

    Bytes: q, o (B*H*N*d each) and k, v (B*H*N_kv*d each); the N x N_kv scores never reach
    memory in a fused kernel. Softmax (~5 ops per score) is ``elementwise``.
    """
    N_kv = N if N_kv is None else N_kv
    flops = 4.0 * B * H * N * N_kv * d
    nbytes = (2 * B * H * N * d + 2 * B * H * N_kv * d) * esize
    return Cost(flops, nbytes, elementwise=5.0 * B * H * N * N_kv)


def linear_cost(M: int, K: int, N: int, bias: bool = True, residual: bool = False, ln: bool = False,
                gamma: bool = False, esize: int = 2) -> Cost:
    """``act(LN?(x) @ W^T + b) * gamma + residual`` with x (M, K), W (N, K).

    Bytes: x M*K, W N*K, bias N, LN weight + bias 2K, gamma N, residual M*N, output M*N.
    """
    flops = 2.0 * M * K * N
    elems = M * K + N * K + M * N + (N if bias else 0) + (2 * K if ln else 0) + (N if gamma else 0)
    elems += M * N if residual else 0
    ew = M * N * (1 + int(residual) + int(gamma)) + (5.0 * M * K if ln else 0)
    return Cost(flops, elems * esize, elementwise=ew)


def mlp_cost(M: int, D: int, hidden: int, D_out: Optional[int] = None, residual: bool = True, ln: bool = False,
             esize: int = 2) -> Cost:
    """``residual + fc2(GELU(fc1(LN?(x))))``: 2*M*D*hidden + 2*M*hidden*D_out FLOPs.

    Minimal bytes are those of a fully fused MLP: x, W1, b1, W2, b2, residual, output; the
    (M, hidden) activation is not counted (an unfused version writes and reads it: +2*M*hidden).
    """
    D_out = D if D_out is None else D_out
    flops = 2.0 * M * D * hidden + 2.0 * M * hidden * D_out
    elems = M * D + hidden * D + hidden + D_out * hidden + D_out + M * D_out + (M * D_out if residual else 0)
    elems += 2 * D if ln else 0
    return Cost(flops, elems * esize, elementwise=8.0 * M * hidden + M * D_out)


def model_flops_per_image(embed_dim: int, depth: int, num_heads: int, img_size: int, patch: int,
                          mlp_ratio: float = 4.0, num_prefix: int = 1, num_classes: int = 1000,
                          in_chans: int = 3) -> float:
    """Matrix-product FLOPs of one image through a ViT (patch embed, blocks, head).

    ViT-B/16 at 224: 35.1e9 (timm reports 17.6 GMACs = 35.2 GFLOP).
    """
    D = embed_dim
    L = (img_size // patch) ** 2
    N = L + num_prefix
    hidden = int(D * mlp_ratio)
    pe = 2.0 * L * in_chans * patch * patch * D
    per_block = 2.0 * N * D * 3 * D + 4.0 * N * N * D + 2.0 * N * D * D + 4.0 * N * D * hidden
    return pe + depth * per_block + 2.0 * D * num_classes


def floor_ms(cost: Cost, peak_tflops: float, bandwidth_gbps: float) -> float:
    """Roofline floor of one call: max(FLOPs / peak, bytes / bandwidth), in ms."""
    return max(cost.flops / (peak_tflops * 1e12), cost.bytes / (bandwidth_gbps * 1e9)) * 1e3


# A measured H100 bf16 GEMM peak (DESIGN.md sec. 6, KINDS.md: 798 TFLOP/s on 8192^3) and a
# measured device-to-device copy rate (KINDS.md: ~3.0 TB/s read + write) are the planning
# ceilings; the benchmark suites measure both again in every run.
H100_GEMM_TFLOPS = 790.0
H100_COPY_GBPS = 3000.0


def vit_b16_table(B: int = 256, esize: int = 2, peak_tflops: float = H100_GEMM_TFLOPS,
                  bandwidth_gbps: float = H100_COPY_GBPS) -> Dict[str, Cost]:
    """Per-kernel costs of one ViT-B/16 forward at 224 (N = 197 tokens) and batch ``B``."""
    D, H, d, hid, N, P = 768, 12, 64, 3072, 197, 16
    M = B * N
    return {
        "patch_embed (B,3,224,224)->(B,197,768)": patch_embed_cost(B, 3, 224, 224, P, D, 1, esize),
        "linear qkv +LN prologue 768->2304": linear_cost(M, D, 3 * D, ln=True, esize=esize),
        "attention H=12 N=197 d=64": attention_cost(B, H, N, d, esize=esize),
        "linear proj 768->768 +residual": linear_cost(M, D, D, residual=True, esize=esize),
        "mlp 768->3072->768 +residual": mlp_cost(M, D, hid, residual=True, esize=esize),
        "mlp +LN prologue": mlp_cost(M, D, hid, residual=True, ln=True, esize=esize),
    }


def render_table(B: int = 256, peak_tflops: float = H100_GEMM_TFLOPS, bandwidth_gbps: float = H100_COPY_GBPS) -> str:
    """Markdown table of FLOPs, bytes, intensity and roofline floor (ViT-B/16, bf16, batch B)."""
    rows = [f"| kernel (ViT-B/16, bs{B}, bf16) | GFLOP | MB moved | FLOP/byte | floor ms "
            f"(@{peak_tflops:.0f} TFLOP/s, {bandwidth_gbps / 1e3:.1f} TB/s) | bound |",
            "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, c in vit_b16_table(B, 2, peak_tflops, bandwidth_gbps).items():
        t_c = c.flops / (peak_tflops * 1e12) * 1e3
        t_m = c.bytes / (bandwidth_gbps * 1e9) * 1e3
        rows.append(f"| {name} | {c.flops / 1e9:.1f} | {c.bytes / 1e6:.1f} | {c.intensity:.0f} | "
                    f"{max(t_c, t_m):.3f} | {'compute' if t_c >= t_m else 'memory'} |")
    gf = model_flops_per_image(768, 12, 12, 224, 16)
    floor = B * gf / (peak_tflops * 1e12) * 1e3
    rows.append(f"| whole model, per image | {gf / 1e9:.2f} | | | {floor:.2f} (bs{B}; "
                f"{B / floor * 1e3:.0f} img/s at 100% of the GEMM peak) | compute |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- packed vs padded (#23)
def attention_varlen_cost(seqlens_q: Sequence[int], H: int, d: int, seqlens_k: Optional[Sequence[int]] = None,
                          esize: int = 2) -> Cost:
    """Attention over packed sequences: 4 * H * d * sum_i(N_i * N_kv_i) FLOPs.

    Bytes: q, o (total_q * H * d each), k, v (total_k * H * d each), the int32 offsets of q and k.
    Padded attention over B sequences of length N is ``attention_cost(B, H, N, d)``: the same
    formula with every N_i = N (its key-padding mask adds B * N bytes, see :func:`encoder_cost`).
    """
    seqlens_k = seqlens_q if seqlens_k is None else seqlens_k
    if len(seqlens_k) != len(seqlens_q):
        raise ValueError(f"seqlens_k: expected {len(seqlens_q)} lengths (as seqlens_q), got {len(seqlens_k)}")
    pairs = sum(nq * nk for nq, nk in zip(seqlens_q, seqlens_k))
    tq, tk = sum(seqlens_q), sum(seqlens_k)
    nbytes = (2 * tq + 2 * tk) * H * d * esize + 2 * 4 * (len(seqlens_q) + 1)
    return Cost(4.0 * H * d * pairs, nbytes, elementwise=5.0 * H * pairs)


def encoder_cost(seqlens: Sequence[int], D: int, depth: int, heads: int, hidden: int, patch: int = 16,
                 in_chans: int = 3, padded_to: Optional[int] = None, esize: int = 2) -> Cost:
    """Patch embedding + ``depth`` pre-norm blocks (LN + qkv, attention, proj + residual, LN + MLP
    + residual) of a NaFlex encoder (no prefix token) over one batch of images with ``seqlens``
    patch tokens each.

    ``padded_to`` None: packed (every GEMM over sum(seqlens) rows, varlen attention); else every
    image padded to that many tokens (the HF Siglip2 processor pads to ``max_num_patches``, a
    collate may pad to the batch's longest): the padding rows run through every GEMM and the
    attention runs over (B, padded_to) with a (B, padded_to) key mask read once per block.
    Bytes as the other costs (every input once, every output once, weights once per block).
    """
    B = len(seqlens)
    lens = list(seqlens) if padded_to is None else [padded_to] * B
    if padded_to is not None and max(seqlens, default=0) > padded_to:
        raise ValueError(f"padded_to: expected >= the longest sequence {max(seqlens)}, got {padded_to}")
    T, K, d = sum(lens), in_chans * patch * patch, D // heads
    embed = Cost(2.0 * T * K * D, (T * K + K * D + D + 2 * T * D) * esize)  # patches, weight, bias, pos, out
    attn = attention_varlen_cost(lens, heads, d, esize=esize)
    mask = 0 if padded_to is None else B * padded_to  # bool key mask per block
    blocks = [linear_cost(T, D, 3 * D, ln=True, esize=esize), attn, linear_cost(T, D, D, residual=True, esize=esize),
              mlp_cost(T, D, hidden, residual=True, ln=True, esize=esize)]
    flops = embed.flops + depth * sum(c.flops for c in blocks)
    nbytes = embed.bytes + depth * (sum(c.bytes for c in blocks) + mask)
    return Cost(flops, nbytes, elementwise=depth * sum(c.elementwise for c in blocks))


def naflex_grid(height: int, width: int, patch: int, max_patches: int, eps: float = 1e-5,
                upscale: bool = True) -> Tuple[int, int]:
    """(rows, cols) of patches of a ``height x width`` image resized to fit ``max_patches`` keeping
    its aspect ratio, the rule of Hugging Face's Siglip2 image processor: the largest scale s
    (bisection to ``eps``) with ceil(h s / P) * ceil(w s / P) <= max_patches, each side at least
    one patch. (fastvit's preprocessing implements it bit-exact; this count needs only the grid.)
    ``upscale=False``: s <= 1, the native resolution capped at the budget (VLM towers' rule)."""
    lo, hi = eps / 10, (100.0 if upscale else 1.0)
    if not upscale and max(math.ceil(height / patch), 1) * max(math.ceil(width / patch), 1) <= max_patches:
        return max(math.ceil(height / patch), 1), max(math.ceil(width / patch), 1)

    def grid(s: float) -> Tuple[int, int]:
        return max(math.ceil(height * s / patch), 1), max(math.ceil(width * s / patch), 1)

    while hi - lo >= eps:
        mid = (lo + hi) / 2
        gh, gw = grid(mid)
        if gh * gw <= max_patches:
            lo = mid
        else:
            hi = mid
    return grid(lo)


# The photographs among scikit-image's bundled images (its drawings, textures and test patterns left out).
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "clock", "coffee", "coins", "hubble_deep_field",
                  "immunohistochemistry", "moon", "page", "retina", "rocket", "text")


def skimage_photo_sizes() -> List[Tuple[int, int]]:
    """(height, width) of the scikit-image photos (:data:`SKIMAGE_PHOTOS`), read from the images."""
    try:
        from skimage import data
    except ImportError as e:
        raise ImportError('the scikit-image photos need scikit-image: pip install "fastvit[viz]"') from e
    return [tuple(getattr(data, name)().shape[:2]) for name in SKIMAGE_PHOTOS]


def uniform_aspect_sizes(n: int, lo: float = 0.5, hi: float = 2.0, area: int = 512 * 512,
                         seed: int = 0) -> List[Tuple[int, int]]:
    """``n`` (height, width) of ``area`` pixels with aspect ratios w / h uniform in [lo, hi] (seeded)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.uniform(lo, hi)
        out.append((max(round(math.sqrt(area / a)), 1), max(round(math.sqrt(area * a)), 1)))
    return out


# SigLIP2 NaFlex encoders (HF Siglip2VisionModel): ViT-B/16 and so400m/16
NAFLEX_MODELS = {"siglip2-b16": (768, 12, 12, 3072), "siglip2-so400m16": (1152, 27, 16, 4304)}


def packing_rows(sizes: Sequence[Tuple[int, int]], budgets: Sequence[int], model: str = "siglip2-b16",
                 batch: Optional[int] = None, patch: int = 16, esize: int = 2,
                 upscale: bool = True) -> Dict[str, float]:
    """Packed vs padded costs of ``sizes`` (height, width) split in batches of ``batch`` images (None:
    one batch), image j at token budget ``budgets[j % len(budgets)]`` (one budget, or a batch that
    mixes them), through ``model`` (:data:`NAFLEX_MODELS`); ``upscale`` as :func:`naflex_grid`.

    Returns totals over the batches: images, tokens packed / padded to the largest budget (HF) /
    padded to each batch's longest, the padding fraction of each, attention and encoder FLOPs and
    bytes of each, and their padded / packed ratios."""
    D, depth, heads, hidden = NAFLEX_MODELS[model]
    lens = []
    for j, (h, w) in enumerate(sizes):
        gh, gw = naflex_grid(h, w, patch, budgets[j % len(budgets)], upscale=upscale)
        lens.append(gh * gw)
    batch = batch or len(lens)
    pad_to = max(budgets)
    tot: Dict[str, float] = dict(images=len(lens), tokens=0, tokens_budget=0, tokens_longest=0, attn_flops=0,
                                 attn_flops_budget=0, attn_flops_longest=0, enc_flops=0, enc_flops_budget=0,
                                 enc_flops_longest=0, enc_bytes=0, enc_bytes_budget=0)
    d = D // heads
    for i in range(0, len(lens), batch):
        b = lens[i:i + batch]
        longest = max(b)
        tot["tokens"] += sum(b)
        tot["tokens_budget"] += pad_to * len(b)
        tot["tokens_longest"] += longest * len(b)
        tot["attn_flops"] += attention_varlen_cost(b, heads, d, esize=esize).flops
        tot["attn_flops_budget"] += attention_cost(len(b), heads, pad_to, d, esize=esize).flops
        tot["attn_flops_longest"] += attention_cost(len(b), heads, longest, d, esize=esize).flops
        packed = encoder_cost(b, D, depth, heads, hidden, patch, esize=esize)
        padded = encoder_cost(b, D, depth, heads, hidden, patch, padded_to=pad_to, esize=esize)
        tot["enc_flops"] += packed.flops
        tot["enc_flops_budget"] += padded.flops
        tot["enc_flops_longest"] += encoder_cost(b, D, depth, heads, hidden, patch, padded_to=longest,
                                                 esize=esize).flops
        tot["enc_bytes"] += packed.bytes
        tot["enc_bytes_budget"] += padded.bytes
    tot["pad_fraction_budget"] = 1 - tot["tokens"] / tot["tokens_budget"]
    tot["pad_fraction_longest"] = 1 - tot["tokens"] / tot["tokens_longest"]
    for what in ("attn_flops", "enc_flops"):
        tot[f"{what}_ratio_budget"] = tot[f"{what}_budget"] / tot[what]
        tot[f"{what}_ratio_longest"] = tot[f"{what}_longest"] / tot[what]
    tot["enc_bytes_ratio_budget"] = tot["enc_bytes_budget"] / tot["enc_bytes"]
    return tot


def packing_mixes(photos: Optional[Sequence[Tuple[int, int]]] = None) -> List[tuple]:
    """The realistic mixes of the table: (label, image sizes, budgets, batch, upscale). Resized to
    the budget (SigLIP2 NaFlex) every image nearly fills it, so one budget pads little; a batch
    that mixes budgets, or images kept at native resolution under a cap (VLM towers), pads a lot."""
    photos = skimage_photo_sizes() if photos is None else photos
    uniform = uniform_aspect_sizes(256)
    return [
        ("skimage photos, budget 256", photos, (256,), None, True),
        ("skimage photos, budget 1024", photos, (1024,), None, True),
        ("skimage photos, budgets 256/576/1024 mixed", photos, (256, 576, 1024), None, True),
        ("skimage photos, native size capped at 1024", photos, (1024,), None, False),
        ("uniform aspect 0.5-2.0, budget 256, bs32", uniform, (256,), 32, True),
        ("uniform aspect 0.5-2.0, budget 1024, bs32", uniform, (1024,), 32, True),
        ("uniform aspect 0.5-2.0, budgets 256/1024 mixed, bs32", uniform, (256, 1024), 32, True),
    ]


def render_packing_table(model: str = "siglip2-b16", photos: Optional[Sequence[Tuple[int, int]]] = None) -> str:
    """Markdown table: packed vs padded tokens, attention and whole-encoder FLOPs for the mixes of
    :func:`packing_mixes` (padded = to the largest budget, as the HF processor; 'longest' = to each
    batch's longest image, the best a padded collate can do)."""
    rows = [f"| mix ({model}, P16, bf16) | images | tokens packed | padding (budget / longest) | attention GFLOP "
            "packed | attention padded / packed (budget / longest) | encoder GFLOP packed | encoder padded / packed "
            "(budget / longest) | encoder bytes padded / packed |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, sizes, budgets, batch, upscale in packing_mixes(photos):
        t = packing_rows(sizes, budgets, model, batch, upscale=upscale)
        rows.append(f"| {label} | {int(t['images'])} | {int(t['tokens'])} | {100 * t['pad_fraction_budget']:.1f}% / "
                    f"{100 * t['pad_fraction_longest']:.1f}% | {t['attn_flops'] / 1e9:.1f} | "
                    f"{t['attn_flops_ratio_budget']:.2f}x / {t['attn_flops_ratio_longest']:.2f}x | "
                    f"{t['enc_flops'] / 1e9:.0f} | {t['enc_flops_ratio_budget']:.2f}x / "
                    f"{t['enc_flops_ratio_longest']:.2f}x | {t['enc_bytes_ratio_budget']:.2f}x |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(render_table())
    print()
    print(render_packing_table())
