"""The audit's report page, written from a real (tiny) audit directory: real attack jobs run through
``run_attack`` into ``jobs/<id>/``, the truth saved, and an audit.json assembled by hand as docs/audit.md
specifies it."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradleak.audit.report import write_report_html
from gradleak.audit.schema import (RECOGNISABLE_PSNR_DB, RECOGNISABLE_SSIM, SCHEMA, SCHEMA_VERSION,
                                   thresholds)
from gradleak.experiment import AttackRun, run_attack
from gradleak.report.environment import environment, hardware
from gradleak.report.figures import image_uint8

ROOT = Path(__file__).resolve().parents[1]
BAD_ERROR = 'ValidationError: option <script>alert("x")</script> & "quotes" are not allowed'


def build_fixture(root: Path, *, attacks: dict[str, dict], defenses: list[str], batch_sizes: list[int],
                  num_images: int, image_size: int, model: str = "lenet", fail: set[tuple[str, str]] = frozenset(),
                  utility: dict | None = None, epsilons: dict | None = None) -> dict:
    """Run every (attack, defense, batch, chunk) job for real into ``root/jobs/<id>`` except those in
    ``fail`` (recorded as failed with :data:`BAD_ERROR`); save the truth; write and return audit.json. The job
    rows, verdicts and threat model come from the audit's own code; risk and skip texts are placeholders."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    import gradleak as gl
    from gradleak.audit.threat import threat_models
    from gradleak.audit.verdict import job_row, verdicts

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    ds = gl.data.load("samples", num_images=num_images, image_size=image_size)
    x, y = ds.batch(num_images, 0)
    save_file({"inputs": x.contiguous(), "labels": y.contiguous()}, str(root / "truth.safetensors"))
    tm = threat_models.get("informed-eavesdropper")
    jobs = []
    for attack, opts in attacks.items():
        for spec in defenses:
            for b in batch_sizes:
                for start in range(0, num_images - b + 1, b):
                    jid = f"{attack}__{spec.replace(':', '-').replace('=', '')}__b{b}__i{start}"
                    out = root / "jobs" / jid
                    planned = SimpleNamespace(id=jid, attack=attack, defense=spec, batch_size=b,
                                              images=list(range(start, start + b)), run=SimpleNamespace(out=str(out)))
                    if (attack, spec) in fail:
                        jobs.append(job_row(planned, "failed", error=BAD_ERROR, audit_dir=root))
                        continue
                    run_attack(AttackRun(attack=attack, model=model, num_images=b, start=start,
                                         image_size=image_size, attack_options=dict(opts), labels_known=tm.labels,
                                         defenses=[] if spec == "none" else [spec], out=str(out)))
                    jobs.append(job_row(planned, "done", audit_dir=root))
    th = thresholds()
    eps = epsilons or {}
    # gl.defenses.utility's rows are in the order of the defenses it was given (every one but "none")
    udefs = dict(zip([s for s in defenses if s != "none"], (utility or {}).get("defenses", [])))
    dlist = [{"spec": s, "label": "no defense" if s == "none" else s.split(":")[0], "epsilon": eps.get(s, (None, None))[0],
              "delta": eps.get(s, (None, None))[1], "accounting": "rdp" if s in eps else None,
              "utility": ({"baseline_accuracy": utility["baseline_accuracy"], "accuracy": udefs[s]["accuracy"],
                           "accuracy_drop": udefs[s]["accuracy_drop"]} if s in udefs else None)} for s in defenses]
    audit = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": "2026-12-01T15:00:00Z",
        "command": f"gradleak audit --model {model} --num-images {num_images} "
                   + " ".join(f"--defense {d}" for d in defenses) + " --budget quick --out " + str(root),
        "environment": {**environment(device="cpu", dtype="float32"), "hardware": hardware()}, "interrupted": False,
        "seconds": sum(j["seconds"] or 0 for j in jobs),
        "model": {"name": model, "options": {}, "weights": None, "parameters": 62006,
                  "input_shape": list(x.shape[1:]), "num_classes": 10},
        "settings": {"model": model, "num_images": num_images, "batch_sizes": batch_sizes, "defenses": defenses},
        "data": {"source": "samples", "num_images": num_images, "start": 0, "shape": list(x.shape[1:]),
                 "value_range": [0, 1], "truth": "truth.safetensors", "labels": y.tolist(),
                 "indices": list(range(num_images))},
        "protocol": {"name": "fedsgd", "local_steps": None, "local_lr": None, "local_batch_size": None,
                     "bn_mode": "eval"},
        "threat_model": tm.to_dict(),
        "budget": {"name": "quick", "per_attack": attacks},
        "thresholds": th,
        "defenses": dlist,
        "batch_sizes": batch_sizes,
        "attacks": {"planned": list(attacks) + ["rgap"],
                    "skipped": [{"attack": "rgap", "defense": d, "batch_size": b,
                                 "reason": "(fixture) an unmet requirement of the attack"}
                                for d in defenses for b in batch_sizes]},
        "risk": [{"analysis": "rank", "batch_size": batch_sizes[0], "applies": True, "summary": "(fixture) the one-line finding of an analysis that applies",
                  "reason": None, "detail": {}},
                 {"analysis": "rgap-security", "batch_size": batch_sizes[0], "applies": False, "summary": "",
                  "reason": "(fixture) the model has a layer the analysis' rules do not cover", "detail": {}}],
        "jobs": jobs,
        "verdict": verdicts(jobs, dlist, list(range(num_images))),
        "utility": utility,
        "warnings": [f"(fixture) batch {max(batch_sizes)}: an audit-wide warning"],
    }
    (root / "audit.json").write_text(json.dumps(audit, indent=1))
    return audit


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    build_fixture(root, attacks={"inverting-gradients": {"max_iterations": 8}, "dlg": {"max_iterations": 4}},
                  defenses=["none", "prune:ratio=0.99"], batch_sizes=[2], num_images=2, image_size=16,
                  fail={("dlg", "prune:ratio=0.99")})
    return root


