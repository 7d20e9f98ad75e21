"""``report.html`` of an audit: ONE self-contained page (images embedded as PNG data URIs, inline CSS, no
script, no external address) written from the audit.json dict and the files it names.

The page reads, in order: the verdict per defense (with the thresholds and why), the threat model in words,
the defenses (ε, δ, utility) and the privacy-utility frontier, the risk analyses, the best reconstruction per
image beside its truth, PSNR/SSIM per image and attack, convergence curves, skipped attacks, failed jobs,
warnings, cost, the environment and the command that re-runs the audit. A job whose run directory is
missing or unreadable is shown without its images (the page says why); it never stops the page.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from ..report.figures import convergence_png, frontier_png, image_uint8, png_bytes, png_data_uri
from ..report.jsonable import to_jsonable
from .verdict import best_per_image
from .verdict import json_number as _num
from .schema import (JOB_STATUSES, RECOGNISABLE_PSNR_DB, RECOGNISABLE_SSIM, SCORED_STATUSES,
                     THRESHOLD_JUSTIFICATION, VERDICT_STATUSES, threshold_rule)

SERVER_KNOWS = {  # threat_model.server_knows keys, in words
    "parameters": "the model's parameters at the time of the update",
    "labels": "the labels of the client's batch",
    "batch_size": "the number of examples in the client's batch",
    "bn_statistics": "the BatchNorm statistics of the client's batch",
    "local_hyperparameters": "the client's local training settings (steps, learning rate, local batch size)",
}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2329;max-width:1180px;margin:0 auto;
padding:1.5em 2em 4em;line-height:1.45;font-size:15px}
h1{font-size:1.7em;margin:.2em 0 .1em}h2{font-size:1.3em;border-bottom:2px solid #d5dbe1;padding-bottom:.15em;
margin-top:2em}h3{font-size:1.05em;margin:1.2em 0 .4em}
.meta{color:#5b6770;margin:0 0 1em}.note{color:#5b6770;font-size:.92em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.92em;max-width:100%}
th,td{border:1px solid #d5dbe1;padding:3px 8px;text-align:left;vertical-align:top}
td b,td code{overflow-wrap:anywhere}.na-text{color:#7a5300;font-weight:600}
th{background:#f2f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;white-space:nowrap}
.leaks{background:#fde2e1;color:#9b1c1c}.norec{background:#e3eefc;color:#1e4e8c}.incomplete{background:#eceff1;
color:#44505a}.failed{background:#fde2e1;color:#9b1c1c}.na{background:#fff4d6;color:#7a5300}
.banner{background:#fff4d6;border:1px solid #e6c15c;padding:.6em 1em;border-radius:6px;margin:1em 0}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #d5dbe1;border-radius:6px;padding:6px;
text-align:center;font-size:.8em;background:#fafbfc}
.card .pair{display:flex;gap:4px;justify-content:center}
img.px{height:80px;width:auto;image-rendering:pixelated;image-rendering:crisp-edges;border:1px solid #c4ccd3}
img.sm{height:44px;width:auto;image-rendering:pixelated;image-rendering:crisp-edges;border:1px solid #c4ccd3}
img.plot{max-width:100%;border:1px solid #e3e7eb}
.missing{display:inline-block;height:80px;min-width:80px;line-height:1.2;padding:4px;box-sizing:border-box;
border:1px dashed #aab4bd;color:#5b6770;font-size:.85em}
pre{background:#f2f4f6;padding:.6em 1em;border-radius:6px;white-space:pre-wrap;word-break:break-all}
ul.tight{margin:.3em 0;padding-left:1.3em}
"""


# ---- small formatting helpers -----------------------------------------------------------------------------
def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _f(v, digits: int = 2, unit: str = "") -> str:
    x = _num(v)
    if x is None:
        return "&ndash;" if v is None else _e(v)
    return f"{x:.{digits}f}{unit}"


def _pct(v) -> str:
    x = _num(v)
    return "&ndash;" if x is None else f"{100 * x:.0f}%"


def _g(v) -> str:
    x = _num(v)
    return "&ndash;" if x is None else f"{x:.3g}"


def _table(head: list[str] | None, rows: list[list[str]], num_cols: tuple[int, ...] = ()) -> str:
    """An HTML table (``head`` None: no header row); ``head`` is escaped here, cells are HTML already."""
    h = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in num_cols else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{h}{body}</table>"


