"""The ASGI app of ``fastvit serve``: embeddings and classification over HTTP.

:func:`create_app` builds one FastAPI app; uvicorn serves it on one machine
(``fastvit serve``) and Ray Serve's ingress on many (:func:`fastvit.serve.deployment`),
unchanged. Request path: parse (JSON data-URI / base64 strings, http(s) URLs with
``allow_urls``, or multipart files) -> admission (:meth:`Batcher.reserve`: 503 when full) ->
decode in a thread pool (:func:`fastvit.serve.decode.decode_input`: 400 naming each bad input)
-> the batcher -> the response. Errors are JSON ``{"error": {"message", "type", "inputs"?}}``.
"""

import asyncio
import base64
import binascii
import concurrent.futures as cf
import copy
import hmac
import json
import os
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Tuple

import torch

from .batcher import Batcher, QueueFull, Replica, WorkerDead
from .decode import decode_input, input_dtype

__all__ = ["create_app", "ServeError"]

MAX_PIXELS = 40_000_000  # a 40 Mpx photo is fine; beyond is more likely a bomb than a picture
RETRY_AFTER_S = 1


def _fastapi():
    try:
        import fastapi
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise ImportError(f"fastvit serve needs the serve extra ({e.name} is missing): "
                          'pip install "fastvit[serve]"') from None
    return fastapi


