"""`llama-lora serve`: the real server in a subprocess on loopback, driven by the official `openai` client
(answers, streaming, models) and by urllib/http.client for what a client library would not send (bad
input, another Host, another Content-Type).

Servers: `server` (the quickstart run + a second adapter on the same base, with an API key), `small`
(batch 1, queue 1: the queue-full, disconnect and SIGTERM tests; the SIGTERM test stops it) and, in their
own tests, one with a 0.3 s request timeout, one stopped with a 1 s drain time, and one serving runs
from a read-only mount (on a port it picks, with more allowed Host names).
"""

from __future__ import annotations

import json
import re
import shlex
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
    """`llama-lora serve ...` in a subprocess, up once /health answers. port=0: the server picks one, and
    the test reads it from the log (as a user would). `launch` wraps the command (e.g. in a mount namespace)."""

    def __init__(self, log: Path, *args: str, port: int | None = None, launch=None):
        self.port = free_port() if port is None else port
        self.log = log
        argv = [sys.executable, "-m", "llama_lora.cli", "serve", *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(launch(argv) if launch else argv, cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=open(log, "w"))
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}")
            if self.port == 0:
                bound = re.search(r"at http://127\.0\.0\.1:(\d+) ", log.read_text())
                if not bound:
                    time.sleep(0.2)
                    continue
                self.port = int(bound[1])
            self.url = f"http://127.0.0.1:{self.port}"
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


def request(url: str, body=None, key: str | None = KEY, method: str | None = None,
            headers: dict[str, str] | None = None) -> Reply:
    """A plain urllib request (the cases a client library would not send); 4xx/5xx are returned."""
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    data = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
    req = urllib.request.Request(url, data=data.encode() if isinstance(data, str) else data, method=method,
                                 headers={"Content-Type": "application/json"} | auth | (headers or {}))
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
        pieces = list(c.completions.create(model=name, prompt=PROMPT, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert "".join(p.choices[0].text for p in pieces if p.choices).strip() == expected
        finishes = [p.choices[0].finish_reason for p in pieces if p.choices]
        assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] == done.choices[0].finish_reason
        assert pieces[-1].usage.completion_tokens == done.usage.completion_tokens
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
    ("several_choices", chat_body(n=2), KEY, 400, "invalid_request_error", "more than one choice"),
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


# ---- what a hostile or careless client sends


REFUSED_BY_THE_CLIENT = [  # (route, the openai client's keyword arguments, the refused field)
    ("chat", {"functions": [{"name": "f", "parameters": {}}], "function_call": {"name": "f"}}, "functions"),
    ("chat", {"function_call": {"name": "f"}}, "function_call"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
    ("chat", {"logit_bias": {"50": 100}}, "logit_bias"),
    ("chat", {"frequency_penalty": 2}, "frequency_penalty"),
    ("chat", {"presence_penalty": -1}, "presence_penalty"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"stop": ["\n"]}, "stop"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"logprobs": 0}, "logprobs"),
    ("completions", {"echo": True}, "echo"),
]


def test_fields_the_server_cannot_honour_are_refused_in_openai_shape(server):
    c = client(server)
    for route, kwargs, field in REFUSED_BY_THE_CLIENT:
        with pytest.raises(openai.BadRequestError) as e:
            if route == "chat":
                c.chat.completions.create(model="qs", messages=[{"role": "user", "content": PROMPT}], max_tokens=2,
                                          **kwargs)
            else:
                c.completions.create(model="qs", prompt=PROMPT, max_tokens=2, **kwargs)
        err = e.value.body
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
        assert err["param"] == field and err["code"].startswith("unsupported"), err
        assert "does not support" in err["message"], err
    # the values that ask for nothing more than what the server does are accepted
    ok = c.chat.completions.create(model="qs", messages=[{"role": "user", "content": PROMPT}], max_tokens=2,
                                   tool_choice="none", response_format={"type": "text"}, frequency_penalty=0,
                                   logit_bias={}, n=1, stop=[], logprobs=False)
    assert ok.choices[0].message.content
    # stream_options is typed strictly: a string "false" is not a boolean
    r = post(server, "/v1/chat/completions", chat_body(stream=True, stream_options={"include_usage": "false"}))
    assert r.status == 400 and r.json()["error"]["param"] == "stream_options.include_usage", r.text


def test_a_seed_is_honoured_for_sampled_answers(server):
    c = client(server)

    def sample(seed):
        return c.chat.completions.create(model="qs", messages=[{"role": "user", "content": PROMPT}], max_tokens=24,
                                         temperature=1.5, seed=seed, extra_body={"ignore_eos": True}
                                         ).choices[0].message.content

    assert sample(7) == sample(7)  # the same seed: the same answer
    assert len({sample(1), sample(2), sample(3)}) > 1  # and it is sampled, not greedy


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", '{"model":"qs","messages":[{"role":"user","content":"Reverse \\ud83d"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"model":"qs","messages":[{"role":"system","content":"be \\udfff"},'
                             '{"role":"user","content":"hi"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"model":"qs","messages":[{"role":"user","content":[{"type":"text",'
                             '"text":"a\\ud800"}]}]}', "messages.0.content.0.text"),
    ("/v1/completions", '{"model":"qs","prompt":"x \\udfff"}', "prompt"),
    ("/v1/chat/completions", '{"model":"q\\ud800","messages":[{"role":"user","content":"hi"}]}', "model"),
])
def test_an_unpaired_surrogate_is_a_400_naming_the_field(server, path, body, param):
    r = post(server, path, body)
    assert r.status == 400 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"] | {"message": None} == {"message": None, "type": "invalid_request_error",
                                                     "param": param, "code": "invalid_value"}
    assert "surrogate" in r.json()["error"]["message"]
    assert "Exception in ASGI application" not in server.log.read_text()


