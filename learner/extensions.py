"""DeepSpeed's native extensions, built before a learner rank needs them, so that a start-up cannot hang.

On CPU, DeepSpeed JIT-compiles its shared-memory comm op (`deepspeed_shm_comm`) the first time a rank
starts: about a minute on 2 cores. torch guards such a build with a bare lock file
(torch.utils.file_baton) that records no owner, and waits for it to vanish: a build killed half-way (a
Ctrl-C during a first run) leaves it behind, and every later start then waits forever, printing nothing.
Here every build runs under an flock of vireo's own, which the kernel releases when its holder dies; so
whoever holds the flock and still finds torch's lock file knows it is stale, says so and removes it.
`make install` / `make install-test` run this module, so a run normally finds the extension built.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

BUILD_LOCK = "vireo-build.lock"  # the flock every build of this environment's extensions holds
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's file baton, in the extension's build folder
NATIVE_OPS = ("ShareMemCommBuilder",)  # the ops deepspeed.init_distributed loads on CPU
LOCK_POLL_S = 1.0


class ExtensionLockTimeout(RuntimeError):
    """Another live process held the build lock past the deadline."""


def extensions_dir() -> Path:
    """One cache per environment: checkouts with other paths do not rebuild (and lock) a shared
    ~/.cache copy in turn."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def native_ops() -> list:
    """DeepSpeed's builders of the native ops this machine's ranks load (none on GPUs: NCCL)."""
    import torch

    if torch.cuda.is_available():
        return []
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builders = [get_accelerator().create_op_builder(op) for op in NATIVE_OPS]
    return [b for b in builders if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False)]


def unbuilt() -> list[str]:
    """The native ops not yet built in this environment (a learner rank will build them first)."""
    return [b.name for b in native_ops() if not _library(b).exists()]


def _library(builder) -> Path:
    return extensions_dir() / builder.name / f"{builder.name}.so"


def build_native_extensions(log: Callable[[str], None] = print, timeout_s: float = 600.0) -> list[str]:
    """Build (or load, when up to date) the native ops DeepSpeed needs here; returns their names. Waits
    at most timeout_s for a build another live process is running, then raises naming the lock file."""
    root = extensions_dir()
    root.mkdir(parents=True, exist_ok=True)
    built = []
    with open(root / BUILD_LOCK, "a") as lock:
        _hold(lock, root / BUILD_LOCK, timeout_s)
        for builder in native_ops():
            folder = root / builder.name
            stale = folder / TORCH_LOCK
            if stale.exists():
                log(f"[start-up] removing {stale}: left by a build of {builder.name} that was interrupted "
                    "(no process is building it)")
                stale.unlink()
            if not _library(builder).exists():
                log(f"[start-up] building DeepSpeed's {builder.name} extension in {folder} (once per "
                    "environment; about a minute on 2 cores)")
            builder.load(verbose=False)
            built.append(builder.name)
    return built


def _hold(lock, path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ExtensionLockTimeout(
                    f"another process has been building DeepSpeed's extensions for over {timeout_s:g} s, "
                    f"holding {path}; stop it or delete the file") from None
            time.sleep(LOCK_POLL_S)


if __name__ == "__main__":
    names = build_native_extensions()
    print(f"native extensions ready in {extensions_dir()}: {', '.join(names) or 'none needed'}")
