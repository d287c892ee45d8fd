"""The process-wide memory settings (model.apply_process_settings) in a fresh child process: glibc's
malloc tuned to keep freed pages for reuse, or left to return them with LLAMA_LORA_MALLOC=system. Which
runtime asks for them is decided in tests/unit/test_device_matrix.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from llama_lora.model import probe_capabilities


@pytest.mark.skipif(not probe_capabilities().glibc, reason="glibc only")
@pytest.mark.parametrize("malloc", ["", "system"], ids=["tuned", "system"])
def test_apply_process_settings_keeps_freed_pages_in_the_process(malloc):
    """A freed 256 MiB tensor stays resident for reuse when tuned (no page faults next time) and goes
    back to the OS with LLAMA_LORA_MALLOC=system. Run in a subprocess: the setting is process-wide."""
    code = textwrap.dedent("""
        import os, torch
        from llama_lora import model as m
        m.apply_process_settings(m.choose_runtime(m.TrainingConfig(), m.ModelConfig(), m.probe_capabilities()))
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        before = rss()
        x = torch.ones(64 * 2**20)  # 256 MiB, touched
        del x
        print(rss() - before)
    """)
    env = {**os.environ, "LLAMA_LORA_MALLOC": malloc, "CUDA_VISIBLE_DEVICES": ""}
    kept = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout)
    assert (kept > 200) if malloc == "" else (kept < 50), kept


QUANTIZED_PASS = textwrap.dedent("""
    import os, torch
    from llama_lora import model as m
    caps = m.probe_capabilities()
    m.apply_process_settings(m.choose_runtime(m.TrainingConfig(device="cpu"),
                                              m.ModelConfig(quantization="nf4"), caps))
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    w = torch.ones(6 * 2**20)  # 24 MiB
    del w
    before = rss()
    for _ in range(4):
        w = torch.ones(4 * 2**20)  # 16 MiB, touched, then freed
        del w
    print(rss() - before)
""")
BLOCK_MIB = 16


def _held_after_quantized_pass(malloc: str) -> float:
    """MiB still resident after QUANTIZED_PASS in a fresh process (the setting is process-wide)."""
    env = {**os.environ, "LLAMA_LORA_MALLOC": malloc, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", QUANTIZED_PASS], capture_output=True, text=True, check=True, env=env)
    return float(run.stdout)


@pytest.mark.skipif(not probe_capabilities().glibc, reason="glibc only")
def test_a_quantized_base_returns_freed_weight_sized_blocks():
    """What a quantized base does each pass: a large dequantized weight is freed, then weight-sized blocks
    are allocated and freed. The quantized runtime fixes glibc's mmap threshold, so every block is mapped
    on its own and unmapped when freed: a deterministic outcome, asserted in one run (under a quarter of
    a block left resident).

    Left to glibc (LLAMA_LORA_MALLOC=system), the threshold rises after the first large free, so the later
    blocks come from the heap and may stay resident when freed. How much stays depends on the heap's
    layout and varies from run to run (an unlucky layout lets glibc trim some or all of it), so that half
    is asserted as a direction with a margin over repeats, not per run: within up to five fresh processes,
    one holds at least three quarters of a block more than the quantized runtime did. That keeps what the
    test proves (glibc's own policy does hold such blocks, and the setting is what returns them) without
    failing on one unlucky layout."""
    fixed = _held_after_quantized_pass("")
    assert fixed < BLOCK_MIB / 4, fixed
    margin, system = 0.75 * BLOCK_MIB, []
    while len(system) < 5 and (not system or max(system) - fixed < margin):
        system.append(_held_after_quantized_pass("system"))
    assert max(system) - fixed >= margin, (fixed, system)
