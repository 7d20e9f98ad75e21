"""The ``gradleak`` command. Thin: every subcommand parses its arguments and makes one API call.

Exit codes: 0 done; 1 internal error (a bug: rerun with --debug for the traceback); 2 bad input, refused
before any work, with one line on stderr; 130 interrupted (Ctrl-C or SIGTERM): an interrupted attack still
writes the report of the best result so far. See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys
from typing import Any, Sequence

from .errors import GradleakError
from .interrupts import interrupt_on_signals  # noqa: F401  (also gradleak.cli's public name)

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _int_type(minimum: int | None = None, maximum: int | None = None, what: str = "an int"):
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}") from None
        if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return n

    return parse


def _int_list(minimum: int, what: str):
    def parse(v: str) -> list[int]:
        try:
            out = [int(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} (comma-separated ints, e.g. 1,2), got {v!r}") from None
        if not out or min(out) < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} (comma-separated ints >= {minimum}), got {v!r}")
        return out

    return parse


_positive = _int_type(1, None, "an int >= 1")
_count0 = _int_type(0, None, "an int >= 0")
_seed = _int_type(0, 2 ** 64 - 1, "a seed: an int in [0, 2**64 - 1]")

MODEL_FLAGS = {"width": _positive, "width2": _positive, "depth": _positive, "activation": str, "norm": str,
               "stem": str}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the whole usage)
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class _UsageError(Exception):
    pass


def _literal(v: str) -> Any:
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def _kv(items: Sequence[str], what: str) -> dict[str, Any]:
    out = {}
    for item in items or ():
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise _UsageError(f"gradleak: {what} must look like key=value, got {item!r}")
        out[k.strip().replace("-", "_")] = _literal(v.strip())
    return out


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model options (passed to the zoo model that defines them)")
    for name, typ in MODEL_FLAGS.items():
        g.add_argument(f"--{name}", type=typ, default=None)
    g.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE", help="any other model option")


def _add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where the model, the simulated client and the attack run: cpu (default), cuda, cuda:N or "
                        "mps; refused with one line when this machine lacks it")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a previous run (or checkpoint) at --out")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="refuse a job estimated to need more memory than SIZE, e.g. 8GB (default: the memory "
                        "available now)")


MODEL_HELP = ("a zoo name (gradleak list models), or your own model: FILE.py:NAME or module.path:NAME, NAME an "
              "nn.Module class or a factory (options from --model-opt; input_shape / num_classes from the data when "
              "it takes them); with --weights, default: the model its sidecar names")


def _add_deployment_flags(p: argparse.ArgumentParser, *, local_steps: int = 5) -> None:
    """--weights, --protocol (with --local-*), --defense: the deployment risk and compare take like attack."""
    p.add_argument("--weights", default=None, help="model weights: a state_dict .pt or .safetensors file; the sidecar "
                   "gradleak train writes beside it (NAME.json) gives the model, its options, dataset, image size "
                   "and classes unless given")
    p.add_argument("--protocol", choices=["fedsgd", "fedavg"], default="fedsgd")
    p.add_argument("--local-steps", type=_positive, default=local_steps)
    p.add_argument("--local-lr", type=float, default=1e-4)
    p.add_argument("--local-batch-size", type=_positive, default=None,
                   help="fedavg mini-batch size, 1..the batch (default: the whole batch)")
    p.add_argument("--defense", action="append", default=[], metavar="SPEC",
                   help="defense applied to the simulated update, e.g. noise:sigma=0.01, prune:ratio=0.9 (repeatable)")


def _with_sidecar(args, *, dataset_default: str = "samples") -> dict[str, Any]:
    """The model, its options and the data flags, filled from the --weights sidecar where not given (a
    conflict is one error); ``notes`` says what was filled (printed once the command succeeded)."""
    from .models.custom import normalize
    from .models.weights import apply_sidecar

    r = apply_sidecar(getattr(args, "weights", None), model=args.model, model_options=_model_options(args),
                      dataset=getattr(args, "dataset", None), images=getattr(args, "images", None),
                      image_size=getattr(args, "image_size", None), num_classes=getattr(args, "num_classes", None))
    if r["dataset"] is None:  # (with --images, the dataset is not read)
        r["dataset"] = dataset_default
    r["model"] = normalize(r["model"])  # a file spec made absolute: config.json re-runs it from any folder
    return r


def _notes(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"note: {line}", file=sys.stderr)


def _model_options(args) -> dict[str, Any]:
    opts = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k, None) is not None}
    opts.update(_kv(args.model_opt, "--model-opt"))
    return opts


_AUDIT_HELP = ("audit a deployment: every applicable attack and risk analysis per defense and batch size, one "
               "report")


def _add_audit_parser(sub) -> None:
    from .attacks.base import BUDGETS
    from .audit import threat


    p = sub.add_parser("audit", help=_AUDIT_HELP, description=_AUDIT_HELP + " (report.html + audit.json; docs/audit.md)")
    p.add_argument("--model", default=None, metavar="SPEC", help=MODEL_HELP)
    _add_model_flags(p)
    p.add_argument("--weights", default=None, help="model weights (.pt / .safetensors; reads train's sidecar)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", help="your own images: a folder of PNG/JPEG files or a tensor file")
    src.add_argument("--dataset", default=None, help="samples (default; with --weights: the dataset it was trained "
                     "on) | digits | cifar10:ROOT | folder:DIR")
    p.add_argument("--num-images", type=_positive, default=4, help="images audited (default 4)")
    p.add_argument("--start", type=_count0, default=0)
    p.add_argument("--image-size", type=_positive, default=None)
    p.add_argument("--num-classes", type=_positive, default=None)
    p.add_argument("--batch-sizes", type=_int_list(1, "batch sizes"), default=[1],
                   help="client batch sizes to audit, e.g. 1,4 (default 1)")
    p.add_argument("--protocol", choices=["fedsgd", "fedavg"], default="fedsgd")
    p.add_argument("--local-steps", type=_positive, default=5)
    p.add_argument("--local-lr", type=float, default=1e-4)
    p.add_argument("--local-batch-size", type=_positive, default=None)
    p.add_argument("--bn-mode", choices=["eval", "train"], default="eval")
    p.add_argument("--threat-model", default=threat.DEFAULT,
                   help=f"who reads the update and what it knows: {', '.join(threat.threat_models.names())} "
                        f"(default {threat.DEFAULT}; docs/audit.md)")
    p.add_argument("--defense", action="append", default=[], metavar="SPEC",
                   help="a defense setting to audit (repeatable; 'none' for no defense; '+' composes, e.g. "
                        "clip-update:max_norm=1+noise:sigma=0.01). Default: none")
    p.add_argument("--attacks", default="auto", help="auto (every applicable attack) or a comma-separated list")
    p.add_argument("--budget", default="quick", help=f"one of {', '.join(BUDGETS)} (default quick)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default cpu)")
    p.add_argument("--utility", action="store_true", help="also measure each defense's accuracy cost (FedAvg "
                                                          "on --utility-dataset, with and without it)")
    p.add_argument("--utility-dataset", default="digits")
    p.add_argument("--utility-rounds", type=_positive, default=10)
    p.add_argument("--workers", type=_positive, default=None, help="parallel jobs (default: from the cores)")
    p.add_argument("--backend", default="local", help="local (process pool) | ray | ray:ADDRESS")
    p.add_argument("--no-batch", dest="batch", action="store_false",
                   help="run every job alone (default: the jobs of one optimisation attack, defense and batch size "
                        "run as batched groups where that pays; docs/audit.md)")
    p.add_argument("--out", default=None, help="run directory (default runs/audit-MODEL-TIME); rerunning with the "
                                               "same --out and settings resumes, skipping finished jobs")
    p.add_argument("--overwrite", action="store_true", help="replace a previous audit at --out")
    p.add_argument("--max-memory", default=None, metavar="SIZE", help="refuse a job estimated to need more, e.g. 8GB")
    p.add_argument("--json", action="store_true", help="print the summary of audit.json as one JSON object")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gradleak", description="How much private data leaks through federated-learning updates.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--progress", action="store_true",
                   help="show progress bars on stderr even when it is not a terminal (e.g. in a job's log)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch CPU threads for every job (default: gradleak's policy chooses per job from its "
                        "size and the cores, one thread for the zoo's small models; see docs/performance.md; "
                        "also GRADLEAK_THREADS). Results are bit-reproducible for the same thread count on the "
                        "same machine; config.json records it")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    a = sub.add_parser("attack", help="simulate a client update (or read an observed one) and reconstruct its data")
    a.add_argument("--attack", required=True, help="attack name (gradleak list attacks)")
    a.add_argument("--model", default=None, metavar="SPEC", help=MODEL_HELP)
    src = a.add_mutually_exclusive_group()
    src.add_argument("--images", help="your own images: a folder of PNG/JPEG files or a tensor file")
    src.add_argument("--dataset", default=None, help="samples (default; with --weights: the dataset it was trained "
                     "on) | digits | cifar10:ROOT | folder:DIR")
    a.add_argument("--num-images", type=int, default=1)
    a.add_argument("--start", type=_count0, default=0, help="index of the first image taken from the dataset")
    a.add_argument("--image-size", type=_positive, default=None)
    a.add_argument("--num-classes", type=_positive, default=None,
                   help="classes of the model's head (default: the dataset's), e.g. 1000 for an ImageNet checkpoint")
    a.add_argument("--iterations", type=_positive, default=None)
    a.add_argument("--restarts", type=_positive, default=None)
    a.add_argument("--seed", type=_seed, default=0)
    a.add_argument("--protocol", choices=["fedsgd", "fedavg"], default="fedsgd")
    a.add_argument("--local-steps", type=_positive, default=5)
    a.add_argument("--local-lr", type=float, default=1e-4)
    a.add_argument("--local-batch-size", type=_positive, default=None,
                   help="fedavg mini-batch size, 1..--num-images (default: the whole batch)")
    a.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    a.add_argument("--unknown-labels", action="store_true", help="the attacker is not told the labels")
    a.add_argument("--labels", type=_int_list(0, "labels"), default=None,
                   help="labels of an --observed update, comma-separated ints")
    a.add_argument("--bn-mode", choices=["eval", "train"], default="eval")
    a.add_argument("--loss", default=None, help="loss name (default: follows the model's head)")
    a.add_argument("--preset", default=None, help="attack preset (paper settings)")
    a.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="attack option")
    a.add_argument("--weights", default=None, help="model weights: a state_dict .pt or .safetensors file")
    a.add_argument("--observed", default=None, help="a real observed gradient/update (.safetensors or .pt dict keyed "
                   "like the model); the data options give its spec, and --images (if given) is the truth")
    a.add_argument("--defense", action="append", default=[], metavar="SPEC",
                   help="defense applied to the SIMULATED update, e.g. noise:sigma=0.01, prune:ratio=0.9 (not "
                        "with --observed)")
    a.add_argument("--aggregate-clients", type=_positive, default=1, metavar="K",
                   help="secure aggregation: the server sees only the mean of K clients' FedSGD updates (this "
                        "batch plus K-1 others of the same size drawn from the dataset with --seed); the attack "
                        "faces one batch of K x --num-images images (default 1: no aggregation)")
    a.add_argument("--out", default=None, help="run directory (default runs/ATTACK-MODEL-TIME); refused when it "
                   "holds a previous run, unless --overwrite")
    _add_output_flags(a)
    a.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_device_flag(a)
    _add_model_flags(a)

    r = sub.add_parser("risk", help="predict leakage of an architecture before any attack")
    r.add_argument("--model", default=None, metavar="SPEC", help=MODEL_HELP)
    rsrc = r.add_mutually_exclusive_group()
    rsrc.add_argument("--images", help="your own images: their shape and classes size the model")
    rsrc.add_argument("--dataset", default=None, help="the data whose shape and classes size the model: samples "
                      "(default; with --weights: the dataset it was trained on) | digits | cifar10:ROOT | folder:DIR")
    r.add_argument("--image-size", type=_positive, default=None, help="default: the data's")
    r.add_argument("--channels", type=_positive, default=None, help="default: the data's")
    r.add_argument("--num-classes", type=_positive, default=None, help="default: the data's")
    r.add_argument("--batch-size", type=_positive, default=1)
    _add_deployment_flags(r, local_steps=1)
    r.add_argument("--seed", type=_seed, default=0)
    r.add_argument("--json", action="store_true")
    _add_model_flags(r)

    t = sub.add_parser("train", help="train a zoo model (or your own) and save checkpoints to audit")
    t.add_argument("--model", required=True, metavar="SPEC", help=MODEL_HELP.split("; with --weights")[0])
    t.add_argument("--dataset", default="digits")
    t.add_argument("--epochs", type=_count0, default=10)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--batch-size", type=_positive, default=None)
    t.add_argument("--image-size", type=_positive, default=None)
    t.add_argument("--checkpoints", type=_int_list(0, "checkpoint epochs"), default=None,
                   help="epochs to save, comma-separated (default: 1, 2, 10 up to --epochs)")
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--out", required=True, help="checkpoint file (.pt or .safetensors); refused when it exists, "
                   "unless --overwrite")
    _add_output_flags(t)
    t.add_argument("--json", action="store_true")
    _add_model_flags(t)

    u = sub.add_parser("utility", help="the accuracy cost of defenses: FedAvg over simulated clients with and "
                       "without each defense, same seeds")
    u.add_argument("--model", required=True)
    u.add_argument("--dataset", default="digits")
    u.add_argument("--defense", action="append", default=[], metavar="SPEC",
                   help="a defense applied to every client update, e.g. prune:ratio=0.9 or "
                        "dp-sgd:max_grad_norm=1,noise_multiplier=1.1 (repeat for several)")
    u.add_argument("--rounds", type=_positive, default=20)
    u.add_argument("--clients", type=_positive, default=8)
    u.add_argument("--local-steps", type=_positive, default=5)
    u.add_argument("--local-lr", type=float, default=0.1)
    u.add_argument("--local-batch-size", type=_positive, default=16)
    u.add_argument("--non-iid", action="store_true", help="Dirichlet(--alpha) label skew instead of IID shards")
    u.add_argument("--alpha", type=float, default=0.5)
    u.add_argument("--holdout", type=float, default=0.2)
    u.add_argument("--seed", type=_seed, default=0)
    u.add_argument("--json", action="store_true", help="print one JSON object (baseline_accuracy, defenses)")
    _add_model_flags(u)

    c = sub.add_parser("compare", help="run several attacks on the same case and tabulate them")
    c.add_argument("--attacks", default="rgap,layerwise,inverting-gradients,dlg")
    c.add_argument("--model", default=None, metavar="SPEC", help=MODEL_HELP)
    csrc = c.add_mutually_exclusive_group()
    csrc.add_argument("--dataset", default=None, help="samples (default; with --weights: the dataset it was trained "
                      "on) | digits | cifar10:ROOT | folder:DIR")
    csrc.add_argument("--images", default=None)
    c.add_argument("--num-images", type=int, default=1)
    c.add_argument("--start", type=_count0, default=0, help="index of the first image taken from the dataset")
    c.add_argument("--image-size", type=_positive, default=None)
    c.add_argument("--num-classes", type=_positive, default=None, help="classes of the model's head (default: the "
                   "dataset's)")
    _add_deployment_flags(c)
    c.add_argument("--iterations", type=_positive, default=None)
    c.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    c.add_argument("--seed", type=_seed, default=0)
    c.add_argument("--out", default=None, help="run directory: comparison.json and one folder per attack")
    _add_output_flags(c)
    _add_device_flag(c)
    c.add_argument("--json", action="store_true")
    _add_model_flags(c)

    _add_audit_parser(sub)

    ls = sub.add_parser("list", help="list attacks, models, datasets, defenses, losses, activations or threat models")
    ls.add_argument("what", choices=["attacks", "models", "datasets", "defenses", "losses", "activations",
                                    "threat-models"])
    ls.add_argument("--json", action="store_true")
    return p


def _progress_on(args) -> bool:
    if getattr(args, "progress", False):
        return True
    return not getattr(args, "json", False) and sys.stderr.isatty()


def _warn(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def _cmd_attack(args) -> int:
    from .experiment import AttackRun, run_attack
    from .report import run_warnings

    m = _with_sidecar(args)
    cfg = AttackRun(
        attack=args.attack, model=m["model"], dataset=m["dataset"], images=args.images, num_images=args.num_images,
        start=args.start, image_size=m["image_size"], num_classes=m["num_classes"], iterations=args.iterations,
        restarts=args.restarts, seed=args.seed, protocol=args.protocol, local_steps=args.local_steps,
        local_lr=args.local_lr, local_batch_size=args.local_batch_size, dtype=args.dtype,
        labels_known=not args.unknown_labels, labels=args.labels, bn_mode=args.bn_mode, loss=args.loss,
        preset=args.preset, model_options=m["model_options"], attack_options=_kv(args.option, "--option"),
        weights=args.weights, observed=args.observed, defenses=list(args.defense), out=args.out,
        threads=args.threads, device=args.device, aggregate_clients=args.aggregate_clients)
    res = run_attack(cfg, progress=_progress_on(args), overwrite=args.overwrite, max_memory=args.max_memory)
    warnings = run_warnings(res.reconstruction.info)
    _notes(m["notes"])
    if args.json:
        from .report import to_jsonable

        _warn(warnings)
        print(json.dumps(to_jsonable(res.to_json())))
    else:
        for n in res.notes:
            if n not in warnings:
                print(f"note: {n}", file=sys.stderr)
        _warn(warnings)
        print(res.summary())
    return EXIT_INTERRUPTED if res.reconstruction.info.get("interrupted") else EXIT_OK


def _cmd_risk(args) -> int:
    from . import data, defenses, risk

    for d in args.defense:  # a bad spec fails before any work (risk records the deployment's defenses)
        defenses.parse(d)
    m = _with_sidecar(args)
    source = args.images or m["dataset"]
    peek = data.peek_spec(source, image_size=m["image_size"])  # the data's shape and classes, decoded if need be
    if peek is None:
        spec = data.load(source, image_size=m["image_size"]).spec
        peek = (tuple(spec.shape), spec.num_classes, None)
    shape = tuple(peek[0])
    if args.channels is not None:
        if len(shape) != 3:
            raise _UsageError(f"gradleak risk: --channels applies to images (C, H, W); the data have shape {shape}")
        shape = (args.channels, *shape[1:])
    report = risk.analyse_architecture(m["model"], input_shape=shape, num_classes=m["num_classes"] or peek[1],
                                       batch_size=args.batch_size, seed=args.seed, weights=args.weights,
                                       protocol=args.protocol, local_steps=args.local_steps, local_lr=args.local_lr,
                                       local_batch_size=args.local_batch_size, defenses=list(args.defense),
                                       **m["model_options"])
    _notes(m["notes"])
    if args.json:
        from .report import to_jsonable

        print(json.dumps(to_jsonable(report.to_dict())))
    else:
        print(report.table())
        print(report.summary())
    return 0


def _cmd_train(args) -> int:
    from .report import check_output_file
    from .training import train_from_names

    check_output_file(args.out, overwrite=args.overwrite, what="the checkpoint")
    res = train_from_names(args.model, args.dataset, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           image_size=args.image_size, checkpoint_epochs=args.checkpoints, out=args.out,
                           seed=args.seed, progress=_progress_on(args), model_options=_model_options(args),
                           max_memory=args.max_memory)
    if args.json:
        from .report import to_jsonable

        print(json.dumps(to_jsonable(res.to_dict())))
    else:
        print(res.summary())
    return EXIT_OK


def _cmd_utility(args) -> int:
    from .defenses import utility

    if not args.defense:
        raise _UsageError("gradleak utility: give at least one --defense SPEC (the baseline runs without it)")
    res = utility(args.model, args.dataset, args.defense, rounds=args.rounds, clients=args.clients,
                  local_steps=args.local_steps, local_lr=args.local_lr, local_batch_size=args.local_batch_size,
                  iid=not args.non_iid, alpha=args.alpha, holdout=args.holdout, seed=args.seed,
                  model_options=_model_options(args), progress=_progress_on(args) and not args.json)
    print(res.to_json() if args.json else res.table())
    return EXIT_OK


def _cmd_compare(args) -> int:
    from .experiment import compare

    m = _with_sidecar(args)
    res = compare(attacks=[a.strip() for a in args.attacks.split(",") if a.strip()], model=m["model"],
                  dataset=m["dataset"] or "samples", images=args.images, num_images=args.num_images, start=args.start,
                  image_size=m["image_size"], num_classes=m["num_classes"],
                  iterations=args.iterations, dtype=args.dtype, seed=args.seed, out=args.out,
                  model_options=m["model_options"], progress=_progress_on(args), overwrite=args.overwrite,
                  max_memory=args.max_memory, weights=args.weights, protocol=args.protocol,
                  local_steps=args.local_steps, local_lr=args.local_lr, local_batch_size=args.local_batch_size,
                  defenses=list(args.defense), device=args.device)
    _notes(m["notes"])
    for row in res.rows:
        _warn(w if w.startswith(f"{row['attack']} ") else f"{row['attack']}: {w}" for w in row.get("warnings") or ())
    if args.json:
        from .report import to_jsonable

        print(json.dumps(to_jsonable(res.to_dict())))
    else:
        print(res.table())
    return EXIT_INTERRUPTED if res.interrupted else EXIT_OK


def _cmd_list(args) -> int:
    from . import activations, attacks, data, defenses, losses, models

    rows: list[tuple[str, str]]
    if args.what == "attacks":
        rows = []
        for n in attacks.attacks.names():
            cls = attacks.attacks.get(n)
            al = attacks.attacks.aliases_of(n)
            rows.append((n + (f" ({', '.join(al)})" if al else ""), cls.paper))
    elif args.what == "models":
        rows = [(n, models.models.get(n).description) for n in models.models.names()]
    elif args.what == "datasets":
        rows = list(data.sources())
    elif args.what == "defenses":
        rows = [(n, (defenses.defenses.get(n).__doc__ or "").strip().splitlines()[0] if defenses.defenses.get(n).__doc__ else "")
                for n in defenses.defenses.names()]
    elif args.what == "threat-models":
        from .audit.threat import threat_models

        rows = [(n, f"SoK {threat_models.get(n).sok}: {threat_models.get(n).title}") for n in threat_models.names()]
    elif args.what == "losses":
        rows = [(n, "") for n in losses.losses.names()]
    else:
        rows = [(n, "invertible" if activations.activations.get(n).invertible else "") for n in activations.activations.names()]
    if args.json:
        print(json.dumps([{"name": a, "description": b} for a, b in rows]))
    elif not rows:
        print(f"(no {args.what} registered)")
    else:
        w = max(len(a) for a, _ in rows)
        for a, b in rows:
            print(f"{a:<{w}}  {b}".rstrip())
    return 0


def _cmd_audit(args) -> int:
    from .audit import audit
    from .report import to_jsonable

    backend = args.backend
    if not (backend == "local" or backend == "ray" or backend.startswith("ray:")):
        raise _UsageError(f"gradleak audit: --backend must be local, ray or ray:ADDRESS, got {backend!r}")
    attacks = "auto" if args.attacks.strip() == "auto" else [a.strip() for a in args.attacks.split(",") if a.strip()]
    m = _with_sidecar(args)
    if not m["model"]:
        raise _UsageError("gradleak audit: --model is required (or --weights with the sidecar train writes)")
    settings = dict(
        model_options=m["model_options"], weights=args.weights, dataset=m["dataset"], images=args.images,
        num_images=args.num_images, start=args.start, image_size=m["image_size"], num_classes=m["num_classes"],
        batch_sizes=list(args.batch_sizes), protocol=args.protocol, local_steps=args.local_steps,
        local_lr=args.local_lr, local_batch_size=args.local_batch_size, bn_mode=args.bn_mode,
        threat_model=args.threat_model, defenses=list(args.defense) or ["none"], attacks=attacks,
        budget=args.budget, seed=args.seed, dtype=args.dtype, device=args.device, utility=args.utility,
        utility_dataset=args.utility_dataset, utility_rounds=args.utility_rounds)
    command = " ".join(shlex.quote(a) for a in ["gradleak", *sys.argv[1:]]) if sys.argv[1:2] == ["audit"] else None
    res = audit(m["model"], out=args.out, workers=args.workers, backend=backend, progress=_progress_on(args),
                overwrite=args.overwrite, max_memory=args.max_memory, command=command, batch=args.batch,
                **settings)
    _notes(m["notes"])
    if args.json:
        print(json.dumps(to_jsonable(res.summary_dict())))
    else:
        for w in res.data["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        print(res.summary())
    return EXIT_INTERRUPTED if res.interrupted else EXIT_OK


COMMANDS = {"audit": _cmd_audit, "attack": _cmd_attack, "risk": _cmd_risk, "train": _cmd_train, "compare": _cmd_compare,
            "utility": _cmd_utility, "list": _cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradleak`` console script. Returns the exit code: 0 done, 1 internal error,
    2 bad input (one line on stderr, before any work), 130 interrupted (the partial report is written)."""
    try:
        with interrupt_on_signals():
            import torch

            torch.set_flush_denormal(True)  # float32 L-BFGS on tiny gradients crawls through denormals otherwise
            try:
                return _main(argv)
            finally:  # process-wide state: restore it for in-process callers
                torch.set_flush_denormal(False)
    except KeyboardInterrupt:  # during start-up or teardown, outside _main's own handling
        print("gradleak: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        from . import threads

        if not args.command:
            parser.print_help()
            return EXIT_BAD_INPUT
        # --threads: every job's count; without it the policy chooses per job, other work runs on one thread
        with threads.pinned(args.threads) if args.threads is not None else threads.process_default(1):
            return COMMANDS[args.command](args)
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    except GradleakError as e:
        if debug:
            raise
        print(f"gradleak: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("gradleak: interrupted (no report: nothing to report yet)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:  # never a raw traceback for a user
        if debug:
            raise
        print(f"gradleak: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
