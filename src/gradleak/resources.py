"""Resource guards: estimate the memory a job needs BEFORE doing it, and refuse (one sentence, exit 2) when it
exceeds what the machine has (or the user's ``max_memory``).

The estimate is deliberately rough but an upper bound of the right order: the model is built on PyTorch's
``meta`` device (shapes only, no memory, milliseconds even for a 10,000-pixel input), its parameter count and
the sizes of every leaf module's output for one sample are read off, and multiplied by the number of copies a
job keeps alive:

- attack: 6 copies of the parameters (client model, the case's copy, the observed update, the candidate's
  update, its gradient, the optimiser state); 4 of the activations per sample and per local step (forward
  graph kept for a double backward) plus twice every convolution's unfolded input (kernel area x input
  channels per output pixel, what the CPU convolution's backward materialises); the optimiser's copies of the
  candidate batch (L-BFGS keeps 2 x history_size of them); the decoded input images (float64 while resizing);
- training: 5 copies of the parameters (weights, gradients, two Adam moments, the caller's model) and 3 of the
  activations of a mini-batch, plus the whole dataset three times (images, normalised copy, training split).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import GradleakError, ResourceError, ValidationError

_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text: str | int | float) -> int:
    """'8GB' -> 8e9 bytes; units B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValidationError("max_memory", [f"expected a size like 8GB, 512MiB or 2e9, got {text!r}"])
        value, unit = float(m.group(1)), m.group(2).lower()
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise ValidationError("max_memory", [f"expected a positive size, got {text!r}"])
    return int(size)


def format_size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes this process can still allocate: the smaller of the system's MemAvailable and the cgroup's
    limit minus its usage (containers). None when it cannot be told (not Linux)."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_f), _read_int(usage_f)
        if limit is not None and usage is not None and limit < 2 ** 60:
            candidates.append(max(limit - usage, 0))
            break
    return min(candidates) if candidates else None


@dataclass
class Estimate:
    """Estimated peak bytes of a job and its parts (name -> bytes)."""

    total: int
    parts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{k} {format_size(v)}" for k, v in self.parts.items())


def _meta_sizes(model_name: str, input_shape: tuple[int, ...], num_classes: int,
                model_options: dict[str, Any]) -> tuple[int, int, int]:
    """(parameter count, activation elements per sample, unfolded convolution inputs per sample) of a zoo
    model, measured on the meta device. A custom model (a spec ``FILE.py:NAME``) whose constructor or forward
    does not run on the meta device is built for real on the CPU instead; a forward that fails there on the
    data's shape is a :class:`ValidationError` (the model does not take these inputs)."""
    from . import models

    try:
        return _sizes(model_name, input_shape, num_classes, model_options, "meta")
    except Exception:
        if not models.custom.is_spec(model_name):
            raise
    try:
        return _sizes(model_name, input_shape, num_classes, model_options, "cpu")
    except GradleakError:
        raise
    except Exception as e:
        raise models.custom.forward_error(model_name, tuple(input_shape), e) from None


def _sizes(model_name: str, input_shape: tuple[int, ...], num_classes: int, model_options: dict[str, Any],
           device: str) -> tuple[int, int, int]:
    from . import models

    with torch.device(device):
        net = models.build(model_name, input_shape=tuple(input_shape), num_classes=num_classes, seed=0,
                           **model_options)
    return module_sizes(net, input_shape, real=device != "meta")


def module_sizes(net: torch.nn.Module, input_shape: tuple[int, ...], *, real: bool = False) -> tuple[int, int, int]:
    """(parameter count, activation elements per sample, unfolded convolution inputs per sample) of a
    model, by one forward pass on the meta device (shapes only: no memory, no change to ``net``); ``real``:
    the forward runs on zeros where ``net`` is (for a model whose forward does not run on the meta device)."""
    from torch.func import functional_call

    params = sum(p.numel() for p in net.parameters())
    acts = [0, 0]

    def hook(m, _i, out):
        if isinstance(out, torch.Tensor):
            acts[0] += out.numel()
            if isinstance(m, torch.nn.modules.conv._ConvNd):
                acts[1] += out.numel() // m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    state = {k: torch.empty_like(v, device="meta") for k, v in [*net.named_parameters(), *net.named_buffers()]}
    training = net.training
    try:
        with torch.no_grad():
            net.eval()
            like = next(iter(state.values()), torch.empty((), device="meta"))
            if real:
                p = next(iter(net.parameters()), None)
                net(torch.zeros((1, *input_shape), dtype=like.dtype, device=p.device if p is not None else None))
            else:
                functional_call(net, state, (torch.empty((1, *input_shape), device="meta", dtype=like.dtype),))
    finally:
        net.train(training)
        for h in handles:
            h.remove()
    return int(params), int(acts[0]), int(acts[1])


