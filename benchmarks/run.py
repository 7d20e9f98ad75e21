"""Run every benchmark, each as its own child process with one torch thread; each writes its JSON.

    python benchmarks/run.py [--quick] [--only a,b] [--jobs N] [--allow-dirty]

``--quick`` passes each script's own ``--quick`` (a smoke run of a few minutes on a 2-core machine; its numbers
are not README figures); without it every script runs its full mode, which is what README.md's figures come
from (then ``python benchmarks/readme_figures.py --write``). ``--jobs N`` runs N scripts at once (default 1:
timings are only comparable when nothing else runs). A dirty tree (``git status --porcelain`` not empty,
ignoring benchmarks/results/) is refused (exit 2) unless ``--allow-dirty``.
Exit status: 0 when every benchmark wrote its JSON, 1 otherwise (the failures are listed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

# name -> script; the name is also the JSON's (benchmarks/results/<name>.json)
BENCHMARKS = {
    "ig_quality": "bench_ig_quality.py",
    "ig_cost": "bench_ig_cost.py",
    "rgap": "bench_rgap.py",
    "layerwise": "bench_layerwise.py",
    "tensor": "bench_tensor.py",
    "trained": "bench_trained.py",
    "risk": "bench_risk.py",
    "optim": "bench_optim.py",
    "malicious": "bench_malicious.py",
    "defenses": "bench_defenses.py",
    "audit": "bench_audit.py",
    "throughput": "bench_throughput.py",
    "paths": "bench_paths.py",
    "threads": "bench_threads.py",
    "modern": "bench_modern.py",
}

ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def available() -> dict[str, str]:
    """The benchmarks whose script exists in this tree (bench_optim.py may not be there yet)."""
    return {n: s for n, s in BENCHMARKS.items() if (HERE / s).exists()}


def _run_one(name: str, script: str, flags: list[str], python: str) -> tuple[str, int, float, str]:
    cmd = [python, str(Path("benchmarks") / script), *flags]
    path = common.RESULTS_DIR / f"{name}.json"
    before = path.stat().st_mtime_ns if path.exists() else None
    t = time.perf_counter()
    log = HERE / "results" / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=common.ROOT, env={**os.environ, **ONE_THREAD}, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    sec = time.perf_counter() - t
    problem = ""
    if rc != 0:
        problem = f"exit status {rc} (log: {log.relative_to(common.ROOT)})"
    elif not path.exists() or path.stat().st_mtime_ns == before:
        problem = f"did not write {path.relative_to(common.ROOT)}"
    else:
        try:
            prov = common.load(name)["provenance"]
            if not prov.get("commit"):
                problem = "its JSON has no commit"
        except (KeyError, ValueError) as e:
            problem = f"its JSON has no provenance ({e!r}): the script must use benchmarks/common.py"
    return name, rc, sec, problem


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="each script's --quick (smoke run, not README figures)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--jobs", type=int, default=1, help="scripts run at once (default 1)")
    ap.add_argument("--allow-dirty", action="store_true", help="run on a tree with uncommitted changes")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    have = available()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(have)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; expected some of {','.join(BENCHMARKS)}")
    absent = [n for n in names if n not in have]
    if absent:
        ap.error(f"no script for {absent} in benchmarks/ ({', '.join(BENCHMARKS[n] for n in absent)})")
    common.refuse_if_dirty(args.allow_dirty, "benchmarks/run.py")
    flags = (["--quick"] if args.quick else []) + (["--allow-dirty"] if args.allow_dirty else [])
    print(f"running {', '.join(names)} ({'quick' if args.quick else 'full'} mode, {args.jobs} at once)", flush=True)
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_run_one, n, have[n], flags, sys.executable) for n in names]
        for f in futures:
            name, rc, sec, problem = f.result()
            print(f"{name:11s} {'FAILED: ' + problem if problem else 'ok'}  ({sec:.0f} s)", flush=True)
            if problem:
                failed.append(name)
    if failed:
        print(f"{len(failed)} benchmark(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
