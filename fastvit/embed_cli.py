"""``fastvit embed``: the command line of :mod:`fastvit.embed` (image folders, tar / parquet shards)
and of :mod:`fastvit.ray` (``--engine ray``), which both import the core of :mod:`fastvit.embed`;
kept apart so that neither engine imports the other."""

from __future__ import annotations

from typing import Sequence

from .cliargs import DTYPES, add_model_args, check_model_args, cli_device, cli_model, data_options
from .embed import (ALL_FORMATS, EMBED_PREPROCESS, EMBEDDINGS, FORMATS, ModelSpec, RunMismatch, embed_shards,
                    embed_to_dir)
from .imagefiles import dist_info

__all__ = ["add_embed_parser", "cmd_embed"]


def add_embed_parser(sub) -> None:
    """Register ``fastvit embed PATH... -o OUT_DIR``."""

    s = sub.add_parser("embed", help="embeddings of image files / folders, webdataset tars or parquet files into "
                                     "resumable shards (torchrun or Ray Data for many processes)")
    add_model_args(s, "embedding", preprocess_default=EMBED_PREPROCESS)
    s.add_argument("--out-dir", "-o", required=True, help="output folder (shards, sidecars, skipped.jsonl, "
                                                          "summary.json); rerun with it to resume")
    s.add_argument("--embedding", default="auto", choices=EMBEDDINGS,
                   help="pooled: forward_head(pre_logits=True); projected: a CLIP / SigLIP-style tower's "
                        "projection head; logits: a classifier's head; auto: projected if the model has one, "
                        "else pooled")
    s.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    s.add_argument("--format", default=None, choices=ALL_FORMATS,
                   help="output: parquet (key, source, embedding), safetensors, npy, or clip-retrieval "
                        "(img_emb/ + metadata/); default safetensors for image files / folders, parquet for "
                        "tar / parquet shards")
    s.add_argument("--embedding-dtype", default="float32", choices=("float32", "float16"),
                   help="dtype of the stored embeddings (tar / parquet shards, or any --format parquet / "
                        "clip-retrieval run)")
    s.add_argument("--shard-size", type=int, default=10000,
                   help="images per output shard for image files / folders (the unit of resumption); a tar or "
                        "parquet input shard is one output shard")
    s.add_argument("--max-tokens", type=int, default=None,
                   help="NaFlex models: at most this many tokens per packed forward (images of mixed sizes in one "
                        "sequence; a batch is cut into runs within the budget)")
    s.add_argument("--image-column", help="parquet: the image column (encoded bytes, a path, or a {bytes, path} "
                                          "struct); default: the first of jpg, png, webp, image, ...")
    s.add_argument("--key-column", help="parquet: the key column (default: 'key', else the row number)")
    s.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: this process (torchrun: rank r takes shards r, r + W, ...); ray: Ray Data, CPU "
                        "decode tasks feeding model actors across a cluster")
    s.add_argument("--address", help="ray: the cluster to join ('auto', host:port; default: a local cluster)")
    s.add_argument("--actors", type=int, help="ray: model actors (default: one per GPU, else 1)")
    s.add_argument("--gpus-per-actor", type=float,
                   help="ray: GPUs each model actor holds (default: 1 when the cluster has GPUs, else 0)")
    s.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output folder that holds another run (other inputs, model or options); "
                        "a folder of this same run is resumed either way")
    s.set_defaults(func=cmd_embed)


def _has_shard_inputs(paths: Sequence[str]) -> bool:
    from .data.sources import expand_braces, kind_of

    return any(kind_of(q) != "files" for p in paths for q in expand_braces(p))


def _model_id(args) -> str:
    return " ".join(f"--{k} {v}" for k, v in (("checkpoint", args.checkpoint), ("model", args.model)) if v)


def cmd_embed(args) -> int:

    prog = "fastvit embed"
    check_model_args(args, prog)
    if args.shard_size < 1:
        raise SystemExit(f"{prog}: --shard-size expected >= 1, got {args.shard_size}")
    if args.actors is not None and args.actors < 1:
        raise SystemExit(f"{prog}: --actors expected >= 1, got {args.actors}")
    if args.gpus_per_actor is not None and args.gpus_per_actor < 0:
        raise SystemExit(f"{prog}: --gpus-per-actor expected >= 0, got {args.gpus_per_actor}")
    if args.engine != "ray" and (args.address or args.actors or args.gpus_per_actor is not None):
        raise SystemExit(f"{prog}: --address / --actors / --gpus-per-actor need --engine ray")
    try:
        sharded = _has_shard_inputs(args.paths)
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}") from None
    fmt = args.format or ("parquet" if sharded else "safetensors")
    # image folders keep their layout of always (embed_to_dir) unless a sharded-run option asks otherwise
    legacy = (args.engine == "local" and not sharded and fmt in FORMATS and args.embedding_dtype == "float32"
              and args.image_column is None and args.key_column is None)
    if args.max_tokens is not None and not legacy:
        raise SystemExit(f"{prog}: --max-tokens (NaFlex packing) runs on image files / folders with the local engine "
                         "and --format safetensors / npy")
    common = dict(list_files=args.list_files, batch_size=args.batch_size, embedding=args.embedding,
                  normalize=args.normalize, fmt=fmt, shard_size=args.shard_size, overwrite=args.overwrite,
                  progress=not args.no_progress, model_id=_model_id(args), preprocess=args.preprocess,
                  decode=args.decode)
    try:
        if args.engine == "ray":
            from .ray import embed_shards_ray

            spec = ModelSpec(checkpoint=args.checkpoint, model=args.model, dtype=args.dtype, backend=args.backend,
                             embedding=args.embedding, normalize=args.normalize, device=args.device)
            embed_shards_ray(spec, args.paths, args.out_dir, embedding_dtype=args.embedding_dtype,
                             image_column=args.image_column, key_column=args.key_column, address=args.address,
                             actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                             **{k: v for k, v in common.items() if k not in ("embedding", "normalize")})
            return 0
        rank, world = dist_info()
        device = cli_device(args, world)
        data_options(args, prog, device)  # --decode cuda needs a CUDA device here (the Ray actors have theirs)
        model, pre = cli_model(args, prog)
        if legacy:
            embed_to_dir(model, pre, args.paths, args.out_dir, num_workers=args.workers, device=device,
                         dtype=DTYPES[args.dtype], rank=rank, world_size=world, max_tokens=args.max_tokens, **common)
        else:
            embed_shards(model, pre, args.paths, args.out_dir, embedding_dtype=args.embedding_dtype,
                         image_column=args.image_column, key_column=args.key_column, num_workers=args.workers,
                         device=device, dtype=DTYPES[args.dtype], rank=rank, world_size=world, **common)
    except (RunMismatch, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"{prog}: {e}") from None
    except ValueError as e:
        if str(e).startswith(("embedding:", "inputs:", "paths:", "model_spec", "decode:", "max_tokens:")):
            raise SystemExit(f"{prog}: {e}") from None
        raise
    return 0
