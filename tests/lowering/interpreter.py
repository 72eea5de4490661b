"""Running kernel tests under Triton's interpreter on the CPU: the `@interpreted` decorator.

Triton chooses between interpreting and compiling when a function is decorated, and decorates
its own library functions (tl.max, tl.sum, ...) when it is first imported, which torch._dynamo
does long before a test module runs. So `TRITON_INTERPRET=1` only works if set before the
process's first `import triton`. An `@interpreted` test runs here when this process interprets;
otherwise the first such test of a module runs all of the module's `@interpreted` tests once in
a fresh interpreting process (generated kernels go to a scratch `$SPECC_CACHE`), and each test
reports its own outcome from there: passed, failed with the subprocess's message, or skipped.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

REPO_ROOT = Path(__file__).resolve().parents[2]

_INTERPRETED: dict[str, list[str]] = {}  # module file -> names of its @interpreted tests
_MODULE_RESULTS: dict[str, dict[str, tuple[str, str]]] = {}  # module file -> test name -> (outcome, detail)


def this_process_interprets() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.max, InterpretedFunction)


def _smoke(x_ptr, out_ptr, N: tl.constexpr):
    # Decorated only when the interpreter is checked (decorating reads TRITON_INTERPRET).
    tl.store(out_ptr, tl.sum(tl.load(x_ptr + tl.arange(0, N)), 0))


@functools.cache
def _interpreter_unusable() -> str | None:
    """Why the interpreter cannot run a trivial kernel here (None when it can)."""
    try:
        x = torch.arange(16, dtype=torch.float32)
        out = torch.zeros(1)
        triton.jit(_smoke)[(1,)](x, out, N=16)
        if out.item() != 120.0:
            return f"the Triton interpreter computed sum(0..15) = {out.item()}, not 120"
    except Exception as error:  # noqa: BLE001  (any failure means: cannot test kernels here)
        return f"the Triton {triton.__version__} interpreter does not run here ({error!r}); it needs numpy < 2.4"
    return None


def _run_module_in_interpreter(module_file: str) -> dict[str, tuple[str, str]]:
    """Run the @interpreted tests of `module_file` in a fresh process with TRITON_INTERPRET=1."""
    if module_file in _MODULE_RESULTS:
        return _MODULE_RESULTS[module_file]
    node_ids = [f"{module_file}::{name}" for name in _INTERPRETED[module_file]]
    with tempfile.TemporaryDirectory() as scratch:
        report = os.path.join(scratch, "report.xml")
        env = {
            **os.environ,
            "TRITON_INTERPRET": "1",
            "SPECC_CACHE": scratch,  # generated kernels of the run stay in the scratch folder
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", *node_ids, "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200,
        )
        results: dict[str, tuple[str, str]] = {}
        if os.path.exists(report):
            for case in ElementTree.parse(report).iter("testcase"):
                failure = case.find("failure")
                if failure is None:
                    failure = case.find("error")
                skipped = case.find("skipped")
                if failure is not None:
                    results[case.get("name")] = ("failed", (failure.get("message") or "") + "\n" + (failure.text or ""))
                elif skipped is not None:
                    results[case.get("name")] = ("skipped", skipped.get("message") or "")
                else:
                    results[case.get("name")] = ("passed", "")
        results["<output>"] = ("", (proc.stdout + proc.stderr)[-6000:])
    _MODULE_RESULTS[module_file] = results
    return results


def interpreted(test):
    """Run `test` under Triton's interpreter (here, or via a fresh process; see the docstring).

    Goes outermost, above hypothesis's decorators; the test takes no pytest parameters (the
    fresh process reports outcomes by test name).
    """
    module_file = sys.modules[test.__module__].__file__
    _INTERPRETED.setdefault(module_file, []).append(test.__name__)

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if this_process_interprets():
            reason = _interpreter_unusable()
            if reason:
                pytest.skip(reason)
            return test(*args, **kwargs)
        results = _run_module_in_interpreter(module_file)
        outcome, detail = results.get(test.__name__, ("missing", ""))
        if outcome == "skipped":
            pytest.skip(detail)
        assert outcome == "passed", (
            f"{test.__name__} {outcome} in the interpreting process:\n{detail}\n{results['<output>'][1]}"
        )

    return wrapper
