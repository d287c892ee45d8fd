"""Every expected mistake through the CLI: non-zero exit, one paragraph naming the problem and the fix,
no traceback (unless --debug / LLAMA_LORA_DEBUG=1), and quickly, before any heavy work.

The table (tests.helpers.BAD_INPUT_CASES) runs `cli.main([...])` in-process here (the real CLI code, minus
~6 s of imports per case); tests/integration/test_bad_input_cli.py runs a few cases through a real
`python -m llama_lora.cli`, as a user would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llama_lora import cli
from tests.helpers import (
    BAD_INPUT_CASES as CASES, BAD_INPUT_IN_SUBPROCESS as IN_SUBPROCESS, BAD_INPUT_TRAIN as TRAIN,
    bad_input_argv as _argv, build_bad_input_world, error_paragraph as _paragraph,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base) -> Path:
    """The broken world the cases point at, built once."""
    return build_bad_input_world(tmp_path_factory.mktemp("bad_input"), tiny_base)


# ----------------------------------------------------------------------------------------------------
# The table.


def test_the_table_is_big_enough():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert set(IN_SUBPROCESS) <= {c.id for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_fails_fast_with_one_clear_paragraph(case, world, tiny_base, capsys, monkeypatch):
    argv = _argv(case, tiny_base, world)
    for key, value in (case.env or {}).items():
        monkeypatch.setenv(key, value.format(w=world))
    kept = {p: _digest(Path(p.format(w=world))) for p in case.keeps}
    t0 = time.time()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    elapsed = time.time() - t0
    err = capsys.readouterr().err
    assert exc.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    message = _paragraph(err)
    print(f"{case.id} ({elapsed:.1f}s): {message}")  # see them all with pytest -rP
    for word in case.expect:
        assert word in message, f"{word!r} not in: {message}"
    rest = err[err.rindex("error: "):].strip().split("\n\n")[1:]  # one paragraph (+ usage for a bad command)
    assert rest == [] or case.id == "unknown_command" and rest[0].startswith("usage:"), rest
    assert elapsed < 60, f"took {elapsed:.0f}s"  # generous: the 2-core test machine is shared
    assert {p: _digest(Path(p.format(w=world))) for p in case.keeps} == kept, "an earlier file was changed"
    if case.before_model and case.argv[0] == "train":
        log = world / "out" / case.id / "train.log"  # apply_adapter logs "... trainable of ..." once loaded
        assert not log.is_file() or "trainable of" not in log.read_text(), "the model was loaded first"


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_debug_env_var_shows_the_traceback(world, tiny_base, monkeypatch, caplog, capsys):
    argv = ["train", *[a.format(base=tiny_base, w=world) for a in TRAIN], "run_name=debug_env",
            "data.source=/nonexistent/data.jsonl"]
    for value, shown in (("0", False), ("1", True)):
        monkeypatch.setenv("LLAMA_LORA_DEBUG", value)
        caplog.clear()
        with pytest.raises(SystemExit):
            cli.main(argv)
        tracebacks = [r for r in caplog.records if r.exc_info and r.exc_info[0].__name__ == "LlamaLoraError"]
        assert bool(tracebacks) == shown, value
        assert "'/nonexistent/data.jsonl' does not exist" in _paragraph(capsys.readouterr().err)


def test_a_finished_run_is_refused_and_nothing_of_it_changes(world, tiny_base, capsys):
    run = world / "out" / "finished"

    def snapshot():
        return {str(p.relative_to(run)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted(run.rglob("*")) if p.is_file()}

    before = snapshot()
    assert "adapter/adapter_model.safetensors" in before and "metrics.json" in before
    with pytest.raises(SystemExit):
        cli.main(["train", *[a.format(base=tiny_base, w=world) for a in TRAIN], "run_name=finished",
                  "training.max_steps=5"])
    assert "holds a finished run" in capsys.readouterr().err
    assert snapshot() == before


def test_gated_hub_model_message():
    # What transformers raises for a gated repo without an accepted licence/token (no network here to
    # provoke it for real); the unreachable-hub case above goes through the CLI.
    from llama_lora.model import hub_error

    e = OSError("You are trying to access a gated repo.\nMake sure to have access to it at "
                "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct.\n401 Client Error.")
    msg = str(hub_error(e, "model", "meta-llama/Llama-3.2-1B-Instruct"))
    assert "It is gated: accept its licence on huggingface.co" in msg and "HF_TOKEN" in msg


# ----------------------------------------------------------------------------------------------------
# Safe loading: no remote code unless asked, weights only from safetensors, torch.load never unpickles code.

SRC = Path(cli.__file__).resolve().parent


def test_torch_load_is_always_weights_only_and_nothing_else_unpickles():
    import re

    calls = 0
    for path in SRC.rglob("*.py"):
        if "_vendor" in path.parts:  # upstream code kept verbatim (llama.cpp's converter): not called that way
            continue
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.index("\n", m.start())]
            assert "weights_only=True" in call, f"{path.name}: {call}"
            calls += 1
        assert not re.search(r"\bpickle\.loads?\(|trust_remote_code\s*=\s*True|use_safetensors\s*=\s*False|"
                             r"safe_serialization\s*=\s*False", text), path.name
    assert calls >= 3  # the checkpoint's optimizer, scheduler and RNG state


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_from_pretrained_only_when_configured(trust, tiny_base, monkeypatch):
    from transformers import AutoTokenizer

    from llama_lora import model as model_lib
    from llama_lora.config.schema import Config, TrainingConfig

    seen = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):  # records what reaches transformers, then loads for real
            seen.append(kwargs)
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    cfg = Config() if not trust else Config.model_validate({"model": {"trust_remote_code": True}})
    assert Config().model.trust_remote_code is False  # the default
    runtime = model_lib.choose_runtime(TrainingConfig(device="cpu"), cfg.model, model_lib.probe_capabilities())
    model_lib.load_tokenizer(str(tiny_base), cfg.model)
    model_lib.load_model(str(tiny_base), cfg.model, runtime)
    assert [kw["trust_remote_code"] for kw in seen] == [trust, trust]
    assert seen[1]["use_safetensors"] is True


def test_no_shipped_config_turns_on_remote_code():
    import yaml

    for path in (SRC / "conf").rglob("*.yaml"):
        assert "trust_remote_code" not in json.dumps(yaml.safe_load(path.read_text()) or {}), path


def test_a_checkpoint_pickle_cannot_run_code(world, tiny_base, tmp_path, capsys):
    """A tampered optimizer.pt that would run a shell command when unpickled: resume refuses it."""
    import os

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = world / "out" / "evil_ckpt"
    ckpt = run / "checkpoints" / "step-000002"
    shutil.copytree(world / "out" / "r4_ckpt" / "checkpoints" / "step-000002", ckpt)
    shutil.copy(world / "out" / "r4_ckpt" / "run.json", run / "run.json")  # a run of llama-lora's, interrupted
    torch.save({"state": Evil()}, ckpt / "optimizer.pt")
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *[a.format(base=tiny_base, w=world) for a in TRAIN], "run_name=evil_ckpt"])
    message = _paragraph(capsys.readouterr().err)
    assert exc.value.code == 2
    assert "Cannot resume from the checkpoint" in message and "Weights only load failed" in message, message
    assert not marker.exists()




@pytest.mark.parametrize("module,extra", [("bitsandbytes.nn", "quant"), ("llama_cpp", "llamacpp"),
                                          ("deepspeed", "deepspeed")])
def test_a_missing_optional_package_names_its_extra(module, extra, monkeypatch, capsys):
    """Wherever a command reaches an optional dependency that is not installed, the CLI prints the one
    pip install line (exit 2, no traceback); any other missing module stays a real error."""
    def needs_it(args):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setitem(cli._PARSERS, "merge", needs_it)
    with pytest.raises(SystemExit) as exc:
        cli.main(["merge"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert f"pip install 'llama-lora[{extra}]'" in _paragraph(err)
    monkeypatch.setitem(cli._PARSERS, "merge", lambda args: __import__("no_such_module_here"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["merge"])
