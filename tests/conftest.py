"""Test session set-up.

Without a GPU the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before triton decorates any kernel, so it is set here, before anything imports fastvit.kernels.

``CUBLAS_WORKSPACE_CONFIG`` is set here too, before the first cuBLAS call of the session: the
``poison`` fixture turns on ``torch.use_deterministic_algorithms``, which on CUDA needs it.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from utils import poisoned  # noqa: E402 - after the environment above

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def hub_offline(monkeypatch):
    """huggingface_hub may only read its cache, whatever a test does (no network here, nor in CI):
    the conversion / weights test files use it for every test (pytestmark)."""
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison():
    """The one poisoning context for every backend: ``with poison(): out = ops.<op>(...)``.

    While active, every ``torch.empty`` (Python, or ``at::empty`` in C++) is NaN-filled, so an
    output element a backend never writes stays NaN (``utils.assert_all_written``). Use it
    around the op call only: the references are computed outside it.
    """
    return poisoned


@pytest.fixture
def full_precision():
    """float32 math stays float32 and the torch baseline accumulates in float32: TF32 off for
    matmuls and cuDNN convolutions (the reference patch_embed), and no reduced-precision
    split-K reductions in cuBLAS 16-bit GEMMs. No effect on the CPU."""
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
        (torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction"), \
        (torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction")
    saved = [getattr(obj, name) for obj, name in flags]
    for obj, name in flags:
        setattr(obj, name, False)
    yield
    for (obj, name), value in zip(flags, saved):
        setattr(obj, name, value)
