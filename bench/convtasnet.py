#!/usr/bin/env python3
"""Conv-TasNet on this CPU: ours against SpeechBrain's lobes and Asteroid's ConvTasNet, one run.

    .venv/bin/python bench/convtasnet.py                 # every row (about 40 min on 2 cores)
    .venv/bin/python bench/convtasnet.py --configs small --threads 2 --dtypes fp32   # a quick look
    .venv/bin/python bench/convtasnet.py --profile small --threads 2    # where our time goes
    .venv/bin/python bench/convtasnet.py --compile --threads 2 --dtypes fp32   # + ours under torch.compile

Systems, all built with the same hyperparameters and random weights (speed does not depend on
the weights), two sources:

* **ours**: ``modules.models.convtasnet.ConvTasNet``.
* **SpeechBrain lobes** (speechbrain 1.1.2): ``speechbrain.lobes.models.conv_tasnet.MaskNet``
  between the ``dual_path.Encoder`` / ``dual_path.Decoder`` filterbanks, wired as SpeechBrain's
  WSJ0-2mix Conv-TasNet recipe does (the masked representation stacked per source, one decoder
  call per source). Its TCN has no skip path, so it has no ``Sc``.
* **ours, compiled** (``--compile`` only): ours under ``torch.compile`` (inductor, default
  mode); the first call, which compiles, is timed apart and printed as a note.
* **Asteroid** 0.7.0: ``asteroid.models.ConvTasNet`` (gLN, ReLU masks, free filterbank),
  installed with ``pip install --no-deps asteroid==0.7.0 asteroid-filterbanks`` (the Makefile
  does this). A peer that does not import is skipped with a note.

Configurations (paper names): small N=128 L=40 B=128 H=256 Sc=128 P=3 X=7 R=2; paper N=512 L=16
B=128 H=512 Sc=128 P=3 X=8 R=3. Measurements:

* **train**: forward, negative PIT SI-SNR (``modules.models.losses.pit_si_snr_loss``, the same
  loss for every system), backward and an Adam step, batch 4 x 4 s at 8 kHz.
* **infer**: 1 x 4 s at 8 kHz under ``torch.no_grad``.

Each in fp32 and under ``torch.autocast("cpu", torch.bfloat16)``, with 1 and 2 intra-op threads
(one fresh process per thread count). After ``--warmup`` calls per system, the ``--repeats``
timed calls are interleaved across systems (ours, SpeechBrain, Asteroid, ours, ...), so load from
other processes on a shared machine falls on all systems alike; the table gives the median and
the ratios ours/peer (below 1: ours is faster), and the median CPU time of the process during
each call (all its threads), which other processes inflate less than wall time. Each (thread
count, config, step) runs in its own process; one that fails (e.g. killed for memory) is
reported and the others still run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.measure import parse_args_or_run_child, run_child  # noqa: E402

CONFIGS = {
    "small": dict(N=128, L=40, B=128, H=256, Sc=128, P=3, X=7, R=2),
    "paper": dict(N=512, L=16, B=128, H=512, Sc=128, P=3, X=8, R=3),
}
RATE, SECONDS, TRAIN_BATCH, N_SRC = 8000, 4.0, 4, 2
SYSTEMS = ("ours", "speechbrain", "asteroid")


def cpu_description() -> str:
    """``lscpu`` model name and the bf16 matrix flags of /proc/cpuinfo."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name")), "unknown")
    except OSError:
        name = "unknown"
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ["avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"]
    present = [f for f in wanted if f in flags]
    absent = [f for f in wanted if f not in flags]
    return (f"CPU: {name}, {os.cpu_count()} logical CPUs; flags present: "
            f"{' '.join(present) or '-'}; absent: {' '.join(absent) or '-'}")


# --- the three systems: each is a module whose forward maps [batch, time] to [batch, time, n_src]

