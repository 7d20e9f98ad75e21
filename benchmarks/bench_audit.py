"""Wall time of `gradleak audit --budget quick` against the same jobs run one by one through `gradleak attack`.

Setting (issue 12): the DLG LeNet on the bundled photos (8 in the full mode, 2 with --quick), defenses none,
prune 0.9 and Gaussian noise sigma 0.01, the quick budget, every applicable attack (``--attacks auto``) under the
default threat model. Ways to run the same jobs, each a fresh process timed from outside:
  audit-w1   `gradleak audit --workers 1` (in-process; the jobs of one optimisation attack, defense and batch
             size as batched groups, the default)
  audit-w1-nobatch   the same with `--no-batch` (every job alone)
  audit-w2, audit-w2-nobatch   `--workers 2` (the local process pool; groups are split so both workers work)
  attack-seq the audit's jobs as separate `gradleak attack` commands, one after another (each pays python and
             torch start-up, as a shell loop would)
The audit's verdict and each job's PSNR are recorded too: grouped vs alone (same process count) agree up to
the batched kernels' rounding (float32 here), the rest exactly (same seeds).

Run:  python benchmarks/bench_audit.py [--quick] [--allow-dirty]
Writes benchmarks/results/audit.json with its provenance (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

DEFENSES = ["none", "prune:ratio=0.9", "noise:sigma=0.01"]


def _gradleak(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "gradleak.cli", *args], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"gradleak {shlex.join(args)} failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    return dt, p


def audit_args(n: int, out: Path, workers: int, batch: bool = True) -> list[str]:
    a = ["audit", "--model", "lenet", "--num-images", str(n), "--budget", "quick", "--workers", str(workers),
         "--out", str(out), "--json"] + ([] if batch else ["--no-batch"])
    for d in DEFENSES:
        a += ["--defense", d]
    return a


def attack_args(cfg: dict, out: Path) -> list[str]:
    a = ["attack", "--attack", cfg["attack"], "--model", cfg["model"], "--num-images", str(cfg["num_images"]),
         "--start", str(cfg["start"]), "--seed", str(cfg["seed"]), "--dtype", cfg["dtype"], "--out", str(out), "--json"]
    if not cfg["labels_known"]:
        a.append("--unknown-labels")
    if cfg.get("preset"):
        a += ["--preset", cfg["preset"]]
    for k, v in (cfg.get("attack_options") or {}).items():
        a += ["--option", f"{k}={v}"]
    for d in cfg.get("defenses") or []:
        a += ["--defense", d]
    return a


def main():
    ap = common.add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--quick", action="store_true", help="2 photos instead of 8")
    args = ap.parse_args()
    run = common.begin("audit", args)
    n = 2 if args.quick else 8
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = {}
        for workers in (1, 2):
            for batch in (True, False):  # grouped and alone side by side, at the same process count
                name = f"audit-w{workers}" + ("" if batch else "-nobatch")
                out = tmp / name
                dt, _ = _gradleak(audit_args(n, out, workers, batch))
                doc = json.loads((out / "audit.json").read_text())
                docs[name] = doc
                rows[name] = {"seconds": dt, "jobs": len(doc["jobs"]),
                              "failed": sum(j["status"] == "failed" for j in doc["jobs"]),
                              "errors": sorted({j["error"] for j in doc["jobs"] if j["error"]}),
                              "grouped_jobs": sum(bool((j.get("group") or {}).get("batched")) for j in doc["jobs"]),
                              "groups_fell_back": sum(bool((j.get("group") or {}).get("fallback"))
                                                      for j in doc["jobs"])}
                print(f"audit --workers {workers}{'' if batch else ' --no-batch'}: {dt:.1f} s for "
                      f"{len(doc['jobs'])} jobs ({rows[name]['grouped_jobs']} in batched groups)", flush=True)
        grouping = {}
        for workers in (1, 2):
            g, a = docs[f"audit-w{workers}"], docs[f"audit-w{workers}-nobatch"]
            alone = {j["id"]: j for j in a["jobs"]}
            per_job = {j["id"]: (None if j["psnr"] is None or alone[j["id"]]["psnr"] is None
                                 else j["psnr"] - alone[j["id"]]["psnr"])
                       for j in g["jobs"] if (j.get("group") or {}).get("batched")}
            diffs = [abs(v) for v in per_job.values() if v is not None]
            grouping[f"w{workers}"] = {
                "seconds_grouped": rows[f"audit-w{workers}"]["seconds"],
                "seconds_alone": rows[f"audit-w{workers}-nobatch"]["seconds"],
                "speedup": rows[f"audit-w{workers}-nobatch"]["seconds"] / rows[f"audit-w{workers}"]["seconds"],
                "grouped_jobs": len(per_job), "max_abs_psnr_difference_db": max(diffs) if diffs else None,
                "psnr_difference_db_per_grouped_job": per_job,
                "same_verdict": [v["status"] for v in g["verdict"]] == [v["status"] for v in a["verdict"]]}
            print(f"workers {workers}: grouped {grouping[f'w{workers}']['seconds_grouped']:.1f} s vs alone "
                  f"{grouping[f'w{workers}']['seconds_alone']:.1f} s; max |dPSNR| over {len(per_job)} grouped jobs "
                  f"{grouping[f'w{workers}']['max_abs_psnr_difference_db']}", flush=True)
        t_seq = 0.0
        seq_psnr = {}
        for j in docs["audit-w1"]["jobs"]:
            if j["status"] != "done":  # a failed job has no run directory to repeat (its error is in audit.json)
                continue
            cfg = json.loads((tmp / "audit-w1" / j["dir"] / "config.json").read_text())
            dt, p = _gradleak(attack_args(cfg, tmp / "seq" / j["id"]))
            t_seq += dt
            seq_psnr[j["id"]] = json.loads(p.stdout.strip().splitlines()[-1])["psnr"]
        rows["attack-seq"] = {"seconds": t_seq, "jobs": len(seq_psnr), "failed": 0}
        print(f"gradleak attack x {len(seq_psnr)}: {t_seq:.1f} s", flush=True)
        agree = {}
        for name, doc in docs.items():
            diffs = [abs((j["psnr"] or 0) - (seq_psnr.get(j["id"]) or 0)) for j in doc["jobs"] if j["id"] in seq_psnr]
            agree[name] = max(diffs) if diffs else None
        verdict = [{k: v[k] for k in ("defense", "status", "worst_psnr", "worst_attack", "recognisable", "images")}
                   for v in docs["audit-w1"]["verdict"]]
    common.finish(run, {"mode": "quick" if args.quick else "full", "setting": {
        "model": "lenet", "images": n, "defenses": DEFENSES, "budget": "quick", "attacks": "auto"},
        "rows": rows, "grouped_vs_alone": grouping, "max_psnr_difference_vs_sequential_attack": agree,
        "verdict": verdict})


if __name__ == "__main__":
    main()
