"""`fastvit serve` / fastvit.serve: a real uvicorn server on 127.0.0.1 and a real httpx client.
Embeddings equal iter_embeddings; concurrent clients are batched; every bad input is a 400 naming
its index while a concurrent good request succeeds; 413 / 503 + Retry-After; a disconnecting
client frees its places; /health turns 503 when the worker dies; API key; SIGTERM drains."""

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import fastvit
from fastvit.preprocess import Preprocessor, topk_predictions

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
Image = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")

from fastvit.serve import create_app, decode_input  # noqa: E402
from fastvit.serve.decode import DecodeError  # noqa: E402


def tiny_model():
    torch.manual_seed(0)
    m = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return m.eval(), Preprocessor.for_model(m)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving ``app`` on a free loopback port in a thread."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def encode(arr, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """[(path, bytes)] of four photos (PNG and JPEG, one grayscale)."""
    root = tmp_path_factory.mktemp("serve")
    out = []
    for name, arr, fmt in (("chelsea.png", skdata.chelsea(), "PNG"), ("astronaut.jpg", skdata.astronaut(), "JPEG"),
                           ("coffee.jpg", skdata.coffee()[::2, ::2], "JPEG"), ("camera.png", skdata.camera(), "PNG")):
        p = root / name
        p.write_bytes(encode(arr, fmt))
        out.append((str(p), p.read_bytes()))
    return out


@pytest.fixture(scope="module")
def server():
    model, pre = tiny_model()
    app = create_app(model, pre, model_name="tiny", max_batch_size=16, max_delay_ms=20, max_body_mb=1,
                     max_pixels=1_000_000)
    with Server(app) as s:
        s.model, s.pre, s.app = model, pre, app
        yield s


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# --------------------------------------------------------------------------- decode
def test_decode_input_reasons(photos):
    _, pre = tiny_model()
    x = decode_input(photos[0][1], pre)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, pre.load(photos[0][1]))
    jpeg = photos[1][1]
    cases = {
        b"": "empty",
        b"hello, not an image": "cannot identify image",
        jpeg[: len(jpeg) // 2]: "truncated",
        encode(torch.zeros(1, 1, 3, dtype=torch.uint8).numpy()): "too small: 1 x 1",
        encode(torch.zeros(2000, 1000, 3, dtype=torch.uint8).numpy()): "too many pixels: 1000 x 2000",
    }
    for data, reason in cases.items():
        with pytest.raises(DecodeError, match=reason):
            decode_input(data, pre, max_pixels=1_000_000)
    with pytest.raises(TypeError, match="data: expected bytes, got str"):
        decode_input("x", pre)


# --------------------------------------------------------------------------- answers
def test_embeddings_equal_iter_embeddings(server, photos):
    paths = [p for p, _ in photos]
    (_, ref), = list(fastvit.iter_embeddings(server.model, server.pre, paths, batch_size=8, expand=False))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"model": "tiny", "input": [data_uri(b) for _, b in photos],
                                           "modality": "image"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "tiny"
        assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
        assert all(d["object"] == "embedding" for d in body["data"])
        assert body["usage"]["images"] == 4 and body["usage"]["total_tokens"] == 4 * 17
        got = torch.tensor([d["embedding"] for d in body["data"]])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        # plain base64, float32 base64 encoding, L2 normalisation
        r = c.post("/v1/embeddings", json={"input": [base64.b64encode(b).decode() for _, b in photos],
                                           "encoding_format": "base64", "normalize": True})
        assert r.status_code == 200, r.text
        vecs = torch.stack([torch.frombuffer(bytearray(base64.b64decode(d["embedding"])), dtype=torch.float32)
                            for d in r.json()["data"]])
        torch.testing.assert_close(vecs, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5, rtol=1e-5)
        # raw bytes as multipart/form-data
        r = c.post("/v1/embeddings", files=[("file", (os.path.basename(p), b, "image/png")) for p, b in photos],
                   data={"model": "tiny"})
        assert r.status_code == 200, r.text
        torch.testing.assert_close(torch.tensor([d["embedding"] for d in r.json()["data"]]), ref, atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("mode,float_pixels", [("fast", False), ("exact", True)])
def test_embeddings_equal_iter_embeddings_fast_and_float_paths(photos, mode, float_pixels):
    """--preprocess fast (uint8), and a processor whose exact output is float (rescale_first): the
    model then takes float images; both equal iter_embeddings with the same preprocessing."""
    model, pre = tiny_model()
    if float_pixels:
        pre = Preprocessor(size=(32, 32), crop_size=None, resample="bilinear", backend="torch", rescale_first=True)
    paths = [p for p, _ in photos]
    (_, ref), = list(fastvit.iter_embeddings(model, pre, paths, expand=False, preprocess=mode))
    with Server(create_app(model, pre, preprocess=mode)) as s:
        r = httpx.post(s.url + "/v1/embeddings", json={"input": [data_uri(b) for _, b in photos]}, timeout=60)
        assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor([d["embedding"] for d in r.json()["data"]]), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fixed output size"):
        create_app(model, Preprocessor(size=32, crop_size=None))


def test_classify_models_health_metrics(server, photos):
    with torch.no_grad():
        expect = topk_predictions(server.model(server.pre([p for p, _ in photos])), 3)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/classify", json={"input": [data_uri(b) for _, b in photos], "top_k": 3})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [[t["index"] for t in d["labels"]] for d in data] == [[t["index"] for t in e] for e in expect]
        for d, e in zip(data, expect):
            assert [t["score"] for t in d["labels"]] == pytest.approx([t["prob"] for t in e], abs=1e-5)
        m = c.get("/v1/models").json()["data"][0]
        assert m["id"] == "tiny" and m["embedding"] == "pooled" and m["embedding_dim"] == 32
        assert m["image_size"] == [32, 32] and m["classify"] and m["num_classes"] == 10
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok"
        text = c.get("/metrics").text
        for name in ("fastvit_requests_total", "fastvit_errors_total", "fastvit_queue_depth", "fastvit_batch_size",
                     "fastvit_request_seconds", "fastvit_images_per_second"):
            assert name in text
        assert 'fastvit_requests_total{endpoint="/v1/classify",status="200"}' in text


def test_32_concurrent_clients_are_batched(server, photos):
    before = httpx.get(server.url + "/metrics").text
    n0, s0 = metric(before, "fastvit_batch_size_count"), metric(before, "fastvit_batch_size_sum")

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            async def one(i):
                return await c.post("/v1/embeddings", json={"input": [data_uri(photos[i % 4][1])]})
            return await asyncio.gather(*(one(i) for i in range(32)))

    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * 32
    assert all(len(r.json()["data"]) == 1 for r in rs)
    after = httpx.get(server.url + "/metrics").text
    n, s = metric(after, "fastvit_batch_size_count") - n0, metric(after, "fastvit_batch_size_sum") - s0
    assert s == 32 and n < 32, f"32 images in {n} batches: mean batch size {s / n:.2f}, expected > 1"
    assert metric(after, "fastvit_images_per_second") > 0


def test_one_replica_per_device_share_the_queue(photos):
    model, pre = tiny_model()
    app = create_app(model, pre, devices=["cpu", "cpu"], max_batch_size=4, max_delay_ms=10)
    sizes = {}
    for r in app.state.replicas:
        def counted(x, run=r.fn, name=r.name):
            sizes.setdefault(name, []).append(len(x))
            time.sleep(0.05)  # a busy device: the other replica takes the next batch
            return run(x)
        r.fn = counted
    img = data_uri(photos[0][1])

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/embeddings", json={"input": [img]}) for _ in range(24)))

    with Server(app) as s:
        rs = asyncio.run(go(s.url))
        models = httpx.get(s.url + "/v1/models").json()["data"][0]
    assert [r.status_code for r in rs] == [200] * 24
    assert sorted(sizes) == ["cpu#0", "cpu#1"] == models["devices"], sizes
    assert sum(map(sum, sizes.values())) == 24 and max(max(v) for v in sizes.values()) <= 4, sizes
    first = rs[0].json()["data"][0]["embedding"]
    assert all(r.json()["data"][0]["embedding"] == pytest.approx(first, abs=1e-6) for r in rs)


# --------------------------------------------------------------------------- bad input
def test_every_bad_input_is_a_400_while_good_requests_succeed(server, photos):
    jpeg = photos[1][1]
    bad = {
        "corrupt": (base64.b64encode(bytes(range(256)) * 8).decode(), "cannot identify image"),
        "truncated": (data_uri(jpeg[: len(jpeg) // 2], "image/jpeg"), "truncated"),
        "empty": ("", "empty input"),
        "1x1": (data_uri(encode(torch.zeros(1, 1, 3, dtype=torch.uint8).numpy())), "too small"),
        "bomb": (data_uri(encode(torch.zeros(3000, 3000, 3, dtype=torch.uint8).numpy())), "too many pixels"),
        "text": (data_uri(b"just some text", "text/plain"), "cannot identify image"),
        "not base64": ("@@@ not base64 @@@", "not valid base64"),
        "file url": ("file:///etc/passwd", "local files are never read"),
        "http url": ("http://127.0.0.1:1/x.png", "URL inputs are disabled"),
        "not a string": (17, "expected a string"),
    }
    good = data_uri(photos[0][1])

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            reqs = [c.post("/v1/embeddings", json={"input": [good, good, v]}) for v, _ in bad.values()]
            reqs += [c.post("/v1/embeddings", json={"input": [good]}) for _ in range(4)]
            return await asyncio.gather(*reqs)

    rs = asyncio.run(go())
    for (kind, (_, reason)), r in zip(bad.items(), rs):
        assert r.status_code == 400, (kind, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_input" and "input 2:" in err["message"], (kind, err)
        assert [i["index"] for i in err["inputs"]] == [2] and reason in err["inputs"][0]["reason"], (kind, err)
    assert [r.status_code for r in rs[len(bad):]] == [200] * 4
    with httpx.Client(base_url=server.url, timeout=60) as c:
        # over --max-body-mb (1 here): 413, announced or streamed without a length
        r = c.post("/v1/embeddings", content=b"x" * (1024 * 1024 + 1), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "body_too_large"
        r = c.post("/v1/embeddings", content=iter([b"x" * 65536] * 20), headers={"content-type": "application/json"})
        assert r.status_code == 413
        for body, what in ((b"{not json", "invalid JSON"), (b"[1]", "a JSON object"), (b'{"input": []}', "non-empty"),
                           (b'{"input": ["a"], "modality": "text"}', "images only"),
                           (b'{"input": ["a"], "model": "other"}', "serves 'tiny'"),
                           (b'{"input": ["a"], "encoding_format": "int8"}', "encoding_format")):
            r = c.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and what in r.json()["error"]["message"], (body, r.text)
        assert c.post("/v1/classify", json={"input": [good], "top_k": 0}).status_code == 400
        assert c.get("/health").status_code == 200
        text = c.get("/metrics").text
        assert 'fastvit_errors_total{kind="invalid_input"}' in text
        assert 'fastvit_errors_total{kind="body_too_large"}' in text


def test_url_inputs_only_with_allow_urls(photos):
    import http.server

    png = photos[0][1]

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, code = (png, 200) if self.path == "/cat.png" else (b"no", 404)
            self.send_response(code)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    model, pre = tiny_model()
    try:
        with Server(create_app(model, pre, allow_urls=True)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
            r = c.post("/v1/embeddings", json={"input": [base + "/cat.png", data_uri(png)]})
            assert r.status_code == 200, r.text
            a, b = (d["embedding"] for d in r.json()["data"])
            assert a == pytest.approx(b, abs=1e-6)
            r = c.post("/v1/embeddings", json={"input": [base + "/missing.png", "file:///etc/hostname"]})
            assert r.status_code == 400
            reasons = [i["reason"] for i in r.json()["error"]["inputs"]]
            assert "HTTP 404" in reasons[0] and "local files are never read" in reasons[1]
    finally:
        files.shutdown()


# --------------------------------------------------------------------------- overload, death, auth
def test_queue_full_503_and_a_disconnected_client_frees_its_places(photos):
    model, pre = tiny_model()
    app = create_app(model, pre, max_batch_size=2, max_delay_ms=0, max_queue=4)
    gate = threading.Event()
    replica = app.state.replicas[0]
    run = replica.fn

    def gated(x):
        gate.wait(30)
        return run(x)

    replica.fn = gated
    img = data_uri(photos[0][1])
    with Server(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        # a client that gives up: its 4 images fill the queue until it disconnects
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/embeddings", json={"input": [img] * 4}, timeout=1.0)
        deadline = time.time() + 10
        while metric(c.get("/metrics").text, "fastvit_queue_depth") != 0:
            assert time.time() < deadline, "the disconnected client's places were not freed"
            time.sleep(0.05)

        async def go():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as ac:
                held = asyncio.ensure_future(ac.post("/v1/embeddings", json={"input": [img] * 4}))
                while metric((await ac.get("/metrics")).text, "fastvit_queue_depth") < 4:
                    await asyncio.sleep(0.02)
                over = await ac.post("/v1/embeddings", json={"input": [img]})
                gate.set()
                return await held, over

        held, over = asyncio.run(go())
        assert over.status_code == 503 and over.headers["retry-after"] == "1"
        assert over.json()["error"]["type"] == "queue_full"
        assert held.status_code == 200 and len(held.json()["data"]) == 4
        r = c.post("/v1/embeddings", json={"input": [img] * 5})
        assert r.status_code == 413 and "at most 4 images per request" in r.text
        assert c.post("/v1/embeddings", json={"input": [img]}).status_code == 200


def test_health_turns_unhealthy_when_the_worker_dies(photos):
    model, pre = tiny_model()
    app = create_app(model, pre, max_delay_ms=0)
    replica = app.state.replicas[0]
    img = data_uri(photos[0][1])
    with Server(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        assert c.post("/v1/embeddings", json={"input": [img]}).status_code == 200

        def killed(x):  # the worker thread itself ends, as when its device is lost
            raise SystemExit("injected: worker thread killed")

        replica.fn = killed
        r = c.post("/v1/embeddings", json={"input": [img]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "worker_dead", r.text
        replica._thread.join(10)
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "unhealthy"
        assert "injected: worker thread killed" in h.json()["workers"][0]["reason"]
        r = c.post("/v1/embeddings", json={"input": [img]})
        assert r.status_code == 503 and "is dead" in r.json()["error"]["message"]
        assert metric(c.get("/metrics").text, "fastvit_workers_alive") == 0


def test_model_error_fails_its_batch_only(photos):
    model, pre = tiny_model()
    app = create_app(model, pre, max_delay_ms=0)
    replica = app.state.replicas[0]
    run, calls = replica.fn, []

    def flaky(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("injected: out of memory")
        return run(x)

    replica.fn = flaky
    img = data_uri(photos[0][1])
    with Server(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"input": [img]})
        assert r.status_code == 500 and "injected: out of memory" in r.json()["error"]["message"]
        assert c.post("/v1/embeddings", json={"input": [img]}).status_code == 200
        assert c.get("/health").status_code == 200


def test_api_key(photos, monkeypatch):
    model, pre = tiny_model()
    img = data_uri(photos[0][1])
    with Server(create_app(model, pre, api_key="s3cret")) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = c.post("/v1/embeddings", json={"input": [img]}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
            assert c.get("/v1/models", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/embeddings", json={"input": [img]}, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


# --------------------------------------------------------------------------- the command
def _model_folder(root):
    from safetensors.torch import save_file

    from fastvit.convert import model_kwargs

    m, pre = tiny_model()
    (root / "model").mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(root / "model" / "model.safetensors"))
    cfg = dict(architecture="fastvit", model_args=model_kwargs(m), num_classes=10, preprocess=pre.to_dict())
    (root / "model" / "config.json").write_text(json.dumps(cfg))
    return str(root / "model")


def test_cli_sigterm_drains_in_flight_requests_then_exits_0(tmp_path, photos):
    port = free_port()
    env = dict(os.environ, FASTVIT_API_KEY="k")
    proc = subprocess.Popen([sys.executable, "-m", "fastvit", "serve", "--checkpoint", _model_folder(tmp_path),
                             "--port", str(port), "--max-delay-ms", "1500", "--devices", "cpu",
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "fastvit serve did not start"
            time.sleep(0.2)
        img = data_uri(photos[0][1])
        auth = {"Authorization": "Bearer k"}

        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as c:
                reqs = [asyncio.ensure_future(c.post("/v1/embeddings", json={"input": [img]})) for _ in range(4)]
                # in flight: the batch waits 1.5 s for company
                while metric((await c.get("/metrics")).text, "fastvit_queue_depth") < 4:
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*reqs)

        rs = asyncio.run(go())
        assert [r.status_code for r in rs] == [200] * 4
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_missing_model(capsys):
    from fastvit.cli import main

    with pytest.raises(SystemExit, match="expected --checkpoint"):
        main(["serve"])
    with pytest.raises(SystemExit, match="--max-batch-size expected >= 1"):
        main(["serve", "--model", "vit_tiny_patch16_224", "--max-batch-size", "0"])


@pytest.mark.gpu
def test_cuda_replica_serves_from_graph_buckets(photos):
    model, pre = tiny_model()
    paths = [p for p, _ in photos]
    (_, ref), = list(fastvit.iter_embeddings(model, pre, paths, expand=False, device="cpu"))
    app = create_app(model, pre, devices=["cuda"], max_batch_size=8, max_delay_ms=20)
    runner = app.state.replicas[0].fn.runner
    assert isinstance(runner, fastvit.graphs.GraphedModel) and runner.fallback_reason is None
    assert runner.buckets == [1, 2, 4, 8] and runner.dtype == torch.uint8
    with Server(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"input": [data_uri(b) for _, b in photos][:3]})  # bucket 4, padded
        assert r.status_code == 200, r.text
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        torch.testing.assert_close(got, ref[:3], atol=2e-3, rtol=2e-3)  # TF32 / fused kernels vs the CPU


def test_import_stays_light_and_a_missing_extra_is_named():
    code = """
import sys
for m in ("fastapi", "uvicorn", "ray", "prometheus_client"):
    sys.modules[m] = None  # as if not installed
import fastvit, fastvit.serve, fastvit.cli
from fastvit.serve import create_app, deployment
fastvit.cli.build_parser()
model = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
for call in (lambda: create_app(model, None), lambda: deployment(preset="vit_tiny_patch16_224")):
    try:
        call()
    except ImportError as e:
        print(e)
try:
    fastvit.cli.main(["serve", "--model", "vit_tiny_patch16_224"])
except SystemExit as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and 'pip install "fastvit[serve]"' in lines[0], lines
    assert 'pip install "fastvit[ray,serve]"' in lines[1] and lines[2].startswith("fastvit serve: ") and \
        'fastvit[serve]' in lines[2], lines
