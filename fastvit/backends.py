"""Which backends exist, why the others cannot run, and which one runs an op.

A backend is a module with one face (DESIGN.md section 2): ``LIMITS`` (a
:class:`fastvit.facts.BackendLimits`), ``available()`` (a runtime reason such as a failed
import or extension build, or None) and one function per op with the op's signature; optionally
``<op>_for(*args)``, the op's function bound to the call signature of ``args`` (what the op layer
caches per signature: reads strides, flags, configs once; the torch and triton backends have
them for their hot ops). This file
knows each backend only by its name and module path, in priority order; every reason comes from
:func:`fastvit.facts.not_supported_reasons` over the backend's own data.

Selection order (DESIGN.md section 3): explicit ``backend=`` argument > per-model setting >
:func:`set_backend` > ``FASTVIT_BACKEND`` > auto. Auto tries ``triton``, then ``cuda``, then
``torch`` (CPU tensors go straight to ``torch``: the interpreter is for tests). An explicitly
requested backend that cannot run raises :class:`BackendUnavailable` with its reasons; auto
never raises and warns once per (backend, reason) when a CUDA tensor falls back.

``FASTVIT_BACKEND`` is read when a choice is first needed and again after :func:`set_backend`
or :func:`reset`; the op layer caches resolved plans, and both calls clear them.

Backends are imported lazily: importing :mod:`fastvit` never imports triton or the extension.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .facts import BackendLimits, not_supported_reasons

__all__ = [
    "BACKENDS", "BackendUnavailable", "available_backends", "set_backend", "get_backend", "resolve", "module",
    "limits", "reasons", "reset", "on_reset",
]

# The priority list: the only place a backend is named outside its own folder.
_MODULES = {"triton": "fastvit.kernels", "cuda": "fastvit.cuda", "torch": "fastvit.reference"}
BACKENDS = tuple(_MODULES)
_AUTO = "auto"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this op here; the message says why."""


_lock = threading.RLock()
_modules: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}
_runtime: Dict[str, Optional[str]] = {}  # name -> available() result, asked once per process
_capability: Dict[int, Tuple[int, int]] = {}
_global_choice: Optional[str] = None
_env_choice: Optional[Tuple[Optional[str]]] = None  # (value,) once FASTVIT_BACKEND was read
_warned: set = set()
_reset_hooks: List[Callable[[], None]] = []


def module(name: str):
    """The backend module ``name``, imported once; None when it cannot be imported."""
    mod = _modules.get(name)
    if mod is None and name not in _import_errors:
        with _lock:
            if name not in _modules and name not in _import_errors:
                try:
                    _modules[name] = importlib.import_module(_MODULES[name])
                except Exception as e:  # an import failure is a reason, never a crash
                    _import_errors[name] = f"cannot import {_MODULES[name]}: {type(e).__name__}: {e}"
        mod = _modules.get(name)
    return mod


def limits(name: str) -> Optional[BackendLimits]:
    """The declared limits of backend ``name`` (None when its module cannot be imported)."""
    mod = module(name)
    return None if mod is None else mod.LIMITS


def _runtime_reason(name: str) -> Optional[str]:
    mod = module(name)
    if mod is None:
        return _import_errors[name]
    if name not in _runtime:
        with _lock:
            if name not in _runtime:
                _runtime[name] = mod.available()
    return _runtime[name]


def _device_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capability.get(idx)
    if cap is None:
        cap = _capability[idx] = tuple(torch.cuda.get_device_capability(idx))
    return cap


def reasons(name: str, op: Optional[str], device: torch.device, **props) -> List[str]:
    """Every reason backend ``name`` cannot run ``op`` (None: any op) on ``device`` with ``props``
    (dtype, head_dim, act, features). Data reasons come first; the runtime check (which may load
    the CUDA extension) runs only for a device the data admits."""
    mod = module(name)
    if mod is None:
        return [_import_errors[name]]
    lim: BackendLimits = mod.LIMITS
    if device.type == "cuda" and not torch.cuda.is_available():
        return ["torch.cuda.is_available() is False"]
    out = not_supported_reasons(lim, op, device, capability=_device_capability(device), **props)
    if not out:
        r = _runtime_reason(name)
        if r is not None:
            out.append(r)
    return out


def _check_name(name: Optional[str], arg: str) -> Optional[str]:
    if name is None:
        return None
    if not isinstance(name, str) or name.lower() not in BACKENDS + (_AUTO,):
        raise ValueError(f"{arg}: expected one of {BACKENDS + (_AUTO,)} or None, got {name!r}")
    name = name.lower()
    return None if name == _AUTO else name


def on_reset(hook: Callable[[], None]) -> None:
    """Call ``hook`` whenever the selection state changes (the op layer drops its plan cache)."""
    _reset_hooks.append(hook)


def reset() -> None:
    """Forget cached selections: re-read ``FASTVIT_BACKEND`` and ``TRITON_INTERPRET``, re-ask
    runtime availability, re-warn. Call it after changing those variables in a running process."""
    global _env_choice
    with _lock:
        _env_choice = None
        _runtime.clear()
        _warned.clear()
        for hook in _reset_hooks:
            hook()


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide backend ('triton', 'cuda', 'torch', 'auto' or None = auto)."""
    global _global_choice
    _global_choice = _check_name(name, "backend")
    reset()


def get_backend() -> Optional[str]:
    """The process-wide choice: :func:`set_backend`, else ``FASTVIT_BACKEND``, else None (auto)."""
    global _env_choice
    if _global_choice is not None:
        return _global_choice
    if _env_choice is None:
        value = _check_name(os.environ.get("FASTVIT_BACKEND") or None, "FASTVIT_BACKEND")
        _env_choice = (value,)
    return _env_choice[0]


def available_backends(device: Optional[torch.device] = None) -> Dict[str, Tuple[bool, Optional[str]]]:
    """name -> (usable, why not) on ``device`` for some op (default: cuda if present, else cpu)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    out = {}
    for name in BACKENDS:
        r = reasons(name, None, device)
        out[name] = (not r, "; ".join(r) or None)
    return out


def resolve(op: str, device: torch.device, choice: Optional[str] = None, **props):
    """The backend module that runs ``op`` on ``device``.

    ``choice`` is the explicit or per-model backend (None falls through to the global choice,
    then auto). ``props`` (dtype, head_dim, act, features) are checked against each backend's
    declared limits.
    """
    choice = _check_name(choice, "backend") or get_backend()
    if choice is not None:
        r = reasons(choice, op, device, **props)
        if r:
            raise BackendUnavailable(f"backend {choice!r} cannot run {op} on {device}: " + "; ".join(r))
        return module(choice)
    for name in BACKENDS:
        if name == "torch":
            return module(name)
        if device.type != "cuda":
            continue  # the interpreter and CPU kernels are for tests, never chosen automatically
        r = reasons(name, op, device, **props)
        if not r:
            return module(name)
        why = "; ".join(r)
        if (name, why) not in _warned:
            _warned.add((name, why))
            warnings.warn(f"fastvit: backend {name!r} skipped for {op}: {why}", RuntimeWarning, stacklevel=3)
    raise AssertionError("unreachable: the torch backend always runs")
