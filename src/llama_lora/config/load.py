"""Hydra compose -> plain dict -> Pydantic validation, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from pydantic import ValidationError

from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError

# The schema's defaults are the base node of every composition, so YAML groups only state differences
# and an override of a key the schema lacks fails in Hydra's struct mode.
ConfigStore.instance().store(name="schema_defaults", node=Config().model_dump())


def compose_dict(overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose conf/config.yaml with Hydra overrides; return a plain dict (not yet validated)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="llama_lora.conf", version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides or []))
    except Exception as e:  # Hydra raises several exception types for bad overrides
        raise LlamaLoraError(f"Could not apply the overrides {list(overrides or [])}: {_hydra_message(e)}") from e
    return OmegaConf.to_container(cfg, resolve=True)


def _hydra_message(e: Exception) -> str:
    msg = " ".join(str(e).split("Config search path")[0].split())
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause) not in msg:
        msg += f" ({str(cause).strip().splitlines()[0]})"
    if "not in struct" in msg or "Could not override" in msg:
        msg += " Check the key's spelling (see `llama-lora validate` or src/llama_lora/config/schema.py); "
        msg += "config groups are model=, data=, peft=, training=, experiment=."
    return msg


def validate(data: dict[str, Any]) -> Config:
    """Validate a composed dict; raise LlamaLoraError naming field, value and what is allowed."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise LlamaLoraError(format_validation_error(e)) from e


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        # Union members appear in loc as e.g. "list[str]"; keep only the field names.
        path = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("list[", "literal[", "function-")))
        path = path or "<root>"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{path}' (value {value!r}); remove it or fix its spelling")
            continue
        allowed = ""
        ctx = err.get("ctx") or {}
        if "expected" in ctx and str(ctx["expected"]) not in err["msg"]:
            allowed = f"; allowed: {ctx['expected']}"
        if path == "<root>":  # a cross-field rule: its message names the fields; the input is the whole config
            parts.append(err["msg"].removeprefix("Value error, "))
            continue
        parts.append(f"{path} = {value!r} is invalid: {err['msg']}{allowed}")
    return "Invalid configuration: " + "; ".join(parts) + "."


def load_config(overrides: list[str] | None = None) -> Config:
    """Compose and validate: the entry point every command uses."""
    return validate(compose_dict(overrides))


def load_config_file(path: str | Path) -> Config:
    """Read a resolved config YAML written into a run directory."""
    path = Path(path)
    if not path.is_file():
        raise LlamaLoraError(f"No config file at {path}: is this a llama-lora run directory?")
    return validate(yaml.safe_load(path.read_text()) or {})


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
