"""The device matrix: choose_runtime over faked machines (no GPU is needed to check a GPU's choices).

Each row is a machine (Capabilities) plus a config, and the full decision expected for it: device,
compute precision, dtype of the frozen weights, attention kernel, fp16 loss scaling, pinned memory,
fused AdamW, TF32, and what the log line (Runtime.reason) says about it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llama_lora.config.schema import ModelConfig, TrainingConfig
from llama_lora.errors import LlamaLoraError
from llama_lora.model import Capabilities, choose_runtime, probe_capabilities

CPU = Capabilities()
MPS = Capabilities(mps=True)
# Volta (V100): no native bf16, too old for FlashAttention 2 even when it is installed.
V100 = Capabilities(cuda=True, cuda_device_count=1, cuda_capability=(7, 0), flash_attn=True)
T4 = Capabilities(cuda=True, cuda_device_count=1, cuda_capability=(7, 5), flash_attn=True)
A100 = Capabilities(cuda=True, cuda_device_count=1, cuda_bf16=True, cuda_capability=(8, 0))
A100_FA = Capabilities(cuda=True, cuda_device_count=1, cuda_bf16=True, cuda_capability=(8, 0), flash_attn=True)
H100_FA = Capabilities(cuda=True, cuda_device_count=1, cuda_bf16=True, cuda_capability=(9, 0), flash_attn=True)
H100_X8 = Capabilities(cuda=True, cuda_device_count=8, cuda_bf16=True, cuda_capability=(9, 0))
H100_X8_DDP = Capabilities(cuda=True, cuda_device_count=8, cuda_bf16=True, cuda_capability=(9, 0), world_size=8)
CPU_DDP = Capabilities(world_size=2)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# id, caps, training overrides, model overrides,
#   (device, precision, weights, attention, grad_scaler, pin_memory, fused_adamw, tf32), phrases in reason
MATRIX = [
    ("cpu-auto", CPU, {}, {}, ("cpu", "fp32", F32, "sdpa", False, False, False, False),
     ["device=cpu (CPU, no CUDA or MPS)", "precision=fp32 (requested auto)", "weights=float32", "extras: none"]),
    ("cpu-bf16-requested", CPU, {"precision": "bf16"}, {}, ("cpu", "bf16", BF16, "sdpa", False, False, False, False),
     ["precision=bf16 (requested bf16)", "weights=bfloat16", "extras: none"]),
    ("cpu-ddp-gloo", CPU_DDP, {}, {}, ("cpu", "fp32", F32, "sdpa", False, False, False, False),
     ["CPU, no CUDA or MPS, 2 processes"]),
    ("mps-auto", MPS, {}, {}, ("mps", "fp32", F32, "sdpa", False, False, False, False),
     ["device=mps (Apple MPS)", "extras: none"]),
    ("mps-bf16-requested", MPS, {"precision": "bf16"}, {}, ("mps", "bf16", BF16, "sdpa", False, False, False, False),
     ["weights=bfloat16"]),
    ("mps-fp16-requested", MPS, {"precision": "fp16"}, {}, ("mps", "fp16", F16, "sdpa", True, False, False, False),
     ["extras: fp16 loss scaling"]),
    ("cuda-present-cpu-requested", A100_FA, {"device": "cpu"}, {}, ("cpu", "fp32", F32, "sdpa", False, False, False, False),
     ["CPU, CUDA present but not chosen", "extras: none"]),
    ("v100-auto", V100, {}, {}, ("cuda", "fp16", F16, "sdpa", True, True, True, False),
     ["CUDA x1, cc 7.0", "precision=fp16", "flash-attn installed", "fp16 loss scaling, fused AdamW, pinned memory"]),
    ("t4-auto", T4, {}, {}, ("cuda", "fp16", F16, "sdpa", True, True, True, False), ["cc 7.5"]),
    ("a100-auto-no-flash", A100, {}, {}, ("cuda", "bf16", BF16, "sdpa", False, True, True, True),
     ["precision=bf16 (requested auto)", "attention=sdpa (flash-attn not installed)", "fused AdamW, TF32, pinned memory"]),
    ("a100-auto-flash", A100_FA, {}, {}, ("cuda", "bf16", BF16, "flash_attention_2", False, True, True, True),
     ["attention=flash_attention_2 (flash-attn installed)"]),
    ("h100-auto-flash", H100_FA, {}, {}, ("cuda", "bf16", BF16, "flash_attention_2", False, True, True, True),
     ["CUDA x1, cc 9.0"]),
    ("a100-fp16-requested", A100_FA, {"precision": "fp16"}, {}, ("cuda", "fp16", F16, "flash_attention_2", True, True, True, True),
     ["fp16 loss scaling"]),
    # fp32 weights cannot go through FlashAttention: SDPA, with TF32 tensor cores for the fp32 matmuls.
    ("a100-fp32-requested", A100_FA, {"precision": "fp32"}, {}, ("cuda", "fp32", F32, "sdpa", False, True, True, True),
     ["precision=fp32 (requested fp32)", "weights=float32"]),
    ("a100-bf16-autocast-fp32-weights", A100_FA, {}, {"dtype": "float32"}, ("cuda", "bf16", F32, "sdpa", False, True, True, True),
     ["weights=float32"]),
    ("a100-eager-requested", A100_FA, {}, {"attn_implementation": "eager"}, ("cuda", "bf16", BF16, "eager", False, True, True, True),
     ["attention=eager"]),
    ("h100-x8-one-process", H100_X8, {}, {}, ("cuda", "bf16", BF16, "sdpa", False, True, True, True),
     ["CUDA x8, cc 9.0, 1 process: launch with torchrun --nproc_per_node 8"]),
    ("h100-x8-ddp", H100_X8_DDP, {}, {}, ("cuda", "bf16", BF16, "sdpa", False, True, True, True),
     ["CUDA x8, cc 9.0, 8 processes"]),
]


@pytest.mark.parametrize("caps, train_kw, model_kw, expected, phrases",
                         [row[1:] for row in MATRIX], ids=[row[0] for row in MATRIX])
def test_device_matrix(caps, train_kw, model_kw, expected, phrases):
    rt = choose_runtime(TrainingConfig(**train_kw), ModelConfig(**model_kw), caps)
    got = (rt.device, rt.precision, rt.model_dtype, rt.attn_implementation, rt.grad_scaler, rt.pin_memory,
           rt.fused_adamw, rt.tf32)
    assert got == expected
    for phrase in phrases:
        assert phrase in rt.reason, (phrase, rt.reason)
    if not any("1 process" in phrase for phrase in phrases):
        assert "torchrun" not in rt.reason  # the multi-GPU hint only when GPUs sit idle


@pytest.mark.parametrize("caps, train_kw, model_kw, phrases", [
    (CPU, {"precision": "fp16"}, {}, ["training.precision=fp16 is not supported on CPU", "fp32 or bf16"]),
    (CPU, {}, {"dtype": "float16"}, ["model.dtype=float16 is not supported on CPU"]),
    (CPU, {"device": "cuda"}, {}, ["training.device=cuda but no CUDA GPU", "training.device=auto or cpu"]),
    (CPU, {"device": "mps"}, {}, ["training.device=mps but MPS is not available"]),
    (V100, {"precision": "bf16"}, {}, ["compute capability 7.0", "no native bf16", "training.precision=fp16 or auto"]),
    (CPU, {}, {"attn_implementation": "flash_attention_2"}, ["needs a CUDA GPU", "attn_implementation=auto"]),
    (T4, {}, {"attn_implementation": "flash_attention_2"}, ["compute capability >= 8.0"]),
    (A100, {}, {"attn_implementation": "flash_attention_2"}, ["pip install 'llama-lora[flash]'"]),
    (A100_FA, {"precision": "fp32"}, {"attn_implementation": "flash_attention_2"}, ["a bf16/fp16 model"]),
    (MPS, {}, {"attn_implementation": "flash_attention_2"}, ["needs a CUDA GPU"]),
], ids=["cpu-fp16", "cpu-fp16-weights", "cuda-missing", "mps-missing", "v100-bf16", "cpu-flash", "t4-flash",
        "a100-flash-not-installed", "a100-flash-fp32", "mps-flash"])
def test_requests_the_machine_cannot_honour_are_errors(caps, train_kw, model_kw, phrases):
    with pytest.raises(LlamaLoraError) as e:
        choose_runtime(TrainingConfig(**train_kw), ModelConfig(**model_kw), caps)
    for phrase in phrases:
        assert phrase in str(e.value)


def test_choose_runtime_is_pure():
    """Same inputs, same answer, and choosing TF32 does not switch it on: train.py applies the choice."""
    before = torch.backends.cuda.matmul.allow_tf32
    a = choose_runtime(TrainingConfig(), ModelConfig(), H100_FA)
    b = choose_runtime(TrainingConfig(), ModelConfig(), H100_FA)
    assert a == b and a.reason == b.reason and a.tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_probe_reads_this_machine_and_the_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    caps = probe_capabilities()
    assert caps.cuda == torch.cuda.is_available() and caps.world_size == 1
    if not caps.cuda:
        assert (caps.cuda_device_count, caps.cuda_bf16, caps.cuda_capability) == (0, False, (0, 0))
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun / accelerate launch export to each process
    assert probe_capabilities().world_size == 2


def test_cpu_on_glibc_keeps_freed_memory_and_gpus_do_not():
    cpu = choose_runtime(TrainingConfig(), ModelConfig(), Capabilities(glibc=True))
    assert cpu.malloc == "keep" and "malloc keeps freed memory" in cpu.reason
    assert choose_runtime(TrainingConfig(), ModelConfig(), Capabilities()).malloc == "system"  # no glibc
    assert choose_runtime(TrainingConfig(), ModelConfig(), dataclasses.replace(H100_FA, glibc=True)).malloc == "system"
    # A quantized base frees a dequantized weight per layer per pass: large blocks go back to the OS.
    quantized = choose_runtime(TrainingConfig(device="cpu"), ModelConfig(quantization="nf4"), Capabilities(glibc=True))
    assert quantized.malloc == "return" and "malloc returns freed memory" in quantized.reason
    # So does gradient checkpointing, and bf16 (the kept heap was not faster there, and fragmented unpredictably).
    assert choose_runtime(TrainingConfig(device="cpu"), ModelConfig(gradient_checkpointing=True),
                          Capabilities(glibc=True)).malloc == "return"
    assert choose_runtime(TrainingConfig(device="cpu", precision="bf16"), ModelConfig(),
                          Capabilities(glibc=True)).malloc == "return"
    # LLAMA_LORA_MALLOC (read into Capabilities) overrides the choice on CPU, and only there.
    assert choose_runtime(TrainingConfig(), ModelConfig(quantization="nf4"),
                          Capabilities(glibc=True, malloc_override="keep")).malloc == "keep"
    assert choose_runtime(TrainingConfig(), ModelConfig(), dataclasses.replace(
        H100_FA, glibc=True, malloc_override="keep")).malloc == "system"


def test_a_bad_llama_lora_malloc_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("LLAMA_LORA_MALLOC", "fast")
    with pytest.raises(LlamaLoraError, match=r"LLAMA_LORA_MALLOC='fast' is not a malloc mode\. Use system"):
        probe_capabilities()
    monkeypatch.setenv("LLAMA_LORA_MALLOC", "return")
    assert probe_capabilities().malloc_override == "return"
