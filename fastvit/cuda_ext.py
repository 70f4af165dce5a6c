"""Backend ``cuda``: the CUDA C++ extension in ``csrc/`` (pybind11, built with torch + ninja).

The extension is found in this order: a prebuilt ``fastvit._C`` (``pip install`` with nvcc
around, see setup.py), else a JIT build with :func:`torch.utils.cpp_extension.load` into a cache
folder (``$FASTVIT_CUDA_CACHE``, default ``~/.cache/fastvit/cuda/<hash>``), under a file lock,
with a message on stderr while it builds. A failed build or load becomes this backend's reason
(:func:`availability`), never an import error: importing this module needs only torch.

Each op is a ``torch.library`` custom op (``fastvit_cuda::*``) with a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it. The public functions below have the
signatures of :mod:`fastvit.reference`; inputs were validated by :mod:`fastvit.ops`, and the
extension validates again (TORCH_CHECK) because it is also callable directly.

The toolchain helpers (:func:`cuda_home`, :func:`build_options`) are shared with setup.py and
the build test, so the three build the same thing the same way.

Environment: ``FASTVIT_CUDA_CACHE`` (build cache root), ``FASTVIT_CUDA_JIT=0`` (never build at
run time, use only a prebuilt ``fastvit._C``), ``FASTVIT_CSRC`` (source folder), ``CUDA_HOME``,
``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS``; ``FASTVIT_CUDA_PLAIN_GEMM=1`` forces the fallbacks used
when cuBLASLt offers no algorithm for an epilogue (for tests).
"""

import contextlib
import glob
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import threading
from typing import Dict, List, Optional, Tuple

import torch

from . import reference as _ref
from ._autograd import register_reference_backward

__all__ = [
    "patch_embed",
    "attention",
    "layer_norm",
    "linear",
    "mlp",
    "availability",
    "unsupported",
    "cuda_home",
    "build_options",
    "build",
    "MAX_HEAD_DIM",
]

MAX_HEAD_DIM = 128  # csrc/fastvit_cuda.h kMaxHeadDim: the attention tiles are sized for it
DEFAULT_ARCHS = "8.0;9.0"  # what CI compiles when no GPU can be asked for its arch
_ACT_CODE = {None: 0, "gelu": 1, "gelu_tanh": 2}
_SOURCES = ("attention.cu", "layer_norm.cu", "linear.cu", "patch_embed.cu", "bindings.cpp")
_HEADERS = ("fastvit_cuda.h", "common.cuh")


# ------------------------------------------------------------------------------ toolchain
def csrc_dir() -> str:
    """Folder holding the CUDA sources: $FASTVIT_CSRC, else the repository's csrc/ next to the
    package (source checkout, editable install), else the copy a wheel installs as fastvit/_csrc."""
    if os.environ.get("FASTVIT_CSRC"):
        return os.environ["FASTVIT_CSRC"]
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.join(os.path.dirname(here), "csrc")
    return repo if os.path.isdir(repo) else os.path.join(here, "_csrc")


