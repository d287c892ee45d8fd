"""`llama-lora serve RUN [RUN ...]`: an OpenAI-compatible server (and a chat page) for fine-tuned runs.

  llama-lora serve outputs/qs                       one run, at http://127.0.0.1:8000 (chat page at /)
  llama-lora serve outputs/a outputs/b --api-key K  two runs on one base: models 'a', 'b' and the base
  llama-lora serve a=outputs/x/qs b=outputs/y/qs    runs named on the command line (NAME=PATH)

Runs trained on the same base share one copy of it in memory (PEFT multi-adapter; each request selects
its adapter by `model`). Prompts are rendered with each run's saved prompt format and stopped at its stop
tokens, by infer's own code. Concurrent requests of one model are generated together in batches. See
docs/serving.md (also: serving a run with vLLM).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import re
import socket
from pathlib import Path

from llama_lora.config.schema import Config, ServeConfig
from llama_lora.errors import LlamaLoraError

log = logging.getLogger("llama_lora.serve")

KEY_ENV = "LLAMA_LORA_API_KEY"
# A served model's name: what NAME=PATH and POST /v1/adapters {"name"} accept.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Names that are overrides, not runs, in NAME=PATH: the config's top-level keys and groups.
_CONFIG_KEYS = frozenset(Config.model_fields) | {"hydra", "run_dir"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------
# The command line: run arguments and the API key.


def named_run(arg: str) -> tuple[str, str] | None:
    """(NAME, PATH) for a `NAME=PATH` run argument, else None (a Hydra override such as `infer.top_p=0.9`,
    or a plain path). NAME is a served name, never one of the config's keys (model, data, infer, ...)."""
    name, sep, path = arg.partition("=")
    if not sep or not path or not NAME.match(name) or name.split(".")[0] in _CONFIG_KEYS:
        return None
    return name, path


def api_key(flag: str | None, key_file: str | None) -> str | None:
    """The API key from --api-key, else --api-key-file, else $LLAMA_LORA_API_KEY; None: no key. A key that is
    given but empty (`--api-key "$KEY"` with KEY unset, an empty file, a set-but-empty variable) is refused:
    it would quietly run the server with no key."""
    if flag is not None:
        if not flag.strip():
            raise LlamaLoraError(
                "--api-key is empty (as with --api-key \"$KEY\" when KEY is unset), so the server would run with "
                "no key and answer anyone who can connect. Give the key, or leave --api-key out to serve without "
                "one.")
        return flag
    if key_file:
        try:
            key = Path(key_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise LlamaLoraError(f"Cannot read --api-key-file {key_file} ({getattr(e, 'strerror', None) or e}).") \
                from None
        if not key:
            raise LlamaLoraError(f"--api-key-file {key_file} is empty. Write the key into it.")
        return key
    if KEY_ENV in os.environ:
        if not os.environ[KEY_ENV].strip():
            raise LlamaLoraError(
                f"{KEY_ENV} is set but empty, so the server would run with no key and answer anyone who can "
                f"connect. Set it to the key, or unset it (`unset {KEY_ENV}`) to serve without one.")
        return os.environ[KEY_ENV]
    return None


def run_config(run: str | None, overrides: list[str]) -> Config:
    """The saved config `serve` runs `run` with (None: the latest finished run), plus the overrides serve
    accepts. A llama-lora run whose training did not finish, or whose config.yaml cannot be read, is a
    LlamaLoraError saying so."""
    from llama_lora import runs
    from llama_lora.serve.pool import check_finished

    if run is not None and Path(run).expanduser().is_dir():
        check_finished(Path(run).expanduser())  # before resolve, which knows only finished runs
    try:
        return runs.command_config("serve", overrides, run)
    except LlamaLoraError:
        raise
    except Exception as e:  # a config.yaml that is not YAML, or not a config: the run's file, not the code
        raise LlamaLoraError(
            f"Could not read the config of the run {run} ({type(e).__name__}: {' '.join(str(e).split())[:300]}): "
            "its config.yaml is damaged. Restore it from a copy of the run, or train the run again."
        ) from e


# ----------------------------------------------------------------------------------------------------
# The network side: the listening socket, and the Host header a request must carry.


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not listening yet: uvicorn listens once the models are loaded). A clear
    paragraph instead of a traceback when the address cannot be used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        where = f"Cannot listen on {host}:{port} ({e.strerror or e})"
        if isinstance(e, socket.gaierror):
            advice = f"{host} is not an address or a name this machine resolves: check --host (e.g. 127.0.0.1, " \
                     "or 0.0.0.0 for every interface)."
        elif e.errno == errno.EADDRNOTAVAIL:
            advice = f"{host} is not an address of this machine: check --host."
        elif e.errno == errno.EADDRINUSE:
            advice = "Another process uses the port: choose another --port (--port 0 picks a free one), or stop " \
                     "the process using it."
        elif e.errno == errno.EACCES:
            advice = "Ports below 1024 need privileges: choose a --port above 1023."
        else:
            advice = "Check --host and --port."
        raise LlamaLoraError(f"{where}. {advice}") from None
    return sock


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class HostRule:
    """Which `Host` headers the server answers: a page on another site that reaches this server through its
    own domain name (DNS rebinding) sends that name, and is refused.

    Allowed: `localhost`, loopback addresses (127.0.0.1, [::1]), the --host address or name, and each of
    `extra` (--allowed-hosts; `*` allows any). Bound to every interface (0.0.0.0, ::), any IP address is
    the server's own. A request without Host (HTTP/1.0, not a browser) is allowed. The port is not compared.
    """

    def __init__(self, bound: str, extra: list[str] | tuple[str, ...] = ()):
        self.any = "*" in extra
        self.names = {"localhost"} | {h.strip().lower().rstrip(".") for h in extra if h.strip() and h != "*"}
        self.ips: set = set()
        self.any_ip = False
        ip = _ip(bound)
        if ip is None:
            self.names.add(bound.lower().rstrip("."))
        elif ip.is_unspecified:
            self.any_ip = True
        else:
            self.ips.add(ip)

    def allows(self, header: str | None) -> bool:
        if header is None or self.any:
            return True
        host = host_of(header)
        ip = _ip(host)
        if ip is None:
            return host in self.names
        return self.any_ip or ip.is_loopback or ip in self.ips

    def describe(self) -> str:
        shown = sorted(self.names) + ["127.0.0.1", "[::1]"] + [f"[{i}]" if i.version == 6 else str(i) for i in self.ips]
        return ", ".join(dict.fromkeys(shown)) + (" and any IP address of this machine" if self.any_ip else "")