def _img(uri: str, alt: str, cls: str = "px") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{_e(alt)}" title="{_e(alt)}">'


def _missing(why: str) -> str:
    return f'<span class="missing">{_e(why)}</span>'


def _dict(d) -> dict:
    return d if isinstance(d, dict) else {}


def _list(v) -> list:
    return v if isinstance(v, list) else []


# ---- the files an audit names -----------------------------------------------------------------------------
class _Files:
    """Reads the truth and each job's reconstruction once; every problem becomes a note, never an exception."""

    def __init__(self, audit_dir: Path, audit: dict):
        self.dir = audit_dir
        self.notes: list[str] = []
        self.start = int(_dict(audit.get("data")).get("start") or 0)
        self.truth = self._load(_dict(audit.get("data")).get("truth") or "truth.safetensors", "the truth")
        self._jobs: dict[str, tuple[list | None, str]] = {}

    def _load(self, rel: str, what: str):
        from safetensors.torch import load_file

        p = self.dir / rel
        if not p.is_file():
            self.notes.append(f"{what} ({rel}) is missing: its images are not shown")
            return None
        try:
            return load_file(str(p)).get("inputs")
        except Exception as e:  # a truncated or foreign file: the page says so and goes on
            self.notes.append(f"{what} ({rel}) cannot be read ({type(e).__name__}: {e}): its images are not shown")
            return None

    def truth_uri(self, image: int) -> str | None:
        i = image - self.start
        if self.truth is None or not 0 <= i < self.truth.shape[0]:
            return None
        return png_data_uri(png_bytes(image_uint8(self.truth[i])))

    def job_images(self, job: dict) -> tuple[list | None, str]:
        """(one data URI per image of ``job["images"]`` (aligned to the truth; None where unmatched), or None,
        and the reason there are none)."""
        jid = str(job.get("id"))
        if jid in self._jobs:
            return self._jobs[jid]
        self._jobs[jid] = out = self._read_job(job)
        return out

    def _read_job(self, job: dict) -> tuple[list | None, str]:
        from safetensors.torch import load_file

        rel = job.get("dir")
        if job.get("status") not in SCORED_STATUSES:
            return None, f"job {job.get('status') or 'not run'}"
        if not rel:
            return None, "no run directory recorded"
        d = self.dir / str(rel)
        if not d.is_dir():
            self.notes.append(f"job {job.get('id')}: its run directory {rel} is missing, so its images are not shown")
            return None, "run directory missing"
        try:
            rec = load_file(str(d / "reconstruction.safetensors"))["inputs"]
            metrics = json.loads((d / "metrics.json").read_text())
        except Exception as e:
            self.notes.append(f"job {job.get('id')}: cannot read its reconstruction ({type(e).__name__}: {e})")
            return None, "reconstruction unreadable"
        order = metrics.get("order")
        n = len(_list(job.get("images")))
        if not isinstance(order, list) or len(order) != n:
            self.notes.append(f"job {job.get('id')}: metrics.json has no alignment of the reconstruction to the "
                              f"truth ('order'), so its images are not shown")
            return None, "no alignment"
        uris = []
        for k in order:
            ok = isinstance(k, int) and not isinstance(k, bool) and 0 <= k < rec.shape[0]
            uris.append(png_data_uri(png_bytes(image_uint8(rec[k]))) if ok else None)
        return uris, ""


# ---- the sections -----------------------------------------------------------------------------------------
def _thresholds(audit: dict) -> tuple[float, float, str, str, bool]:
    t = _dict(audit.get("thresholds"))
    psnr, ssim = _num(t.get("recognisable_psnr_db")), _num(t.get("recognisable_ssim"))
    recorded = psnr is not None and ssim is not None
    psnr = RECOGNISABLE_PSNR_DB if psnr is None else psnr
    ssim = RECOGNISABLE_SSIM if ssim is None else ssim
    return (psnr, ssim, str(t.get("rule") or threshold_rule(psnr, ssim)),
            str(t.get("justification") or THRESHOLD_JUSTIFICATION), recorded)


_BADGE = {"leaks": "leaks", "no recognisable image": "norec", "incomplete": "incomplete"}


def _badge(status) -> str:
    return f'<span class="badge {_BADGE.get(status, "incomplete")}">{_e(status or "unknown")}</span>'


