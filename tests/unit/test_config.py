"""The schema, the shipped YAML and the error messages (no model is loaded here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from llama_lora.config import schema
from llama_lora.config.load import compose_dict, load_config
from llama_lora.errors import LlamaLoraError

CONF = Path(schema.__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "data", "peft", "training", "experiment"]


def _models(model: type[BaseModel]):
    yield model
    for f in model.model_fields.values():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _models(ann)


def test_every_field_is_documented():
    for model in _models(schema.Config):
        for name, field in model.model_fields.items():
            assert field.description and len(field.description) > 10, f"{model.__name__}.{name} has no doc"


@pytest.mark.parametrize("path", sorted(p for g in GROUPS for p in (CONF / g).glob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_yaml_composes_and_validates(path):
    cfg = load_config([f"{path.parent.name}={path.stem}"])
    # The option's own keys really took effect (a YAML key the schema lacks would already have failed).
    data = yaml.safe_load(path.read_text()) or {}
    if path.parent.name != "experiment":
        section = getattr(cfg, path.parent.name)
        for key, value in data.items():
            assert getattr(section, key) == value or isinstance(value, dict), (path, key)


def test_defaults_follow_the_reference_target():
    cfg = load_config([])
    assert cfg.model.name_or_path == "meta-llama/Llama-3.2-1B-Instruct"
    assert cfg.data.source == "tatsu-lab/alpaca" and cfg.data.train_split == "train[:1%]"
    assert cfg.peft.method == "lora" and cfg.peft.target_modules == "all-linear"
    assert cfg.training.report_to == ["tensorboard"]


def test_composed_defaults_equal_schema_defaults():
    """YAML groups must not restate (and so drift from) the schema's defaults."""
    composed = compose_dict([])
    assert composed["training"] == schema.TrainingConfig().model_dump()
    assert composed["eval"] == schema.EvalConfig().model_dump()


def test_overrides_and_groups():
    cfg = load_config(["experiment=quickstart", "peft=dora", "peft.r=8", "training.learning_rate=1e-4",
                       "peft.target_modules=[q_proj,v_proj]"])
    assert cfg.model.name_or_path == "embedded" and cfg.data.source == "embedded"
    assert cfg.peft.method == "dora" and cfg.peft.r == 8 and cfg.training.learning_rate == 1e-4
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.preset == "quickstart"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("peft.r=0", ["peft.r", "0", "greater than or equal to 1"]),
        ("peft.r=abc", ["peft.r", "'abc'", "valid integer"]),
        ("peft.dropout=1.5", ["peft.dropout", "1.5", "less than 1"]),
        ("peft.alpha=-1", ["peft.alpha", "greater than 0"]),
        ("training.learning_rate=abc", ["training.learning_rate", "'abc'", "number"]),
        ("training.learning_rate=0", ["training.learning_rate", "greater than 0"]),
        ("training.micro_batch_size=0", ["training.micro_batch_size", "greater than or equal to 1"]),
        ("training.lr_scheduler=step", ["training.lr_scheduler", "'step'", "'cosine', 'linear' or 'constant'"]),
        ("training.precision=fp8", ["training.precision", "'fp8'", "'auto'"]),
        ("model.dtype=int4", ["model.dtype", "'int4'", "'bfloat16'"]),
        ("data.max_seq_length=4", ["data.max_seq_length", "greater than or equal to 8"]),
        ("data.prompt_format=vicuna", ["data.prompt_format", "'chat' or 'alpaca'"]),
        ("data.eval_fraction=1.0", ["data.eval_fraction", "less than 1"]),
        ("peft.target_modules=[]", ["peft.target_modules", "at least one module"]),
        ("training.report_to=[mlflow]", ["training.report_to", "'mlflow'", "'tensorboard' or 'wandb'"]),
        ("run_name=a/b", ["run_name", "plain directory name"]),
        ("+training.lr=1", ["unknown key 'training.lr'"]),
        ("+foo=1", ["unknown key 'foo'"]),
        ("peft.rank=8", ["peft.rank", "spelling"]),
        ("trainin.max_steps=3", ["trainin.max_steps"]),
        ("peft=lorax", ["peft/lorax", "dora", "lora"]),
        ("experiment=nope", ["experiment/nope"]),
    ],
)
def test_config_error_matrix(override, expected):
    with pytest.raises(LlamaLoraError) as info:
        load_config([override])
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message  # one paragraph
