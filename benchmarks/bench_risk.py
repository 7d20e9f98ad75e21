"""Rank analysis (R-GAP risk) of every model in the zoo, and the docs table.

Every registered zoo model at 3x32x32 with 10 classes (zoo seed 0), plus the R-GAP paper's MNIST-size shapes
(lenet-rgap, fcn3 at 1x28x28): verdict, per-layer deficiencies, RA-i, the layer-wise security index when that
analysis is registered, and seconds. ``gradleak.risk.analyse_architecture`` does the work (what
``gradleak risk --model NAME`` prints).

Run:  python benchmarks/bench_risk.py [--quick]
Writes benchmarks/results/risk.json and regenerates the table section of docs/risk.md (``--quick``: the first
four zoo models only, and docs/risk.md is left alone).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import gradleak as gl
from gradleak import risk

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "risk.md"
BEGIN, END = "<!-- risk-table:begin -->", "<!-- risk-table:end -->"
EXTRA = [("lenet-rgap", (1, 28, 28)), ("fcn3", (1, 28, 28))]


def analyse(name, shape):
    t = time.perf_counter()
    rep = risk.analyse_architecture(name, input_shape=shape, num_classes=10)
    sec = time.perf_counter() - t
    d = rep.to_dict()
    d["seconds"] = sec
    d["summary"] = rep.summary()
    print(f"{rep.summary()}  [{sec:.1f} s]", flush=True)
    return d


def _cell(v):
    return "-" if v is None else str(v)


def _kinds(problems) -> list[str]:
    out = []
    for p in problems:
        what = p.split("(")[1].split(")")[0] if "(" in p else ""
        kind = ("skip connections" if "skip connection" in p else "BatchNorm" if "BatchNorm" in p else
                "pooling" if "pool" in p.lower() else f"{what} not invertible" if "not invertible" in p else what)
        if kind not in out:
            out.append(kind)
    return out


def markdown(rows) -> str:
    out = ["| model | input | verdict | deficiency per layer (input side first) | RA-i | security index | s |",
           "|---|---|---|---|---|---|---|"]
    for d in rows:
        shape = "x".join(map(str, d["input_shape"]))
        if d["problems"] and all(l["deficiency"] is None for l in d["layers"]):
            defs = "not analysed"
        else:
            defs = ", ".join(f"{l['label']} {_cell(l['deficiency'])}" for l in d["layers"])
        verdict = d["verdict"]
        if verdict.startswith("not possible: R-GAP does not apply"):
            verdict = "R-GAP does not apply: " + ", ".join(_kinds(d["problems"]))
        elif "not invertible" in verdict:
            verdict = "not possible: " + ", ".join(_kinds(d["problems"]))
        out.append(f"| {d['model']} | {shape} | {verdict} | {defs} | {_cell(d['ra_index'])} | "
                   f"{_cell(d.get('security_index'))} | {d['seconds']:.1f} |")
    return "\n".join(out)


def main():
    ap = common.add_arguments(argparse.ArgumentParser())
    ap.add_argument("--quick", action="store_true", help="the first 4 zoo models; docs/risk.md is not touched")
    args = ap.parse_args()
    run_ = common.begin("risk", args)
    names = gl.models.models.names()
    rows = [analyse(n, (3, 32, 32)) for n in (names[:4] if args.quick else names)]
    if not args.quick:
        rows += [analyse(n, s) for n, s in EXTRA]
    common.finish(run_, {"results": rows})
    table = markdown(rows)
    if not args.quick and DOC.exists():
        text = DOC.read_text()
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN) + len(BEGIN)] + "\n" + table + "\n" + text[text.index(END):]
            DOC.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
