"""The run-folder contract: what is written where, atomically, and how it is read back.

outputs/<run>/
  config.yaml      resolved, validated config (everything infer/merge/eval need)
  run.json         status (running|interrupted|failed|finished), resolved base model path, times
  prompt.json      prompt format used in training (chat template or Alpaca), reused by inference
  adapter/         standard PEFT adapter (adapter_config.json + adapter_model.safetensors)
  tokenizer/       tokenizer with its chat template and pad token
  metrics.json     final training metrics
  train.log        log file; tensorboard/ event files; checkpoints/step-NNNNNN/ for resume
outputs/.<run>.lock  the run's one-writer lock (RunLock): held by train, merge, eval, baseline
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llama_lora.errors import LlamaLoraError

try:
    import fcntl
except ImportError:  # Windows: no flock, no run lock
    fcntl = None

FINISHED = "finished"
STATUSES = ("running", "interrupted", "failed", FINISHED)
# The entries train writes at a run folder's top level: the only names whose stale temporaries it cleans.
RUN_ENTRIES = ("config.yaml", "run.json", "prompt.json", "adapter", "tokenizer", "metrics.json", "merged",
               "eval.json", "baseline.json")


@dataclass(frozen=True)
class RunDir:
    path: Path

    config = property(lambda self: self.path / "config.yaml")
    status_file = property(lambda self: self.path / "run.json")
    prompt = property(lambda self: self.path / "prompt.json")
    adapter = property(lambda self: self.path / "adapter")
    tokenizer = property(lambda self: self.path / "tokenizer")
    metrics = property(lambda self: self.path / "metrics.json")
    log = property(lambda self: self.path / "train.log")
    tensorboard = property(lambda self: self.path / "tensorboard")
    checkpoints = property(lambda self: self.path / "checkpoints")
    merged = property(lambda self: self.path / "merged")

    def status(self) -> dict[str, Any]:
        return read_json(self.status_file) if self.status_file.is_file() else {}

    def is_owned(self) -> bool:
        """Whether llama-lora wrote this folder: it holds a run.json of ours (a dict with a known status).
        Only such a folder is ever written into, cleaned or replaced by train (the ownership rule)."""
        try:
            data = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("status") in STATUSES

    def check_trainable_here(self) -> None:
        """Refuse, before anything is written, a place train must not use: a file or link, a non-empty
        folder llama-lora did not write, or a folder inside another run (whose own files it would mix with)."""
        p = self.path
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise LlamaLoraError(
                f"{p} exists and is {'a link' if p.is_symlink() else 'a file'}, not a llama-lora run folder: train "
                "will not write there. Choose another run_name=... or output_dir=... . Nothing was changed.")
        if p.is_dir() and not self.is_owned() and any(p.iterdir()):
            raise LlamaLoraError(
                f"{p} is a folder that llama-lora did not write (it has no run.json of a llama-lora run), so train "
                "will not write into it, clean it or replace it. Choose another run_name=... or output_dir=..., or "
                "move that folder away. Nothing was changed.")
        parent = next((q for q in p.parents if RunDir(q).is_owned()), None)
        if parent is not None:
            where = "is the llama-lora run folder" if parent == p.parent else f"is inside the llama-lora run {parent}"
            raise LlamaLoraError(
                f"output_dir {p.parent} {where}: a new run there would mix its files with that run's. Choose an "
                "output_dir outside it (e.g. output_dir=outputs). Nothing was changed.")

    def is_finished(self) -> bool:
        return self.status().get("status") == FINISHED and (self.adapter / "adapter_config.json").is_file()

    def set_status(self, status: str, **extra: Any) -> None:
        data = self.status() | extra | {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(self.status_file, data)

    def prepare_for_training(self, overwrite: bool, resume: str) -> list[str]:
        """Refuse a finished run (unless overwrite), clear one being replaced, make sure the folder is
        writable, and undo what a killed save left (`clean_stale`); returns what was cleaned up."""
        self.check_trainable_here()
        if self.path.exists() and self.is_owned():
            if self.is_finished() and not overwrite:
                raise LlamaLoraError(
                    f"Run directory {self.path} holds a finished run. Choose another run_name=..., "
                    "or pass overwrite=true to replace it."
                )
            if overwrite or resume == "never":
                if not overwrite and self.checkpoint_dirs():
                    raise LlamaLoraError(
                        f"Run directory {self.path} holds an unfinished run with checkpoints and "
                        "training.resume=never. Use training.resume=auto to continue it, or overwrite=true."
                    )
                shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            check_writable(self.path)
        except OSError as e:
            raise LlamaLoraError(
                f"Cannot write to the output directory {self.path} ({e.strerror}). "
                "Choose a writable output_dir=... ."
            ) from e
        if not self.is_owned():
            self.set_status("running")  # from here on the folder is llama-lora's (is_owned)
        return clean_stale(self.path, RUN_ENTRIES) + clean_stale(self.checkpoints)

    @property
    def lock_file(self) -> Path:
        # Beside the run folder, not in it: `prepare_for_training(overwrite=True)` rmtree's the folder
        # while the lock is held, and a lock file inside would go with it (a second process could then
        # create and lock a new one). Outside, the folder keeps exactly the files the contract lists.
        return self.path.parent / f".{self.path.name}.lock"

    def lock(self, purpose: str) -> "RunLock":
        """Take the run's one-writer lock for `purpose` ('train', 'merge', 'eval', 'baseline'), or raise
        LlamaLoraError naming the process that holds it. Use as a context manager, or keep the returned
        RunLock and call release(); the OS drops it when the process dies (even on kill -9)."""
        return RunLock(self, purpose)

    def read_lock(self, purpose: str) -> "RunLock":
        """A shared lock for reading the run's files ('serve', 'export'): it waits for no other reader and
        is refused while a writer holds the run (so a half-written run is never read). On a file system
        that cannot hold the lock file (a read-only mount) the run is read without one: nothing can write
        there either. Nothing is written into the run."""
        return RunLock(self, purpose, shared=True)

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (a complete one has its state file, written last)."""
        if not self.checkpoints.is_dir():
            return []
        done = [p for p in self.checkpoints.glob("step-*") if (p / "trainer_state.json").is_file()]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))


