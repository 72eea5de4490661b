"""specc/bench/accept_compare.py: accept lengths of two spec reports on the text both decoded."""

from __future__ import annotations

import json
import lzma

import pytest

from specc.bench.accept_compare import compare, load_report, steps_within
from specc.cli import main


def _report(plain: dict[int, list[int]], spec: dict[int, tuple[list[int] | None, list[int]]],
            trees: tuple[str, ...] = ("tuned:64,6",)) -> dict:
    """A `bench spec` report's shape: spec rows whose output equals plain carry no tokens."""
    def spec_config(tree):
        rows = []
        for index, (tokens, accepts) in spec.items():
            row = {"index": index, "accept_lengths": accepts}
            if tokens is not None:
                row["tokens"] = tokens
            rows.append(row)
        steps = [a for _, accepts in spec.values() for a in accepts]
        return {"decoder": "spec", "tree": tree, "batch": 1, "mean_accept_length": sum(steps) / len(steps),
                "per_prompt": rows}

    return {"configurations": [
        {"decoder": "plain", "tree": None, "batch": 1, "mean_accept_length": 1.0,
         "per_prompt": [{"index": i, "tokens": t, "accept_lengths": [1] * len(t)} for i, t in plain.items()]},
        *(spec_config(tree) for tree in trees)]}


def test_steps_within_keeps_the_steps_that_end_inside_the_text():
    assert steps_within([3, 2, 4], 5) == [3, 2]
    assert steps_within([3, 2, 4], 4) == [3]
    assert steps_within([3, 2, 4], 100) == [3, 2, 4]
    assert steps_within([3], 2) == []


def test_runs_that_part_are_compared_on_the_tokens_before_the_first_difference():
    text = list(range(10, 22))  # 12 tokens
    other = text[:7] + [99, 98, 97, 96, 95]  # parts at token 7
    # A: output equal to its plain (tokens stored once, under plain); B: its own text
    a = _report({0: text, 1: text}, {0: (None, [3, 4, 5]), 1: (None, [2, 2, 8])})
    b = _report({0: other, 1: text}, {0: (other, [3, 2, 2, 5]), 1: (None, [2, 2, 8])})
    result = compare(a, b, "tuned:64,6", "tuned:64,6")
    assert result["prompts"] == 2 and result["plain_outputs_differing"] == 1
    assert result["shared_tokens"] == 7 + 12
    # prompt 0: A's steps 3, 4 end at 3 and 7; B's 3, 2, 2 at 3, 5, 7; prompt 1: all of both
    assert result["a"]["steps"] == 2 + 3 and result["b"]["steps"] == 3 + 3
    assert result["a"]["accept_on_shared_text"] == pytest.approx((3 + 4 + 12) / 5)
    assert result["b"]["accept_on_shared_text"] == pytest.approx((3 + 2 + 2 + 12) / 6)
    assert result["prompts_with_differing_accepts_on_shared_text"] == [0]


def test_equal_runs_accept_alike_on_all_their_text():
    text = list(range(40))
    a = _report({0: text}, {0: (None, [4] * 10)})
    result = compare(a, a)
    assert result["shared_tokens"] == 40 and result["prompts_with_differing_accepts_on_shared_text"] == []
    assert result["a"]["accept_on_shared_text"] == result["b"]["accept_on_shared_text"] == 4.0


def test_a_report_with_several_trees_needs_one_named():
    report = _report({0: [1, 2]}, {0: (None, [2])}, trees=("chain:2", "tuned:64,6"))
    with pytest.raises(ValueError, match="2 configurations for decoder='spec' tree=None"):
        compare(report, report)
    assert compare(report, report, "chain:2", "tuned:64,6")["shared_tokens"] == 2


def test_the_command_reads_xz_reports_and_writes_the_comparison(tmp_path, capsys):
    text = list(range(9))
    (tmp_path / "a.json").write_text(json.dumps(_report({0: text}, {0: (None, [3, 3, 3])})))
    with lzma.open(tmp_path / "b.json.xz", "wt") as handle:
        json.dump(_report({0: text}, {0: (None, [1, 4, 4])}), handle)
    assert load_report(tmp_path / "b.json.xz")["configurations"][1]["per_prompt"][0]["accept_lengths"] == [1, 4, 4]
    assert main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json.xz"),
                 "--out", str(tmp_path / "cmp.json")]) == 0
    assert "shared text 9 tokens" in capsys.readouterr().out
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["a"]["accept_on_shared_text"] == 3.0 and saved["b"]["accept_on_shared_text"] == 3.0
    assert saved["prompts_with_differing_accepts_on_shared_text"] == [0]


def test_a_missing_report_says_what_to_give():
    with pytest.raises(FileNotFoundError, match="--out file of a `specc bench spec` run"):
        load_report("/nonexistent/spec.json")


def test_the_command_names_the_trees_to_choose_from_without_a_traceback(tmp_path):
    report = _report({0: [1, 2]}, {0: (None, [2])}, trees=("chain:2", "tuned:64,6"))
    (tmp_path / "a.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="name one with --tree") as exit_info:
        main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")])
    assert "spec:chain:2:b1, spec:tuned:64,6:b1" in str(exit_info.value)