def host_of(header: str) -> str:
    """The host part of a Host header, lower case, without the port or a trailing dot ([::1] stays bracketed)."""
    h = header.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[:end + 1] if end > 0 else h
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def _ip(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------------


# After the drain time, the generations are cut and their requests answered (an error event, a 503) within
# this many seconds; uvicorn cancels whatever request task is still running after it.
_CANCEL_GRACE_S = 5.0


def run(cfgs: list[Config], serve: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 8000,
        api_key: str | None = None, overrides: list[str] | None = None, names: list[str | None] | None = None,
        allowed_hosts: list[str] | tuple[str, ...] = ()) -> None:
    """Load the runs (one base; `names`: each one's served name, None for its folder's), then serve until
    SIGTERM/Ctrl-C. Then no new connection is taken, and in-flight requests get `serve.drain_timeout_s` to
    finish; what is still queued or generating after it is cancelled (its client gets an error), and the
    process exits within a few seconds more."""
    import uvicorn

    from llama_lora.serve.app import build_app
    from llama_lora.serve.engine import Engine
    from llama_lora.serve.pool import Pool

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):  # uvicorn drains the connections; the engine is halted in time
            timer = asyncio.get_running_loop().call_later(serve.drain_timeout_s, engine.halt)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    serve = serve or ServeConfig()
    sock = bind(host, port)  # before the model loads: a taken port or a wrong --host fails at once
    try:
        if not is_loopback(host) and not api_key:
            log.warning("Serving on %s without an API key: anyone who can reach this machine can use the models. "
                        "Pass --api-key or --api-key-file (or set LLAMA_LORA_API_KEY).", host)
        pool = Pool(cfgs, names)
        engine = Engine(pool, serve.max_batch, serve.queue_size, serve.batch_wait_ms / 1000)
        app = build_app(pool, engine, serve, api_key, overrides or [], HostRule(host, allowed_hosts))
        bound = sock.getsockname()[1]
        log.info("Serving %s at %s (chat page at /, OpenAI API at /v1)", ", ".join(pool.entries), url(host, bound))
        config = uvicorn.Config(app, host=host, port=bound, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=serve.drain_timeout_s + _CANCEL_GRACE_S)
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
