"""How the cuda backend's extension is built: toolchain lookup, flags, and the two ways to build.

The extension (``fastvit._C`` when ``pip install`` prebuilds it, ``fastvit_cuda_<tag>`` when
built on first use) is compiled from the sources next to this file. Two builders use it:

* setup.py loads this file by path (the package is not importable while it installs) and asks
  :func:`cuda_extension` for the setuptools ``CUDAExtension``;
* :func:`build` JIT-builds with :func:`torch.utils.cpp_extension.load` into a cache folder keyed
  by a hash of the sources and flags (``fastvit.cuda`` calls it on first use on a GPU;
  ``python csrc/build.py`` does the same from a shell).

Both take the same flags from :func:`build_options`, so a prebuilt and a JIT-built extension
are the same program. This module therefore imports only the standard library and torch
(``torch.utils.cpp_extension``, which pulls setuptools in, only inside the functions that build).

Environment: ``FASTVIT_CSRC`` (source folder, default this file's folder: the repository's
csrc/, an editable install's, or a wheel's ``fastvit/cuda``), ``FASTVIT_CUDA_CACHE`` (JIT cache
root, default ``~/.cache/fastvit/cuda``), ``CUDA_HOME`` / ``CUDA_PATH`` (toolkit root, else
found from ``nvcc`` on PATH), ``TORCH_CUDA_ARCH_LIST`` (archs, e.g. ``8.0;9.0``), ``MAX_JOBS``
(parallel compiler jobs, default the core count capped at 4).
"""

import argparse
import contextlib
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import torch

__all__ = [
    "EXTENSION_NAME", "DEFAULT_ARCHS", "SOURCES", "HEADERS", "source_dir", "sources", "sources_digest",
    "cuda_home", "resolve_archs", "arch_flags", "build_options", "toolchain_env", "cuda_extension", "build",
]

EXTENSION_NAME = "fastvit._C"  # the prebuilt module (setup.py); JIT builds are named per hash
# What is compiled when neither TORCH_CUDA_ARCH_LIST nor a GPU says otherwise: A100 and H100
# SASS (sm_80 SASS also runs on sm_86 / sm_89).
DEFAULT_ARCHS = "8.0;9.0"
SOURCES = ("attention.cu", "layer_norm.cu", "linear.cu", "patch_embed.cu", "bindings.cpp")
HEADERS = ("fastvit_cuda.h", "common.cuh")


def source_dir() -> str:
    """Folder of the CUDA sources: ``$FASTVIT_CSRC``, else the folder of this file."""
    return os.environ.get("FASTVIT_CSRC") or os.path.dirname(os.path.abspath(__file__))


def sources() -> List[str]:
    """Absolute paths of the files compiled into the extension."""
    return [os.path.join(source_dir(), f) for f in SOURCES]


