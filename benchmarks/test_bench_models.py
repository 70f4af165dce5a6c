"""Model benchmarks: whole-network throughput (img/s) of fastvit against timm eager (fused SDPA
on), timm + torch.compile and Hugging Face transformers (attn_implementation='sdpa'), plus
fastvit replayed from a CUDA graph (batch 1 and 8) and fastvit under torch.compile.

Models: ViT-S/16, ViT-B/16, ViT-L/16 and a DINOv2-style S/14 (LayerScale, no classifier) at
224, randomly initialised (no network): the timing does not depend on the weights, and the
outputs are checked against a float32 fastvit-torch copy of the same weights.
"""

from __future__ import annotations

import copy
import functools
import importlib
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import torch

import fastvit
from fastvit.backends import BackendUnavailable

from .flops import model_flops_per_image
from .harness import DTYPES, HAS_CUDA, bench, check_output, env_info, peak_memory, record, rotation
from .shapes import MODEL_SPECS, ModelCase, compile_enabled, model_cases

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
COMPILE_MODE = "max-autotune-no-cudagraphs"
_OPS = ("patch_embed", "linear", "attention", "mlp", "layer_norm")
_BACKEND_MODULES = {"triton": "fastvit.kernels", "cuda": "fastvit.cuda", "torch": "fastvit.reference"}


def _backend_reason(name: str) -> Optional[str]:
    """None when fastvit backend ``name`` runs every op of a forward pass here, else why not."""
    ok, reason = fastvit.available_backends(DEVICE)[name]
    if not ok:
        return f"fastvit backend {name!r} unavailable on {DEVICE.type}: {reason}"
    mod = importlib.import_module(_BACKEND_MODULES[name])
    missing = [op for op in _OPS if not callable(getattr(mod, op, None))]
    if missing:
        return f"fastvit backend {name!r} does not implement {missing} yet"
    return None


def best_backend() -> str:
    """The first of triton, cuda, torch that runs the whole model here (what auto picks; as auto,
    never the Triton interpreter on a CPU)."""
    for name in (("triton", "cuda", "torch") if DEVICE.type == "cuda" else ("torch",)):
        if _backend_reason(name) is None:
            return name
    return "torch"


# --------------------------------------------------------------------------- models
def _hf_model(timm_model: torch.nn.Module, dinov2: bool) -> torch.nn.Module:
    """A transformers model with the timm model's architecture (its own random weights)."""
    D = timm_model.embed_dim
    kw = dict(hidden_size=D, num_hidden_layers=len(timm_model.blocks), num_attention_heads=timm_model.blocks[0].attn.num_heads,
              image_size=timm_model.patch_embed.img_size[0], patch_size=timm_model.patch_embed.patch_size[0])
    from transformers import AutoModel, AutoModelForImageClassification

    if dinov2:
        from transformers import Dinov2Config

        return AutoModel.from_config(Dinov2Config(mlp_ratio=4, layerscale_value=1e-5, **kw), attn_implementation="sdpa")
    from transformers import ViTConfig

    cfg = ViTConfig(intermediate_size=4 * D, num_labels=timm_model.num_classes, **kw)
    return AutoModelForImageClassification.from_config(cfg, attn_implementation="sdpa")


class Family:
    """One architecture: timm, HF and fastvit models in float32 (oracles) and per dtype."""

    def __init__(self, name: str):
        import timm

        timm_name, kw, self.img = MODEL_SPECS[name]
        self.name = name
        self.dinov2 = "dinov2" in timm_name
        torch.manual_seed(0)
        self.timm32 = timm.create_model(timm_name, pretrained=False, **kw).eval().to(DEVICE)
        for blk in self.timm32.blocks:  # timm's fused SDPA path, as timm ships it
            blk.attn.fused_attn = True
        self.hf32 = _hf_model(self.timm32, self.dinov2).eval().to(DEVICE)
        self.ref32 = fastvit.from_timm(self.timm32).set_backend("torch")  # oracle of timm + fastvit
        self.hf_ref32 = fastvit.from_hf(self.hf32).set_backend("torch")  # oracle of the HF model
        m = self.timm32
        self.flops = model_flops_per_image(m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads, self.img,
                                           m.patch_embed.patch_size[0], num_prefix=m.num_prefix_tokens,
                                           num_classes=m.num_classes)
        self._lowp: Dict[torch.dtype, Dict[str, Any]] = {}

    def lowp(self, dt: torch.dtype) -> Dict[str, Any]:
        """timm, HF and fastvit (from timm / from HF) models in dtype ``dt`` (cached, one dtype)."""
        if dt not in self._lowp:
            self._lowp.clear()
            if dt == torch.float32:
                t, h = self.timm32, self.hf32
            else:
                t, h = copy.deepcopy(self.timm32).to(dt), copy.deepcopy(self.hf32).to(dt)
            # "fast" is timed (its backend is set per test); the "*_ref" copies stay on torch as oracles
            self._lowp[dt] = {"timm": t, "hf": h, "fast": fastvit.from_timm(t),
                              "fast_ref": fastvit.from_timm(t).set_backend("torch"),
                              "fast_hf_ref": fastvit.from_hf(h).set_backend("torch")}
        return self._lowp[dt]

    def hf_out(self, model, x):
        out = model(pixel_values=x)
        return out.pooler_output if self.dinov2 else out.logits


