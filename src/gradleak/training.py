"""Train a model and save checkpoints along the way, so that the model a client deploys can be audited at
the training stage it is at ("the model after 1, 2, 10 epochs", as privacy studies do).

``train(model, dataset, epochs=...)`` trains a COPY of ``model`` (the caller's model is untouched) with SGD
or Adam on a :class:`~gradleak.data.Dataset`, with optional random crops / flips, reports the accuracy on a
stratified held-out split after every epoch, and saves checkpoints at chosen epochs:

    out = runs/lenet.pt  ->  runs/lenet-e1.pt, runs/lenet-e2.pt, ... (epoch E: ``out.with_stem(f"{stem}-e{E}")``),
                             runs/lenet.pt (the final model) and runs/lenet.json (config + accuracy per epoch).

``.safetensors`` outputs are written as safetensors; anything else with ``torch.save(state_dict)``. Every
checkpoint loads back with :func:`gradleak.models.load_weights`. Deterministic under ``seed``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .case import _num_outputs
from .data import Dataset
from .errors import NumericalError, ValidationError
from .losses import default_loss_for, losses
from .models.weights import sidecar_path
from .report.rundir import check_output_file
from .validate import seed_problems

OPTIMIZERS = ("sgd", "adam")
AUGMENTATIONS = ("none", "crop", "flip", "crop+flip")
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}
# natural photographs get crops and flips by default; digits and raw tensors are not flip-invariant
_PHOTO_SOURCES = ("samples", "cifar10", "folder", "images")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    model: the trained model (a copy; in eval mode).
    accuracy: accuracy[e] after epoch e on ``evaluated_on`` ('holdout', or 'train' when there is no held-out
        split); accuracy[0] is before training. train_accuracy: the same on the (un-augmented) training split.
    loss: loss[e] = mean training loss during epoch e (loss[0]: on the training split before training).
    checkpoints: epoch -> path of the checkpoint saved after that epoch; final: the final model's path.
    train_indices, holdout_indices: indices into the dataset of the two splits (int64).
    """

    model: nn.Module
    accuracy: list[float]
    train_accuracy: list[float]
    loss: list[float]
    checkpoints: dict[int, Path]
    final: Path | None
    train_indices: torch.Tensor
    holdout_indices: torch.Tensor
    evaluated_on: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.accuracy) - 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no tensors except the split sizes)."""
        return {"epochs": self.epochs, "accuracy": self.accuracy, "train_accuracy": self.train_accuracy,
                "loss": self.loss, "evaluated_on": self.evaluated_on,
                "checkpoints": {str(e): str(p) for e, p in sorted(self.checkpoints.items())},
                "final": None if self.final is None else str(self.final),
                "num_train": int(self.train_indices.numel()), "num_holdout": int(self.holdout_indices.numel()),
                "seconds": self.seconds, "notes": list(self.notes), "config": self.config}

    def summary(self) -> str:
        """One line: what was trained, the accuracy reached, where the checkpoints are."""
        name = self.config.get("model", type(self.model).__name__)
        data = self.config.get("dataset", "the dataset")
        where = "held-out" if self.evaluated_on == "holdout" else "training"
        s = (f"trained {name} on {data} for {self.epochs} epoch(s) ({self.train_indices.numel()} train / "
             f"{self.holdout_indices.numel()} held-out images) in {self.seconds:.1f} s: {where} accuracy "
             f"{100 * self.accuracy[0]:.1f}% -> {100 * self.accuracy[-1]:.1f}%")
        if self.checkpoints:
            s += "; checkpoints " + ", ".join(f"e{e}: {p}" for e, p in sorted(self.checkpoints.items()))
        if self.final is not None:
            s += f"; final: {self.final}"
        return s


def checkpoint_path(out: str | Path, epoch: int) -> Path:
    """The file the checkpoint of ``epoch`` is saved to: ``runs/lenet.pt`` -> ``runs/lenet-e{epoch}.pt``."""
    p = Path(out)
    return p.with_name(f"{p.stem}-e{int(epoch)}{p.suffix}")


def split_holdout(labels: torch.Tensor, holdout: float | int, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified split: from every class, a ``holdout`` fraction (float in [0, 1)) of its images, or in
    total ``holdout`` images (int, spread over the classes in proportion). Every class keeps at least one
    training image. Returns (train_indices, holdout_indices), each sorted."""
    n = int(labels.numel())
    frac = holdout / n if isinstance(holdout, int) else float(holdout)
    perm = torch.randperm(n, generator=generator)
    hold: list[int] = []
    for c in torch.unique(labels).tolist():
        members = perm[labels[perm] == c]
        k = min(int(round(frac * members.numel())), members.numel() - 1)
        hold += members[:k].tolist()
    hold_t = torch.tensor(sorted(hold), dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[hold_t] = False
    return torch.nonzero(mask).flatten(), hold_t


def _augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random crops (reflect-pad by ~size/8, crop back) and/or horizontal flips, per sample. x: (B, C, H, W)."""
    if kind == "none" or x.ndim != 4:
        return x
    b, _, h, w = x.shape
    if "crop" in kind:
        ph, pw = max(1, round(h / 8)), max(1, round(w / 8))
        mode = "reflect" if ph < h and pw < w else "replicate"
        padded = nn.functional.pad(x, (pw, pw, ph, ph), mode=mode)
        oy = torch.randint(0, 2 * ph + 1, (b,), generator=generator).tolist()
        ox = torch.randint(0, 2 * pw + 1, (b,), generator=generator).tolist()
        x = torch.stack([padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(b)])
    if "flip" in kind:
        flip = torch.rand(b, generator=generator) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
    return x


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, *, single_output: bool,
                      batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean loss) of ``model`` in eval mode over normalised inputs x (N, ...) and labels y (N,), in
    chunks of ``batch_size``; ``single_output``: one score per sample (label 1 where it is > 0), else the argmax
    of the outputs. (nan, nan) for an empty set. The one held-out evaluation of training and
    :func:`gradleak.defenses.utility`."""
    if x.shape[0] == 0:
        return float("nan"), float("nan")
    was = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i:i + batch_size])
        yy = y[i:i + batch_size]
        total_loss += float(loss_fn(out, yy)) * yy.shape[0]
        pred = (out[:, 0] > 0).long() if single_output else out.argmax(dim=1)
        correct += int((pred == yy).sum())
    model.train(was)
    return correct / x.shape[0], total_loss / x.shape[0]


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    lr: float | None = None,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    augment: str | bool = "auto",
    holdout: float | int | str = "auto",
    checkpoint_epochs: Sequence[int] | None = (1, 2, 10),
    out: str | Path | None = None,
    loss: str | None = None,
    schedule: str = "constant",
    seed: int = 0,
    progress: bool = False,
) -> TrainResult:
    """Train a copy of ``model`` on ``dataset`` and save checkpoints.

    model: a zoo model (or any nn.Module) built for ``dataset.spec`` (input shape, classes); not modified.
    dataset: images (N, C, H, W) in [0, 1] and labels (N,); the model sees ``dataset.spec.normalize(x)``.
    epochs: passes over the training split (0 is allowed: evaluates and saves the initial model).
    lr: learning rate (default 1e-3 for Adam, 0.05 for SGD with ``momentum``); ``schedule`` 'constant' or
        'cosine' (decays to 0 over the run); ``weight_decay`` L2 penalty.
    augment: 'auto' (crop+flip for natural photos: bundled samples, CIFAR-10, image folders; none for
        digits and tensor files), 'none', 'crop', 'flip', 'crop+flip', or a bool (True = crop+flip).
    holdout: fraction (float in [0, 1)) or count (int) of images held out, stratified by class; 'auto' = 0.2
        when every class has at least two images, else 0 (e.g. the bundled photos, one per class): the
        accuracy is then measured on the un-augmented training images, and ``notes`` says so.
    checkpoint_epochs: epochs after which to save (0 = before training); those beyond ``epochs`` are skipped
        (with a note). out: final checkpoint path (None: save nothing); epoch E goes to
        :func:`checkpoint_path` (``runs/lenet.pt`` -> ``runs/lenet-e2.pt``); a JSON with the config and the
        accuracy per epoch is written beside it (``runs/lenet.json``).
    loss: a ``gradleak.losses`` name (default follows the model's head, as in :func:`gradleak.simulate`).
    seed: drives the split, the batch order and the augmentation (same seed, same model).
    progress: a tqdm progress bar with the loss and accuracy.
    BatchNorm layers train with batch statistics and update their running statistics (used in eval mode).
    """
    problems = []
    if not isinstance(model, nn.Module):
        problems.append(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(dataset, Dataset):
        problems.append(f"dataset must be a gradleak.data.Dataset (from gradleak.data.load), got "
                        f"{type(dataset).__name__}")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        problems.append(f"epochs must be an int >= 0, got {epochs!r}")
    if optimizer not in OPTIMIZERS:
        problems.append(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        problems.append(f"lr must be a positive number, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be an int >= 1, got {batch_size!r}")
    if schedule not in ("constant", "cosine"):
        problems.append(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if isinstance(augment, bool):
        augment = "crop+flip" if augment else "none"
    if augment not in AUGMENTATIONS + ("auto",):
        problems.append(f"augment must be one of {('auto',) + AUGMENTATIONS} or a bool, got {augment!r}")
    if not (holdout == "auto" or (isinstance(holdout, float) and 0 <= holdout < 1)
            or (isinstance(holdout, int) and not isinstance(holdout, bool) and holdout >= 0)):
        problems.append(f"holdout must be 'auto', a fraction in [0, 1) or a count >= 0, got {holdout!r}")
    ckpts = [] if checkpoint_epochs is None else list(checkpoint_epochs)
    if any(not isinstance(e, int) or isinstance(e, bool) or e < 0 for e in ckpts):
        problems.append(f"checkpoint_epochs must be ints >= 0, got {checkpoint_epochs!r}")
    problems += seed_problems(seed)
    if problems:
        raise ValidationError("train", problems)
    if out is not None:  # before any work: a directory, a device or a read-only folder is refused now
        check_output_file(out, what="the checkpoint")
    single = _num_outputs(model) == 1
    loss = loss or default_loss_for(_num_outputs(model))
    if loss not in losses:
        problems.append(f"unknown loss {loss!r}: expected one of {losses.names()}")
    spec = dataset.spec
    in_shape = getattr(model, "input_shape", None)
    if in_shape is not None and tuple(in_shape) != tuple(spec.shape):
        problems.append(f"the model was built for inputs {tuple(in_shape)}, the dataset has {tuple(spec.shape)}: "
                        "build it with input_shape=dataset.spec.shape")
    labels = dataset.labels.to(torch.long)
    bad = (losses.get(loss).label_problem(int(labels.max()), _num_outputs(model))
           if loss in losses and labels.numel() else None)
    if bad:
        problems.append(bad)
    if holdout != "auto" and isinstance(holdout, int) and holdout >= len(dataset):
        problems.append(f"holdout={holdout} leaves no training images (the dataset has {len(dataset)})")
    if problems:
        raise ValidationError("train", problems)

    t0 = time.perf_counter()
    notes: list[str] = list(dataset.notes)
    loss_fn = losses.get(loss)
    net = copy.deepcopy(model)
    for p in net.parameters():
        p.requires_grad_(True)
    param = next(net.parameters())
    device, dtype = param.device, param.dtype
    split_gen = torch.Generator().manual_seed(int(seed))
    loop_gen = torch.Generator().manual_seed(int(seed) + 1)

    counts = torch.bincount(labels)
    if holdout == "auto":
        holdout = 0.2 if int(counts[counts > 0].min()) >= 2 else 0.0
        if holdout == 0.0:
            notes.append("some classes have a single image, so nothing is held out: accuracy is measured on the "
                         "(un-augmented) training images")
    train_idx, hold_idx = split_holdout(labels, holdout, split_gen)
    if augment == "auto":
        augment = "crop+flip" if spec.name in _PHOTO_SOURCES else "none"
    x_all = spec.normalize(dataset.images.to(device=device, dtype=dtype))
    y_all = labels.to(device)
    x_tr, y_tr = x_all[train_idx], y_all[train_idx]
    x_ho, y_ho = x_all[hold_idx], y_all[hold_idx]
    evaluated_on = "holdout" if hold_idx.numel() else "train"
    # augmentation happens in image space, so pad values are real pixels
    img_tr = dataset.images.to(device=device, dtype=dtype)[train_idx]

    lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
    if optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n_tr = int(train_idx.numel())
    steps_per_epoch = max(math.ceil(n_tr / batch_size), 1)
    total_steps = steps_per_epoch * epochs
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
             if schedule == "cosine" else None)
    has_bn = _has_batchnorm(net)

    save = out is not None
    out_p = Path(out).expanduser() if save else None
    wanted = sorted(set(ckpts))
    skipped = [e for e in wanted if e > epochs]
    if skipped:
        notes.append(f"checkpoint epochs {skipped} are beyond the {epochs} epoch(s) trained: not saved")
    checkpoints: dict[int, Path] = {}

    def _save(epoch: int) -> None:
        from .models.weights import save_weights

        if save and epoch in wanted:
            checkpoints[epoch] = save_weights(net, checkpoint_path(out_p, epoch), metadata={"epoch": epoch})

    acc0, _ = accuracy_and_loss(net, x_ho, y_ho, loss_fn, single_output=single) if hold_idx.numel() \
        else (float("nan"), 0.0)
    tr_acc0, tr_loss0 = accuracy_and_loss(net, x_tr, y_tr, loss_fn, single_output=single)
    accuracy = [acc0 if hold_idx.numel() else tr_acc0]
    train_accuracy = [tr_acc0]
    losses_per_epoch = [tr_loss0]
    _save(0)

    bar = None
    if progress and total_steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=f"train {getattr(net, 'zoo_name', type(net).__name__)}", unit="step",
                   leave=False)
    try:
        for epoch in range(1, epochs + 1):
            net.train()
            order = torch.randperm(n_tr, generator=loop_gen)
            run_loss, seen = 0.0, 0
            for s in range(steps_per_epoch):
                idx = order[s * batch_size:(s + 1) * batch_size]
                if has_bn and idx.numel() < 2:
                    continue  # batch statistics need two samples
                xb = _augment(img_tr[idx], augment, loop_gen)
                xb = spec.normalize(xb)
                yb = y_tr[idx]
                opt.zero_grad(set_to_none=True)
                lval = loss_fn(net(xb), yb)
                if not math.isfinite(lval.item()):
                    raise NumericalError(f"the training loss became {lval.item()} at epoch {epoch}, step {s + 1} "
                                         f"(lr={lr}, {optimizer}): expected a finite loss; lower the learning rate")
                lval.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                run_loss += lval.item() * idx.numel()
                seen += idx.numel()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{lval.item():.3f}", acc=f"{100 * accuracy[-1]:.1f}%")
            tr_acc, _ = accuracy_and_loss(net, x_tr, y_tr, loss_fn, single_output=single)
            acc = accuracy_and_loss(net, x_ho, y_ho, loss_fn, single_output=single)[0] if hold_idx.numel() else tr_acc
            accuracy.append(acc)
            train_accuracy.append(tr_acc)
            losses_per_epoch.append(run_loss / max(seen, 1))
            _save(epoch)
    finally:
        if bar is not None:
            bar.close()
    net.eval()
    seconds = time.perf_counter() - t0
    config = {"model": getattr(net, "zoo_name", type(net).__name__), "input_shape": list(spec.shape),
              "num_classes": spec.num_classes, "dataset": spec.name, "num_images": len(dataset), "epochs": epochs,
              "optimizer": optimizer, "lr": lr, "momentum": momentum if optimizer == "sgd" else None,
              "weight_decay": weight_decay, "batch_size": batch_size, "augment": augment,
              "holdout": holdout, "schedule": schedule, "loss": loss, "seed": seed, "spec": spec.to_dict(),
              "dtype": str(dtype).replace("torch.", "")}
    final = None
    if save:
        from .models.weights import save_weights

        final = save_weights(net, out_p, metadata={"epoch": epochs})
    result = TrainResult(net, accuracy, train_accuracy, losses_per_epoch, checkpoints, final, train_idx, hold_idx,
                         evaluated_on, seconds, notes, config)
    if save:
        sidecar_path(out_p).write_text(json.dumps(result.to_dict(), indent=2))
    return result


def train_from_names(
    model: str,
    dataset: str,
    *,
    epochs: int,
    lr: float | None = None,
    batch_size: int | None = None,
    image_size: int | None = None,
    num_images: int | None = None,
    checkpoint_epochs: Sequence[int] | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    progress: bool = False,
    model_options: dict[str, Any] | None = None,
    max_memory: int | str | None = None,
    **train_options: Any,
) -> TrainResult:
    """The ``gradleak train`` job: load ``dataset`` (a :func:`gradleak.data.load` source; CIFAR-10 uses its
    training split), build the zoo ``model`` for it (seeded by ``seed``, with ``model_options``) and
    :func:`train` it. ``checkpoint_epochs`` None: (1, 2, 10) up to ``epochs``; the final model always goes
    to ``out``. One-score models (cnn6, fcn3) get labels ``label % 2`` (noted). Other keywords go to
    :func:`train`. The job's memory is estimated before the data are decoded and refused above
    ``max_memory`` (bytes or '8GB'; default: the memory available), see :mod:`gradleak.resources`."""
    from . import data as data_mod
    from .models import build, custom, models as registry
    from .resources import check_training_job

    # a zoo name, or a model spec (its file made absolute, so the sidecar names it from any folder)
    name = custom.normalize(model) if custom.is_spec(model) else registry.get(model).name
    if out is not None:
        check_output_file(out, what="the checkpoint")
    check_training_job(name, dataset, image_size=image_size, batch_size=batch_size, num_images=num_images,
                       model_options=model_options, max_memory=max_memory)
    kwargs: dict[str, Any] = {}
    if image_size is not None:
        kwargs["image_size"] = image_size
    if num_images is not None:
        kwargs["num_images"] = num_images
    if isinstance(dataset, str) and dataset.startswith("cifar10:"):
        kwargs["split"] = "train"
    ds = data_mod.load(dataset, **kwargs)
    extra_notes = []
    built_for = {"input_shape": list(ds.spec.shape), "num_classes": ds.spec.num_classes}
    net = build(name, input_shape=ds.spec.shape, num_classes=ds.spec.num_classes, seed=seed,
                **(model_options or {}))
    if _num_outputs(net) == 1 and ds.spec.num_classes != 2:
        extra_notes.append(f"{name} has one output score (logistic loss): labels mapped to label % 2")
        ds = dataclasses.replace(ds, labels=ds.labels % 2, spec=dataclasses.replace(ds.spec, num_classes=2))
    res = train(net, ds, epochs=epochs, lr=lr, batch_size=batch_size or 32,
                checkpoint_epochs=([e for e in (1, 2, 10) if e <= epochs] if checkpoint_epochs is None
                                   else checkpoint_epochs), out=out,
                seed=seed, progress=progress, **train_options)
    res.notes[:0] = extra_notes
    # the sidecar (gradleak.models.weights.read_sidecar): what --weights needs to rebuild this model and its data
    res.config.update({"model": name, "model_options": dict(model_options or {}), "dataset": str(dataset),
                       "image_size": image_size, "built_for": built_for, "num_outputs": _num_outputs(net)})
    if res.final is not None:
        sidecar_path(res.final).write_text(json.dumps(res.to_dict(), indent=2))
    return res


__all__ = ["TrainResult", "train", "train_from_names", "checkpoint_path", "split_holdout", "accuracy_and_loss",
           "OPTIMIZERS",
           "AUGMENTATIONS"]
