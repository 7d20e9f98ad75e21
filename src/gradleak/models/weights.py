"""Load and save model weights: a PyTorch ``state_dict`` (``torch.save``, read with ``weights_only=True``)
or a ``.safetensors`` file.

``load_weights(model, source)`` returns a NEW model (a deep copy of ``model`` with the checkpoint loaded);
the caller's model is only changed with ``inplace=True``. When the checkpoint does not fit, one
:class:`~gradleak.WeightsError` lists every missing, unexpected and mis-shaped key at once.

The zoo's ResNet-18/34/50/152 use torchvision's parameter names, so a torchvision checkpoint (e.g. the
ImageNet ``resnet18`` weights) loads into ``build('resnet18', input_shape=(3, 224, 224), num_classes=1000)``
without torchvision installed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import WeightsError

# wrappers training scripts put around a state_dict (Lightning, timm, breaching-style, ...)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights", "params",
                 "state_dict_ema")
# prefixes added by nn.DataParallel / DistributedDataParallel, torch.compile, Lightning modules
_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)  # absent from checkpoints saved before PyTorch 0.4.1


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else "the state_dict"


def _read(path: Path) -> Any:
    if not path.exists():
        raise WeightsError(f"no such weights file: {path} (expected a PyTorch state_dict .pt/.pth or a .safetensors "
                           "file)")
    if path.is_dir():
        raise WeightsError(f"{path} is a folder; expected a PyTorch state_dict .pt/.pth or a .safetensors file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        from ..validate import file_format_hint

        what = f"{type(e).__name__}: " + (re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0])[:200] if str(e) else "")
        hint = ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            what = "torch.load(weights_only=True) refused its Python objects"
            hint = (" - it seems to hold a pickled model object or other Python objects; save "
                    "model.state_dict() instead (gradleak never unpickles code)")
        else:
            what = file_format_hint(path) or what
        raise WeightsError(f"cannot read {path} ({what}){hint}; expected a PyTorch state_dict "
                           "saved with torch.save(model.state_dict(), ...) or a .safetensors file") from None


def read_state_dict(source: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a checkpoint file or mapping: unwraps ``{'state_dict': ...}``,
    ``{'model': ...}`` and similar wrappers (Lightning, timm, ...). Prefixes are handled by
    :func:`load_weights`, which knows the model's names."""
    what = _describe(source)
    obj = _read(Path(source).expanduser()) if isinstance(source, (str, Path)) else source
    for _ in range(4):  # unwrap nested wrappers
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{what} holds a {type(obj).__name__}; expected a state_dict (a dict of parameter name "
                           "-> tensor) or a dict wrapping one under 'state_dict' / 'model'")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        keys = list(obj)[:8]
        raise WeightsError(f"{what} is not a state_dict: " + (f"the entries {bad} are not tensors" if bad else "it is "
                           "empty") + f" (keys: {keys}); expected a dict of parameter name -> tensor, possibly "
                           f"wrapped under one of {list(_WRAPPER_KEYS)}")
    return {str(k): v for k, v in obj.items()}


def _strip_prefixes(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in state) and not all(k.startswith(p) for k in model_keys):
                state = {k[len(p):]: v for k, v in state.items()}
                changed = True
    return state


