"""Your own model wherever a zoo name is accepted: a model spec ``FILE.py:NAME`` or ``module.path:NAME``.

NAME is an ``nn.Module`` class or a factory returning one. It is called with the model options
(``--model-opt k=v`` / ``model_options``); when its signature has a parameter ``input_shape`` and/or
``num_classes`` (by keyword or as the zoo factories' first positional parameters ``f(input_shape,
num_classes, **options)``), those are passed from the data. The build is seeded exactly as
:func:`gradleak.models.build` seeds a zoo model, so the same spec, options and seed give the same parameters
in any process.

A file is imported under a module name derived from its resolved path (``_gradleak_file_<hex of the path>``),
and a finder on ``sys.meta_path`` (installed with :mod:`gradleak.models`) imports such a name again from the
path it encodes: a model (or a pickled instance of its class) reaches a spawned worker or a Ray task from the
spec string alone. Every problem (no such file, the import fails, NAME is not defined, not a class or factory,
the constructor raises, an option it does not take) is one :class:`~gradleak.errors.ValidationError` line.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ValidationError

_FILE_PREFIX = "_gradleak_file_"


def is_spec(name: Any) -> bool:
    """True for a model spec (``FILE.py:NAME`` or ``module.path:NAME``); zoo names never hold a ':'."""
    return isinstance(name, str) and ":" in name


def _split(spec: str) -> tuple[str, str]:
    target, _, attr = spec.strip().rpartition(":")
    problems = []
    if not target:
        problems.append("nothing before ':'")
    if not attr.isidentifier():
        problems.append(f"{attr!r} after ':' is not a Python name")
    if problems:
        raise ValidationError(f"model {spec!r}", [", ".join(problems) + "; expected FILE.py:NAME or "
                                                  "module.path:NAME (NAME an nn.Module class or a factory)"])
    return target, attr


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def normalize(spec: str) -> str:
    """The spec with its file made absolute (``net.py:Net`` -> ``/abs/net.py:Net``): the same model from any
    working directory, e.g. in a worker started elsewhere. Zoo names and module specs come back unchanged."""
    if not is_spec(spec):
        return spec
    target, attr = _split(spec)
    if not _is_file(target):
        return f"{target}:{attr}"
    return f"{Path(target).expanduser().resolve()}:{attr}"


def label(spec: str) -> str:
    """A short, filesystem-safe label of a spec: ``path/to/net.py:Net`` -> ``net.Net``."""
    if not is_spec(spec):
        return spec
    target, attr = _split(spec)
    stem = Path(target).stem if _is_file(target) else target
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in f"{stem}.{attr}")


def _module_name(path: Path) -> str:
    return _FILE_PREFIX + str(path).encode("utf-8").hex()


def _where(exc: BaseException, path: str | None) -> str:
    """' (net.py line 12)': the deepest frame of the user's file in the traceback, if any."""
    if path is None:
        return ""
    if isinstance(exc, SyntaxError) and exc.filename == path and exc.lineno:
        return f" ({Path(path).name} line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    return f" ({Path(path).name} line {frames[-1].lineno})" if frames else ""


def _last_line(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return lines[-1].strip() if lines else type(exc).__name__


def _exec_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.parent)
    added = folder not in sys.path
    if added:  # the file may import its siblings, as `python net.py` would let it
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