def _load(root: Path) -> dict:
    return json.loads((root / "audit.json").read_text())


def _data_uri_images(page: str) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))))
            for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_every_job_image_is_embedded(audit_dir):
    from safetensors.torch import load_file

    page = write_report_html(audit_dir, _load(audit_dir)).read_text()
    embedded = _data_uri_images(page)
    audit = _load(audit_dir)
    done = [j for j in audit["jobs"] if j["status"] == "done"]
    assert len(done) == 3
    truth = load_file(str(audit_dir / "truth.safetensors"))["inputs"]
    wanted = [image_uint8(t) for t in truth]
    for j in done:
        rec = load_file(str(audit_dir / j["dir"] / "reconstruction.safetensors"))["inputs"]
        order = json.loads((audit_dir / j["dir"] / "metrics.json").read_text())["order"]
        wanted += [image_uint8(rec[k]) for k in order]
    for w in wanted:  # decoded pixel for pixel from the page's data URIs
        assert any(e.shape == w.shape and np.array_equal(e, w) for e in embedded)


def test_page_is_self_contained_and_names_the_threat_model(audit_dir):
    page = write_report_html(audit_dir, _load(audit_dir)).read_text()
    for ref in re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page, flags=re.I):
        assert ref.startswith("data:image/png;base64,"), ref
    assert not re.search(r"url\(|@import|<script|<link", page, flags=re.I)
    assert "Informed eavesdropper" in page and "informed-eavesdropper" in page and "(SoK: B)" in page
    assert f"PSNR &gt;= {RECOGNISABLE_PSNR_DB:g} dB or SSIM &gt;= {RECOGNISABLE_SSIM:g}" in page
    assert "root-mean-square error of 0.1" in page  # the justification, in words
    # the verdict comes first, the command last
    assert page.index('id="verdict"') < page.index('id="threat"') < page.index('id="risk"') < page.index('id="grid"')
    assert page.index('id="environment"') < page.index("gradleak audit --model lenet")
    env = page[page.index('id="environment"'):]
    assert "hardware: cpu" in env and "hardware: cores" in env and " GiB" in env