def sources_digest() -> str:
    """16 hex digits of a hash of the sources and headers.

    Compiled into the extension (``SOURCES_DIGEST``) so the backend can tell a prebuilt
    ``fastvit._C`` built from other sources (an editable install after an edit or a pull)."""
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        with open(os.path.join(source_dir(), f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ toolchain
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


def resolve_archs(archs: Optional[str] = None) -> str:
    """The arch list to compile for: ``archs``, else ``$TORCH_CUDA_ARCH_LIST``, else the visible
    GPUs' compute capabilities, else :data:`DEFAULT_ARCHS`."""
    if archs:
        return archs
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_ARCHS


def arch_flags(archs: str) -> List[str]:
    """nvcc ``-gencode`` flags for an arch list such as ``8.0;9.0`` (also ``9.0a``, ``9.0+PTX``).

    The flags are explicit rather than left to torch (which reads TORCH_CUDA_ARCH_LIST when the
    flags name no arch), so setup.py and the JIT build compile for exactly the same archs and
    the arch list is part of the JIT cache key."""
    flags = []
    for item in re.split(r"[;,\s]+", archs.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", item)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST / archs: expected compute capabilities such as '8.0;9.0', "
                             f"got {archs!r}")
        num = m.group(1) + m.group(2) + m.group(3)
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def build_options(ptxas_verbose: bool = False, archs: Optional[str] = None) -> Dict[str, List[str]]:
    """Compiler / linker flags of every build (setup.py, the JIT build, the build test).

    Args:
        ptxas_verbose: add ``-Xptxas=-v`` (each kernel's registers / spills in the compiler output).
        archs: arch list, resolved by :func:`resolve_archs`.

    Returns:
        The keyword arguments of :func:`torch.utils.cpp_extension.load` (``extra_cflags``,
        ``extra_cuda_cflags``, ``extra_include_paths``, ``extra_ldflags``).
    """
    inc, ldflags = _find_cublaslt(cuda_home())
    nvcc = ["-O3", "-lineinfo"] + arch_flags(resolve_archs(archs))  # no -std: torch picks what its headers need
    if ptxas_verbose:
        nvcc.append("-Xptxas=-v")
    return {
        "extra_cflags": ["-O3", f"-DFASTVIT_SOURCES_DIGEST=0x{sources_digest()}ULL"],
        "extra_cuda_cflags": nvcc,
        "extra_include_paths": inc + [source_dir()],
        "extra_ldflags": ldflags,
    }


@contextlib.contextmanager
def toolchain_env() -> Iterator[str]:
    """Point torch.utils.cpp_extension at the toolkit of :func:`cuda_home` (and cap ``MAX_JOBS``)
    while a build runs; yields the toolkit root."""
    from torch.utils import cpp_extension

    home = cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit: nvcc is not on PATH and CUDA_HOME is not set")
    saved = {k: os.environ.get(k) for k in ("CUDA_HOME", "MAX_JOBS")}
    saved_home = cpp_extension.CUDA_HOME
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home  # read at import time; torch may have guessed wrong already
    # Each nvcc job needs ~1-2 GB and a core; a 2-core machine must not run 4 of them.
    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 2))))
    try:
        yield home
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------ builders
def cuda_extension(root: Optional[str] = None, archs: Optional[str] = None):
    """The setuptools ``CUDAExtension`` :data:`EXTENSION_NAME` (for setup.py).

    Args:
        root: make the source paths relative to this folder (setuptools wants them relative to
            setup.py's folder); absolute when None.
        archs: arch list, resolved by :func:`resolve_archs`.

    Raises RuntimeError when there is no toolkit or no cuBLASLt. Run setup() inside
    :func:`toolchain_env`: the compiler is found through it at build time.
    """
    from torch.utils import cpp_extension

    opts = build_options(archs=archs)
    srcs = [os.path.relpath(s, root) for s in sources()] if root else sources()
    with toolchain_env():
        return cpp_extension.CUDAExtension(
            EXTENSION_NAME, srcs, include_dirs=opts["extra_include_paths"],
            extra_compile_args={"cxx": opts["extra_cflags"], "nvcc": opts["extra_cuda_cflags"]},
            extra_link_args=opts["extra_ldflags"])


def _build_tag(opts: Dict[str, List[str]]) -> str:
    """Cache key of a JIT build: the flags (which carry the sources digest and the archs) and
    everything the binary depends on outside them."""
    key = repr((sorted(opts.items()), torch.__version__, torch.version.cuda, sys.version_info[:2]))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
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


def build(build_dir: Optional[str] = None, archs: Optional[str] = None, verbose: bool = False,
          ptxas_verbose: bool = False):
    """JIT-build (or reuse) the extension and import it.

    Args:
        build_dir: where ninja builds; default ``<cache root>/<tag>``, the tag hashing the
            sources, flags, archs and torch / CUDA / Python versions.
        archs: arch list, resolved by :func:`resolve_archs`.
        verbose: show the compiler output (with ``ptxas_verbose`` it includes the ptxas
            register / spill report of every kernel).
        ptxas_verbose: compile with ``-Xptxas=-v``.

    Returns:
        The extension module (``fastvit_cuda_<tag>``).
    """
    from torch.utils import cpp_extension

    archs = resolve_archs(archs)
    opts = build_options(ptxas_verbose, archs)
    tag = _build_tag(opts)
    if build_dir is None:
        root = os.environ.get("FASTVIT_CUDA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastvit",
                                                                    "cuda")
        build_dir = os.path.join(root, tag)
    name = f"fastvit_cuda_{tag}"
    with toolchain_env():  # first: no toolkit leaves no empty cache folder behind
        os.makedirs(build_dir, exist_ok=True)
        with _file_lock(os.path.join(build_dir, "fastvit.lock")):
            if not glob.glob(os.path.join(build_dir, name + "*.so")):
                print(f"fastvit: building the CUDA extension for sm {archs} in {build_dir} (first use only, a few "
                      "minutes)...", file=sys.stderr, flush=True)
            return cpp_extension.load(name=name, sources=sources(), build_directory=build_dir, verbose=verbose,
                                      with_cuda=True, **opts)


def main(argv: Optional[List[str]] = None) -> None:
    """``python csrc/build.py``: the JIT build from a shell (fills the cache fastvit.cuda reads)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--build-dir", help="build folder (default: the cache folder of these sources and flags)")
    p.add_argument("--archs", help=f"arch list (default: TORCH_CUDA_ARCH_LIST, the GPUs, else {DEFAULT_ARCHS})")
    p.add_argument("--verbose", action="store_true", help="show the compiler output")
    p.add_argument("--ptxas-verbose", action="store_true", help="compile with -Xptxas=-v")
    a = p.parse_args(argv)
    mod = build(a.build_dir, a.archs, a.verbose, a.ptxas_verbose)
    print("built", mod.__file__)


if __name__ == "__main__":
    main()
