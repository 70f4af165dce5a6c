"""Backend ``cuda``: the CUDA C++ extension and its adapter (csrc/, installed as fastvit.cuda).

Without a GPU (CI): the extension is built once, through csrc/build.py as the backend's JIT build
does (the flags setup.py uses too), for sm_80 and sm_90 with ``-Xptxas -v``; every kernel's
registers / spills are recorded (artifacts/cuda_ptxas.json) and spills fail the test. setup.py's
extension is checked without compiling. The built module is imported and its argument validation
(TORCH_CHECK messages) exercised with CPU tensors, through the binding and through the backend's
functions. Declared limits, the reasons derived from them and the loader's reasons are checked.
What the GPU work depends on is checked in the sources and the machine code: the attention launch
order (query blocks of one head adjacent), no 64-bit division in the epilogue / attention kernels
(their SASS), and the cuBLASLt status names and fallback policy (through the built module).

With a GPU (``@pytest.mark.gpu``): every backend function against the float32 reference with the
DESIGN.md tolerance rule on awkward shapes in fp32 / fp16 / bf16 (attention also with a logit bias
and RoPE, linear / mlp also with swiglu and the hidden LayerNorm), the whole ViT on backend
``cuda``, agreement with the triton backend, determinism, compute-sanitizer,
``torch.compile(fullgraph=True)``, the cuBLASLt fallbacks / errors under forced statuses, and the
workspace made once per stream (and none made during a CUDA graph capture).
"""

import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import types
from collections import defaultdict

import pytest
import torch

from fastvit import cuda, ops, reference
from fastvit.cuda import build as cuda_build
from fastvit.facts import ACTIVATIONS, ATTENTION_FEATURES, GATED_ACTS, OPS, not_supported_reasons
from tests.utils import assert_close_rule, load_setup_py, realistic_init_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
BUILD_PY = os.path.join(CSRC, "build.py")
SETUP_PY = os.path.join(ROOT, "setup.py")
ARCHS = ("sm_80", "sm_90")
# Kernel families (substring of the mangled name) that must be in the build for every arch.
KERNELS = ("attn_fwd_tc", "attn_fwd_f32", "layer_norm_kernel", "epilogue_kernel", "swiglu_kernel",
           "patch_embed_prep_kernel")


# ------------------------------------------------------------------------------ build (CPU CI)
def parse_ptxas(log: str):
    """ptxas -v output -> list of dicts (kernel, arch, registers, stack, spill_stores, spill_loads)."""
    out, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2)}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(extension module, ptxas records): one build per test session for sm_80 + sm_90.

    ``python csrc/build.py`` runs the backend's JIT build in a subprocess so its compiler output
    (ninja prints each command's output, ptxas -v included) can be captured whole; the module is
    then loaded here from the same folder (ninja finds nothing to do)."""
    if cuda_build.cuda_home() is None:
        pytest.skip("no CUDA toolkit (nvcc / CUDA_HOME) on this machine")
    build_dir = str(tmp_path_factory.mktemp("cuda_build"))
    cmd = [sys.executable, BUILD_PY, "--build-dir", build_dir, "--archs", "8.0;9.0", "--verbose", "--ptxas-verbose"]
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, "extension build failed:\n" + log[-6000:]
    mod = cuda_build.build(build_dir=build_dir, archs="8.0;9.0", ptxas_verbose=True)
    return mod, parse_ptxas(log)


@pytest.mark.slow
def test_builds_for_sm80_sm90_without_spills(built):
    mod, recs = built
    assert f"{mod.SOURCES_DIGEST:016x}" == cuda_build.sources_digest()
    assert mod.MAX_HEAD_DIM == cuda.LIMITS.max_head_dim
    by_kernel = defaultdict(dict)
    for r in recs:
        by_kernel[r["kernel"]][r["arch"]] = r
    for fam in KERNELS:
        names = [k for k in by_kernel if fam in k]
        assert names, f"kernel family {fam}: not found in the ptxas output; kernels seen: {sorted(by_kernel)}"
        for k in names:
            assert set(ARCHS) <= set(by_kernel[k]), f"{k}: compiled for {sorted(by_kernel[k])}, expected {ARCHS}"
    # fp16 + bf16 x 8 padded head dims (16..128) of the tensor-core attention, for each arch.
    assert sum("attn_fwd_tc" in k for k in by_kernel) == 16
    report = []
    for r in recs:
        assert {"registers", "spill_stores", "spill_loads", "stack"} <= set(r), f"incomplete ptxas record {r}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['kernel']} on {r['arch']} spills: {r}"
        assert r["stack"] == 0, f"{r['kernel']} on {r['arch']} uses a stack frame: {r}"
        # 128-thread attention blocks: <= 128 registers keeps >= 4 blocks per SM by registers.
        limit = 128 if "attn_fwd" in r["kernel"] else 64
        assert r["registers"] <= limit, f"{r['kernel']} on {r['arch']}: {r['registers']} registers > {limit}"
        report.append(r)
    art = os.path.join(ROOT, "artifacts")
    os.makedirs(art, exist_ok=True)
    with open(os.path.join(art, "cuda_ptxas.json"), "w") as fh:
        json.dump(report, fh, indent=1)


def test_ptxas_parser_reads_spills():
    """The build test can only fail on spills if the parser sees them."""
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert parse_ptxas(log) == [{"kernel": "_Z3fooPf", "arch": "sm_90", "stack": 8, "spill_stores": 12,
                                 "spill_loads": 16, "registers": 255}]


# Loads setup.py's helpers the way setup.py loads csrc/build.py (by path; setup() runs only as
# __main__), asks for the extension as an install with FASTVIT_BUILD_CUDA=1 would, and reports
# it, plus whether fastvit got imported on the way. A subprocess: this one imported fastvit.
_SETUP_PROBE = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("_fastvit_setup", {setup!r})
setup_py = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_py)
tool, ext = setup_py.cuda_extension()
print(json.dumps(dict(name=ext.name, sources=ext.sources, args=ext.extra_compile_args, build_py=tool.__file__,
                      same_flags=tool.build_options(archs="8.0;9.0"),
                      fastvit_imported=sorted(m for m in sys.modules if m.split(".")[0] == "fastvit"))))
"""


def test_setup_py_extension_is_fastvit_C_from_csrc_for_sm80_sm90(tmp_path):
    """What ``FASTVIT_BUILD_CUDA=1 pip install`` compiles, without compiling it."""
    if cuda_build.cuda_home() is None:
        pytest.skip("no CUDA toolkit (nvcc / CUDA_HOME) on this machine")
    env = dict(os.environ, FASTVIT_BUILD_CUDA="1")
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    proc = subprocess.run([sys.executable, "-c", _SETUP_PROBE.format(setup=SETUP_PY)], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["fastvit_imported"] == [], "setup.py must not import fastvit (it is not installed yet)"
    assert os.path.samefile(got["build_py"], BUILD_PY)
    assert got["name"] == "fastvit._C"
    assert sorted(got["sources"]) == sorted(f"csrc/{f}" for f in cuda_build.SOURCES)
    assert len(got["sources"]) == 5
    nvcc = got["args"]["nvcc"]
    assert [f for f in nvcc if "arch" in f] == ["-gencode=arch=compute_80,code=sm_80",
                                                "-gencode=arch=compute_90,code=sm_90"]
    assert "-Xptxas=-v" not in nvcc
    assert f"-DFASTVIT_SOURCES_DIGEST=0x{cuda_build.sources_digest()}ULL" in got["args"]["cxx"]
    # one set of flags: the JIT build's for the same archs
    assert nvcc == got["same_flags"]["extra_cuda_cflags"] and got["args"]["cxx"] == got["same_flags"]["extra_cflags"]


def test_setup_py_skips_the_extension_when_told_or_without_toolkit(monkeypatch, tmp_path):
    setup_py = load_setup_py()
    monkeypatch.setenv("FASTVIT_BUILD_CUDA", "0")
    assert setup_py.cuda_extension() is None
    monkeypatch.delenv("FASTVIT_BUILD_CUDA")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc
    assert setup_py.cuda_extension() is None


@pytest.mark.parametrize("archs,flags", [
    ("8.0;9.0", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]),
    ("9.0a", ["-gencode=arch=compute_90a,code=sm_90a"]),
    ("8.6 9.0+PTX", ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]),
])
def test_arch_flags(archs, flags):
    assert cuda_build.arch_flags(archs) == flags


def test_arch_flags_reject_names():
    with pytest.raises(ValueError, match=r"expected compute capabilities such as '8.0;9.0', got 'Hopper'"):
        cuda_build.arch_flags("Hopper")


