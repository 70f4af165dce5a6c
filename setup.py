"""setup.py: the pure-Python install comes from pyproject.toml; this file only adds the optional
CUDA extension (csrc/) when nvcc / CUDA_HOME is found or FASTVIT_BUILD_CUDA=1, and skips it with
FASTVIT_BUILD_CUDA=0. Without nvcc the install is pure Python and the `cuda` backend reports why."""

import os
import shutil

from setuptools import setup


def _cuda_extension():
    flag = os.environ.get("FASTVIT_BUILD_CUDA")
    if flag == "0":
        return [], {}
    if flag != "1" and not (os.environ.get("CUDA_HOME") or shutil.which("nvcc")):
        return [], {}
    sources = sorted(f"csrc/{f}" for f in os.listdir("csrc") if f.endswith((".cu", ".cpp"))) if os.path.isdir("csrc") else []
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except Exception:
        if flag == "1":
            raise
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, (os.cpu_count() or 2) // 2))))
    ext = CUDAExtension("fastvit._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
