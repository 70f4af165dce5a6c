"""fastvit: a drop-in Vision Transformer for fast inference.

``import fastvit`` never imports triton or the CUDA extension: backends load on first use.
"""

from .backends import available_backends, get_backend, set_backend
from .embed import embed_to_dir, iter_embeddings, load_embeddings
from .graphs import compile
from .factory import create_model, from_hf, from_pretrained, from_timm, hf_outputs, load_checkpoint
from .model import Attention, Block, HybridEmbed, Mlp, PatchEmbed, VisionTransformer
from .naflex import NaFlexPreprocessor, NaFlexVisionTransformer
from .registry import list_models, model_config
from .version import __version__
from .warmup import warmup

__all__ = [
    "VisionTransformer", "Block", "Attention", "Mlp", "PatchEmbed", "HybridEmbed",
    "create_model", "list_models", "model_config",
    "from_timm", "from_hf", "from_pretrained", "load_checkpoint", "warmup", "compile", "hf_outputs",
    "NaFlexVisionTransformer", "NaFlexPreprocessor",
    "available_backends", "set_backend", "get_backend", "iter_embeddings", "embed_to_dir", "load_embeddings",
]