class RunLock:
    """One writer per run directory: an exclusive, non-blocking flock on `RunDir.lock_file`.

    flock (not a pid file): the kernel releases it when the holder's last descriptor closes, so a
    crashed or kill -9'd process never leaves a stale lock, and locks belong to the open file
    description, so a second lock in the same process conflicts too (experiment runs trainings one
    after another in one process: each releases before the next). The file is never deleted (deleting
    would race with a process that has just opened it); it holds the holder's pid, purpose and start
    time, only for the message. Where flock does not exist (Windows) this is a no-op.
    """

    def __init__(self, run_dir: RunDir, purpose: str, shared: bool = False):
        self.path, self.purpose, self._fd = run_dir.lock_file, purpose, None
        if fcntl is None:
            return
        if shared:
            fd = self._open_shared(run_dir)
            if fd is None:
                return  # a read-only place: nothing can write the run while it is read
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise LlamaLoraError(
                    f"Cannot write to the output directory {self.path.parent} ({e.strerror}): the run lock "
                    f"{self.path.name} cannot be created there. {_unwritable_advice(run_dir, purpose)}"
                ) from e
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            how = ("Wait for it to finish, stop it, or choose another run_name=..." if purpose == "train"
                   else f"Wait for it to finish or stop it, then run `{purpose}` again.")
            raise LlamaLoraError(
                f"Run directory {run_dir.path} is in use by another llama-lora process (pid "
                f"{holder.get('pid', '?')}, `{holder.get('purpose', '?')}`, since {holder.get('since', '?')}). {how}"
            ) from None
        if shared:
            self._fd = fd  # readers leave the holder line to the writers
            return
        if purpose != "train" and run_dir.path.is_dir():  # eval, baseline, merge write into the run itself
            try:
                check_writable(run_dir.path)
            except OSError as e:
                os.close(fd)
                raise LlamaLoraError(f"Cannot write into the run folder {run_dir.path} ({e.strerror}). "
                                     f"{_unwritable_advice(run_dir, purpose)}") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "purpose": purpose, "since": time.strftime("%H:%M:%S"),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode() + b"\n", 0)
        self._fd = fd

    def _open_shared(self, run_dir: RunDir) -> int | None:
        """The lock file opened for a shared lock, or None where it cannot exist (read-only file system)."""
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                with contextlib.suppress(OSError):
                    return os.open(self.path, os.O_RDONLY)  # made earlier by a writer: lock it all the same
                return None
            raise LlamaLoraError(
                f"Cannot open the run lock {self.path} of {run_dir.path} ({e.strerror}), so the run cannot be "
                f"read safely for `{self.purpose}`. Check the folder {self.path.parent}, then run again."
            ) from e

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no holder to name any more (a reader's descriptor cannot: no harm)
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _unwritable_advice(run_dir: RunDir, purpose: str) -> str:
    if purpose == "train":
        return "Choose a writable output_dir=... ."
    # eval, baseline and merge write into a finished run: the run has to move, not the config
    return (f"`llama-lora {purpose}` writes its results into the run folder (and its lock beside it), so it "
            f"stopped before any work. Copy the run somewhere writable (cp -r {run_dir.path} <dir>/) and run "
            f"`llama-lora {purpose} <dir>/{run_dir.path.name}`.")


def _lock_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}  # the holder took the lock a moment ago and has not written its line yet


