#!/usr/bin/env python3
"""sdti against diffusers on one CUDA GPU, in one run: the textual-inversion training step
on the SD 1.5 architecture with random weights at 512 px, batch 1, 4 and 8.

    python3 tests/reference/bench_gpu.py --sdti target/release/sdti [--out results.json]

For each batch size it runs, each in its own process (a fresh CUDA context and fresh
memory statistics):

* `sdti bench --device cuda --dtype bf16 --batch-size N --json` (latents cached, as sdti
  trains; with --profile for the stage and layer breakdown);
* tests/reference/bench_diffusers_gpu.py --recipe default (fp16, VAE every step: the
  example's README recipe) and --recipe best (bf16, cached latents).

Prints a table of ms/step, images/s and peak memory for each, and the ratios (sdti's
images/s over diffusers'), then writes everything as JSON. Peak memory: for sdti the
high-water mark of the CUDA memory pool it allocates from, for torch
max_memory_allocated; neither counts the CUDA context.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_json(cmd, timeout):
    """Runs cmd; returns the last JSON line of its stdout, or {"error": ...}."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        return {"error": f"timed out after {timeout} s", "stderr": str(tail)}
    sys.stderr.write(p.stderr[-3000:])
    out = None
    if p.returncode == 0:
        try:
            out = json.loads(p.stdout)  # sdti bench --json: one object or an array
        except ValueError:
            lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
            out = json.loads(lines[-1]) if lines else None
    if out is None:
        return {"error": f"exit {p.returncode}", "stderr": p.stderr[-3000:], "stdout": p.stdout[-2000:]}
    for o in out if isinstance(out, list) else [out]:
        o["wall_s"] = time.time() - start
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdti", required=True, help="path of a CUDA build of the sdti binary")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="bf16", help="sdti's --dtype")
    ap.add_argument("--profile", default="1,8", help="batch sizes to profile (sdti and diffusers)")
    ap.add_argument("--best-batches", default="8", help="batch sizes for diffusers' best recipe")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per process")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    profiled = {int(b) for b in args.profile.split(",") if b}
    best_batches = {int(b) for b in args.best_batches.split(",") if b}
    py = sys.executable
    results = []
    # sdti: one process for every batch size (one random model); --profile for all.
    sdti_runs = run_json(
        [args.sdti, "bench", "--device", "cuda", "--dtype", args.dtype, "--resolution", str(args.resolution),
         "--batch-size", ",".join(map(str, batches)), "--steps", str(args.steps), "--json",
         *(["--profile"] if profiled else [])],
        args.timeout,
    )
    if isinstance(sdti_runs, dict):
        sdti_runs = [sdti_runs]
    by_batch = {r.get("batch_size"): r for r in sdti_runs}
    for b in batches:
        prof = ["--profile"] if b in profiled else []
        row = {"batch_size": b}
        failed = sdti_runs[0] if "error" in sdti_runs[0] else {"error": "no report"}
        row["sdti"] = by_batch.get(b, failed)
        row["diffusers_default"] = run_json(
            [py, str(HERE / "bench_diffusers_gpu.py"), "--recipe", "default", "--batch-size", str(b),
             "--resolution", str(args.resolution), "--steps", str(args.steps), *prof],
            args.timeout,
        )
        if b in best_batches:
            row["diffusers_best"] = run_json(
                [py, str(HERE / "bench_diffusers_gpu.py"), "--recipe", "best", "--batch-size", str(b),
                 "--resolution", str(args.resolution), "--steps", str(args.steps), *prof],
                args.timeout,
            )
        results.append(row)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    def cell(r, ms_key, mem_key):
        if r is None:
            return "        -        |        "
        if "error" in r:
            return "      error      |        "
        return f"{r[ms_key]:8.1f} {r['images_per_second']:7.1f} | {r.get(mem_key) or 0:7.0f}"

    print(f"\n{args.resolution} px; sdti --dtype {args.dtype}; ms/step, images/s | peak MiB")
    print("batch | sdti                      | diffusers default (fp16, VAE/step) | diffusers best (bf16, cached) | sdti/default | sdti/best")
    for row in results:
        s, d, best = row["sdti"], row["diffusers_default"], row.get("diffusers_best")

        def ratio(other):
            if not other or "error" in other or "error" in s:
                return "   -  "
            return f"{s['images_per_second'] / other['images_per_second']:6.2f}"

        print(
            f"{row['batch_size']:5d} | {cell(s, 'mean_ms_per_step', 'device_peak_mib')} | "
            f"{cell(d, 'ms_per_step_mean', 'peak_allocated_mib')} | "
            f"{cell(best, 'ms_per_step_mean', 'peak_allocated_mib')} | {ratio(d)} | {ratio(best)}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
