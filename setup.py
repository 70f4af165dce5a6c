"""setup.py: the pure-Python install comes from pyproject.toml; this file only adds the optional
CUDA extension ``fastvit._C``, compiled from csrc/ (the cuda backend, installed as fastvit.cuda).

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


def main():
    found = cuda_extension()
    if found is None:
        setup()
        return
    from torch.utils.cpp_extension import BuildExtension

    tool, ext = found
    with tool.toolchain_env():  # BuildExtension finds nvcc through it while setup() compiles
        setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})


if __name__ == "__main__":
    main()