def _verdict(audit: dict) -> str:
    psnr_t, ssim_t, rule, why, recorded = _thresholds(audit)
    rows = []
    for v in _list(audit.get("verdict")):
        v = _dict(v)
        where = ""
        if v.get("worst_attack") is not None:
            where = f"{_e(v.get('worst_attack'))}, image #{_e(v.get('worst_image'))}"
        rows.append([f"<b>{_e(v.get('label') or v.get('defense'))}</b>", _badge(v.get("status")),
                     _f(v.get("worst_psnr"), 2, " dB"), _f(v.get("worst_ssim"), 3), where or "&ndash;",
                     f"{_e(v.get('recognisable'))} of {_e(v.get('images'))} ({_pct(v.get('share_recognisable'))})",
                     f"{_e(v.get('jobs_done'))} done, {_e(v.get('jobs_failed'))} failed", _e(v.get("statement"))])
    table = (_table(["defense", "status", "worst-case PSNR", "worst-case SSIM", "by (attack, image)",
                     "recognisable images", "jobs", "in one sentence"], rows, (2, 3))
             if rows else "<p><b>No verdict was recorded</b> (no job finished).</p>")
    src = "" if recorded else " (the defaults of this gradleak version: audit.json records no thresholds)"
    statuses = "".join(f"<li>{_badge(k)} {_e(m)}</li>" for k, m in VERDICT_STATUSES.items())
    return f"""<h2 id="verdict">Verdict</h2>{table}
{_recognisable_lines(audit, psnr_t, ssim_t)}
<p><b>Thresholds</b>{_e(src)}: {_e(rule)}.</p>
<p class="note">{_e(why)}</p>
<p class="note"><b>Worst case</b> means the best reconstruction any attack got: for each image, the highest
PSNR (and, separately, SSIM) over every attack and batch size that ran against that defense; the worst-case
figure of a defense is the highest of those over its images. The attacks ran at this audit's budget; a
stronger budget or attack can only do as well or better.</p>
<ul class="tight note">{statuses}</ul>"""


def _yes(v) -> str:
    return "yes" if v is True else ("no" if v is False else "not recorded")


def _threat(audit: dict) -> str:
    tm = _dict(audit.get("threat_model"))
    knows = _dict(tm.get("server_knows"))
    rows = [[_e(SERVER_KNOWS.get(k, k)), _yes(knows.get(k))] for k in (*SERVER_KNOWS, *[k for k in knows
                                                                                     if k not in SERVER_KNOWS])]
    rows.append(["may modify the model it sends (a malicious server)", _yes(tm.get("may_modify_model"))])
    assume = "".join(f"<li>{_e(a)}</li>" for a in _list(tm.get("assumptions"))) or "<li>none recorded</li>"
    optim = "".join(f"<li>{_e(a)}</li>" for a in _list(tm.get("optimistic_for_attacker"))) or "<li>none recorded</li>"
    m, d, p = _dict(audit.get("model")), _dict(audit.get("data")), _dict(audit.get("protocol"))
    weights = m.get("weights") or "none given (the model's seeded initialisation)"
    setup = [["model", f"{_e(m.get('name'))} ({_e(m.get('parameters'))} parameters, input {_e(m.get('input_shape'))}, "
                       f"{_e(m.get('num_classes'))} classes{', options ' + _e(json.dumps(m.get('options'))) if m.get('options') else ''})"],
             ["weights", _e(weights)],
             ["data", f"{_e(d.get('num_images'))} images of {_e(d.get('source'))} from index {_e(d.get('start'))}, "
                      f"shape {_e(d.get('shape'))}, labels {_e(d.get('labels'))}"],
             ["protocol", _e(p.get("name")) + (f", {_e(p.get('local_steps'))} local steps at lr {_e(p.get('local_lr'))}, "
                                               f"local batch {_e(p.get('local_batch_size') or 'the whole batch')}"
                                               if p.get("name") == "fedavg" else " (one gradient of the batch)")],
             ["batch sizes", _e(", ".join(str(b) for b in _list(audit.get("batch_sizes"))))]]
    b = _dict(audit.get("budget"))
    per = _dict(b.get("per_attack"))
    budget = "; ".join(f"{_e(a)}: {_e(', '.join(f'{k}={v}' for k, v in _dict(o).items()) or 'its defaults')}"
                       for a, o in per.items())
    setup.append(["budget", f"{_e(b.get('name'))}" + (f" ({budget})" if budget else "")])
    return f"""<h2 id="threat">Threat model: {_e(tm.get('title') or tm.get('name'))}</h2>
<p>Preset <b>{_e(tm.get('name'))}</b>{' (SoK: ' + _e(tm.get('sok')) + ')' if tm.get('sok') else ''}:
{_e(tm.get('description'))}</p>
<h3>What the server knows</h3>{_table(['fact', 'known to the server'], rows)}
<h3>Assumptions every result below relies on</h3><ul class="tight">{assume}</ul>
<h3>Assumptions that favour the attacker</h3><p class="note">A real server may not have these; where it does
not, the figures below overstate what it recovers.</p><ul class="tight">{optim}</ul>
<h3>The deployment audited</h3>{_table(None, setup)}"""


