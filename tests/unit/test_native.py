"""llama-lora's CPU kernel for the rank-r products (llama_lora/lean/native.py, csrc/lowrank.c): the same numbers as
torch for every width and layout it takes, torch where it does not, and the merged LoRA/DoRA step through
it equal to PEFT's. It is built with the machine's gcc: in CI, where gcc is on PATH, it must build."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from llama_lora import lean
from llama_lora.lean import LeanPolicy, native
from tests.helpers import forward_backward, tiny_peft_model

BUILT = native.load() is not None
if os.environ.get("CI") and shutil.which("gcc") and not BUILT:
    raise AssertionError(f"the native kernel must build in CI: {native.why()}")
needs_kernel = pytest.mark.skipif(not BUILT, reason=f"no native kernel here: {native.why()}")


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many products went through the C kernel (a spy: the call still runs)."""
    calls = []
    real = native.call_kernel

    def spy(*args):
        calls.append(args[4])
        return real(*args)

    monkeypatch.setattr(native, "call_kernel", spy)
    return calls


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 7, 64, 130, 333])
@pytest.mark.parametrize("n,width", [(96, 16), (256, 32), (80, 48), (200, 64)])
@pytest.mark.parametrize("threads", [1, 2])
def test_products_equal_torch(rows, n, width, threads, kernel_calls):
    torch.manual_seed(rows + n)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        m, p = torch.randn(rows, n), torch.randn(n, width)
        q = torch.randn(rows, width + 24)[:, 8 : 8 + width]  # a column slice: row stride > width, as h's split
        s = 0.37
        _close(native.proj(m, p, s), s * m @ p)
        _close(native.wgrad(m, q, s), s * m.t() @ q)
        both = native.proj_and_wgrad(m, p, q, s)
        _close(both[0], s * m @ p)
        _close(both[1], s * m.t() @ q)
        gt = torch.randn(n, rows).t()  # a transposed (column-major) operand is copied to rows first
        _close(native.wgrad(gt, q), gt.t() @ q)
    finally:
        torch.set_num_threads(before)
    assert len(kernel_calls) == 4


def test_other_operands_take_torch(kernel_calls):
    """Widths that are not a multiple of 16, other dtypes, and operands autograd must see: torch computes
    them (the same numbers), the kernel is not called."""
    m = torch.randn(50, 40)
    p8 = torch.randn(40, 8)
    _close(native.proj(m, p8, 2.0), 2.0 * m @ p8)
    q16 = torch.randn(50, 16, dtype=torch.bfloat16)
    assert native.wgrad(m.bfloat16(), q16).dtype == torch.bfloat16
    leaf = torch.randn(40, 16, requires_grad=True)
    out = native.proj(m, leaf)
    out.sum().backward()
    _close(leaf.grad, m.sum(0, keepdim=True).t().expand(40, 16))
    assert kernel_calls == []


@needs_kernel
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_merged_step_through_kernel_equals_peft(dora, checkpointing, kernel_calls):
    ref = tiny_peft_model(dora, r=16, checkpointing=checkpointing)
    model = tiny_peft_model(dora, r=16, checkpointing=checkpointing, lean=LeanPolicy(True, True, True))
    model.load_state_dict(ref.state_dict())
    assert all(m.lean_kernel for m in lean.lean_layers(model))
    ref.train(), model.train()
    ids = torch.randint(0, 101, (2, 37))
    ref_out, ref_grads = forward_backward(ref, ids)
    assert kernel_calls == []  # PEFT's layers: BLAS
    out, grads = forward_backward(model, ids)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    # a block: gh and dB together for each of its 7 layers, dA for each of its 4 input groups (q/k/v, o,
    # gate/up, down); h = x A^T stays with BLAS
    assert len(kernel_calls) == 2 * (7 + 4)


@pytest.fixture
def fresh_load():
    """native.load() tries again (with this test's PATH); afterwards, again with the real one."""
    native.forget()
    yield
    native.forget()
    assert (native.load() is not None) == BUILT


def test_lean_kernel_config(monkeypatch, tmp_path, fresh_load):
    """peft.lean_kernel: auto follows whether the kernel builds; true without a compiler is a clear error
    naming the field and the fix, whatever else would decide it off; false and non-CPU devices never use it."""
    from llama_lora.config.schema import PeftConfig
    from llama_lora.errors import LlamaLoraError

    assert PeftConfig().lean_kernel == "auto"
    assert lean.decide(PeftConfig(), "cpu", "fp32").kernel == BUILT
    assert not lean.decide(PeftConfig(lean_kernel=False), "cpu", "fp32").kernel
    assert not lean.decide(PeftConfig(lean_kernel=True, lean=True, lean_merged=True), "cuda", "fp32").kernel
    native.forget()
    with monkeypatch.context() as m:
        m.setenv("PATH", str(tmp_path))  # no gcc on PATH
        m.setenv("LLAMA_LORA_CACHE", str(tmp_path))
        for cfg in (PeftConfig(lean_kernel=True), PeftConfig(lean_kernel=True, r=4, lean=False)):
            with pytest.raises(LlamaLoraError, match=r"peft.lean_kernel=true.*no gcc on PATH.*peft.lean_kernel=auto"):
                lean.decide(cfg, "cpu", "fp32")
        auto = lean.decide(PeftConfig(), "cpu", "fp32")
        assert auto.merged and not auto.kernel
        assert auto.describe().endswith("rank-r products by BLAS (the kernel cannot be built here: no gcc on PATH)")


@needs_kernel
def test_build_is_cached_per_machine(tmp_path):
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # built once
    assert [p.name for p in (tmp_path / "native").iterdir()] == [first.name]  # no temporary left behind
