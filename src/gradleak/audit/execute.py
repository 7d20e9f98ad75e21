# LEAD'S LOCAL STUB (untracked): replaced by the exec helper's module
import time
from dataclasses import dataclass
@dataclass
class Job:
    id: str
    config: dict
    threads: int | None = None
@dataclass
class Outcome:
    id: str
    status: str
    result: dict | None
    error: str | None
    seconds: float
def run_jobs(jobs, *, backend="local", workers=None, progress=False, on_outcome=None, max_memory=None):
    from ..experiment import AttackRun, run_attack
    outs = []
    for j in jobs:
        t = time.perf_counter()
        try:
            r = run_attack(AttackRun.from_dict(j.config), write=True, overwrite=True)
            o = Outcome(j.id, "done", r.to_json(), None, time.perf_counter() - t)
        except Exception as e:
            o = Outcome(j.id, "failed", None, f"{type(e).__name__}: {e}", time.perf_counter() - t)
        outs.append(o)
        if on_outcome: on_outcome(o)
    return outs
