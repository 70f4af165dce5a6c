"""Benchmark grids: which shapes, batches and dtypes each suite runs.

Three grids (``FASTVIT_BENCH_GRID``, see :func:`benchmarks.harness.grid_name`):

* ``smoke`` - CPU CI: one tiny ViT-like config, batch 1 and 2, float32.
* ``default`` - what ``benchmarks/gpu_run.sh`` tunes and times in one device call: the shapes
  of the issue's targets. Kernels: ViT-B/16 bf16 at batch 256, every linear / MLP variant,
  attention also at N 577 / 1025 and at ViT-S / L / H widths (6 and 16 heads, head dim 80);
  models: ViT-B/16 bf16 at batch 1 (with a CUDA graph) and 256 (with timm + torch.compile and
  fastvit + torch.compile). It is bounded by tuning, not timing: each fastvit-triton shape key is
  tuned once, compiling its 4-15 candidate configs (~1.2 s each) before timing them, so every
  added case costs up to ~20 s; gpu_run.sh's header counts this grid at 20 keys and 119
  compiles. fp16, other batches and other model sizes run in ``full``.
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
    # default: every case's fastvit-triton shape key is tuned once, so each added case costs its
    # candidates' compiles; no kernel-level torch.compile baseline (max-autotune: ~30-90 s each)
    head = variants[0]
    for v in variants:
        out.append(KernelCase(op, v, "vit_b", 256, 197, "bf16"))
    if op == "attention":
        out += [KernelCase(op, head, "vit_b", 256, N, "bf16") for N in (577, 1025)]
        out += [KernelCase(op, head, m, 256, KERNEL_MODELS[m].tokens_to_img[0][0], "bf16")
                for m in ("vit_s", "vit_l", "vit_h")]
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
    if g == "default":
        # the targets: bs256 against timm eager and timm + torch.compile, bs1 from a CUDA graph
        return [ModelCase("vit_b16", 1, "bf16", _EAGER + ("fastvit-cudagraph",)),
                ModelCase("vit_b16", 256, "bf16", _EAGER + ("timm-compile", "fastvit-compile"))]
    out = []
    for m in ("vit_s16", "vit_b16", "vit_l16", "dinov2_s14"):
        for dt in ("bf16", "fp16"):
            for B in (1, 8, 64, 256):
                graph = ("fastvit-cudagraph",) if B in (1, 8) else ()
                out.append(ModelCase(m, B, dt, _EAGER + graph + ("timm-compile", "fastvit-compile")))
    return out
