"""The Ray backend (a real local ``ray.init``): the same jobs give the same numbers as the local backend, and a
failing job is 'failed' with its one-line message while the others finish. Slow: Ray's start takes a while."""

import pytest

import gradleak as gl
from gradleak.audit.execute import Job, run_jobs

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


def _jobs(root, n=2):
    jobs = [Job(f"ig-{i}", gl.AttackRun(attack="ig", model="lenet", image_size=16, num_images=1, start=i,
                                        iterations=20, out=str(root / f"ig-{i}")).to_dict()) for i in range(n)]
    bad = gl.AttackRun(attack="ig", model="lenet", image_size=16, iterations=20, model_options={"widht": 3},
                       out=str(root / "bad"))
    return jobs + [Job("bad", bad.to_dict())]


@pytest.fixture
def dying_attack():
    """The test-only attack 'test-dies' (tests/_dying_attack.py: its worker dies of SIGKILL), registered for
    this test only; the Ray worker imports that module because the attack is registered outside gradleak."""
    import _dying_attack

    remove = _dying_attack.registered()
    yield _dying_attack.NAME
    remove()


def test_ray_and_local_give_identical_scores_and_isolate_a_failure(tmp_path, dying_attack):
    assert not ray.is_initialized()
    local = run_jobs(_jobs(tmp_path / "local"), workers=2)
    dies = Job("dies", gl.AttackRun(attack=dying_attack, model="lenet", image_size=16,
                                    out=str(tmp_path / "ray" / "dies")).to_dict())
    on_ray = run_jobs(_jobs(tmp_path / "ray") + [dies], backend="ray")
    assert not ray.is_initialized()  # started here, so shut down here
    dies = on_ray.pop()
    assert dies.status == "failed" and dies.error.startswith("worker died"), dies.error
    assert "\n" not in dies.error
    for outcomes in (local, on_ray):
        assert [o.status for o in outcomes] == ["done", "done", "failed"], [o.error for o in outcomes]
        assert outcomes[2].error == ("ValidationError: model lenet: unknown option(s) ['widht']; valid options: "
                                     "activation='sigmoid', width=12")
    assert [o.result["psnr"] for o in local[:2]] == [o.result["psnr"] for o in on_ray[:2]]
    assert [o.result["residual"] for o in local[:2]] == [o.result["residual"] for o in on_ray[:2]]
    assert local[0].result["psnr"] != local[1].result["psnr"]
    assert all((tmp_path / "ray" / f"ig-{i}" / "metrics.json").is_file() for i in range(2))
