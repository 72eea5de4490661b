"""Generating the Triton kernels of specc.lowering.

A kernel is a module-level template (`<op>_triton.py`) rendered with its static parameters as
`tl.constexpr` constants (`render`). `load_kernel_module` writes the rendered source to
`<kernel cache>/<name>_<hash>.py` (`$SPECC_CACHE/kernels`, default `~/.cache/specc/kernels`;
`@triton.jit` needs real source files to read), atomically so that concurrent processes never
import a half-written file, and imports it from there, once per source and process.
`all_generated_sources` hands every source generated in this process to the pass dumps.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import string
import sys
import threading
from pathlib import Path

import torch

_SOURCES: dict[str, str] = {}  # "<name>_<hash>" -> source, in generation order
_MODULES: dict[tuple[str, bool], object] = {}  # ("<name>_<hash>", interpreted?) -> module
_LOCK = threading.Lock()


# torch dtype -> its name in triton.language, for the templates' `tl.<name>` and dot precision
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def kernel_cache_dir() -> Path:
    """Where generated kernel sources are written: `$SPECC_CACHE/kernels` or ~/.cache/specc/kernels."""
    root = os.environ.get("SPECC_CACHE") or os.path.join("~", ".cache", "specc")
    return Path(root).expanduser() / "kernels"


def render(template: str, **static_params) -> str:
    """Substitute `$name` placeholders; every placeholder must be given (no silent defaults)."""
    return string.Template(template).substitute(**static_params)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def sources_generated(name: str) -> dict[str, str]:
    """The sources of kernel `name` generated in this process so far, keyed "<name>_<hash>"."""
    with _LOCK:
        return {key: source for key, source in _SOURCES.items() if key.rsplit("_", 1)[0] == name}


def all_generated_sources() -> dict[str, str]:
    """Every kernel source generated in this process so far, keyed by its file name
    ("<name>_<hash>.py"), in generation order: what the pass dumps write."""
    with _LOCK:
        return {f"{key}.py": source for key, source in _SOURCES.items()}


def _interpreting() -> bool:
    # Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. when the generated module is
    # imported: the module memo is keyed on it too, so flipping the variable (tests) re-imports.
    import triton

    return bool(triton.knobs.runtime.interpret)


def load_kernel_module(name: str, source: str):
    """Write `source` to <cache>/<name>_<hash>.py (atomically, once) and import it, memoised."""
    key = f"{name}_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    interpreted = _interpreting()
    with _LOCK:
        module = _MODULES.get((key, interpreted))
        if module is not None:
            return module
        _SOURCES.setdefault(key, source)
        directory = kernel_cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{key}.py"
        if not path.exists() or path.read_text() != source:
            # Write then rename, so that a concurrent process never imports a half-written file.
            tmp = directory / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_text(source)
            os.replace(tmp, path)
        module_name = f"specc_kernels.{key}" + ("_interpreted" if interpreted else "")
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # inspect.getsource (used by triton.jit) looks here
        spec.loader.exec_module(module)
        _MODULES[(key, interpreted)] = module
        return module


def compile_for_gpu(kernel, signature: dict[str, str], *, num_warps: int, num_stages: int, arch: int = 90):
    """Compile a @triton.jit `kernel` for CUDA compute capability `arch` (90: H100/H200) on a
    machine without a GPU: Triton lowers it to PTX and runs its bundled ptxas for a named
    target. Returns Triton's CompiledKernel (`metadata.shared`: the shared memory a block needs).
    `signature` maps each argument name to its Triton type ("*bf16", "i32", "fp32", ...).
    The interpreter accepts code the compiler refuses, so the CPU tests compile the kernels too."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(kernel, signature, {}), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})

