"""What the benchmarks share: run a measurement in a fresh process, and time a function with the
peak resident memory it reaches."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``), MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(run, repeats: int) -> dict:
    """Best of ``repeats`` calls of ``run()``: its wall time, the part of it spent in the kernel
    by all threads (``kernel_seconds``: mostly page faults when memory is mapped afresh) and its
    minor page faults; the process's peak RSS, and the part of it reached after the state before
    the first call (call a warm-up first)."""
    base = rss_mb()
    calls = []
    for _ in range(repeats):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run()
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        calls.append({"seconds": seconds, "kernel_seconds": after.ru_stime - before.ru_stime,
                      "page_faults": after.ru_minflt - before.ru_minflt})
    best = min(calls, key=lambda c: c["seconds"])
    return {**best, "peak_mb": rss_mb(), "work_mb": rss_mb() - base}


def run_child(script: str, spec: dict, env: dict | None = None) -> dict:
    """``python <script> --child <spec as JSON>`` in a fresh process (with ``env`` added); its
    last output line is the JSON result. A failure becomes ``{"error": <last lines>}``."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args_or_run_child(parser, argv, child):
    """Parse the command line; when it is a ``--child`` call of :func:`run_child`, run
    ``child(spec)``, print its JSON result and return None."""
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return None
    return args
