"""Ahead-of-time compilation of every Triton kernel config for sm_90 and sm_80 (no GPU needed).

The interpreter ignores GPU limits (shared memory, registers, tl.dot minimums), so every
config the autotuner may pick -- ``_configs()`` pruned by ``keep()`` for the key of each
variant below -- is compiled with ``triton.compile(ASTSource(...), target=GPUTarget(...))``
and checked: it compiles, ``metadata.shared`` fits the architecture's per-block limit
(232448 B on sm_90, 166912 B on sm_80), the cubin has no spills (cuobjdump's LOCAL and STACK
are 0), and the GEMM and attention kernels use wgmma on sm_90 where the tile allows it (16-bit
operands, a warpgroup multiple of warps, BLOCK_M >= 64). The table (kernel, variant, config,
arch, regs, spills, smem, wgmma) is written to ``artifacts/aot_table.md`` and printed.

Compilation runs in a subprocess (``python tests/test_aot.py --worker``) because this test
session has ``TRITON_INTERPRET=1`` set (conftest), under which ``@triton.jit`` yields
interpreter functions that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACT = os.path.join(ROOT, "artifacts", "aot_table.md")  # one table per triton version
ARCHS = {90: 232448, 80: 166912}
_TY = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "uint8": "u8", "int32": "i32"}


# --------------------------------------------------------------------------- worker side
def _variants():
    """(kernel module name, kernel name, variant label, key for keep(), constexprs(cfg), ptr types,
    whether wgmma is required for eligible configs)."""
    import importlib

    from fastvit.kernels.autotune import next_pow2

    # import_module: the package re-exports functions named like its submodules (attention ...)
    attention, attention_varlen, layer_norm, linear, patch_embed = (
        importlib.import_module(f"fastvit.kernels.{m}")
        for m in ("attention", "attention_varlen", "layer_norm", "linear", "patch_embed"))

    out = []
    plain = (False, 0, False)  # attention flags (HAS_BIAS, ROPE, ROPE_PER_HEAD): no bias, no RoPE

    def attn(kernel, label, d, dt, cfg, flags, wgmma):
        const = dict(HEAD_DIM=d, BLOCK_D=attention.block_d_of(d, flags[1]), PRECISION="ieee" if dt == "float32" else "tf32",
                     HAS_BIAS=flags[0], ROPE=flags[1], ROPE_PER_HEAD=flags[2], **cfg.kwargs)
        ptrs = {"Q": dt, "K": dt, "V": dt, "O": dt, "Bias": dt, "Rope": "float32"}
        if kernel == "_attn_probs_fwd":
            ptrs["P"] = "float32"
        out.append(("attention", kernel, label, cfg, const, ptrs, wgmma))

    # attention: every config at d=64 and d=128 (N=197..256), heuristic configs for every head dim
    for dt in ("float16", "float32"):
        for d in (32, 48, 64, 72, 80, 96, 128):
            key = (256, 256, d, dt, False, 1024) + plain
            if dt == "float32" and d > attention.FP32_MAX_HEAD_DIM:
                continue  # declined by unsupported() on GPUs: no spill-free fp32 config exists
            cfgs = attention.TUNE_FWD.candidates(key) if (d in (64, 128) and dt == "float16") else [attention.heuristic(key)]
            for cfg in cfgs:
                attn("_attn_fwd", f"{dt} d={d}", d, dt, cfg, plain, dt != "float32")
        # SigLIP's MAP head: one latent query (N bucket 16) against all tokens, head dims 64 and
        # 72 (so400m), every candidate config
        for d in (64, 72):
            key = (16, 1024, d, dt, False, 1024) + plain
            if dt == "float32" and d > attention.FP32_MAX_HEAD_DIM:
                continue
            for cfg in attention.TUNE_FWD.candidates(key):
                attn("_attn_fwd", f"{dt} d={d} map", d, dt, cfg, plain, dt != "float32")
        for d in (64, 80):
            key = (256, 256, d, dt, True, 1024) + plain
            if dt == "float32" and d > attention.FP32_MAX_HEAD_DIM:
                continue
            attn("_attn_probs_fwd", f"{dt} d={d}", d, dt, attention.heuristic(key), plain, False)
    # attention with bias / RoPE (#13; the rotation holds two k halves and four float32 sin / cos
    # tiles per kv tile): every candidate at d=64 float16 with a bias, with bias + interleaved
    # RoPE and with per-head rotate_half RoPE (EVA-02 / DINOv3 at 197..256 tokens); heuristic
    # configs for each flag set at head dims 48, 64, 80, 128 (bfloat16 and float32 at 64); probs
    # with bias + RoPE
    features = {"bias": (True, 0, False), "rope": (False, 1, False), "rope_half per-head": (False, 2, True),
                "bias+rope": (True, 1, False)}
    for dt, dims in (("float16", (48, 64, 80, 128)), ("bfloat16", (64,)), ("float32", (64,))):
        for d in dims:
            for name, flags in features.items():
                key = (256, 256, d, dt, False, 1024) + flags
                every = d == 64 and dt == "float16" and name != "rope"
                for cfg in attention.TUNE_FWD.candidates(key) if every else [attention.heuristic(key)]:
                    attn("_attn_fwd", f"{dt} d={d} {name}", d, dt, cfg, flags, dt != "float32")
        for d in (64, 80) if dt == "float16" else (64,):
            for name in ("bias+rope", "rope_half per-head"):
                key = (256, 256, d, dt, True, 1024) + features[name]
                attn("_attn_probs_fwd", f"{dt} d={d} {name}", d, dt, attention.heuristic(key), features[name], False)
    # attention_varlen (packed sequences, #23). The code depends on the head dim, dtype, RoPE flags
    # and config, not on the sequence lengths: per (dtype, d, RoPE) each config once, the union
    # over the keys of short (longest <= 64) and NaFlex-budget (256, 1024) sequences. Every
    # candidate for head dims 64, 72 (so400m) and 128 in float16 (with RoPE: 64 and 128), the
    # heuristics elsewhere (bfloat16, float32, the other head dims)
    for dt in ("float16", "bfloat16", "float32"):
        for d in (32, 48, 64, 72, 80, 96, 128):
            if dt == "float32" and d not in (32, 64):
                continue
            # RoPE per packed token: interleaved with a shared table, rotate_half per head
            for rope, per_head, name in ((0, False, ""), (1, False, " rope"), (2, True, " rope_half per-head")):
                if rope and (d not in (48, 64, 72, 128) or (dt == "bfloat16" and d != 64)):
                    continue
                every = dt == "float16" and d in ((64, 72, 128) if not rope else (64, 128))
                cfgs = []
                for n in (64, 256, 1024):
                    key = (n, n, d, dt, rope, per_head)
                    for cfg in attention_varlen.TUNE.candidates(key) if every else [attention_varlen.heuristic(key)]:
                        if cfg not in cfgs:
                            cfgs.append(cfg)
                for cfg in cfgs:
                    const = dict(HEAD_DIM=d, BLOCK_D=attention.block_d_of(d, rope),
                                 PRECISION="ieee" if dt == "float32" else "tf32", ROPE=rope, ROPE_PER_HEAD=per_head,
                                 **cfg.kwargs)
                    ptrs = {"Q": dt, "K": dt, "V": dt, "O": dt, "CuQ": "int32", "CuK": "int32", "Rope": "float32"}
                    out.append(("attention_varlen", "_attn_varlen_fwd", f"{dt} d={d}{name}", cfg, const, ptrs,
                                dt != "float32"))
    # linear: every config for ViT-B qkv with the LN prologue (K=768, N=2304), heuristics for the
    # other flag sets (fc1 + GELU / tanh GELU / QuickGELU, fc2 / proj + gamma + residual) and for float32
    flavours = [("qkv+ln", dict(HAS_BIAS=True, ACT=0, HAS_GAMMA=False, HAS_RES=False, HAS_LN=True, HAS_LN_B=True), 768, 2304),
                ("fc1+ln+gelu", dict(HAS_BIAS=True, ACT=1, HAS_GAMMA=False, HAS_RES=False, HAS_LN=True, HAS_LN_B=True), 768, 3072),
                ("fc1+gelu_tanh", dict(HAS_BIAS=True, ACT=2, HAS_GAMMA=False, HAS_RES=False, HAS_LN=False, HAS_LN_B=False), 768, 3072),
                ("fc1+quick_gelu", dict(HAS_BIAS=True, ACT=3, HAS_GAMMA=False, HAS_RES=False, HAS_LN=False, HAS_LN_B=False), 768, 3072),
                ("fc2+gamma+res", dict(HAS_BIAS=True, ACT=0, HAS_GAMMA=True, HAS_RES=True, HAS_LN=False, HAS_LN_B=False), 3072, 768)]
    for dt in ("float16", "float32"):
        for i, (label, flags, K, N) in enumerate(flavours):
            fl = flags
            key = (8192, N, K, dt, tuple(fl[f] for f in ("HAS_BIAS", "ACT", "HAS_GAMMA", "HAS_RES", "HAS_LN",
                                                         "HAS_LN_B")))
            cfgs = linear.TUNE.candidates(key) if (i == 0 and dt == "float16") else [linear.heuristic(key)]
            for cfg in cfgs:
                const = dict(flags, EVEN_K=K % cfg["BLOCK_K"] == 0, PRECISION="ieee" if dt == "float32" else "tf32",
                             **cfg.kwargs)
                ptrs = {n: dt for n in ("A", "W", "Bias", "Gamma", "Res", "Y", "LnW", "LnB")}
                ptrs.update(Mean="float32", Rstd="float32")
                out.append(("linear", "_linear_fwd", f"{dt} {label}", cfg, const, ptrs, dt != "float32"))
    # gated linear (SwiGLU, two accumulators a tile): EVA-02 B fc1 (K=768, N=2048 outputs of a
    # (4096, 768) weight) with bias + gamma + residual and with the LN prologue; every candidate in
    # fp16 and bf16, the heuristic in float32
    gated = [("fc1+swiglu+gamma+res", dict(HAS_BIAS=True, ACT=4, HAS_GAMMA=True, HAS_RES=True, HAS_LN=False,
                                           HAS_LN_B=False)),
             ("fc1+ln+swiglu", dict(HAS_BIAS=True, ACT=4, HAS_GAMMA=False, HAS_RES=False, HAS_LN=True, HAS_LN_B=True))]
    for dt in ("float16", "bfloat16", "float32"):
        for label, flags in gated:
            K, N = 768, 2048
            key = (8192, N, K, dt, tuple(flags[f] for f in ("HAS_BIAS", "ACT", "HAS_GAMMA", "HAS_RES", "HAS_LN",
                                                            "HAS_LN_B")))
            for cfg in linear.TUNE.candidates(key) if dt != "float32" else [linear.heuristic(key)]:
                const = dict(flags, EVEN_K=K % cfg["BLOCK_K"] == 0, PRECISION="ieee" if dt == "float32" else "tf32",
                             **cfg.kwargs)
                ptrs = {n: dt for n in ("A", "W", "Bias", "Gamma", "Res", "Y", "LnW", "LnB")}
                ptrs.update(Mean="float32", Rstd="float32")
                out.append(("linear", "_linear_fwd", f"{dt} {label}", cfg, const, ptrs, dt != "float32"))
    # layer_norm: every config for D=768 (both modes), heuristic for D in (384, 1024, 1280)
    for D in (384, 768, 1024, 1280):
        for mode in ("y", "stats"):
            key = (D, "float16", mode)
            cfgs = layer_norm.TUNE.candidates(key) if D == 768 else [layer_norm.heuristic(key)]
            for cfg in cfgs:
                const = dict(HAS_W=mode == "y", HAS_B=mode == "y", WRITE_Y=mode == "y", WRITE_STATS=mode == "stats",
                             **cfg.kwargs)
                ptrs = {"X": "float16", "W": "float16", "B": "float16", "Y": "float16", "Mean": "float32", "Rstd": "float32"}
                out.append(("layer_norm", "_ln_fwd", f"float16 D={D} {mode}", cfg, const, ptrs, False))
    # patch_embed: every config for P=16 fp16 (float32 image cast in the load), heuristics for P 14, 8, 32
    for P in (16, 14, 8, 32):
        for dt in ("float16", "float32"):
            K = 3 * P * P
            key = (8192, 768, K, (P, P), dt, (True, True, False), "float32")
            cfgs = patch_embed.TUNE.candidates(key) if (P == 16 and dt == "float16") else [patch_embed.heuristic(key)]
            for cfg in cfgs:
                const = dict(PH=P, PW=P, HAS_BIAS=True, HAS_POS=True, PAD=P == 14,
                             PRECISION="ieee" if dt == "float32" else "tf32", **cfg.kwargs)
                ptrs = {"X": "float32", "W": dt, "Bias": dt, "Pos": dt, "Prefix": dt, "Y": dt}
                out.append(("patch_embed", "_patch_embed_fwd", f"{dt} P={P}", cfg, const, ptrs, dt != "float32"))
    # uint8 pixels (the folded-normalisation input of every job): every 16-bit config at P=16, with
    # and without padding
    for dt in ("float16", "bfloat16"):
        for pad in (False, True):
            key = (8192, 768, 768, (16, 16), dt, (True, True, pad), "uint8")
            for cfg in patch_embed.TUNE.candidates(key):
                const = dict(PH=16, PW=16, HAS_BIAS=True, HAS_POS=True, PAD=pad, PRECISION="tf32", **cfg.kwargs)
                ptrs = {"X": "uint8", "W": dt, "Bias": dt, "Pos": dt, "Prefix": dt, "Y": dt}
                out.append(("patch_embed", "_patch_embed_fwd", f"{dt} P=16 uint8 image{' pad' if pad else ''}", cfg,
                            const, ptrs, True))
    return out


def _compile_one(job):
    """Compile one (variant, arch); returns a result row (dict)."""
    mod_name, kname, label, cfg, const, ptrs, want_wgmma, arch = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"fastvit.kernels.{mod_name}"), kname)
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in ptrs:
            sig[p.name] = "*" + _TY[ptrs[p.name]]
        elif p.name in ("qk_scale", "eps"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    row = dict(kernel=kname, variant=label, config=str(cfg), arch=f"sm_{arch}", ok=False, regs=None, spills=None,
               smem=None, wgmma=None, error=None, limit=ARCHS[arch], triton=triton.__version__)
    # what the JIT assumes at a real launch: 16-byte aligned pointers and strides that are
    # multiples of 16 elements (every ViT width is); without it codegen would be scalarised
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if not p.is_constexpr and (p.name in ptrs or p.name.startswith("stride_"))}
    # constexprs keyed by argument index: triton 3.8 also accepts names, older 3.x only tuples
    const = {(fn.arg_names.index(k),): v for k, v in const.items()}
    try:
        ck = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    except Exception as e:  # reported in the table and failed by the test
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return row
    row["smem"] = int(ck.metadata.shared)
    row["wgmma"] = "wgmma" in ck.asm["ptx"]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", res)
    if m is None:
        row["error"] = f"cannot parse cuobjdump output: {res[-200:]!r}"
        return row
    row["regs"] = int(m.group(1))
    row["spills"] = int(m.group(2)) + int(m.group(3))  # spilled bytes live in the stack frame / local memory
    row["want_wgmma"] = bool(want_wgmma and arch == 90 and cfg.num_warps % 4 == 0 and cfg["BLOCK_M"] >= 64)
    row["ok"] = True
    return row


def worker(out_json: str, jobs: int) -> None:
    from fastvit.kernels import autotune

    all_jobs = []
    for arch in ARCHS:
        autotune.set_target(arch)  # keep() prunes for the target arch, as it would on that GPU
        all_jobs += [v + (arch,) for v in _variants()]
    autotune.set_target(None)
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        rows = list(ex.map(_compile_one, all_jobs, chunksize=2))
    with open(out_json, "w") as f:
        json.dump(rows, f)


# --------------------------------------------------------------------------- test side
def _table(rows) -> str:
    lines = ["| kernel | variant | config | arch | regs | spills (B) | smem (B) | limit (B) | wgmma |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['config']} | {r['arch']} | ERROR: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['config']} | {r['arch']} | {r['regs']} | {r['spills']} "
                         f"| {r['smem']} | {r['limit']} | {'yes' if r['wgmma'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _tritons():
    """(label, pip --target folder or None) for every triton the suite compiles with: the one
    installed, plus each folder named in ``FASTVIT_AOT_TRITON`` (os.pathsep-separated). ``make
    test`` installs the GPU machine's triton (3.6.0) into build/triton-3.6.0 and names it there,
    so codegen differences between versions (spills, registers) fail here, not on the GPU."""
    out = [("installed", None)]
    for folder in filter(None, os.environ.get("FASTVIT_AOT_TRITON", "").split(os.pathsep)):
        out.append((os.path.basename(os.path.normpath(folder)), os.path.abspath(folder)))
    return out


@pytest.fixture(scope="module", params=_tritons(), ids=lambda t: t[0])
def aot_rows(request, tmp_path_factory):
    pytest.importorskip("triton")
    label, folder = request.param
    if folder is not None and not os.path.isdir(os.path.join(folder, "triton")):
        pytest.fail(f"FASTVIT_AOT_TRITON names {folder}, which holds no triton package (make test installs it)")
    out = str(tmp_path_factory.mktemp("aot") / "rows.json")
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastvit-aot-triton-cache"))
    if folder is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, env.get("PYTHONPATH")]))
        env["TRITON_CACHE_DIR"] = env["TRITON_CACHE_DIR"] + "-" + label  # cache entries are per version
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", out, str(max(2, os.cpu_count() or 2))],
                          env=env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, f"AOT worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(out) as f:
        rows = json.load(f)
    table = _table(rows)
    version = rows[0]["triton"] if rows else "?"
    path = ARTIFACT.replace(".md", f"-triton-{version}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# AOT compile table, triton {version} (generated by tests/test_aot.py)\n\n" + table)
    print(f"\ntriton {version}\n" + table)
    return rows


def test_every_config_compiles(aot_rows):
    bad = [f"{r['kernel']} {r['variant']} {r['config']} {r['arch']}: {r['error']}" for r in aot_rows if not r["ok"]]
    assert not bad, "configs that do not compile:\n" + "\n".join(bad)
    kernels = {r["kernel"] for r in aot_rows}
    assert kernels == {"_attn_fwd", "_attn_probs_fwd", "_attn_varlen_fwd", "_linear_fwd", "_ln_fwd",
                       "_patch_embed_fwd"}, kernels
    assert {r["arch"] for r in aot_rows} == {"sm_90", "sm_80"}


def test_shared_memory_fits(aot_rows):
    bad = [f"{r['kernel']} {r['variant']} {r['config']} {r['arch']}: smem {r['smem']} > {r['limit']}"
           for r in aot_rows if r["ok"] and r["smem"] > r["limit"]]
    assert not bad, "configs over the shared-memory limit (fix keep()):\n" + "\n".join(bad)


def test_no_register_spills(aot_rows):
    bad = [f"{r['kernel']} {r['variant']} {r['config']} {r['arch']}: {r['spills']} B spilled, {r['regs']} regs"
           for r in aot_rows if r["ok"] and r["spills"] > 0]
    assert not bad, "configs that spill registers (fix keep() / heuristic()):\n" + "\n".join(bad)


def test_wgmma_on_sm90(aot_rows):
    eligible = [r for r in aot_rows if r["ok"] and r.get("want_wgmma")]
    assert {r["kernel"] for r in eligible} >= {"_attn_fwd", "_attn_varlen_fwd", "_linear_fwd"}, \
        "no wgmma-eligible GEMM/attention config"
    bad = [f"{r['kernel']} {r['variant']} {r['config']}" for r in eligible if not r["wgmma"]]
    assert not bad, "sm_90 GEMM / attention configs without wgmma:\n" + "\n".join(bad)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    else:
        sys.exit(f"usage: {sys.argv[0]} --worker OUT.json [JOBS]")
