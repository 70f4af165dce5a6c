"""The plan key of an op call's tensor arguments: what :mod:`fastvit.ops` looks its cached plans up by.

``signature(*args)`` returns a hashable value that differs whenever any argument's shape,
strides, dtype, device (or None-ness) differs, or None when the call must not be cached (an
argument that is neither None nor a plain ``torch.Tensor`` / ``nn.Parameter``: subclasses such
as FakeTensor, non-tensors: those are validated on every call).

Two implementations with the same meaning:

* ``fastvit._signature`` (C++, ``fastvit/_signature.cpp``), built by ``pip install`` (setup.py)
  when a C++ compiler and torch's headers are there: it copies the facts out of the TensorImpl
  into one bytes object (~0.15 us for three tensors on the 2-core dev VM, against ~2 us of Python
  attribute reads, each of which creates a torch.Size / torch.device object);
* a Python fallback (the same facts as a tuple) when the module is missing, was built against
  another torch (its THPVariable layout may differ), or fails the self-check below.

:data:`IMPL` says which one runs and why (``fastvit info`` prints it).
"""

from __future__ import annotations

import struct
from typing import Optional

import torch

__all__ = ["signature", "python_signature", "IMPL", "load_native"]

_TENSOR, _PARAMETER, _STRIDED = torch.Tensor, torch.nn.Parameter, torch.strided


def python_signature(*args) -> Optional[tuple]:
    """The Python implementation: per argument None or (shape, strides, dtype, device)."""
    out = []
    try:
        for t in args:
            if t is None:
                out.append(None)
            elif (t.__class__ is _TENSOR or t.__class__ is _PARAMETER) and t.layout is _STRIDED:
                out.append((t.shape, t.stride(), t.dtype, t.device))  # stride(): raises for a nested tensor
            else:
                return None
    except RuntimeError:
        return None
    return tuple(out)


def _decode(sig: bytes) -> list:
    """The C++ signature's words back as per-argument (sizes, strides, dim) (for the self-check)."""
    words = struct.unpack(f"<{len(sig) // 8}q", sig)
    out, i = [], 0
    while i < len(words):
        head = words[i]
        if head == -1:
            out.append(None)
            i += 1
            continue
        dim = head & 0xFF
        out.append((tuple(words[i + 1:i + 1 + dim]), tuple(words[i + 1 + dim:i + 1 + 2 * dim])))
        i += 1 + 2 * dim
    return out


def load_native():
    """(signature function, None) from fastvit._signature, or (None, why not)."""
    try:
        from ._signature import TORCH_VERSION, signature as native
    except ImportError as e:
        return None, f"fastvit._signature not built ({e}); reinstall with a C++ compiler (pip install -e .)"
    built = tuple(TORCH_VERSION)
    running = torch.__version__.split("+")[0].split(".")[:3]
    try:
        running = tuple(int("".join(c for c in p if c.isdigit()) or -1) for p in running)
    except ValueError:
        running = ()
    if built != running:
        return None, f"fastvit._signature was built for torch {built}, this is torch {torch.__version__}: rebuild it"
    # self-check: a strided view, a Parameter, None and a non-tensor read back as Python reads them
    base = torch.empty(3, 5, dtype=torch.float16)
    view, param = base[:, 1:4].t(), torch.nn.Parameter(torch.empty(2))
    sig = native(view, None, param)
    got = _decode(sig) if isinstance(sig, bytes) else None
    want = [(tuple(view.shape), view.stride()), None, (tuple(param.shape), param.stride())]
    if got != want or native(view, 1.0) is not None or native(view) == native(view.float()):
        return None, f"fastvit._signature failed its self-check (read {got}, expected {want}): rebuild it"
    return native, None


_native, _why = load_native()
signature = _native or python_signature
IMPL = "c++ (fastvit._signature)" if _native else f"python ({_why})"