def _utility_of(d: dict) -> dict | None:
    u = d.get("utility")
    return u if isinstance(u, dict) else None


def _frontier_points(audit: dict) -> list[tuple[str, float, float | None, float | None]]:
    """(label, accuracy drop, worst PSNR, share recognisable) of every defense with a measured utility (no
    defense is at drop 0 by definition when utility was measured at all)."""
    if not any(_utility_of(_dict(d)) for d in _list(audit.get("defenses"))):
        return []
    verdict = {_dict(v).get("defense"): _dict(v) for v in _list(audit.get("verdict"))}
    pts = []
    for d in _list(audit.get("defenses")):
        d = _dict(d)
        u = _utility_of(d)
        drop = _num(_dict(u).get("accuracy_drop"))
        if drop is None and d.get("spec") == "none":
            drop = 0.0
        if drop is None:
            continue
        v = verdict.get(d.get("spec"), {})
        pts.append((str(d.get("label") or d.get("spec")), drop, _num(v.get("worst_psnr")),
                    _num(v.get("share_recognisable"))))
    return pts


def _defenses(audit: dict) -> str:
    verdict = {_dict(v).get("defense"): _dict(v) for v in _list(audit.get("verdict"))}
    baseline = next((_num(u.get("baseline_accuracy")) for u in map(_utility_of, map(_dict, _list(audit.get("defenses"))))
                     if u and _num(u.get("baseline_accuracy")) is not None), None)
    rows = []
    for d in _list(audit.get("defenses")):
        d = _dict(d)
        u = _utility_of(d)
        v = verdict.get(d.get("spec"), {})
        eps = (f"{_g(d.get('epsilon'))}" if d.get("epsilon") is not None else "no accounting")
        if u and _num(u.get("epsilon")) is not None:  # the utility run's own accounting (all its rounds)
            eps += f"<br>{_g(u.get('epsilon'))} over the training run"
        delta = _g(d.get("delta")) if d.get("delta") is not None else "&ndash;"
        if u is None and d.get("spec") == "none" and baseline is not None:
            acc, drop = f"{_pct(baseline)} (the baseline)", "0 (by definition)"
        elif u:
            acc = f"{_pct(u.get('baseline_accuracy'))} &rarr; {_pct(u.get('accuracy'))}" + (
                f"<br><span class=\"note\">{_e(u.get('run'))}</span>" if u.get("run") else "")
            drop = f"{100 * _num(u.get('accuracy_drop')):+.1f} pp" if _num(u.get("accuracy_drop")) is not None else "&ndash;"
        else:
            acc, drop = "not measured", "&ndash;"
        rows.append([f"<b>{_e(d.get('label'))}</b>", f"<code>{_e(d.get('spec'))}</code>", eps, delta,
                     _e(d.get("accounting") or ""), acc, drop, _f(v.get("worst_psnr"), 2, " dB"),
                     _pct(v.get("share_recognisable"))])
    out = ['<h2 id="defenses">Defenses, privacy accounting and utility</h2>',
           _table(["defense", "spec", "ε", "δ", "accounting", "accuracy (no defense → defended)", "accuracy drop",
                   "worst-case PSNR", "recognisable"], rows, (2, 3, 6, 7, 8)),
           '<p class="note">ε and δ are the (ε, δ)-DP guarantee a defense\'s accountant gives for the stated rounds '
           'and sampling rate; a defense without accounting has none (its protection is only what the attacks '
           'below measure). Accuracy is measured by a seeded federated training run with the defense applied to '
           'every client update, beside the same run without it.</p>']
    pts = _frontier_points(audit)
    if pts:
        psnr_t = _thresholds(audit)[0]
        settings = _dict(_dict(audit.get("utility")).get("settings"))
        where = ", ".join(f"{k} {v}" for k, v in settings.items() if k in ("rounds", "clients", "local_steps",
                                                                            "local_batch_size", "split"))
        ds = _dict(audit.get("utility")).get("dataset")
        out.append(f'<h3>Privacy-utility frontier</h3><img class="plot" id="frontier" src="{png_data_uri(frontier_png(pts, psnr_t))}" '
                   f'alt="privacy-utility frontier">'
                   f'<p class="note">Utility from federated training{" on " + _e(ds) if ds else ""}'
                   f'{" (" + _e(where) + ")" if where else ""}.</p>')
    else:
        out.append('<p class="note">Utility was not measured in this audit (run it with <code>--utility</code> '
                   'for the accuracy cost of each defense and the privacy-utility frontier).</p>')
    return "\n".join(out)


