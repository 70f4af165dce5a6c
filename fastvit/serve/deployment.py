"""The same app across machines: a Ray Serve deployment over :func:`fastvit.serve.create_app`.

Each replica builds its model where it runs (loading a checkpoint there, or unpickling the model
it was given) and serves the unchanged FastAPI app through ``@serve.ingress``; Ray Serve routes
HTTP requests among the replicas and scales their number (``autoscaling_config``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["deployment"]


def _ray_serve():
    try:
        from ray import serve
    except ImportError as e:
        raise ImportError(f"fastvit.serve.deployment needs Ray Serve ({e.name} is missing): "
                          'pip install "fastvit[ray,serve]"') from None
    return serve


def deployment(model=None, preprocessor=None, *, checkpoint: Optional[str] = None, preset: Optional[str] = None,
               backend: Optional[str] = None, loader: Optional[Callable[[], Tuple[Any, Any]]] = None,
               name: str = "fastvit", num_gpus: float = 1, num_cpus: Optional[float] = None,
               num_replicas: Optional[int] = None, autoscaling_config: Optional[Dict[str, Any]] = None,
               max_ongoing_requests: Optional[int] = None, ray_actor_options: Optional[Dict[str, Any]] = None,
               **app_kwargs):
    """A bound Ray Serve application serving the :func:`create_app` app; run it with
    ``ray.serve.run(app, route_prefix="/")``.

    The model comes from exactly one of: ``model`` + ``preprocessor`` (pickled to each replica),
    ``checkpoint`` / ``preset`` (loaded in each replica as ``fastvit serve --checkpoint / --model``
    does), or ``loader`` (a picklable callable returning ``(model, preprocessor)`` in the replica).

    Args:
        num_gpus: GPUs per replica (the replica's model runs on its ``cuda`` device when > 0, on
            the CPU when 0).
        num_cpus, ray_actor_options: further per-replica resources / actor options.
        num_replicas, autoscaling_config, max_ongoing_requests: passed to ``serve.deployment``
            as they are (``autoscaling_config`` excludes ``num_replicas``).
        app_kwargs: :func:`create_app`'s keywords (``model_name``, ``max_batch_size``, ...);
            ``devices`` is the replica's own.
    """
    serve = _ray_serve()
    given = [n for n, v in (("model", model), ("checkpoint / preset", checkpoint or preset), ("loader", loader))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"model / checkpoint / preset / loader: expected exactly one source of the model, got "
                         f"{given or 'none'}")
    if model is not None and preprocessor is None:
        raise ValueError("preprocessor: expected the model's Preprocessor with model=, got None")
    if num_replicas is not None and autoscaling_config is not None:
        raise ValueError("num_replicas / autoscaling_config: expected one of them, got both")
    if "devices" in app_kwargs:
        raise ValueError("devices: a Ray Serve replica uses the GPU Ray assigns it (num_gpus), got devices=")
    app_kwargs.setdefault("model_name", name)

    def build():
        import torch

        from .app import create_app

        if loader is not None:
            m, pre = loader()
        elif model is not None:
            m, pre = model, preprocessor
        else:
            from ..factory import load_model

            if checkpoint is None:
                torch.manual_seed(0)  # the same random weights on every replica
            m, pre = load_model(checkpoint, preset, backend=backend)
        device = "cuda" if num_gpus and torch.cuda.is_available() else "cpu"
        return create_app(m, pre, devices=[device], **app_kwargs)

    options: Dict[str, Any] = {"ray_actor_options": dict(ray_actor_options or {}, num_gpus=num_gpus)}
    if num_cpus is not None:
        options["ray_actor_options"]["num_cpus"] = num_cpus
    for k, v in (("num_replicas", num_replicas), ("autoscaling_config", autoscaling_config),
                 ("max_ongoing_requests", max_ongoing_requests)):
        if v is not None:
            options[k] = v
    cls = serve.deployment(serve.ingress(build)(), name=name, **options)
    return cls.bind()