class _FileFinder(importlib.abc.MetaPathFinder):
    """Imports ``_gradleak_file_<hex>`` again from the path it encodes (a spawned process unpickling a custom
    model's class looks it up by that name)."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_FILE_PREFIX) or "." in fullname:
            return None
        try:
            file = bytes.fromhex(fullname[len(_FILE_PREFIX):]).decode("utf-8")
        except ValueError:
            return None
        if not Path(file).is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def install_finder() -> None:
    if not any(isinstance(f, _FileFinder) for f in sys.meta_path):
        sys.meta_path.append(_FileFinder())


def _import(spec: str, target: str):
    """(module, the file path or None) for the part of the spec before ':'."""
    what = f"model {spec!r}"
    if _is_file(target):
        path = Path(target).expanduser()
        if not path.is_file():
            why = "is a folder" if path.is_dir() else "does not exist"
            full = f" ({path.resolve()})" if str(path.resolve()) != target else ""
            raise ValidationError(what, [f"the file {target}{full} {why}; expected a Python file defining the "
                                         "model, as FILE.py:NAME"])
        path = path.resolve()
        name = _module_name(path)
        if name in sys.modules:
            return sys.modules[name], str(path)
        try:
            return _exec_file(name, path), str(path)
        except Exception as e:
            raise ValidationError(what, [f"importing {target} failed{_where(e, str(path))}: {_last_line(e)}"]) from None
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:  # `gradleak` run from a project folder imports its packages (for this import only, as for files)
        sys.path.append(cwd)
    try:
        module = importlib.import_module(target)
    except Exception as e:
        raise ValidationError(what, [f"importing the module {target} failed: {_last_line(e)}"]) from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    return module, getattr(module, "__file__", None)


def _definitions(module) -> tuple[list[str], list[str]]:
    """(nn.Module classes, other callables) defined in ``module`` (not imported into it)."""
    classes, funcs = [], []
    for k, v in vars(module).items():
        if k.startswith("_") or getattr(v, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(v) and issubclass(v, nn.Module):
            classes.append(k)
        elif inspect.isfunction(v):
            funcs.append(k)
    return sorted(classes), sorted(funcs)


@dataclass(frozen=True)
class Resolved:
    """A resolved spec: the callable, where it comes from, and its parameters."""

    spec: str
    target: Callable[..., Any]
    source: str
    path: str | None
    data_params: tuple[str, ...]   # of 'input_shape', 'num_classes': those it takes
    positional_data: bool          # they are positional-only (passed first, in that order)
    options: dict[str, Any]        # the other parameters it takes -> default (inspect.Parameter.empty: required)
    any_options: bool              # it takes **kwargs

    @property
    def name(self) -> str:
        return self.source.rpartition(":")[2]

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.target) or ""
        return doc.strip().splitlines()[0] if doc.strip() else f"custom model from {self.source}"


def resolve(spec: str) -> Resolved:
    """Import the spec's file or module and look its NAME up (typed one-line errors)."""
    target, attr = _split(spec)
    module, path = _import(spec, target)
    what = f"model {spec!r}"
    if not hasattr(module, attr):
        classes, funcs = _definitions(module)
        have = "; ".join(p for p in (f"nn.Module classes: {', '.join(classes)}" if classes else "",
                                     f"functions: {', '.join(funcs)}" if funcs else "") if p)
        raise ValidationError(what, [f"{target} defines no {attr!r}; it defines " +
                                     (have or "no nn.Module class and no function")])
    obj = getattr(module, attr)
    if not callable(obj) or (inspect.isclass(obj) and not issubclass(obj, nn.Module)):
        t = type(obj).__name__
        kind = f"the class {attr}" if inspect.isclass(obj) else f"{'an' if t[:1] in 'aeiou' else 'a'} {t}"
        raise ValidationError(what, [f"{attr} is {kind}, expected an nn.Module class or a factory function "
                                     "returning an nn.Module"])
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    data, opts, any_opts, positional = [], {}, sig is None, False
    for p in (sig.parameters.values() if sig is not None else ()):
        if p.kind == p.VAR_KEYWORD:
            any_opts = True
        elif p.kind == p.VAR_POSITIONAL:
            continue
        elif p.name in ("input_shape", "num_classes"):
            data.append(p.name)
            positional = positional or p.kind == p.POSITIONAL_ONLY
        else:
            opts[p.name] = p.default
    return Resolved(spec, obj, f"{target}:{attr}", path, tuple(data), positional, opts, any_opts)


