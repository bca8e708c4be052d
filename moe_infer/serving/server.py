"""`moe-infer serve`: load a model, start the engine thread, run the HTTP app under uvicorn.

Owns which models can be served (a shipped model name, a `transformers` directory, a converted
checkpoint: an offloaded model is served with ``--gpu-memory`` like any other MoEConfig field),
listening (loopback by default; port 0 picks a free port, printed on the ready line), and
shutdown: on SIGINT or SIGTERM uvicorn stops accepting connections and lets the requests in flight
finish for up to ``shutdown_timeout`` seconds, then cancels the rest; the engine then fails
whatever is still queued and its thread is joined, and the process exits with status 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from dataclasses import dataclass
from typing import Any

from moe_infer.config import MoEConfig
from moe_infer.errors import ConfigError, MissingFile

__all__ = ["ServerOptions", "check_dependencies", "load_served_model", "serve"]
DEPENDENCIES = ("fastapi", "uvicorn", "prometheus_client")  # the serve extra


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_batch_size: int = 8
    pool_size: int | None = None
    max_queue: int = 64
    scheduler: str | None = None
    prefill_chunk: int = 512
    max_model_len: int | None = None
    chat_template: str | None = None
    shutdown_timeout: float = 30.0
    device: str | None = None
    dtype: str | None = None
    log_level: str = "warning"


def check_dependencies() -> None:
    """``ValueError`` naming the missing packages of the ``serve`` extra, if any."""
    from importlib.util import find_spec

    missing = [name for name in DEPENDENCIES if find_spec(name) is None]
    if missing:
        raise ConfigError(f"serving needs the serve extra (missing: {', '.join(missing)}): "
                         f"pip install 'moe-infer[serve]'")


def load_served_model(name: str, config: MoEConfig, *, device: str | None = None,
                      dtype: str | None = None) -> tuple[Any, Any]:
    """(wrapped model in eval mode, tokenizer or None) for a shipped model name, a `transformers`
    directory or a converted checkpoint (experts read from its store, as `moe_infer.load`)."""
    import moe_infer
    from moe_infer.experts.store import MANIFEST
    from moe_infer.models import load_model

    if os.path.isdir(name) and os.path.exists(os.path.join(name, MANIFEST)):
        fields = config.non_default_fields()
        model = moe_infer.load(name, dtype=dtype or "auto", device=device, **fields)
        tokenizer = None
        if any(os.path.exists(os.path.join(name, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name)
        return model.eval(), tokenizer
    model, tokenizer = load_model(name, device=device, dtype=dtype or "float32")
    moe_infer.wrap(model, config)
    return model, tokenizer


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(2048)  # connections made before uvicorn runs wait in the backlog
    return sock


def serve(model_name: str, config: MoEConfig, options: ServerOptions) -> int:
    """Serve ``model_name`` until SIGINT or SIGTERM; the exit status."""
    import uvicorn
    from prometheus_client import disable_created_metrics

    from moe_infer.serving.app import ServedModel, create_app
    from moe_infer.serving.engine import Engine
    from moe_infer.serving.metrics import ServingMetrics

    logging.basicConfig(level=options.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    disable_created_metrics()  # the *_created series only repeat the start time
    if options.chat_template is not None and not os.path.isfile(options.chat_template):
        raise MissingFile(f"--chat-template {options.chat_template!r}: no such file")
    sock = _listen(options.host, options.port)  # before the model loads: a taken port fails at once
    try:
        model, tokenizer = load_served_model(model_name, config, device=options.device, dtype=options.dtype)
        if options.chat_template is not None:
            if tokenizer is None:
                raise ConfigError(f"--chat-template: the model {model_name!r} has no tokenizer to apply it with")
            with open(options.chat_template, encoding="utf-8") as file:
                tokenizer.chat_template = file.read()
        context = options.max_model_len or getattr(model.config, "max_position_embeddings", None) or 2048
        from moe_infer.api import executor

        metrics = ServingMetrics(executor(model).layers[0].num_experts, options.max_batch_size)
        engine = Engine(model, tokenizer, max_batch_size=options.max_batch_size, pool_size=options.pool_size,
                        max_queue=options.max_queue, scheduler=options.scheduler,
                        prefill_chunk=options.prefill_chunk, metrics=metrics).start()
    except BaseException:
        sock.close()
        raise
    name = options.served_model_name or os.path.basename(os.path.normpath(model_name))
    app = create_app(ServedModel(engine, name, tokenizer, context, metrics))
    server = uvicorn.Server(uvicorn.Config(app, log_level=options.log_level, lifespan="off",
                                           timeout_graceful_shutdown=options.shutdown_timeout))
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in place
    # that re-raise does nothing, and the process exits normally
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"moe-infer serve: {name!r} on http://{url_host}:{port} ({engine.scheduler} scheduler, micro-batches of "
          f"{engine.max_batch_size}, {engine.pool_size} running, {engine.max_queue} waiting, context {context}); "
          f"Ctrl-C stops", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("moe-infer serve: stopped", flush=True)
    return 0