def test_toolchain_lookup_finds_headers_and_cublaslt():
    home = cuda_build.cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit on this machine")
    assert os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
    opts = cuda_build.build_options()
    incs = opts["extra_include_paths"] + [os.path.join(home, "include")]
    assert any(os.path.isfile(os.path.join(i, "cublasLt.h")) for i in incs), incs
    assert any(f.startswith("-l") and "cublasLt" in f for f in opts["extra_ldflags"]), opts["extra_ldflags"]


# ------------------------------------------------------------------------------ bindings (CPU)
def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _qkv(d=16):
    """q (2, 3, 10, d), k and v (2, 3, 7, d) on the CPU: N = 10 and N_kv = 7 tell the checks apart."""
    return _t(2, 3, 10, d), _t(2, 3, 7, d), _t(2, 3, 7, d)


def _big(B, H, N, dtype, d=16):
    """A (B, H, N, d) view of d elements (strides (0, 0, 0, 1)): shapes past the grid limit, no memory."""
    return torch.zeros(1, 1, 1, d, dtype=dtype).expand(B, H, N, d)


VALIDATION_CASES = [
    # (op, args, exception, message pattern): argument, expected, actual
    ("linear", lambda: (_t(2, 3, 8), _t(5, 7), None, 0, None, None, None, None, 1e-6), RuntimeError,
     r"x: expected last dim 7 \(= weight.shape\[1\]\), got shape \[2, 3, 8\]"),
    ("linear", lambda: (_t(2, 8).int(), _t(5, 8), None, 0, None, None, None, None, 1e-6), TypeError,
     r"x: expected dtype float32, float16 or bfloat16, got Int"),
    ("linear", lambda: (_t(2, 8), _t(5, 8, dtype=torch.float16), None, 0, None, None, None, None, 1e-6), TypeError,
     r"weight: expected dtype Float \(as x\), got dtype Half"),
    ("linear", lambda: (_t(2, 8), _t(5, 8), _t(4), 0, None, None, None, None, 1e-6), RuntimeError,
     r"bias: expected shape \[5\], got shape \[4\]"),
    ("linear", lambda: (_t(2, 8), _t(5, 8), None, 0, None, _t(2, 6), None, None, 1e-6), RuntimeError,
     r"residual: expected shape \[2, 5\], got shape \[2, 6\]"),
    ("linear", lambda: (_t(2, 8), _t(5, 8), None, 5, None, None, None, None, 1e-6), RuntimeError,
     r"act: expected 0 \(none\), 1 \(gelu\), 2 \(gelu_tanh\), 3 \(quick_gelu\) or 4 \(swiglu\), got 5"),
    # swiglu: weight (2 N, K) with gate rows then value rows, bias (2 N,), gamma / residual of width N
    ("linear", lambda: (_t(2, 8), _t(5, 8), None, 4, None, None, None, None, 1e-6), RuntimeError,
     r"weight: expected an even number of rows with act 4 \(swiglu: gate rows, then value rows\), got shape \[5, 8\]"),
    ("linear", lambda: (_t(2, 8), _t(6, 8), _t(3), 4, None, None, None, None, 1e-6), RuntimeError,
     r"bias: expected shape \[6\], got shape \[3\]"),
    ("linear", lambda: (_t(2, 8), _t(6, 8), _t(6), 4, _t(6), None, None, None, 1e-6), RuntimeError,
     r"gamma: expected shape \[3\], got shape \[6\]"),
    ("linear", lambda: (_t(2, 8), _t(6, 8), _t(6), 4, None, _t(2, 6), None, None, 1e-6), RuntimeError,
     r"residual: expected shape \[2, 3\], got shape \[2, 6\]"),
    ("mlp", lambda: (_t(2, 8), _t(12, 8), None, _t(8, 12), None, 4, None, None, None, None, 1e-6), RuntimeError,
     r"fc2_weight: expected shape \(D_out, 6\), got shape \[8, 12\]"),
    ("mlp", lambda: (_t(2, 8), _t(11, 8), None, _t(8, 5), None, 4, None, None, None, None, 1e-6), RuntimeError,
     r"fc1_weight: expected an even number of rows with act 4 \(swiglu: gate rows, then value rows\), got shape "
     r"\[11, 8\]"),
    ("linear", lambda: (_t(2, 8), _t(5, 8), None, 0, None, None, None, _t(8), 1e-6), RuntimeError,
     r"ln_weight: expected a tensor when ln_bias is given, got None"),
    ("linear", lambda: (_t(8, 2).t(), _t(5, 8), None, 0, None, None, None, None, 1e-6), RuntimeError,
     r"x: expected a last dim with stride 1, got strides \[1, 2\]"),
    ("mlp", lambda: (_t(2, 8), _t(5, 8), None, _t(8, 6), None, 1, None, None, None, None, 1e-6), RuntimeError,
     r"fc2_weight: expected shape \(D_out, 5\), got shape \[8, 6\]"),
    ("layer_norm", lambda: (_t(3, 8), _t(7), None, 1e-6), RuntimeError,
     r"weight: expected shape \[8\], got shape \[7\]"),
    ("attention", lambda: (_t(2, 3, 10, 160), _t(2, 3, 10, 160), _t(2, 3, 10, 160), 1.0), RuntimeError,
     r"q: expected head dim 1..128, got head dim 160"),
    ("attention", lambda: (_t(2, 3, 10, 16), _t(2, 3, 10, 8), _t(2, 3, 10, 8), 1.0), RuntimeError,
     r"k: expected shape \(2, 3, N_kv, 16\) matching q \(B, H, N, d\), got shape \[2, 3, 10, 8\]"),
    ("attention", lambda: (_t(2, 3, 10, 16), _t(2, 3, 12, 16), _t(2, 3, 11, 16), 1.0), RuntimeError,
     r"v: expected shape \[2, 3, 12, 16\], got shape \[2, 3, 11, 16\]"),
    ("attention", lambda: (_t(2, 3, 16, 10).transpose(2, 3), _t(2, 3, 10, 16), _t(2, 3, 10, 16), 1.0), RuntimeError,
     r"q: expected a last dim with stride 1, got strides \[480, 160, 1, 10\]"),
    ("attention", lambda: (_t(2, 3, 10, 16, dtype=torch.float16), _t(2, 3, 10, 16), _t(2, 3, 10, 16), 1.0), TypeError,
     r"k: expected dtype Half \(as q\), got dtype Float"),
    # the 1-D grid: one block per (batch, head, 64 query rows; 4 in fp32) must fit gridDim.x
    ("attention", lambda: (_big(1 << 14, 1 << 10, 1 << 13, torch.float16),) * 3 + (1.0,), RuntimeError,
     r"q: expected B \* H \* ceil\(N / 64\) <= 2147483647 \(the launch's gridDim.x limit\), got shape "
     r"\[16384, 1024, 8192, 16\], i.e. 2147483648 blocks"),
    ("attention", lambda: (_big(1 << 16, 1 << 10, 1 << 9, torch.float32),) * 3 + (1.0,), RuntimeError,
     r"q: expected B \* H \* ceil\(N / 4\) <= 2147483647 \(the launch's gridDim.x limit\), got shape "
     r"\[65536, 1024, 512, 16\], i.e. 8589934592 blocks"),
    # bias (H, N, N_kv) or (1 | B, H, N, N_kv), any float dtype, unit last stride, q's device
    ("attention", lambda: _qkv() + (0.25, _t(3, 10, 8)), RuntimeError,
     r"bias: expected shape \(3, 10, 7\) or \(2, 3, 10, 7\) \(H, N, N_kv of q / k\), got shape \[3, 10, 8\]"),
    ("attention", lambda: _qkv() + (0.25, _t(3, 3, 10, 7)), RuntimeError,
     r"bias: expected shape \(3, 10, 7\) or \(2, 3, 10, 7\) \(H, N, N_kv of q / k\), got shape \[3, 3, 10, 7\]"),
    ("attention", lambda: _qkv() + (0.25, _t(10, 7)), RuntimeError,
     r"bias: expected shape \(3, 10, 7\) or \(2, 3, 10, 7\) \(H, N, N_kv of q / k\), got shape \[10, 7\]"),
    ("attention", lambda: _qkv() + (0.25, _t(3, 10, 7).int()), TypeError,
     r"bias: expected dtype float32, float16 or bfloat16, got Int"),
    ("attention", lambda: _qkv() + (0.25, _t(7, 10, 3).transpose(0, 2)), RuntimeError,
     r"bias: expected a last dim with stride 1, got strides \[1, 3, 30\]"),
    ("attention", lambda: _qkv() + (0.25, _t(3, 10, 7, device="meta")), RuntimeError,
     r"bias: expected device cpu \(as q\), got device meta"),
    # rope (N_r, 2 d) or (H, N_r, 2 d), 0 < N_r <= min(N, N_kv), even d, unit last stride
    ("attention", lambda: _qkv() + (0.25, None, _t(8, 32)), RuntimeError,
     r"rope: expected shape \(N_r, 32\) or \(3, N_r, 32\) \(cat\(\[sin, cos\], -1\) with 0 < N_r <= "
     r"min\(N, N_kv\) = 7\), got shape \[8, 32\]"),
    ("attention", lambda: _qkv() + (0.25, None, _t(5, 16)), RuntimeError,
     r"rope: expected shape \(N_r, 32\) or \(3, N_r, 32\) .* got shape \[5, 16\]"),
    ("attention", lambda: _qkv() + (0.25, None, _t(2, 5, 32), True), RuntimeError,
     r"rope: expected shape \(N_r, 32\) or \(3, N_r, 32\) .* got shape \[2, 5, 32\]"),
    ("attention", lambda: _qkv() + (0.25, None, _t(0, 32)), RuntimeError,
     r"rope: expected shape \(N_r, 32\) or \(3, N_r, 32\) .* got shape \[0, 32\]"),
    ("attention", lambda: _qkv(d=15) + (0.25, None, _t(5, 30)), RuntimeError,
     r"q: expected an even head dim with rope, got head dim 15"),
    ("attention", lambda: _qkv() + (0.25, None, _t(32, 5).t()), RuntimeError,
     r"rope: expected a last dim with stride 1, got strides \[1, 5\]"),
    ("attention", lambda: _qkv() + (0.25, None, _t(5, 32).bool()), TypeError,
     r"rope: expected dtype float32, float16 or bfloat16, got Bool"),
    ("patch_embed", lambda: (_t(1, 3, 30, 32), _t(8, 3, 16, 16), None, None, None, False), RuntimeError,
     r"x: expected height and width multiples of the patch size \(16, 16\) \(or pad=True\), got image size \(30, 32\)"),
    ("patch_embed", lambda: (_t(1, 3, 30, 32), _t(8, 3, 16, 16), None, _t(3, 8), None, True), RuntimeError,
     r"pos_embed: expected shape \[4, 8\], got shape \[3, 8\]"),
    ("patch_embed", lambda: (_t(1, 4, 32, 32), _t(8, 3, 16, 16), None, None, None, False), RuntimeError,
     r"x: expected 3 input channels \(B, 3, H, W\), got shape \[1, 4, 32, 32\]"),
    ("patch_embed", lambda: (_t(1, 3, 32, 32), _t(8, 3, 16, 16), None, None, _t(1, 9), False), RuntimeError,
     r"prefix: expected shape \(T, 8\), got shape \[1, 9\]"),
]


