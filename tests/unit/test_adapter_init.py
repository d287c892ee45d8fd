"""peft.init (issue #15): each initialisation's saved adapter loads with plain PEFT on the ORIGINAL base
and gives the trained model's outputs; PiSSA/OLoRA (which rewrite the base weights) only through the
conversion at save; bad combinations are refused with a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig

from llama_lora import lean
from llama_lora.adapter import apply_adapter, initial_adapter_state, save_adapter
from llama_lora.config.load import load_config
from llama_lora.config.schema import PeftConfig
from llama_lora.errors import LlamaLoraError
from tests.helpers import LEAN_CFG

IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 14, 8]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama saved to disk: the original base every adapter must load on."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(LlamaConfig(**LEAN_CFG), dtype=torch.float32).save_pretrained(path)
    return path


def _base(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def _trained(base_dir, init: str, use_lean: bool, method: str = "lora"):
    """apply_adapter with peft.init=`init`, then "trained": every adapter weight moved (a real step's
    worth, so A, B and magnitude all differ from their init). Returns (model, its initial state)."""
    cfg = PeftConfig(r=4, alpha=8, target_modules="all-linear", init=init, method=method)
    policy = lean.decide(cfg, "cpu", "fp32") if use_lean else None
    torch.manual_seed(1)
    model = apply_adapter(_base(base_dir), cfg, lean=policy)
    initial = initial_adapter_state(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval(), initial


@torch.no_grad()
@pytest.mark.parametrize("init,use_lean", [
    ("default", True), ("gaussian", False), ("pissa", False), ("pissa", True), ("olora", False), ("olora", True),
], ids=["default-lean", "gaussian-peft", "pissa-peft", "pissa-lean", "olora-peft", "olora-lean"])
def test_saved_adapter_loads_on_the_original_base_with_equal_outputs(base_dir, tmp_path, init, use_lean):
    model, initial = _trained(base_dir, init, use_lean)
    expected = model(input_ids=IDS).logits
    mutates = init in ("pissa", "olora")
    original = _base(base_dir).model.layers[0].self_attn.q_proj.weight
    rewritten = not torch.equal(model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer().weight,
                                original)
    assert rewritten == mutates and (initial is not None) == mutates  # pissa/olora rewrite W; others leave it

    save_adapter(model, tmp_path / "adapter", initial=initial)
    loaded = PeftModel.from_pretrained(_base(base_dir), tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=2e-5, rtol=1e-4)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # The converted adapter is a plain LoRA of rank 2r ([A | A0], [B | -B0]) with the same scale.
    assert (saved["r"], saved["lora_alpha"]) == ((8, 16) if mutates else (4, 8))
    assert saved["init_lora_weights"] is True or init == "gaussian"
    if mutates:
        # Without the conversion the same weights on the original base are another model (PEFT itself would
        # re-derive the rewritten base from init_lora_weights=pissa/olora at load; other tools do not).
        save_adapter(model, tmp_path / "unconverted")
        config_file = tmp_path / "unconverted" / "adapter_config.json"
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"init_lora_weights": True}))
        plain = PeftModel.from_pretrained(_base(base_dir), tmp_path / "unconverted").eval()
        assert (plain(input_ids=IDS).logits - expected).abs().max() > 1e-2


def test_inits_start_where_they_should(base_dir):
    """default/gaussian start at the base's outputs (B = 0); pissa/olora too, with the base rewritten so
    that W - s B0 A0 + s B0 A0 = W; gaussian's A differs from default's."""
    base_logits = _base(base_dir)(input_ids=IDS).logits
    a = {}
    for init in ("default", "gaussian", "pissa", "olora"):
        cfg = PeftConfig(r=4, alpha=8, target_modules="all-linear", init=init)
        torch.manual_seed(1)
        model = apply_adapter(_base(base_dir), cfg).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=IDS).logits, base_logits, atol=2e-5, rtol=1e-4)
        a[init] = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach()
    assert not torch.allclose(a["default"], a["gaussian"])
    assert not torch.allclose(a["pissa"], a["olora"])


@pytest.mark.parametrize("overrides,needle", [
    (["peft.init=loftq"], "peft.init=loftq"),
    (["peft.init=pissa", "peft.method=dora"], "peft.method=dora is not supported"),
    (["peft.init=olora", "peft.method=dora"], "PEFT's conversion keeps no DoRA magnitude"),
    (["peft.init=svd"], "peft.init"),
], ids=["loftq-without-quantized-base", "pissa-dora", "olora-dora", "unknown"])
def test_bad_init_combinations_are_refused(overrides, needle):
    with pytest.raises(LlamaLoraError) as e:
        load_config(overrides)
    assert needle in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.slow
def test_pissa_run_resumes_exactly_and_its_adapter_scores_the_same_in_plain_peft(tmp_path, tiny_base, monkeypatch):
    """A real pissa run (chunked loss on) stopped by SIGTERM after step 2 and resumed ends with the
    uninterrupted run's adapter; that adapter, loaded by `eval` (plain PEFT on the original base), scores
    exactly the eval loss the trained model had at its last step."""
    import signal

    from llama_lora import eval as eval_cmd, runs, train
    from tests.helpers import assert_same_adapter, data_file, metrics, train_args

    def cfg(name):
        args = train_args(tiny_base, data_file(tmp_path), tmp_path, name, "peft.init=pissa",
                          "training.loss_chunk_size=8", "training.max_steps=4", "training.eval_every=0",
                          "training.save_every=0", "training.report_to=[]")
        return load_config(args[1:])

    train.run(cfg("ref"))
    step = train.train_step

    def stop_after_two(s, n):
        out = step(s, n)
        if n == 2:
            signal.raise_signal(signal.SIGTERM)  # the loop's handler: checkpoint after this step, exit
        return out

    monkeypatch.setattr(train, "train_step", stop_after_two)
    with pytest.raises(SystemExit):
        train.run(cfg("run"))
    monkeypatch.setattr(train, "train_step", step)
    assert (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()
    train.run(cfg("run"))
    assert_same_adapter(tmp_path / "run", tmp_path / "ref")

    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # the plain rank-2r LoRA
    result = eval_cmd.run(runs.saved_config(tmp_path / "run", ["eval.max_new_tokens=2", "eval.num_samples=0"],
                                            "eval"))
    assert result["finetuned"]["loss"] == pytest.approx(metrics(tmp_path / "run")["eval_loss"], abs=1e-5)


def _nf4_base(path):
    from llama_lora.model import bnb_config

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config("nf4", "fp32"),
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    model.config.use_cache = False
    return model


@pytest.fixture(scope="module")
def base_dir_64(tmp_path_factory):
    """As base_dir with every matmul width a multiple of 64 (bitsandbytes' CPU 4-bit kernel needs it)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base64")
    AutoModelForCausalLM.from_config(LlamaConfig(**(LEAN_CFG | {"intermediate_size": 128})),
                                     dtype=torch.float32).save_pretrained(path)
    return path


@torch.no_grad()
def test_loftq_fits_the_quantization_error_and_saves_a_plain_lora_for_the_quantized_base(base_dir_64, tmp_path):
    """peft.init=loftq on an nf4 base (real bitsandbytes): the adapted quantized model starts closer to the
    full-precision base than QLoRA's zero adapter does, and its saved adapter (no base rewriting, so no
    conversion) loads with plain PEFT on the same quantized base with equal outputs."""
    pytest.importorskip("bitsandbytes")
    full = _base(base_dir_64)(input_ids=IDS).logits
    cfg = PeftConfig(r=16, alpha=32, target_modules="all-linear", init="loftq")
    model = apply_adapter(_nf4_base(base_dir_64), cfg).eval()
    qlora = (_nf4_base(base_dir_64)(input_ids=IDS).logits - full).norm()
    loftq = (model(input_ids=IDS).logits - full).norm()
    assert loftq < 0.7 * qlora, (float(loftq), float(qlora))
    assert initial_adapter_state(model, cfg) is None  # the base is not rewritten: nothing to convert
    expected = model(input_ids=IDS).logits
    save_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_nf4_base(base_dir_64), tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=2e-5, rtol=1e-4)


def test_loftq_config_checks():
    cfg = load_config(["peft.init=loftq", "model.quantization=nf4"])
    assert cfg.peft.init == "loftq"
    with pytest.raises(LlamaLoraError, match="model.quantization=nf4"):
        load_config(["peft.init=loftq", "model.quantization=int8"])
    with pytest.raises(LlamaLoraError, match="quantized base"):
        load_config(["peft.init=pissa", "model.quantization=nf4"])