def test_dns_rebinding_and_cross_site_posts_are_refused(server):
    # A page on rebind.attacker.example whose name now resolves to 127.0.0.1: the browser sends its Host.
    for route in ("/v1/models", "/health", "/"):
        r = request(server.url + route, headers={"Host": "rebind.attacker.example:8000"})
        assert r.status == 400 and r.json()["error"]["code"] == "host_not_allowed", (route, r.text)
        assert "--allowed-hosts" in r.json()["error"]["message"]
    for host in ("localhost:1", "127.0.0.1", "[::1]:8000"):
        assert request(server.url + "/health", headers={"Host": host}).status == 200, host
    # A simple cross-site POST (no CORS preflight) can only be text/plain, form or multipart:
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = request(server.url + "/v1/chat/completions", chat_body(max_tokens=2), headers={"Content-Type": ctype})
        assert r.status == 415 and r.json()["error"]["code"] == "unsupported_media_type", (ctype, r.text)
    assert post(server, "/v1/chat/completions", chat_body(max_tokens=2)).status == 200


def test_models_retrieve(server):
    c = client(server)
    assert c.models.retrieve("qs").id == "qs" and c.models.retrieve("tiny-llama-v3").model_extra["kind"] == "base"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found" and "qs" in e.value.body["message"]


def test_admin_route_refuses_damaged_or_mismatched_runs_with_400(server, second_run, tmp_path):
    bad_config = shutil.copytree(second_run, tmp_path / "bad-config")
    (bad_config / "config.yaml").write_text("model: [unclosed\n")
    bad_prompt = shutil.copytree(second_run, tmp_path / "bad-prompt")
    (bad_prompt / "prompt.json").write_text('{"kind": "chat", "bogus": 1}')
    nf4 = shutil.copytree(second_run, tmp_path / "nf4")
    (nf4 / "config.yaml").write_text((nf4 / "config.yaml").read_text().replace("quantization: none",
                                                                               "quantization: nf4"))
    failed = shutil.copytree(second_run, tmp_path / "failed")
    shutil.rmtree(failed / "adapter")
    (failed / "run.json").write_text(json.dumps({"status": "failed", "error": "non-finite loss at step 3"}))
    for run, words in ((bad_config, "config.yaml"), (bad_prompt, "prompt.json"),
                       (nf4, "trained on the nf4-quantized base .*, but this server holds it unquantized"),
                       (failed, "training did not finish .failed: non-finite loss at step 3.*run_name=failed")):
        r = post(server, "/v1/adapters", {"run": str(run)})
        assert r.status == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "run_not_servable" and re.search(words, err["message"]), err
    assert post(server, "/v1/chat/completions", chat_body(max_tokens=2)).status == 200  # still serving
    assert "Exception in ASGI application" not in server.log.read_text()


