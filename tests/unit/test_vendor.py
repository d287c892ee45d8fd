"""The vendored llama.cpp converter (src/llama_lora/_vendor/llama_cpp) is exactly the files its
MANIFEST.json lists, each with the recorded sha256, and pyproject's package-data installs all of them.

With LLAMA_LORA_VENDOR_SDIST set to llama-cpp-python's sdist (the tarball `pip download --no-deps
--no-binary :all: llama-cpp-python==<version>` saves), the manifest is also checked against that sdist:
the tarball's own sha256, and every listed file against the file it came from."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tomllib
from pathlib import Path

import pytest

import llama_lora

PACKAGE = Path(llama_lora.__file__).resolve().parent
VENDOR = PACKAGE / "_vendor" / "llama_cpp"
MANIFEST = json.loads((VENDOR / "MANIFEST.json").read_text("utf-8"))
PYPROJECT = PACKAGE.parents[1] / "pyproject.toml"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _vendored_files() -> dict[str, str]:
    """Every file under the vendor folder but llama-lora's own (manifest, README) and Python's bytecode
    caches (the converter runs from this folder, so a child process may write them): path -> sha256."""
    return {p.relative_to(VENDOR).as_posix(): _sha256(p.read_bytes()) for p in VENDOR.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
            and p.relative_to(VENDOR).as_posix() not in MANIFEST["local"]}


def _upstream_path(path: str) -> str:
    """Where the vendored `path` lies in the sdist: the longest matching prefix of upstream.paths."""
    prefix = max((k for k in MANIFEST["upstream"]["paths"] if path.startswith(k)), key=len)
    return MANIFEST["upstream"]["paths"][prefix] + path[len(prefix):]


def test_every_vendored_file_matches_the_manifest():
    listed, found = MANIFEST["files"], _vendored_files()
    problems = [f"{p}: sha256 differs from MANIFEST.json (edited?)" for p in sorted(listed.keys() & found.keys())
                if listed[p] != found[p]]
    problems += [f"{p}: listed in MANIFEST.json but missing" for p in sorted(listed.keys() - found.keys())]
    problems += [f"{p}: not in MANIFEST.json (extra file)" for p in sorted(found.keys() - listed.keys())]
    assert not problems, "vendored llama.cpp converter differs from its manifest:\n" + "\n".join(problems)
    assert MANIFEST["upstream"]["version"] in MANIFEST["upstream"]["sdist"]


def test_manifest_names_the_pinned_llamacpp_extra_and_the_readme_its_version():
    up = MANIFEST["upstream"]
    readme = (VENDOR / "README.md").read_text("utf-8")
    assert up["version"] in readme and up["llama_cpp_commit"] in readme
    if PYPROJECT.is_file():
        extras = tomllib.loads(PYPROJECT.read_text("utf-8"))["project"]["optional-dependencies"]
        assert f"{up['distribution']}=={up['version']}" in extras["llamacpp"]


@pytest.mark.skipif(not PYPROJECT.is_file(), reason="an installed copy: no pyproject.toml beside it")
def test_package_data_installs_every_vendored_file():
    patterns = tomllib.loads(PYPROJECT.read_text("utf-8"))["tool"]["setuptools"]["package-data"]["llama_lora"]
    covered = {p.relative_to(PACKAGE).as_posix() for pattern in patterns for p in PACKAGE.glob(pattern)}
    needed = {f"_vendor/llama_cpp/{p}" for p in [*MANIFEST["files"], *MANIFEST["local"]]}
    assert not needed - covered, sorted(needed - covered)


@pytest.mark.skipif(not os.environ.get("LLAMA_LORA_VENDOR_SDIST"), reason="LLAMA_LORA_VENDOR_SDIST not set")
def test_manifest_matches_the_upstream_sdist():
    sdist = Path(os.environ["LLAMA_LORA_VENDOR_SDIST"])
    assert sdist.name == MANIFEST["upstream"]["sdist"]
    assert _sha256(sdist.read_bytes()) == MANIFEST["upstream"]["sdist_sha256"], "not the sdist PyPI serves"
    wanted = {_upstream_path(p): p for p in MANIFEST["files"]}
    found = {}
    with tarfile.open(sdist) as tar:
        for member in tar:
            if member.name in wanted:
                found[wanted[member.name]] = _sha256(tar.extractfile(member).read())
    problems = [f"{p}: not in the sdist as {_upstream_path(p)}"
                for p in sorted(MANIFEST["files"].keys() - found.keys())]
    problems += [f"{p}: differs from the sdist's {_upstream_path(p)}" for p, h in sorted(found.items())
                 if h != MANIFEST["files"][p]]
    assert not problems, "\n".join(problems)
