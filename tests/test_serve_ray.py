"""fastvit.serve.deployment on a local Ray cluster (CPU, num_gpus=0): the same app behind Ray
Serve's HTTP proxy answers the same requests as the local server, with the same embeddings."""

import base64
import io
import socket

import pytest
import torch

import fastvit
from fastvit.preprocess import Preprocessor

ray = pytest.importorskip("ray", reason="ray is not installed (pip install \"fastvit[ray,serve]\")")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install \"fastvit[ray,serve]\")")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
Image = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")

from fastvit.serve import deployment  # noqa: E402


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cluster():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_deployment_answers_like_the_local_server(cluster, tmp_path):
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                      num_classes=10).eval()
    pre = Preprocessor.for_model(model)
    photos = [_png(skdata.chelsea()), _png(skdata.coffee())]
    paths = []
    for i, b in enumerate(photos):
        (tmp_path / f"{i}.png").write_bytes(b)
        paths.append(str(tmp_path / f"{i}.png"))
    (_, ref), = list(fastvit.iter_embeddings(model, pre, paths, expand=False))
    app = deployment(model, pre, name="tiny", num_gpus=0, num_cpus=0.5, max_delay_ms=5,
                     autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 4})
    serve.run(app, name="tiny", route_prefix="/")
    status = serve.status().applications["tiny"]
    assert status.status == "RUNNING"
    with httpx.Client(base_url=cluster, timeout=120) as c:
        inputs = ["data:image/png;base64," + base64.b64encode(b).decode() for b in photos]
        r = c.post("/v1/embeddings", json={"model": "tiny", "input": inputs})
        assert r.status_code == 200, r.text
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        r = c.post("/v1/classify", json={"input": inputs, "top_k": 2})
        assert r.status_code == 200 and [len(d["labels"]) for d in r.json()["data"]] == [2, 2]
        r = c.post("/v1/embeddings", json={"input": [inputs[0], base64.b64encode(b"nope").decode()]})
        assert r.status_code == 400 and r.json()["error"]["inputs"][0]["index"] == 1
        assert c.get("/health").json()["status"] == "ok"
        assert "fastvit_batch_size_count" in c.get("/metrics").text
    serve.delete("tiny")


def test_deployment_argument_checks():
    with pytest.raises(ValueError, match="exactly one source of the model"):
        deployment()
    with pytest.raises(ValueError, match="expected one of them, got both"):
        deployment(preset="vit_tiny_patch16_224", num_replicas=2, autoscaling_config={"max_replicas": 2})
    with pytest.raises(ValueError, match="preprocessor: expected"):
        deployment(torch.nn.Linear(1, 1))
