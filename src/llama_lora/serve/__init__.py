"""`llama-lora serve RUN [RUN ...]`: an OpenAI-compatible server (and a chat page) for fine-tuned runs.

  llama-lora serve outputs/qs                       one run, at http://127.0.0.1:8000 (chat page at /)
  llama-lora serve outputs/a outputs/b --api-key K  two runs on one base: models 'a', 'b' and the base

Runs trained on the same base share one copy of it in memory (PEFT multi-adapter; each request selects
its adapter by `model`). Prompts are rendered with each run's saved prompt format and stopped at its stop
tokens, by infer's own code. Concurrent requests of one model are generated together in batches. See
docs/serving.md (also: serving a run with vLLM).
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from llama_lora.config.schema import Config, ServeConfig
from llama_lora.errors import LlamaLoraError

log = logging.getLogger("llama_lora.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    """A clear paragraph instead of uvicorn's traceback when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise LlamaLoraError(f"Cannot listen on {host}:{port} ({e.strerror}). Choose another --port, or stop "
                                 "the process using it.") from None


def run(cfgs: list[Config], serve: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 8000,
        api_key: str | None = None, overrides: list[str] | None = None) -> None:
    """Load the runs (one base), then serve until SIGTERM/Ctrl-C; in-flight requests finish first."""
    import uvicorn

    from llama_lora.serve.app import build_app
    from llama_lora.serve.engine import Engine
    from llama_lora.serve.pool import Pool

    serve = serve or ServeConfig()
    _check_port(host, port)
    if not is_loopback(host) and not api_key:
        log.warning("Serving on %s without an API key: anyone who can reach this machine can use the models. "
                    "Pass --api-key or --api-key-file (or set LLAMA_LORA_API_KEY).", host)
    pool = Pool(cfgs)
    engine = Engine(pool, serve.max_batch, serve.queue_size, serve.batch_wait_ms / 1000)
    app = build_app(pool, engine, serve, api_key, overrides or [])
    log.info("Serving %s at http://%s:%d (chat page at /, OpenAI API at /v1)", ", ".join(pool.entries), host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=serve.drain_timeout_s)
    uvicorn.Server(config).run()  # on SIGTERM/SIGINT: stop accepting, finish in-flight requests, exit