class ServeError(Exception):
    """An HTTP error with a JSON body ``{"error": {"message", "type", "inputs"?}}``."""

    def __init__(self, status: int, kind: str, message: str, inputs: Optional[List[Dict[str, Any]]] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.inputs, self.headers = status, kind, message, inputs, headers

    def body(self) -> Dict[str, Any]:
        err: Dict[str, Any] = {"message": self.message, "type": self.kind, "code": self.status}
        if self.inputs is not None:
            err["inputs"] = self.inputs
        return {"error": err}


# --------------------------------------------------------------------------- model runner
class _Heads(torch.nn.Module):
    """images (B, 3, H, W) -> (B, D [+ C]): the embedding (as :func:`fastvit.embed.embedding_fn`
    computes it) and, for a classifier, its logits, from one ``forward_features``."""

    def __init__(self, model, embedding: str, logits: bool):
        super().__init__()
        self.model = model
        self.pre_logits = embedding == "pooled"
        self.logits = logits and embedding != "logits"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_features(x)
        emb = self.model.forward_head(f, pre_logits=self.pre_logits)
        if emb.dim() != 2:
            raise ValueError(f"embedding: expected (B, D) per image batch, got shape {tuple(emb.shape)} (a model "
                             "that does not pool returns tokens)")
        if not self.logits:
            return emb
        return torch.cat([emb, self.model.forward_head(f).to(emb.dtype)], dim=1)


def _buckets(max_batch_size: int) -> List[int]:
    b, out = 1, []
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


def _replica_fn(model, preprocessor, device: torch.device, dtype: Optional[torch.dtype], embedding: str,
                logits: bool, x_dtype: torch.dtype, max_batch_size: int):
    """The function a replica's worker runs: CPU images (B, 3, H, W) -> CPU float32 (B, D [+ C])."""
    from ..imagefiles import input_model

    model = model.to(device=device, dtype=dtype).eval()
    mdtype = next(model.parameters()).dtype
    normalize = input_model(model, preprocessor)
    heads = _Heads(model, embedding, logits).eval()
    runner = heads
    if device.type == "cuda":
        from ..graphs import compile as graph_compile

        size = preprocessor.output_size
        # uint8 batches go straight into the graphs' static inputs (the model normalises them)
        graph_in = torch.uint8 if x_dtype == torch.uint8 and normalize is None else mdtype
        with torch.cuda.device(device):  # capture on the replica's own device
            runner = graph_compile(heads, batch_sizes=_buckets(max_batch_size), img_size=size, in_chans=3,
                                   input_dtype=graph_in)

    def run(x: torch.Tensor) -> torch.Tensor:
        # the worker thread's current CUDA device is 0 unless set: replay where the graphs live
        with torch.inference_mode(), (torch.cuda.device(device) if device.type == "cuda" else nullcontext()):
            if device.type == "cuda":
                x = x.pin_memory().to(device, non_blocking=True)
            if x.dtype == torch.uint8 and normalize is not None:
                x = normalize(x)
            elif x.is_floating_point():
                x = x.to(device=device, dtype=mdtype)
            return runner(x).float().cpu()

    run.runner = runner  # the eager heads, or the GraphedModel on CUDA (inspected by tests)
    return run


def _devices(model, devices) -> List[torch.device]:
    if devices is None:
        return [next(model.parameters()).device]
    if isinstance(devices, (str, torch.device, int)):
        devices = [devices]
    out = []
    for d in devices:
        out.append(torch.device(f"cuda:{d}" if isinstance(d, int) or str(d).isdigit() else d))
    if not out:
        raise ValueError("devices: expected at least one device, got an empty list")
    return out


# --------------------------------------------------------------------------- metrics
class _Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("fastvit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("fastvit_errors", "failed requests by kind", ["kind"], registry=r)
        self.images = Counter("fastvit_images", "images answered", registry=r)
        self.queue = Gauge("fastvit_queue_depth", "images admitted and not answered yet", registry=r)
        self.workers = Gauge("fastvit_workers_alive", "model worker threads running", registry=r)
        self.batch = Histogram("fastvit_batch_size", "images per model batch", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_latency = Histogram("fastvit_batch_seconds", "model time per batch", registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.latency = Histogram("fastvit_request_seconds", "request latency by endpoint", ["endpoint"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.rate = Gauge("fastvit_images_per_second", "images answered per second over the last 10 s", registry=r)
        self._window: List[Tuple[float, int]] = []
        self.rate.set_function(self._rate)

    def answered(self, n: int) -> None:
        self.images.inc(n)
        now = time.monotonic()
        self._window.append((now, n))
        while self._window and self._window[0][0] < now - 10:
            self._window.pop(0)

    def _rate(self) -> float:
        now = time.monotonic()
        recent = [n for t, n in self._window if t >= now - 10]
        return sum(recent) / 10.0


# --------------------------------------------------------------------------- request parsing
def _b64(s: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: not valid base64") from None


def _parse_string(s: Any, allow_urls: bool) -> Tuple[str, Any]:
    """One JSON input -> ('bytes', data) or ('url', url); ValueError with the reason."""
    if not isinstance(s, str):
        raise ValueError(f"expected a string (data URI, base64{', http(s) URL' if allow_urls else ''}), got "
                         f"{type(s).__name__}")
    head = s[:16].lower()
    if head.startswith("data:"):
        meta, sep, payload = s.partition(",")
        if not sep or not meta.lower().endswith(";base64"):
            raise ValueError("data URI: expected 'data:<media type>;base64,<data>'")
        return "bytes", _b64(payload, "data URI")
    if head.startswith(("http://", "https://")):
        if not allow_urls:
            raise ValueError("URL inputs are disabled on this server (start it with --allow-urls)")
        return "url", s
    if "://" in s[:32]:
        raise ValueError(f"URL scheme {s.split('://', 1)[0]!r} is not accepted (local files are never read; "
                         "send the image as base64)")
    return "bytes", _b64(s, "base64")


def _bool(v: Any, arg: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
        return v.lower() in ("true", "1")
    raise ServeError(400, "invalid_request", f"{arg}: expected true or false, got {v!r}")


async def _read_body(request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise ServeError(413, "body_too_large", f"request body of {int(cl)} bytes exceeds the limit of {limit} bytes "
                                                "(--max-body-mb)")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ServeError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait_disconnect(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


# --------------------------------------------------------------------------- the app
def create_app(model, preprocessor, *, model_name: str = "fastvit", max_batch_size: int = 64,
               max_delay_ms: float = 5.0, max_queue: int = 1024, max_body_mb: float = 32.0,
               api_key: Optional[str] = None, allow_urls: bool = False, devices=None,
               dtype: Optional[torch.dtype] = None, embedding: str = "auto", preprocess: str = "exact",
               max_pixels: int = MAX_PIXELS, topk: int = 5, decode_workers: Optional[int] = None,
               url_timeout_s: float = 10.0):
    """The FastAPI app serving ``model``.

    Args:
        model: a :class:`fastvit.VisionTransformer` (eval mode is set); copied once per extra device.
        preprocessor: its :class:`fastvit.Preprocessor` (geometry, normalisation, labels).
        model_name: the id in ``/v1/models`` and the responses; a request naming another model is a 400.
        max_batch_size: images per model batch at most (on CUDA: graph buckets 1, 2, 4, ... up to it).
        max_delay_ms: how long a batch's first image waits for more.
        max_queue: images admitted and not yet answered at most; past it 503 with ``Retry-After``.
        max_body_mb: request bodies above are refused (413).
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>``.
        allow_urls: accept http(s) URLs as inputs (the server fetches them); never files.
        devices: one replica per device (e.g. ``["cuda:0", "cuda:1"]``); default the model's device.
        dtype: the model dtype on the devices (default: the model's).
        embedding: 'auto', 'pooled', 'projected' or 'logits' (:func:`fastvit.embed.embedding_fn`).
        preprocess: 'exact' or 'fast' (:meth:`fastvit.Preprocessor.load`).
        max_pixels: images with more pixels are refused from their header (decompression bombs).
        topk: default number of labels of ``/v1/classify``.
        decode_workers: decode threads (default min(8, CPUs)).
    """
    fastapi = _fastapi()
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.requests import Request

    from ..embed import _finish, embedding_fn, has_projection
    from ..preprocess import topk_predictions

    if preprocess not in ("exact", "fast"):
        raise ValueError(f"preprocess: expected 'exact' or 'fast', got {preprocess!r}")
    if max_body_mb <= 0:
        raise ValueError(f"max_body_mb: expected > 0, got {max_body_mb}")
    if preprocessor.output_size is None:
        raise ValueError("preprocessor: expected a fixed output size (crop_size or an (H, W) size) to batch images")
    _, embedding = embedding_fn(model, embedding)  # resolves 'auto', refuses what the model lacks
    can_classify = bool(getattr(model, "num_classes", 0)) and not has_projection(model)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    split = can_classify and embedding != "logits"  # outputs are (embedding | logits) columns
    x_dtype = input_dtype(preprocessor, preprocess)
    limit = int(max_body_mb * 1024 * 1024)
    devs = _devices(model, devices)
    models = [model] + [copy.deepcopy(model) for _ in devs[1:]]
    replicas = [Replica(_replica_fn(m, preprocessor, d, dtype, embedding, can_classify, x_dtype, max_batch_size),
                        name=str(d) + (f"#{i}" if devs.count(d) > 1 else ""))
                for i, (m, d) in enumerate(zip(models, devs))]
    metrics = _Metrics()

    def on_batch(n: int, seconds: float) -> None:
        metrics.batch.observe(n)
        metrics.batch_latency.observe(seconds)

    batcher = Batcher(replicas, max_batch_size, max_delay_ms, max_queue, on_batch=on_batch)
    metrics.queue.set_function(lambda: batcher.pending)
    metrics.workers.set_function(lambda: sum(r.alive for r in replicas))
    size = preprocessor.output_size
    pe = getattr(model, "patch_embed", None)
    tokens = int(getattr(pe, "num_patches", 0) + getattr(model, "num_prefix_tokens", 0)) if pe is not None else 0
    pool = cf.ThreadPoolExecutor(decode_workers or min(8, os.cpu_count() or 1), thread_name_prefix="fastvit-decode")
    state: Dict[str, Any] = {"started": None, "http": None}
    key = api_key.encode() if api_key else None

    async def ensure_started() -> None:
        if state["started"] is None:
            state["started"] = asyncio.get_running_loop().create_task(batcher.start())
        await state["started"]

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await ensure_started()
        yield
        await batcher.stop()
        if state["http"] is not None:
            await state["http"].aclose()
        pool.shutdown(wait=False)

    app = fastapi.FastAPI(title="fastvit serve", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.replicas = replicas

    @app.exception_handler(ServeError)
    async def _serve_error(request, e: ServeError):
        metrics.errors.labels(e.kind).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        metrics.errors.labels("internal").inc()
        return JSONResponse({"error": {"message": f"{type(e).__name__}: {e}", "type": "internal", "code": 500}},
                            status_code=500)

    def check_key(request) -> None:
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise ServeError(401, "unauthorized", "expected the header 'Authorization: Bearer <api key>'",
                             headers={"WWW-Authenticate": "Bearer"})

    def check_model(name: Any) -> None:
        if name is not None and name != model_name:
            raise ServeError(400, "invalid_request", f"model: this server serves {model_name!r}, got {name!r}")

    async def fetch(url: str) -> bytes:
        import httpx

        if state["http"] is None:
            state["http"] = httpx.AsyncClient(timeout=url_timeout_s, follow_redirects=True, max_redirects=3)
        try:
            async with state["http"].stream("GET", url) as r:
                if r.status_code != 200:
                    raise ValueError(f"URL fetch: HTTP {r.status_code}")
                chunks, n = [], 0
                async for c in r.aiter_bytes():
                    n += len(c)
                    if n > limit:
                        raise ValueError(f"URL fetch: more than {limit} bytes (--max-body-mb)")
                    chunks.append(c)
                return b"".join(chunks)
        except httpx.HTTPError as e:
            raise ValueError(f"URL fetch failed: {type(e).__name__}: {e}") from None

    async def parse(request) -> Tuple[List[Any], Dict[str, Any]]:
        """-> (per input bytes or ValueError, the request's options)."""
        ctype = request.headers.get("content-type", "")
        body = await _read_body(request, limit)
        if ctype.startswith("multipart/form-data"):
            async def replay():
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(request.scope, replay).form(max_files=max_queue, max_fields=100)
            try:
                items: List[Any] = [await v.read() for _, v in form.multi_items() if not isinstance(v, str)]
                opts = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            finally:
                await form.close()
            if not items:
                raise ServeError(400, "invalid_request", "multipart: expected at least one file field, got none")
            return items, opts
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ServeError(400, "invalid_request", f"body: expected JSON or multipart/form-data, got invalid JSON "
                                                     f"({e})") from None
        if not isinstance(doc, dict):
            raise ServeError(400, "invalid_request", f"body: expected a JSON object, got {type(doc).__name__}")
        inputs = doc.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise ServeError(400, "invalid_request", "input: expected a non-empty list of image strings (data URI or "
                                                     f"base64), got {type(inputs).__name__}")
        if doc.get("modality", "image") != "image":
            raise ServeError(400, "invalid_request", f"modality: this server embeds images only, got "
                                                     f"{doc.get('modality')!r}")
        items = []
        for s in inputs:
            try:
                items.append(_parse_string(s, allow_urls))
            except ValueError as e:
                items.append(e)
        opts = {k: v for k, v in doc.items() if k not in ("input", "modality")}
        return items, opts

    def decode_one(item) -> torch.Tensor:
        return decode_input(item, preprocessor, max_pixels, preprocess)

    async def images_of(items: List[Any]) -> List[torch.Tensor]:
        loop = asyncio.get_running_loop()

        async def one(item):
            if isinstance(item, ValueError):
                raise item
            if isinstance(item, tuple):
                kind, v = item
                item = await fetch(v) if kind == "url" else v
            return await loop.run_in_executor(pool, decode_one, item)

        out = await asyncio.gather(*(one(it) for it in items), return_exceptions=True)
        for r in out:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r  # cancelled: the request is gone
        # whatever a decoder raises is about its input (DecodeError says why in words; another
        # error of a malformed file still names its type), never the server's failure
        bad = [{"index": i, "reason": str(r) if isinstance(r, (ValueError, TypeError)) else f"{type(r).__name__}: {r}"}
               for i, r in enumerate(out) if isinstance(r, Exception)]
        if bad:
            raise ServeError(400, "invalid_input", f"{len(bad)} of {len(items)} inputs are not usable images: "
                             + "; ".join(f"input {b['index']}: {b['reason']}" for b in bad[:5]), inputs=bad)
        return out

    async def run(request, items: List[Any]) -> torch.Tensor:
        """Admit, decode, batch: -> outputs (n, D [+ C]) float32."""
        await ensure_started()
        n = len(items)
        if n > max_queue:
            raise ServeError(413, "too_many_inputs", f"input: at most {max_queue} images per request (--max-queue), "
                                                     f"got {n}")
        try:
            batcher.reserve(n)
        except QueueFull as e:
            raise ServeError(503, "queue_full", f"server busy: {e}; retry later",
                             headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except WorkerDead as e:
            raise ServeError(503, "worker_dead", str(e)) from None
        try:
            images = await images_of(items)
        except BaseException:
            batcher.release(n)
            raise
        futures = batcher.submit(images)
        gathered = asyncio.gather(*futures)
        gone = asyncio.ensure_future(_wait_disconnect(request.receive))
        try:
            await asyncio.wait({gathered, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not gathered.done():
                raise ServeError(499, "client_disconnected", "the client closed the connection")
            return torch.stack(gathered.result())
        except WorkerDead as e:
            raise ServeError(503, "worker_dead", str(e)) from None
        except (ServeError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise ServeError(500, "model_error", f"{type(e).__name__}: {e}") from None
        finally:
            gone.cancel()
            for f in futures:
                f.cancel()  # a no-op for answered images; frees the places of the others
            if gathered.done() and not gathered.cancelled():
                gathered.exception()  # retrieved: no "exception never retrieved" noise

    def finish(endpoint: str, t0: float, status: int, n: int = 0) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        if n:
            metrics.answered(n)

    def usage(n: int) -> Dict[str, int]:
        return {"prompt_tokens": n * tokens, "total_tokens": n * tokens, "images": n}

    @app.middleware("http")
    async def count(request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            finish(request.url.path, t0, response.status_code, int(response.headers.get("x-fastvit-images", 0)))
        return response

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        check_key(request)
        items, opts = await parse(request)
        check_model(opts.get("model"))
        fmt = opts.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ServeError(400, "invalid_request", f"encoding_format: expected 'float' or 'base64', got {fmt!r}")
        normalize = _bool(opts.get("normalize", False), "normalize")
        out = await run(request, items)
        emb = _finish(out[:, :-num_classes] if split else out, normalize)
        data = []
        for i, row in enumerate(emb):
            vec = (base64.b64encode(row.numpy().astype("<f4").tobytes()).decode() if fmt == "base64"
                   else row.tolist())
            data.append({"object": "embedding", "index": i, "embedding": vec})
        return JSONResponse({"object": "list", "data": data, "model": model_name, "usage": usage(len(data))},
                            headers={"x-fastvit-images": str(len(data))})

    @app.post("/v1/classify")
    async def classify(request: Request):
        check_key(request)
        if not can_classify:
            raise ServeError(400, "invalid_request", f"{model_name} has no classifier head (its head is "
                                                     f"{'a projection' if has_projection(model) else 'empty'}); use "
                                                     "/v1/embeddings")
        items, opts = await parse(request)
        check_model(opts.get("model"))
        k = opts.get("top_k", opts.get("topk", topk))
        try:
            k = int(k)
            if k < 1:
                raise ValueError
        except (TypeError, ValueError):
            raise ServeError(400, "invalid_request", f"top_k: expected an int >= 1, got {k!r}") from None
        out = await run(request, items)
        logits = out[:, -num_classes:]
        data = [{"object": "classification", "index": i,
                 "labels": [{"index": t["index"], "label": t["label"], "score": t["prob"]} for t in top]}
                for i, top in enumerate(topk_predictions(logits, k, preprocessor.id2label))]
        return JSONResponse({"object": "list", "data": data, "model": model_name, "usage": usage(len(data))},
                            headers={"x-fastvit-images": str(len(data))})

    @app.get("/v1/models")
    async def models_(request: Request):
        check_key(request)
        head = getattr(model, "head", None)
        dim = {"logits": num_classes, "pooled": int(getattr(model, "num_features", 0) or 0) or None,
               "projected": getattr(head, "out_features", None)}[embedding]
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "owned_by": "fastvit", "created": int(time.time()),
            "embedding": embedding, "embedding_dim": dim, "image_size": list(size) if size else None,
            "classify": can_classify, "num_classes": num_classes if can_classify else 0,
            "max_batch_size": max_batch_size, "devices": [r.name for r in replicas]}]}

    @app.get("/health")
    async def health():
        workers = [{"name": r.name, "alive": r.alive, **({} if r.alive else {"reason": r.died})} for r in replicas]
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "unhealthy", "workers": workers,
                             "queue_depth": batcher.pending}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
