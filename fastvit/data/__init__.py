"""The data side of the bulk jobs: where samples come from (:mod:`fastvit.data.sources`) and where
embeddings go (:mod:`fastvit.data.writers`). Every engine (one process, torchrun, Ray Data) reads
and writes through these two modules and adds no format, decode or output rule of its own.

Importing this package imports neither pyarrow nor ray: the parquet readers and writers load
pyarrow on first use.
"""

from .sources import Shard, expand_braces, iter_samples, resolve_shards
from .writers import FORMATS

__all__ = ["Shard", "expand_braces", "iter_samples", "resolve_shards", "FORMATS"]