def _risk(audit: dict) -> str:
    entries = [_dict(r) for r in _list(audit.get("risk"))]
    batch = any("batch_size" in r for r in entries)
    rows = []
    for r in entries:
        if r.get("applies") is True:
            finding = _e(r.get("summary") or "applies (no summary recorded)")
        else:
            finding = f'<span class="na-text">did not apply:</span> {_e(r.get("reason") or "no reason recorded")}'
        name = f"<b>{_e(r.get('analysis'))}</b>" + (f"<br><span class=\"note\">{_e(r['title'])}</span>"
                                                    if r.get("title") else "")
        rows.append([name] + ([_e(r.get("batch_size"))] if batch else []) + [finding])
    table = (_table(["analysis"] + (["batch"] if batch else []) + ["finding"], rows) if rows
             else "<p>No risk analysis ran.</p>")
    return f"""<h2 id="risk">Risk analyses</h2>
<p class="note">A risk analysis predicts leakage from the model and the update without attacking. One that
did not apply says nothing either way about this deployment: it is not evidence of protection. The attacks
below are the evidence.</p>{table}"""


def _scored(audit: dict) -> list[dict]:
    return [_dict(j) for j in _list(audit.get("jobs")) if _dict(j).get("status") in SCORED_STATUSES]


def _per_image(job: dict, key: str) -> list:
    v = _list(job.get(key))
    n = len(_list(job.get("images")))
    return v if len(v) == n else [None] * n


def _defense_order(audit: dict) -> list[tuple[str, str]]:
    seen = {}
    for d in _list(audit.get("defenses")):
        d = _dict(d)
        seen.setdefault(str(d.get("spec")), str(d.get("label") or d.get("spec")))
    for j in _list(audit.get("jobs")):
        seen.setdefault(str(_dict(j).get("defense")), str(_dict(j).get("defense")))
    return list(seen.items())


def _all_images(audit: dict) -> list[int]:
    d = _dict(audit.get("data"))
    if isinstance(d.get("num_images"), int):
        start = int(d.get("start") or 0)
        return list(range(start, start + d["num_images"]))
    return sorted({i for j in _list(audit.get("jobs")) for i in _list(_dict(j).get("images"))})


def _recognisable_lines(audit: dict, psnr_t: float, ssim_t: float) -> str:
    """Which images are recognisable under each defense, and by which threshold (from the jobs' per-image
    scores); a count that differs from the verdict's is said, not hidden."""
    verdict = {_dict(v).get("defense"): _dict(v) for v in _list(audit.get("verdict"))}
    items = []
    for spec, label in _defense_order(audit):
        why = []
        for img, b in sorted(best_per_image(_list(audit.get("jobs")), spec).items()):
            p, s = b["psnr"], b["ssim_best"]
            hit = ([f"PSNR {p:.1f} dB"] if p is not None and p >= psnr_t else []) + (
                [f"SSIM {s:.2f}"] if s is not None and s >= ssim_t else [])
            if hit:
                why.append(f"#{img} ({' and '.join(hit)})")
        n = verdict.get(spec, {}).get("recognisable")
        differs = (f" (the verdict counts {n}; the jobs' per-image scores give {len(why)})"
                   if isinstance(n, int) and n != len(why) else "")
        if why or differs:
            items.append(f"<li><b>{_e(label)}</b>: {_e(', '.join(why) or 'none')}{_e(differs)}</li>")
    return f'<p>Recognisable images:</p><ul class="tight">{"".join(items)}</ul>' if items else ""


