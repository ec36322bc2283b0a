#!/usr/bin/env python3
"""Cost of the deep-clustering losses as the number of time-frequency units grows.

    python bench/dc_loss.py [--seconds 0.5 1 3 10 60] [--dims 20 40] [--batch 1] [--threads 1]
                            [--chunk 512] [--max_gb 8] [--max_case_seconds 20]

For each audio length, ``N = bins x frames`` units (default: 129 bins of an 8 kHz STFT with
n_fft 256 and hop 64, centred frames ``1 + samples // hop``) and each embedding size D, one
forward + backward of

* ``low-rank``: :func:`modules.models.clustering.deep_clustering_loss` (``O(N D^2)``),
* ``naive``: the textbook ``||V V^T - Y Y^T||_F^2`` with the N x N matrices (autograd),
* ``leaky``: :func:`modules.models.clustering.leaky_deep_clustering_loss` (exact, blocks of
  ``--chunk``; ``O(N^2 D)`` time, memory independent of N beyond the inputs),

with two one-hot classes. Each case runs in a forked child process that reports its wall time
(best of up to 3 runs when a run is short) and its peak resident memory (``ru_maxrss``),
absolute and above the child's state just before the loss (torch loaded, inputs allocated). A naive case whose
N x N matrices would exceed ``--max_gb`` is skipped, as is any case whose time, extrapolated from
the previous length (``N^2`` scaling for naive and leaky), exceeds ``--max_case_seconds``; the
table prints the estimate instead. Threads default to 1 so that figures are stable on a shared
machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import torch
import torch.nn.functional as F

from measure import rss_mb as peak_rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modules.models.clustering import deep_clustering_loss, leaky_deep_clustering_loss  # noqa: E402

METHODS = ("low-rank", "naive", "leaky")
NAIVE_MATRICES = 4  # N x N float32 tensors alive at the naive form's peak (measured: ~3.8)


def naive_dc(v, y):
    """``||V V^T - Y Y^T||_F^2 / N^2`` with the full affinity matrices."""
    diff = v @ v.transpose(1, 2) - y @ y.transpose(1, 2)
    return diff.pow(2).sum((1, 2)) / v.shape[1] ** 2


def measure(method: str, batch: int, n: int, d: int, chunk: int, threads: int) -> dict:
    """One case, in this process: ``{"seconds": ..., "peak_mb": ..., "extra_mb": ...}``."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(batch, n, d, generator=gen), dim=-1).requires_grad_()
    y = F.one_hot(torch.randint(2, (batch, n), generator=gen), 2).float()
    fn = {"low-rank": deep_clustering_loss, "naive": naive_dc,
          "leaky": lambda a, b: leaky_deep_clustering_loss(a, b, chunk_size=chunk)}[method]
    base = peak_rss_mb()
    best = float("inf")
    for _ in range(3):
        v.grad = None
        start = time.perf_counter()
        fn(v, y).sum().backward()
        best = min(best, time.perf_counter() - start)
        if best > 1.0:
            break
    peak = peak_rss_mb()
    return {"seconds": best, "peak_mb": peak, "extra_mb": peak - base}


def _child(conn, args):
    try:
        conn.send(measure(*args))
    except Exception as exc:  # reported in the table
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    conn.close()


def run_case(method, batch, n, d, chunk, threads) -> dict:
    """``measure`` in a forked child: its own peak RSS, torch already imported (saves seconds
    per case on a loaded machine). The parent runs no torch op, so forking is safe."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, (method, batch, n, d, chunk, threads)))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"error": "child died (out of memory?)"}
    proc.join()
    if proc.exitcode and "error" not in result:
        result = {"error": f"child exit code {proc.exitcode}"}
    return result


def fmt_time(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, nargs="+", default=[0.5, 1, 3, 10, 60])
    p.add_argument("--dims", type=int, nargs="+", default=[20, 40])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sample_rate", type=int, default=8000)
    p.add_argument("--n_fft", type=int, default=256)
    p.add_argument("--hop", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512, help="block size of the leaky variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max_gb", type=float, default=8.0, help="skip naive cases needing more")
    p.add_argument("--max_case_seconds", type=float, default=20.0,
                   help="skip a case whose extrapolated time exceeds this")
    args = p.parse_args(argv)

    bins = args.n_fft // 2 + 1
    print(f"# deep-clustering loss, forward + backward, batch {args.batch}, {bins} bins "
          f"({args.sample_rate} Hz, STFT {args.n_fft}/{args.hop}), 2 classes, float32, "
          f"{args.threads} thread(s), leaky blocks {args.chunk}")
    print("| audio | N units | D | method | time | peak RSS | above start |")
    print("|---|---|---|---|---|---|---|")
    started = time.perf_counter()
    for d in args.dims:
        last = {}  # method -> (n, seconds) of the last measured case, to extrapolate
        for sec in sorted(args.seconds):
            frames = 1 + int(sec * args.sample_rate) // args.hop
            n = bins * frames
            for method in METHODS:
                skip = None
                if method == "naive":
                    need_gb = NAIVE_MATRICES * args.batch * n * n * 4 / 1e9
                    if need_gb > args.max_gb:
                        skip = f"skipped: needs ~{need_gb:,.0f} GB"
                if skip is None and method in last:
                    n0, t0 = last[method]
                    power = 1 if method == "low-rank" else 2
                    estimate = t0 * (n / n0) ** power
                    if estimate > args.max_case_seconds:
                        skip = f"skipped: ~{fmt_time(estimate)} (extrapolated)"
                if skip:
                    row = [skip, "", ""]
                else:
                    r = run_case(method, args.batch, n, d, args.chunk, args.threads)
                    if "error" in r:
                        row = [f"failed: {r['error']}", "", ""]
                    else:
                        last[method] = (n, r["seconds"])
                        row = [fmt_time(r["seconds"]), f"{r['peak_mb']:,.0f} MB",
                               f"{r['extra_mb']:,.0f} MB"]
                print(f"| {sec:g} s | {n:,} | {d} | {method} | " + " | ".join(row) + " |",
                      flush=True)
    print(f"# total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
