"""Attention launch order (Triton): the query blocks of one (batch, head) are adjacent program ids,
so CTAs that run together read the same K / V from L2 (issue: GPU readiness, point 3).

Checked in the interpreter by running the kernels' own ``_program`` decomposition in a probe
kernel that records, for every program id, the (batch, head, query block) it would work on; the
sm_80 / sm_90 compilation of the real kernels is in tests/test_aot.py.
"""

import importlib

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
att = importlib.import_module("fastvit.kernels.attention")


@triton.jit
def _probe(Out, H, N_Q, BLOCK_M: tl.constexpr):
    b, h, m = att._program(H, N_Q, BLOCK_M)
    pid = tl.program_id(0)
    tl.store(Out + pid * 3 + 0, b)
    tl.store(Out + pid * 3 + 1, h)
    tl.store(Out + pid * 3 + 2, m)


@pytest.mark.parametrize("B, H, N, block_m", [(2, 3, 197, 64), (1, 12, 50, 16), (3, 1, 1, 64)])
def test_query_blocks_of_one_head_are_adjacent(B, H, N, block_m):
    if not att.__dict__.get("_program"):
        pytest.fail("kernels/attention.py has no _program() launch-order helper")
    num_m = triton.cdiv(N, block_m)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.full((B * H * num_m, 3), -1, dtype=torch.int32, device=dev)
    _probe[(B * H * num_m,)](out, H, N, BLOCK_M=block_m)
    got = [tuple(r) for r in out.cpu().tolist()]
    want = [(b, h, m) for b in range(B) for h in range(H) for m in range(num_m)]
    assert got == want  # program id = ((b * H) + h) * num_m + m: m varies fastest