@pytest.mark.slow
@pytest.mark.parametrize("op,make_args,exc,pattern", VALIDATION_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(VALIDATION_CASES)])
def test_binding_validation_names_argument_expected_actual(built, op, make_args, exc, pattern):
    mod, _ = built
    with pytest.raises(exc, match=pattern):
        getattr(mod, op)(*make_args())


@pytest.mark.slow
@pytest.mark.parametrize("op,args", [
    ("linear", lambda: (_t(2, 8), _t(5, 8), _t(5), 1, _t(5), _t(2, 5), _t(8), _t(8), 1e-6)),
    ("mlp", lambda: (_t(2, 8), _t(6, 8), _t(6), _t(8, 6), _t(8), 2, None, None, None, None, 1e-6)),
    ("layer_norm", lambda: (_t(3, 8), _t(8), _t(8), 1e-6)),
    ("attention", lambda: (_t(2, 3, 10, 16), _t(2, 3, 7, 16), _t(2, 3, 7, 16), 0.25)),
    ("attention", lambda: _qkv() + (0.25, _t(3, 10, 7, dtype=torch.bfloat16), _t(3, 5, 32), True)),
    ("attention", lambda: _qkv() + (0.25, _t(1, 3, 10, 7), _t(7, 32, dtype=torch.float16), False)),
    ("attention", lambda: _qkv() + (0.25, _t(2, 3, 10, 9)[..., :7], None, False)),
    ("linear", lambda: (_t(2, 8), _t(6, 8), _t(6), 4, _t(3), _t(2, 3), _t(8), _t(8), 1e-6)),
    ("mlp", lambda: (_t(2, 8), _t(12, 8), _t(12), _t(8, 6), _t(8), 4, _t(8), _t(2, 8), None, None, 1e-6)),
    ("patch_embed", lambda: (_t(2, 3, 32, 48), _t(8, 3, 16, 16), _t(8), _t(6, 8), _t(1, 8), False)),
])
def test_binding_rejects_cpu_tensors_after_validating_everything_else(built, op, args):
    """Well-formed CPU inputs pass every shape / dtype check and stop at the device check."""
    mod, _ = built
    name = "q" if op == "attention" else "x"
    with pytest.raises(RuntimeError, match=rf"{name}: expected a CUDA tensor, got device cpu"):
        getattr(mod, op)(*args())


# Well-formed CPU inputs, in the backend functions' argument order (act as a string).
BACKEND_CALLS = [
    ("linear", lambda: (_t(2, 8), _t(5, 8), _t(5), "gelu", _t(5), _t(2, 5), _t(8), _t(8), 1e-6)),
    ("mlp", lambda: (_t(2, 8), _t(6, 8), _t(6), _t(8, 6), _t(8), "gelu_tanh", None, None, None, None, 1e-6)),
    ("layer_norm", lambda: (_t(3, 8), _t(8), _t(8), 1e-6)),
    ("attention", lambda: (_t(2, 3, 10, 16), _t(2, 3, 7, 16), _t(2, 3, 7, 16), 0.25)),
    # bias and rope tell every position apart: a swapped one fails its shape check first
    ("attention", lambda: _qkv() + (0.25, _t(2, 3, 10, 7), _t(3, 5, 32), True)),
    ("linear", lambda: (_t(2, 8), _t(6, 8), _t(6), "swiglu", _t(3), _t(2, 3), _t(8), _t(8), 1e-6)),
    ("mlp", lambda: (_t(2, 8), _t(12, 8), _t(12), _t(5, 6), _t(5), "swiglu", _t(5), _t(2, 5), _t(8), _t(8), 1e-6)),
    ("patch_embed", lambda: (_t(2, 3, 32, 48), _t(8, 3, 16, 16), _t(8), _t(6, 8), _t(1, 8), False)),
]


@pytest.mark.slow
@pytest.mark.parametrize("op,args", BACKEND_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BACKEND_CALLS)])
def test_backend_functions_reach_the_binding_with_every_argument(built, monkeypatch, op, args):
    """fastvit.cuda's functions pass their arguments in the binding's order (a misplaced one would
    fail a shape / dtype check first), with the activation as its code."""
    mod, _ = built
    monkeypatch.setattr(cuda, "_ext", mod)
    assert cuda.available() is None
    name = "q" if op == "attention" else "x"
    with pytest.raises(RuntimeError, match=rf"{name}: expected a CUDA tensor, got device cpu"):
        getattr(cuda, op)(*args())


# ------------------------------------------------------------------------------ what the GPU relies on (CPU CI)
def _code(path: str) -> str:
    """A C++ / CUDA source without its comments (so prose cannot satisfy or fail a check)."""
    with open(path) as fh:
        text = fh.read()
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def test_attention_launch_is_1d_with_query_blocks_of_a_head_adjacent():
    """blockIdx.x = (b * H + h) * num_m + m, as the Triton kernel: the query blocks of one (batch,
    head) run next to each other, so that head's K / V are read from HBM once, then from L2."""
    code = _code(os.path.join(CSRC, "attention.cu"))
    assert not re.search(r"\bdim3\b|blockIdx\.[yz]|gridDim\.[yz]", code), "attention must launch a 1-D grid"
    launches = re.findall(r"(attn_fwd_\w+)(?:<[^<>]*>)?<<<([^,]+),", code)
    assert {k for k, _ in launches} == {"attn_fwd_tc", "attn_fwd_f32"}, launches
    for kernel, grid in launches:
        assert re.fullmatch(r"\s*(static_cast<unsigned>\()?blocks\)?\s*", grid), f"{kernel}: grid {grid!r}"
    assert re.search(r"\bblocks\s*=\s*attention_grid_blocks\(dt, B, H, N\)", code)
    assert re.search(r"\bblocks\s*>\s*kMaxGridX\)\s*return", code), "the gridDim.x limit is checked before launching"
    # m fastest: (b, h) = blockIdx.x / num_m, m = blockIdx.x mod num_m, then b = bh / H, h = bh mod H
    coords = re.search(r"void block_coords\([^)]*\)\s*\{(.*?)\n\}", code, re.S)
    assert coords, "block_coords not found"
    body = re.sub(r"static_cast<\w+>", "", coords.group(1))
    assert re.search(r"bh\s*=\s*blockIdx\.x\s*/\s*\(?p\.num_m\)?", body), body
    assert re.search(r"\*m_blk\s*=\s*\(?blockIdx\.x\s*-\s*bh\s*\*\s*\(?p\.num_m\)?", body), body
    assert re.search(r"\*b\s*=\s*\(?bh\s*/\s*\(?p\.H\)?", body), body
    assert re.search(r"\*h\s*=\s*\(?bh\s*-\s*\(?\*b\)?\s*\*\s*\(?p\.H\)?", body), body
    for kernel in ("attn_fwd_tc", "attn_fwd_f32"):
        m = re.search(rf"__global__ void __launch_bounds__\([^)]*\) {kernel}\(.*?\n\}}", code, re.S)
        assert m and "block_coords(p, &b, &h, &m_blk);" in m.group(0), f"{kernel} does not use block_coords"
    header = _code(os.path.join(CSRC, "fastvit_cuda.h"))
    assert re.search(r"kMaxGridX\s*=\s*0x7fffffff;", header)


