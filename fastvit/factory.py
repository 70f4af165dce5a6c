"""Models from what a user has: a preset name, a checkpoint file, a timm / transformers object,
a model folder or a hub name; and a model written back as a fastvit folder (``fastvit convert``).

This module only ties the pieces together: presets (:mod:`fastvit.registry`), file reading and
strict loading (:mod:`fastvit.checkpoint`), key / config conversion (:mod:`fastvit.convert`)
and hub folders (:mod:`fastvit.hub`).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_state_dict, read_folder_state_dict, read_state_dict
from .convert import is_hf_state_dict, model_kwargs
# every family's converters, the NaFlex ones included (convert_naflex is the layer above convert)
from .convert_naflex import convert_hf, convert_timm, hf_kwargs, timm_kwargs
from .hub import hub_folder, is_hub_name, read_config, timm_hub_id, timm_pretrained_cfg
from .model import VisionTransformer
from .naflex import NaFlexPreprocessor, is_naflex, model_class, unpad_hf_inputs
from .preprocess import Preprocessor
from .registry import follows_timm_tags, list_models, model_config, preprocess_config
from .version import __version__

__all__ = [
    "create_model",
    "load_checkpoint",
    "from_timm",
    "from_hf",
    "from_pretrained",
    "load_model",
    "convert",
    "hf_outputs",
    "ViTOutput",
]


def create_model(name: str, checkpoint: Optional[str] = None, **overrides) -> VisionTransformer:
    """Build preset ``name`` with ``overrides`` applied; load ``checkpoint`` strictly if given.

    Args:
        name: a name from :func:`fastvit.list_models` (timm's naming).
        checkpoint: path to a timm / fastvit state dict (.safetensors, .pth, .bin); see
            :func:`load_checkpoint`.
        overrides: constructor arguments of :class:`VisionTransformer` (e.g. num_classes=10).

    Returns:
        the model in eval mode.
    """
    cfg = model_config(name)
    cfg.update(overrides)
    model = model_class(cfg)(**cfg)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    pre = preprocess_config(name)
    if pre is not None and model.patch_embed.proj.weight.shape[1] == len(pre["mean"]):
        model.set_input_normalization(pre["mean"], pre["std"])  # uint8 input (the preset's processor)
    return model.eval()


def load_checkpoint(model: VisionTransformer, path: str) -> VisionTransformer:
    """Load a timm or fastvit checkpoint file into ``model`` strictly (resampling pos / patch as timm)."""
    sd = read_state_dict(path)
    if is_hf_state_dict(sd):
        raise CheckpointError(f"checkpoint {path!r}: this is a Hugging Face state dict; use fastvit.from_pretrained "
                              "on its folder (config.json beside it)")
    load_state_dict(model, convert_timm(sd, model), source=f"checkpoint {path!r}")
    return model


def from_timm(timm_model: nn.Module, backend: Optional[str] = None) -> VisionTransformer:
    """Same architecture and weights as a timm ``VisionTransformer`` / DeiT / CLIP / SigLIP / ``Beit``
    (config read from the object; BEiT's q / v biases, gammas and tables take fastvit's names).

    Returns a fastvit model on the timm model's device and dtype, in its train / eval mode.
    """
    kwargs = timm_kwargs(timm_model)
    model = model_class(kwargs)(backend=backend, **kwargs)
    p = next(timm_model.parameters())
    model.to(device=p.device, dtype=p.dtype)
    load_state_dict(model, convert_timm(timm_model.state_dict(), model), source="timm_model")
    if model.distilled:
        model.distilled_training = getattr(timm_model, "distilled_training", False)
    return model.train(timm_model.training)


def from_hf(hf_model_or_state_dict, config=None, backend: Optional[str] = None) -> VisionTransformer:
    """fastvit model with the weights of a transformers ViT / DeiT / DINOv2 / CLIP / SigLIP model (or its state dict).

    Args:
        hf_model_or_state_dict: ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
            ``DeiTForImageClassification(WithTeacher)``, ``Dinov2Model``, ``Dinov2WithRegistersModel``,
            ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipVisionModel``, the vision
            tower of ``CLIPModel`` / ``SiglipModel`` (text-tower weights are left out), ``BeitModel``,
            ``BeitForImageClassification``, or a state dict of one of them (then ``config`` is required).
        config: the transformers config (or config.json as a dict); read from the model if omitted.

    ``forward_features`` equals HF's ``last_hidden_state``. ``forward`` returns: for ViT / DeiT /
    DINOv2 ``*Model`` classes the (normalised) class token, i.e. DINOv2's ``pooler_output``; for
    classifiers the logits; for ``CLIPVisionModel`` and ``SiglipVisionModel`` the ``pooler_output``
    (CLIP: post_layernorm of the class token; SigLIP: the MAP head); for
    ``CLIPVisionModelWithProjection`` / ``CLIPModel`` the ``image_embeds`` (visual_projection, no
    bias); for ``BeitModel`` the ``pooler_output`` (fc_norm of the mean patch token, or the class
    token); for ``Siglip2VisionModel`` / ``Siglip2Model`` (NaFlex: a
    :class:`~fastvit.naflex.NaFlexVisionTransformer`) the MAP head's ``pooler_output``. :func:`hf_outputs`
    gives them under HF's names (NaFlex: from the padded ``pixel_values`` / ``pixel_attention_mask`` /
    ``spatial_shapes``, packed inside). ``BeitForMaskedImageModeling``, ``BeitForSemanticSegmentation`` and
    ``BeitBackbone`` are refused.
    """
    if isinstance(hf_model_or_state_dict, nn.Module):
        hf = hf_model_or_state_dict
        config = config if config is not None else hf.config
        sd = hf.state_dict()
        arch = type(hf).__name__
        p = next(hf.parameters())
        device, dtype = p.device, p.dtype
    elif isinstance(hf_model_or_state_dict, Mapping):
        if config is None:
            raise ValueError("config: expected the transformers config (or config.json dict) with a state dict, "
                             "got None")
        sd, arch, device, dtype = hf_model_or_state_dict, None, None, None
    else:
        raise TypeError(f"hf_model_or_state_dict: expected a transformers model or a state dict, "
                        f"got {type(hf_model_or_state_dict).__name__}")
    kwargs = hf_kwargs(config, arch)
    sd = convert_hf(sd, config)
    if kwargs["num_classes"] == 0 and "head.weight" in sd:
        kwargs["num_classes"] = sd["head.weight"].shape[0]
    if kwargs.get("fc_norm") and kwargs.get("global_pool") == "avg" and "fc_norm.weight" not in sd \
            and "norm.weight" not in sd:  # HF BeitModel(add_pooling_layer=False): no pooler, pooler_output None
        kwargs.update(global_pool="", fc_norm=False, final_norm=False)
    if "dist_token" in sd and kwargs.get("reg_tokens") == 1:
        sd["reg_token"] = sd.pop("dist_token")
    model = model_class(kwargs)(backend=backend, **kwargs)
    if device is not None:
        model.to(device=device, dtype=dtype)
    load_state_dict(model, sd, source="Hugging Face state_dict")
    return model.eval()


def _timm_layout_model(config: dict, backend: Optional[str]) -> VisionTransformer:
    """Model of a timm hub / fastvit folder (config.json with 'architecture' and 'model_args')."""
    arch = config["architecture"]
    args = dict(config.get("model_args") or {})
    if arch == "fastvit":
        return model_class(args)(backend=backend, **args)
    for k in ("num_classes", "global_pool"):
        if k in config and k not in args:
            args[k] = config[k]
    base = arch.split(".")[0]
    if base in list_models():
        cfg = model_config(base)
        cfg.update(args)
        return model_class(cfg)(backend=backend, **cfg)
    try:
        import timm
    except ImportError:
        raise ValueError(f"config: architecture {arch!r} is not a fastvit preset (fastvit.list_models()) and timm "
                         "is not installed to describe it") from None
    return from_timm(timm.create_model(base, pretrained=False, **args).eval(), backend=backend)


def from_pretrained(name_or_path: str, backend: Optional[str] = None, revision: Optional[str] = None,
                    cache_dir: Optional[str] = None, local_files_only: bool = False) -> VisionTransformer:
    """A fastvit model (eval mode) from a model folder or a Hugging Face hub name.

    Folders (local, or the hub snapshot of ``org/name``) may be:

    * Hugging Face ViT / DeiT / DINOv2: config.json with ``model_type`` + model.safetensors or
      pytorch_model.bin, sharded index files too;
    * timm hub layout (``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``): config.json with
      ``architecture`` / ``model_args`` + timm-named weights;
    * what ``fastvit convert`` writes (architecture 'fastvit').

    Names: a folder, ``org/name[@revision]``, ``hf-hub:org/name``, or a timm model name with its
    pretrained tag (``vit_base_patch16_224.augreg2_in21k_ft_in1k``, resolved to its hub repo by timm).
    Hub names need huggingface_hub; offline only its cache is used (see :func:`fastvit.hub.hub_folder`).
    """
    path = name_or_path
    if not os.path.isdir(path) and not os.path.exists(path) and "/" not in str(path):
        path = timm_hub_id(path) or path
    if not os.path.isdir(path):
        if os.path.exists(path) or not is_hub_name(path):
            raise FileNotFoundError(f"name_or_path: expected a model folder with config.json or a hub repo id "
                                    f"'org/name', got {name_or_path!r}")
        path = hub_folder(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    config = read_config(path)
    if "architecture" in config:
        model = _timm_layout_model(config, backend)
        sd = convert_timm(read_folder_state_dict(path), model)
        load_state_dict(model, sd, source=f"checkpoint folder {path!r}")
        return _folder_normalization(model.eval(), path)
    if "model_type" not in config:
        raise CheckpointError(f"config: {os.path.join(path, 'config.json')!r} has neither 'model_type' (Hugging "
                              "Face) nor 'architecture' (timm / fastvit)")
    return _folder_normalization(from_hf(read_folder_state_dict(path), config, backend=backend), path)


def _folder_normalization(model: VisionTransformer, path: str) -> VisionTransformer:
    """Set the model's uint8 input normalisation from the folder's own preprocessing, when it has
    one (preprocessor_config.json, or config.json with ``preprocess`` / ``pretrained_cfg``)."""
    try:
        pre = NaFlexPreprocessor.from_pretrained(path, model=model) if is_naflex(model) else \
            Preprocessor.from_pretrained(path)
    except FileNotFoundError:  # the folder names no preprocessing: float input only
        return model
    return model.set_input_normalization(pre)


def load_model(checkpoint: Optional[str], model_name: Optional[str] = None, backend: Optional[str] = None,
               local_files_only: bool = False):
    """Model and its :class:`~fastvit.preprocess.Preprocessor` from whatever the user has.

    Args:
        checkpoint: a model folder (HF / timm hub layout / fastvit), a hub name, or a state-dict
            file (.safetensors / .pth / .bin, timm names; then ``model_name`` is required).
        model_name: a preset of :func:`fastvit.list_models` (for state-dict files, or alone for random
            weights when ``checkpoint`` is None), optionally with timm's pretrained tag. Preprocessing:
            the preset's own (CLIP / SigLIP presets, see :func:`fastvit.registry.preprocess_config`),
            else timm's ``pretrained_cfg`` of the (tagged) name, else the ViT defaults.

    Returns:
        (model in eval mode, preprocessor with ``id2label`` when the checkpoint has labels)
    """
    if checkpoint is None or os.path.isfile(checkpoint):
        if model_name is None:
            raise ValueError(f"model_name: a state-dict file ({checkpoint!r}) needs the architecture, e.g. "
                             "--model vit_base_patch16_224, got None")
        # a preset of that exact name (CLIP '.openai' towers), else the architecture without the tag
        arch = model_name if model_name in list_models() else model_name.split(".")[0]
        model = create_model(arch, checkpoint=checkpoint, backend=backend)
        if is_naflex(model):
            pre = NaFlexPreprocessor.from_preset(arch)
            return model.set_input_normalization(pre), pre
        # a tagged name's own pretrained_cfg (a tag may change mean / std / crop), else the preset's
        timm_cfg = timm_pretrained_cfg(model_name) if arch != model_name and follows_timm_tags(arch) else None
        cfg = timm_cfg.to_dict() if timm_cfg is not None else preprocess_config(arch)
        pre = Preprocessor.from_timm(cfg) if cfg is not None else Preprocessor.for_model(model)
        return model.set_input_normalization(pre), pre
    folder = checkpoint
    if not os.path.isdir(checkpoint):
        if not is_hub_name(checkpoint):
            raise FileNotFoundError(f"checkpoint: expected a file, a model folder or a hub name 'org/name', "
                                    f"got {checkpoint!r}")
        folder = hub_folder(checkpoint, local_files_only=local_files_only)
    model = from_pretrained(folder, backend=backend)
    if is_naflex(model):
        pre = NaFlexPreprocessor.from_pretrained(folder, model=model)
    else:
        pre = Preprocessor.from_pretrained(folder, model=model)
    return model.set_input_normalization(pre), pre


def convert(src: str, dst: str, model_name: Optional[str] = None) -> str:
    """Write ``src`` (anything :func:`load_model` takes) as a fastvit folder: ``model.safetensors``
    (timm / fastvit names) + ``config.json`` (architecture 'fastvit', constructor arguments,
    preprocessing, labels). :func:`from_pretrained` reads it back. Returns ``dst``."""
    from safetensors.torch import save_file

    model, pre = load_model(src, model_name)
    kwargs = model_kwargs(model)
    os.makedirs(dst, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt", "producer": "fastvit"})
    config = dict(architecture="fastvit", fastvit_version=__version__, model_args=kwargs,
                  num_classes=model.num_classes, preprocess=pre.to_dict(), source=str(src))
    if pre.id2label:
        config["id2label"] = {str(k): v for k, v in sorted(pre.id2label.items())}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return dst


# --------------------------------------------------------------------------- Hugging Face style outputs
class ViTOutput(dict):
    """Dict with attribute access, as transformers' ModelOutput: ``last_hidden_state`` (B, N, D),
    ``pooler_output`` (B, D; None with ``global_pool=''``, as SiglipVisionModel without its head),
    ``logits`` (B, C) for classifiers or ``image_embeds`` (B, P) for a projection head (no bias: CLIP's
    ``visual_projection``), ``hidden_states`` (depth + 1 tensors
    (B, N, D): embeddings, then each block's output) and ``attentions`` (depth entries (B, H, N, N),
    None for layers not asked for) when requested."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def hf_outputs(model: VisionTransformer, pixel_values: torch.Tensor, output_hidden_states: bool = False,
               output_attentions: Union[bool, Sequence[int]] = False, *,
               pixel_attention_mask: Optional[torch.Tensor] = None,
               spatial_shapes: Optional[torch.Tensor] = None) -> ViTOutput:
    """Run ``model`` and return transformers-style outputs (see :class:`ViTOutput`).

    Args:
        pixel_values: (B, C, H, W); or, with ``spatial_shapes`` (Siglip2VisionModel's NaFlex
            inputs), patches (B, M, ph * pw * C), each image's first, zero rows after.
        output_hidden_states: also return the embeddings and every block's output, each (B, N, D)
            with N = prefix + patch tokens (HF ``hidden_states``).
        output_attentions: True for every layer, or a list of layer indices: only those compute
            probabilities (via :func:`fastvit.ops.attention_probs`), the rest stay on the fast path.
        pixel_attention_mask: (B, M) 1 for each image's patches (NaFlex).
        spatial_shapes: (B, 2) each image's patch grid (rows, cols) (NaFlex).

    With ``spatial_shapes`` the valid patches are packed into one sequence
    (:meth:`~fastvit.model.VisionTransformer.forward_packed`): no padding token is computed, and
    ``last_hidden_state`` (B, T + M, D) holds each image's tokens (prefix first) and zeros at its
    padding positions (Siglip2VisionModel computes rows there from the zero patches; they take
    part in nothing), as does each of ``hidden_states``; ``pooler_output`` is the pooling over each
    image's own tokens. ``output_attentions`` is refused there.
    """
    if spatial_shapes is not None or pixel_attention_mask is not None:
        return _hf_packed_outputs(model, pixel_values, pixel_attention_mask, spatial_shapes, output_hidden_states,
                                  output_attentions)
    depth = len(model.blocks)
    if output_attentions is True:
        attn_layers = list(range(depth))
    else:
        attn_layers = list(output_attentions) if output_attentions else None
    # no block output is kept unless asked for: the run then costs what forward_features does
    last, inter, *rest = model.forward_intermediates(
        pixel_values, indices=None if output_hidden_states else [], return_prefix_tokens=True, output_fmt="NLC",
        attn_layers=attn_layers)
    pooled = model.forward_head(last, pre_logits=True) if model.global_pool else None
    out = ViTOutput(last_hidden_state=last, pooler_output=pooled)
    if model.num_classes:
        # a head without bias is a projection (HF CLIP's visual_projection): HF calls its output image_embeds
        head = model.head
        name = "image_embeds" if isinstance(head, nn.Linear) and head.bias is None else "logits"
        # the pooled features feed the head (the MAP head runs once), except DeiT's two-head average
        use_pooled = pooled is not None and not model.distilled
        out[name] = model._head(head, pooled) if use_pooled else model.forward_head(last)
    if output_hidden_states:
        if model.num_prefix_tokens:  # (patch (B, gh * gw, D), prefix (B, T, D)) -> (B, T + gh * gw, D)
            inter = [torch.cat([prefix, patch], 1) for patch, prefix in inter]
        # forward_intermediates returns block outputs only (as timm); HF's first hidden state is the
        # embedding, so the patch embedding runs once more (cheap next to the blocks).
        out["hidden_states"] = (model.embed(pixel_values), *inter)
    if attn_layers:
        attns = rest[0]
        out["attentions"] = tuple(attns.get(i) for i in range(depth))
    return out