def test_sigterm_past_the_drain_time_cancels_the_rest_and_exits_in_time(tmp_path, quickstart_run):
    """8 long streams, 2 generated at a time, 1 s to drain: the rest is cancelled, every client gets an error
    event (not a cut connection), and the process exits soon after the drain time."""
    s = Server(tmp_path / "drain.log", str(quickstart_run), "--max-batch", "2", "--drain-timeout-s", "1")
    bodies = []

    def stream():
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(max_tokens=460, ignore_eos=True,
                                                                          stream=True)),
                     {"Content-Type": "application/json"})
        bodies.append(conn.getresponse().read().decode())

    threads = [threading.Thread(target=stream) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for _ in range(200):
            if s.health()["active"] == 2 and s.health()["queued"] == 6:
                break
            time.sleep(0.02)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(30)
        took = time.monotonic() - t0
    finally:
        s.stop()
    for t in threads:
        t.join(30)
    assert took < 1 + 5, f"exited {took:.1f} s after SIGTERM with a 1 s drain time"
    stats = json.loads(re.search(r"Server stopped after (\{.*\})", s.log.read_text())[1].replace("'", '"'))
    assert stats["cancelled"] >= 4 and stats["tokens"] < 8 * 460, stats
    assert len(bodies) == 8 and all(b.rstrip().endswith("data: [DONE]") for b in bodies), bodies
    assert sum("server_shutting_down" in b for b in bodies) == stats["cancelled"]
    assert "Traceback" not in s.log.read_text()


def test_a_run_on_a_read_only_mount_is_served(tmp_path, quickstart_run, second_run):
    """As `docker run -v ./outputs:/runs:ro` does: the runs' folder is read-only, so no lock file can be made
    beside them; serve reads them without one (nothing can write them there either)."""
    from tests.integration.test_read_only import _can_mount_read_only

    if not _can_mount_read_only(tmp_path):
        pytest.skip("needs `unshare -rm` and bind mounts (a private mount namespace) to make a read-only folder")
    ro = tmp_path / "runs"
    shutil.copytree(quickstart_run, ro / "qs")
    shutil.copytree(second_run, ro / "second")
    (tmp_path / "key").write_text(KEY)

    def read_only(argv):
        f = shlex.quote(str(ro))
        cmd = " ".join(shlex.quote(a) for a in argv)
        return ["unshare", "-rm", "sh", "-c", f"mount --bind {f} {f} && mount -o remount,ro,bind {f} && exec {cmd}"]

    s = Server(tmp_path / "ro.log", f"mine={ro / 'qs'}", "--api-key-file", str(tmp_path / "key"),
               "--allowed-hosts", "llm.lan,other.lan", port=0, launch=read_only)
    try:
        assert request(s.url + "/health", headers={"Host": "llm.lan:8000"}).status == 200  # --allowed-hosts
        assert request(s.url + "/health", headers={"Host": "third.lan"}).status == 400
        c = client(s)
        assert {m.id for m in c.models.list().data} == {"mine", "tiny-llama-v3"}  # NAME=PATH names it
        assert c.chat.completions.create(model="mine", messages=[{"role": "user", "content": PROMPT}],
                                         max_tokens=4).choices[0].message.content
        r = post(s, "/v1/adapters", {"run": str(ro / "second")})  # at runtime too
        assert r.status == 200, r.text
    finally:
        s.stop()
    assert not list(ro.glob(".*.lock"))  # none could be made
    assert " ERROR " not in s.log.read_text() and "Traceback" not in s.log.read_text()


def test_start_up_messages_say_what_to_do(tmp_path, quickstart_run, second_run, capsys):
    from tests.helpers import error_paragraph

    failed = shutil.copytree(second_run, tmp_path / "failed")
    shutil.rmtree(failed / "adapter")
    (failed / "run.json").write_text(json.dumps({"status": "interrupted", "step": 7}))
    nf4 = shutil.copytree(second_run, tmp_path / "nf4")
    (nf4 / "config.yaml").write_text((nf4 / "config.yaml").read_text().replace("quantization: none",
                                                                               "quantization: nf4"))
    twin = shutil.copytree(second_run, tmp_path / "elsewhere" / "qs")
    port = str(free_port())
    cases = [  # (arguments, what the message says)
        ([str(failed)], [f"Run {failed} is a llama-lora run whose training did not finish (interrupted at step 7)",
                         f"`llama-lora train ... output_dir={tmp_path} run_name=failed`"]),
        ([str(quickstart_run), str(nf4)], ["qs on the unquantized base", "nf4 on the nf4-quantized base",
                                           "quantized one way"]),
        ([str(quickstart_run), str(quickstart_run)], [f"{quickstart_run} is named 2 times", "NAME=PATH"]),
        ([str(quickstart_run), str(twin)], ["2 runs would be served as 'qs'",
                                            f"`llama-lora serve qs-1={quickstart_run}"]),
        ([str(quickstart_run), "--host", "127.0.0.l"], ["127.0.0.l is not an address or a name", "check --host"]),
        ([str(quickstart_run), "peft.r=4"], ["`serve` uses the run as it was trained", "`serve` accepts"]),
        ([str(quickstart_run), "--api-key", ""], ["--api-key is empty"]),
    ]
    for args, words in cases:
        code, out, err = cli(capsys, "serve", *args, "--port", port)
        assert code == 2 and "Traceback" not in err, (args, err)
        message = error_paragraph(err)
        assert all(w in message for w in words) and "`infer`" not in message, (args, message)
    for port in ("99999", "-1", "http"):
        code, out, err = cli(capsys, "serve", str(quickstart_run), "--port", port)
        assert code == 2 and "argument --port:" in err and "Traceback" not in err, err


def test_print_vllm_names_runs_like_serve_and_notes_a_quantized_base(tmp_path, quickstart_run, second_run, capsys):
    code, out, err = cli(capsys, "serve", str(quickstart_run), str(quickstart_run), "--print-vllm")
    assert code == 2 and "is named 2 times" in err and not out, err  # as serve refuses it
    code, out, err = cli(capsys, "serve", f"a={quickstart_run}", f"b={quickstart_run}", "--print-vllm")
    assert code == 0 and "--max-loras 2" in out, err
    assert f"--lora-modules a={quickstart_run / 'adapter'} b={quickstart_run / 'adapter'}" in out
    nf4 = shutil.copytree(second_run, tmp_path / "nf4")
    (nf4 / "config.yaml").write_text((nf4 / "config.yaml").read_text().replace("quantization: none",
                                                                               "quantization: nf4"))
    code, out, err = cli(capsys, "serve", str(nf4), "--print-vllm")
    assert code == 0 and out.startswith("vllm serve "), err
    assert "note: nf4 was trained on the nf4-quantized base" in err and "full-precision base" in err