def _sass_tool(name: str):
    """cuobjdump / nvdisasm: the toolkit's, else the copy in the triton wheel (found, not imported)."""
    home = cuda_build.cuda_home()
    cands = [os.path.join(home, "bin", name)] if home else []
    spec = importlib.util.find_spec("triton")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        cands.append(os.path.join(loc, "backends", "nvidia", "bin", name))
    return next((c for c in cands if os.access(c, os.X_OK)), None)


def _sass(cuobjdump: str, path: str, arch: str) -> dict:
    """{mangled kernel name: its SASS} of one arch of a binary (.so, .o or .cubin)."""
    proc = subprocess.run([cuobjdump, "-sass", "-arch", arch, path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    parts = re.split(r"\n\s*Function : (\S+)\n", proc.stdout)
    return dict(zip(parts[1::2], parts[2::2]))


# The reciprocal estimate that starts nvcc's 64-bit integer division / remainder routine (a called
# subroutine of ~100 instructions); 32-bit division uses I2F.U32.RP inline.
DIV64_MARKER = "I2F.U64.RP"


@pytest.mark.slow
def test_epilogue_and_attention_kernels_do_no_64bit_division(built, tmp_path):
    """The epilogues map rows once per row and columns / rows with 32-bit math; attention splits
    blockIdx.x in 32 bits (and its RoPE pass divides nothing). The marker is first shown to catch a
    64-bit division with this toolkit."""
    mod, _ = built
    cuobjdump = _sass_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit bin/ or the triton wheel)")
    probe = tmp_path / "div64.cu"
    probe.write_text("__global__ void div64(long long* o, long long n, long long d) {\n"
                     "  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n"
                     "  o[i] = (i + n) / d + (i + n) % d;\n}\n")
    nvcc = os.path.join(cuda_build.cuda_home(), "bin", "nvcc")
    proc = subprocess.run([nvcc, "-cubin", "-O3", "-arch=sm_90", "-o", str(tmp_path / "div64.cubin"), str(probe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert DIV64_MARKER in "".join(_sass(cuobjdump, str(tmp_path / "div64.cubin"), "sm_90").values())
    for arch in ARCHS:
        kernels = _sass(cuobjdump, mod.__file__, arch)
        checked = [k for k in kernels if "epilogue_kernel" in k or "swiglu_kernel" in k or "attn_fwd" in k]
        assert sum("epilogue_kernel" in k for k in checked) == 3, sorted(kernels)  # fp32, fp16, bf16
        assert sum("swiglu_kernel" in k for k in checked) == 3, sorted(kernels)
        assert sum("attn_fwd" in k for k in checked) == 17, sorted(kernels)  # 16 tensor-core + fp32
        for k in checked:
            assert DIV64_MARKER not in kernels[k], f"{k} on {arch}: 64-bit integer division in its SASS"


def _cublas_statuses() -> dict:
    """{name: code} of ``cublasStatus_t`` in the cublas_api.h the extension is compiled against."""
    home = cuda_build.cuda_home()
    dirs = cuda_build.build_options()["extra_include_paths"] + ([os.path.join(home, "include")] if home else [])
    path = next((os.path.join(d, "cublas_api.h") for d in dirs if os.path.isfile(os.path.join(d, "cublas_api.h"))))
    with open(path) as fh:
        m = re.search(r"typedef\s+enum\s*\{([^}]*)\}\s*cublasStatus_t\s*;", fh.read())
    assert m, f"cublasStatus_t not found in {path}"
    return {k: int(v) for k, v in re.findall(r"(CUBLAS_STATUS_\w+)\s*=\s*(\d+)", m.group(1))}


@pytest.mark.slow
def test_cublas_status_names_and_fallback_policy(built):
    """Errors name the status; configuration failures fall back to a plainer call, the rest raise."""
    mod, _ = built
    statuses = _cublas_statuses()
    assert len(statuses) >= 10 and statuses["CUBLAS_STATUS_SUCCESS"] == 0
    for name, code in statuses.items():
        assert mod.cublas_status_name(code) == name
    assert mod.cublas_status_name(12345) == "CUBLAS_STATUS_UNKNOWN"
    falls_back = {name for name, code in statuses.items() if mod.cublas_status_falls_back(code)}
    assert falls_back == {"CUBLAS_STATUS_NOT_SUPPORTED", "CUBLAS_STATUS_INVALID_VALUE", "CUBLAS_STATUS_ARCH_MISMATCH"}
    assert not mod.cublas_status_falls_back(12345)  # a status newer than the policy raises


# ------------------------------------------------------------------------------ limits and reasons
def test_face_is_limits_available_and_one_function_per_declared_op():
    lim = cuda.LIMITS
    assert lim.name == "cuda" and lim.ops == frozenset(OPS) - {"attention_probs", "attention_varlen"}
    assert lim.devices == ("cuda",) and lim.min_capability == (8, 0) and lim.acts == ACTIVATIONS
    assert lim.features == {"attention.bias", "attention.rope", "attention.rope_per_head"}
    assert set(cuda.__all__) == {"LIMITS", "available"} | set(lim.ops)
    for op in OPS:
        assert callable(getattr(cuda, op, None)) == (op in lim.ops), op


def test_reasons_derived_from_limits():
    lim, gpu, h100 = cuda.LIMITS, torch.device("cuda"), (9, 0)
    assert not_supported_reasons(lim, "attention", gpu, torch.float16, 128, capability=h100) == []
    assert not_supported_reasons(lim, "linear", gpu, torch.bfloat16, act="gelu_tanh", capability=h100) == []
    assert not_supported_reasons(lim, "layer_norm", torch.device("cpu"), torch.float32) == [
        "cuda needs a CUDA tensor, got device 'cpu'"]
    assert not_supported_reasons(lim, "attention", gpu, torch.float16, 160, capability=h100) == [
        "cuda attention supports head dim <= 128, got 160"]
    assert not_supported_reasons(lim, "attention_probs", gpu, torch.float16, 64, capability=h100) == [
        "cuda has no attention_probs kernel"]
    assert not_supported_reasons(lim, "mlp", gpu, torch.float16, capability=(7, 5)) == [
        "cuda needs compute capability >= 8.0, device has 7.5"]
    assert "has no activation 'relu'" in not_supported_reasons(lim, "linear", gpu, act="relu", capability=h100)[0]
    assert not_supported_reasons(lim, "mlp", gpu, torch.bfloat16, act="swiglu", capability=h100) == []
    every = tuple(f"attention.{f}" for f in ATTENTION_FEATURES)
    assert not_supported_reasons(lim, "attention", gpu, torch.float16, 64, features=every, capability=h100) == []
    # attention_probs stays on the torch backend, with or without position terms
    assert not_supported_reasons(lim, "attention_probs", gpu, torch.float16, 64, features=("attention_probs.bias",),
                                 capability=h100) == ["cuda has no attention_probs kernel",
                                                      "cuda does not support attention_probs.bias"]


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """Forget the loaded extension for one test, hide any prebuilt fastvit._C and keep JIT builds
    out of the user's cache."""
    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "_error", None)
    monkeypatch.setitem(sys.modules, "fastvit._C", None)  # import of fastvit._C raises ImportError
    monkeypatch.setenv("FASTVIT_CUDA_CACHE", str(tmp_path / "cache"))
    return cuda


def test_missing_sources_become_the_reason(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTVIT_CSRC", str(tmp_path))
    reason = fresh_loader.available()
    assert reason is not None and "no CUDA sources in" in reason and str(tmp_path) in reason
    assert fresh_loader.available() == reason  # recorded once, not retried


def test_missing_toolkit_becomes_the_reason(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(cuda_build, "_is_cuda_root", lambda path: False)
    reason = fresh_loader.available()
    assert reason is not None and "CUDA extension unavailable" in reason and "no CUDA toolkit" in reason
    assert not os.path.exists(tmp_path / "cache")


def test_jit_disabled_becomes_the_reason(fresh_loader, monkeypatch):
    monkeypatch.setenv("FASTVIT_CUDA_JIT", "0")
    reason = fresh_loader.available()
    assert reason is not None and "no prebuilt fastvit._C" in reason and "FASTVIT_CUDA_JIT=0" in reason


def test_prebuilt_module_is_used_only_when_built_from_these_sources(fresh_loader, monkeypatch):
    monkeypatch.setenv("FASTVIT_CUDA_JIT", "0")
    current = types.ModuleType("fastvit._C")
    current.SOURCES_DIGEST = int(cuda_build.sources_digest(), 16)
    monkeypatch.setitem(sys.modules, "fastvit._C", current)
    assert fresh_loader.available() is None and fresh_loader._ext is current

    monkeypatch.setattr(cuda, "_ext", None)
    stale = types.ModuleType("fastvit._C")
    stale.SOURCES_DIGEST = current.SOURCES_DIGEST ^ 1
    monkeypatch.setitem(sys.modules, "fastvit._C", stale)
    reason = fresh_loader.available()
    assert reason is not None and "compiled from other sources than" in reason and "FASTVIT_CUDA_JIT=0" in reason


def test_import_builds_nothing():
    """Importing the backend (what fastvit.backends does on any machine) loads no extension."""
    code = ("import sys, fastvit.cuda as c; "
            "assert c._ext is None and c._error is None; "
            "assert 'torch.utils.cpp_extension' not in sys.modules; "
            "assert not any(m.startswith('fastvit_cuda_') or m == 'fastvit._C' for m in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ GPU correctness
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 references must be fp32: cuDNN convolutions (the reference patch_embed) default to TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _poison_allocator(nbytes: int = 64 << 20):
    """Leave NaNs in the caching allocator's free blocks, so that an output the kernel forgets to
    write shows up as NaN (outputs are allocated inside the extension)."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def _close(out, fn_ref, fn_lowp, dtype, atol=0.0, name="out"):
    """DESIGN rule: |out - oracle| <= 2 |torch in out's dtype - oracle| + one rounding step + atol."""
    assert_close_rule(out, fn_ref(), fn_lowp(), atol=atol, name=name)


def _oracle(dtype):
    """(convert, upcast) for the oracle: float32 math for fp16 / bf16 outputs; for fp32 outputs the
    oracle runs in float64, so the torch fp32 path gives the baseline error (summation order)."""
    if dtype == torch.float32:
        return (lambda t: None if t is None else t.double()), False
    return (lambda t: None if t is None else t.float()), True


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,Nkv", [(1, 1), (2, 2), (50, 50), (197, 197), (257, 257), (577, 577), (1025, 1025),
                                   (10, 130)])
@pytest.mark.parametrize("d", [32, 48, 64, 80, 96, 128, 40])
def test_attention_matches_reference(dtype, N, Nkv, d):
    B, H = 3, 2
    if N == Nkv:  # views of a packed (B, N, 3, H, d) qkv buffer, as the model passes them
        qkv = torch.randn(B, N, 3, H, d, device="cuda", dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = torch.randn(B, H, N, d, device="cuda", dtype=dtype)
        k = torch.randn(B, Nkv, H, d, device="cuda", dtype=dtype).transpose(1, 2)
        v = torch.randn(B, H, Nkv, d, device="cuda", dtype=dtype)
    _poison_allocator()
    out = cuda.attention(q, k, v, d ** -0.5)
    assert out.shape == (B, H, N, d) and out.transpose(1, 2).is_contiguous()
    hi, up = _oracle(dtype)
    _close(out, lambda: reference.attention(hi(q), hi(k), hi(v), upcast=up),
           lambda: reference.attention(q, k, v), dtype, atol=1e-5 if dtype == torch.float32 else 0.0)


def _attn_inputs(dtype, B, H, N, Nkv, d):
    """q, k, v as the model passes them: views of one packed qkv buffer when N == N_kv, else
    separate tensors (k transposed: a non-contiguous view)."""
    if N == Nkv:
        qkv = torch.randn(B, N, 3, H, d, device="cuda", dtype=dtype)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = torch.randn(B, H, N, d, device="cuda", dtype=dtype)
    k = torch.randn(B, Nkv, H, d, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(B, H, Nkv, d, device="cuda", dtype=dtype)
    return q, k, v


def _attn_bias(kind, B, H, N, Nkv, dtype):
    """A BEiT-like logit bias of layout ``kind``: 'hnk' (H, N, N_kv) broadcast over the batch,
    'bhnk' (B, H, N, N_kv), '1hnk' (1, H, N, N_kv), 'sliced' a (B, H, N, N_kv) view with padded rows."""
    dev = "cuda"
    if kind == "hnk":
        return 2 * torch.randn(H, N, Nkv, device=dev, dtype=dtype)
    if kind == "1hnk":
        return 2 * torch.randn(1, H, N, Nkv, device=dev, dtype=dtype)
    if kind == "sliced":
        return (2 * torch.randn(B, H, N, Nkv + 5, device=dev, dtype=dtype))[..., :Nkv]
    return 2 * torch.randn(B, H, N, Nkv, device=dev, dtype=dtype)


def _rope_table(H, N_r, d, per_head, dtype=torch.float32):
    """cat([sin, cos], -1) of random angles: (N_r, 2 d) or (H, N_r, 2 d). Every column has its own
    angle (timm's tables repeat each one twice), so reading the wrong column of sin / cos fails."""
    ang = torch.rand(*((H,) if per_head else ()), N_r, d, device="cuda") * (8 * math.pi)
    return torch.cat([ang.sin(), ang.cos()], -1).to(dtype)


def _check_attention(q, k, v, dtype, bias=None, rope=None, rope_half=False, name="out"):
    B, H, N, d = q.shape
    _poison_allocator()
    out = cuda.attention(q, k, v, d ** -0.5, bias, rope, rope_half)
    assert out.shape == (B, H, N, d) and out.transpose(1, 2).is_contiguous()
    hi, up = _oracle(dtype)
    _close(out, lambda: reference.attention(hi(q), hi(k), hi(v), bias=hi(bias), rope=rope, rope_half=rope_half,
                                            upcast=up),
           lambda: reference.attention(q, k, v, bias=bias, rope=rope, rope_half=rope_half), dtype,
           atol=1e-5 if dtype == torch.float32 else 0.0, name=name)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,Nkv", [(1, 1), (50, 50), (197, 197), (577, 577), (10, 130)])
@pytest.mark.parametrize("d", [40, 64, 128])
@pytest.mark.parametrize("kind,bias_dtype", [("hnk", None), ("bhnk", torch.float32), ("1hnk", torch.bfloat16),
                                             ("sliced", torch.float16)])
def test_attention_bias_matches_reference(dtype, N, Nkv, d, kind, bias_dtype):
    """The bias in any float dtype (read as it is), broadcast or per image, strided rows."""
    q, k, v = _attn_inputs(dtype, 3, 2, N, Nkv, d)
    bias = _attn_bias(kind, 3, 2, N, Nkv, bias_dtype or dtype)
    _check_attention(q, k, v, dtype, bias=bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Nkv,masked", [(130, 64), (130, 100), (70, 32), (200, 0)])
def test_attention_bias_with_masked_keys(dtype, Nkv, masked):
    """-inf bias entries (masked keys), including whole leading key tiles of the tensor-core (64 keys)
    and fp32 (32 keys) kernels: the online softmax must not turn exp2(-inf - -inf) into NaN."""
    B, H, N, d = 2, 3, 67, 64
    q, k, v = _attn_inputs(dtype, B, H, N, Nkv, d)
    bias = torch.randn(H, N, Nkv, device="cuda")
    bias[..., :masked] = -math.inf
    bias[:, ::3, masked + 7:] = -math.inf  # every third row keeps only keys masked .. masked + 6
    _check_attention(q, k, v, dtype, bias=bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,Nkv,N_r", [(1, 1, 1), (50, 50, 49), (197, 197, 196), (257, 257, 256), (64, 64, 64),
                                       (10, 130, 10), (130, 10, 5)])
@pytest.mark.parametrize("d", [40, 64, 128])
@pytest.mark.parametrize("rope_half", [False, True], ids=["pairs", "halves"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_attention_rope_matches_reference(dtype, N, Nkv, N_r, d, rope_half, per_head):
    """The last N_r tokens of q and of k rotated (the prefix before them not), interleaved pairs or
    halves, one table or one per head; the per-head table in q's dtype, the shared one in float32."""
    B, H = 3, 2
    q, k, v = _attn_inputs(dtype, B, H, N, Nkv, d)
    rope = _rope_table(H, N_r, d, per_head, dtype if per_head else torch.float32)
    _check_attention(q, k, v, dtype, rope=rope, rope_half=rope_half)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_half", [False, True], ids=["pairs", "halves"])
def test_attention_rope_and_bias_together(dtype, rope_half):
    """An EVA-02 / BEiT-like block: class token + 196 rotated patch tokens, per-image bias."""
    B, H, N, d = 2, 4, 197, 64
    q, k, v = _attn_inputs(dtype, B, H, N, N, d)
    _check_attention(q, k, v, dtype, bias=_attn_bias("bhnk", B, H, N, N, dtype),
                     rope=_rope_table(H, N - 1, d, True), rope_half=rope_half)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rope_half", [False, True], ids=["pairs", "halves"])
def test_attention_rope_with_zero_angles_is_plain_attention(dtype, rope_half):
    """A table of zero angles (sin 0, cos 1) rotates by nothing: x * 1 + partner * 0 is x exactly, so
    the output equals the kernel without rope bit for bit (the rotation adds no rounding of its own);
    a random table changes it."""
    B, H, N, d = 2, 2, 70, 32
    q, k, v = _attn_inputs(dtype, B, H, N, N, d)
    zero = torch.cat([torch.zeros(H, N - 1, d, device="cuda"), torch.ones(H, N - 1, d, device="cuda")], -1)
    plain = cuda.attention(q, k, v, d ** -0.5)
    assert torch.equal(cuda.attention(q, k, v, d ** -0.5, None, zero, rope_half), plain)
    out = _check_attention(q, k, v, dtype, rope=_rope_table(H, N - 1, d, True), rope_half=rope_half)
    assert not torch.allclose(out, plain), "the rope table had no effect"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,sliced", [((3, 197, 768), False), ((5, 100), True), ((1, 33), False),
                                          ((2, 50, 4099), False)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_reference(dtype, shape, sliced, affine):
    D = shape[-1]
    x = torch.randn(*shape[:-1], D + (7 if sliced else 0), device="cuda", dtype=dtype) * 3 + 5
    x = x[..., :D]  # rows with a stride larger than D when sliced
    w = (1 + 0.1 * torch.randn(D, device="cuda", dtype=dtype)) if affine else None
    b = 0.1 * torch.randn(D, device="cuda", dtype=dtype) if affine else None
    _poison_allocator()
    out = cuda.layer_norm(x, w, b, 1e-6)
    hi, up = _oracle(dtype)
    _close(out, lambda: reference.layer_norm(hi(x), hi(w), hi(b), 1e-6, upcast=up),
           lambda: reference.layer_norm(x, w, b, 1e-6), dtype, atol=1e-5 if dtype == torch.float32 else 0.0)


def _linear_inputs(dtype, lead, K, N, bias, gamma, residual, ln, act=None):
    """x (*lead, K), weight (N, K) and the optional tensors; with a gated act the output (gamma,
    residual) is N / 2 wide."""
    dev = "cuda"
    Nout = N // 2 if act in GATED_ACTS else N
    x = torch.randn(*lead, K, device=dev, dtype=dtype)
    w = torch.randn(N, K, device=dev, dtype=dtype) / K ** 0.5
    kw = dict(bias=torch.randn(N, device=dev, dtype=dtype) if bias else None,
              gamma=(0.5 + torch.rand(Nout, device=dev, dtype=dtype)) if gamma else None,
              residual=torch.randn(*lead, Nout, device=dev, dtype=dtype) if residual else None)
    if ln:
        kw.update(ln_weight=1 + 0.1 * torch.randn(K, device=dev, dtype=dtype),
                  ln_bias=0.1 * torch.randn(K, device=dev, dtype=dtype), ln_eps=1e-6)
    return x, w, kw


def _linear_tail(kw):
    """gamma, residual, ln_weight, ln_bias, ln_eps of ``kw``, positionally (the backend's order)."""
    return kw["gamma"], kw["residual"], kw.get("ln_weight"), kw.get("ln_bias"), kw.get("ln_eps", 1e-6)


def _up(kw, hi):
    return {k: (hi(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N", [((2, 197), 192, 576), ((1,), 100, 77), ((3, 5), 48, 80), ((7,), 768, 3072)])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("bias,gamma,residual,ln", [(True, False, False, False), (False, False, False, False),
                                                    (True, False, True, False), (True, True, True, False),
                                                    (True, False, False, True), (True, True, True, True)])
def test_linear_matches_reference(dtype, lead, K, N, act, bias, gamma, residual, ln):
    x, w, kw = _linear_inputs(dtype, lead, K, N, bias, gamma, residual, ln)
    _poison_allocator()
    out = cuda.linear(x, w, kw["bias"], act, *_linear_tail(kw))
    hi, up = _oracle(dtype)
    _close(out, lambda: reference.linear(hi(x), hi(w), act=act, upcast=up, **_up(kw, hi)),
           lambda: reference.linear(x, w, act=act, **kw), dtype, atol=1e-5 if dtype == torch.float32 else 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("gamma,residual,ln", [(False, False, False), (True, True, True), (False, True, True)])
def test_mlp_matches_reference(dtype, act, gamma, residual, ln):
    D, Hd = 96, 384
    x, _, kw = _linear_inputs(dtype, (2, 50), D, D, False, gamma, residual, ln)
    del kw["bias"]  # mlp has fc1_bias / fc2_bias instead
    b1 = torch.randn(Hd, device="cuda", dtype=dtype)
    w1 = torch.randn(Hd, D, device="cuda", dtype=dtype) / D ** 0.5
    w2 = torch.randn(D, Hd, device="cuda", dtype=dtype) / Hd ** 0.5
    b2 = torch.randn(D, device="cuda", dtype=dtype)
    _poison_allocator()
    out = cuda.mlp(x, w1, b1, w2, b2, act, *_linear_tail(kw))
    hi, up = _oracle(dtype)
    _close(out, lambda: reference.mlp(hi(x), hi(w1), hi(b1), hi(w2), hi(b2), act, upcast=up, **_up(kw, hi)),
           lambda: reference.mlp(x, w1, b1, w2, b2, act, **kw), dtype, atol=1e-5 if dtype == torch.float32 else 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N", [((2, 197), 192, 1536), ((1,), 100, 154), ((3, 5), 48, 82), ((7,), 768, 4096)])
@pytest.mark.parametrize("bias,gamma,residual,ln", [(True, False, False, False), (False, False, False, False),
                                                    (True, True, True, False), (False, True, False, True),
                                                    (True, True, True, True)])
def test_linear_swiglu_matches_reference(dtype, lead, K, N, bias, gamma, residual, ln):
    """weight (N, K) = gate rows then value rows -> output N / 2 wide (odd N / 2 included)."""
    x, w, kw = _linear_inputs(dtype, lead, K, N, bias, gamma, residual, ln, act="swiglu")
    _poison_allocator()
    out = cuda.linear(x, w, kw["bias"], "swiglu", *_linear_tail(kw))
    assert out.shape == (*lead, N // 2)
    hi, up = _oracle(dtype)
    _close(out, lambda: reference.linear(hi(x), hi(w), act="swiglu", upcast=up, **_up(kw, hi)),
           lambda: reference.linear(x, w, act="swiglu", **kw), dtype, atol=1e-5 if dtype == torch.float32 else 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_swiglu_saturating_gate(dtype):
    """Gates far below zero (silu -> -0, exp(-g) overflows) and far above: finite, as the reference."""
    x, w, kw = _linear_inputs(dtype, (4, 33), 64, 256, True, False, False, False, act="swiglu")
    w[:128] *= 200  # gate rows: |g| up to ~1e3
    out = cuda.linear(x, w, kw["bias"], "swiglu", None, None, None, None, 1e-6)
    assert torch.isfinite(out).all()
    hi, up = _oracle(dtype)
    _close(out, lambda: reference.linear(hi(x), hi(w), hi(kw["bias"]), "swiglu", upcast=up),
           lambda: reference.linear(x, w, kw["bias"], "swiglu"), dtype, atol=1e-5 if dtype == torch.float32 else 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("hidden_ln", [False, True], ids=["plain", "sub_ln"])
@pytest.mark.parametrize("gamma,residual,ln", [(False, False, False), (True, True, True)])
def test_mlp_swiglu_and_sub_ln_match_reference(dtype, act, hidden_ln, gamma, residual, ln):
    """EVA-02's MLP: SwiGLU (fc1 (2 Hd, D)) and / or the hidden LayerNorm before fc2 (two linears)."""
    D, Hd = 96, 256
    rows = 2 * Hd if act in GATED_ACTS else Hd
    x, _, kw = _linear_inputs(dtype, (2, 50), D, D, False, gamma, residual, ln)
    del kw["bias"]
    dev = "cuda"
    w1 = torch.randn(rows, D, device=dev, dtype=dtype) / D ** 0.5
    b1 = torch.randn(rows, device=dev, dtype=dtype)
    w2 = torch.randn(D, Hd, device=dev, dtype=dtype) / Hd ** 0.5
    b2 = torch.randn(D, device=dev, dtype=dtype)
    hkw = dict(hidden_ln_weight=1 + 0.1 * torch.randn(Hd, device=dev, dtype=dtype),
               hidden_ln_bias=0.1 * torch.randn(Hd, device=dev, dtype=dtype), hidden_ln_eps=1e-5) if hidden_ln else {}
    _poison_allocator()
    out = cuda.mlp(x, w1, b1, w2, b2, act, *_linear_tail(kw), **hkw)
    hi, up = _oracle(dtype)
    _close(out, lambda: reference.mlp(hi(x), hi(w1), hi(b1), hi(w2), hi(b2), act, upcast=up, **_up(kw, hi),
                                      **_up(hkw, hi)),
           lambda: reference.mlp(x, w1, b1, w2, b2, act, **kw, **hkw), dtype,
           atol=1e-5 if dtype == torch.float32 else 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,patch,pad,T,pos,bias,x_dtype,channels_last", [
    (3, 3, 32, 48, (16, 16), False, 1, True, True, None, False),
    (1, 3, 30, 45, (16, 16), True, 0, False, False, None, False),
    (2, 3, 28, 42, (14, 14), False, 5, True, True, torch.float32, True),
    (5, 1, 24, 16, (8, 4), False, 0, True, True, None, False),
    (2, 4, 20, 20, (5, 5), True, 2, False, True, torch.float16, False),
])
def test_patch_embed_matches_reference(dtype, B, C, H, W, patch, pad, T, pos, bias, x_dtype, channels_last):
    D = 96
    dev = "cuda"
    x = torch.randn(B, C, H, W, device=dev, dtype=x_dtype or dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(D, C, *patch, device=dev, dtype=dtype) / (C * patch[0] * patch[1]) ** 0.5
    gh, gw = -(-H // patch[0]), -(-W // patch[1])
    kw = dict(bias=torch.randn(D, device=dev, dtype=dtype) if bias else None,
              pos_embed=torch.randn(gh * gw, D, device=dev, dtype=dtype) if pos else None,
              prefix=torch.randn(T, D, device=dev, dtype=dtype) if T else None)
    _poison_allocator()
    out = cuda.patch_embed(x, w, kw["bias"], kw["pos_embed"], kw["prefix"], pad)
    assert out.shape == (B, T + gh * gw, D) and out.dtype == dtype and out.is_contiguous()
    hi, up = _oracle(dtype)
    _close(out, lambda: reference.patch_embed(hi(x), hi(w), pad=pad, upcast=up, **_up(kw, hi)),
           lambda: reference.patch_embed(x, w, pad=pad, **kw), dtype, atol=1e-5 if dtype == torch.float32 else 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_gemm_fallback_paths_match_reference(dtype, monkeypatch):
    """The paths taken when cuBLASLt has no algorithm for an epilogue, a vector alpha or a
    strided batch: plain GEMM + elementwise epilogue, one GEMM per image."""
    monkeypatch.setenv("FASTVIT_CUDA_PLAIN_GEMM", "1")
    for act in (None, "gelu", "gelu_tanh", "quick_gelu"):
        for flags in [(True, True, True, True), (True, False, True, False), (False, False, False, False)]:
            test_linear_matches_reference(dtype, (2, 197), 192, 576, act, *flags)
    for flags in [(True, True, True, True), (True, False, False, False)]:
        test_linear_swiglu_matches_reference(dtype, (2, 197), 192, 1536, *flags)
    test_mlp_matches_reference(dtype, "gelu", True, True, True)
    test_mlp_swiglu_and_sub_ln_match_reference(dtype, "swiglu", True, True, True, True)
    test_patch_embed_matches_reference(dtype, 3, 3, 32, 48, (16, 16), False, 1, True, True, None, False)
    test_patch_embed_matches_reference(dtype, 2, 4, 20, 20, (5, 5), True, 2, False, True, torch.float16, False)
    test_patch_embed_matches_reference(dtype, 1, 3, 30, 45, (16, 16), True, 0, False, False, None, False)


@pytest.mark.gpu
@pytest.mark.parametrize("status", [7, 8, 15], ids=["INVALID_VALUE", "ARCH_MISMATCH", "NOT_SUPPORTED"])
def test_statuses_that_fall_back_take_the_plain_paths(status, monkeypatch):
    """Every cuBLASLt call with a plainer alternative reports `status`: the op still matches."""
    monkeypatch.setenv("FASTVIT_CUDA_LT_STATUS", str(status))
    dtype = torch.float16
    for act in (None, "gelu", "gelu_tanh", "quick_gelu"):
        for flags in [(True, True, True, True), (True, False, True, False), (False, True, False, False)]:
            test_linear_matches_reference(dtype, (2, 197), 192, 576, act, *flags)
    test_linear_swiglu_matches_reference(dtype, (2, 197), 192, 1536, True, True, True, False)
    test_mlp_matches_reference(dtype, "gelu", True, True, True)
    test_patch_embed_matches_reference(dtype, 3, 3, 32, 48, (16, 16), False, 1, True, True, None, False)
    test_patch_embed_matches_reference(dtype, 1, 3, 30, 45, (16, 16), True, 0, False, False, None, False)


@pytest.mark.gpu
@pytest.mark.parametrize("status,name", [(13, "CUBLAS_STATUS_EXECUTION_FAILED"), (3, "CUBLAS_STATUS_ALLOC_FAILED"),
                                         (14, "CUBLAS_STATUS_INTERNAL_ERROR"), (99, "CUBLAS_STATUS_UNKNOWN")])
def test_other_statuses_raise_naming_op_status_and_shapes(status, name, monkeypatch):
    monkeypatch.setenv("FASTVIT_CUDA_LT_STATUS", str(status))
    x, w, kw = _linear_inputs(torch.float16, (2, 197), 192, 576, True, True, True, False)
    tail = rf"failed with {name} \({status}\): x \(M, K\) = \(394, 192\), weight \(N, K\) = \(576, 192\), batch 1, " \
           r"dtype float16, epilogue"
    with pytest.raises(RuntimeError, match=r"cuBLASLt matmul for linear " + tail + r" \+ bias \+ gelu"):
        cuda.linear(x, w, kw["bias"], "gelu", None, None, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"cuBLASLt matmul for linear \(swiglu\) " + tail + r" \+ bias"):
        cuda.linear(x, w, kw["bias"], "swiglu", None, None, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"cuBLASLt matmul for linear \(gamma folded into alpha\) " + tail +
                       r" \+ bias \+ vector alpha \+ C operand"):
        cuda.linear(x, w, kw["bias"], None, kw["gamma"], kw["residual"], None, None, 1e-6)
    img = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.float16)
    pw, pb, prefix = (torch.randn(*s, device="cuda", dtype=torch.float16) for s in [(8, 3, 16, 16), (8,), (1, 8)])
    with pytest.raises(RuntimeError, match=rf"cuBLASLt matmul for patch_embed failed with {name} \({status}\): "
                       r"x \(M, K\) = \(4, 768\), weight \(N, K\) = \(8, 768\), batch 2, dtype float16, "
                       r"epilogue \+ bias"):
        cuda.patch_embed(img, pw, pb, None, prefix, False)
    # the plainest GEMM has no alternative: it runs for real and succeeds
    out = cuda.linear(x, w, None, None, None, None, None, None, 1e-6)
    torch.testing.assert_close(out.float(), x.float() @ w.float().t(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_lt_workspace_made_once_per_stream_and_reused():
    mod = cuda._loaded()
    dev = torch.cuda.current_device()
    x, w, kw = _linear_inputs(torch.float16, (2, 50), 96, 160, True, False, False, False)
    cuda.linear(x, w, kw["bias"], "gelu", None, None, None, None, 1e-6)
    here = torch.cuda.current_stream().cuda_stream
    before = mod.lt_workspaces()
    mine = [e for e in before if e[:2] == (dev, here)]
    assert len(mine) == 1, before
    for _ in range(3):
        cuda.linear(x, w, kw["bias"], None, None, None, None, None, 1e-6)
        cuda.mlp(x, w, None, w.t().contiguous(), None, "gelu_tanh", None, x, None, None, 1e-6)
    assert mod.lt_workspaces() == before  # same streams, same buffers
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda.linear(x, w, kw["bias"], None, None, None, None, None, 1e-6)
    torch.cuda.synchronize()
    after = mod.lt_workspaces()
    theirs = [e for e in after if e[:2] == (dev, side.cuda_stream)]
    assert len(theirs) == 1 and theirs[0][2] != mine[0][2]
    # every other stream's buffer is untouched (a pooled side stream may have one from an earlier test)
    assert [e for e in after if e not in theirs] == [e for e in before if e[:2] != (dev, side.cuda_stream)]


@pytest.mark.gpu
def test_graph_capture_makes_no_workspace_and_replays_correctly():
    """torch.cuda.graph captures on its own stream, which has no workspace (fastvit.graphs warms up
    on another): the capture borrows one from the graph's pool and caches nothing."""
    mod = cuda._loaded()
    x, w, kw = _linear_inputs(torch.float16, (2, 197), 192, 576, True, True, True, False)
    args = (x, w, kw["bias"], "gelu_tanh", kw["gamma"], kw["residual"], None, None, 1e-6)
    eager = cuda.linear(*args)
    before = mod.lt_workspaces()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = cuda.linear(*args)
    assert mod.lt_workspaces() == before
    static_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager, rtol=1e-3, atol=1e-3)


_CAPTURE_FIRST_SCRIPT = """
import torch
from fastvit import cuda
assert cuda.available() is None
x, w = torch.randn(4, 64, device="cuda", dtype=torch.half), torch.randn(32, 64, device="cuda", dtype=torch.half)
torch.cuda.synchronize()
graph = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(graph):
        cuda.linear(x, w, None, None, None, None, None, None, 1e-6)
except RuntimeError as e:
    print("RAISED", e)
"""


@pytest.mark.gpu
def test_capture_before_any_eager_call_asks_to_warm_up():
    """A fresh process whose first cuBLASLt call is inside a capture (the handle cannot be made there)."""
    assert cuda.available() is None  # built (or loaded) here first; the subprocess loads the same build
    proc = subprocess.run([sys.executable, "-c", _CAPTURE_FIRST_SCRIPT], capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert "RAISED" in log and "warm up first" in log and "before any eager cuBLASLt call" in log, log[-4000:]


def _vit(**kw):
    from fastvit.model import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=(48, 64), patch_size=16, embed_dim=192, depth=3, num_heads=3, num_classes=10,
                          **kw).eval()
    return realistic_init_(m).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [dict(), dict(init_values=0.1, reg_tokens=4, act="gelu_tanh")], ids=["vit", "ls-reg"])
def test_whole_vit_on_cuda_backend_matches_torch(dtype, kw):
    m = _vit(**kw)
    x = torch.randn(3, 3, 48, 64, device="cuda")
    with torch.no_grad():
        ref32 = m.float().set_backend("torch")(x)
        lowp = m.to(dtype).set_backend("torch")(x.to(dtype))
        out = m.set_backend("cuda")(x.to(dtype))
    # fp32: the model API takes no float64, so the oracle is the torch fp32 path itself and only an
    # absolute slack covers the summation-order differences of 3 blocks.
    assert_close_rule(out, ref32, None if dtype == torch.float32 else lowp,
                      atol=1e-4 if dtype == torch.float32 else 0.0, name=f"logits {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_and_triton_backends_agree(dtype):
    try:
        why = importlib.import_module("fastvit.kernels").available()
    except ImportError as e:
        why = str(e)
    if why is not None:
        pytest.skip(f"triton backend unavailable: {why}")
    m = _vit().to(dtype)
    x = torch.randn(2, 3, 48, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        ref32 = _vit().set_backend("torch")(x.float())
        a = m.set_backend("cuda")(x)
        b = m.set_backend("triton")(x)
    # Each is held to the rule against fp32; then they differ by at most the sum of both bounds.
    lowp = m.set_backend("torch")(x)
    assert_close_rule(a, ref32, lowp, name="cuda")
    assert_close_rule(b, ref32, lowp, name="triton")
    base = (lowp.float() - ref32).abs().max().item()
    bound = 2 * (2 * base + torch.finfo(dtype).eps * ref32.abs().max().item())
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= bound, f"cuda vs triton: max abs diff {diff:.3e} > {bound:.3e}"


@pytest.mark.gpu
def test_outputs_bit_identical_over_reruns():
    dtype = torch.float16
    qkv = torch.randn(2, 197, 3, 12, 64, device="cuda", dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    x, w, kw = _linear_inputs(dtype, (2, 197), 768, 768, True, True, True, True)
    bias, rope = _attn_bias("hnk", 2, 12, 197, 197, dtype), _rope_table(12, 196, 64, False)
    first = (cuda.attention(q, k, v, 0.125).clone(), cuda.linear(x, w, kw["bias"], None, *_linear_tail(kw)).clone(),
             cuda.attention(q, k, v, 0.125, bias, rope, True).clone())
    for _ in range(50):
        assert torch.equal(cuda.attention(q, k, v, 0.125), first[0])
        assert torch.equal(cuda.linear(x, w, kw["bias"], None, *_linear_tail(kw)), first[1])
        assert torch.equal(cuda.attention(q, k, v, 0.125, bias, rope, True), first[2])


@pytest.mark.gpu
def test_torch_compile_fullgraph_no_graph_break():
    m = _vit().half().set_backend("cuda")
    x = torch.randn(2, 3, 48, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)(x)  # raises on a graph break
    # The fastvit ops are opaque custom ops (same kernels); inductor may only re-fuse the glue.
    torch.testing.assert_close(compiled, eager, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_extension_loads_and_limits_admit_this_gpu():
    why = cuda.available()
    assert why is None, f"cuda backend unavailable on this GPU: {why}"
    cap = torch.cuda.get_device_capability()
    assert not_supported_reasons(cuda.LIMITS, "attention", torch.device("cuda"), torch.bfloat16, 64,
                                 capability=cap) == []


_SANITIZER_SCRIPT = """
import torch
from fastvit import cuda
torch.manual_seed(0)
dev = "cuda"
for dt in (torch.float32, torch.float16, torch.bfloat16):
    qkv = torch.randn(2, 67, 3, 3, 40, device=dev, dtype=dt)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    cuda.attention(q, k, v, 40 ** -0.5)
    rope = torch.randn(3, 66, 80, device=dev, dtype=dt)
    cuda.attention(q, k, v, 40 ** -0.5, torch.randn(3, 67, 67, device=dev), rope, False)
    cuda.attention(q, k, v, 40 ** -0.5, torch.randn(2, 3, 67, 70, device=dev, dtype=dt)[..., :67], rope[0], True)
    x = torch.randn(2, 67, 120, device=dev, dtype=dt)
    w1, w2 = torch.randn(200, 120, device=dev, dtype=dt), torch.randn(120, 200, device=dev, dtype=dt)
    g, lw = torch.rand(120, device=dev, dtype=dt), torch.rand(120, device=dev, dtype=dt)
    cuda.mlp(x, w1, None, w2, None, "gelu_tanh", g, x, lw, None, 1e-6)
    cuda.mlp(x, w1, torch.randn(200, device=dev, dtype=dt), w2[:, :100].contiguous(), None, "swiglu", g, x, None, None,
             1e-6, torch.rand(100, device=dev, dtype=dt), None, 1e-6)
    cuda.linear(x, w2.t().contiguous(), None, "gelu", torch.rand(200, device=dev, dtype=dt), None, None, None, 1e-6)
    img = torch.randn(2, 3, 30, 45, device=dev)
    cuda.patch_embed(img, torch.randn(64, 3, 16, 16, device=dev, dtype=dt), torch.randn(64, device=dev, dtype=dt),
                     torch.randn(6, 64, device=dev, dtype=dt), torch.randn(2, 64, device=dev, dtype=dt), True)
torch.cuda.synchronize()
print("done")
"""


@pytest.mark.gpu
def test_compute_sanitizer_memcheck_clean():
    import shutil

    home = cuda_build.cuda_home()
    exe = shutil.which("compute-sanitizer") or (home and os.path.join(home, "bin", "compute-sanitizer"))
    if not exe or not os.path.exists(exe):
        pytest.skip("compute-sanitizer not found")
    assert cuda.available() is None  # build (or load) before the slow sanitized run
    proc = subprocess.run([exe, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", _SANITIZER_SCRIPT],
                          capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "done" in log and "ERROR SUMMARY: 0 errors" in log, log[-6000:]


@pytest.mark.gpu
def test_gradients_flow_through_the_reference_backward():
    dev = torch.device("cuda")
    x = torch.randn(2, 7, 48, device=dev, requires_grad=True)
    w, b = torch.randn(64, 48, device=dev, requires_grad=True), torch.randn(64, device=dev, requires_grad=True)
    r = torch.randn(2, 7, 64, device=dev, requires_grad=True)
    lw = torch.randn(48, device=dev, requires_grad=True)
    leaves = (x, w, b, r, lw)
    ops.linear(x, w, b, "gelu", None, r, lw, None, backend="cuda").square().sum().backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    reference.linear(x, w, b, "gelu", None, r, lw, None).square().sum().backward()
    for g, t in zip(got, leaves):
        torch.testing.assert_close(g, t.grad, rtol=1e-3, atol=1e-3)
    qkv = torch.randn(2, 33, 3, 4, 32, device=dev, dtype=torch.float16, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    ops.attention(q, k, v, backend="cuda").float().square().sum().backward()
    g1, qkv.grad = qkv.grad.clone(), None
    reference.attention(q, k, v, upcast=True).float().square().sum().backward()
    torch.testing.assert_close(g1.float(), qkv.grad.float(), rtol=2e-2, atol=2e-2)
