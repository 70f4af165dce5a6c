"""setup.py: the pure-Python install comes from pyproject.toml; this file only adds two optional
compiled modules:

* ``fastvit._signature`` (fastvit/_signature.cpp, C++ for the CPU, ~30 s to compile here): the plan
  key of an op call read in C++, the host fast path of fastvit.ops (fastvit/signature.py). Built
  whenever torch and a C++ compiler are there; ``FASTVIT_BUILD_EXT=0`` skips it, ``=1`` fails the
  install if it cannot be built (otherwise a failed build leaves the Python fallback and a note).
* ``fastvit._C``, the CUDA extension compiled from csrc/ (the cuda backend, installed as fastvit.cuda).

When: ``FASTVIT_BUILD_CUDA=1`` builds it (and fails the install if it cannot), ``=0`` skips it,
unset builds it when a CUDA toolkit is found (nvcc on PATH or CUDA_HOME) and torch is a CUDA
build. Without it the install is pure Python: the cuda backend then JIT-builds the same sources
on first use on a GPU, or reports why it cannot.

How: csrc/build.py, loaded from its file (the package is not importable while it installs; that
module imports only the standard library and torch), gives the toolchain, the flags and the
extension: the same ones the backend's JIT build and tests/test_cuda_backend.py use.
``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0`` here (not the local GPU: the install may be
copied elsewhere); ``MAX_JOBS`` to the core count capped at 4 (each nvcc job wants a core and
1-2 GB).

Running this file installs; importing it (the tests do) only defines the helpers.
"""

import importlib.util
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_PY = os.path.join(HERE, "csrc", "build.py")


def load_build_module():
    """csrc/build.py as a module, loaded by path without importing fastvit."""
    spec = importlib.util.spec_from_file_location("_fastvit_cuda_build", BUILD_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_extension():
    """(build module, setuptools extension) when the extension is to be built, else None.

    Raises when ``FASTVIT_BUILD_CUDA=1`` and it cannot be built; otherwise says why not on stderr."""
    flag = os.environ.get("FASTVIT_BUILD_CUDA")
    if flag == "0":
        return None
    if flag != "1" and not (os.environ.get("CUDA_HOME") or shutil.which("nvcc")):
        return None
    try:
        import torch

        if torch.version.cuda is None:
            raise RuntimeError(f"torch {torch.__version__} is not a CUDA build")
        tool = load_build_module()
        ext = tool.cuda_extension(HERE, os.environ.get("TORCH_CUDA_ARCH_LIST") or tool.DEFAULT_ARCHS)
    except Exception as e:
        if flag == "1":
            raise
        print(f"fastvit: not building the CUDA extension ({type(e).__name__}: {e}); the cuda backend will JIT-build "
              "it on first use", file=sys.stderr)
        return None
    return tool, ext


SIGNATURE_EXT = "fastvit._signature"


def signature_extension():
    """The setuptools extension of fastvit._signature, or None (no torch / FASTVIT_BUILD_EXT=0)."""
    flag = os.environ.get("FASTVIT_BUILD_EXT")
    if flag == "0":
        return None
    try:
        from torch.utils.cpp_extension import CppExtension
    except Exception as e:
        if flag == "1":
            raise
        print(f"fastvit: not building {SIGNATURE_EXT} ({type(e).__name__}: {e}); ops use the Python signature",
              file=sys.stderr)
        return None
    return CppExtension(SIGNATURE_EXT, [os.path.join("fastvit", "_signature.cpp")], extra_compile_args=["-O2", "-g0"])


def build_ext_class():
    """torch's BuildExtension, with fastvit._signature optional unless FASTVIT_BUILD_EXT=1."""
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                if ext.name != SIGNATURE_EXT or os.environ.get("FASTVIT_BUILD_EXT") == "1":
                    raise
                print(f"fastvit: building {SIGNATURE_EXT} failed ({type(e).__name__}: {e}); ops use the Python "
                      "signature (slower host path)", file=sys.stderr)

    return Build


def main():
    exts = [e for e in [signature_extension()] if e is not None]
    found = cuda_extension()
    if found is None:
        if exts:
            setup(ext_modules=exts, cmdclass={"build_ext": build_ext_class()})
        else:
            setup()
        return
    tool, ext = found
    with tool.toolchain_env():  # BuildExtension finds nvcc through it while setup() compiles
        setup(ext_modules=exts + [ext], cmdclass={"build_ext": build_ext_class()})


if __name__ == "__main__":
    main()