def check_writable(folder: Path) -> None:
    """Create and remove a probe file in `folder`: raises the OSError a real write would (read-only, full)."""
    probe = Path(folder) / f".write-check-{os.getpid()}"
    probe.touch()
    probe.unlink()


def write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LlamaLoraError(f"Could not read {path}: {e}. The file is missing or corrupted.") from e


# The caches of the libraries llama-lora loads through; a variable pointing at a file makes them fail
# deep inside with an error that blames whatever was being read (the data file, the model).
CACHE_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME",
             "LLAMA_LORA_CACHE")


def check_cache_env() -> None:
    """Each cache variable that is set names a folder, or a path that can become one."""
    for var in CACHE_ENV:
        value = os.environ.get(var)
        if not value:
            continue
        path = Path(value).expanduser()
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise LlamaLoraError(
                f"{var}={value} cannot be a cache folder: {blocker} is a file. Point {var} at a folder "
                f"(or unset it: `unset {var}`), then run again."
            )


def check_replaceable(path: Path, marker: str | None = None) -> None:
    """`path` may be replaced by a new version: it does not exist, or it is a folder llama-lora wrote
    (with `marker`, the file written last, in it). Anything else is the user's: never touched."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink() and (marker is None or (path / marker).is_file()):
        return
    what = "a file" if path.is_file() else "a link" if path.is_symlink() else f"a folder without {marker}"
    raise LlamaLoraError(
        f"{path} exists and is {what}: llama-lora did not write it, so it will not replace it. Move or rename "
        "it, then run again. Nothing was changed."
    )


def _os_advice(e: OSError) -> str:
    """What to do about a failed write, by its cause (a read-only file system is not a full disk)."""
    return {
        errno.ENOSPC: "Free disk space, or write elsewhere, then run again.",
        errno.EDQUOT: "The disk quota is exceeded: free space, or write elsewhere, then run again.",
        errno.EROFS: "The file system is read-only: copy the run (or set output_dir) to a writable place.",
        errno.EACCES: "Permission denied: fix the folder's permissions, or write elsewhere.",
        errno.EPERM: "Permission denied: fix the folder's permissions, or write elsewhere.",
    }.get(e.errno, "Check the folder (disk space, permissions), then run again.")


@contextmanager
def atomic_dir(path: Path, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in (almost) one rename.

    Only a folder llama-lora wrote is replaced (`check_replaceable`: a folder, holding `marker` when one is
    named). A kill before the rename leaves only a `.<name>.tmp-<pid>` folder that nothing reads as
    complete (and `clean_stale` removes); a kill between the two renames leaves the previous version as
    `.<name>.old-<pid>`, which `clean_stale` puts back.
    """
    check_replaceable(path, marker)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove_own_tmp(tmp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / TMP_MARKER).touch()  # what clean_stale recognises as ours, beside the exact name
        yield tmp
        _fsync_tree(tmp)  # the data is on disk before the rename makes it visible
        if delay := float(os.environ.get(SAVE_DELAY_ENV) or 0):
            time.sleep(delay)  # tests: a window in which a kill lands mid-save, reproducibly
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        (path / TMP_MARKER).unlink()  # a kill just before this leaves a hidden marker that nothing reads
    except BaseException as e:
        _remove_own_tmp(tmp)
        if isinstance(e, OSError):
            raise LlamaLoraError(
                f"Could not write {path} ({e.strerror or e}). Nothing was replaced: any earlier version is "
                f"intact. {_os_advice(e)}"
            ) from e
        raise
    shutil.rmtree(old, ignore_errors=True)


# Testing knob: seconds atomic_dir waits between writing everything and the rename.
SAVE_DELAY_ENV = "LLAMA_LORA_TEST_SAVE_DELAY"
# The file inside every temporary folder atomic_dir makes, until just before its rename.
TMP_MARKER = ".llama-lora-partial"


