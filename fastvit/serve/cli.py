"""``fastvit serve --checkpoint ... | --model NAME``: the app of :func:`fastvit.serve.create_app` under uvicorn."""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["add_serve_parser", "cmd_serve"]


def add_serve_parser(sub) -> None:
    """Register ``fastvit serve``."""
    from ..cliargs import DTYPES, PREPROCESS_MODES
    from ..embed import EMBEDDINGS

    s = sub.add_parser("serve", help="an HTTP server of embeddings and classes with dynamic batching "
                                     '(pip install "fastvit[serve]")')
    s.add_argument("--checkpoint", help="model folder, hub name 'org/name', or a state-dict file (with --model)")
    s.add_argument("--model", help="preset name (fastvit.list_models()), needed for state-dict files; alone: "
                                   "random weights (seed 0), for trying the server")
    s.add_argument("--model-name", help="the model id of /v1/models and the responses (default: the checkpoint "
                                        "or preset name)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--devices", help="one model replica per device: CUDA indices '0,1' or torch devices "
                                     "'cuda:0,cpu' (default: cuda if available, else cpu)")
    s.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    s.add_argument("--backend", help="triton, cuda or torch (default: auto)")
    s.add_argument("--embedding", default="auto", choices=EMBEDDINGS,
                   help="what /v1/embeddings returns (as fastvit embed --embedding)")
    s.add_argument("--preprocess", default="exact", choices=PREPROCESS_MODES,
                   help="exact: bit-exact with the checkpoint's processor; fast: DCT-domain JPEG downscaling")
    s.add_argument("--max-batch-size", type=int, default=64, help="images per model batch at most")
    s.add_argument("--max-delay-ms", type=float, default=5.0, help="how long a batch's first image waits for more")
    s.add_argument("--max-queue", type=int, default=1024,
                   help="images admitted and not answered at most; beyond: 503 with Retry-After")
    s.add_argument("--max-body-mb", type=float, default=32.0, help="larger request bodies get 413")
    s.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="larger images get 400, checked from the header (decompression bombs)")
    s.add_argument("--topk", type=int, default=5, help="default top_k of /v1/classify")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: env FASTVIT_API_KEY)")
    s.add_argument("--allow-urls", action="store_true",
                   help="accept http(s) URLs as inputs (the server fetches them: only on a trusted network)")
    s.add_argument("--decode-workers", type=int, help="decode threads (default min(8, CPUs))")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM / SIGINT, seconds to let in-flight requests finish")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.set_defaults(func=cmd_serve)


def _devices(spec, args):
    from ..cliargs import cli_device

    if not spec:
        return [cli_device(args, 1)]
    out = []
    for d in spec.split(","):
        d = d.strip()
        out.append(f"cuda:{d}" if d.isdigit() else d)
    return out


def cmd_serve(args) -> int:
    prog = "fastvit serve"
    if args.checkpoint is None and args.model is None:
        raise SystemExit(f"{prog}: expected --checkpoint (and --model for a state-dict file) or --model alone for "
                         "random weights, got neither")
    for arg in ("max_batch_size", "max_queue", "topk", "max_pixels"):
        if getattr(args, arg) < 1:
            raise SystemExit(f"{prog}: --{arg.replace('_', '-')} expected >= 1, got {getattr(args, arg)}")
    if args.max_delay_ms < 0 or args.max_body_mb <= 0:
        raise SystemExit(f"{prog}: --max-delay-ms expected >= 0 and --max-body-mb > 0, got {args.max_delay_ms} / "
                         f"{args.max_body_mb}")
    try:
        import uvicorn

        from .app import _fastapi

        _fastapi()
    except ImportError as e:
        raise SystemExit(f"{prog}: {e}" if "fastvit[serve]" in str(e) else
                         f'{prog}: needs the serve extra ({e.name} is missing): pip install "fastvit[serve]"') from None
    from ..cliargs import DTYPES, cli_model
    from .app import create_app

    devices = _devices(args.devices, args)
    model, pre = cli_model(args, prog)
    name = args.model_name or args.checkpoint or args.model
    try:
        app = create_app(model, pre, model_name=name, max_batch_size=args.max_batch_size,
                         max_delay_ms=args.max_delay_ms, max_queue=args.max_queue, max_body_mb=args.max_body_mb,
                         api_key=args.api_key or os.environ.get("FASTVIT_API_KEY") or None,
                         allow_urls=args.allow_urls, devices=devices, dtype=DTYPES[args.dtype],
                         embedding=args.embedding, preprocess=args.preprocess, max_pixels=args.max_pixels,
                         topk=args.topk, decode_workers=args.decode_workers)
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}") from None
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=args.drain_timeout)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has drained; a handler of ours
    # receives it, so a drained shutdown exits 0 instead of dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"{prog}: {name} on {', '.join(devices)}, http://{args.host}:{args.port}", file=sys.stderr)
    server.run()
    return 0
