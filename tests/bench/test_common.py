import json
import lzma

import pytest

from specc.bench.common import read_report


def test_a_report_reads_the_same_plain_or_xz_compressed(tmp_path):
    report = {"configurations": [{"tree": "chain:6", "accept_lengths": [1, 3, 2]}], "prompts": ["a"]}
    (tmp_path / "spec.json").write_text(json.dumps(report))
    (tmp_path / "spec.json.xz").write_bytes(lzma.compress(json.dumps(report).encode()))
    assert read_report(tmp_path / "spec.json") == report
    assert read_report(tmp_path / "spec.json.xz") == report


def test_a_missing_report_names_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no report at .*nothing.json"):
        read_report(tmp_path / "nothing.json")