def test_verdict_rows_carry_the_schema_figures(audit_dir):
    audit = _load(audit_dir)
    page = write_report_html(audit_dir, audit).read_text()
    verdict = page[page.index('id="verdict"'):page.index('id="threat"')]
    for v in audit["verdict"]:
        assert f"{v['worst_psnr']:.2f} dB" in verdict
        assert f"{v['recognisable']} of {v['images']}" in verdict
        assert f">{v['status']}<" in verdict


def test_not_applicable_risk_analysis_is_never_safe(audit_dir):
    page = write_report_html(audit_dir, _load(audit_dir)).read_text()
    row = next(r for r in re.findall(r"<tr>.*?</tr>", page, flags=re.S) if "rgap-security" in r)
    text = re.sub(r"<[^>]+>", "", row)
    assert "did not apply: (fixture) the model has a layer the analysis&#x27; rules do not cover" in text
    assert "safe" not in text.lower()
    risk = page[page.index('id="risk"'):page.index('id="grid"')]
    assert "The attacks\nbelow are the evidence" in risk or "attacks below are the evidence" in " ".join(risk.split())


def test_failed_job_error_is_shown_escaped(audit_dir):
    page = write_report_html(audit_dir, _load(audit_dir)).read_text()
    assert "<script>" not in page
    assert "option &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quotes&quot; are not allowed" in page
    failed = page[page.index('id="failed"'):page.index('id="warnings"')]
    assert "dlg__prune-ratio0.99__b2__i0" in failed


def test_missing_job_directory_still_renders(audit_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(audit_dir, root)
    audit = _load(root)
    gone = next(j for j in audit["jobs"] if j["status"] == "done" and j["attack"] == "dlg")
    shutil.rmtree(root / gone["dir"])
    (root / "truth.safetensors").write_bytes(b"not a safetensors file")
    page = write_report_html(root, audit).read_text()
    assert f"job {gone['id']}: its run directory {gone['dir']} is missing" in page
    assert "truth.safetensors) cannot be read" in page
    # the other jobs' reconstructions are still embedded, and the grid says where an image is missing
    assert len(_data_uri_images(page)) >= 2 and "truth not available" in page


def test_frontier_plot_iff_utility(audit_dir, tmp_path):
    audit = _load(audit_dir)
    page = write_report_html(audit_dir, audit).read_text()
    assert 'id="frontier"' not in page and "Utility was not measured" in page
    with_u = copy.deepcopy(audit)
    with_u["utility"] = {"model": "lenet", "dataset": "digits", "settings": {"rounds": 3, "clients": 4},
                         "baseline_accuracy": 0.9, "baseline_per_round": [0.5, 0.8, 0.9],
                         "defenses": [{"defense": "prune(ratio=0.99)", "accuracy": 0.7, "accuracy_drop": 0.2,
                                       "epsilon": None, "privacy": None, "accuracy_per_round": [], "seconds": 1.0}]}
    with_u["defenses"][1]["utility"] = {"baseline_accuracy": 0.9, "accuracy": 0.7, "accuracy_drop": 0.2,
                                        "epsilon": 3.5, "privacy": None, "run": "FedAvg on digits, 3 rounds"}
    root = tmp_path / "u"
    shutil.copytree(audit_dir, root)
    page = write_report_html(root, with_u).read_text()
    assert 'id="frontier"' in page and "Utility was not measured" not in page
    defenses = page[page.index('id="defenses"'):page.index('id="risk"')]
    assert "90% &rarr; 70%" in defenses and "+20.0 pp" in defenses
    assert "3.5 over the training run" in defenses and "FedAvg on digits, 3 rounds" in defenses


def test_epsilon_is_shown_where_a_defense_has_accounting(audit_dir, tmp_path):
    audit = _load(audit_dir)
    audit["defenses"][1].update(epsilon=7.93, delta=1e-5, accounting="rdp")
    page = write_report_html(audit_dir, audit).read_text()
    row = next(r for r in re.findall(r"<tr>.*?</tr>", page, flags=re.S) if "<code>prune:ratio=0.99</code>" in r)
    assert "7.93" in row and "1e-05" in row and "rdp" in row
    row = next(r for r in re.findall(r"<tr>.*?</tr>", page, flags=re.S) if "<code>none</code>" in r)
    assert "no accounting" in row


@pytest.mark.slow
def test_headless_browser_screenshot(audit_dir, tmp_path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no system chromium (apt-get install chromium)")
    page = write_report_html(audit_dir, _load(audit_dir))
    png = tmp_path / "shot.png"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "screenshot_report.py"), str(page), str(png)],
                   check=True, timeout=180)
    from PIL import Image

    a = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert a.shape[1] == 1280 and a.std() > 10  # not a blank page: text, tables and images drawn
    assert (a < 100).mean() > 0.01  # dark pixels: text rendered


