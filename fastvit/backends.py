"""Which backends exist here, why the others do not, and which one runs an op.

Selection order (DESIGN.md section 3): explicit ``backend=`` argument > per-model setting >
:func:`set_backend` > ``FASTVIT_BACKEND`` > auto. Auto tries ``triton`` (CUDA tensor on sm80+,
triton importable), then ``cuda`` (the compiled extension), then ``torch``. A backend that is
skipped records *why*; an explicitly requested backend that cannot run raises with its reason,
while auto never raises and warns once per (backend, reason) when a CUDA tensor falls back.

Backends are imported lazily: importing :mod:`fastvit` never imports triton or the extension.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "set_backend",
    "get_backend",
    "resolve",
    "interpret_mode",
]

BACKENDS = ("triton", "cuda", "torch")
_AUTO = "auto"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this op here; the message says why."""


def interpret_mode() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class _Backend:
    name: str
    module: str  # implementation module, imported on first use
    device_reason: Callable[[torch.device], Optional[str]]
    _mod: object = None
    _load_error: Optional[str] = None
    _loaded: bool = False

    def load(self):
        """Import the implementation once; returns (module or None, reason or None)."""
        if not self._loaded:
            with _lock:
                if not self._loaded:
                    try:
                        self._mod = importlib.import_module(self.module)
                    except Exception as e:  # an import failure is a reason, never a crash
                        self._load_error = f"cannot import {self.module}: {type(e).__name__}: {e}"
                    self._loaded = True
        return self._mod, self._load_error

    def reason(self, device: torch.device) -> Optional[str]:
        """Why this backend cannot run on ``device`` (None when it can)."""
        r = self.device_reason(device)
        if r is not None:
            return r
        mod, err = self.load()
        if mod is None:
            return err
        avail = getattr(mod, "availability", None)
        return avail(device) if avail is not None else None


def _cuda_capability_reason(device: torch.device, need: Tuple[int, int], what: str) -> Optional[str]:
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    cap = torch.cuda.get_device_capability(device)
    if cap < need:
        return f"{what} needs compute capability >= {need[0]}.{need[1]}, device has {cap[0]}.{cap[1]}"
    return None


def _triton_device_reason(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        return _cuda_capability_reason(device, (8, 0), "triton backend")
    if device.type == "cpu":
        if interpret_mode():
            return None
        return "CPU tensors run on triton only in the interpreter (TRITON_INTERPRET=1)"
    return f"triton backend does not run on device type {device.type!r}"


def _cuda_device_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"cuda backend needs a CUDA tensor, got device {device.type!r}"
    return _cuda_capability_reason(device, (8, 0), "cuda backend")


def _torch_device_reason(device: torch.device) -> Optional[str]:
    return None


_lock = threading.RLock()
_REGISTRY: Dict[str, _Backend] = {
    "triton": _Backend("triton", "fastvit.kernels", _triton_device_reason),
    "cuda": _Backend("cuda", "fastvit.cuda_ext", _cuda_device_reason),
    "torch": _Backend("torch", "fastvit.reference", _torch_device_reason),
}
_global_choice: Optional[str] = None
_warned: set = set()


def _check_name(name: Optional[str], arg: str) -> Optional[str]:
    if name is None:
        return None
    if not isinstance(name, str) or name.lower() not in BACKENDS + (_AUTO,):
        raise ValueError(f"{arg}: expected one of {BACKENDS + (_AUTO,)} or None, got {name!r}")
    name = name.lower()
    return None if name == _AUTO else name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide backend ('triton', 'cuda', 'torch', 'auto' or None = auto)."""
    global _global_choice
    _global_choice = _check_name(name, "backend")


def get_backend() -> Optional[str]:
    """The process-wide choice: :func:`set_backend`, else ``FASTVIT_BACKEND``, else None (auto)."""
    if _global_choice is not None:
        return _global_choice
    return _check_name(os.environ.get("FASTVIT_BACKEND") or None, "FASTVIT_BACKEND")


def available_backends(device: Optional[torch.device] = None) -> Dict[str, Tuple[bool, Optional[str]]]:
    """name -> (usable, reason it is not) for ``device`` (default: cuda if present, else cpu)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    out = {}
    for name, b in _REGISTRY.items():
        r = b.reason(device)
        out[name] = (r is None, r)
    return out


def _op_reason(b: _Backend, op: str, kwargs: dict) -> Optional[str]:
    mod, _ = b.load()
    check = getattr(mod, "unsupported", None)
    if check is None:
        return None
    return check(op, **kwargs)


def resolve(op: str, device: torch.device, choice: Optional[str] = None, **shape_info):
    """Return the implementation module that runs ``op`` on ``device``.

    ``choice`` is the explicit or per-model backend (None falls through to the global choice
    and then auto). ``shape_info`` is passed to a backend's optional ``unsupported(op, ...)``
    so it can decline shapes it does not handle.
    """
    choice = _check_name(choice, "backend") or get_backend()
    if choice is not None:
        b = _REGISTRY[choice]
        r = b.reason(device) or _op_reason(b, op, shape_info)
        if r is not None:
            raise BackendUnavailable(f"backend {choice!r} cannot run {op} on {device}: {r}")
        return b.load()[0]
    for name in BACKENDS:
        b = _REGISTRY[name]
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, never chosen automatically
        if name == "torch":
            return b.load()[0]
        r = b.reason(device) or _op_reason(b, op, shape_info)
        if r is None:
            return b.load()[0]
        if device.type == "cuda" and (name, r) not in _warned:
            _warned.add((name, r))
            warnings.warn(f"fastvit: backend {name!r} skipped for {op}: {r}", RuntimeWarning, stacklevel=3)
    raise AssertionError("unreachable: torch backend always runs")