def estimate_attack(model_name: str, input_shape: tuple[int, ...], num_classes: int, *, batch_size: int,
                    dtype: torch.dtype = torch.float32, model_options: dict[str, Any] | None = None,
                    local_steps: int = 1, candidate_copies: int = 4, variable_scale: float = 1.0) -> Estimate:
    """Upper-bound estimate of an attack job's peak memory (see the module docstring). ``candidate_copies``:
    how many copies of the candidate's variables the attack's optimiser keeps (Adam: 4; L-BFGS: 2 x history +
    4); ``variable_scale``: variables per image element (1 for the image itself; a Laplacian pyramid's levels,
    up to 4/3, whose image and its gradient are then two more copies of the candidate)."""
    b = torch.empty((), dtype=dtype).element_size()
    params, acts, unfolded = _meta_sizes(model_name, input_shape, num_classes, dict(model_options or {}))
    pixels = math.prod(input_shape) * batch_size
    parts = {"parameters": 6 * params * b,
             "activations": (4 * acts + 2 * unfolded) * batch_size * max(local_steps, 1) * b,
             **_candidate_parts(pixels, b, candidate_copies, variable_scale), "images": 2 * pixels * 8}
    return Estimate(sum(parts.values()), parts)


def _candidate_parts(pixels: int, b: int, copies: int, scale: float) -> dict[str, int]:
    """The optimiser's copies of the candidate's variables, and (a parametrised image) the image and its gradient."""
    parts = {"optimiser": int(math.ceil(copies * pixels * scale)) * b}
    if scale != 1.0:
        parts["parametrised_image"] = 2 * pixels * b
    return parts


def estimate_trials(model: torch.nn.Module, input_shape: tuple[int, ...], *, batch_size: int,
                    dtype: torch.dtype = torch.float32, local_steps: int = 1,
                    candidate_copies: int = 4, variable_scale: float = 1.0) -> tuple[Estimate, Estimate]:
    """(shared, per trial) estimates for optimisation trials batched over one model: shared are 4 copies
    of the parameters (client model, the case's copy, the observed update, the unit target); per trial its
    update and the backward's copies of it (4 x parameters: under vmap every trial's update is its own), 4
    x the activations per sample and local step plus twice the unfolded convolution inputs (as
    :func:`estimate_attack`), and the optimiser's copies of the candidate's variables (``variable_scale``
    per image element, as :func:`estimate_attack`)."""
    b = torch.empty((), dtype=dtype).element_size()
    params, acts, unfolded = module_sizes(model, tuple(input_shape))
    pixels = math.prod(input_shape) * batch_size
    shared = {"parameters": 4 * params * b}
    per = {"updates": 4 * params * b,
           "activations": (4 * acts + 2 * unfolded) * batch_size * max(local_steps, 1) * b,
           **_candidate_parts(pixels, b, candidate_copies, variable_scale)}
    return Estimate(sum(shared.values()), shared), Estimate(sum(per.values()), per)


def estimate_training(model_name: str, input_shape: tuple[int, ...], num_classes: int, *, num_images: int,
                      batch_size: int, dtype: torch.dtype = torch.float32,
                      model_options: dict[str, Any] | None = None) -> Estimate:
    """Upper-bound estimate of a training job's peak memory (see the module docstring)."""
    b = torch.empty((), dtype=dtype).element_size()
    params, acts, unfolded = _meta_sizes(model_name, input_shape, num_classes, dict(model_options or {}))
    parts = {"parameters": 5 * params * b, "activations": (3 * acts + unfolded) * min(batch_size, num_images) * b,
             "dataset": 3 * math.prod(input_shape) * num_images * 4}
    return Estimate(sum(parts.values()), parts)


def check_memory(estimate: Estimate, *, max_memory: int | str | None = None, what: str = "this job") -> None:
    """Raise :class:`ResourceError` when ``estimate`` exceeds ``max_memory`` (bytes or '8GB'; default: the
    memory available now). Nothing is checked when neither is known."""
    limit = parse_size(max_memory) if max_memory is not None else available_memory()
    if limit is None or estimate.total <= limit:
        return
    source = "--max-memory (max_memory)" if max_memory is not None else "the memory available on this machine"
    raise ResourceError(f"{what} would need about {format_size(estimate.total)} ({estimate.describe()}), more than "
                        f"{source}, {format_size(limit)}: use a smaller image size, batch or model, or raise the "
                        "limit with --max-memory")


def check_training_job(model_name: str, source: str, *, image_size=None, batch_size: int | None = None,
                       num_images: int | None = None, model_options: dict[str, Any] | None = None,
                       max_memory=None) -> None:
    """Refuse a ``gradleak train`` job whose estimate exceeds the memory (checked before the data are
    decoded, for the sources whose spec is known without decoding; nothing is checked for the others)."""
    from . import data

    peek = data.peek_spec(source, image_size=image_size, split="train")
    if peek is None:
        return
    shape, classes, n = peek
    n = min(n, num_images) if num_images else n
    try:
        est = estimate_training(model_name, shape, classes, num_images=n, batch_size=batch_size or 32,
                                model_options=model_options)
    except GradleakError:
        raise
    except Exception:  # a model option the zoo rejects: the real build says so
        return
    check_memory(est, max_memory=max_memory, what=f"training {model_name} on {n} image(s) of shape {shape}")


__all__ = ["check_training_job", "parse_size", "format_size", "available_memory", "Estimate", "estimate_attack",
           "estimate_trials", "module_sizes", "estimate_training",
           "check_memory"]
