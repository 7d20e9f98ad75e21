"""The audit.json contract in one place: its name and version, the recognisability thresholds with the reason
for their values, and what each verdict and job status means. The verdict code, the report page and
docs/audit.md all read these constants rather than repeating them.

Version policy: adding a field keeps :data:`SCHEMA_VERSION`; renaming or removing a field, or changing a
field's type or meaning, increments it.
"""

from __future__ import annotations

SCHEMA = "gradleak.audit"
SCHEMA_VERSION = 1

# An image counts as recognisable when the best reconstruction of it (over attacks) reaches either figure.
RECOGNISABLE_PSNR_DB = 20.0
RECOGNISABLE_SSIM = 0.5

THRESHOLD_RULE = ("an image is recognisable when its best reconstruction over attacks has PSNR >= "
                  "{psnr:g} dB or SSIM >= {ssim:g}")

THRESHOLD_JUSTIFICATION = (
    "PSNR is 10 log10(1/MSE) for pixels in [0, 1], so 20 dB is a root-mean-square error of 0.1, a tenth of "
    "the pixel range. On the small photos gradient-inversion papers attack (32x32 CIFAR-like images), "
    "reconstructions at or above about 20 dB show the object, its outline and its colours clearly enough for a "
    "person to say what the image is; around 15 dB (RMS error 0.18) the layout and dominant colours usually "
    "survive but identity is doubtful; below about 12 dB a reconstruction is mostly noise or a blurred "
    "average. SSIM compares local structure (edges, texture) rather than raw error: at 0.5 and above the edges "
    "of the original are in place, which catches reconstructions that are recognisable yet shifted in "
    "brightness or contrast (a low PSNR but a faithful picture). Both values are conventions drawn from the "
    "figures published with gradient-inversion attacks (DLG, Inverting Gradients, R-GAP and their follow-ups), "
    "not guarantees: a reconstruction below them can still reveal an attribute (a colour, a layout, a label), "
    "and larger images or faces may be recognisable at a lower PSNR. Lower them for a stricter audit.")

# The verdict of one defense (audit.json "verdict"[i]["status"]).
VERDICT_STATUSES = {
    "leaks": "at least one image was recognisable in the best reconstruction an attack got",
    "no recognisable image": ("every planned job finished and no image reached either threshold; this is "
                              "evidence from the attacks that ran at this budget, not a proof that no attack "
                              "can succeed"),
    "incomplete": ("some jobs failed, were cancelled or were interrupted (or none finished), and no recognisable "
                   "image was found: no conclusion can be drawn until the rest run"),
}

# The status of one job (audit.json "jobs"[i]["status"]).
JOB_STATUSES = {
    "done": "the attack ran to the end of its budget",
    "resumed": "finished in an earlier run of the same audit (its run directory was reused)",
    "interrupted": "stopped by Ctrl-C while it ran; its scores are the best reconstruction so far",
    "failed": "the attack raised an error or its worker died; the error says which",
    "not applicable": ("the attack checked this case when it ran and found it outside what it handles (for "
                       "example a label it cannot read from a noised update); like a skipped attack it is no "
                       "evidence either way, and the reason says which fact failed"),
    "cancelled": "never started, because the audit was interrupted",
}

# job statuses whose scores and run directory count as a result
SCORED_STATUSES = ("done", "resumed", "interrupted")


def threshold_rule(psnr_db: float = RECOGNISABLE_PSNR_DB, ssim: float = RECOGNISABLE_SSIM) -> str:
    """The recognisability rule as a sentence, with the thresholds filled in."""
    return THRESHOLD_RULE.format(psnr=psnr_db, ssim=ssim)


def thresholds(psnr_db: float = RECOGNISABLE_PSNR_DB, ssim: float = RECOGNISABLE_SSIM) -> dict:
    """The ``thresholds`` object of audit.json."""
    return {"recognisable_psnr_db": float(psnr_db), "recognisable_ssim": float(ssim),
            "rule": threshold_rule(psnr_db, ssim), "justification": THRESHOLD_JUSTIFICATION}


__all__ = ["SCHEMA", "SCHEMA_VERSION", "RECOGNISABLE_PSNR_DB", "RECOGNISABLE_SSIM", "THRESHOLD_RULE",
           "THRESHOLD_JUSTIFICATION", "VERDICT_STATUSES", "JOB_STATUSES", "SCORED_STATUSES", "threshold_rule",
           "thresholds"]
