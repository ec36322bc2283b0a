"""How the C allocator treats the big, short-lived tensors of long inputs and training steps.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block over 32 MB (and by default
every block over a *dynamic* threshold of 128 kB-32 MB) with a fresh ``mmap`` and unmaps it when
it is freed, so the next tensor of that size faults in every one of its 4 kB pages again: the
kernel zeroes them, and that system time grows with the size of the activations. Two remedies,
each for its own job:

* :func:`reuse_freed_memory` (inference: :class:`~modules.serving.inference.Separator` with
  ``reuse_freed_memory: True``; training: around every recipe's run unless
  ``train_reuse_freed_memory: False`` or ``compact_memory``):
  while it is active glibc serves every block from its heap and keeps freed memory there for the
  next tensor. MossFormer2 on 60 s of audio, one thread: 366 s of which 132 s in the kernel
  without it, 259 s (8 s in the kernel) with it; time per second of audio then stays at 4.3 s
  from 4 to 60 s (``bench/mossformer2.py --allocator reuse``). On leaving it the settings are
  restored and the free memory is given back (``malloc_trim``).
* :func:`compact_memory_env` (training, ``compact_memory: True`` in a yaml; the recipe restarts
  itself under it): a training step frees and allocates activations of many sizes, and glibc's
  heap grows to several times the live memory (MossFormer2, 2 s, one thread: 6.0 GB peak RSS for
  1.8 GB live). With tcmalloc (``apt install libtcmalloc-minimal4``), preloaded when the system
  has it, the step peaks at 2.0 GB and is no slower (41.0 s against 44.4 s). Without it,
  :data:`COMPACT_MEMORY_ENV` maps each glibc block over 1 MB on its own (huge pages) and unmaps it
  when freed: 2.2 GB, but 50.6 s, 10.6 s of it faulting pages in.

Neither changes any result. :func:`reuse_freed_memory` does nothing outside glibc (macOS,
Windows, musl); tcmalloc is looked for on Linux only.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

#: Environment under which a process's peak RSS follows its live memory. By default glibc serves a
#: block from its heaps unless it is over a *dynamic* mmap threshold that rises to the size of
#: every mmap-ed block freed (up to 32 MB); a training step frees and allocates activations of
#: many sizes, so its heaps keep growing with freed memory. A fixed threshold of 1 MB maps every
#: larger block on its own and unmaps it when freed; PyTorch's huge-page allocation of big
#: tensors (``THP_MEM_ALLOC_ENABLE``) makes mapping them afresh cheap. Both are read when the
#: process starts.
COMPACT_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "THP_MEM_ALLOC_ENABLE": "1"}

#: The allocator ``compact_memory`` preloads when the system has it (Debian/Ubuntu package
#: ``libtcmalloc-minimal4``): it reuses freed memory without the fragmentation of glibc's heaps.
TCMALLOC = "libtcmalloc_minimal.so.4"

# mallopt parameters (glibc malloc.h) and glibc's defaults, unless the environment set others
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
# while reusing: trim only a heap top over 2 GB (mallopt takes an int), and then keep 2 GB of it
_KEEP_FREED = 2**31 - 1
_state = {"depth": 0}
_lock = threading.Lock()


def _glibc():
    """``libc.so.6`` when this process runs on glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (not musl)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def _restored_settings() -> dict[int, int]:
    """mallopt parameter -> value as the process had them: glibc's defaults or the environment's."""
    settings = {_M_MMAP_MAX: ("MALLOC_MMAP_MAX_", 65536),
                _M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", 128 * 1024),
                _M_TOP_PAD: ("MALLOC_TOP_PAD_", 128 * 1024)}
    return {param: min(int(os.environ.get(name, default)), 2**31 - 1)
            for param, (name, default) in settings.items()}


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True):
    """Inside the block, glibc reuses freed memory for new tensors instead of mapping (and
    faulting in) fresh pages; on leaving it, the process's settings come back and free memory is
    returned to the system. Yields True when it took effect (glibc), else False.

    Nested and concurrent uses are counted: the settings change on the first entry and are
    restored on the last exit. Side effect outside the block: glibc's mmap threshold stops adapting
    (it stays where it was), as after any ``mallopt`` call. Peak RSS rises, because freed blocks
    of one size are not always reused for another: 7.3 GB against 4.8 GB for MossFormer2 on one
    60-s input; ``Separator``'s 10-s chunks keep it bounded.
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _lock:
        if _state["depth"] == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED)
            libc.mallopt(_M_TOP_PAD, _KEEP_FREED)
        _state["depth"] += 1
    try:
        yield True
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                for param, value in _restored_settings().items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)


def compact_memory_requested(hparams_file: str, overrides) -> bool:
    """The yaml's top-level ``compact_memory:`` value, a command-line override winning."""
    import re

    import yaml

    if isinstance(overrides, str):
        overrides = yaml.safe_load(overrides) if overrides.strip() else {}
    if isinstance(overrides, dict) and "compact_memory" in overrides:
        return bool(overrides["compact_memory"])
    with open(hparams_file, encoding="utf-8") as f:
        m = re.search(r"^compact_memory:[ \t]*([^#\n]*)", f.read(), re.M)
    return bool(m and yaml.safe_load(m.group(1) or "false"))


def library_path(name: str) -> str | None:
    """The system's shared library ``name`` (e.g. :data:`TCMALLOC`), if installed."""
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    return None


def compact_memory_env() -> dict[str, str]:
    """The environment a ``compact_memory`` run restarts under: tcmalloc preloaded if the system
    has it (added in front of any ``LD_PRELOAD`` already set), else :data:`COMPACT_MEMORY_ENV`."""
    path = library_path(TCMALLOC) if sys.platform.startswith("linux") else None
    if path is None:
        return dict(COMPACT_MEMORY_ENV)
    preload = os.environ.get("LD_PRELOAD", "")
    if path in preload.split(":"):
        return {"LD_PRELOAD": preload}
    return {"LD_PRELOAD": f"{path}:{preload}" if preload else path}


def restart_with_compact_memory(argv) -> None:
    """Re-execute this command under :func:`compact_memory_env` unless it already runs under it.
    Only for a command-line run (``argv`` None); a call from Python gets a warning instead."""
    env = compact_memory_env()
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    settings = " ".join(f"{k}={v}" for k, v in env.items())
    if argv is not None:
        logger.warning("compact_memory: True needs %s in the environment when Python starts; "
                       "run the recipe from the command line, or set them yourself", settings)
        return
    os.environ.update(env)
    print("compact_memory: restarting under " + settings, file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, *sys.argv])
