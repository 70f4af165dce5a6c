"""Config choice for every kernel: heuristic, or autotuned once per shape and cached on disk.

Why not ``triton.autotune``: we need (1) a heuristic mode that never benchmarks (the CPU
interpreter, ``FASTVIT_AUTOTUNE=0``, CUDA-graph capture), (2) a cache that survives the
process, keyed by GPU name, shape key and dtype, and (3) :func:`fastvit.warmup` to run every
tuning up front. A kernel module describes itself with a :class:`Tunable`:

* ``configs()`` -- the candidate list (``_configs()`` in the kernel files),
* ``keep(cfg, key)`` -- prunes candidates that cannot work for a key (shared memory, tl.dot
  minimums, tiles far larger than the problem),
* ``heuristic(key)`` -- the config used without tuning,
* the *key* -- only the quantities that change the compiled code or the best tiling
  (N_CTX bucket, HEAD_DIM, K, N, flags, dtype); never the batch alone.

Benchmarks run with ``triton.testing.do_bench`` on the caller's real arguments (outputs are
scratch; kernels here are pure functions of their inputs, so re-running is harmless).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fastvit.facts import interpret_mode

__all__ = ["Config", "Tunable", "cdiv", "autotune_enabled", "cache_path", "in_capture", "clear_memory_cache", "smem_limit",
           "set_target", "target_arch", "SMEM_LIMITS", "NotWarmedUp", "Binding"]

_lock = threading.RLock()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints, for launch grids (``triton.cdiv`` goes through Triton's
    constexpr-function wrapper: several times the cost on the launch path)."""
    return -(-a // b)


@dataclass(frozen=True)
class Config:
    """One launch configuration: constexpr meta-parameters + num_warps / num_stages."""

    meta: Tuple[Tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2
    # built once (a launch reads them on every call): the meta dict and the launch keywords
    _meta: Dict[str, int] = field(init=False, repr=False, compare=False, hash=False)
    _launch: Dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        meta = dict(self.meta)
        object.__setattr__(self, "_meta", meta)
        object.__setattr__(self, "_launch", {**meta, "num_warps": self.num_warps, "num_stages": self.num_stages})

    @staticmethod
    def make(num_warps: int = 4, num_stages: int = 2, **meta: int) -> "Config":
        return Config(tuple(sorted(meta.items())), num_warps, num_stages)

    @property
    def kwargs(self) -> Dict[str, int]:
        return dict(self._meta)

    def __getitem__(self, name: str) -> int:
        return self._meta[name]

    def launch_kwargs(self) -> Dict[str, int]:
        """Keyword arguments for ``kernel[grid](..., **cfg.launch_kwargs())`` (shared: do not mutate)."""
        return self._launch

    def to_json(self) -> Dict[str, Any]:
        return {"meta": dict(self.meta), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @staticmethod
    def from_json(d: Dict[str, Any]) -> "Config":
        return Config.make(d["num_warps"], d["num_stages"], **d["meta"])

    def __str__(self) -> str:
        m = ",".join(f"{k}={v}" for k, v in self.meta)
        return f"{m},w{self.num_warps},s{self.num_stages}"


def autotune_enabled() -> bool:
    """False under ``FASTVIT_AUTOTUNE=0`` and in Triton's CPU interpreter (nothing to time there)."""
    if interpret_mode():
        return False
    return os.environ.get("FASTVIT_AUTOTUNE", "1") not in ("0", "false", "False", "")


def in_capture() -> bool:
    """True while a CUDA graph is being captured: no tuning, no host sync allowed then."""
    try:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except Exception:  # no CUDA runtime at all
        return False


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")


def cache_path(device: torch.device) -> str:
    """The JSON file holding tuned configs for this GPU model (``FASTVIT_CACHE_DIR`` overrides)."""
    root = os.environ.get("FASTVIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastvit")
    import triton  # the triton version changes codegen, so tuned choices are kept per version

    return os.path.join(root, f"autotune-{_device_name(device)}-triton{triton.__version__}.json")


TUNABLES: List["Tunable"] = []  # every kernel's Tunable, in import order (fastvit.warmup reports on them)
_disk: Dict[str, Dict[str, Any]] = {}  # path -> {"kernel|key": config json}


_BINDINGS: "weakref.WeakSet[Binding]" = weakref.WeakSet()


class Binding:
    """What a bound launcher (``<op>_for``) fixed at its first call: the grid and the launch
    keyword arguments of the config it picked (None before). :func:`clear_memory_cache` resets
    every binding, so the next call picks again."""

    __slots__ = ("grid", "kwargs", "__weakref__")

    def __init__(self):
        self.grid: Optional[Tuple[int, ...]] = None
        self.kwargs: Dict[str, Any] = {}
        _BINDINGS.add(self)

    def set(self, grid: Tuple[int, ...], kwargs: Dict[str, Any]) -> None:
        self.grid, self.kwargs = grid, kwargs


def clear_memory_cache() -> None:
    """Forget in-process choices (tests use it to force re-reading the disk cache), the ones
    bound launchers hold included."""
    with _lock:
        for t in TUNABLES:
            t._chosen.clear()
        _disk.clear()
        for b in list(_BINDINGS):
            b.grid = None


def _load_disk(path: str) -> Dict[str, Any]:
    if path not in _disk:
        try:
            with open(path) as f:
                _disk[path] = json.load(f)
        except (OSError, ValueError):
            _disk[path] = {}
    return _disk[path]


def _save_disk(path: str, entry: str, cfg: Config) -> None:
    data = _load_disk(path)
    data[entry] = cfg.to_json()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # a read-only home still works, it just re-tunes next process


class NotWarmedUp(RuntimeError):
    """A CUDA-graph capture reached a kernel shape that never ran eagerly in this process."""

    def __init__(self, kernel: str, key: Tuple):
        super().__init__(
            f"fastvit: the {kernel} kernel for shape key {key} has not run in this process, and a CUDA graph "
            "is being captured: its first launch would compile and load code inside the capture. Run "
            "fastvit.warmup(model, batch_sizes, dtype) with the shapes you capture (or use fastvit.compile, "
            "which does) before capturing.")
        self.kernel, self.key = kernel, key


@dataclass
class Tunable:
    """A kernel's config space. ``run(cfg)`` launches it once with ``cfg`` (used for timing)."""

    name: str
    configs: Callable[[], Sequence[Config]]
    keep: Callable[[Config, Tuple], bool]
    heuristic: Callable[[Tuple], Config]
    interpreter: Optional[Callable[[Tuple], Config]] = None  # CPU-interpreter choice (speed only)
    stats: Dict[str, int] = field(default_factory=dict)
    _chosen: Dict[Tuple[torch.device, Tuple], Config] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        TUNABLES.append(self)

    def candidates(self, key: Tuple) -> List[Config]:
        """The pruned candidate list for ``key`` (never empty: falls back to the heuristic)."""
        kept = [c for c in self.configs() if self.keep(c, key)]
        return kept or [self.heuristic(key)]

    def pick(self, key: Tuple, device: torch.device, run: Callable[[Config], None]) -> Config:
        """The config for ``key``: chosen before in this process (one dict lookup: the launch
        path formats no strings and reads no environment), else read from the disk cache, else
        tuned (when allowed), else the heuristic."""
        cfg = self._chosen.get((device, key))
        if cfg is None:
            cfg = self._choose(key, device, run)
        return cfg

    def _choose(self, key: Tuple, device: torch.device, run: Callable[[Config], None]) -> Config:
        if device.type == "cuda" and in_capture():
            # a first launch compiles and loads a module: inside a capture that would break the
            # graph, so stop before anything is launched (fastvit.warmup / fastvit.compile run
            # every shape eagerly first)
            raise NotWarmedUp(self.name, key)
        if device.type != "cuda" or not autotune_enabled():
            choose = self.interpreter if (device.type != "cuda" and self.interpreter) else self.heuristic
            cfg = self._chosen[(device, key)] = choose(key)
            return cfg
        skey = "|".join(str(k) for k in key)
        with _lock:
            path = cache_path(device)
            saved = _load_disk(path).get(f"{self.name}|{skey}")
            if saved is not None:
                cfg = Config.from_json(saved)
            elif in_capture():
                raise NotWarmedUp(self.name, key)
            else:
                cfg = self._tune(key, run)
                _save_disk(path, f"{self.name}|{skey}", cfg)
            self._chosen[(device, key)] = cfg
        return cfg

    def _tune(self, key: Tuple, run: Callable[[Config], None]) -> Config:
        from triton.testing import do_bench

        best, best_t = None, float("inf")
        for cfg in self.candidates(key):
            try:
                t = do_bench(lambda: run(cfg), warmup=5, rep=20)
            except Exception:  # e.g. out of resources on this GPU: the config is just not eligible
                continue
            if t < best_t:
                best, best_t = cfg, t
        self.stats["tuned"] = self.stats.get("tuned", 0) + 1
        self.stats["benchmarked_configs"] = self.stats.get("benchmarked_configs", 0) + len(self.candidates(key))
        return best if best is not None else self.heuristic(key)


# Per-block opt-in shared memory (bytes): the AOT test checks compiled kernels against these.
SMEM_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_target_override: Optional[int] = None
_current: Dict[str, int] = {}  # the current GPU's arch and shared memory, asked once


def _current_gpu() -> Dict[str, int]:
    if not _current:
        try:
            if torch.cuda.is_available():
                p = torch.cuda.get_device_properties(torch.cuda.current_device())
                _current.update(arch=p.major * 10 + p.minor, smem=int(p.shared_memory_per_block_optin))
        except Exception:  # no usable CUDA runtime: configs are pruned for sm_90
            pass
        _current.setdefault("arch", 90)
        _current.setdefault("smem", SMEM_LIMITS[90])
    return _current


def target_arch() -> int:
    """The architecture configs are pruned for (80, 90, ...): :func:`set_target`'s, else the
    current GPU's, else sm_90. ``keep()`` functions use it where codegen differs by arch."""
    return _target_override if _target_override is not None else _current_gpu()["arch"]


def smem_limit() -> int:
    """Shared memory a config may use on :func:`target_arch` (per-block opt-in maximum)."""
    if _target_override is not None:
        return SMEM_LIMITS.get(_target_override, SMEM_LIMITS[80])
    return _current_gpu()["smem"]


def set_target(arch: Optional[int]) -> None:
    """Prune configs for GPU architecture ``arch`` (e.g. 80 for AOT compilation for sm_80) instead
    of the current GPU (None: back to the current GPU)."""
    global _target_override
    _target_override = arch


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def n_bucket(n: int) -> int:
    """Sequence lengths are bucketed to the next power of two for the tuning key, so 197 and
    200 share a config while 197 and 577 do not (the code is the same, the best tile is not)."""
    return next_pow2(max(int(n), 16))
