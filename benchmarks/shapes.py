"""Benchmark grids: which shapes, batches and dtypes each suite runs.

Three grids (``FASTVIT_BENCH_GRID``, see :func:`benchmarks.harness.grid_name`):

* ``smoke`` - CPU CI: one tiny ViT-like config, batch 1 and 2, float32.
* ``default`` - what ``benchmarks/gpu_run.sh`` runs on one GPU in a few minutes: every model
  size and sequence length of the issue at batch 256 in bf16, the batch sweep 1 / 8 / 64 / 256
  on ViT-B, fp16 on ViT-B, torch.compile baselines on the headline shapes only (compiling with
  max-autotune costs ~30-90 s per shape).
* ``full`` - the whole cross product (models x N x batch x dtype, compile everywhere): hours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from .harness import grid_name

__all__ = ["KernelCase", "ModelCase", "KERNEL_MODELS", "kernel_cases", "model_cases", "compile_enabled"]


@dataclass(frozen=True)
class Dims:
    """Transformer widths of one model size (what the kernels see)."""

    D: int  # embed dim
    heads: int
    patch: int
    tokens_to_img: Tuple[Tuple[int, int], ...]  # (N incl. class token, square image side)
    mlp_ratio: float = 4.0

    @property
    def d(self) -> int:
        return self.D // self.heads

    @property
    def hidden(self) -> int:
        return int(self.D * self.mlp_ratio)


_P16 = ((197, 224), (577, 384), (1025, 512))
_P14 = ((257, 224), (577, 336), (1025, 448))
KERNEL_MODELS: Dict[str, Dims] = {
    "vit_s": Dims(384, 6, 16, _P16),
    "vit_b": Dims(768, 12, 16, _P16),
    "vit_l": Dims(1024, 16, 16, _P16),
    "vit_h": Dims(1280, 16, 14, _P14),  # head dim 80
    # smoke: small enough for Triton's CPU interpreter; N = 17 and 5 (odd, not block multiples)
    "tiny": Dims(64, 2, 8, ((17, 32), (5, 16))),
}


@dataclass(frozen=True)
class KernelCase:
    """One kernel shape: ``op`` in patch_embed / attention / linear / mlp, plus its variant."""

    op: str
    variant: str  # linear: qkv (LN prologue), proj (+residual), fc1 (+GELU), fc2 (+residual); mlp: mlp, ln_mlp
    model: str
    B: int
    N: int  # tokens incl. the class token
    dtype: str
    compile: bool = False  # also time torch.compile of the reference on this case

    @property
    def dims(self) -> Dims:
        return KERNEL_MODELS[self.model]

    @property
    def img(self) -> int:
        return dict(self.dims.tokens_to_img)[self.N]

    @property
    def key(self) -> str:
        v = f"-{self.variant}" if self.variant else ""
        return f"{self.op}{v}|{self.model}|B{self.B}|N{self.N}|{self.dtype}"


_VARIANTS = {"patch_embed": ("",), "attention": ("",), "linear": ("qkv", "proj", "fc1", "fc2"),
             "mlp": ("mlp", "ln_mlp")}


def compile_enabled() -> bool:
    """torch.compile baselines run unless FASTVIT_BENCH_COMPILE=0; in smoke mode only with
    FASTVIT_BENCH_COMPILE=1 (one tiny compile costs ~35 s on a 2-core CPU)."""
    import os

    v = os.environ.get("FASTVIT_BENCH_COMPILE", "")
    if grid_name() == "smoke":
        return v == "1"
    return v != "0"


def kernel_cases(op: str) -> List[KernelCase]:
    """The cases of ``op`` in the active grid, in run order."""
    g = grid_name()
    variants = _VARIANTS[op]
    out: List[KernelCase] = []
    if g == "smoke":
        for v in variants:
            for B in (1, 2):
                out.append(KernelCase(op, v, "tiny", B, 17, "fp32", compile=(B == 1 and v in ("", "mlp"))))
        if op == "attention":
            out.append(KernelCase(op, "", "tiny", 3, 5, "fp32"))
        return out
    if g == "full":
        for m, dims in KERNEL_MODELS.items():
            if m == "tiny":
                continue
            for N, _ in dims.tokens_to_img:
                for B in (1, 8, 64, 256):
                    for dt in ("bf16", "fp16"):
                        for v in variants:
                            out.append(KernelCase(op, v, m, B, N, dt, compile=True))
        return out
    # default: one GPU, a few minutes
    head = variants[0]
    for m, dims in KERNEL_MODELS.items():
        if m == "tiny":
            continue
        tokens = [n for n, _ in dims.tokens_to_img]
        if op != "attention":
            tokens = tokens[:1] if op != "patch_embed" or m != "vit_b" else tokens[:2]
        for N in tokens:
            vs = variants if m == "vit_b" and N == tokens[0] else (head,)
            for v in vs:
                hot = m == "vit_b" and N == tokens[0] and v == head
                out.append(KernelCase(op, v, m, 256, N, "bf16", compile=hot or (op == "attention" and m == "vit_b"
                                                                                  and N == 1025)))
    for B in (1, 8, 64):
        out.append(KernelCase(op, head, "vit_b", B, 197, "bf16"))
    out.append(KernelCase(op, head, "vit_b", 256, 197, "fp16"))
    if op == "attention":
        out.append(KernelCase(op, head, "vit_b", 256, 1025, "fp16"))
    return out


@dataclass(frozen=True)
class ModelCase:
    """One model benchmark: a ViT config at a batch size and dtype, and which impls run."""

    model: str
    B: int
    dtype: str
    impls: Tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        return f"model|{self.model}|B{self.B}|{self.dtype}"


# name -> (timm name, timm kwargs, image side); the DINOv2-style model runs at 224 (N = 257)
MODEL_SPECS: Dict[str, Tuple[str, dict, int]] = {
    "vit_s16": ("vit_small_patch16_224", {}, 224),
    "vit_b16": ("vit_base_patch16_224", {}, 224),
    "vit_l16": ("vit_large_patch16_224", {}, 224),
    "dinov2_s14": ("vit_small_patch14_dinov2", {"img_size": 224}, 224),
    # smoke: a 2-block ViT small enough for the CPU (and the Triton interpreter)
    "tiny_vit": ("vit_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                               num_classes=10), 32),
    "tiny_dinov2": ("vit_small_patch14_dinov2", dict(img_size=28, patch_size=7, embed_dim=64, depth=2,
                                                     num_heads=2), 28),
}

_EAGER = ("fastvit-triton", "fastvit-cuda", "fastvit-torch", "timm", "hf-sdpa")


def model_cases() -> List[ModelCase]:
    """The model cases of the active grid, in run order (grouped by model so builds are reused)."""
    g = grid_name()
    if g == "smoke":
        # the triton model path runs in the interpreter here (~1 s per call): keep the cases few
        return [ModelCase("tiny_vit", 1, "fp32", _EAGER + ("fastvit-compile",)),
                ModelCase("tiny_vit", 2, "fp32", _EAGER),
                ModelCase("tiny_dinov2", 2, "fp32", _EAGER)]
    out = []
    batches = (1, 8, 64, 256)
    for m in ("vit_s16", "vit_b16", "vit_l16", "dinov2_s14"):
        for dt in (("bf16", "fp16") if (m == "vit_b16" or g == "full") else ("bf16",)):
            for B in batches:
                impls = list(_EAGER)
                if B in (1, 8):
                    impls.append("fastvit-cudagraph")
                if g == "full" or (m == "vit_b16" and B == 256 and dt == "bf16"):
                    impls += ["timm-compile", "fastvit-compile"]
                if g != "full" and dt == "fp16" and B not in (1, 256):
                    continue
                out.append(ModelCase(m, B, dt, tuple(impls)))
    return out
