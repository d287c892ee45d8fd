"""The one way to build a config: Hydra composes a base plus overrides, Pydantic validates the result.

`load_config(overrides)` starts from conf/config.yaml (the schema's defaults plus the YAML groups);
`load_config(overrides, base=cfg)` starts from an existing config instead (an experiment's base, a
saved run's config.yaml), with the same override syntax: a group override (`peft=dora`) merges that
group's YAML on top of the base, as it merges on top of the defaults in a normal composition.
Every command builds its config here; errors name the field, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from pydantic import ValidationError

from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError

# The schema's defaults are the base node of every composition, so YAML groups only state differences
# and an override of a key the schema lacks fails in Hydra's struct mode.
ConfigStore.instance().store(name="schema_defaults", node=Config().model_dump())

# Config groups (conf/<group>/*.yaml). On top of a base config a group override is an addition to the
# base's defaults list (`+peft=dora`), so the group's YAML lands on top of the base.
GROUPS = ("model", "data", "peft", "training", "experiment")
_BASE_NODE = "_llama_lora_base"


def load_config(overrides: list[str] | None = None, base: Config | dict | None = None) -> Config:
    """Compose and validate: conf/config.yaml (or `base`) with Hydra overrides on top."""
    return from_dict(compose_dict(overrides, base))


def compose_dict(overrides: list[str] | None = None, base: Config | dict | None = None) -> dict[str, Any]:
    """`load_config` before validation: a plain dict (experiment edits it before validating)."""
    overrides = list(overrides or [])
    parsed = parse_overrides(overrides)  # a syntax error names the override and how to quote it
    if base is None:
        config_name, hydra_overrides = "config", overrides
    else:
        node = base.model_dump(mode="json") if isinstance(base, Config) else dict(base)
        ConfigStore.instance().store(name=_BASE_NODE, node={"defaults": ["_self_"], **node})
        config_name = _BASE_NODE
        hydra_overrides = [f"+{o.input_line}" if o.key_or_group in GROUPS and o.package is None
                           and not o.input_line.startswith(("+", "~")) else o.input_line
                           for o in parsed]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="llama_lora.conf", version_base=None):
            cfg = compose(config_name=config_name, overrides=hydra_overrides)
    except Exception as e:  # Hydra raises several exception types for bad overrides
        raise LlamaLoraError(f"Could not apply the overrides {overrides}: {hydra_message(e)}") from e
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=True)


def parse_overrides(overrides: list[str]):
    """Hydra's own parse of override strings (key, value, sweep or not), with a readable error."""
    parser = OverridesParser.create()
    try:
        return parser.parse_overrides(list(overrides))
    except Exception as e:
        bad = []
        for o in overrides:  # which ones: Hydra's message names a token, not the override
            try:
                parser.parse_overrides([o])
            except Exception:
                bad.append(o)
        if not bad:
            raise LlamaLoraError(f"Could not parse the overrides {list(overrides)}: {hydra_message(e)}") from e
        raise LlamaLoraError(quoting_hint(bad[0], hydra_message(e))) from e


def quoting_hint(override: str, parser_message: str) -> str:
    """The message for an override Hydra cannot parse: which one, why, and the quoted form that works."""
    key, sep, value = override.partition("=")
    msg = f"Could not parse the override '{override}' ({parser_message.split(' See https')[0]})."
    if not sep or not value:
        return msg + " An override is key=value, e.g. training.max_steps=100."
    # Hydra's quotes go around the value; the shell's around the whole override, of the other kind.
    shell = f"'{key}=\"{value}\"'" if '"' not in value else f"\"{key}='{value}'\""
    syntax = (f"{msg} In Hydra's override syntax [ ] ( ) {{ }} , = : and spaces next to them have a meaning "
              "(lists, sweeps, dicts)")
    if value.lstrip().startswith(("[", "{")):
        return (f"{syntax}: if the value is meant as a list or dict, close its brackets (key=[a,b], key={{k:v}}); "
                f"if it is text, quote it for Hydra and the whole override again for the shell: {shell}")
    return f"{syntax}, so a value holding them must be quoted for Hydra, and the whole override again for the shell: {shell}"


def hydra_message(e: Exception) -> str:
    msg = " ".join(str(e).split("Config search path")[0].split())
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause) not in msg:
        msg += f" ({str(cause).strip().splitlines()[0]})"
    if "not in struct" in msg or "Could not override" in msg:
        msg += " Check the key's spelling (see `llama-lora validate` or src/llama_lora/config/schema.py); "
        msg += "config groups are model=, data=, peft=, training=, experiment=."
    return msg


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a composed dict; raise LlamaLoraError naming field, value and what is allowed."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise LlamaLoraError(format_validation_error(e)) from e


def format_validation_error(e: ValidationError) -> str:
    parts: dict[str, str] = {}  # one entry per field: a union's members' complaints are joined with "or"
    for err in e.errors():
        # Union members appear in loc as e.g. "list[str]" or "constrained-int"; keep only the field names.
        path = ".".join(str(p) for p in err["loc"]
                        if not str(p).startswith(("list[", "literal[", "function-", "constrained-")))
        path = path or "<root>"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            parts[path] = f"unknown key '{path}' (value {value!r}); remove it or fix its spelling"
            continue
        allowed = ""
        ctx = err.get("ctx") or {}
        if "expected" in ctx and str(ctx["expected"]) not in err["msg"]:
            allowed = f"; allowed: {ctx['expected']}"
        if path == "<root>":  # a cross-field rule: its message names the fields; the input is the whole config
            parts[f"<root>{len(parts)}"] = err["msg"].removeprefix("Value error, ")
        elif path in parts:
            parts[path] += f", or {err['msg'][0].lower()}{err['msg'][1:]}{allowed}"
        else:
            parts[path] = f"{path} = {value!r} is invalid: {err['msg']}{allowed}"
    return "Invalid configuration: " + "; ".join(parts.values()) + "."


def load_config_file(path: str | Path) -> Config:
    """Read a resolved config YAML written into a run directory."""
    path = Path(path)
    if not path.is_file():
        raise LlamaLoraError(f"No config file at {path}: is this a llama-lora run directory?")
    damaged = (f"The run's saved config {path} is damaged ({{}}): it is what infer, eval, merge, serve and export "
               "read to run the model as it was trained. Restore it from a copy of the run, or train the run again.")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LlamaLoraError(damaged.format(" ".join(str(e).split())[:200])) from e
    if data is not None and not isinstance(data, dict):
        raise LlamaLoraError(damaged.format(f"it holds a {type(data).__name__}, not a mapping of settings"))
    try:
        return from_dict(data or {})
    except LlamaLoraError as e:
        raise LlamaLoraError(damaged.format(str(e))) from e


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'training': {'seed': 1}} -> {'training.seed': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: Config | dict, new: Config | dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The fields that differ, each "key: OLD there, NOW now"; a key in `ignore`, or under one ('eval'
    covers eval.*), is not compared. Dicts are compared as given (flattened), so callers can add keys."""
    def leaves(c: Config | dict) -> dict[str, Any]:
        flat = flatten(c.model_dump(mode="json") if isinstance(c, Config) else c)
        return {k: v for k, v in flat.items() if not any(k == i or k.startswith(f"{i}.") for i in ignore)}

    a, b = leaves(old), leaves(new)
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
