"""``fastvit serve``: embeddings and classification over HTTP with dynamic batching.

Importing this package needs no extra; building the app needs ``pip install "fastvit[serve]"``
and the Ray Serve deployment ``pip install "fastvit[ray,serve]"``.
"""

from .app import ServeError, create_app
from .batcher import Batcher, QueueFull, Replica, WorkerDead
from .decode import DecodeError, decode_input
from .deployment import deployment

__all__ = ["create_app", "deployment", "decode_input", "Batcher", "Replica", "ServeError", "QueueFull",
           "WorkerDead", "DecodeError"]