def _grid(audit: dict, files: _Files) -> str:
    out = ['<h2 id="grid">Best reconstruction per image</h2><p class="note">For each defense and image: the truth '
           '(left) beside the reconstruction with the highest PSNR over every attack and batch size (right).</p>']
    images = _all_images(audit)
    for spec, label in _defense_order(audit):
        bests = best_per_image(_list(audit.get("jobs")), spec)
        jobs = {_dict(j).get("id"): _dict(j) for j in _scored(audit)}
        cards = []
        for img in images:
            best = bests.get(img)
            best = None if best is None or best["psnr"] is None else (best["psnr"], jobs[best["job"]], best["position"])
            t = files.truth_uri(img)
            truth = _img(t, f"truth #{img}") if t else _missing("truth not available")
            if best is None:
                rec, cap = _missing("no finished attack"), "no reconstruction"
            else:
                p, j, k = best
                uris, why = files.job_images(j)
                uri = uris[k] if uris else None
                rec = _img(uri, f"{j.get('attack')} #{img}") if uri else _missing(why or "image unmatched")
                s = _num(_per_image(j, "ssim_per_image")[k])
                cap = (f"{_e(j.get('attack'))} (batch {_e(j.get('batch_size'))})<br><b>{p:.1f} dB</b>"
                       + (f", SSIM {s:.2f}" if s is not None else ""))
            cards.append(f'<div class="card"><div class="pair">{truth}{rec}</div>#{_e(img)}: {cap}</div>')
        out.append(f'<h3>{_e(label)}</h3><div class="cards">{"".join(cards)}</div>')
    return "\n".join(out)


def _scores(audit: dict, files: _Files) -> str:
    out = ['<h2 id="scores">PSNR / SSIM per image and per attack</h2>']
    images = _all_images(audit)
    for spec, label in _defense_order(audit):
        jobs = [j for j in _list(audit.get("jobs")) if str(_dict(j).get("defense")) == spec]
        cols = list(dict.fromkeys((str(j.get("attack")), j.get("batch_size")) for j in jobs))
        if not cols:
            continue
        rows = []
        for img in images:
            row = [f"#{_e(img)}"]
            for a, b in cols:
                cell = "&ndash;"
                for j in jobs:
                    if j.get("attack") == a and j.get("batch_size") == b and img in _list(j.get("images")):
                        if j.get("status") not in SCORED_STATUSES:
                            cell = f'<span class="badge failed">{_e(j.get("status"))}</span>'
                            break
                        k = _list(j.get("images")).index(img)
                        uris, _ = files.job_images(j)
                        thumb = _img(uris[k], f"{a} #{img}", "sm") + " " if uris and uris[k] else ""
                        cell = (f"{thumb}{_f(_per_image(j, 'psnr_per_image')[k], 1, ' dB')} / "
                                f"{_f(_per_image(j, 'ssim_per_image')[k], 3)}")
                        break
                row.append(cell)
            rows.append(row)
        out.append(f"<h3>{_e(label)}</h3>" + _table(["image"] + [f"{a} (batch {b})" for a, b in cols], rows))
    jrows = [[f"<code>{_e(j.get('id'))}</code>", _e(j.get("attack")), _e(j.get("defense")), _e(j.get("batch_size")),
              _e(", ".join(str(i) for i in _list(j.get("images")))), _e(j.get("status")), _f(j.get("psnr"), 2),
              _f(j.get("ssim"), 3), _g(j.get("residual")), _e(j.get("kind") or ""), _f(j.get("seconds"), 1)]
             for j in map(_dict, _list(audit.get("jobs")))]
    out.append("<h3>Every job</h3>" + _table(["job", "attack", "defense", "batch", "images", "status", "PSNR (dB)",
                                              "SSIM", "residual", "kind", "seconds"], jrows, (6, 7, 8, 10)))
    out.append('<p class="note">PSNR and SSIM per job are over its batch, after matching each reconstruction to '
               'its truth image. The residual is the gradient-matching distance of the reconstruction (lower: the '
               'attack explains the observed update better). ' +
               " ".join(f"<i>{_e(k)}</i>: {_e(v)}." for k, v in JOB_STATUSES.items()) + "</p>")
    out.append(_batched_note(audit))
    return "\n".join(out)