def _remove_own_tmp(tmp: Path) -> None:
    """Remove `tmp` (an atomic_dir temporary of this exact name) if llama-lora made it: a folder holding
    TMP_MARKER. A folder of that name without it is left alone (it is not ours)."""
    if tmp.is_dir() and not tmp.is_symlink() and (tmp / TMP_MARKER).is_file():
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync there
        return
    for p in [*sorted(root.rglob("*"), reverse=True), root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clean_stale(folder: Path, names: tuple[str, ...] | None = None) -> list[str]:
    """Undo what a killed atomic_dir/write_text left in `folder` for the entries `names` (None: every
    entry, for a folder that is wholly llama-lora's, such as a run's checkpoints/); return what was done.

    Only the exact names llama-lora would have made are looked at: `.X.tmp-PID` (half-written, never
    renamed) is deleted, a folder only when it holds TMP_MARKER; `.X.old-PID` (the previous version, set
    aside just before a rename that never happened) is put back as X if X is missing, else removed.
    Entries of a process that is still alive are left alone: it may be writing them right now.
    """
    done = []
    if not folder.is_dir() or folder.is_symlink():
        return done
    for p in sorted(folder.glob(".*")):
        name, sep, pid = p.name.rpartition(".tmp-") if ".tmp-" in p.name else p.name.rpartition(".old-")
        if not sep or not pid.isdigit() or not name.startswith(".") or _other_process_alive(int(pid)):
            continue
        if names is not None and name[1:] not in names:
            continue
        target = folder / name[1:]
        if p.is_symlink():
            continue
        if ".old-" in p.name:
            if not target.exists():
                os.replace(p, target)
                done.append(f"restored {target.name} from {p.name}")
            else:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                done.append(f"removed {p.name}")
        elif p.is_dir():
            if (p / TMP_MARKER).is_file():
                shutil.rmtree(p)
                done.append(f"removed {p.name}")
        else:
            p.unlink()
            done.append(f"removed {p.name}")
    return done


def _other_process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier failed save in this process) are stale
    return process_alive(pid)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    if not isinstance(pid, int) or pid <= 0:
        return False  # 0 and negatives name process groups, not a process
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def check_free_space(path: Path, need_bytes: int) -> None:
    """Enough room for a save of `need_bytes` under `path`, and a place that can be written at all."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    try:  # a read-only file system has free space too: try the write itself
        check_writable(path)
    except OSError as e:
        raise LlamaLoraError(f"Cannot write under {path} ({e.strerror}). {_os_advice(e)}") from e
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise LlamaLoraError(
            f"Not enough free disk space under {path}: {free / 2**20:.0f} MiB free, about "
            f"{need_bytes / 2**20:.0f} MiB needed for this save. Free some space or change output_dir."
        )


def latest_finished_run(output_dir: str | Path) -> RunDir:
    root = Path(output_dir)
    runs = [RunDir(p) for p in root.glob("*/") if RunDir(p).is_finished()] if root.is_dir() else []
    if not runs:
        raise LlamaLoraError(
            f"No finished run under '{root}'. Train one first (`llama-lora train experiment=quickstart`) "
            "or pass infer.run_dir=<run directory>."
        )
    return max(runs, key=lambda r: r.status_file.stat().st_mtime)


# What a cache must be keyed by: the files it was computed from, not their path. Weights can be GBs, so a
# file counts by name, size, mtime_ns and a hash of three samples of its bytes (start, middle, end):
# save_pretrained over the same path changes the mtime (and, for new weights, the sampled bytes).
_SAMPLE = 64 * 1024


def fingerprint(path: str | Path) -> str:
    """A short digest of the files under `path` (a file or a directory), cheap even for large weights."""
    import hashlib

    root = Path(path).expanduser()
    files = ([root] if not root.is_dir() else  # hidden files (.cache/, locks) are not content
             sorted(p for p in root.rglob("*") if p.is_file() and not any(
                 part.startswith(".") for part in p.relative_to(root).parts)))
    h = hashlib.sha256()
    for f in files[:10_000]:
        st = f.stat()  # follows symlinks: a hub snapshot's files point at content-named blobs
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, st.st_size // 2 - _SAMPLE // 2), max(0, st.st_size - _SAMPLE)}):
                fh.seek(offset)
                h.update(fh.read(_SAMPLE))
    return f"{len(files)} files, sha256:{h.hexdigest()[:16]}"
