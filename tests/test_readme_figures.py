"""README.md's figures are the benchmarks' JSONs: the table is re-rendered from benchmarks/results/*.json and
compared with the README, and the JSONs must come from one commit with a clean tree.

Refresh (after the code changes): ``python benchmarks/run.py && python benchmarks/readme_figures.py --write``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "benchmarks" / "readme_figures.py")
rf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rf)

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _readme_rows() -> dict[str, tuple[str, str]]:
    return rf.parse_table(rf.readme_table((ROOT / "README.md").read_text()))


def test_every_readme_figure_matches_its_json():
    readme = _readme_rows()
    expected = rf.figures(rf.load_results())
    assert set(readme) == set(expected), (
        f"README rows {sorted(readme)} vs JSONs {sorted(expected)}: run python benchmarks/readme_figures.py --write")
    wrong = []
    for name, (fig, commit) in expected.items():
        got_fig, got_commit = readme[name]
        if got_fig != fig:
            a, b = NUMBER.findall(got_fig), NUMBER.findall(fig)
            diff = [(x, y) for x, y in zip(a, b) if x != y]
            wrong.append(f"{name}: README {[x for x, _ in diff]} vs JSON {[y for _, y in diff]}" if diff else
                         f"{name}: README {got_fig!r} vs JSON {fig!r}")
        if got_commit != commit:
            wrong.append(f"{name}: README says commit {got_commit!r}, the JSON {commit!r}")
    caption = rf.parse_caption(rf.readme_table((ROOT / "README.md").read_text()))
    if caption != rf.caption(rf.load_results()):
        wrong.append(f"caption: README {caption!r} vs JSONs {rf.caption(rf.load_results())!r}")
    assert not wrong, "README figures disagree with benchmarks/results: " + "; ".join(wrong)


def test_readme_figures_come_from_one_clean_commit():
    results = rf.load_results()
    problems, commits = [], {}
    for name, d in results.items():
        prov = d.get("provenance")
        if not isinstance(prov, dict) or not prov.get("commit"):
            problems.append(f"{name}.json has no provenance")
            continue
        if not prov.get("clean"):
            problems.append(f"{name}.json was produced on a dirty tree ({prov.get('changes', [])[:2]})")
        commits.setdefault(prov["commit"][:10], []).append(name)
    if len(commits) > 1:
        problems.append(f"the JSONs come from different commits: {commits}")
    if rf.mode(results) == "mixed":
        problems.append("the JSONs come from different runner modes (--quick and full): one command made them all")
    assert not problems, ("; ".join(problems) + ". Refresh: python benchmarks/run.py && "
                          "python benchmarks/readme_figures.py --write")


# the renderer and the parser themselves, on a small synthetic result set


def _fake_results(tmp_path: Path, psnr: float = 21.25, clean: bool = True) -> Path:
    prov = {"commit": "a" * 40, "clean": clean, "changes": [] if clean else [" M src/x.py"],
            "command": "python benchmarks/bench_rgap.py"}
    d = {"benchmark": "rgap", "provenance": prov, "results": [
        {"model": "cnn6", "dtype": "float64", "images": 8, "psnr_mean": psnr, "seconds_mean": 1.5, "kinds": ["exact"]}]}
    (tmp_path / "rgap.json").write_text(json.dumps(d))
    readme = tmp_path / "README.md"
    if not readme.exists():
        readme.write_text(f"# x\n\n{rf.BEGIN}\n{rf.END}\n\nafter\n")
    return readme


def test_write_then_parse_round_trips_and_a_changed_json_is_detected(tmp_path):
    readme = _fake_results(tmp_path)
    rf.write(readme, tmp_path)
    rows = rf.parse_table(rf.readme_table(readme.read_text()))
    assert rows == rf.figures(rf.load_results(tmp_path))
    assert "21 dB mean in float64" in rows["rgap"][0] and rows["rgap"][1] == "a" * 10
    assert readme.read_text().endswith("after\n")
    _fake_results(tmp_path, psnr=35.0)  # the JSON moves on, the README does not
    assert rf.parse_table(rf.readme_table(readme.read_text())) != rf.figures(rf.load_results(tmp_path))


def test_commit_cell_says_dirty_and_missing_provenance(tmp_path):
    _fake_results(tmp_path, clean=False)
    assert rf.commit_cell(rf.load_results(tmp_path)["rgap"]) == "a" * 10 + " (dirty tree)"
    assert rf.commit_cell({"results": []}) == "no provenance"


def test_tensor_row_says_not_measured_without_the_tensor_only_field():
    fig = rf.tensor({"scale": None, "quality": [{"activation": "relu", "batch_size": 8, "d": 768,
                                                 "cosine_mean": 0.99}]})
    assert rf.NOT_MEASURED in fig


def test_missing_markers_are_an_error():
    with pytest.raises(ValueError, match="figures markers"):
        rf.readme_table("# no table here\n")


def test_provenance_refuses_a_dirty_tree_but_ignores_results(tmp_path, monkeypatch, capsys):
    import subprocess

    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("{}")
    state = common.refuse_if_dirty(False, "probe")
    assert state["clean"] and len(state["commit"]) == 40
    (tmp_path / "a.py").write_text("x = 2\n")
    with pytest.raises(SystemExit) as e:
        common.refuse_if_dirty(False, "probe")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dirty tree" in err and "--allow-dirty" in err
    assert common.refuse_if_dirty(True, "probe")["clean"] is False


def test_the_caption_names_the_one_command_and_mixed_modes_are_flagged():
    quick = {"provenance": {"command": "python benchmarks/bench_rgap.py --quick", "machine": {"cpu": "X", "cores": 2}}}
    full = {"provenance": {"command": "python benchmarks/bench_tensor.py", "machine": {"cpu": "X", "cores": 2}}}
    assert rf.mode({"rgap": quick}) == "quick" and "`python benchmarks/run.py --quick`" in rf.caption({"rgap": quick})
    assert rf.mode({"tensor": full}) == "full" and "`python benchmarks/run.py`" in rf.caption({"tensor": full})
    assert rf.mode({"rgap": quick, "tensor": full}) == "mixed"
    assert "different modes" in rf.caption({"rgap": quick, "tensor": full})
    table = "\n".join([rf.caption({"rgap": quick, "tensor": full}), "", *rf.HEADER])
    assert rf.parse_table(table) == {} and rf.parse_caption(table) == rf.caption({"rgap": quick, "tensor": full})
