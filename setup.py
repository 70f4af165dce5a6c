"""setup.py: the pure-Python install comes from pyproject.toml; this file only adds the optional
CUDA extension (csrc/ -> fastvit._C).

When: ``FASTVIT_BUILD_CUDA=1`` builds it (and fails the install if it cannot), ``=0`` skips it,
unset builds it when a CUDA toolkit is found (nvcc on PATH or CUDA_HOME) and torch is a CUDA
build. Without it the install is pure Python: the ``cuda`` backend then JIT-builds the same
sources on first use on a GPU (fastvit/cuda_ext.py), or reports why it cannot.

The toolchain lookup and the flags come from fastvit/cuda_ext.py (loaded from its file, the
package is not importable yet), so setup.py, the JIT build and the CI build test agree.
``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0``; ``MAX_JOBS`` defaults to the core count capped
at 4 (each nvcc job wants a core and 1-2 GB).
"""

import importlib.util
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    flag = os.environ.get("FASTVIT_BUILD_CUDA")
    if flag == "0":
        return [], {}
    if flag != "1" and not (os.environ.get("CUDA_HOME") or shutil.which("nvcc")):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension

        if torch.version.cuda is None:
            raise RuntimeError(f"torch {torch.__version__} is not a CUDA build")
        spec = importlib.util.spec_from_file_location("_fastvit_cuda_build", os.path.join(HERE, "fastvit", "cuda_ext.py"))
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        home = tool.cuda_home()
        if home is None:
            raise RuntimeError("no CUDA toolkit found (nvcc / CUDA_HOME)")
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home  # torch guessed at import time, possibly from a wrapper script
        opts = tool.build_options()
    except Exception as e:
        if flag == "1":
            raise
        print(f"fastvit: not building the CUDA extension ({type(e).__name__}: {e}); the cuda backend will JIT-build it")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", tool.DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 2))))
    ext = cpp_extension.CUDAExtension(
        "fastvit._C",
        [os.path.relpath(s, HERE) for s in tool.sources()],
        include_dirs=opts["extra_include_paths"],
        extra_compile_args={"cxx": opts["extra_cflags"], "nvcc": opts["extra_cuda_cflags"]},
        extra_link_args=opts["extra_ldflags"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
