"""The data side of the bulk jobs and the server (DESIGN.md section 8): where samples come from
(:mod:`fastvit.data.sources`), how their bytes become uint8 pixels with the checkpoint's geometry
(:mod:`fastvit.data.decode`), how batches reach the device (:mod:`fastvit.data.batches`) and where
embeddings go (:mod:`fastvit.data.writers`). Every engine (one process, torchrun, Ray Data) and the
server read, decode and write through these modules and add no format, decode or output rule of
their own.

Importing this package imports neither pyarrow nor ray: the parquet readers and writers load
pyarrow on first use.
"""

from .sources import Shard, expand_braces, iter_samples, resolve_shards
from .writers import FORMATS

__all__ = ["Shard", "expand_braces", "iter_samples", "resolve_shards", "FORMATS"]
