"""Explicit FLOP and minimal-byte counts for every benchmarked kernel and model.

These formulas are the denominators of every TFLOP/s, GB/s and MFU number the suites report, and
they give the roofline floor ``max(FLOPs / GEMM peak, bytes / copy bandwidth)`` (DESIGN.md sec. 6).

Conventions (those of flash-attention and timm's GMAC counts, x2):
* a multiply-add is 2 FLOPs; only matrix products are counted (bias, GELU, LayerNorm, softmax,
  residual adds are O(elements) and listed separately as ``elementwise`` where they matter);
* "minimal bytes" = every input read once + every output written once, in the kernel's dtypes,
  i.e. what an ideally fused kernel must move; intermediates an unfused version round-trips
  through memory (the MLP hidden activation, attention scores) are *not* counted.

``python -m benchmarks.flops`` prints the ViT-B/16 batch-256 table that NOTES.md carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

__all__ = [
    "Cost",
    "patch_embed_cost",
    "attention_cost",
    "linear_cost",
    "mlp_cost",
    "model_flops_per_image",
    "floor_ms",
    "vit_b16_table",
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


if __name__ == "__main__":
    print(render_table())
