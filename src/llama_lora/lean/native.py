"""The CPU kernel for a LoRA step's rank-r products (llama_lora/csrc/lowrank.c), built on first use; BLAS
otherwise.

Why hand-written: with the merged step (llama_lora.lean) what a LoRA step adds to the frozen model's is
four products per layer whose one side is only r wide (h = x A^T, gh = s g B, dB = s g^T h, dA = gh^T x).
Through MKL they run far below the rate of the step's big matmuls; the kernel runs them near that rate
and computes gh and dB in one pass over g (benchmarks/README.md, "What changed the CPU step").
The step leaves h = x A^T to BLAS, which was faster there in place (`proj` alone measured faster only on
warm operands).

The C file is compiled once per machine with the system's gcc (-O3 -march=native -fopenmp: it joins
torch's own OpenMP runtime, libgomp, and its thread count) into `<cache>/native/`, keyed by the source,
the compiler and the CPU; without gcc, or where the build fails, every call here computes the same
product with torch (BLAS) instead. fp32 CPU tensors with r a multiple of 16 (at most 64) take the
kernel; anything else takes torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parents[1] / "csrc" / "lowrank.c"  # package data of llama_lora
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable
_why = ""


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(cache_dir: Path) -> Path:
    """Path of the shared library for this machine, compiling it first if needed (atomic: a parallel
    process finds either no file or a whole one)."""
    cc = shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no gcc on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    if "Free Software Foundation" not in version:  # e.g. macOS's gcc is clang, without -fopenmp
        raise RuntimeError(f"{cc} is not GCC")
    key = hashlib.sha256("\n".join([SOURCE.read_text(), version, _cpu_signature(), " ".join(_FLAGS),
                                    torch.__version__]).encode()).hexdigest()[:16]
    out = cache_dir / "native" / f"lowrank-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *_FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"gcc failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(cache_dir: str | Path | None = None) -> ctypes.CDLL | None:
    """The kernel library, or None (and `why()` says why) where it cannot be built here."""
    global _lib, _why
    if _lib is not False:
        return _lib
    from llama_lora.embedded import default_cache_dir

    try:
        lib = ctypes.CDLL(str(build(Path(cache_dir) if cache_dir else default_cache_dir())))
        f, i64 = ctypes.c_void_p, ctypes.c_long
        lib.lowrank.argtypes = [f, i64, f, f, i64, ctypes.c_float, i64, i64, ctypes.c_int, ctypes.c_int, f, f]
        lib.lowrank.restype = ctypes.c_int
        _lib = lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _lib, _why = None, str(e)
        log.info("Rank-r CPU kernel unavailable (%s): BLAS computes the adapter products.", e)
    return _lib


def why() -> str:
    """Why `load()` found no kernel ("" while it has not failed)."""
    return _why


def forget() -> None:
    """Forget what `load()` found: the next call tries again (after a change of PATH or cache, say)."""
    global _lib, _why
    _lib, _why = False, ""


def _usable(width: int, *tensors: torch.Tensor) -> bool:
    """The kernel takes these operands (else torch does; also where autograd would need to see the op)."""
    return (
        width % 16 == 0 and 16 <= width <= 64
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and load() is not None
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (a row-major matrix, possibly with a longer row stride)."""
    return t if t.stride(1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def call_kernel(m, p, q, scale: float, width: int, proj, wgrad) -> None:
    """One call of the C kernel on prepared operands (row-major, fp32, CPU; `width` = r, a multiple of 16):
    writes scale * m @ p into `proj` and/or scale * m^T @ q into `wgrad` (either may be None)."""
    rc = _lib.lowrank(m.data_ptr(), m.stride(0), 0 if p is None else p.data_ptr(), 0 if q is None else q.data_ptr(),
                      0 if q is None else q.stride(0), scale, m.shape[0], m.shape[1], width // 16,
                      torch.get_num_threads(), 0 if proj is None else proj.data_ptr(),
                      0 if wgrad is None else wgrad.data_ptr())
    if rc != 0:
        raise MemoryError("llama_lora native kernel: allocation failed")


def proj(m: torch.Tensor, p: torch.Tensor, scale: float = 1.0, kernel: bool = True) -> torch.Tensor:
    """scale * m @ p for m (T x n) and a narrow p (n x r); `kernel=False`, or operands it does not
    take: torch."""
    if not (kernel and _usable(p.shape[1], m, p)):
        out = m @ p
        return out if scale == 1.0 else out.mul_(scale)
    m, p = _rows(m), p.contiguous()
    out = m.new_empty(m.shape[0], p.shape[1])
    call_kernel(m, p, None, scale, p.shape[1], out, None)
    return out


def wgrad(m: torch.Tensor, q: torch.Tensor, scale: float = 1.0, kernel: bool = True) -> torch.Tensor:
    """scale * m^T @ q for m (T x n) and a narrow q (T x r): an (n x r) weight gradient summed over T."""
    if not (kernel and _usable(q.shape[1], m, q)):
        # Which operand BLAS takes transposed matters for these long-K products: measured (T=750, r=16,
        # operands out of cache) faster this way round for n >= 1024, the other way round for 512.
        out = m.t() @ q if m.shape[1] >= 1024 else (q.t() @ m).t()
        return out if scale == 1.0 else out.mul_(scale)
    m, q = _rows(m), _rows(q)
    out = m.new_empty(m.shape[1], q.shape[1])
    call_kernel(m, None, q, scale, q.shape[1], None, out)
    return out


def proj_and_wgrad(m: torch.Tensor, p: torch.Tensor, q: torch.Tensor, scale: float = 1.0, kernel: bool = True):
    """(scale * m @ p, scale * m^T @ q) in one pass over m: a LoRA layer's gh = s g B and dB = s g^T h."""
    if not (kernel and q.shape[1] == p.shape[1] and _usable(p.shape[1], m, p, q)):
        return proj(m, p, scale, kernel), wgrad(m, q, scale, kernel)
    m, p, q = _rows(m), p.contiguous(), _rows(q)
    a, b = m.new_empty(m.shape[0], p.shape[1]), m.new_empty(m.shape[1], q.shape[1])
    call_kernel(m, p, q, scale, p.shape[1], a, b)
    return a, b