def _is_cuda_root(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and \
        os.path.exists(os.path.join(path, "bin", "nvcc"))


def cuda_home() -> Optional[str]:
    """The CUDA toolkit root, or None.

    ``CUDA_HOME`` / ``CUDA_PATH`` when they hold a toolkit; else the folder of the ``nvcc`` on
    PATH, resolved through symlinks and through wrapper scripts (an ``nvcc`` that execs the real
    one: torch would guess its parent folder, which has no headers), by asking nvcc where it
    lives (``nvcc --dryrun -c`` prints ``_HERE_=<bin folder>``).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_cuda_root(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if _is_cuda_root("/usr/local/cuda") else None
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_cuda_root(root):
        return root
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True, timeout=60)
        m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
        if m and _is_cuda_root(os.path.dirname(m.group(1))):
            return os.path.dirname(m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _nvidia_wheel_dirs() -> List[str]:
    """Roots of the pip ``nvidia-*`` packages (cu13 puts every library under nvidia/cu13)."""
    try:
        import nvidia  # namespace package installed with torch's CUDA wheels
    except ImportError:
        return []
    roots = []
    for base in list(getattr(nvidia, "__path__", [])):
        roots += [os.path.join(base, sub) for sub in ("cu13", "cublas", "cu12")]
    return [r for r in roots if os.path.isdir(r)]


def _find_cublaslt(home: Optional[str]) -> Tuple[List[str], List[str]]:
    """(include dirs, linker flags) for cuBLASLt: the toolkit's when it ships it, else the pip
    wheel's (which has only the versioned ``libcublasLt.so.N``, hence ``-l:``)."""
    cands = ([home] if home else []) + _nvidia_wheel_dirs()
    for root in cands:
        inc = os.path.join(root, "include")
        if not os.path.isfile(os.path.join(inc, "cublasLt.h")):
            continue
        for libdir in (os.path.join(root, "lib64"), os.path.join(root, "lib")):
            libs = sorted(glob.glob(os.path.join(libdir, "libcublasLt.so*")))
            if not libs:
                continue
            plain = os.path.join(libdir, "libcublasLt.so")
            lib = "-lcublasLt" if os.path.exists(plain) else "-l:" + os.path.basename(libs[-1])
            return ([] if root == home else [inc]), [f"-L{libdir}", lib, f"-Wl,-rpath,{libdir}"]
    raise RuntimeError(f"cuBLASLt not found: no include/cublasLt.h with lib*/libcublasLt.so* under {cands}")


def build_options(ptxas_verbose: bool = False) -> Dict[str, List[str]]:
    """Compiler / linker flags shared by setup.py, the JIT build and the build test."""
    home = cuda_home()
    inc, ldflags = _find_cublaslt(home)
    nvcc = ["-O3", "-lineinfo"]  # no -std: torch picks the standard its headers need (C++20 since 2.10)
    if ptxas_verbose:
        nvcc.append("-Xptxas=-v")
    return {
        "extra_cflags": ["-O3"],
        "extra_cuda_cflags": nvcc,
        "extra_include_paths": inc + [csrc_dir()],
        "extra_ldflags": ldflags,
    }


def sources() -> List[str]:
    return [os.path.join(csrc_dir(), f) for f in _SOURCES]


@contextlib.contextmanager
def _toolchain_env(archs: Optional[str]):
    """Point torch.utils.cpp_extension at the right toolkit and arch list for one build."""
    from torch.utils import cpp_extension

    home = cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit: nvcc is not on PATH and CUDA_HOME is not set")
    saved = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS")}
    saved_home = cpp_extension.CUDA_HOME
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home  # read at import time; torch may have guessed wrong already
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS  # nothing to detect the arch from
    # Each nvcc job needs ~1-2 GB and a core; a 2-core machine must not run 4 of them.
    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, (os.cpu_count() or 2)))))
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _source_hash(archs: str, opts: Dict[str, List[str]]) -> str:
    h = hashlib.sha256()
    for f in _SOURCES + _HEADERS:
        with open(os.path.join(csrc_dir(), f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    h.update(repr((archs, sorted(opts.items()), torch.__version__, torch.version.cuda, sys.version_info[:2])).encode())
    return h.hexdigest()[:16]


def build(build_dir: Optional[str] = None, archs: Optional[str] = None, verbose: bool = False,
          ptxas_verbose: bool = False):
    """JIT-build (or reuse) the extension and import it.

    Args:
        build_dir: where ninja builds; default a per-source-hash folder of the cache.
        archs: TORCH_CUDA_ARCH_LIST for this build (default: the visible GPU, else 8.0;9.0).
        verbose: show the compiler output (with ``ptxas_verbose`` it includes the ptxas
            register / spill report of every kernel).

    Returns:
        The extension module.
    """
    from torch.utils import cpp_extension

    opts = build_options(ptxas_verbose)
    with _toolchain_env(archs):
        arch_key = os.environ.get("TORCH_CUDA_ARCH_LIST") or "+".join(
            f"{a}.{b}" for a, b in sorted({torch.cuda.get_device_capability(i)
                                           for i in range(torch.cuda.device_count())}))
        tag = _source_hash(arch_key, opts)
        if build_dir is None:
            root = os.environ.get("FASTVIT_CUDA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastvit",
                                                                        "cuda")
            build_dir = os.path.join(root, tag)
        os.makedirs(build_dir, exist_ok=True)
        name = f"fastvit_cuda_{tag}"
        with _file_lock(os.path.join(build_dir, "fastvit.lock")):
            if not glob.glob(os.path.join(build_dir, name + "*.so")):
                print(f"fastvit: building the CUDA extension for sm {arch_key} in {build_dir} (first use only, "
                      "a few minutes)...", file=sys.stderr, flush=True)
            return cpp_extension.load(name=name, sources=sources(), build_directory=build_dir, verbose=verbose,
                                      with_cuda=True, **opts)


@contextlib.contextmanager
def _file_lock(path: str):
    """Inter-process lock around a build (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own FileBaton in load() still serialises builds
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ loading
_lock = threading.Lock()
_ext = None
_ext_error: Optional[str] = None


def _load_ext():
    """The extension module, loaded once; raises RuntimeError with the reason when it cannot be."""
    global _ext, _ext_error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is None and _ext_error is None:
            try:
                try:
                    _ext = importlib.import_module("fastvit._C")  # built by setup.py
                except ImportError as prebuilt:
                    if os.environ.get("FASTVIT_CUDA_JIT", "1") == "0":
                        raise RuntimeError(f"no prebuilt fastvit._C ({prebuilt}) and FASTVIT_CUDA_JIT=0")
                    if not all(os.path.isfile(s) for s in sources()):
                        raise RuntimeError(f"no prebuilt fastvit._C ({prebuilt}) and no CUDA sources in {csrc_dir()}")
                    _ext = build()
            except Exception as e:  # any build / load failure is the backend's reason
                msg = str(e).strip().splitlines()
                _ext_error = f"CUDA extension unavailable: {type(e).__name__}: " + (msg[-1] if msg else "")
        if _ext is None:
            raise RuntimeError(_ext_error)
    return _ext


def availability(device: torch.device) -> Optional[str]:
    """None when the extension is loaded (building it on first call), else why not.

    backends.py calls this only for CUDA devices on sm80+, so CPU machines never build."""
    try:
        _load_ext()
    except RuntimeError as e:
        return str(e)
    return None


def unsupported(op: str, **info) -> Optional[str]:
    """Why this backend declines ``op`` for these shapes (None when it runs it)."""
    if op == "attention_probs":
        return "attention_probs has no CUDA kernel (it materialises N x N probabilities; the torch backend does it)"
    if op == "attention" and info.get("head_dim", 0) > MAX_HEAD_DIM:
        return f"attention head dim {info['head_dim']} > {MAX_HEAD_DIM} (the CUDA attention kernel's tile limit)"
    return None


# ------------------------------------------------------------------------------ custom ops
# Fake implementations give shapes / dtypes only: they let torch.compile trace without running.
@torch.library.custom_op("fastvit_cuda::patch_embed", mutates_args=())
def _patch_embed_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    pos_embed: Optional[torch.Tensor], prefix: Optional[torch.Tensor], pad: bool) -> torch.Tensor:
    return _load_ext().patch_embed(x, weight, bias, pos_embed, prefix, pad)


@_patch_embed_op.register_fake
def _(x, weight, bias, pos_embed, prefix, pad):
    ph, pw = weight.shape[-2:]
    gh, gw = -(-x.shape[2] // ph), -(-x.shape[3] // pw)
    T = 0 if prefix is None else prefix.shape[0]
    return weight.new_empty((x.shape[0], T + gh * gw, weight.shape[0]))


@torch.library.custom_op("fastvit_cuda::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _load_ext().attention(q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale):
    B, H, N, d = q.shape
    return q.new_empty((B, N, H, d))


@torch.library.custom_op("fastvit_cuda::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float) -> torch.Tensor:
    return _load_ext().layer_norm(x, weight, bias, eps)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastvit_cuda::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: int,
               gamma: Optional[torch.Tensor], residual: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
               ln_bias: Optional[torch.Tensor], ln_eps: float) -> torch.Tensor:
    return _load_ext().linear(x, weight, bias, act, gamma, residual, ln_weight, ln_bias, ln_eps)


@_linear_op.register_fake
def _(x, weight, bias, act, gamma, residual, ln_weight, ln_bias, ln_eps):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


@torch.library.custom_op("fastvit_cuda::mlp", mutates_args=())
def _mlp_op(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
            fc2_bias: Optional[torch.Tensor], act: int, gamma: Optional[torch.Tensor],
            residual: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
            ln_eps: float) -> torch.Tensor:
    return _load_ext().mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual, ln_weight, ln_bias,
                           ln_eps)


@_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gamma, residual, ln_weight, ln_bias, ln_eps):
    return x.new_empty(tuple(x.shape[:-1]) + (fc2_weight.shape[0],))


_ACT_NAME = {code: name for name, code in _ACT_CODE.items()}

# Gradients: recompute through the PyTorch reference (the ops' own argument order and layout;
# attention returns (B, N, H, d) memory, act travels as an int code).
register_reference_backward(_patch_embed_op, _ref.patch_embed, (0, 1, 2, 3, 4))
register_reference_backward(_attention_op, lambda q, k, v, s: _ref.attention(q, k, v, s).transpose(1, 2), (0, 1, 2))
register_reference_backward(_layer_norm_op, _ref.layer_norm, (0, 1, 2))
register_reference_backward(
    _linear_op, lambda x, w, b, act, *rest: _ref.linear(x, w, b, _ACT_NAME[act], *rest), (0, 1, 2, 4, 5, 6, 7))
register_reference_backward(
    _mlp_op, lambda x, w1, b1, w2, b2, act, *rest: _ref.mlp(x, w1, b1, w2, b2, _ACT_NAME[act], *rest),
    (0, 1, 2, 3, 4, 6, 7, 8, 9))


# ------------------------------------------------------------------------------ backend API
def _act(act: Optional[str]) -> int:
    if act not in _ACT_CODE:
        raise ValueError(f"act: expected one of {tuple(_ACT_CODE)}, got {act!r}")
    return _ACT_CODE[act]


def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                pos_embed: Optional[torch.Tensor] = None, prefix: Optional[torch.Tensor] = None,
                pad: bool = False) -> torch.Tensor:
    """Image (B, C, H, W) -> tokens (B, T + gh * gw, D) in ``weight.dtype``; see
    :func:`fastvit.reference.patch_embed`. One im2col + init pass, one cuBLASLt GEMM."""
    if prefix is not None and prefix.shape[0] == 0:
        prefix = None
    return _patch_embed_op(x, weight, bias, pos_embed, prefix, bool(pad))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """q (B, H, N, d), k / v (B, H, N_kv, d), any strides with a unit-stride d.

    Returns (B, H, N, d) as a transposed view of a (B, N, H, d) buffer, so
    ``out.transpose(1, 2).reshape(B, N, H * d)`` is free."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _attention_op(q, k, v, float(scale)).transpose(1, 2)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm of x (..., D) over D; weight, bias (D,) or None. Returns (..., D) contiguous."""
    return _layer_norm_op(x, weight, bias, float(eps))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, act: Optional[str] = None,
           gamma: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
           ln_weight: Optional[torch.Tensor] = None, ln_bias: Optional[torch.Tensor] = None,
           ln_eps: float = 1e-6) -> torch.Tensor:
    """``act(LN?(x) @ weight.T + bias) * gamma + residual``: x (..., K), weight (N, K) -> (..., N)."""
    return _linear_op(x, weight, bias, _act(act), gamma, residual, ln_weight, ln_bias, float(ln_eps))


def mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
        fc2_bias: Optional[torch.Tensor], act: Optional[str] = "gelu", gamma: Optional[torch.Tensor] = None,
        residual: Optional[torch.Tensor] = None, ln_weight: Optional[torch.Tensor] = None,
        ln_bias: Optional[torch.Tensor] = None, ln_eps: float = 1e-6) -> torch.Tensor:
    """``residual + gamma * fc2(act(fc1(LN?(x))))``: x (..., D) -> (..., D_out), hidden in x's dtype."""
    return _mlp_op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, _act(act), gamma, residual, ln_weight, ln_bias,
                   float(ln_eps))