@functools.lru_cache(maxsize=1)
def family(name: str) -> Family:
    """One family at a time on the device (cases are ordered by model)."""
    if HAS_CUDA:
        torch.cuda.empty_cache()
    return Family(name)


# --------------------------------------------------------------------------- impls
def cuda_graph(model: torch.nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Capture ``model(static_x)`` in a CUDA graph; the returned f copies its input into the
    static buffer and replays (the copy is part of the timed work, as in a serving loop)."""
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # autotuning and lazy init must happen before capture
            model(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = model(static_x)

    def f(inp):
        static_x.copy_(inp)
        g.replay()
        return static_out
    return f


def build(fam: Family, c: ModelCase, impl: str, x: torch.Tensor) -> Tuple[Callable, str, Dict[str, Any]]:
    """-> (f(images) -> output, which oracle ('timm' or 'hf'), extra fields)."""
    dt = DTYPES[c.dtype]
    m = fam.lowp(dt)
    if impl in ("fastvit-triton", "fastvit-cuda", "fastvit-torch"):
        name = impl.split("-", 1)[1]
        r = _backend_reason(name)
        if r:
            pytest.skip(r)
        return m["fast"].set_backend(name), "timm", {"backend": name}
    if impl == "timm":
        return m["timm"], "timm", {"fused_attn": bool(m["timm"].blocks[0].attn.fused_attn)}
    if impl == "hf-sdpa":
        model = m["hf"]
        return (lambda inp: fam.hf_out(model, inp)), "hf", {"attn_implementation": getattr(model.config, "_attn_implementation", "sdpa")}
    if impl == "fastvit-cudagraph":
        if not HAS_CUDA:
            pytest.skip("CUDA graphs need a CUDA device")
        name = best_backend()
        return cuda_graph(m["fast"].set_backend(name), x), "timm", {"backend": name, "cuda_graph": True}
    if impl in ("timm-compile", "fastvit-compile"):
        if not compile_enabled():
            pytest.skip("torch.compile baselines are off in smoke mode: compiling costs minutes on a 2-core CPU "
                        "(FASTVIT_BENCH_COMPILE=1 forces them)")
        if impl == "timm-compile":
            return torch.compile(m["timm"], mode=COMPILE_MODE), "timm", {"compile_mode": COMPILE_MODE}
        name = best_backend()
        return torch.compile(m["fast"].set_backend(name), mode=COMPILE_MODE), "timm", {
            "backend": name, "compile_mode": COMPILE_MODE}
    raise ValueError(f"impl: unknown {impl!r}")


def run_model_case(benchmark, c: ModelCase, impl: str) -> None:
    fam = family(c.model)
    dt = DTYPES[c.dtype]
    x0 = torch.randn(c.B, 3, fam.img, fam.img, device=DEVICE, dtype=dt)
    with torch.no_grad():
        try:
            fn, oracle, extra = build(fam, c, impl, x0)
            out = fn(x0).clone()  # warm-up (autotuning, compilation); clone: a graph reuses its output
        except BackendUnavailable as e:  # a backend that declines one of this model's shapes
            pytest.skip(f"{impl}: {e}")
        if HAS_CUDA:
            torch.cuda.synchronize()
        nb = min(c.B, 2)
        xs = x0[:nb]
        if oracle == "timm":
            ref32 = fam.ref32(xs.float())
            ref_lowp = fam.lowp(dt)["fast_ref"](xs) if dt != torch.float32 else None
        else:
            ref32 = fam.hf_ref32(xs.float())
            ref_lowp = fam.lowp(dt)["fast_hf_ref"](xs) if dt != torch.float32 else None
        check_output(out[:nb], ref32, ref_lowp, baseline=not impl.startswith("fastvit"), name=f"{c.key} {impl}")
        del out
        n_sets = rotation(x0.numel() * x0.element_size(), env_info()["l2_bytes"], cap=16)
        xs_all = [x0] + [torch.randn_like(x0) for _ in range(n_sets - 1)]
        mem = peak_memory(lambda: fn(x0)) if not getattr(benchmark, "disabled", False) else None
        stats = bench(benchmark, fn, [(x,) for x in xs_all])
    record(benchmark, case=c.key, impl=impl, stats=stats, flops=c.B * fam.flops, images=c.B, mem=mem,
           kind="model", model=c.model, B=c.B, dtype=c.dtype, img_size=fam.img, **extra)


def _params():
    # compiled models (minutes of max-autotune each) run last, so a time-boxed run loses them first
    pairs = [(c, impl) for c in model_cases() for impl in c.impls]
    pairs.sort(key=lambda p: p[1].endswith("-compile"))
    return [pytest.param(c, impl, id=f"{c.key.replace('|', '-')}-{impl}") for c, impl in pairs]


@pytest.mark.parametrize("case,impl", _params())
def test_model(benchmark, peaks, case, impl):
    run_model_case(benchmark, case, impl)
