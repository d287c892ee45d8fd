"""serve's security rules without a model: what counts as loopback, the warning for serving beyond
loopback without a key (nothing listens: the bind and the pool are replaced), the Host rule, the API key
from the command line and the environment, the request parser, and the error shape of an unexpected
failure (a real server on loopback with a broken pool)."""

from __future__ import annotations

import logging
import socket

import pytest

from llama_lora import serve


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False),
                                           ("192.168.1.20", False), ("example.org", False)])
def test_is_loopback(host, loopback):
    assert serve.is_loopback(host) is loopback


class _Stop(Exception):
    pass


def _stop(*_a, **_k):
    raise _Stop


@pytest.mark.parametrize("host,key,warned", [("0.0.0.0", None, True), ("0.0.0.0", "k", False),
                                             ("127.0.0.1", None, False)])
def test_beyond_loopback_without_a_key_warns(host, key, warned, monkeypatch, caplog):
    import llama_lora.serve.pool as pool

    monkeypatch.setattr(serve, "bind", lambda h, p: socket.socket())
    monkeypatch.setattr(pool, "Pool", _stop)  # stop right after the start-up checks
    with caplog.at_level(logging.WARNING, logger="llama_lora.serve"), pytest.raises(_Stop):
        serve.run([], host=host, port=8000, api_key=key)
    said = any("without an API key" in r.getMessage() and host in r.getMessage() for r in caplog.records)
    assert said is warned


# ---- the Host header (DNS rebinding)


@pytest.mark.parametrize("bound,extra,header,allowed", [
    ("127.0.0.1", (), "127.0.0.1:8000", True),
    ("127.0.0.1", (), "localhost:8000", True),
    ("127.0.0.1", (), "LOCALHOST.", True),
    ("127.0.0.1", (), "[::1]:8000", True),
    ("127.0.0.1", (), None, True),  # HTTP/1.0, not a browser
    ("127.0.0.1", (), "rebind.attacker.example:8000", False),
    ("127.0.0.1", (), "localhost.attacker.example", False),
    ("127.0.0.1", (), "192.168.1.20:8000", False),  # not this server's address
    ("127.0.0.1", ("llm.lan",), "LLM.lan:8000", True),
    ("127.0.0.1", ("*",), "anything.example", True),
    ("192.168.1.20", (), "192.168.1.20:8000", True),
    ("192.168.1.20", (), "10.0.0.1", False),
    ("0.0.0.0", (), "10.0.0.1:8000", True),  # every interface: any address of the machine
    ("0.0.0.0", (), "rebind.attacker.example", False),
    ("::", (), "[fe80::1]:8000", True),
    ("::1", (), "[::1]:8000", True),
    ("myhost.lan", (), "myhost.lan:8000", True),
])
def test_host_rule(bound, extra, header, allowed):
    assert serve.HostRule(bound, extra).allows(header) is allowed


# ---- the API key


def _cli(capsys, *argv):
    from llama_lora.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv,env,words", [
    (["--api-key", ""], None, "--api-key is empty"),
    (["--api-key", "  "], None, "--api-key is empty"),
    ([], "", "LLAMA_LORA_API_KEY is set but empty"),
    (["--api-key-file", "{empty}"], None, "is empty. Write the key into it"),
])
def test_an_empty_api_key_is_refused_before_anything_loads(argv, env, words, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").write_text("\n")
    if env is None:
        monkeypatch.delenv(serve.KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(serve.KEY_ENV, env)
    argv = [a.format(empty=tmp_path / "empty") for a in argv]
    code, err = _cli(capsys, "serve", str(tmp_path / "no-such-run"), *argv)
    assert code == 2 and words in " ".join(err.split()) and "Traceback" not in err, err
    assert err.count("error:") == 1


def test_a_key_from_the_environment_is_used(monkeypatch):
    monkeypatch.setenv(serve.KEY_ENV, "k3y")
    assert serve.api_key(None, None) == "k3y"
    monkeypatch.delenv(serve.KEY_ENV)
    assert serve.api_key(None, None) is None


def test_run_arguments_name_runs_but_overrides_stay_overrides():
    assert serve.named_run("qs=outputs/x/qs") == ("qs", "outputs/x/qs")
    for override in ("infer.max_new_tokens=64", "model.dtype=float32", "output_dir=outputs", "peft=dora",
                     "+x=1", "outputs/sweep/peft.r=2"):
        assert serve.named_run(override) is None, override


# ---- requests: one table of refused fields, strict types


def test_every_refused_field_is_documented():
    from llama_lora.serve.app import REFUSED
    from tests.helpers import REPO

    docs = (REPO / "docs" / "serving.md").read_text()
    missing = [r.field for r in REFUSED if f"`{r.field}`" not in docs]
    assert not missing, f"docs/serving.md does not list {missing}"


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "prompt": "p", "stream": "true"}, "stream"),
    ({"model": "m", "prompt": "p", "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "prompt": "p", "stream": True, "stream_options": {"include_usage": "false"}},
     "stream_options.include_usage"),
    ({"model": "m", "prompt": "p", "seed": "1"}, "seed"),
    ({"model": 5, "prompt": "p"}, "model"),
    ({"model": "m", "prompt": "p", "best_of": 2}, "best_of"),
    ({"model": "m", "prompt": "p", "logprobs": 0}, "logprobs"),
])
def test_completion_requests_are_strictly_typed(body, param):
    from llama_lora.serve.app import ApiError, CompletionRequest, parse

    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, body, "completions")
    assert e.value.status == 400 and e.value.param == param, e.value.message


# ---- no route answers text/plain, whatever goes wrong


class _BrokenPool:
    base = ""

    @property
    def entries(self):
        raise RuntimeError("a bug")


class _IdleEngine:
    queued = active = 0
    stats: dict = {}

    def start(self):
        pass

    def stop(self):
        pass


def test_an_unexpected_error_is_a_500_in_openai_shape():
    import json
    import threading
    import urllib.error
    import urllib.request

    import uvicorn

    from llama_lora.config.schema import ServeConfig
    from llama_lora.serve.app import build_app

    app = build_app(_BrokenPool(), _IdleEngine(), ServeConfig(), None, [])
    sock = serve.bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        for _ in range(100):
            if server.started:
                break
            threading.Event().wait(0.05)
        for path in ("/v1/models", "/v1/models/x"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + path, timeout=10)
            assert e.value.code == 500 and e.value.headers["content-type"] == "application/json"
            err = json.loads(e.value.read())["error"]
            assert err["type"] == "server_error" and "RuntimeError" in err["message"] and "a bug" not in err["message"]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