def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def check_weights(model: nn.Module, source: str | Path | Mapping[str, Any], *,
                  strict: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Match a checkpoint against ``model.state_dict()``. Returns ``(state, problems)``: the checkpoint with
    wrapper prefixes removed, and every problem as a sentence (empty when it fits). With ``strict=False``,
    missing and unexpected keys are tolerated (not problems); mis-shaped and non-finite tensors never are.
    A missing ``num_batches_tracked`` buffer (old checkpoints) is never a problem."""
    target = model.state_dict()
    state = _strip_prefixes(read_state_dict(source), set(target))
    problems: list[str] = []
    missing = [k for k in target if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in target]
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {missing}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {unexpected}")
    for k, ref in target.items():
        v = state.get(k)
        if v is None:
            continue
        if _shape(v) != _shape(ref):
            hint = ""
            if v.ndim == 2 and ref.ndim == 2 and v.shape[1] == ref.shape[1] and v.shape[0] != ref.shape[0]:
                hint = f" (the checkpoint has {v.shape[0]} outputs: build the model with num_classes={v.shape[0]})"
            elif v.ndim == 4 and ref.ndim == 4 and v.shape[1] != ref.shape[1] and k.endswith("weight"):
                hint = f" (the checkpoint expects {v.shape[1]} input channels here)"
            problems.append(f"'{k}' has shape {_shape(v)} in the checkpoint, the model expects {_shape(ref)}{hint}")
        elif ref.is_floating_point() and not v.is_floating_point():
            problems.append(f"'{k}' is {v.dtype} in the checkpoint, the model expects a floating-point tensor")
        elif v.is_floating_point() and not torch.isfinite(v).all():
            problems.append(f"'{k}' holds {int((~torch.isfinite(v)).sum())} NaN/inf value(s)")
    if not any(k in state for k in target):
        name = getattr(model, "zoo_name", type(model).__name__)
        problems.append(f"no key in common: is this a checkpoint of another architecture? the model ({name}) has "
                        f"keys like {list(target)[:3]}, the checkpoint {list(state)[:3]}")
    return state, problems


def load_weights(model: nn.Module, source: str | Path | Mapping[str, Any], *, strict: bool = True,
                 inplace: bool = False) -> nn.Module:
    """Load a checkpoint into ``model``.

    source: a path (``.safetensors``; anything else is read with ``torch.load(weights_only=True)``) or a
        state_dict mapping. Wrappers (``{'state_dict': ...}``, ``{'model': ...}``, ...) and the prefixes
        'module.' (DataParallel), '_orig_mod.' (torch.compile), 'model.' (Lightning) are removed.
    strict: every model key must be in the checkpoint and every checkpoint key in the model (torch's
        semantics); with ``strict=False`` only the matching keys are loaded. Shapes must always match.
    inplace: False (default) returns a deep copy of ``model`` with the weights loaded and leaves ``model``
        untouched; True loads into ``model`` itself and returns it.
    Tensors are converted to the model's dtype and device. Raises :class:`~gradleak.WeightsError` listing
    every missing / unexpected / mis-shaped key at once. The returned model keeps its training/eval mode
    and records the source in ``model.weights_source``.
    """
    state, problems = check_weights(model, source, strict=strict)
    if problems:
        name = getattr(model, "zoo_name", type(model).__name__)
        err = WeightsError(f"{_describe(source)} does not fit the model {name}: " + "; ".join(problems))
        err.problems = problems
        raise err
    target = model if inplace else copy.deepcopy(model)
    ref = target.state_dict()
    converted = {}
    for k, v in state.items():
        if k not in ref:
            continue
        r = ref[k]
        converted[k] = v.to(device=r.device, dtype=r.dtype if r.is_floating_point() else v.dtype)
    with torch.no_grad():
        target.load_state_dict(converted, strict=False)
    target.weights_source = _describe(source)
    return target


def save_weights(model: nn.Module | Mapping[str, torch.Tensor], path: str | Path, *,
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write a model's ``state_dict`` (or a state_dict mapping) to ``path``: ``.safetensors`` (with string
    ``metadata``, plus the zoo name and input shape when known) or anything else with ``torch.save``
    (loadable with ``torch.load(weights_only=True)``). Creates parent folders; returns the path."""
    p = Path(path).expanduser()
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": "pt"}
        if isinstance(model, nn.Module):
            if getattr(model, "zoo_name", None):
                meta["gradleak_model"] = str(model.zoo_name)
            if getattr(model, "input_shape", None):
                meta["input_shape"] = "x".join(str(s) for s in model.input_shape)
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
        save_file(state, str(p), metadata=meta)
    else:
        torch.save(state, str(p))
    return p


# ---- the training sidecar: ``gradleak train --out runs/net.pt`` writes runs/net.json beside the checkpoint -----

def sidecar_path(checkpoint: str | Path) -> Path:
    """Where ``gradleak train`` writes the sidecar of a checkpoint: ``runs/net.pt`` -> ``runs/net.json``."""
    return Path(checkpoint).with_suffix(".json")


def find_sidecar(weights: str | Path) -> Path | None:
    """The sidecar of a checkpoint: ``net.json`` beside ``net.pt``; for an epoch checkpoint ``net-e2.pt`` the
    run's ``net.json``. None when there is none."""
    p = Path(weights).expanduser()
    for cand in (sidecar_path(p), p.with_name(re.sub(r"-e\d+$", "", p.stem) + ".json")):
        if cand.is_file():
            return cand
    return None


def read_sidecar(weights: str | Path) -> dict[str, Any] | None:
    """The training config (model, model_options, dataset, image_size, input_shape, num_classes, built_for,
    ...) the sidecar of ``weights`` records, or None when the checkpoint has no sidecar. A JSON file there
    that is not a gradleak training record is ignored; one that cannot be read is a WeightsError."""
    path = find_sidecar(weights)
    if path is None:
        return None
    import json

    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read the sidecar {path} of {weights} ({type(e).__name__}: {e}); expected the "
                           "JSON gradleak train writes beside its checkpoint") from None
    cfg = d.get("config") if isinstance(d, dict) else None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), str) or "input_shape" not in cfg:
        return None
    return {**cfg, "sidecar": str(path)}


