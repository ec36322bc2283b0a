#!/usr/bin/env python3
"""MossFormer2 on this CPU: ClearerVoice's reference code and ours, side by side.

    python bench/mossformer2.py                       # the README table (~40 min on 2 cores)
    python bench/mossformer2.py --seconds 4 --train_seconds 2 --repeats 1   # a quick look
    python bench/mossformer2.py --profile             # where our time goes (4 s per --dtypes, + train)
    python bench/mossformer2.py --kernels             # the depthwise-convolution variants

Every measurement runs in a fresh process (``--threads`` intra-op threads, default 2), so each
peak RSS is its own. Both models are the full configuration (N=512, 24 layers, 55.7 M
parameters) with the *same* random weights: the reference (``clearvoice==0.1.2``,
requirements-ref.txt) is built from a seed, ours loads its state dict with
``load_clearvoice_checkpoint``; speed does not depend on the weights.

* **inference**: ``[1, seconds * 16000]`` in, under ``torch.inference_mode``; fp32, and bf16
  through ``torch.autocast("cpu", torch.bfloat16)`` for both. One warm-up call on 1 s, then the
  best of ``--repeats`` timed calls. The outputs are kept: the table reports max |ours -
  reference| in fp32 and the SNR of each bf16 output against its own fp32 output. ``int8`` (ours
  only): every ``nn.Linear`` replaced by PyTorch's dynamically quantized one
  (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations quantized per call;
  fbgemm, VNNI where the CPU has it), the rest in fp32; its SNR is against our fp32 output.
* **train step**: forward, PIT SI-SNR loss against random targets, backward (batch 1, dropout
  on), after one warm-up step on 0.5 s. The reference runs at 2 s only: 4 s does not fit in
  24 GB (``--reference_train_max``).

Peak memory is the process's peak RSS minus its RSS once the model is built (``work``) and the
whole peak RSS. glibc keeps some freed memory in its heap, so for training steps, where that
inflates RSS most, each step is run once more with ``MALLOC_MMAP_THRESHOLD_=131072`` (every
block over 128 kB is unmapped when freed): that peak RSS is the peak of live memory.

"s in the kernel" is the system time of all threads during the timed call: with glibc's
defaults, mostly the page faults of big tensors mapped afresh. ``--allocator reuse`` runs each
measurement inside ``modules.training.memory.reuse_freed_memory`` (what ``Separator`` does), which removes
them; ``compact``, ``tcmalloc`` and ``jemalloc``: see :func:`set_allocator`. ``--dtypes fp32``
skips the bf16 rows; ``--dtypes fp32,int8`` adds the int8 row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from measure import parse_args_or_run_child, run_child as run_child_process, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
_OPEN_BLOCKS = []


def set_allocator(kind: str) -> None:
    """``jemalloc``, ``tcmalloc``: the child runs with that system library preloaded (Debian:
    ``apt install libjemalloc2`` / ``libtcmalloc-minimal4``); ``compact``: under
    ``modules.training.memory.compact_memory_env()`` (the recipes' ``compact_memory: True``: tcmalloc when
    installed, else glibc settings), set by
    :func:`run_child`; ``reuse``: glibc reuses freed memory for the rest of the process
    (``modules.training.memory.reuse_freed_memory``, as in ``Separator``); ``glibc``: the default."""
    if kind == "reuse":
        sys.path.insert(0, ROOT)
        from modules.training.memory import reuse_freed_memory

        block = reuse_freed_memory()
        block.__enter__()
        _OPEN_BLOCKS.append(block)  # referenced until the process ends (collected, it would exit)


# ---------------------------------------------------------------------------------------------
# one measurement (child process)
# ---------------------------------------------------------------------------------------------


def build(impl: str, weights: str):
    import torch

    sys.path.insert(0, ROOT)
    from modules.convert.clearvoice import load_clearvoice_checkpoint
    from modules.models.mossformer2 import CONFIGS, MossFormer2
    from tests.clearvoice_ref import clearvoice_reference

    if impl == "reference":
        import types

        args = types.SimpleNamespace(encoder_embedding_dim=512, mossformer_sequence_dim=512,
                                     num_mossformer_layer=24, encoder_kernel_size=16, num_spks=2)
        model = clearvoice_reference().MossFormer2_SS_16K(args).model
        model.load_state_dict(torch.load(weights, weights_only=True)["model"])
        return model, lambda x: torch.stack(model(x), dim=-1)
    if os.path.exists(weights):
        model = load_clearvoice_checkpoint(weights)
    else:  # no reference installed: our own random weights
        torch.manual_seed(0)
        model = MossFormer2(**CONFIGS["mossformer2"])
    return model, model


def child(spec: dict) -> dict:
    set_allocator(spec["allocator"])
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, ROOT)
    from modules.models.losses import pit_si_snr_loss

    model, run = build(spec["impl"], spec["weights"])
    if spec["dtype"] == "int8":  # ours only (the table skips the reference)
        model = run = torch.ao.quantization.quantize_dynamic(model.eval(), {torch.nn.Linear},
                                                             dtype=torch.qint8)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, int(spec["seconds"] * SR), generator=gen)
    if spec["task"] == "infer":
        model.eval()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")
        out = {}
        with torch.inference_mode(), autocast:
            run(torch.randn(1, SR, generator=gen))  # warm-up: oneDNN primitives, allocator
            result = timed(lambda: out.update(y=run(x)), spec["repeats"])
        if spec.get("output"):
            torch.save(out["y"].float(), spec["output"])
    else:
        model.train()
        target = torch.randn(1, x.shape[1], 2, generator=gen)

        def step(inp, tgt):
            loss = pit_si_snr_loss(run(inp), tgt)
            loss.backward()
            model.zero_grad(set_to_none=True)

        step(x[:, : SR // 2], target[:, : SR // 2])
        result = timed(lambda: step(x, target), spec["repeats"])
    return result


#: allocators preloaded into the child: (library, Debian package)
PRELOADED = {"jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
             "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4")}  # memory.TCMALLOC


def run_child(spec: dict, env: dict | None = None) -> dict:
    if spec.get("allocator") == "compact":
        sys.path.insert(0, ROOT)
        from modules.training.memory import compact_memory_env

        env = dict(env or {}, **compact_memory_env())
    if spec.get("allocator") in PRELOADED:  # must be preloaded when the child starts
        library, package = PRELOADED[spec["allocator"]]
        sys.path.insert(0, ROOT)
        from modules.training.memory import library_path

        if not library_path(library):
            return {"error": f"no {library} (apt install {package})"}
        env = dict(env or {}, LD_PRELOAD=library_path(library))
    return run_child_process(__file__, spec, env)


# ---------------------------------------------------------------------------------------------
# the table (parent process)
# ---------------------------------------------------------------------------------------------


def fmt(row: dict | None, key: str, pattern: str) -> str:
    if row is None:
        return "not run"
    if "error" in row:
        return "failed"
    return pattern % row[key]


def compare(outputs: dict) -> list[str]:
    import torch

    lines = []
    for seconds in sorted({k[1] for k in outputs}):
        parts = []
        ref32, ours32 = outputs.get(("reference", seconds, "fp32")), outputs.get(("ours", seconds, "fp32"))
        if ref32 and ours32:
            a, b = torch.load(ref32, weights_only=True), torch.load(ours32, weights_only=True)
            parts.append(f"max |ours - reference| fp32 {(a - b).abs().max().item():.1e}")
        for impl in ("ours", "reference"):
            for low in ("bf16", "int8"):
                f32, other = outputs.get((impl, seconds, "fp32")), outputs.get((impl, seconds, low))
                if f32 and other:
                    a, b = torch.load(f32, weights_only=True), torch.load(other, weights_only=True)
                    snr = 10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum()).item()
                    parts.append(f"{impl} {low} vs fp32 SNR {snr:.1f} dB")
        if parts:
            lines.append(f"{seconds:g} s: " + "; ".join(parts))
    return lines


def table(args) -> None:
    import torch

    sys.path.insert(0, ROOT)
    from tests.clearvoice_ref import clearvoice_reference

    tmp = tempfile.mkdtemp(prefix="bench_mossformer2_")
    weights = os.path.join(tmp, "clearvoice_weights.pt")
    have_reference = not args.skip_reference
    if have_reference:
        try:
            reference = clearvoice_reference()
        except ImportError as err:
            print(f"reference skipped: {err}")
            have_reference = False
    if have_reference:
        import types

        torch.manual_seed(0)
        cfg = types.SimpleNamespace(encoder_embedding_dim=512, mossformer_sequence_dim=512,
                                    num_mossformer_layer=24, encoder_kernel_size=16, num_spks=2)
        torch.save({"model": reference.MossFormer2_SS_16K(cfg).model.state_dict()}, weights)
    impls = ["reference", "ours"] if have_reference else ["ours"]
    common = dict(weights=weights, threads=args.threads, allocator=args.allocator)

    rows, outputs = [], {}
    jobs = [("infer", s, d) for s in args.seconds for d in args.dtypes]
    jobs += [("train", s, "fp32") for s in args.train_seconds]
    for task, seconds, dtype in jobs:
        row = {"task": task, "seconds": seconds, "dtype": dtype}
        for impl in impls:
            if impl == "reference" and (task == "train" and seconds > args.reference_train_max
                                        or dtype == "int8"):
                continue
            spec = dict(common, impl=impl, task=task, seconds=seconds, dtype=dtype,
                        repeats=args.repeats if seconds <= 16 else 1)
            if task == "infer":
                spec["output"] = os.path.join(tmp, f"{impl}_{seconds}_{dtype}.pt")
            print(f"  {impl:9s} {task} {seconds:g} s {dtype} ...", end=" ", flush=True)
            row[impl] = run_child(spec)
            r = row[impl]
            print(r.get("error") or f"{r['seconds']:.1f} s ({r['kernel_seconds']:.1f} s in the kernel, "
                  f"{r['page_faults'] / 1e6:.2f} M page faults), peak {r['peak_mb']:.0f} MB", flush=True)
            if task == "infer" and "error" not in row[impl]:
                outputs[(impl, seconds, dtype)] = spec["output"]
            elif task == "train" and "error" not in row[impl]:
                # peak RSS depends on how much freed memory the allocator keeps; with every block
                # over 128 kB mmap-ed and unmapped when freed, it is the peak of live memory
                live = run_child(dict(spec, repeats=1, allocator="glibc"), LIVE_ENV)
                row[impl]["live_mb"] = live.get("peak_mb", float("nan"))
                print(f"      live peak {row[impl]['live_mb']:.0f} MB", flush=True)
        rows.append(row)

    print(f"\nMossFormer2 (N=512, 24 layers), batch 1, {args.threads} threads, allocator "
          f"{args.allocator}, torch {torch.__version__}\n")
    print("| task | input | dtype | reference s | ours s | speed-up | reference / ours s in the "
          "kernel | reference peak / work MB | ours peak / work MB | ours per s of audio: s, work MB "
          "| reference / ours live peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref, ours = r.get("reference"), r.get("ours")
        ok = ref and ours and "error" not in ref and "error" not in ours
        speed = f"{ref['seconds'] / ours['seconds']:.2f}x" if ok else "-"
        per_s = "-" if ours is None or "error" in ours else \
            f"{ours['seconds'] / r['seconds']:.2f}, {ours['work_mb'] / r['seconds']:.0f}"
        mem = lambda m: "not run" if m is None else "failed" if "error" in m else \
            f"{m['peak_mb']:.0f} / {m['work_mb']:.0f}"  # noqa: E731
        kernel = " / ".join(fmt(m, "kernel_seconds", "%.1f") for m in (ref, ours))
        label = "inference" if r["task"] == "infer" else "train step (fwd + bwd)"
        live = " / ".join("-" if m is None or "live_mb" not in m else f"{m['live_mb']:.0f}"
                          for m in (ref, ours)) if r["task"] == "train" else ""
        print(f"| {label} | {r['seconds']:g} s | {r['dtype']} | {fmt(ref, 'seconds', '%.1f')} "
              f"| {fmt(ours, 'seconds', '%.1f')} | {speed} | {kernel} | {mem(ref)} | {mem(ours)} "
              f"| {per_s} | {live} |")
    print()
    for line in compare(outputs):
        print(line)


# ---------------------------------------------------------------------------------------------
# where the time goes, and the convolution variants
# ---------------------------------------------------------------------------------------------

CATEGORIES = [
    ("matrix products (linear, attention)", ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "linear_dynamic")),
    ("int8 quantization of activations", ("quantize_per_tensor", "dequantize", "_choose_qparams")),
    ("depthwise convolutions", ("mkldnn_convolution", "convolution", "conv2d", "conv1d")),
    ("dropout random numbers", ("random_", "bernoulli")),
    ("copies and layout", ("copy_", "cat", "pad", "contiguous", "clone", "fill_", "flip")),
]


def category(op: str) -> str:
    name = op.split("::")[-1]
    for label, keys in CATEGORIES:
        if any(name == k or name.startswith(k) for k in keys):
            return label
    return "element-wise, norms, reductions"


def profile(args) -> None:
    set_allocator(args.allocator)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    from modules.models.losses import pit_si_snr_loss
    from modules.models.mossformer2 import CONFIGS, MossFormer2

    torch.manual_seed(0)
    model = MossFormer2(**CONFIGS["mossformer2"])
    tasks = [(f"inference {d}", args.seconds[0], d) for d in args.dtypes]
    tasks += [("train step", s, "fp32") for s in args.train_seconds[:1]]
    for task, seconds, dtype in tasks:
        x = torch.randn(1, int(seconds * SR))
        if task.startswith("inference"):
            model.eval()
            run = model
            if dtype == "int8":
                run = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                run(x[:, :SR])
                with torch.profiler.profile() as prof:
                    run(x)
        else:
            model.train()
            target = torch.randn(1, x.shape[1], 2)
            pit_si_snr_loss(model(x[:, : SR // 2]), target[:, : SR // 2]).backward()
            with torch.profiler.profile() as prof:
                pit_si_snr_loss(model(x), target).backward()
        totals: dict[str, float] = {}
        for event in prof.key_averages():
            if event.key.startswith(("aten::", "quantized::")) and event.self_cpu_time_total > 0:
                totals[category(event.key)] = totals.get(category(event.key), 0) + event.self_cpu_time_total
        whole = sum(totals.values())
        print(f"\n{task}, {seconds:g} s of audio: {whole / 1e6:.1f} s of operator time "
              "(profiler overhead included)")
        for label, t in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {100 * t / whole:5.1f} %  {t / 1e6:6.2f} s  {label}")
        top = sorted((e for e in prof.key_averages() if e.key.startswith(("aten::", "quantized::"))),
                     key=lambda e: -e.self_cpu_time_total)[:8]
        print("  largest operators: " + ", ".join(
            f"{e.key.split('::')[-1]} {100 * e.self_cpu_time_total / whole:.0f} %" for e in top))


def kernels(args) -> None:
    set_allocator(args.allocator)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    from modules.models.mossformer2 import conv_along_frames

    def best(fn, n=3):
        fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * min(times)

    frames = int(args.seconds[0] * SR) // 8
    print(f"depthwise convolutions of MossFormer2 on {args.seconds[0]:g} s ({frames} frames), ms "
          "(forward | forward + backward)")
    print("| convolution | conv1d forward | conv1d fwd + bwd | ours forward | ours fwd + bwd |")
    print("|---|---|---|---|---|")
    for label, c_in, c_out, k, d in (("FFConvM 2048 ch, k 17", 2048, 2048, 17, 1),
                                     ("FFConvM 512 ch, k 17", 512, 512, 17, 1),
                                     ("FSMN 256 ch, k 39", 256, 256, 39, 1),
                                     ("FSMN 512 -> 256 ch, k 39, dilation 2", 512, 256, 39, 2)):
        x = torch.randn(1, frames, c_in, requires_grad=True)
        w = torch.randn(c_out, c_in // c_out, k, requires_grad=True)
        pad = (k - 1) // 2 * d

        def plain():
            return F.conv1d(x.transpose(1, 2), w, padding=pad, dilation=d, groups=c_out).transpose(1, 2)

        def ours():
            return conv_along_frames(x, w, d)

        grad = torch.randn(1, frames, c_out)
        cells = []
        for fn in (plain, ours):
            with torch.no_grad():
                fwd = best(fn)
            both = best(lambda: fn().backward(grad))
            cells.append(f"{fwd:.1f} | {both:.1f}")
        print(f"| {label} | {cells[0]} | {cells[1]} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", default="4,16,60", help="inference input lengths")
    parser.add_argument("--train_seconds", default="2,4", help="training-step input lengths")
    parser.add_argument("--reference_train_max", type=float, default=2.0,
                        help="longest training input for the reference (4 s needs > 24 GB)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="inference precisions")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs (inputs <= 16 s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocator", default="glibc",
                        choices=("glibc", "reuse", "compact", *PRELOADED),
                        help="glibc (default), reuse, compact, jemalloc or tcmalloc (see set_allocator)")
    parser.add_argument("--skip_reference", action="store_true")
    parser.add_argument("--profile", action="store_true", help="where our time goes")
    parser.add_argument("--kernels", action="store_true", help="depthwise-convolution variants")
    args = parse_args_or_run_child(parser, argv, child)
    if args is None:
        return
    args.seconds = [float(s) for s in args.seconds.split(",") if s]
    args.train_seconds = [float(s) for s in args.train_seconds.split(",") if s]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if set(args.dtypes) - {"fp32", "bf16", "int8"}:
        parser.error(f"--dtypes: fp32, bf16 and/or int8, got {args.dtypes}")
    if args.profile:
        profile(args)
    elif args.kernels:
        kernels(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
