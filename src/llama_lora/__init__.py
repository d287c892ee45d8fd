"""llama-lora: LoRA/DoRA fine-tuning for LLaMA-family models."""

__version__ = "0.1.0"
