"""`llama-lora serve`: the real server in a subprocess on loopback, driven by the official `openai` client
(answers, streaming, models) and by httpx for what a client library would not send (bad input).

Servers: `server` (the quickstart run + a second adapter on the same base, with an API key), `small`
(batch 1, queue 1: the queue-full, disconnect and SIGTERM tests; the SIGTERM test stops it) and, in its
own test, one with a 0.3 s request timeout.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import http.client
import urllib.error
import urllib.request

import pytest

from tests.helpers import REPO, run_cli

openai = pytest.importorskip("openai")

KEY = "test-key-0123456789"
PROMPT = "Reverse the word.\n\nbanana"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`llama-lora serve ...` in a subprocess, up once /health answers."""

    def __init__(self, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_lora.cli", "serve", *args, "--port", str(self.port)],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if get(self.url + "/health").status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"serve did not come up:\n{log.read_text()[-3000:]}")

    def health(self) -> dict:
        return get(self.url + "/health").json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def zeroed(run: Path, dest: Path) -> Path:
    """A copy of `run` whose adapter changes nothing (lora_B = 0, as an untrained adapter)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, dest)
    f = dest / "adapter" / "adapter_model.safetensors"
    save_file({k: v * 0 if "lora_B" in k else v for k, v in load_file(f).items()}, f)
    return dest


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, embedded_model) -> Path:
    """Another adapter on the quickstart run's base (random, clearly non-zero: make_run)."""
    from tests.helpers import make_run

    root = tmp_path_factory.mktemp("serve-runs")
    return make_run(root, embedded_model).rename(root / "second")


@pytest.fixture(scope="module")
def server(tmp_path_factory, quickstart_run, second_run):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    key_file = log.parent / "key"
    key_file.write_text(KEY + "\n")
    s = Server(log, str(quickstart_run), str(second_run), "--api-key-file", str(key_file))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small(tmp_path_factory, quickstart_run):
    s = Server(tmp_path_factory.mktemp("serve-log") / "small.log", str(quickstart_run),
               "--max-batch", "1", "--queue-size", "1")
    yield s
    s.stop()


def client(s: Server, key: str | None = KEY):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key or "none", max_retries=0)


class Reply:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.text = status, headers, body.decode()

    def json(self):
        return json.loads(self.text)


