"""The Ray engine against the single-process engine on the same shards, in one run.

    python -m benchmarks.ray_vs_local [--shards 2] [--images 64] [--batch-size 32] [--cpus 2]

Writes ``--shards`` webdataset tars of ``--images`` JPEGs (64 x 80, random pixels) and a tiny
fastvit model (ViT, 32 px, patch 8, dim 32, depth 2) in a temporary folder, then times on the CPU:

* local: ``fastvit.embed.embed_shards`` (model loaded beforehand, one process);
* cluster start: ``ray.init(num_cpus=--cpus)`` (a fresh local cluster);
* ray, cold: ``fastvit.ray.embed_shards_ray`` on that cluster (actor start-up and model load included);
* ray, warm: the same again into a new folder (the cluster's workers already started).

and prints each wall time and the ratios to local. Performance is never asserted (DESIGN 5.7).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time


def _setup(root: str, shards: int, images: int):
    import numpy as np
    import torch
    import webdataset as wds
    from PIL import Image
    from safetensors.torch import save_file

    import fastvit
    from fastvit.convert import model_kwargs
    from fastvit.preprocess import Preprocessor

    torch.manual_seed(0)
    m = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    os.makedirs(os.path.join(root, "model"))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(root, "model", "model.safetensors"))
    cfg = dict(architecture="fastvit", model_args=model_kwargs(m), num_classes=0,
               preprocess=Preprocessor.for_model(m).to_dict())
    with open(os.path.join(root, "model", "config.json"), "w") as f:
        json.dump(cfg, f)
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "shards"))
    for s in range(shards):
        with wds.TarWriter(os.path.join(root, "shards", f"{s:05d}.tar")) as w:
            for i in range(images):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(buf, "JPEG")
                w.write({"__key__": f"{s:04d}{i:05d}", "jpg": buf.getvalue(), "txt": "x"})
    return os.path.join(root, "model"), os.path.join(root, "shards", "{" + f"{0:05d}..{shards - 1:05d}" + "}.tar")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--images", type=int, default=64, help="images per shard")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    args = p.parse_args(argv)

    import ray

    from fastvit.embed import ModelSpec, embed_shards, load_embeddings
    from fastvit.factory import load_model
    from fastvit.ray import embed_shards_ray

    with tempfile.TemporaryDirectory() as root:
        model_dir, pattern = _setup(root, args.shards, args.images)
        model, pre = load_model(model_dir)
        t = time.perf_counter()
        embed_shards(model, pre, [pattern], os.path.join(root, "local"), batch_size=args.batch_size, device="cpu",
                     log=False)
        local = time.perf_counter() - t
        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        startup = time.perf_counter() - t
        spec = ModelSpec(checkpoint=model_dir, device="cpu")
        try:
            times = []
            for name in ("ray_cold", "ray_warm"):
                t = time.perf_counter()
                embed_shards_ray(spec, [pattern], os.path.join(root, name), batch_size=args.batch_size, actors=1,
                                 gpus_per_actor=0, log=False)
                times.append(time.perf_counter() - t)
        finally:
            ray.shutdown()
        keys, a = load_embeddings(os.path.join(root, "local"))
        keys2, b = load_embeddings(os.path.join(root, "ray_warm"))
        assert keys == keys2, "the Ray engine's keys differ from the local engine's"
        err = float((a - b).abs().max())
    n = args.shards * args.images
    out = dict(images=n, local_s=round(local, 3), cluster_start_s=round(startup, 3), ray_cold_s=round(times[0], 3),
               ray_warm_s=round(times[1], 3), ratio_cold=round(times[0] / local, 2),
               ratio_warm=round(times[1] / local, 2), ratio_cold_with_start=round((times[0] + startup) / local, 2),
               max_abs_diff=err)
    print(f"{args.shards} tars x {args.images} images, batch {args.batch_size}, tiny model, CPU, "
          f"{os.cpu_count()} cores, Ray cluster of {args.cpus} CPUs")
    print(f"local (one process)     {local:7.2f} s  {n / local:8.1f} img/s")
    print(f"ray cluster start-up    {startup:7.2f} s")
    print(f"ray engine, cold        {times[0]:7.2f} s  {n / times[0]:8.1f} img/s  x{times[0] / local:.1f} local")
    print(f"ray engine, warm        {times[1]:7.2f} s  {n / times[1]:8.1f} img/s  x{times[1] / local:.1f} local")
    print(f"ray cold + start-up     {times[0] + startup:7.2f} s  x{(times[0] + startup) / local:.1f} local")
    print(f"max |ray - local|       {err:.2e}")
    return out


if __name__ == "__main__":
    main()
