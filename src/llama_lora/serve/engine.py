"""The generation worker: a bounded queue of requests, batched per model, generated on one thread.

One thread owns the model (PEFT's active adapter is model-wide state, so two generations at once could
not use two adapters). It takes the oldest queued request and every other queued request for the same
model and sampling settings (up to `max_batch`), and generates them together with
`generation.generate` (left padding, the run's stop tokens, exactly infer's code). A per-row stopping
criterion ends a row at its own max_tokens, when its client disconnected, or at its deadline; the batch
ends when every row has. A request with a `seed` that samples is generated alone, with the random
generators seeded (same seed and settings: same answer). Admin work (adding or removing an adapter) runs
on the same thread, between batches. `stop()` drops the queue and cuts the batch being generated.

Why not `transformers serve`'s continuous-batching manager: it loads one model per name from the
hub or a path, with the tokenizer's own chat template, and has no notion of PEFT adapters switched per
request or of our saved prompt formats; the static batches here reuse infer's generation unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from llama_lora.generation import generate, generation_config, stop_token_ids
from llama_lora.serve.pool import Entry, Pool

log = logging.getLogger("llama_lora.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after


class Stopping(Exception):
    """The server is shutting down: no new request is taken."""


@dataclass(eq=False)  # identity: a job is one request
class Job:
    """One request's generation. Events go to the request's asyncio queue: ("text", str) deltas, then
    ("done", finish_reason) or ("error", message)."""

    entry: Entry
    prompt: str
    prompt_tokens: int
    max_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    ignore_eos: bool
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    seed: int | None = None  # for a sampled request: its answer is reproducible (generated alone, seeded)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    finish_reason: str | None = None

    @property
    def key(self) -> tuple:
        return (self.entry.name, self.do_sample, self.temperature, self.top_p, self.ignore_eos, self.seed)

    @property
    def alone(self) -> bool:
        """Generated in a batch of its own: a seeded sample (other rows would draw from its generator)."""
        return self.seed is not None and self.do_sample

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the server's event loop is closed (shutting down): nobody is listening
            pass

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.emit("done", reason)


class _Rows:
    """Streamer (generate's put/end protocol) and per-row stopping criterion for one batch."""

    def __init__(self, jobs: list[Job], tokenizer, stops: set[int]):
        self.jobs, self.tok, self.stops, self.first = jobs, tokenizer, stops, True
        self.tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate's first put is the prompt
            self.first = False
            return
        for job, token in zip(self.jobs, value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if job.done:
                continue
            if token in self.stops and not job.ignore_eos:
                self.finish(job, "stop")
                continue
            job.ids.append(token)
            self.tokens += 1
            # Decode the whole answer and send what is new; hold back a partial UTF-8 character.
            text = self.tok.decode(job.ids, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(job.sent):
                job.emit("text", text[len(job.sent):])
                job.sent = text
            if len(job.ids) >= job.max_tokens:
                self.finish(job, "length")

    def end(self) -> None:
        pass

    def finish(self, job: Job, reason: str) -> None:
        if not job.done:
            text = self.tok.decode(job.ids, skip_special_tokens=True)
            if len(text) > len(job.sent):  # what was held back (a final partial character)
                job.emit("text", text[len(job.sent):])
                job.sent = text
            job.finish(reason)

    def stopped(self) -> torch.Tensor:
        now = time.monotonic()
        for job in self.jobs:
            if not job.done and job.cancelled.is_set():
                self.finish(job, "cancelled")
            elif not job.done and now > job.deadline:
                self.finish(job, "timeout")
        return torch.tensor([job.done for job in self.jobs])


class _RowStop(StoppingCriteria):
    def __init__(self, rows: _Rows):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        return self.rows.stopped().to(input_ids.device)


class Engine:
    """The queue and the worker thread. `submit` and `call` are for the HTTP side; everything else in
    here runs on the worker, except `stop`."""

    def __init__(self, pool: Pool, max_batch: int, queue_size: int, batch_wait_s: float):
        self.pool, self.max_batch, self.queue_size, self.batch_wait_s = pool, max_batch, queue_size, batch_wait_s
        self._pending: collections.deque[Job] = collections.deque()
        self._admin: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._running: list[Job] = []  # the batch being generated
        self._cv = threading.Condition()
        self._stop = False
        self.active = 0  # requests being generated now
        self.stats = {"requests": 0, "tokens": 0, "batches": 0, "rows": 0, "cancelled": 0, "rejected": 0}
        self._batch_s = 1.0  # moving average of a batch's duration, for Retry-After
        self._thread = threading.Thread(target=self._work, name="llama-lora-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def halt(self) -> None:
        """Stop generating, without waiting: every queued request is dropped and every request in the batch
        being generated is cut at its next token (each ends 'cancelled', so its client gets an error rather
        than a cut connection); waiting admin calls fail. For the end of the server's drain time."""
        with self._cv:
            if self._stop:
                return
            self._stop = True
            dropped, self._pending = list(self._pending), collections.deque()
            admin, self._admin = list(self._admin), collections.deque()
            for job in self._running:
                job.cancelled.set()
            self._cv.notify_all()
            for job in dropped:
                self._cancel(job)
        for _, fut in admin:
            fut.set_exception(Stopping())
        if dropped or self._running:
            log.info("Stopping: %d queued request(s) dropped, %d being generated cut short", len(dropped),
                     len(self._running))

    def stop(self, timeout: float = 10.0) -> bool:
        """`halt`, then wait up to `timeout` s for the worker thread. Returns whether it ended in time; a
        worker stuck in one long step is a daemon thread, so the process exits all the same."""
        self.halt()
        if not self._thread.is_alive():
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("The generation worker did not stop within %.0f s; exiting without it.", timeout)
            return False
        return True

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stop:
                raise Stopping
            if len(self._pending) >= self.queue_size:
                self.stats["rejected"] += 1
                batches_ahead = 1 + len(self._pending) // self.max_batch
                raise QueueFull(max(1, round(self._batch_s * batches_ahead)))
            self._pending.append(job)
            self._cv.notify_all()

    def call(self, fn: Callable) -> Future:
        """Run fn() on the worker thread between batches (adding or removing an adapter)."""
        fut: Future = Future()
        with self._cv:
            if self._stop:
                fut.set_exception(Stopping())
                return fut
            self._admin.append((fn, fut))
            self._cv.notify_all()
        return fut

    # ------------------------------------------------------------------------------------------------

    def _cancel(self, job: Job, reason: str = "cancelled") -> None:
        """End a job that gets no row (gone, out of time, or dropped at stop)."""
        if not job.done:
            job.finish(reason)
            if reason == "cancelled":
                self.stats["cancelled"] += 1

    def _take(self) -> list[Job] | tuple | None:
        with self._cv:
            while not (self._pending or self._admin or self._stop):
                self._cv.wait()
            if self._stop:
                return None
            if self._admin:
                return self._admin.popleft()
            first = self._pending[0]
        if self.batch_wait_s and len(self._pending) < self.max_batch and not first.alone:
            time.sleep(self.batch_wait_s)  # let requests arriving together share the batch
        with self._cv:
            if self._stop:
                return None
            size = 1 if first.alone else self.max_batch
            batch = [j for j in self._pending if j.key == first.key][:size]
            for j in batch:
                self._pending.remove(j)
            self._running = batch
            self.active = len(batch)
        return batch

    def _work(self) -> None:
        while True:
            got = self._take()
            if got is None:
                return
            if isinstance(got, tuple):
                fn, fut = got
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the request that asked
                    fut.set_exception(e)
                continue
            t0 = time.monotonic()
            try:
                self._generate(got)
            except Exception as e:  # a failed batch fails its requests, never the server
                log.exception("Generation failed")
                for job in got:
                    if not job.done:
                        job.finish_reason = "error"
                        job.emit("error", f"{type(e).__name__}: {e}")
            finally:
                with self._cv:
                    self._running = []
                    self.active = 0
                self._batch_s = 0.8 * self._batch_s + 0.2 * (time.monotonic() - t0)

    def _generate(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        live = [j for j in jobs if not j.cancelled.is_set() and now < j.deadline]
        for j in jobs:
            if j not in live:  # gone or out of time while queued: not worth a row
                self._cancel(j, "cancelled" if j.cancelled.is_set() else "timeout")
        if not live:
            return
        first = live[0]
        entry = first.entry
        if self.pool.entries.get(entry.name) is not entry:  # removed (DELETE /v1/adapters) while queued
            for j in live:
                j.finish_reason = "error"
                j.emit("error", f"The model '{entry.name}' was removed while this request waited.")
            return
        tok = entry.loaded.tokenizer
        with self.pool.activate(entry) as model, _seeded(first.seed if first.alone else None, model):
            gen = generation_config(model, tok, max(j.max_tokens for j in live), first.do_sample,
                                    first.temperature, first.top_p)
            stops = set(stop_token_ids(model, tok))
            if first.ignore_eos:  # vLLM's extension: fixed-length answers (load tests); stop tokens are masked
                gen.min_new_tokens = gen.max_new_tokens
            rows = _Rows(live, tok, stops)
            generate(model, tok, [j.prompt for j in live], gen, streamer=rows,
                     stopping_criteria=StoppingCriteriaList([_RowStop(rows)]))
        for j in live:
            rows.finish(j, "length")  # rows still open ran to the batch's max_new_tokens (= their own max_tokens)
        self.stats["batches"] += 1
        self.stats["rows"] += len(live)
        self.stats["requests"] += len(live)
        self.stats["tokens"] += rows.tokens
        self.stats["cancelled"] += sum(j.finish_reason == "cancelled" for j in live)


@contextlib.contextmanager
def _seeded(seed: int | None, model):
    """torch's random generators seeded for one batch, and restored after it (other batches draw on)."""
    if seed is None:
        yield
        return
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