def request(url: str, body=None, key: str | None = KEY, method: str | None = None) -> Reply:
    """A plain urllib request (the cases a client library would not send); 4xx/5xx are returned."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
    req = urllib.request.Request(url, data=data.encode() if isinstance(data, str) else data, method=method,
                                 headers=headers | {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return Reply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read())


def get(url: str) -> Reply:
    return request(url, key=None)


def post(s: Server, path: str, body, key: str | None = KEY) -> Reply:
    return request(s.url + path, body, key)


def chat_body(model="qs", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], **kw}


# ----------------------------------------------------------------------------------------------------


def test_models_lists_each_run_and_the_base(server, quickstart_run, second_run):
    models = {m.id: m for m in client(server).models.list().data}
    assert set(models) == {"qs", "second", "tiny-llama-v3"}
    assert models["tiny-llama-v3"].model_extra["kind"] == "base"
    assert server.log.read_text().count("Loading the base model") == 1  # one copy for both runs


def test_answers_equal_infer_for_each_adapter_streamed_or_not(server, quickstart_run, second_run):
    from concurrent.futures import ThreadPoolExecutor

    c = client(server)
    answers = {}
    runs = {"qs": quickstart_run, "second": second_run}
    with ThreadPoolExecutor(2) as pool:  # the two `llama-lora infer` subprocesses side by side
        inferred = dict(zip(runs, pool.map(lambda r: run_cli("infer", f"run_dir={r}", PROMPT).stdout.strip(),
                                           runs.values())))
    for name in runs:
        expected = inferred[name]
        chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}], temperature=0)
        assert chat.choices[0].message.content.strip() == expected
        stream = c.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}],
                                           temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert streamed.strip() == expected
        assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
        done = c.completions.create(model=name, prompt=PROMPT, temperature=0)
        assert done.choices[0].text.strip() == expected
        answers[name] = expected
    assert answers["second"] != answers["qs"]  # each request really runs its own adapter
    base = c.chat.completions.create(model="tiny-llama-v3", messages=[{"role": "user", "content": PROMPT}],
                                     temperature=0)
    assert base.choices[0].message.content.strip() != answers["qs"]  # the base is not the fine-tuned run


def test_concurrent_clients_are_batched_and_none_lost(server):
    """16 clients x 4 requests of 16 tokens each: every one answered in full, in fewer batches than requests."""
    c = client(server)
    before = server.health()["stats"]
    latencies, tokens, errors = [], [], []

    def one_client():
        for _ in range(4):
            t = time.perf_counter()
            try:
                r = c.chat.completions.create(model="qs", messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=16, extra_body={"ignore_eos": True})
                tokens.append(r.usage.completion_tokens)
                latencies.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 -- counted below
                errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one_client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wall = time.perf_counter() - t0
    assert not errors and tokens == [16] * 64
    after = server.health()["stats"]
    assert after["rows"] - before["rows"] == 64
    assert after["batches"] - before["batches"] < 64  # requests shared batches
    q = statistics.quantiles(latencies, n=100)
    print(f"\n16 clients x 4 requests: p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, "
          f"{sum(tokens) / wall:.0f} tokens/s, {after['batches'] - before['batches']} batches")


BAD = [  # (id, body or raw text, key, status, error type, words in the message)
    ("malformed_json", "{not json", KEY, 400, "invalid_request_error", "not valid JSON"),
    ("not_an_object", "[1, 2]", KEY, 400, "invalid_request_error", "JSON object"),
    ("unknown_model", chat_body("../../etc/passwd"), KEY, 404, "invalid_request_error", "not served"),
    ("max_tokens_zero", chat_body(max_tokens=0), KEY, 400, "invalid_request_error", "max_tokens"),
    ("max_tokens_above_limit", chat_body(max_tokens=100000), KEY, 400, "invalid_request_error", "at most|between"),
    ("oversized_prompt", {"model": "qs", "messages": [{"role": "user", "content": "a" * 3000}]}, KEY, 400,
     "invalid_request_error", "prompt is"),
    ("oversized_body", "x" * 1_100_000, KEY, 413, "invalid_request_error", "bytes"),
    ("ends_with_assistant", {"model": "qs", "messages": [{"role": "assistant", "content": "hi"}]}, KEY, 400,
     "invalid_request_error", "ending with a user turn"),
    ("several_choices", chat_body(n=2), KEY, 400, "invalid_request_error", "n=1"),
    ("bad_temperature", chat_body(temperature=-1), KEY, 400, "invalid_request_error", "temperature"),
    ("bad_key", chat_body(), "wrong-key", 401, "authentication_error", "API key"),
    ("no_key", chat_body(), None, 401, "authentication_error", "API key"),
]


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(server):
    import re

    for id, body, key, status, type, words in BAD:
        r = post(server, "/v1/chat/completions", body, key=key)
        assert r.status == status, (id, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == type, (id, err)
        assert re.search(words, err["message"]), (id, err["message"])
    r = post(server, "/v1/completions", {"model": "qs", "prompt": PROMPT, "max_tokens": 2})
    assert r.status == 200 and r.json()["choices"][0]["text"]
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()


def test_adapters_added_and_removed_at_runtime(server, second_run, tmp_path):
    from llama_lora.artifacts import RunDir

    # key-protected
    assert post(server, "/v1/adapters", {"run": str(second_run)}, key=None).status == 401
    # an adapter that changes nothing would be answered by the base: refused
    r = post(server, "/v1/adapters", {"run": str(zeroed(second_run, tmp_path / "zero"))})
    assert r.status == 400 and "does not change the base model" in r.json()["error"]["message"]
    # a run still training: its lock is held (as train holds it), or it is not finished
    busy = shutil.copytree(second_run, tmp_path / "busy")
    with RunDir(busy).lock("train"):
        r = post(server, "/v1/adapters", {"run": str(busy)})
    assert r.status == 409 and "in use by another llama-lora process" in r.json()["error"]["message"]
    running = shutil.copytree(second_run, tmp_path / "running")
    (running / "run.json").write_text(json.dumps({"status": "running", "base_model": str(second_run)}))
    r = post(server, "/v1/adapters", {"run": str(running)})
    assert r.status == 400 and "training did not finish" in r.json()["error"]["message"], r.text
    # a good one: served at once, under the name asked for; then removed
    r = post(server, "/v1/adapters", {"run": str(second_run), "name": "third"})
    assert r.status == 200, r.text
    c = client(server)
    assert "third" in {m.id for m in c.models.list().data}
    kw = dict(messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=12)
    assert (c.chat.completions.create(model="third", **kw).choices[0].message.content
            == c.chat.completions.create(model="second", **kw).choices[0].message.content)
    r = request(server.url + "/v1/adapters/third", method="DELETE")
    assert r.status == 200
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="third", **kw)
    assert c.chat.completions.create(model="second", **kw).choices[0].message.content  # the others still serve


def test_queue_full_is_429_with_retry_after_and_a_disconnect_stops_generation(small):
    conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(max_tokens=440, ignore_eos=True, stream=True)),
                 {"Content-Type": "application/json"})
    first = conn.getresponse()
    try:
        assert first.status == 200 and first.readline().startswith(b"data: ")  # generating now (batch of 1)
        queued = {}
        waiter = threading.Thread(target=lambda: queued.update(r=post(
            small, "/v1/chat/completions", chat_body(max_tokens=4, ignore_eos=True), key=None)))
        waiter.start()
        for _ in range(100):
            if small.health()["queued"] == 1:
                break
            time.sleep(0.02)
        full = post(small, "/v1/chat/completions", chat_body(max_tokens=4), key=None)
        assert full.status == 429 and int(full.headers["Retry-After"]) >= 1
        assert full.json()["error"]["type"] == "rate_limit_error"
    finally:
        conn.close()  # the client goes away mid-stream: its generation stops
    waiter.join(60)
    assert queued["r"].status == 200 and queued["r"].json()["usage"]["completion_tokens"] == 4
    stats = small.health()["stats"]
    assert stats["cancelled"] == 1 and stats["tokens"] < 440, stats


def test_sigterm_drains_in_flight_requests_then_exits(small):
    c = client(small, key=None)
    stream = iter(c.chat.completions.create(model="qs", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=200, stream=True, extra_body={"ignore_eos": True}))
    next(stream), next(stream)  # started
    small.proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(bool(ch.choices and ch.choices[0].delta.content) for ch in rest) == 199  # nothing cut short
    small.proc.wait(30)  # exits by itself, once drained
    with pytest.raises(OSError):
        get(small.url + "/health")


def test_a_request_past_its_timeout_is_stopped_with_504(tmp_path, quickstart_run):
    s = Server(tmp_path / "hurried.log", str(quickstart_run), "--request-timeout-s", "0.3")
    try:
        long = chat_body(max_tokens=460, ignore_eos=True)  # over a second of generation on any CPU here
        r = post(s, "/v1/chat/completions", long, key=None)
        assert r.status == 504 and r.json()["error"]["code"] == "timeout", r.text
        with pytest.raises(openai.APIError, match="ran past"):  # streamed: an error event ends the stream
            list(client(s, key=None).chat.completions.create(
                model="qs", messages=long["messages"], max_tokens=460, stream=True, extra_body={"ignore_eos": True}))
        assert s.health()["stats"]["tokens"] < 2 * 460  # both were stopped early
        assert post(s, "/v1/chat/completions", chat_body(max_tokens=2), key=None).status == 200
    finally:
        s.stop()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """cli.main in-process (these fail before any model is loaded): (exit code, stdout, stderr)."""
    from llama_lora.cli import main

    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_start_up_refuses_unfinished_runs_and_mixed_bases(tmp_path, quickstart_run, second_run, capsys):
    running = shutil.copytree(second_run, tmp_path / "running")
    (running / "run.json").write_text(json.dumps({"status": "running", "base_model": str(second_run)}))
    other = shutil.copytree(second_run, tmp_path / "other-base")
    fake_base = tmp_path / "another-base"
    fake_base.mkdir()
    (other / "run.json").write_text(json.dumps({"status": "finished", "base_model": str(fake_base)}))
    for runs, words in (([running], "training did not finish"), ([quickstart_run, other], "cannot share one base")):
        code, out, err = cli(capsys, "serve", *map(str, runs), "--port", str(free_port()))
        assert code == 2 and words in " ".join(err.split()) and "Traceback" not in err, err


def test_vllm_can_take_the_lora_run_and_dora_is_told_to_merge(tmp_path, quickstart_run, embedded_model, capsys):
    from llama_lora.serve import vllm
    from tests.helpers import make_run

    assert vllm.problems(quickstart_run / "adapter") == []  # adapter_config.json + safetensors, plain LoRA
    code, out, err = cli(capsys, "serve", str(quickstart_run), "--print-vllm")
    assert code == 0 and out.startswith("vllm serve ") and "--enable-lora" in out, err
    assert f"--lora-modules qs={quickstart_run / 'adapter'}" in out
    assert f"--tokenizer {quickstart_run / 'tokenizer'}" in out  # the chat template of training
    dora = make_run(tmp_path, embedded_model, method="dora")
    code, out, err = cli(capsys, "serve", str(dora), "--print-vllm")
    assert code == 2 and "DoRA" in err and "merge it first" in " ".join(err.split())
