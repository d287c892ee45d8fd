"""No remote code by default: a quantized base loads and runs on bitsandbytes' built-in CPU kernel with the
network unreachable, with no Hub request attempted and no warning printed; LLAMA_LORA_HUB_KERNELS=1 is the
only way to let bitsandbytes fetch its Hub kernel (shown by the request it then attempts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("bitsandbytes")

# Runs in a fresh interpreter, online (HF_HUB_OFFLINE unset) but with every connection refused: a
# Python audit hook records each socket.getaddrinfo/connect and fails it, as an unreachable network
# would. Then it loads the tiny base nf4 through llama-lora and runs an eval forward (bitsandbytes'
# gemv path, the one the Hub kernel would replace).
_CHILD = textwrap.dedent("""
    import json, sys
    attempts = []
    def hook(event, args):
        if event in ("socket.getaddrinfo", "socket.connect"):
            attempts.append(f"{event} {args[0] if event == 'socket.getaddrinfo' else args[1]}")
            raise OSError(101, "Network is unreachable (test)")
    sys.addaudithook(hook)
    import torch
    from llama_lora import model as m
    from llama_lora.config.schema import ModelConfig, TrainingConfig
    rt = m.choose_runtime(TrainingConfig(device="cpu"), ModelConfig(quantization="nf4"), m.Capabilities())
    model = m.load_model(sys.argv[1], ModelConfig(quantization="nf4"), rt, training=False).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    import bitsandbytes.backends.cpu.ops as ops
    avx512bf16 = bool(getattr(ops, "has_avx512bf16", lambda: False)())
    print(json.dumps({"attempts": attempts, "finite": bool(torch.isfinite(logits).all()), "avx512bf16": avx512bf16}))
""")


def _run(tiny_base, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                           "LLAMA_LORA_HUB_KERNELS")}
    env.update(env_extra)
    p = subprocess.run([sys.executable, "-c", _CHILD, str(tiny_base)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_quantized_base_runs_offline_without_hub_kernels(tiny_base):
    result, stderr = _run(tiny_base)
    assert result["finite"]
    assert result["attempts"] == [], result["attempts"]  # no Hub request, not even a DNS lookup
    assert "kernels-community" not in stderr and "WARNING" not in stderr.upper(), stderr[-2000:]
    assert "trust" not in stderr, stderr[-2000:]


def test_hub_kernels_only_when_asked(tiny_base):
    """The opt-in really reaches for the Hub kernel (so the test above would see a request if the guard failed)."""
    result, _ = _run(tiny_base, LLAMA_LORA_HUB_KERNELS="1")
    if not result["avx512bf16"]:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never asks for its Hub kernel here")
    assert result["finite"]
    assert result["attempts"], "with LLAMA_LORA_HUB_KERNELS=1 bitsandbytes should have tried the Hub"