def _same(a: Any, b: Any) -> bool:
    import json

    return json.dumps(a, sort_keys=True, default=list) == json.dumps(b, sort_keys=True, default=list)


def apply_sidecar(weights: str | Path | None, *, model: str | None = None, model_options: Mapping[str, Any] | None = None,
                  dataset: str | None = None, images: str | None = None, image_size: int | None = None,
                  num_classes: int | None = None) -> dict[str, Any]:
    """Fill what the user did not give from the sidecar of ``weights`` (see :func:`read_sidecar`).

    Returns ``{"model", "model_options", "dataset", "image_size", "num_classes", "notes"}``: the model and its
    options, the training dataset (unless ``dataset`` or ``images`` is given: the attacked data may be other
    data of the same shape), the image size and the head's classes the model was trained with. A value given
    that contradicts the sidecar (another model, option, image size or number of classes: the weights would
    not fit) is one :class:`~gradleak.errors.ValidationError` listing every conflict. Without a sidecar the
    values come back as given (``model`` is then required)."""
    from ..errors import ValidationError
    from . import custom
    from .registry import models as registry

    opts = dict(model_options or {})
    given = {"model": model, "dataset": dataset, "image_size": image_size, "num_classes": num_classes}
    out = {"model": model, "model_options": opts, "dataset": dataset, "image_size": image_size,
           "num_classes": num_classes, "notes": []}
    side = read_sidecar(weights) if weights else None
    if side is None:
        if model is None:
            raise ValidationError("model", ["give --model NAME, FILE.py:NAME or module.path:NAME" +
                                            (f" ({weights} has no sidecar .json from gradleak train to read it from)"
                                             if weights else "")])
        return out
    what = f"--weights {weights} (trained as recorded in {side['sidecar']})"
    problems = []

    def key(m: str) -> str:
        return custom.normalize(m) if custom.is_spec(m) else (registry.canonical(m) if m in registry else m)

    if model is not None and key(model) != key(side["model"]):
        problems.append(f"--model {model} conflicts with the model trained, {side['model']}")
    for k, v in (side.get("model_options") or {}).items():
        if k in opts and not _same(opts[k], v):
            problems.append(f"--model-opt {k}={opts[k]!r} conflicts with the {k}={v!r} it was trained with")
    built = side.get("built_for") or {"input_shape": side["input_shape"], "num_classes": side.get("num_classes")}
    shape = list(built["input_shape"])
    trained_size = side.get("image_size") or (shape[-1] if len(shape) == 3 and shape[-1] == shape[-2] else None)
    if image_size is not None and len(shape) == 3 and tuple(shape[-2:]) != (image_size, image_size):
        problems.append(f"--image-size {image_size} conflicts with its inputs of shape {tuple(shape)}")
    if num_classes is not None and built.get("num_classes") is not None and num_classes != built["num_classes"]:
        problems.append(f"--num-classes {num_classes} conflicts with the {built['num_classes']} classes it was "
                        "built for")
    if problems:
        raise ValidationError(what, problems)
    out["model"] = model or side["model"]
    out["model_options"] = {**(side.get("model_options") or {}), **opts}
    own_data = images is None and dataset in (None, side.get("dataset"))  # the data it was trained on
    if own_data and dataset is None:
        out["dataset"] = side.get("dataset")
    if image_size is None and (side.get("image_size") is not None or not own_data):
        out["image_size"] = trained_size
    if num_classes is None and built.get("num_classes") is not None and not own_data:
        out["num_classes"] = int(built["num_classes"])
    filled = [f"{k} {out[k]}" for k in ("model", "dataset", "image_size", "num_classes")
              if out[k] is not None and out[k] != given[k]]
    if filled:
        out["notes"].append(f"from the sidecar of {weights}: " + ", ".join(filled))
    return out


__all__ = ["load_weights", "save_weights", "check_weights", "read_state_dict", "sidecar_path", "find_sidecar",
           "read_sidecar", "apply_sidecar"]
