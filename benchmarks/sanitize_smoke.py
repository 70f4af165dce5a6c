"""A small all-ops, all-GPU-backends run for ``compute-sanitizer`` (benchmarks/gpu_run.sh).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python -m benchmarks.sanitize_smoke

Every op of every available GPU backend (triton, cuda) runs once on small awkward shapes
(odd batch, N in {50, 197}, head dim 64 and 80, widths that are not block multiples) in fp16
and bf16, and its output is checked against the float32 reference (DESIGN.md tolerance rule).
With the caching allocator off, each tensor is its own cudaMalloc, so memcheck sees any read
or write past a tensor's end. Exit status 1 on a wrong result, 2 when no GPU backend runs.

Kernels run their heuristic configs (``FASTVIT_AUTOTUNE=0`` unless set): tuning would time every
candidate config under memcheck, minutes for what the check does not need.

``FASTVIT_SANITIZE_DEVICE=cpu`` (with ``TRITON_INTERPRET=1``) runs the same checks through the
Triton interpreter in fp16 only (its bf16 is wrong): that is how this script is checked on CPU
(``GPU_RUN_ALLOW_CPU=1 benchmarks/gpu_run.sh OUT sanitize``, run by tests/test_gpu_run.py).
"""

from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("FASTVIT_AUTOTUNE", "0")
DEVICE = torch.device(os.environ.get("FASTVIT_SANITIZE_DEVICE", "cuda"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fastvit import available_backends, ops  # noqa: E402
from fastvit import reference as R  # noqa: E402
from benchmarks.harness import load_test_utils  # noqa: E402

assert_close_rule = load_test_utils().assert_close_rule


def _cases(dt):
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=g) * scale).to(dt)

    for (B, N, H, d) in ((3, 197, 3, 64), (1, 50, 2, 80)):
        qkv = r(B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        yield f"attention B{B} N{N} H{H} d{d}", "attention", (q, k, v, None)
    D, hid = 200, 520
    x = r(3, 67, D)
    yield "layer_norm", "layer_norm", (x, r(D, scale=0.1) + 1, r(D, scale=0.1), 1e-6)
    yield "linear +LN +gelu +gamma +residual", "linear", (
        x, r(hid, D, scale=D ** -0.5), r(hid, scale=0.1), "gelu", r(hid, scale=0.5), r(3, 67, hid),
        r(D, scale=0.1) + 1, r(D, scale=0.1), 1e-6)
    yield "mlp +LN +residual", "mlp", (x, r(hid, D, scale=D ** -0.5), r(hid, scale=0.1), r(D, hid, scale=hid ** -0.5),
                                       r(D, scale=0.1), "gelu", None, r(3, 67, D), r(D, scale=0.1) + 1, r(D, scale=0.1),
                                       1e-6)
    yield "patch_embed 3x40x56 p8", "patch_embed", (r(3, 3, 40, 56), r(96, 3, 8, 8, scale=(3 * 64) ** -0.5),
                                                    r(96, scale=0.1), r(35, 96, scale=0.02), r(1, 96, scale=0.02),
                                                    False)


def main() -> int:
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_smoke: no CUDA device", file=sys.stderr)
        return 2
    avail = available_backends(DEVICE)
    dtypes = (torch.float16, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float16,)
    backends = [b for b in ("triton", "cuda") if avail[b][0]]
    for b in ("triton", "cuda"):
        if not avail[b][0]:
            print(f"sanitize_smoke: backend {b} skipped: {avail[b][1]}")
    if not backends:
        return 2
    failures = 0
    for b in backends:
        for dt in dtypes:
            for name, op, args in _cases(dt):
                try:
                    out = getattr(ops, op)(*args, backend=b)
                    if DEVICE.type == "cuda":
                        torch.cuda.synchronize()
                    ref_fn = getattr(R, op)
                    if op == "attention":
                        out = out.transpose(1, 2)
                    ref32 = ref_fn(*args, upcast=True)
                    lowp = ref_fn(*args)
                    if op == "attention":
                        ref32, lowp = ref32.transpose(1, 2), lowp.transpose(1, 2)
                    assert_close_rule(out, ref32.float(), lowp, name=f"{b} {name}")
                    print(f"ok   {b:<6} {str(dt)[6:]:<8} {name}")
                except Exception as e:  # report every case, then fail
                    failures += 1
                    print(f"FAIL {b:<6} {str(dt)[6:]:<8} {name}: {type(e).__name__}: {e}")
    print(f"sanitize_smoke: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