def option_problems(res: Resolved, options: dict[str, Any]) -> list[str]:
    """Unknown options, data parameters given as options, and required parameters left out."""
    problems = []
    data = sorted(k for k in options if k in ("input_shape", "num_classes"))
    if data:
        problems.append(f"{', '.join(data)} come(s) from the data, not from a model option (use --image-size / "
                        "--num-classes)")
    accepted = ", ".join(f"{k}={v!r}" if v is not inspect.Parameter.empty else k for k, v in res.options.items())
    unknown = sorted(k for k in options if k not in res.options and k not in ("input_shape", "num_classes"))
    if unknown and not res.any_options:
        problems.append(f"unknown option(s) {unknown} for {res.name}; accepted parameters: {accepted or 'none'}"
                        + (f" (and {', '.join(res.data_params)} from the data)" if res.data_params else ""))
    missing = [k for k, v in res.options.items() if v is inspect.Parameter.empty and k not in options]
    if missing:
        problems.append(f"{res.name} needs the parameter(s) {missing}: give them with --model-opt "
                        f"{missing[0]}=VALUE (model_options in Python)")
    return problems


def build(spec: str, *, input_shape: tuple[int, ...], num_classes: int, seed: int | None = 0,
          dtype: torch.dtype = torch.float32, **options: Any) -> nn.Module:
    """Build the model a spec names (see the module docstring); ``seed`` as in :func:`gradleak.models.build`."""
    res = resolve(spec)
    what = f"model {spec!r}"
    problems = option_problems(res, options)
    if problems:
        raise ValidationError(what, problems)
    args: list[Any] = []
    kwargs = dict(options)
    given = {"input_shape": tuple(int(s) for s in input_shape), "num_classes": int(num_classes)}
    for k in ("input_shape", "num_classes"):
        if k in res.data_params:
            if res.positional_data:
                args.append(given[k])
            else:
                kwargs[k] = given[k]

    def call():
        model = res.target(*args, **kwargs)
        if isinstance(model, nn.Module) and _is_lazy(model):  # lazy layers get their sizes from one forward
            check_forward(model, given["input_shape"], spec)
        return model

    try:
        if seed is None:
            model = call()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = call()
    except ValidationError:
        raise
    except Exception as e:
        raise ValidationError(what, [f"{res.name}({_show(args, kwargs)}) raised{_where(e, res.path)}: "
                                     f"{_last_line(e)}"]) from None
    if not isinstance(model, nn.Module):
        raise ValidationError(what, [f"{res.name}({_show(args, kwargs)}) returned a {type(model).__name__}, "
                                     "expected a torch.nn.Module"])
    try:  # what reports and checkpoints show for the model (a user's class may forbid new attributes)
        model.zoo_name = spec
        model.model_spec = spec
        if getattr(model, "input_shape", None) is None:
            model.input_shape = given["input_shape"]
    except Exception:
        pass
    return model.to(dtype)


def _is_lazy(model: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


def forward_error(spec: str, input_shape: tuple[int, ...], exc: BaseException, path: str | None = None
                  ) -> ValidationError:
    """The one-line error of a model whose forward fails on a batch of the data's shape."""
    return ValidationError(f"model {spec!r}", [f"its forward on a batch of shape {(1, *input_shape)} (the data's) "
                                               f"raised{_where(exc, path)}: {_last_line(exc)}; build it for these "
                                               "inputs"])


def check_forward(model: nn.Module, input_shape: tuple[int, ...], spec: str | None = None) -> None:
    """Run ``model`` once on zeros of shape ``(1, *input_shape)`` (no grad, eval mode, its mode restored):
    a :func:`forward_error` when it fails (e.g. a model built for other inputs). Sizes lazy layers."""
    p = next((q for q in model.parameters() if not isinstance(q, nn.parameter.UninitializedParameter)), None)
    x = torch.zeros((1, *input_shape), dtype=p.dtype if p is not None and p.dtype.is_floating_point else None,
                    device=p.device if p is not None else None)
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as e:
        raise forward_error(spec or getattr(model, "model_spec", type(model).__name__), tuple(input_shape), e,
                            getattr(sys.modules.get(type(model).__module__), "__file__", None)) from None
    finally:
        model.train(was)


def _show(args, kwargs) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    s = ", ".join(parts)
    return s if len(s) <= 120 else s[:117] + "..."


__all__ = ["is_spec", "normalize", "label", "resolve", "build", "option_problems", "install_finder", "Resolved",
           "check_forward", "forward_error"]
