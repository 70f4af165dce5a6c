"""Model folders and Hugging Face hub names -> local folders (config + weights files).

A hub name (``org/name``, ``hf-hub:org/name``, ``org/name@revision``, or a timm model name with
its pretrained tag) resolves to the local snapshot folder that huggingface_hub keeps; offline,
only its cache is read. What the files mean is :mod:`fastvit.checkpoint` and :mod:`fastvit.convert`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from .checkpoint import WEIGHT_FILES, CheckpointError, shard_files

__all__ = ["hub_folder", "is_hub_name", "read_config", "timm_pretrained_cfg", "timm_hub_id"]

_HUB_NAME = re.compile(r"^(?:hf-hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")


def is_hub_name(name: str) -> bool:
    """Whether ``name`` has the form of a hub repo id: ``[hf-hub:]org/name[@revision]``."""
    return bool(_HUB_NAME.match(str(name)))


def _hub_error(repo_id: str, filename: str, e: Exception) -> FileNotFoundError:
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return FileNotFoundError(
        f"from_pretrained: {repo_id!r} is not a local folder, and {filename!r} of the Hugging Face hub repo "
        f"{repo_id!r} is neither in the local cache nor downloadable ({type(e).__name__}: {why}). Connect to "
        f"the network (and unset HF_HUB_OFFLINE), or download the repo and pass its folder.")


def hub_folder(name: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
               local_files_only: bool = False) -> str:
    """Fetch ``config.json``, the (optional) preprocessor config and the weights of a hub repo
    (``org/name``, ``hf-hub:org/name``, ``org/name@revision``) and return the local snapshot folder.

    Online, files come through huggingface_hub (and its cache); offline (no network,
    ``HF_HUB_OFFLINE=1`` or ``local_files_only``) only the cache is used, and a missing file is a
    :class:`FileNotFoundError` that names the repo and the file looked for.
    """
    m = _HUB_NAME.match(name)
    if not m:
        raise ValueError(f"name: expected a local folder or a hub repo id 'org/name[@revision]', got {name!r}")
    repo_id, revision = m.group(1), revision or m.group(2)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as e:
        raise ImportError(f"from_pretrained: {name!r} is a hub name and needs huggingface_hub "
                          "(pip install 'fastvit[hf]'), or pass a local folder") from e

    def get(filename: str, required: bool) -> Optional[str]:
        try:
            return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only)
        except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: test it first
            if required:
                raise _hub_error(repo_id, filename, e) from e
            return None
        except EntryNotFoundError:
            if required:
                raise FileNotFoundError(f"from_pretrained: hub repo {repo_id!r} has no {filename!r}") from None
            return None
        except Exception as e:  # network, auth, unknown repo: say which file was wanted
            raise _hub_error(repo_id, filename, e) from e

    cfg = get("config.json", required=True)
    folder = os.path.dirname(cfg)
    get("preprocessor_config.json", required=False)
    # the first weights file found is the one read_folder_state_dict reads from the folder
    for fn in WEIGHT_FILES:
        path = get(fn, required=False)
        if path is None:
            continue
        if fn.endswith(".index.json"):
            for shard in shard_files(path):
                get(shard, required=True)
        return folder
    raise _hub_error(repo_id, " or ".join(WEIGHT_FILES), LocalEntryNotFoundError("no weights file found"))


def read_config(path: str) -> dict:
    """``config.json`` of model folder ``path`` as a dict (HF: ``model_type``; timm / fastvit: ``architecture``)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"path: expected {cfg_file} to exist")
    try:
        with open(cfg_file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"config: {cfg_file!r} is not valid JSON ({e})") from e


def timm_pretrained_cfg(name: str):
    """timm's pretrained config of ``name`` (``vit_base_patch16_224.augreg2_in21k_ft_in1k``), or None
    when timm is not installed or does not know the name."""
    try:
        import timm

        return timm.models.get_pretrained_cfg(name)
    except Exception:  # timm missing, or not a timm name: the caller reports what it expected
        return None


def timm_hub_id(name: str) -> Optional[str]:
    """timm model name (``vit_base_patch16_224.augreg2_in21k_ft_in1k``) -> its hub repo, via timm's table."""
    return getattr(timm_pretrained_cfg(name), "hf_hub_id", None) or None