def test_every_schema_field_is_documented(audit_dir):
    doc = (ROOT / "docs" / "audit.md").read_text()
    audit = _load(audit_dir)
    fields = set(audit)
    for key in ("model", "data", "protocol", "threat_model", "budget", "thresholds", "attacks"):
        fields |= set(audit[key])
    for key in ("defenses", "risk", "jobs", "verdict"):
        fields |= {k for row in audit[key] for k in row}
    fields |= set(audit["threat_model"]["server_knows"]) | set(audit["attacks"]["skipped"][0])
    missing = sorted(f for f in fields if f"`{f}`" not in doc)
    assert not missing, f"fields of audit.json not in docs/audit.md: {missing}"
    assert f"`schema_version` is `{SCHEMA_VERSION}`" in doc
    assert f"PSNR >= {RECOGNISABLE_PSNR_DB:g} dB or SSIM >= {RECOGNISABLE_SSIM:g}" in doc


def test_bare_audit_and_exact_reconstruction_render(audit_dir, tmp_path):
    from gradleak.audit.report import render_report_html

    page = render_report_html(tmp_path, {})  # nothing recorded: the page says so instead of raising
    assert "No verdict was recorded" in page and "No risk analysis ran" in page
    audit = _load(audit_dir)
    exact = next(j for j in audit["jobs"] if j["status"] == "done" and j["defense"] == "none" and j["attack"] == "dlg")
    exact["psnr_per_image"] = ["inf", exact["psnr_per_image"][1]]  # how audit.json writes an infinite PSNR
    grid = render_report_html(audit_dir, audit)
    grid = grid[grid.index('id="grid"'):grid.index('id="scores"')]
    assert "#0: dlg (batch 2)<br><b>inf dB</b>" in grid  # the exact one is the best for image 0


def test_verdict_names_the_recognisable_images_and_flags_a_disagreeing_count(audit_dir):
    from gradleak.audit.report import render_report_html

    audit = _load(audit_dir)
    audit["thresholds"] = thresholds(psnr_db=0.0, ssim=1.0)  # every image reaches 0 dB ...
    next(v for v in audit["verdict"] if v["defense"] == "none")["recognisable"] = 0  # ... the verdict says 0
    best0 = max(p for j in audit["jobs"] if j["status"] == "done" and j["defense"] == "none"
                for i, p in zip(j["images"], j["psnr_per_image"]) if i == 0)
    page = render_report_html(audit_dir, audit)
    verdict = page[page.index('id="verdict"'):page.index('id="threat"')]
    assert f"<b>no defense</b>: #0 (PSNR {best0:.1f} dB), #1 (PSNR" in verdict
    assert "(the verdict counts 0; the jobs&#x27; per-image scores give 2)" in verdict
    assert "PSNR &gt;= 0 dB or SSIM &gt;= 1" in verdict  # the recorded thresholds, not the defaults
