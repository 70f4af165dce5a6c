"""Checkpoint files -> state dicts, and strict loading of a state dict into a model.

Nothing here unpickles arbitrary code: ``.safetensors`` files are read with safetensors and
PyTorch pickles only with ``torch.load(weights_only=True)``. Key mismatches are errors that
list the missing and unexpected keys; nothing is silently re-initialised. Key names are not
translated here (that is :mod:`fastvit.convert`).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping

import torch
import torch.nn as nn

__all__ = [
    "CheckpointError",
    "WEIGHT_FILES",
    "load_state_dict",
    "read_state_dict",
    "read_folder_state_dict",
    "shard_files",
]

# The weight files of a model folder (Hugging Face / timm hub layout), in order of preference:
# safetensors before pickles, and an index (sharded weights) before a single file of that format.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (keys, shapes, format)."""


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with an error that lists every problem.

    Raises :class:`CheckpointError` naming ``source`` and every missing key, unexpected key and
    shape mismatch (not only the first).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise CheckpointError(f"{source}: checkpoint does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: .safetensors, or a PyTorch pickle read with weights_only=True.

    A training checkpoint's weights under 'model' / 'state_dict' / 'model_state' / 'module' are
    taken, and a DistributedDataParallel ``module.`` prefix is dropped. A pickle that would run
    code (or holds anything but tensors and containers) is refused with :class:`CheckpointError`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: expected an existing file, got {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path!r}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r}: refused or unreadable with torch.load(weights_only=True) "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path!r}: expected a dict of tensors (optionally under 'model' or "
                              f"'state_dict'), got {type(obj).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def shard_files(index: str) -> List[str]:
    """File names (relative to the index's folder) of a sharded checkpoint's ``*.index.json``, sorted."""
    try:
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {index!r}: expected a JSON index with a 'weight_map' ({e})") from e


def read_folder_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a model folder: the first of :data:`WEIGHT_FILES` found, shards merged.

    Keys are returned as stored (Hugging Face or timm names).
    """
    for name in WEIGHT_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if not name.endswith(".index.json"):
            return read_state_dict(file)
        sd: Dict[str, torch.Tensor] = {}
        for fn in shard_files(file):
            shard = os.path.join(path, fn)
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"checkpoint: {name} lists {fn!r}, which is missing in {path!r}")
            sd.update(read_state_dict(shard))
        return sd
    raise FileNotFoundError(f"path: expected model.safetensors or pytorch_model.bin (or a sharded index) "
                            f"in {path!r}, found {sorted(os.listdir(path))}")
