"""``gradleak audit``: its arguments and the one API call it makes (:func:`gradleak.audit.audit`)."""

from __future__ import annotations

import json
import shlex
import sys

HELP = "audit a deployment: every applicable attack and risk analysis per defense and batch size, one report"


def add_parser(sub) -> None:
    from .. import cli as c
    from ..attacks.base import BUDGETS
    from . import threat

    p = sub.add_parser("audit", help=HELP, description=HELP + " (report.html + audit.json; docs/audit.md)")
    p.add_argument("--model", required=True,
                   help="a zoo name (gradleak list models), FILE.py:NAME or module.path:NAME (a class or factory)")
    c._add_model_flags(p)
    p.add_argument("--weights", default=None, help="model weights (.pt / .safetensors; reads train's sidecar)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", help="your own images: a folder of PNG/JPEG files or a tensor file")
    src.add_argument("--dataset", default="samples", help="samples | digits | cifar10:ROOT | folder:DIR")
    p.add_argument("--num-images", type=c._positive, default=4, help="images audited (default 4)")
    p.add_argument("--start", type=c._count0, default=0)
    p.add_argument("--image-size", type=c._positive, default=None)
    p.add_argument("--num-classes", type=c._positive, default=None)
    p.add_argument("--batch-sizes", type=c._int_list(1, "batch sizes"), default=[1],
                   help="client batch sizes to audit, e.g. 1,4 (default 1)")
    p.add_argument("--protocol", choices=["fedsgd", "fedavg"], default="fedsgd")
    p.add_argument("--local-steps", type=c._positive, default=5)
    p.add_argument("--local-lr", type=float, default=1e-4)
    p.add_argument("--local-batch-size", type=c._positive, default=None)
    p.add_argument("--bn-mode", choices=["eval", "train"], default="eval")
    p.add_argument("--threat-model", default=threat.DEFAULT,
                   help=f"who reads the update and what it knows: {', '.join(threat.threat_models.names())} "
                        f"(default {threat.DEFAULT}; docs/audit.md)")
    p.add_argument("--defense", action="append", default=[], metavar="SPEC",
                   help="a defense setting to audit (repeatable; 'none' for no defense; '+' composes, e.g. "
                        "clip-update:max_norm=1+noise:sigma=0.01). Default: none")
    p.add_argument("--attacks", default="auto", help="auto (every applicable attack) or a comma-separated list")
    p.add_argument("--budget", default="quick", help=f"one of {', '.join(BUDGETS)} (default quick)")
    p.add_argument("--seed", type=c._seed, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default cpu)")
    p.add_argument("--utility", action="store_true", help="also measure each defense's accuracy cost (FedAvg "
                                                          "on --utility-dataset, with and without it)")
    p.add_argument("--utility-dataset", default="digits")
    p.add_argument("--utility-rounds", type=c._positive, default=10)
    p.add_argument("--workers", type=c._positive, default=None, help="parallel jobs (default: from the cores)")
    p.add_argument("--backend", default="local", help="local (process pool) | ray | ray:ADDRESS")
    p.add_argument("--out", default=None, help="run directory (default runs/audit-MODEL-TIME); rerunning with the "
                                               "same --out and settings resumes, skipping finished jobs")
    p.add_argument("--overwrite", action="store_true", help="replace a previous audit at --out")
    p.add_argument("--max-memory", default=None, metavar="SIZE", help="refuse a job estimated to need more, e.g. 8GB")
    p.add_argument("--json", action="store_true", help="print the summary of audit.json as one JSON object")


def run(args) -> int:
    from .. import cli as c
    from ..report import to_jsonable
    from .api import audit

    backend = args.backend
    if not (backend == "local" or backend == "ray" or backend.startswith("ray:")):
        raise c._UsageError(f"gradleak audit: --backend must be local, ray or ray:ADDRESS, got {backend!r}")
    attacks = "auto" if args.attacks.strip() == "auto" else [a.strip() for a in args.attacks.split(",") if a.strip()]
    settings = dict(
        model_options=c._model_options(args), weights=args.weights, dataset=args.dataset, images=args.images,
        num_images=args.num_images, start=args.start, image_size=args.image_size, num_classes=args.num_classes,
        batch_sizes=list(args.batch_sizes), protocol=args.protocol, local_steps=args.local_steps,
        local_lr=args.local_lr, local_batch_size=args.local_batch_size, bn_mode=args.bn_mode,
        threat_model=args.threat_model, defenses=list(args.defense) or ["none"], attacks=attacks,
        budget=args.budget, seed=args.seed, dtype=args.dtype, device=args.device, utility=args.utility,
        utility_dataset=args.utility_dataset, utility_rounds=args.utility_rounds)
    command = " ".join(shlex.quote(a) for a in ["gradleak", *sys.argv[1:]]) if sys.argv[1:2] == ["audit"] else None
    res = audit(args.model, out=args.out, workers=args.workers, backend=backend, progress=c._progress_on(args),
                overwrite=args.overwrite, max_memory=args.max_memory, command=command, **settings)
    if args.json:
        print(json.dumps(to_jsonable(res.summary_dict())))
    else:
        for w in res.data["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        print(res.summary())
    return c.EXIT_INTERRUPTED if res.interrupted else c.EXIT_OK
