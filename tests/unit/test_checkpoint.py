"""Checkpoints (checkpoint.py): the TrainState a loop carries is exactly what a checkpoint saves and
restores, with the adapter, optimizer, scheduler and RNG; a damaged checkpoint is a clear error."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from accelerate import Accelerator
from transformers import get_scheduler

from llama_lora import checkpoint
from llama_lora.artifacts import RunDir
from llama_lora.checkpoint import TrainState
from llama_lora.errors import LlamaLoraError
from tests.helpers import forward_backward, tiny_peft_model


def _setup():
    model = tiny_peft_model(dora=False, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt, get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)


def _step(model, opt, sched, ids):
    forward_backward(model, ids)
    opt.step(), sched.step(), opt.zero_grad(set_to_none=True)


def test_save_then_load_restores_state_weights_optimizer_and_rng(tmp_path):
    ids = torch.randint(0, 101, (2, 12))
    model, opt, sched = _setup()
    _step(model, opt, sched, ids)
    state = TrainState(step=1, tokens=24, response_tokens=20, train_time=0.5, eval_loss_before=4.6, window_loss=4.1,
                       window_steps=1)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    path = checkpoint.save(run, Accelerator(cpu=True), model, opt, sched, state, keep=2)
    sched_at_save = sched.state_dict()
    draws = (torch.rand(3), random.random())  # what the RNG gives right after the save
    _step(model, opt, sched, ids)  # the uninterrupted run's next step
    straight = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model2, opt2, sched2 = _setup()  # a fresh process: other weights until loaded
    restored = checkpoint.load(run.checkpoint_dirs()[-1], model2, opt2, sched2)
    assert str(run.checkpoint_dirs()[-1]) == path
    assert restored == state and dataclasses.asdict(restored) == dataclasses.asdict(state)
    assert sched2.state_dict() == sched_at_save
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1]
    _step(model2, opt2, sched2, ids)
    for n, p in model2.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, straight[n], rtol=0, atol=0)  # the resumed step is the same step


def test_train_state_from_an_older_checkpoint_file():
    """Keys a checkpoint's trainer_state.json lacks take their defaults; unknown ones are ignored."""
    state = TrainState.from_dict({"step": 7, "tokens": 70, "eval_loss_before": 3.0, "some_future_key": 1})
    assert state == TrainState(step=7, tokens=70, eval_loss_before=3.0)


def test_a_checkpoint_of_another_adapter_shape_is_a_clear_error(tmp_path):
    model, opt, sched = _setup()
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    checkpoint.save(run, Accelerator(cpu=True), model, opt, sched, TrainState(step=1), keep=1)
    other = tiny_peft_model(dora=False, seed=3, r=8)
    other_opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(LlamaLoraError, match="Cannot resume from the checkpoint .* another model/adapter"):
        checkpoint.load(run.checkpoint_dirs()[-1], other, other_opt, get_scheduler("constant", other_opt))