def build(system: str, cfg: dict):
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    if system in ("ours", "compiled"):
        from modules.models.convtasnet import ConvTasNet
        model = ConvTasNet(**cfg, n_src=N_SRC)
        return torch.compile(model) if system == "compiled" else model
    if system == "speechbrain":  # wired as SpeechBrain's recipe (bench/peer_convtasnet.py)
        from bench.peer_convtasnet import SpeechBrainLobes
        return SpeechBrainLobes(**{k: cfg[k] for k in "NLBHPXR"}, n_src=N_SRC)
    if system == "asteroid":
        from asteroid.models import ConvTasNet as AsteroidConvTasNet

        class AsteroidWrapper(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = AsteroidConvTasNet(
                    n_src=N_SRC, n_blocks=cfg["X"], n_repeats=cfg["R"], bn_chan=cfg["B"],
                    hid_chan=cfg["H"], skip_chan=cfg["Sc"], conv_kernel_size=cfg["P"],
                    norm_type="gLN", mask_act="relu", kernel_size=cfg["L"],
                    n_filters=cfg["N"], stride=cfg["L"] // 2, sample_rate=RATE)

            def forward(self, mix):
                return self.model(mix).transpose(1, 2)      # [batch, n_src, time] -> [b, t, s]

        return AsteroidWrapper()
    raise ValueError(system)


def make_call(system_model, mode: str, dtype: str):
    """A function running one train step or one inference call on fixed random data."""
    import torch

    from modules.models.losses import pit_si_snr_loss

    g = torch.Generator().manual_seed(1)
    n = int(RATE * SECONDS)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else (
        lambda: torch.autocast("cpu", enabled=False))
    if mode == "infer":
        system_model.eval()
        mix = torch.randn(1, n, generator=g)

        def call():
            with torch.no_grad(), autocast():
                system_model(mix)
        return call
    system_model.train()
    sources = torch.randn(TRAIN_BATCH, n, N_SRC, generator=g)
    mix = sources.sum(-1)
    opt = torch.optim.Adam(system_model.parameters(), lr=1e-4)

    def call():
        opt.zero_grad(set_to_none=True)
        with autocast():
            est = system_model(mix)
        loss = pit_si_snr_loss(est.float(), sources).mean()
        loss.backward()
        opt.step()
    return call


def child(spec: dict) -> dict:
    """The rows of one config and one step at one thread count, the systems interleaved."""
    import torch

    from modules.training.memory import reuse_freed_memory

    torch.set_num_threads(spec["threads"])
    with reuse_freed_memory(spec["allocator"] == "reuse"):
        return _timed_rows(spec)


def _timed_rows(spec: dict) -> dict:
    rows, notes, models = [], [], {}
    for system in spec["systems"]:
        try:
            models[system] = build(system, CONFIGS[spec["config"]])
        except ImportError as e:
            notes.append(f"{system} skipped: {e}")
    for dtype in spec["dtypes"]:
        calls = {s: make_call(m, spec["mode"], dtype) for s, m in models.items()}
        for s in calls:
            start = time.perf_counter()
            calls[s]()
            if s == "compiled":
                notes.append(f"compiled {spec['config']} {spec['mode']} {dtype}: first call (compiles) "
                             f"{time.perf_counter() - start:.1f} s")
            for _ in range(spec["warmup"] - 1):
                calls[s]()
        wall, cpu = {s: [] for s in calls}, {s: [] for s in calls}
        for _ in range(spec["repeats"]):
            for s in calls:
                start, start_cpu = time.perf_counter(), time.process_time()
                calls[s]()
                wall[s].append(time.perf_counter() - start)
                cpu[s].append(time.process_time() - start_cpu)
        rows.append({"config": spec["config"], "mode": spec["mode"], "dtype": dtype,
                     "threads": spec["threads"],
                     "median": {s: statistics.median(t) for s, t in wall.items()},
                     "cpu": {s: statistics.median(t) for s, t in cpu.items()}})
    return {"rows": rows, "notes": notes}


def profile(cfg_name: str, threads: int, allocator: str):
    """torch.profiler tables of our inference call and train step (fp32)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    from modules.training.memory import reuse_freed_memory

    torch.set_num_threads(threads)
    model = build("ours", CONFIGS[cfg_name])
    with reuse_freed_memory(allocator == "reuse"):
        for mode in ("infer", "train"):
            call = make_call(model, mode, "fp32")
            call()
            call()
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                call()
            print(f"--- ours, {cfg_name}, {mode}, {threads} thread(s), allocator {allocator}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per system (at least 1)")
    ap.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", choices=list(CONFIGS))
    ap.add_argument("--allocator", choices=["reuse", "glibc"], default="reuse",
                    help="reuse: every system inside modules.training.memory.reuse_freed_memory, as "
                         "our recipes train; glibc: the C allocator's defaults")
    args = parse_args_or_run_child(ap, sys.argv[1:], child)
    if args is None:
        return
    if args.profile:
        profile(args.profile, args.threads[0], args.allocator)
        return
    systems = list(SYSTEMS) + (["compiled"] if args.compile else [])
    print(cpu_description())
    print(f"Timed calls interleaved across systems ({', '.join(SYSTEMS)}, repeated) after "
          f"{args.warmup} warm-up call(s) each, so load from other processes on this machine "
          f"hits all systems alike; median of {args.repeats}. train: batch {TRAIN_BATCH} x "
          f"{SECONDS:g} s @ {RATE} Hz, forward + PIT SI-SNR + backward + Adam; infer: 1 x "
          f"{SECONDS:g} s, no_grad. Allocator: {args.allocator} (all systems). Seconds; ratio "
          f"ours/peer < 1 means ours is faster.")
    results, notes = [], set()
    for threads in args.threads:
        for cfg_name in args.configs:
            for mode in args.modes:
                spec = dict(threads=threads, config=cfg_name, mode=mode, dtypes=args.dtypes,
                            allocator=args.allocator, systems=systems, warmup=args.warmup,
                            repeats=args.repeats)
                out = run_child(__file__, spec, env={"OMP_NUM_THREADS": str(threads)})
                if "error" in out:
                    print(f"{cfg_name} {mode} at {threads} thread(s) failed: {out['error']}")
                    continue
                for note in out["notes"]:
                    if note not in notes:
                        print(f"note: {note}")
                        notes.add(note)
                results.extend(out["rows"])
    compiled = " | compiled | compiled/ours" if args.compile else ""
    head = ("| config | step | dtype | threads | ours | SpeechBrain | Asteroid "
            f"| ours/SB | ours/Asteroid | CPU s: ours / SB / Asteroid{compiled} |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        m, c = r["median"], r["cpu"]
        cell = lambda s: f"{m[s]:.3f}" if s in m else "-"
        ratio = lambda s: f"{m['ours'] / m[s]:.2f}" if s in m and "ours" in m else "-"
        cpu = " / ".join(f"{c[s]:.3f}" if s in c else "-" for s in SYSTEMS)
        print(f"| {r['config']} | {r['mode']} | {r['dtype']} | {r['threads']} | {cell('ours')} "
              f"| {cell('speechbrain')} | {cell('asteroid')} | {ratio('speechbrain')} "
              f"| {ratio('asteroid')} | {cpu}"
              + (f" | {cell('compiled')} | {m['compiled'] / m['ours']:.2f}" if "compiled" in m else
                 " | - | -" if args.compile else "") + " |")

if __name__ == "__main__":
    main()