def _batched_note(audit: dict) -> str:
    """Which jobs ran in batched groups, and what a rerun of one alone shares with it (per attack)."""
    jobs = [_dict(j) for j in _list(audit.get("jobs"))]
    grouped = [j for j in jobs if _dict(j.get("group")).get("batched") is True]
    if not grouped:
        return ""
    claims = {str(j.get("attack")): str(j["batched_paths"]) for j in grouped if j.get("batched_paths")}
    per = " ".join(f"<i>{_e(a)}</i>: {_e(c)}." for a, c in claims.items())
    return (f'<p class="note">{len(grouped)} of {len(jobs)} jobs ran in batched groups (their trials with those '
            "of other jobs of the same attack, defense and batch size as one computation; audit.json "
            "<code>jobs[].group</code>). Against the same job run alone (<code>--no-batch</code>, or "
            f"<code>gradleak attack</code>): {per}</p>")


def _curves(audit: dict) -> str:
    by_attack: dict[str, list[tuple[str, list[float]]]] = {}
    for j in _scored(audit):
        h = [x for x in (_num(v) for v in _list(j.get("history"))) if x is not None and math.isfinite(x)]
        if h:
            by_attack.setdefault(str(j.get("attack")), []).append(
                (f"{j.get('defense')} b{j.get('batch_size')} #{','.join(str(i) for i in _list(j.get('images')))}", h))
    head = '<h2 id="curves">Convergence</h2>'
    if not by_attack:
        return head + "<p>No job recorded an objective history (closed-form attacks have none).</p>"
    no_hist = sorted({str(j.get("attack")) for j in _scored(audit)} - set(by_attack))
    extra = (f'<p class="note">Without a recorded history: {_e(", ".join(no_hist))}.</p>' if no_hist else "")
    return (head + f'<img class="plot" src="{png_data_uri(convergence_png(by_attack))}" alt="convergence curves">'
            '<p class="note">The attack\'s objective per recorded step (at most 200 points per job, evenly '
            'downsampled). A curve still falling at its end suggests a larger budget would do better.</p>' + extra)


def _skipped(audit: dict) -> str:
    sk = [_dict(x) for x in _list(_dict(audit.get("attacks")).get("skipped"))]
    sk += [{"attack": j.get("attack"), "defense": j.get("defense"), "batch_size": j.get("batch_size"),
            "reason": f"not applicable when it ran: {j.get('error')}"}
           for j in map(_dict, _list(audit.get("jobs"))) if j.get("status") == "not applicable"]
    planned = _list(_dict(audit.get("attacks")).get("planned"))
    head = (f'<h2 id="skipped">Attacks skipped</h2><p class="note">Planned: {_e(", ".join(map(str, planned)))}. '
            "An attack is skipped where the threat model or the case does not meet what it requires.</p>")
    if not sk:
        return head + "<p>None: every planned attack ran against every defense and batch size.</p>"
    groups: dict[tuple[str, str], tuple[dict, dict]] = {}  # (attack, reason) -> (defenses, batch sizes)
    for x in sk:
        d, b = groups.setdefault((str(x.get("attack")), str(x.get("reason"))), ({}, {}))
        d[str(x.get("defense"))] = None
        b[str(x.get("batch_size"))] = None
    rows = [[_e(a), _e(", ".join(d)), _e(", ".join(b)), _e(r)] for (a, r), (d, b) in groups.items()]
    return head + _table(["attack", "defenses", "batch sizes", "reason"], rows)


def _failed(audit: dict) -> str:
    bad = [_dict(j) for j in _list(audit.get("jobs"))
           if _dict(j).get("status") not in ("done", "resumed", "not applicable")]
    head = '<h2 id="failed">Failed and unfinished jobs</h2>'
    if not bad:
        return head + "<p>None.</p>"
    rows = [[f"<code>{_e(j.get('id'))}</code>", _e(j.get("attack")), _e(j.get("defense")), _e(j.get("batch_size")),
             f'<span class="badge failed">{_e(j.get("status"))}</span>',
             _e(j.get("error") or JOB_STATUSES.get(str(j.get("status")), ""))] for j in bad]
    return (head + _table(["job", "attack", "defense", "batch", "status", "error"], rows)
            + '<p class="note">A defense with such jobs and no recognisable image is <i>incomplete</i>, not '
              'protected: rerun the same command to finish them (finished jobs are kept).</p>')


