"""`llama-lora serve --print-vllm RUN ...`: check that vLLM can take the runs' adapters, and print the
`vllm serve` command that serves them (docs/serving.md).

vLLM reads `adapter/adapter_config.json` and `adapter/adapter_model.safetensors` (its PEFTHelper) and
refuses DoRA (`use_dora`), `modules_to_save`, adapter biases and ranks above `--max-lora-rank`; those
runs must be merged (`llama-lora merge`) and served as a plain model. The run's tokenizer/ folder holds
the chat template used in training, so vLLM is pointed at it (`--tokenizer`).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from llama_lora import artifacts, runs
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError

# What vLLM's loader needs from a PEFT LoRA adapter folder.
REQUIRED_CONFIG_KEYS = ("r", "lora_alpha", "target_modules")
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def problems(adapter_dir: Path) -> list[str]:
    """Why vLLM would refuse this adapter folder (empty: it can serve it)."""
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        return [f"{cfg_file} is missing"]
    cfg = artifacts.read_json(cfg_file)
    out = [f"adapter_config.json lacks '{k}'" for k in REQUIRED_CONFIG_KEYS if k not in cfg]
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        out.append("adapter_model.safetensors is missing")
    if cfg.get("peft_type", "LORA") != "LORA":
        out.append(f"it is a {cfg['peft_type']} adapter; vLLM serves LoRA only")
    if cfg.get("use_dora"):
        out.append("it is a DoRA adapter, which vLLM does not support: merge it first (`llama-lora merge`) "
                   "and serve <run>/merged as a plain model")
    if cfg.get("modules_to_save"):
        out.append(f"it trains whole modules ({cfg['modules_to_save']}), which vLLM refuses (modules_to_save)")
    if cfg.get("bias", "none") != "none":
        out.append(f"it trains biases (bias={cfg['bias']}), which vLLM refuses")
    return out


def command(cfgs: list[Config], names: list[str] | None = None) -> str:
    """The `vllm serve` command for these runs (one base), each served as its name in `names` (default: its
    folder's name), or LlamaLoraError listing what vLLM refuses."""
    targets = [runs.resolve(c.infer.run_dir, c.output_dir) for c in cfgs]
    bad = {t: problems(t / "adapter") for t in targets if runs.is_run_dir(t)}
    bad |= {t: ["it is not a run directory with an adapter/"] for t in targets if not runs.is_run_dir(t)}
    if any(bad.values()):
        raise LlamaLoraError("vLLM cannot serve " + "; ".join(f"{t}: {', '.join(p)}" for t, p in bad.items() if p)
                             + ". Other runs can be served as they are.")
    bases = {runs.base_model_of(t, c) for t, c in zip(targets, cfgs)}
    if len(bases) > 1:
        raise LlamaLoraError(f"These runs are on different bases ({', '.join(sorted(bases))}): one vLLM server "
                             "serves the adapters of one base. Print one command per base.")
    rank = max(artifacts.read_json(t / "adapter" / "adapter_config.json")["r"] for t in targets)
    max_rank = next((c for c in _VLLM_RANKS if c >= rank), rank)
    tokenizer = targets[0] / "tokenizer"
    args = ["vllm", "serve", bases.pop(), "--enable-lora", "--max-lora-rank", str(max_rank),
            "--max-loras", str(len(targets))]
    if tokenizer.is_dir():
        args += ["--tokenizer", str(tokenizer)]
    names = names or [t.name for t in targets]
    args += ["--lora-modules", *(f"{n}={t / 'adapter'}" for n, t in zip(names, targets))]
    return shlex.join(args)


def notes(cfgs: list[Config], names: list[str]) -> list[str]:
    """What the printed command serves differently from the runs as trained."""
    out = []
    for cfg, name in zip(cfgs, names):
        quantization = getattr(cfg.model, "quantization", "none") or "none"
        if quantization != "none":
            out.append(f"{name} was trained on the {quantization}-quantized base; this command has vLLM load the "
                       "full-precision base, so its answers can differ from the run's as trained (`llama-lora "
                       "serve` quantizes the base as training did). Compare a few answers before switching.")
    return out
