"""fastvit.compile: batch buckets, padding, eager fallback (CPU); graphs vs eager (GPU)."""

import pytest
import torch

import fastvit
from fastvit.graphs import bucket_for, pad_to


@pytest.mark.parametrize("batch, expected", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, None), (100, None)])
def test_bucket_is_the_smallest_that_fits(batch, expected):
    assert bucket_for(batch, [1, 2, 4, 8]) == expected


def test_pad_to_copies_rows_and_zeroes_the_rest():
    x = torch.randn(3, 2, 4, 4)
    static = torch.full((8, 2, 4, 4), float("nan"))
    out = pad_to(x, 8, out=static)
    assert out is static
    assert torch.equal(out[:3], x) and torch.equal(out[3:], torch.zeros(5, 2, 4, 4))
    assert torch.equal(pad_to(x, 3), x)
    with pytest.raises(ValueError, match="x: expected at most 2 rows for this bucket, got 3"):
        pad_to(x, 2)


def test_bad_buckets_are_a_clear_error():
    m = fastvit.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match="batch_sizes: expected positive ints"):
        fastvit.compile(m, batch_sizes=[0, 2])


def test_compile_without_cuda_runs_eagerly_and_says_why():
    m = fastvit.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    g = fastvit.compile(m, batch_sizes=[1, 4])
    assert g.fallback_reason is not None and "CUDA" in g.fallback_reason
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(g(x), m(x))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_graphs_match_eager_inside_and_outside_the_buckets(backend):
    if fastvit.backends.reasons(backend, "attention", torch.device("cuda"), dtype=torch.float16, head_dim=32):
        pytest.skip(f"{backend} cannot run here")
    m = fastvit.create_model("vit_small_patch16_224", img_size=64, depth=2, num_classes=10, backend=backend)
    m = m.cuda().half().eval()
    g = fastvit.compile(m, batch_sizes=[1, 2, 4, 8], dtype=torch.float16)
    assert g.fallback_reason is None and sorted(g._graphs) == [1, 2, 4, 8]
    for B in (1, 3, 8, 11):  # exact bucket, padded, largest, outside every bucket (eager)
        x = torch.randn(B, 3, 64, 64, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            ref = m(x)
        out = g(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_compile_uint8_input_without_cuda():
    m = fastvit.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    m.set_input_normalization((0.5,) * 3, (0.25,) * 3)
    g = fastvit.compile(m, batch_sizes=[1, 4], input_dtype=torch.uint8)
    assert g.dtype == torch.uint8 and g.fallback_reason is not None
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(g(x), m(x))
    with pytest.raises(ValueError, match="input_dtype: expected the model dtype torch.float32 or torch.uint8"):
        fastvit.compile(m, batch_sizes=[1], input_dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_graphs_with_uint8_static_inputs(backend):
    if fastvit.backends.reasons(backend, "attention", torch.device("cuda"), dtype=torch.bfloat16, head_dim=32):
        pytest.skip(f"{backend} cannot run here")
    m = fastvit.create_model("vit_small_patch16_224", img_size=64, depth=2, num_classes=10, backend=backend)
    m = m.cuda().to(torch.bfloat16).eval()
    g = fastvit.compile(m, batch_sizes=[1, 4], dtype=torch.bfloat16, input_dtype=torch.uint8)
    assert g.fallback_reason is None and all(v[1].dtype == torch.uint8 for v in g._graphs.values())
    for B in (1, 3, 6):
        x = torch.randint(0, 256, (B, 3, 64, 64), device="cuda", dtype=torch.uint8)
        with torch.no_grad():
            ref = m(x)
        torch.testing.assert_close(g(x), ref, atol=2e-2, rtol=2e-2)