def _warnings(audit: dict, files: _Files) -> str:
    top = [str(w) for w in _list(audit.get("warnings"))]
    items = [_e(w) for w in top]
    for j in map(_dict, _list(audit.get("jobs"))):  # a job's warnings, unless audit-wide ones repeat them
        items += [f"<code>{_e(j.get('id'))}</code>: {_e(w)}" for w in _list(j.get("warnings"))
                  if f"{j.get('id')}: {w}" not in top]
    items += [f"report: {_e(n)}" for n in files.notes]
    head = '<h2 id="warnings">Warnings</h2>'
    return head + (f'<ul class="tight">{"".join(f"<li>{i}</li>" for i in items)}</ul>' if items else "<p>None.</p>")


def _cost(audit: dict) -> str:
    per: dict[str, list[float]] = {}
    for j in map(_dict, _list(audit.get("jobs"))):
        s = _num(j.get("seconds"))
        if s is not None:
            per.setdefault(str(j.get("attack")), []).append(s)
    rows = [[_e(a), str(len(v)), f"{sum(v):.1f}", f"{sum(v) / len(v):.1f}"] for a, v in per.items()]
    total = sum(sum(v) for v in per.values())
    rows.append(["<b>all jobs</b>", str(sum(len(v) for v in per.values())), f"<b>{total:.1f}</b>", "&ndash;"])
    wall = _num(audit.get("seconds"))
    return ('<h2 id="cost">Cost</h2>' + _table(["attack", "jobs with a time", "seconds (sum)", "seconds per job"],
                                                 rows, (1, 2, 3))
            + f"<p>Wall time of the whole audit: <b>{_f(wall, 1, ' s')}</b> (jobs run in parallel when there are "
              "several workers, so it can be below the sum).</p>")


def _environment(audit: dict) -> str:
    env = _dict(audit.get("environment"))
    rows: list[list[str]] = [["created", _e(audit.get("created"))],
            ["schema", f"{_e(audit.get('schema'))} version {_e(audit.get('schema_version'))}"]]
    for k, v in env.items():
        for kk, vv in (v.items() if isinstance(v, dict) else [("", v)]):  # "hardware": one row per fact
            if kk == "memory_bytes" and _num(vv) is not None:
                kk, vv = "memory", f"{_num(vv) / 2 ** 30:.1f} GiB"
            if isinstance(vv, list) and not vv:
                vv = "none"
            text = json.dumps(vv) if isinstance(vv, (dict, list)) else ("not recorded" if vv is None else vv)
            rows.append([_e(f"{k}: {kk}" if kk else k), _e(text)])
    return (f'<h2 id="environment">Environment</h2>{_table(None, rows)}'
            f'<h2 id="command">Re-run this audit</h2><pre>{_e(audit.get("command") or "no command recorded")}</pre>'
            '<p class="note">With the same output directory, finished jobs are kept and only the rest run.</p>')


def render_report_html(audit_dir: str | Path, audit: dict) -> str:
    """The page of :func:`write_report_html`, as a string."""
    audit_dir = Path(audit_dir)
    audit = to_jsonable(audit)
    files = _Files(audit_dir, audit)
    m, tm = _dict(audit.get("model")), _dict(audit.get("threat_model"))
    title = (f"gradleak privacy audit: {m.get('name') or 'model not recorded'} under "
             f"{tm.get('title') or tm.get('name') or 'a threat model not recorded'}")
    banner = ""
    if audit.get("interrupted"):
        banner = ('<div class="banner"><b>Interrupted:</b> this audit was stopped before every job ran. The page '
                  'shows what finished; rerun the command below to complete it.</div>')
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="meta">{_e(audit.get("created"))} &middot; {_e(len(_list(audit.get("jobs"))))} jobs &middot; '
            f'threat model <b>{_e(tm.get("name"))}</b> &middot; budget {_e(_dict(audit.get("budget")).get("name"))}</p>',
            banner, _verdict(audit), _threat(audit), _defenses(audit), _risk(audit)]
    sections_after = [_grid(audit, files), _scores(audit, files), _curves(audit), _skipped(audit), _failed(audit)]
    body += sections_after + [_warnings(audit, files), _cost(audit), _environment(audit)]
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report_html(audit_dir: str | Path, audit: dict) -> Path:
    """Write ``audit_dir/report.html`` from the audit.json dict ``audit`` (see docs/audit.md) and the files
    it names (``truth.safetensors``, each job's ``reconstruction.safetensors`` and ``metrics.json``), and
    return its path. The page is self-contained: it opens offline. A missing or unreadable file is reported on
    the page, not raised."""
    audit_dir = Path(audit_dir)
    page = render_report_html(audit_dir, audit)
    path = audit_dir / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


__all__ = ["write_report_html", "render_report_html"]