def _hf_packed_outputs(model, pixel_values, pixel_attention_mask, spatial_shapes, output_hidden_states,
                       output_attentions) -> ViTOutput:
    """:func:`hf_outputs` for NaFlex padded patches: unpad, run packed, pad the tokens back."""
    if output_attentions:
        raise ValueError("output_attentions: not available with pixel_attention_mask / spatial_shapes (packed NaFlex "
                         "inputs: the attention runs without probabilities); call hf_outputs without it")
    patches, grids = unpad_hf_inputs(pixel_values, pixel_attention_mask, spatial_shapes)
    res = model.forward_packed(patches, grids, pre_logits=True, hidden_states=bool(output_hidden_states))
    B, M = pixel_values.shape[:2]
    T = model.num_prefix_tokens

    def padded(packed: torch.Tensor) -> torch.Tensor:  # (T_all, D) -> (B, T + M, D), zeros at padding
        out = packed.new_zeros(B, T + M, packed.shape[1])
        for i, t in enumerate(res.split(packed)):
            out[i, :t.shape[0]] = t
        return out

    pooled = res.pooled if model.global_pool else None
    out = ViTOutput(last_hidden_state=padded(res.tokens), pooler_output=pooled)
    if output_hidden_states:
        out["hidden_states"] = tuple(padded(h) for h in res.hidden_states)
    if model.num_classes and pooled is not None:
        head = model.head
        name = "image_embeds" if isinstance(head, nn.Linear) and head.bias is None else "logits"
        out[name] = model._head(head, pooled)
    return out
