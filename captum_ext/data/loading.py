r"""Load the user's own model and images: no configuration files, no downloads.

- :func:`load_model`: a TorchScript file, or ``package.module:factory`` (any callable
  returning an ``nn.Module``, e.g. ``torchvision.models:resnet18``), optionally with a state
  dict read with ``torch.load(..., weights_only=True)`` (or a ``.safetensors`` file).
- :func:`load_image_folder`: every image under a folder (recursively, sorted by path) as one
  ``N x C x H x W`` tensor, with the ImageNet, digits or no preprocessing.
- :func:`denormalize_for_display`: back to ``[0, 1]`` ``H x W x C`` arrays for plotting.
- :func:`resolve_inputs`: THE one place that turns an images folder (or the bundled sample
  digits), a transform name and class names into tensors, labels and names
  (``folder_labels`` is its rule for folder names to labels).
- :func:`default_cam_layer` and :func:`expose_layer`: which layer to explain, and a way to
  explain a layer inside a TorchScript model (whose submodules cannot carry hooks).

Error messages name the argument: the Python parameter (```spec```, ```weights```,
```directory```), or, where the caller passes ``argument_names=COMMAND_LINE_NAMES`` as
``captum-ext`` does, the command-line flag first (```--model` (spec)``, ```--weights```,
```--images```), so the command line can show them as they are.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import threading
import unicodedata
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from captum_ext._utils.caller import user_stacklevel
from captum_ext._utils.deprecation import moved_names
from captum_ext._utils.layers import is_exported, uncompiled, unwrap_distributed
from captum_ext._utils.validation import parse_device
from captum_ext.exported import exported_input_shape, exported_module_types
from captum_ext.torchscript import TorchScriptLayerModel, expose_layer

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "TRANSFORMS",
    "LogitsOutput",
    "TorchScriptLayerModel",
    "default_cam_layer",
    "denormalize_for_display",
    "expose_layer",
    "load_image_folder",
    "ImageFolderDataset",
    "load_model",
    "load_state_dict_file",
    "RandomWeightsWarning",
    "ResolvedInputs",
    "folder_labels",
    "read_class_names",
    "resolve_inputs",
    "with_logits_output",
]

#: File name endings read by :func:`load_image_folder` (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jfif",
    ".jpe",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
)

#: Names accepted by ``transform`` in :func:`load_image_folder`.
TRANSFORMS: tuple[str, ...] = ("imagenet", "none", "digits")

#: Per-channel mean and standard deviation of ImageNet (RGB, pixels scaled to [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_IMAGENET_RESIZE = 256
_IMAGENET_CROP = 224
_DIGITS_SIZE = 28
_STATE_DICT_KEYS = ("state_dict", "model_state_dict")
#: checkpoints of timm, DeiT, detectron2: ``{"model": state_dict, "epoch": ..., ...}``, read
#: when that entry is a state dict (a mapping of names to tensors)
_MODEL_KEY = "model"
_LIST_AT_MOST = 5


# --------------------------------------------------------------------------------------
# models


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:_LIST_AT_MOST])
    more = len(names) - _LIST_AT_MOST
    return shown + (f" (and {more} more)" if more > 0 else "")


#: what ``captum-ext`` passes as ``argument_names`` to the loaders: their parameters by the
#: names of its options, so that their errors name the flags
COMMAND_LINE_NAMES: dict[str, str] = {
    "spec": "--model",
    "weights": "--weights",
    "device": "--device",
    "directory": "--images",
    "images": "--images",
    "transform": "--transform",
    "limit": "--limit",
    "path": "--classes",
    "class_names": "--classes",
}


def _names(argument_names: Mapping[str, str] | None) -> dict[str, str]:
    """``argument_names`` checked, as a plain (picklable) dict."""
    if argument_names is None:
        return {}
    if not isinstance(argument_names, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in argument_names.items()
    ):
        raise TypeError(
            "`argument_names` must be a mapping of parameter names to the names shown in "
            f"errors (str to str), got {type(argument_names).__name__}."
        )
    return dict(argument_names)


def _arg(names: Mapping[str, str], name: str, *, python: bool = False) -> str:
    """How an error names the parameter ``name``: ```name``` from Python; the flag that
    ``names`` maps it to from the command line (```--model```, or ```--model` (spec)``
    with ``python``)."""
    shown = names.get(name, name)
    if python and shown.startswith("--"):
        return f"`{shown}` ({name})"
    return f"`{shown}`"


def _mention(names: Mapping[str, str], name: str) -> str:
    """``name`` in a piece of advice: the bare flag (--weights) from the command line, else
    ```weights```."""
    shown = names.get(name, name)
    return shown if shown.startswith("--") else f"`{shown}`"


def _on_command_line(names: Mapping[str, str]) -> bool:
    """Whether the caller names the parameters by command-line flags (``captum-ext``, with
    ``COMMAND_LINE_NAMES``): advice then names no Python-only parameter or value."""
    return any(shown.startswith("--") for shown in names.values())


def _looks_like_path(spec: str) -> bool:
    return (
        "/" in spec
        or "\\" in spec
        or spec.startswith(".")
        or Path(spec).suffix.lower()
        in (".pt", ".pth", ".ts", ".jit", ".torchscript", ".zip", ".pt2")
    )


def _load_torchscript(path: Path, device: torch.device, names: Mapping[str, str]) -> nn.Module:
    saved = _torch_save_spec_error(path, names)
    if saved is not None:
        raise saved
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but is exactly what users hand us here.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = first.split(". ")[0].rstrip(".")
        raise ValueError(
            f"{_arg(names, 'spec', python=True)} {str(path)!r} is not a TorchScript file "
            f"({first}). Save one with torch.jit.save(torch.jit.script(model), path), or pass "
            f"'package.module:factory' and the weights with {_mention(names, 'weights')}."
        ) from None


def _load_exported(path: Path, device: torch.device, names: Mapping[str, str]) -> nn.Module:
    from captum_ext.exported import FixedBatchError, load_exported

    try:
        return load_exported(path, device)
    except FixedBatchError as error:
        raise ValueError(f"{_arg(names, 'spec', python=True)}: {error}") from None
    except (RuntimeError, ValueError, KeyError, OSError, zipfile.BadZipFile) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{_arg(names, 'spec', python=True)} {str(path)!r} is not a torch.export archive "
            f"({first}). Save one "
            "with torch.export.save(torch.export.export(model, (example,)), path)."
        ) from None


@contextmanager
def _current_folder_importable(module_name: str) -> Iterator[None]:
    """Import ``module_name`` from the current folder too, as ``python -m`` does (the
    installed ``captum-ext`` script does not put it on ``sys.path``): when it is not
    importable otherwise and a module or package of its top-level name lies in the current
    folder, the folder leads ``sys.path`` inside the block (the factory's call included) and
    is taken off it again afterwards; the imported module stays imported."""
    top = module_name.partition(".")[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = True  # let the import itself say what is wrong
    folder = os.getcwd()
    here = Path(folder)
    if found or not ((here / f"{top}.py").is_file() or (here / top).is_dir()):
        yield
        return
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if sys.path and sys.path[0] == folder:
            del sys.path[0]
        elif folder in sys.path:  # moved by the module: take off the entry put there
            sys.path.remove(folder)


def _python_file_error(spec: str, names: Mapping[str, str]) -> Exception:
    """The error for a ``spec`` whose module part is a Python file (``nets.py:build``, which
    is imported by its module name, ``nets:build``): a ValueError, or a FileNotFoundError
    when there is no such file."""
    what = _arg(names, "spec", python=True)
    source, _, factory_name = spec.rpartition(":")
    source_file = Path(source.strip()).expanduser()
    module = f"'{source_file.stem}:{factory_name.strip()}'"
    if source_file.is_file():
        return ValueError(
            f"{what} {spec!r} names a Python file; give its module instead, {module}, with "
            f"{str(source_file.parent)!r} as the current folder or on PYTHONPATH."
        )
    return FileNotFoundError(
        f"{what} file not found: {str(source_file)!r} (in {spec!r}). A Python file is given "
        f"by its module, {module}, with the folder that holds it as the current folder or on "
        "PYTHONPATH."
    )


def _import_factory(spec: str, names: Mapping[str, str]) -> Callable[[], Any]:
    what = _arg(names, "spec", python=True)
    module_name, _, attribute = spec.partition(":")
    module_name, attribute = module_name.strip(), attribute.strip()
    if not module_name or not attribute:
        raise ValueError(
            f"{what} {spec!r}: expected 'package.module:factory' (e.g. "
            "'torchvision.models:resnet18') or the path of a TorchScript file."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        if module_name.lower().endswith(".py"):  # 'mymodels.py:net'
            raise _python_file_error(spec, names) from None
        raise ValueError(
            f"{what} {spec!r}: cannot import module {module_name!r} ({error}). Is it "
            "installed, or on PYTHONPATH?"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=_LIST_AT_MOST, cutoff=0.5)
            hint = f" Closest names: {', '.join(close)}." if close else ""
            raise ValueError(
                f"{what} {spec!r}: {module_name!r} has no attribute {attribute!r}.{hint}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(
            f"{what} {spec!r}: {attribute!r} is a {type(target).__name__}, not a "
            "callable that returns a model."
        )
    try:
        inspect.signature(target).bind()
    except TypeError:
        raise ValueError(
            f"{what} {spec!r}: {attribute!r} cannot be called without arguments; "
            f"write a small factory function that builds the model and point "
            f"{_mention(names, 'spec')} at it."
        ) from None
    except ValueError:  # no signature available (some builtins): just try calling it
        pass
    return target


def load_state_dict_file(
    weights: str | Path,
    device: Any = "cpu",
    *,
    argument_names: Mapping[str, str] | None = None,
) -> dict[str, Tensor]:
    r"""Read a state dict safely: ``torch.load(..., weights_only=True)`` or safetensors.

    Checkpoints that wrap the state dict as ``{"state_dict": ...}``,
    ``{"model_state_dict": ...}`` or ``{"model": ...}`` (timm, DeiT, detectron2) are
    unwrapped.

    Args:
        weights (str or Path): a file written by ``torch.save(model.state_dict(), path)``, or
            a ``.safetensors`` file (needs the ``safetensors`` package).
        device (str or torch.device, optional): where the tensors are loaded. Default: "cpu".
        argument_names (Mapping[str, str], optional): how errors name the parameters, e.g.
            ``{"weights": "--weights"}`` (``captum-ext`` passes ``COMMAND_LINE_NAMES``).
            Default: None (their Python names).

    Returns:
        dict[str, Tensor]: the state dict.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``weights`` is a directory, or the file cannot be read with
            ``weights_only=True`` or holds no state dict (a TorchScript file or
            ``torch.export`` archive is said to be one, to give as the model instead).
    """
    names = _names(argument_names)
    what = _arg(names, "weights")
    path = Path(weights).expanduser()
    device = parse_device(device, argument=names.get("device", "device"))
    if path.is_dir():
        raise ValueError(f"{what} {str(weights)!r} is a directory; expected a state dict's file.")
    if not path.is_file():
        raise FileNotFoundError(f"{_arg(names, 'weights')} file not found: {str(weights)!r}.")
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(
                f"{what} {str(weights)!r} is a safetensors file, but the safetensors "
                "package is not installed (pip install safetensors)."
            ) from None
        try:
            loaded: Any = load_file(str(path), device=str(device))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(
                f"{what} {str(weights)!r} could not be read as safetensors: {error}"
            ) from None
    else:
        kind = _model_archive(path)
        if kind is not None:  # torch.load would advise weights_only=False (unsafe)
            raise ValueError(
                f"{what} {str(weights)!r} is a {kind}, which holds the whole model "
                "(architecture and weights), not a state dict; give it as "
                f"{_mention(names, 'spec')} instead, without {_mention(names, 'weights')}."
            )
        try:
            loaded = torch.load(path, map_location=device, weights_only=True)
        except Exception as error:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
            text = _error_text(error)
            if _WEIGHTS_ONLY_REFUSED in text:
                raise ValueError(
                    f"{what} {str(weights)!r} holds {_PICKLED_OBJECTS}, {_NEVER_UNPICKLED}. "
                    "Save its state dict, torch.save(model.state_dict(), path), and give the "
                    f"architecture as {_mention(names, 'spec')}."
                ) from None
            first = text.splitlines()[0] if text else ""
            raise ValueError(
                f"{what} {str(weights)!r} could not be loaded with weights_only=True "
                f"({type(error).__name__}: {first}). Save a plain state dict with "
                "torch.save(model.state_dict(), path)."
            ) from None
    loaded = _unwrapped_checkpoint(loaded)
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"{what} {str(weights)!r} does not hold a state dict (a mapping of parameter "
            f"names to tensors); it holds a {type(loaded).__name__}."
        )
    odd = [(k, v) for k, v in loaded.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if odd:
        key, value = odd[0]
        raise ValueError(
            f"{what} {str(weights)!r} does not hold a state dict (a mapping of parameter "
            f"names to tensors): its entry {key!r} is of type {type(value).__name__}"
            + (f" ({len(odd)} entries are not tensors)" if len(odd) > 1 else "")
            + "; save model.state_dict() itself."
        )
    return dict(loaded)


#: what ``torch.load(..., weights_only=True)`` says when a file holds pickled objects
_WEIGHTS_ONLY_REFUSED = "Weights only load failed"
_PICKLED_OBJECTS = (
    "pickled Python objects (a whole model saved with torch.save(model, path), or a "
    "checkpoint with objects in it)"
)
_NEVER_UNPICKLED = "which are never unpickled here (weights_only=True: unpickling runs code)"


def _error_text(error: BaseException) -> str:
    """An error's message without torch's terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()


def _unwrapped_checkpoint(loaded: Any) -> Any:
    """The state dict inside a checkpoint that wraps it (``{"state_dict": ...}``,
    ``{"model_state_dict": ...}``, or ``{"model": ...}`` holding a mapping of names to
    tensors); anything else as it is."""
    if not isinstance(loaded, Mapping):
        return loaded
    for key in _STATE_DICT_KEYS:
        if isinstance(loaded.get(key), Mapping):
            return loaded[key]
    inner = loaded.get(_MODEL_KEY)
    return inner if _is_state_dict(inner) else loaded


def _is_state_dict(value: Any) -> bool:
    """Whether ``value`` is a mapping of parameter names (str) to tensors."""
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()
    )


#: how a file of ``torch.save`` in its legacy format (not a zip file) begins: its magic
#: number pickled with protocol 2 (``torch.serialization.MAGIC_NUMBER``)
_LEGACY_TORCH_SAVE_START = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def _torch_save_format(path: Path) -> str | None:
    """``"zip"`` or ``"legacy"`` when ``path`` was written by ``torch.save`` (a zip file with
    ``<name>/data.pkl`` that is neither a TorchScript file nor a ``torch.export`` archive
    (:func:`_model_archive`), or a file of the legacy format), else None."""
    try:
        if zipfile.is_zipfile(path):
            if _model_archive(path) is not None:
                return None
            with zipfile.ZipFile(path) as archive:
                entries = {name.partition("/")[2] for name in archive.namelist()}
            return "zip" if "data.pkl" in entries else None
        with open(path, "rb") as file:
            start = file.read(len(_LEGACY_TORCH_SAVE_START))
    except (OSError, zipfile.BadZipFile, ValueError):
        return None  # the TorchScript loader says what is wrong with it
    return "legacy" if start == _LEGACY_TORCH_SAVE_START else None


def _torch_save_spec_error(path: Path, names: Mapping[str, str]) -> ValueError | None:
    """The error for a ``spec`` file written by ``torch.save`` (a state dict, or a whole
    model pickled with ``torch.save(model, path)``), which the TorchScript loader only calls
    "not a TorchScript file (... constants.pkl)"; None for any other file. The file is read
    with ``weights_only=True`` alone: pickled objects are told apart by that refusing them,
    never unpickled."""
    kind = _torch_save_format(path)
    if kind is None:
        return None
    what = f"{_arg(names, 'spec', python=True)} {str(path)!r}"
    weights, spec = _mention(names, "weights"), _mention(names, "spec")
    architecture = (
        f"with {spec} 'package.module:factory' building the architecture (e.g. "
        "'torchvision.models:resnet18')"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception as error:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        if _WEIGHTS_ONLY_REFUSED not in _error_text(error):
            return None
        return ValueError(
            f"{what} is not a TorchScript file but a torch.save file holding {_PICKLED_OBJECTS}, "
            f"{_NEVER_UNPICKLED}. Save the model's state dict, "
            f"torch.save(model.state_dict(), path), and give that file as {weights}, "
            f"{architecture}; or save the model as TorchScript, "
            "torch.jit.save(torch.jit.script(model), path)."
        )
    if _is_state_dict(_unwrapped_checkpoint(loaded)):
        return ValueError(
            f"{what} is a state dict (torch.save(model.state_dict(), path)), not a TorchScript "
            f"file: it holds the weights but not the architecture. Give it as {weights}, "
            f"{architecture}."
        )
    return ValueError(
        f"{what} is not a TorchScript file but a torch.save file holding a "
        f"{type(loaded).__name__}, neither a model nor a state dict. Save a model with "
        "torch.jit.save(torch.jit.script(model), path), or pass 'package.module:factory' "
        f"and its state dict with {weights}."
    )


def _model_archive(path: Path) -> str | None:
    """What kind of whole-model archive ``path`` is, by the entries of its zip file: "a
    TorchScript file" (``torch.jit.save``: ``<name>/constants.pkl``, as ``torch.load``
    tells them), "a torch.export archive" (``torch.export.save``:
    ``<name>/archive_format``), else None (a state dict's file, or not a zip file)."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            entries = {name.partition("/")[2] for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile, ValueError):
        return None  # torch.load says what is wrong with it
    if "constants.pkl" in entries:
        return "TorchScript file (torch.jit.save)"
    if "archive_format" in entries:
        return "torch.export archive (torch.export.save)"
    return None


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _optional_keys(expected: set[str]) -> set[str]:
    """BatchNorm's ``num_batches_tracked`` counters: checkpoints saved before PyTorch 0.4.1
    (torchvision's own older ones among them) have none, and ``load_state_dict`` keeps the
    model's own when a plain dict lacks them."""
    return {key for key in expected if key.rpartition(".")[2] == "num_batches_tracked"}


def _key_matched(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """``state_dict`` with the keys of ``model`` (its ``module.`` / ``_orig_mod.`` prefixes
    taken off, in any nesting, where that makes them fit), or None when its keys do not fit:
    every key of the model but the optional ones (:func:`_optional_keys`), and no other."""
    expected = set(model.state_dict().keys())
    needed = expected - _optional_keys(expected)

    def fits(keys: set[str]) -> bool:
        return needed <= keys <= expected

    stripped = state_dict
    while not fits(set(stripped)):
        # saved from nn.DataParallel / DistributedDataParallel ("module.") or from
        # torch.compile(model) ("_orig_mod."), in any nesting
        prefix = next(
            (p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in stripped)), None
        )
        if prefix is None or not stripped:
            return None
        stripped = {k[len(prefix) :]: v for k, v in stripped.items()}
    return stripped


#: a key of the dense layers of torchvision's DenseNet in its checkpoints' old layout
#: ("denselayer1.norm.1.weight"), whose modules are now named "norm1", "conv2", ...
_OLD_DENSE_LAYER_KEY = re.compile(r"(denselayer[0-9]+\.(?:norm|relu|conv))\.([12])\.")


def _renamed_dense_layer_keys(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision DenseNet's checkpoint with the old names of its dense layers' keys
    (torchvision's own files, which its builders rename when they load them) renamed as the
    model has them (``denselayer1.norm.1.weight`` -> ``denselayer1.norm1.weight``), unless
    it fits as it is; any other model's, or one without those names, as it is. A checkpoint
    that still does not fit is then refused naming keys the model's way."""
    if type(model).__module__ != "torchvision.models.densenet" or not any(
        _OLD_DENSE_LAYER_KEY.search(key) for key in state_dict
    ):
        return state_dict
    if _key_matched(model, state_dict) is not None:
        return state_dict
    return {_OLD_DENSE_LAYER_KEY.sub(r"\1\2.", key): value for key, value in state_dict.items()}


def _final_layer_name(model: nn.Module) -> str | None:
    """The last module in ``named_modules()`` order with a weight matrix or kernel of its own
    (the classifier of torchvision's models), or None."""
    last = None
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)  # a plain Tensor in a TorchScript model
        if isinstance(weight, Tensor) and weight.dim() >= 2:
            last = name
    return last


@dataclasses.dataclass(frozen=True)
class _ClassCount:
    """The one way a state dict misses its model: the weights' class count (the rows of
    the final layer's weight and bias, and of an auxiliary classifier's) is not the model's."""

    weights: int
    model: int
    keys: list[str]


def _class_count_mismatch(model: nn.Module, matched: Mapping[str, Tensor]) -> _ClassCount | None:
    """A :class:`_ClassCount` when the only tensors of ``matched`` (keys as the model's) whose
    shape differs from the model's are weights and biases whose first dimension (rows: the
    classes) alone differs, the same number everywhere, the final layer's
    (:func:`_final_layer_name`) among them; else None."""
    own = model.state_dict()
    differ = [key for key, value in matched.items() if tuple(value.shape) != tuple(own[key].shape)]
    final = _final_layer_name(model)
    if not differ or final is None or f"{final}.weight" not in differ:
        return None
    rows = set()
    for key in differ:
        given, expected = matched[key], own[key]
        if (
            key.rpartition(".")[2] not in ("weight", "bias")
            or given.dim() != expected.dim()
            or given.dim() == 0
            or given.shape[1:] != expected.shape[1:]
        ):
            return None
        rows.add((int(given.shape[0]), int(expected.shape[0])))
    if len(rows) != 1:
        return None
    (weights_rows, model_rows) = rows.pop()
    return _ClassCount(weights_rows, model_rows, differ)


def _weights_class_count(model: nn.Module, state_dict: dict[str, Tensor]) -> int | None:
    """The class count of ``state_dict`` where it is the only thing that does not fit
    ``model`` (:func:`_class_count_mismatch`), else None."""
    model = uncompiled(model)
    matched = _key_matched(model, _renamed_dense_layer_keys(model, state_dict))
    if matched is None:
        return None
    mismatch = _class_count_mismatch(model, matched)
    return None if mismatch is None else mismatch.weights


def _apply_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], weights: Any, names: Mapping[str, str]
) -> None:
    what = _arg(names, "weights")
    model = uncompiled(model)  # a factory's torch.compile(model): load into its module
    state_dict = _renamed_dense_layer_keys(model, state_dict)
    matched = _key_matched(model, state_dict)
    mismatch = None if matched is None else _class_count_mismatch(model, matched)
    if mismatch is not None:
        raise ValueError(
            f"{what} {str(weights)!r} is for {mismatch.weights} classes, but the model "
            f"{type(model).__name__} has {mismatch.model}: only the rows of its final layer "
            f"differ ({_few(mismatch.keys)}), the architecture fits. Build the model with "
            f"{mismatch.weights} classes: point {_mention(names, 'spec')} at a factory of your "
            f"own that does, e.g. `def net(): return {type(model).__name__}(..., "
            f"num_classes={mismatch.weights})` in a module of yours, given as "
            "'module:net'."
        )
    if matched is None:
        expected = set(model.state_dict().keys())
        given = set(state_dict)
        missing = sorted(expected - _optional_keys(expected) - given)
        unexpected = sorted(given - expected)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
        raise ValueError(
            f"{what} {str(weights)!r} does not match the model {type(model).__name__}: "
            + "; ".join(parts)
            + f". Is {_mention(names, 'spec')} the architecture these weights were trained with?"
        )
    try:
        model.load_state_dict(matched, strict=True)
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [
            str(error).strip()
        ]
        raise ValueError(
            f"{what} {str(weights)!r} does not fit the model {type(model).__name__}: "
            + " ".join(details[:_LIST_AT_MOST])
            + f" Is {_mention(names, 'spec')} the architecture these weights were trained with?"
        ) from None


#: torchvision's builders that build another model when given pretrained weights: the
#: keyword arguments they set then (the auxiliary heads follow the checkpoint's keys)
_PRETRAINED_BUILDS: dict[str, tuple[re.Pattern[str], dict[str, bool]]] = {
    "inception_v3": (
        re.compile(r"(?:^|\.)AuxLogits\."),
        {"transform_input": True, "init_weights": False},
    ),
    "googlenet": (
        re.compile(r"(?:^|\.)aux[12]\."),
        {"transform_input": True, "init_weights": False},
    ),
}


def _torchvision_builder(factory: Any) -> str | None:
    """``"inception_v3"`` or ``"googlenet"`` when ``factory`` is that builder of
    ``torchvision.models`` (:data:`_PRETRAINED_BUILDS`), else None."""
    if not str(getattr(factory, "__module__", "") or "").startswith("torchvision.models"):
        return None
    import torchvision.models

    for name in _PRETRAINED_BUILDS:
        if factory is getattr(torchvision.models, name, None):
            return name
    return None


def _pretrained_kwargs(builder: str, state_dict: Mapping[str, Tensor]) -> dict[str, bool]:
    """What torchvision's ``builder`` passes to its model class when given weights, with
    ``aux_logits`` as the checkpoint's keys say."""
    aux_key, kwargs = _PRETRAINED_BUILDS[builder]
    return {**kwargs, "aux_logits": any(aux_key.search(key) for key in state_dict)}


def _warn_pretrained_build(
    spec: str, builder: str, kwargs: dict[str, bool], names: Mapping[str, str]
) -> None:
    """Say that ``builder`` was built as torchvision builds it for its own weights: a
    state dict does not tell whether it came from torchvision, and ``transform_input=True``
    changes what the model computes for weights trained without it."""
    settings = ", ".join(f"{key}={value}" for key, value in kwargs.items())
    warnings.warn(
        f"{_arg(names, 'spec')} {spec!r} with {_arg(names, 'weights')}: built as "
        f"torchvision builds {builder} for its pretrained weights ({settings}); "
        "transform_input=True re-normalises ImageNet-normalised inputs as those weights "
        f"expect. For weights trained with transform_input=False, give a factory of your "
        f"own, e.g. `def net(): return torchvision.models.{builder}(weights=None, "
        "transform_input=False, init_weights=False, aux_logits=...)`.",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _as_torchvision_pretrained(builder: str, model: nn.Module) -> None:
    """What torchvision's ``builder`` does after loading its weights by default: GoogLeNet's
    auxiliary heads (never trained in its weights) are dropped; Inception v3 keeps its."""
    if builder == "googlenet" and getattr(model, "aux_logits", False):
        model.aux_logits = False
        model.aux1 = None
        model.aux2 = None


def _factory_model(factory: Callable, kwargs: dict[str, Any], spec: str, what: str) -> nn.Module:
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{what} {spec!r}: the factory returned a {type(model).__name__}, "
            "expected a torch.nn.Module."
        )
    return model


def _torchvision_classifier_builder(factory: Any) -> bool:
    """Whether ``factory`` is a model builder of ``torchvision.models`` that takes
    ``num_classes`` (its classifiers' builders pass their keyword arguments to the model)."""
    if not str(getattr(factory, "__module__", "") or "").startswith("torchvision.models"):
        return False
    if isinstance(factory, type):
        return False
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )


class RandomWeightsWarning(UserWarning):
    """:func:`load_model` built a ``torchvision.models`` builder without ``weights``: the
    model has the random weights torchvision initialises it with, and what is explained is
    an untrained network. Where that is meant (a randomised baseline), silence it with
    ``warnings.filterwarnings("ignore", category=captum_ext.data.RandomWeightsWarning)``."""


def _builds_random_weights(factory: Any) -> bool:
    """Whether calling ``factory()`` certainly gives a model with random weights: a model
    builder of ``torchvision.models`` (and its sub-packages), whose ``weights`` default to
    None. Other factories may load trained weights themselves, which cannot be told without
    reading them, so they are not judged."""
    module = str(getattr(factory, "__module__", "") or "")
    return module.startswith("torchvision.models") and not isinstance(factory, type)


def _pretrained_checkpoint(factory: Any) -> tuple[str, str] | None:
    """``(file name, url)`` of torchvision's default pretrained checkpoint for ``factory``
    (what ``factory(weights="DEFAULT")`` downloads), or None when torchvision lists none."""
    try:
        from torchvision.models import get_model_weights

        url = str(get_model_weights(factory).DEFAULT.url)
    except Exception:  # no weights enum for this builder, or an older torchvision
        return None
    return url.rsplit("/", 1)[-1], url


def _random_weights_message(spec: str, factory: Any, names: Mapping[str, str]) -> str:
    """The warning for a ``torchvision.models`` builder given no weights, naming how to pass
    torchvision's pretrained weights from a local file."""
    builder = getattr(factory, "__name__", spec)
    weights = _arg(names, "weights")
    message = (
        f"{_arg(names, 'spec')} {spec!r} without {weights}: torchvision builds {builder} "
        "with random weights, so the predictions and explanations are those of an untrained "
        f"network. Pass trained weights as {weights} (a state dict file)"
    )
    checkpoint = _pretrained_checkpoint(factory)
    if checkpoint is None:
        return message + "."
    import torch.hub

    file_name, url = checkpoint
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if _on_command_line(names):
        given = f"{_mention(names, 'weights')} {cached}"
    else:
        given = f"{_mention(names, 'weights')}={str(cached)!r}"
    return message + (
        f"; for torchvision's pretrained weights give its own checkpoint file, {given} "
        f"(where torchvision.models.{builder}(weights='DEFAULT') downloads it, from {url})."
    )


def load_model(
    spec: str | os.PathLike,
    weights: str | Path | None = None,
    device: Any = "cpu",
    *,
    argument_names: Mapping[str, str] | None = None,
) -> nn.Module:
    r"""Load the user's model, ready to explain (in eval mode, on ``device``).

    Args:
        spec (str or PathLike): the path of a TorchScript file (``torch.jit.save``) or of a
            ``torch.export`` archive (``torch.export.save``, a ``.pt2`` file, read with
            :func:`captum_ext.exported.load_exported`), or
            ``"package.module:factory"``: the module is imported (from ``sys.path``, else
            from the current folder, as ``python -m`` does) and ``factory()`` is called
            with no arguments (``"torchvision.models:resnet18"`` builds a ResNet-18 with
            random weights; pass the trained ones with ``weights``: without them a builder
            of ``torchvision.models`` gets a :class:`RandomWeightsWarning` naming
            torchvision's checkpoint file to pass; other factories get none, as they may
            load trained weights themselves). ``factory`` may be a
            dotted attribute (``"package.module:Class.build"``).
        weights (str or Path, optional): a state dict file for the model, read with
            ``torch.load(path, map_location=device, weights_only=True)`` (never unpickles
            arbitrary objects) or, for ``.safetensors`` files, with the ``safetensors``
            package. Loaded with ``strict=True`` (BatchNorm's ``num_batches_tracked``
            counters, which checkpoints older than PyTorch 0.4.1 lack, excepted).
            torchvision's own checkpoint files (what its builders download) give its
            pretrained models: a DenseNet's old key names (``denselayer1.norm.1.weight``)
            are renamed as torchvision renames them, and ``torchvision.models:inception_v3``
            and ``torchvision.models:googlenet`` are built as torchvision builds them for
            its weights, ``transform_input=True`` (they take ImageNet-normalised images and
            re-normalise them as those weights expect), ``init_weights=False``, auxiliary
            heads as the file has them (GoogLeNet's then dropped, as torchvision does). For
            weights trained with ``transform_input=False``, write a factory that builds the
            model so (``inception_v3(init_weights=False, transform_input=False)``).
            A builder of ``torchvision.models`` given weights for another number of classes
            (the final layer's rows, e.g. 10 rather than 1000, the only difference) is built
            with that number (``num_classes``); any other factory must build the model with
            the weights' class count itself (the error says so).
            Default: None (keep the factory's weights).
        device (str or torch.device, optional): where the model is put. Default: "cpu".
        argument_names (Mapping[str, str], optional): how errors name the parameters, e.g.
            ``{"spec": "--model"}`` (``captum-ext`` passes ``COMMAND_LINE_NAMES``).
            Default: None (their Python names: ```spec```, ```weights```, ```device```).

    Returns:
        nn.Module: the model in eval mode. TorchScript models are ``ScriptModule``\ s, and
        ``.pt2`` archives give the fx ``GraphModule`` of the exported program: explain a layer
        of either through :func:`expose_layer`.

    Raises:
        FileNotFoundError: ``spec`` looks like a path that does not exist (or names a Python
            file that does not exist), or ``weights`` does not exist.
        ValueError: ``spec`` is neither a TorchScript file nor an importable factory (a
            Python file, ``nets.py:build``, is told to be given by its module,
            ``nets:build``; a file of ``torch.save`` is told to be a state dict, to give as
            ``weights``, or a pickled model, to save as a state dict: it is read with
            ``weights_only=True`` only), the factory does not return an ``nn.Module``,
            ``weights`` is a whole model (a TorchScript file) rather than a state dict, or
            the state dict does not match the model (the message lists a few missing and
            unexpected keys).

    Examples::

        >>> import torch, torchvision
        >>> from captum_ext.data import load_model
        >>> torch.save(torchvision.models.resnet18().state_dict(), "r18.pt")
        >>> model = load_model("torchvision.models:resnet18", weights="r18.pt")
    """
    names = _names(argument_names)
    what = _arg(names, "spec", python=True)
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"{what} must be a TorchScript file path or 'package.module:factory', got {spec!r}."
        )
    spec = spec.strip()
    device = parse_device(device, argument=names.get("device", "device"))
    builder: str | None = None  # torchvision's inception_v3 or googlenet, built as for weights
    state_dict: dict[str, Tensor] | None = None
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".pt2":
        model = _load_exported(path, device, names)
    elif path.is_file():
        model = _load_torchscript(path, device, names)
    elif path.is_dir():
        raise ValueError(
            f"{what} {spec!r} is a directory; expected a TorchScript file or "
            "'package.module:factory'."
        )
    elif ":" in spec and not _looks_like_path(spec):
        with _current_folder_importable(spec.partition(":")[0].strip()):
            factory = _import_factory(spec, names)
            builder = _torchvision_builder(factory)
            kwargs: dict[str, bool] = {}
            if weights is not None and builder is not None:  # built as for its weights
                state_dict = load_state_dict_file(weights, device, argument_names=names)
                kwargs = _pretrained_kwargs(builder, state_dict)
                _warn_pretrained_build(spec, builder, kwargs, names)
            model = _factory_model(factory, kwargs, spec, what)
            if weights is None and _builds_random_weights(factory):
                warnings.warn(
                    _random_weights_message(spec, factory, names),
                    RandomWeightsWarning,
                    stacklevel=user_stacklevel(),
                )
            if weights is not None and _torchvision_classifier_builder(factory):
                # built with the class count of the weights (torchvision builds 1000 classes
                # unless told), as torchvision's own builders read it from theirs
                if state_dict is None:
                    state_dict = load_state_dict_file(weights, device, argument_names=names)
                classes = _weights_class_count(model, state_dict)
                if classes is not None:
                    model = _factory_model(factory, {**kwargs, "num_classes": classes}, spec, what)
    elif _looks_like_path(spec):
        if Path(spec.rpartition(":")[0]).suffix.lower() == ".py":  # a file, not a module
            raise _python_file_error(spec, names)
        raise FileNotFoundError(f"{what} file not found: {spec!r}.")
    else:
        raise ValueError(
            f"{what} {spec!r} is neither an existing TorchScript file nor "
            "'package.module:factory' (e.g. 'torchvision.models:resnet18')."
        )
    if weights is not None:
        if state_dict is None:
            state_dict = load_state_dict_file(weights, device, argument_names=names)
        _apply_state_dict(model, state_dict, weights, names)
        if builder is not None:
            _as_torchvision_pretrained(builder, model)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------
# layers

# Last convolutional block of common torchvision classifiers, by class name.
_DEFAULT_LAYERS: dict[str, str] = {
    "ResNet": "layer4",
    "DenseNet": "features",
    # after the last stage's norm, where torchvision's Swin turns (N, h, w, C) into (N, C, h, w)
    "SwinTransformer": "permute",
    # the last stage (or the final 1 x 1 convolution block) of the other torchvision families
    "ConvNeXt": "features",
    "EfficientNet": "features",
    "RegNet": "trunk_output",
    "MNASNet": "layers",
    "ShuffleNetV2": "conv5",
    "SqueezeNet": "features",
    "GoogLeNet": "inception5b",
    "Inception3": "Mixed_7c",
}


# how LogitsOutput reads the model's output
LOGITS_READS = ("field", "one logit", "probabilities")


class LogitsOutput(nn.Module):
    r"""A classifier seen as a model that returns (N, classes) logits: what ``captum-ext
    report`` and ``score`` explain and score. ``reads`` says how its output is read:

    - ``"field"``: the output carries the logits in a field (Hugging Face's
      ``ImageClassifierOutput.logits``, or a dict's ``"logits"``);
    - ``"one logit"``: one logit per example (a binary classifier,
      ``P(class 1) = sigmoid(z)``), read as the two-class logits ``[-z/2, z/2]``
      (:func:`two_class_logits`);
    - ``"probabilities"``: the model ends in a softmax; its probabilities are read as
      log-probabilities, which are logits (:func:`log_probabilities`).

    With ``"one logit"``, the first output whose values can be read (not while compiling,
    exporting or tracing) is checked once per wrapper: where every value lies in [0, 1],
    a UserWarning (``SIGMOID_OUTPUT_WARNING``) says it looks like a final sigmoid's
    probability (a wrapper from :func:`with_logits_output` was checked there already).

    A ``logits`` field is taken first in every case. The wrapper shares the model's
    submodules, parameters and buffers (the same objects under the same names), so layer
    names, ``state_dict`` keys and ``.to()`` / ``.eval()`` are the model's, and its
    ``training`` flag is the model's own.

    Args:
        model (nn.Module): the classifier.
        reads (str, optional): ``"field"``, ``"one logit"`` or ``"probabilities"``.
            Default: ``"field"``.
    """

    def __init__(self, model: nn.Module, reads: str = "field") -> None:
        if reads not in LOGITS_READS:
            raise ValueError(f"`reads`={reads!r}: expected one of {LOGITS_READS}.")
        self.__dict__["model"] = model  # before Module.__init__: `training` reads it
        self.__dict__["reads"] = reads
        mode = model.training
        super().__init__()  # sets training = True: put the model's own mode back
        model.training = mode
        for shared in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[shared] = getattr(model, shared)

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self.__dict__["model"].training

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["model"].training = mode

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        output = _logits_field(self.__dict__["model"](*args, **kwargs))
        if self.reads == "one logit":
            if not self.__dict__.get("_checked", False) and not _values_unreadable(output):
                with _ONE_PROBABILITY_CHECK:  # threads sharing the wrapper: one warning
                    if not self.__dict__.get("_checked", False):
                        # the first output read, only
                        self.__dict__["_checked"] = _warn_if_one_probability(output)
            return _two_class(output)
        if self.reads == "probabilities":  # a softmax's output, found so when wrapped
            return _log(output)
        return output


_ONE_PROBABILITY_CHECK = threading.Lock()


def _logits_field(output: Any) -> Any:
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) and not isinstance(output, Tensor) else output


def _is_one_logit(output: Any) -> bool:
    return (
        isinstance(output, Tensor)
        and output.is_floating_point()
        and (output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1))
    )


#: the warning of :func:`two_class_logits` and :func:`with_logits_output` for one output per
#: example that lies in [0, 1] everywhere: a final ``torch.sigmoid``'s probability
SIGMOID_OUTPUT_WARNING = (
    "captum_ext: the model returns one value per example, and every value here lies in "
    "[0, 1]: it looks like a probability P(class 1) from a final torch.sigmoid, but it is "
    "read as a logit z (the two-class logits [-z/2, z/2]), so every example would be "
    "predicted class 1 (any p > 0 is a positive logit) with confidence sigmoid(p) instead "
    "of p, and every score and map built on it would be wrong. Give the model without its "
    "final sigmoid (returning its logit z), or turn the probability back into the logit "
    "first with torch.logit (e.g. output_transform=lambda p: "
    "captum_ext.data.two_class_logits(torch.logit(p)), or a model whose forward returns "
    "torch.logit(model(x))). If these values are logits that happen to lie in [0, 1], "
    "ignore this warning."
)


def _values_unreadable(output: Tensor) -> bool:
    """Whether reading ``output``'s values would break a trace or cannot be done: while
    ``torch.compile`` / ``torch.export`` trace the code (a data-dependent branch: a graph
    break, or ``GuardOnDataDependentSymNode``), under ``torch.jit.trace`` / script (the
    check would be baked into the graph), on FakeTensors and the meta device, and under
    ``torch.func`` transforms (``vmap``, ``grad``). The compiler test comes first: nothing
    after it is traced."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is None:  # pragma: no cover - torch < 2.3
        is_compiling = getattr(getattr(torch, "_dynamo", None), "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return True
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if output.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(output):
        return True
    try:  # under torch.func (vmap, grad) the values cannot be read
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(output))
    except AttributeError:  # pragma: no cover - torch without functorch
        return False


def _looks_like_one_probability(output: Tensor) -> bool:
    """Whether every value of the one-output-per-example ``output`` lies in [0, 1] (NaN
    rows aside; at least one value): a sigmoid's probability rather than a logit. False
    where the values cannot be read (:func:`_values_unreadable`: while compiling, exporting
    or tracing, on fake or meta tensors, under ``torch.func`` transforms)."""
    if _values_unreadable(output) or output.numel() == 0:
        return False
    with torch.no_grad():
        values = output.detach()
        values = values[~torch.isnan(values)]
        return bool(values.numel()) and bool(((values >= 0) & (values <= 1)).all())


@torch.jit.unused
def _warn_if_one_probability(output: Tensor, stacklevel: int | None = None) -> bool:
    """Warn (``SIGMOID_OUTPUT_WARNING``) where ``output`` looks like one probability
    per example; whether its values could be read (``False`` while compiling, tracing, ...:
    nothing was checked)."""
    if _values_unreadable(output):
        return False
    if _looks_like_one_probability(output):
        warnings.warn(
            SIGMOID_OUTPUT_WARNING,
            UserWarning,
            stacklevel=user_stacklevel() if stacklevel is None else stacklevel,
        )
    return True


def model_failed_on_images(model: Any, shape: Sequence[int], error: BaseException) -> ValueError:
    """The one-line error of ``captum-ext report`` / ``score`` when ``model`` fails on images
    of ``shape``: the model's own first line and where to look (``--transform``); for an
    exported program, the input shape it was exported with."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    fixed = exported_input_shape(model) if is_exported(model) else None
    note = ""
    if fixed is not None and any(size is not None for size in fixed[1:]):
        sizes = ", ".join("N" if size is None else str(size) for size in fixed)
        note = (
            f" The exported program takes inputs of shape ({sizes}) only (sizes fixed by "
            "torch.export.export; export with dynamic_shapes for others)."
        )
    return ValueError(
        f"the model failed on images of shape {tuple(shape)}: {first}.{note} Check --transform "
        "(image size, channels, normalisation) against what the model expects."
    )


def check_model_takes(model: Any, example: Tensor) -> None:
    """Run ``model`` once on ``example`` (a few of the user's images, without gradients, the
    model's state kept) before anything else is built on it: images the model cannot take
    (their size, channels or dtype) are a :func:`model_failed_on_images` ``ValueError``, not
    a traceback from inside the model."""
    from captum_ext._utils.model_state import preserved_state

    with preserved_state([model]), torch.no_grad():
        try:
            model(example)
        except (RuntimeError, ValueError, AssertionError, IndexError) as error:
            raise model_failed_on_images(model, example.shape, error) from None


def with_logits_output(model: nn.Module, example: Tensor) -> tuple[nn.Module, bool]:
    """``(LogitsOutput(model, reads), True)`` when ``model(example)`` is not (N, C) logits
    but has them in a ``logits`` field (``reads="field"``), is one logit per example ((N,)
    or (N, 1): a binary classifier, ``"one logit"``) or rows of probabilities (a final
    softmax, ``"probabilities"``); else ``(model, False)``. One forward pass, without
    gradients; the model's state is kept. A TorchScript model is wrapped as it is (its
    compiled layers take no hooks: to explain one of them, wrap the model that
    :func:`expose_layer` returns instead).

    One output per example whose every value on ``example`` lies in [0, 1] is still read as
    a logit, with a UserWarning (``SIGMOID_OUTPUT_WARNING``) that it looks like a final
    sigmoid's probability, which would make every example class 1, and what to do: one value
    per example is too little to tell a probability from a logit that lies in [0, 1] (give
    ``example`` several images), where a softmax's rows, which sum to 1, are read as
    probabilities without doubt."""
    from captum_ext._utils.batched_grad import (
        UNDERFLOW_NOTE,
        in_model_precision,
        looks_like_probabilities,
    )
    from captum_ext._utils.model_state import preserved_state

    with preserved_state([model]), torch.no_grad():
        output = model(*in_model_precision(model, (example,)))
    logits = _logits_field(output)
    if _is_one_logit(logits):
        reads = "one logit"
        checked = _warn_if_one_probability(logits, stacklevel=2)
    elif looks_like_probabilities(logits):
        reads = "probabilities"
        if bool((logits == 0).any()):
            warnings.warn(
                "The model ends in a softmax." + UNDERFLOW_NOTE, UserWarning, stacklevel=2
            )
    elif logits is not output:
        reads = "field"
    else:
        return model, False
    wrapper = LogitsOutput(uncompiled(model), reads)  # names of the eager model
    if reads == "one logit":
        wrapper.__dict__["_checked"] = checked  # warned here at most: not again in forward
    return wrapper, True


def log_probabilities(probabilities: Tensor) -> Tensor:
    r"""Logits of a model that ends in a softmax: the log of its probabilities, which are
    logits since ``softmax(log p) = p``. The values must be probabilities (in [0, 1], up to
    rounding): logits or other scores are refused. A probability of exactly 0 (a confident model's
    softmax underflows) is clamped to the dtype's smallest normal number, so the logits and
    their gradients stay finite; its own logit is lost, and the explanations of that class
    with it: explain such a model without its final softmax where you can.

    Args:
        probabilities (Tensor): ``(N, C)`` rows of probabilities (a softmax's output).

    Returns:
        Tensor: ``(N, C)`` logits.

    Raises:
        TypeError: ``probabilities`` is not a floating-point tensor.
        ValueError: a value lies outside [0, 1] (beyond a rounding tolerance) or is NaN.

    Example::

        >>> from captum_ext.data import log_probabilities
        >>> p = torch.tensor([[0.7, 0.2, 0.1]])
        >>> torch.allclose(log_probabilities(p).softmax(1), p)
        True
    """
    if not isinstance(probabilities, Tensor) or not probabilities.is_floating_point():
        raise TypeError(
            "`probabilities` must be a floating-point tensor of probabilities, got "
            f"{getattr(probabilities, 'dtype', type(probabilities).__name__)}."
        )
    _check_probabilities(probabilities)
    return _log(probabilities)


def _log(probabilities: Tensor) -> Tensor:
    """``log_probabilities`` without its checks (for outputs already known as probabilities)."""
    return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))


def _check_probabilities(probabilities: Tensor) -> None:
    """Values in [0, 1], up to rounding (a few ulps of 1 in the tensor's dtype)."""
    if probabilities.numel() == 0 or probabilities.device.type == "meta":
        return
    try:  # under torch.func (vmap, grad) the values cannot be read: checked outside
        if torch._C._functorch.is_functorch_wrapped_tensor(probabilities):
            return
    except AttributeError:  # pragma: no cover - torch without functorch
        pass
    tolerance = 8 * torch.finfo(probabilities.dtype).eps
    values = probabilities.detach()
    outside = (values < -tolerance) | (values > 1 + tolerance)  # NaN rows are left to the caller
    if bool(outside.any()):
        finite = values[~values.isnan()]
        raise ValueError(
            "`probabilities` must hold probabilities in [0, 1] (a softmax's output), got "
            f"values in [{float(finite.min()):g}, {float(finite.max()):g}]; pass the "
            "model's softmax probabilities, not its logits (logits need no conversion)."
        )


def two_class_logits(output: Tensor) -> Tensor:
    r"""The two-class logits ``[-z/2, z/2]`` of a binary classifier that outputs one logit ``z``.

    A binary classifier trained with ``BCEWithLogitsLoss`` gives ``P(class 1) = sigmoid(z)``.
    The softmax of ``[-z/2, z/2]`` is ``[1 - sigmoid(z), sigmoid(z)]``, the same
    probabilities, so the methods that read (N, C) logits (the contrasts, the trust scores,
    the deletion curves, which all take a softmax) see the model as the two-class classifier
    it is: class 0 the negative, class 1 the positive. The split is symmetric, so "why
    negative?" (Grad-CAM of class 0) is the opposite evidence of "why positive?", not the
    zero map of a constant logit, and the energy score ``log(2 cosh(z/2))`` ranks confident
    predictions of either class alike. Pass it as ``output_transform``, or wrap the model
    (``lambda x: two_class_logits(model(x))``) where a function has none.

    The output must be the logit z, not the probability ``sigmoid(z)``: where every value
    lies in [0, 1] (a model that ends in ``torch.sigmoid``) a UserWarning says so
    (``SIGMOID_OUTPUT_WARNING``), since every example would then be read as class 1;
    ``two_class_logits(torch.logit(p))`` gives the two-class logits of such a probability.
    The values are not read (no check) while ``torch.compile`` / ``torch.export`` /
    ``torch.jit`` trace or script the code, on fake or meta tensors and under
    ``torch.func`` transforms, so the wrapper ``lambda x: two_class_logits(model(x))``
    compiles (``fullgraph=True``) and exports as before.

    Args:
        output (Tensor): ``(N,)`` or ``(N, 1)`` logits.

    Returns:
        Tensor: ``(N, 2)`` logits, ``[-z/2, z/2]`` per example.

    Example::

        >>> from captum_ext.data import two_class_logits
        >>> z = torch.tensor([[2.0], [-1.0]])
        >>> two_class_logits(z)
        tensor([[-1.0000,  1.0000],
                [ 0.5000, -0.5000]])
        >>> torch.allclose(two_class_logits(z).softmax(1)[:, 1], torch.sigmoid(z[:, 0]))
        True
    """
    if not torch.jit.is_scripting() and not isinstance(output, Tensor):  # scriptable
        raise TypeError(f"`output` must be a tensor of logits, got {type(output).__name__}.")
    if output.dim() == 2 and output.shape[1] == 1:
        output = output[:, 0]
    if output.dim() != 1:
        raise ValueError(
            f"`output` must hold one logit per example, (N,) or (N, 1), got shape "
            f"{list(output.shape)}."
        )
    if not torch.jit.is_scripting():
        _warn_if_one_probability(output)
    return _two_class(output)


def _two_class(output: Tensor) -> Tensor:
    """``two_class_logits`` without its checks (for outputs already checked)."""
    if output.dim() == 2 and output.shape[1] == 1:
        output = output[:, 0]
    half = output / 2
    return torch.stack([-half, half], dim=1)


def _model_class_name(model: nn.Module) -> str:
    if isinstance(model, LogitsOutput):
        return type(model.model).__name__
    if isinstance(model, torch.jit.ScriptModule):
        return getattr(model, "original_name", type(model).__name__)
    if is_exported(model):  # the class it was exported from, as the graph recorded it
        return exported_module_types(model).get("", "") or type(model).__name__
    return type(model).__name__


def _module_types(model: nn.Module) -> dict[str, str]:
    """The class name of every module of ``model`` by dotted name (``""``: the model); for an
    exported model, of the modules it was exported from (it keeps none of its own)."""
    if is_exported(model):
        types = exported_module_types(model)
    else:
        types = {name: _model_class_name(module) for name, module in model.named_modules()}
    types[""] = _model_class_name(model)
    return types


def _children(types: Mapping[str, str], parent: str) -> list[str]:
    """The names of ``parent``'s direct children, in order (also those that never ran as a
    whole in an exported model, whose own children did)."""
    prefix = parent + "."
    children = (name[len(prefix) :].split(".", 1)[0] for name in types if name.startswith(prefix))
    return list(dict.fromkeys(children))


def default_cam_layer(model: nn.Module) -> str | None:
    r"""The usual CAM layer of a torchvision classifier (every family in
    ``torchvision.models``), or of any other model with numbered pre-norm transformer
    blocks; else None.

    Transformer blocks of other models (Hugging Face's ViT, DeiT, BEiT, Swin, CLIP vision
    towers): the last block's first norm (``...<last>.layernorm_before``, ``ln_1``, ``norm1``
    or ``layer_norm1``), in the last run of numbered blocks (a Swin's last stage: the runs in
    the order the modules are registered, or, for a model saved with ``torch.export``, in the
    order they ran). Only blocks that hold attention count (a module named or classed
    ``attn``, ``attention`` or ``qkv``, ``nn.MultiheadAttention``), or, without attention or
    convolution, whose first norm is named ``ln_1``, ``layernorm_before`` or ``layer_norm1``:
    the ``norm1`` of a convolutional block (timm's ResNetV2, PoolFormer) is not taken, and
    such a model gets None.

    ResNet: ``"layer4"`` (the last residual stage); DenseNet: ``"features"`` (the last dense
    block and its batch norm); VGG: the last ReLU of ``features`` (before the final max-pool);
    AlexNet likewise; MobileNet V2/V3: the last block of ``features``; ConvNeXt, EfficientNet
    and SqueezeNet: ``"features"`` (their last stage or final 1 x 1 convolution block);
    RegNet: ``"trunk_output"``; MNASNet: ``"layers"``; ShuffleNet V2: ``"conv5"``; GoogLeNet:
    ``"inception5b"``; Inception v3: ``"Mixed_7c"``; MaxViT: the last of its ``blocks``;
    Swin: ``"permute"`` (the last stage after
    its norm, as ``(N, C, h, w)``: the stages themselves are channels-last); ViT: the last
    encoder block's first norm, ``"encoder.layers.encoder_layer_<last>.ln_1"`` (tokens, which
    the report shows as a grid; the block's own output reaches the head only through the
    class token; timm's ViT: ``"blocks.<last>.norm1"``; timm's Swin: its final ``"norm"``,
    channels-last). Matched on the class name, so models loaded from TorchScript files (and
    timm's ResNet, ViT and Swin, which share the class names) are recognised too.

    Returns:
        str or None: a dotted name from ``model.named_modules()`` (of the eager model inside
        ``torch.compile``'s wrapper), or None when the model is not one of these families.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__} {model!r}.")
    # names of the eager model (inside torch.compile's and DataParallel's wrappers), which
    # the methods resolve too
    model = unwrap_distributed(model)
    types = _module_types(model)
    return _family_cam_layer(types[""], types) or _last_pre_norm(types)


#: the first norm of a pre-norm transformer block: torchvision, timm, Hugging Face (ViT,
#: DeiT, BEiT: layernorm_before; CLIP, SigLIP: layer_norm1)
_PRE_NORMS = ("ln_1", "norm1", "layernorm_before", "layer_norm1")
#: the first norms that only transformer blocks use; ``norm1`` is also the first norm of
#: convolutional blocks (timm's ResNetV2, PoolFormer, ConvNeXt-style blocks)
_TRANSFORMER_ONLY_PRE_NORMS = ("ln_1", "layernorm_before", "layer_norm1")
#: words in a module's name or class name that mark it as attention (``attn``, ``qkv``,
#: ``self_attention``, ``MultiheadAttention``, Hugging Face's ``ViTAttention``)
_ATTENTION_WORDS = ("attn", "attention", "qkv")
#: words that mark a convolutional network's channel or spatial gate (CBAM's
#: ``ChannelAttention``), which is called attention but mixes no tokens
_GATE_WORDS = ("channel", "spatial")


def _last_pre_norm(modules: Mapping[str, str]) -> str | None:
    """``<blocks>.<last index>.<first norm>`` of the last run of numbered transformer blocks
    (a Hugging Face ``...ForImageClassification``, say), else None.

    A run is the numbered children of one module; the last is the one last in ``modules``
    (registration order, the order in which a model's blocks usually run; an exported
    model's modules are in the order they ran): a Swin's last stage, not its longest.
    A block counts as a transformer block when it holds attention
    (:func:`_holds_attention`), or, holding no convolution either, when its first norm has
    a name only transformer blocks use (``ln_1``, ``layernorm_before``, ``layer_norm1``):
    the first norm of a convolutional block (``norm1`` of a ResNetV2 or PoolFormer block)
    is no transformer's."""
    candidates: list[tuple[str, int, str]] = []  # (run, block index, norm), in module order
    for name in modules:
        parts = name.split(".")
        if len(parts) >= 3 and parts[-1] in _PRE_NORMS and parts[-2].isdigit():
            candidates.append((".".join(parts[:-2]), int(parts[-2]), name))
    if not candidates:
        return None
    contents = _block_contents(modules, {name.rsplit(".", 1)[0] for *_, name in candidates})
    transformer = [
        (run, index, name)
        for run, index, name in candidates
        if _is_transformer_block(contents[name.rsplit(".", 1)[0]], name.rsplit(".", 1)[1])
    ]
    if not transformer:
        return None
    last_run = transformer[-1][0]
    return max((index, name) for run, index, name in transformer if run == last_run)[1]


def _block_contents(
    modules: Mapping[str, str], blocks: set[str]
) -> dict[str, list[tuple[str, str]]]:
    """``(name below the block, class name)`` of every module inside each of ``blocks``."""
    contents: dict[str, list[tuple[str, str]]] = {block: [] for block in blocks}
    for name, class_name in modules.items():
        parts = name.split(".")
        for depth in range(1, len(parts)):
            block = ".".join(parts[:depth])
            if block in contents:
                contents[block].append((".".join(parts[depth:]), class_name))
    return contents


def _is_transformer_block(contents: list[tuple[str, str]], first_norm: str) -> bool:
    """Whether a block holding ``contents`` (see :func:`_block_contents`), whose first norm
    is named ``first_norm``, is a transformer block (see :func:`_last_pre_norm`)."""
    if _holds_attention(contents):
        return True
    holds_convolution = any("Conv" in class_name for _, class_name in contents)
    return first_norm in _TRANSFORMER_ONLY_PRE_NORMS and not holds_convolution


def _holds_attention(contents: list[tuple[str, str]]) -> bool:
    """Whether a block's ``contents`` hold attention: an ``nn.MultiheadAttention``, or a
    module whose name or class name says attention (``attn``, ``attention``, ``qkv``: timm's
    ``attn.qkv``, Hugging Face's ``attention``, CLIP's ``self_attn``), other than a
    convolutional network's channel or spatial gate."""
    for name, class_name in contents:
        for word in (name.rsplit(".", 1)[-1].lower(), class_name.lower()):
            if any(w in word for w in _ATTENTION_WORDS) and not any(w in word for w in _GATE_WORDS):
                return True
    return False


def _family_cam_layer(name: str, types: Mapping[str, str]) -> str | None:
    """The CAM layer of the torchvision family ``name`` whose modules' class names are
    ``types`` (by dotted name), or None."""
    if name == "VisionTransformer":
        # the last block's first norm: after the block only the class token is read, so the
        # block's own output has zero gradients at the patch tokens
        norms = [n for n in types if n.startswith("encoder.layers.") and n.endswith(".ln_1")]
        # timm's VisionTransformer (same class name): blocks.<i>.norm1
        norms = norms or [n for n in types if n.startswith("blocks.") and n.endswith(".norm1")]
        return norms[-1] if norms else None
    if name == "SwinTransformer" and "permute" not in types and _children(types, "layers"):
        # timm's Swin (same class name): its final norm, (N, h, w, C) channels-last
        return "norm" if "norm" in types else None
    if name in _DEFAULT_LAYERS:
        layer = _DEFAULT_LAYERS[name]
        return layer if layer in types else None
    if name == "MaxVit":  # the last stage (a ModuleList does not run)
        stages = _children(types, "blocks")
        return f"blocks.{stages[-1]}" if stages else None
    children = _children(types, "features")
    if not children:
        return None
    if name in ("VGG", "AlexNet"):
        relus = [c for c in children if types.get(f"features.{c}") in ("ReLU", "ReLU6")]
        return f"features.{relus[-1]}" if relus else None
    if name in ("MobileNetV2", "MobileNetV3"):
        return f"features.{children[-1]}"
    return None


# --------------------------------------------------------------------------------------
# images


#: the file ``captum-ext report`` leaves in its output folder: image folders read for a
#: report or a score skip any folder holding it (a report written inside ``--images``)
REPORT_MARKER = ".captum-ext-report"


def _shown(path: str | os.PathLike) -> str:
    """A file name as text that can be written to UTF-8 (CSV, HTML, messages): bytes that
    are not UTF-8 in the name (kept by Python as surrogates) become U+FFFD."""
    return os.fsencode(os.fspath(path)).decode("utf-8", errors="replace")


def _visible(names: list[str]) -> list[str]:
    return sorted(name for name in names if not name.startswith("."))


def _find_images(
    directory: Path,
    extensions: Sequence[str],
    exclude: Sequence[Path] = (),
    names: Mapping[str, str] | None = None,
    hidden: list[str] | None = None,
) -> list[Path]:
    """Image files under ``directory``, sorted; hidden ones skipped (any name below
    ``directory`` starting with "."): Jupyter's ``.ipynb_checkpoints`` copies and macOS's
    ``._name.jpg`` resource forks are not the user's images. Folders reached through a
    symbolic link are read too (as torchvision's ``ImageFolder`` does; ``Path.rglob`` skips
    them), each real folder once: under its own name when it lies in ``directory``, else
    under the first link to it in path order. Folders in ``exclude`` (the report being
    written inside ``--images``) and the output folders of earlier reports
    (:data:`REPORT_MARKER`) are skipped. What else is left out says a warning: files whose
    ending Pillow reads as an image but ``extensions`` does not list, photos that Pillow
    cannot read here (:data:`_UNREADABLE_PHOTO_ENDINGS`: HEIC, raw, ...), links to nothing,
    and folders that cannot be listed; the warning also counts the hidden images skipped
    (:func:`_hidden_images`). ``hidden``, when given, receives those hidden images' names
    (for the error on a folder with no images)."""
    wanted = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    excluded = {os.path.realpath(p) for p in exclude}
    unlisted: list[str] = []
    hidden_places: list[tuple[Path, list[str], list[str]]] = []

    def walk(follow: bool):
        def note(error: OSError) -> None:
            if follow:
                unlisted.append(f"{_shown(error.filename)} ({error.strerror})")

        for folder, subfolders, files in os.walk(directory, followlinks=follow, onerror=note):
            if os.path.realpath(folder) in excluded or REPORT_MARKER in files:
                subfolders[:] = []  # never the pictures of a report written here
                continue
            hidden_folders = sorted(name for name in subfolders if name.startswith("."))
            subfolders[:] = _visible(subfolders)  # in path order: the same links win every time
            yield folder, subfolders, files, hidden_folders

    # the real folders under `directory`, read under their own names (not a link's, which
    # would label their images by the link's name in an order the file system chooses)
    own = {os.path.realpath(folder): os.path.normpath(folder) for folder, *_ in walk(False)}
    found, seen = [], set()
    skipped: dict[str, int] = {}
    unreadable: dict[str, int] = {}
    dangling: list[str] = []
    known = _pillow_endings()
    for folder, subfolders, files, hidden_folders in walk(True):
        real = os.path.realpath(folder)
        if real in seen or own.get(real, os.path.normpath(folder)) != os.path.normpath(folder):
            subfolders[:] = []  # read once, under its own name
            continue
        seen.add(real)
        if any(name.startswith(".") for name in files) or hidden_folders:
            hidden_places.append((Path(folder), files, hidden_folders))
        for name in _visible(files):
            path = Path(folder) / name
            ending = path.suffix.lower()
            if ending in wanted:
                if path.is_file():
                    found.append(path)
                elif not path.exists():
                    dangling.append(_shown(path))
            elif ending in known and tuple(extensions) == IMAGE_EXTENSIONS:  # not chosen
                skipped[ending] = skipped.get(ending, 0) + 1
            elif ending in _UNREADABLE_PHOTO_ENDINGS and ending not in known:  # no plugin
                unreadable[ending] = unreadable.get(ending, 0) + 1
    notes = []
    if skipped:
        counts = ", ".join(f"{n} {ending}" for ending, n in sorted(skipped.items()))
        if _on_command_line(names or {}) and "extensions" not in (names or {}):
            # no option chooses the endings there: say which are read
            read = f"only {', '.join(extensions)} files are read"
        else:
            read = f"{_arg(names or {}, 'extensions')} lists those read"
        notes.append(
            f"{sum(skipped.values())} files that Pillow may read as images, by endings not "
            f"read ({counts}; {read})"
        )
    if unreadable:
        counts = ", ".join(f"{n} {ending}" for ending, n in sorted(unreadable.items()))
        notes.append(
            f"{sum(unreadable.values())} files Pillow cannot read here ({counts}: phone or "
            "camera formats that Pillow reads only with a plugin, none registered here; "
            "convert them to JPEG or PNG first)"
        )
    if dangling:
        notes.append(f"{len(dangling)} links to nothing ({', '.join(dangling[:3])})")
    if unlisted:
        notes.append(f"{len(unlisted)} folders that cannot be listed ({', '.join(unlisted[:3])})")
    if notes or (hidden is not None and not found):  # looked into only then
        hidden_names = [] if hidden is None else hidden
        for folder, files, hidden_folders in hidden_places:
            relative = Path(os.path.relpath(folder, directory)).as_posix()
            prefix = "" if relative == "." else relative + "/"
            hidden_names.extend(
                _shown(prefix + name)
                for name in _hidden_images(folder, files, hidden_folders, wanted)
            )
        if notes and hidden_names:  # said along with the rest: skipped by design
            notes.append(_hidden_note(hidden_names))
    if notes:
        warnings.warn(
            f"{_arg(names or {}, 'directory')} {_shown(directory)!r}: skipped {'; '.join(notes)}.",
            stacklevel=3,
        )
    return sorted(found)


#: endings of photos (phones' HEIC / HEIF, AVIF, JPEG XL, cameras' raw files) that Pillow
#: reads only with a plugin: skipped with a warning, when no plugin registered them
_UNREADABLE_PHOTO_ENDINGS = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raw"}
)

#: how many entries of a hidden folder :func:`_hidden_images` looks at, at most
_HIDDEN_FOLDER_LOOK = 1000


def _hidden_images(
    folder: Path, files: Sequence[str], hidden_folders: Sequence[str], wanted: Sequence[str]
) -> list[str]:
    """The names in ``folder`` that are skipped as hidden (starting with ".") but look like
    images: files with an ending in ``wanted``, and hidden folders holding such a file
    (among their first :data:`_HIDDEN_FOLDER_LOOK` entries, at any depth), each with "/"."""
    names = [n for n in sorted(files) if n.startswith(".") and n.lower().endswith(tuple(wanted))]
    for name in hidden_folders:
        looked = 0
        for _, _, inside in os.walk(folder / name):
            looked += len(inside) + 1
            if any(n.lower().endswith(tuple(wanted)) for n in inside):
                names.append(name + "/")
                break
            if looked >= _HIDDEN_FOLDER_LOOK:
                break
    return names


def _hidden_note(hidden: Sequence[str]) -> str:
    """What the skip warning and the "no images" error say of the hidden images skipped
    (:func:`_hidden_images`: folders end with "/")."""
    folders = sum(name.endswith("/") for name in hidden)
    files = len(hidden) - folders
    parts = [f"{files} hidden image file{'' if files == 1 else 's'}"] if files else []
    if folders:
        parts.append(f"{folders} hidden folder{'' if folders == 1 else 's'} of images")
    shown = ", ".join(hidden[:3]) + (", ..." if len(hidden) > 3 else "")
    return (
        f"{' and '.join(parts)} ({shown}: names starting with '.' are never read, as Jupyter's "
        "checkpoints and macOS's ._ files are no images to explain; rename them to read them)"
    )


def _pillow_endings() -> frozenset[str]:
    """File endings Pillow opens as images (empty without Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        return frozenset()
    readable = Image.registered_extensions()  # also loads the plugins, filling Image.OPEN
    return frozenset(
        ending.lower()
        for ending, kind in readable.items()
        if kind in Image.OPEN and kind not in _PILLOW_STUBS
    )


#: Pillow formats that only identify a file (they need a handler of the user's to read it)
_PILLOW_STUBS = frozenset({"BUFR", "GRIB", "HDF5", "MPEG", "WMF"})


def _imagenet_pil(image) -> Tensor:
    """Resize the shorter side to 256, center-crop 224, scale to [0, 1], normalise."""
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(_IMAGENET_RESIZE * long / short)
    size = (_IMAGENET_RESIZE, new_long) if width <= height else (new_long, _IMAGENET_RESIZE)
    if (width, height) != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    width, height = image.size
    top = int(round((height - _IMAGENET_CROP) / 2.0))
    left = int(round((width - _IMAGENET_CROP) / 2.0))
    image = image.crop((left, top, left + _IMAGENET_CROP, top + _IMAGENET_CROP))
    x = _to_tensor(image)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def _imagenet_transform() -> Callable:
    try:
        from torchvision import transforms
    except ImportError:
        return _imagenet_pil
    pipeline = transforms.Compose(
        [
            transforms.Resize(_IMAGENET_RESIZE),
            transforms.CenterCrop(_IMAGENET_CROP),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return _RGBThen(pipeline)


class _RGBThen:
    """``pipeline(image.convert("RGB"))``, as a picklable object (a ``DataLoader`` with
    workers started by spawn, macOS's and Windows' default, pickles its dataset)."""

    def __init__(self, pipeline: Callable) -> None:
        self.pipeline = pipeline

    def __call__(self, image) -> Tensor:
        return self.pipeline(image.convert("RGB"))


def _to_tensor(image) -> Tensor:
    """PIL image (L or RGB) -> float C x H x W in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32) / 255.0


# grey modes: 1-bit, 8-bit, grey with alpha (16-bit and float ones: see _high_bit_depth)
_GREY_MODES = ("1", "L", "LA")


def _plain_transform(image) -> Tensor:
    """Grey images as one channel (a 1-bit or grey-and-alpha image too), others as RGB; a
    16-bit or float grey image (:class:`_UnitGrey`) with every level it has."""
    if isinstance(image, _UnitGrey):
        return torch.from_numpy(image.values.astype(np.float32))[None]
    if image.mode in _GREY_MODES:
        return _to_tensor(image if image.mode == "L" else image.convert("L"))
    return _to_tensor(image if image.mode == "RGB" else image.convert("RGB"))


def _digits_transform(image) -> Tensor:
    from PIL import Image

    from captum_ext.data import normalize_digits

    image = image.convert("L")
    if image.size != (_DIGITS_SIZE, _DIGITS_SIZE):
        image = image.resize((_DIGITS_SIZE, _DIGITS_SIZE), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8).copy()
    return normalize_digits(pixels).reshape(1, _DIGITS_SIZE, _DIGITS_SIZE)


class _ImageError(ValueError):
    """An image refused by the loader itself (its message already names the file)."""


@dataclasses.dataclass(frozen=True)
class _UnitGrey:
    """A 16-bit or float grey image scaled to [0, 1] in float64: for ``transform="none"``,
    which keeps every level (8 bits would merge them), and :meth:`eight_bit` for the
    transforms that read 8-bit images."""

    values: np.ndarray

    def eight_bit(self):
        from PIL import Image

        return Image.fromarray(np.round(self.values * 255.0).astype(np.uint8), mode="L")


def _high_bit_depth(image, path: Path, names: Mapping[str, str]):
    """High-bit-depth grey images as :class:`_UnitGrey` in [0, 1]; others unchanged. 16-bit
    ones (PNG, TIFF: modes ``I;16*``) are divided by 65535, and so are 32-bit integer ones
    (mode ``I``, which is also how Pillow opens some 16-bit files) whose values all lie in
    0..65535, whatever range they use (one holding only 0..255 comes out dark: a fixed scale
    keeps the images of a folder comparable); float ones (mode ``F``) in [0, 1] are kept as
    they are. Other ranges are refused (:class:`_ImageError`). PIL's own
    ``convert("RGB")`` / ``convert("L")`` clips every value above 255, which turns a 16-bit
    image almost entirely white."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (
        image.mode == "I" and values.min() >= 0 and values.max() <= 65535
    ):
        return _UnitGrey(values / 65535.0)
    if image.mode == "F" and values.min() >= 0.0 and values.max() <= 1.0:
        return _UnitGrey(values)
    if _on_command_line(names):  # a callable transform cannot be given there
        advice = (
            "convert it to an 8- or 16-bit image first (from Python, a callable `transform` "
            "can read it as it is)"
        )
    else:
        advice = f"pass a callable {_arg(names, 'transform')} that maps it to a C x H x W tensor"
    raise _ImageError(
        f"{_arg(names, 'directory')}: {str(path)!r} is a {image.mode!r} image with values in "
        f"[{values.min():g}, {values.max():g}], which has no standard scale to [0, 1]; "
        f"{advice}."
    )


def _has_transparent_pixels(image) -> bool:
    """Whether any pixel is less than opaque (an alpha band, or a palette's or grey image's
    transparent colour)."""
    if image.mode.startswith("I") or image.mode == "F":  # a grey level marked transparent
        if "transparency" not in image.info:
            return False
        return bool((np.asarray(image) == image.info["transparency"]).any())
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        return alpha.getextrema()[0] < 255
    return False


_EXIF_ORIENTATION = 0x0112


def _turned_tiff(image) -> bool:
    """Whether ``image`` (opened, not loaded) is a TIFF whose orientation tag turns it.
    Pillow turns such a TIFF when loading it, but a file it maps into memory (one strip of
    L, P, I;16, RGBA, CMYK pixels: grey scans among them) it reads at the turned size, which
    scrambles the pixels of a quarter turn (tags 5 to 8), silently; read from a stream it
    turns them right."""
    tags = getattr(image, "tag_v2", None)
    if image.format != "TIFF" or tags is None:
        return False
    return tags.get(_EXIF_ORIENTATION) not in (None, 1)


def _upright(image):
    """The image as a viewer shows it: phones and cameras store the pixels as the sensor read
    them and record the turn in the EXIF orientation tag, which PIL does not apply."""
    from PIL import ImageOps

    if image.getexif().get(_EXIF_ORIENTATION, 1) in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def _resolve_transform(transform: Any, names: Mapping[str, str]) -> Callable:
    if callable(transform):
        return transform
    if transform is None or transform == "none":
        return _plain_transform
    if transform == "imagenet":
        return _imagenet_transform()
    if transform == "digits":
        return _digits_transform
    raise ValueError(
        f"{_arg(names, 'transform')}={transform!r}: expected one of {', '.join(TRANSFORMS)} "
        "or a callable "
        "taking a PIL image and returning a C x H x W tensor."
    )


def load_image_folder(
    directory: str | Path,
    transform: str | Callable = "imagenet",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    *,
    labels_from_subfolders: bool = False,
    limit: int | None = None,
    exclude: Sequence[str | os.PathLike] = (),
    argument_names: Mapping[str, str] | None = None,
) -> tuple[Tensor, list[Path]] | tuple[Tensor, list[Path], list[str]]:
    r"""Read every image under ``directory`` (recursively, sorted by path) into one batch.

    Args:
        directory (str or Path): the folder. Images in sub-folders are included; with
            ``labels_from_subfolders=True`` the first sub-folder is the image's class name.
            Hidden files and folders (names starting with ".", such as
            ``.ipynb_checkpoints`` or macOS's ``._photo.jpg``) are skipped (the hidden
            images among them are counted in the error when nothing else is found, and in
            the warning on skipped files). Folders reached
            through symbolic links are read, each real folder once: under its own name when
            it lies in ``directory`` (a link ``best -> cat`` beside ``cat`` adds nothing),
            else under the first link to it in path order.
        transform (str or Callable, optional):

            - ``"imagenet"``: RGB, resize the shorter side to 256, center crop 224, scale to
              [0, 1], normalise with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`
              (torchvision's transforms when installed, else the same steps with PIL).
            - ``"none"``: scale to [0, 1] only (``ToTensor``); grey images (1-bit, 8-bit,
              16-bit, float, and grey with alpha, whose alpha is dropped) keep 1 channel,
              others become RGB. All images must then have the same size and mode.
            - ``"digits"``: grey, resize to 28 x 28, the bundled model's normalisation
              (:func:`captum_ext.data.normalize_digits`). Digits are expected light on dark,
              as in MNIST.
            - a callable taking a PIL image and returning a C x H x W float tensor.

            The named transforms turn photos upright by their EXIF orientation tag (as image
            viewers show them) and read 16-bit grey images (PNG, TIFF) scaled by 1/65535,
            32-bit integer ones with values in 0..65535 likewise (read as 16-bit, even when
            they hold only 0..255), and float ones in [0, 1] as they are (other integer or
            float ranges are refused; pass a callable): ``"none"`` keeps every level they have,
            ``"imagenet"`` and ``"digits"`` read them at 8 bits, as the images those models
            were trained on (Pillow itself reads 16-bit colour images at 8 bits). Alpha is
            dropped (the colour stored under a transparent pixel is read, as torchvision's
            ``ImageFolder`` does), with a warning naming the images that have transparent
            pixels; animated images and multi-page TIFFs give their first frame, with a
            warning naming them; colour
            profiles (ICC, e.g. a phone's Display P3) are not applied. A callable
            gets the image as PIL opened it, as ``ImageFolder`` passes it to its transform,
            so a pipeline the model was trained with sees the same pixels.
            Default: ``"imagenet"``.
        extensions (Sequence[str], optional): file name endings to read (case-insensitive).
            Links to nothing are skipped with a warning, and so, with the default, are files
            that Pillow may read as images by other endings, and always phone and camera
            photos that Pillow cannot read without a plugin (HEIC, HEIF, AVIF, JPEG XL, raw
            files such as DNG, CR2, NEF, ARW). Default: :data:`IMAGE_EXTENSIONS`.
        labels_from_subfolders (bool, optional): also return each image's sub-folder name
            (``""`` for images directly in ``directory``). Default: False.
        limit (int, optional): read only the first ``limit`` images (in path order).
            Default: None (all).
        exclude (Sequence[str or Path], optional): folders under ``directory`` not to read
            (e.g. an output folder written inside it). Folders holding a report written by
            ``captum-ext report`` (marked by a ``.captum-ext-report`` file) are always
            skipped. Default: none.
        argument_names (Mapping[str, str], optional): how errors and warnings name the
            parameters, e.g. ``{"directory": "--images"}`` (``captum-ext`` passes
            ``COMMAND_LINE_NAMES``). Default: None (their Python names).

    Returns:
        ``(images, paths)``, or ``(images, paths, labels)`` with ``labels_from_subfolders``:
        ``images`` a float32 ``N x C x H x W`` tensor, ``paths`` the files in the same order,
        ``labels`` the sub-folder names.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: no images found, an image cannot be read, or (``"none"``, callables)
            the images have different sizes.

    Examples::

        >>> from pathlib import Path
        >>> from PIL import Image
        >>> from captum_ext.data import denormalize_digits, load_image_folder, load_sample_digits
        >>> digits, digit_labels = load_sample_digits()  # 4 of each class, in class order
        >>> for i in (0, 1, 4, 5):  # two 0s and two 1s as PNG files, one folder per class
        ...     folder = Path("photos") / str(int(digit_labels[i]))
        ...     folder.mkdir(parents=True, exist_ok=True)
        ...     pixels = (denormalize_digits(digits[i])[0] * 255).round().byte().numpy()
        ...     Image.fromarray(pixels).save(folder / f"{i}.png")
        >>> images, paths = load_image_folder("photos/", transform="imagenet")
        >>> images.shape
        torch.Size([4, 3, 224, 224])
        >>> [path.as_posix() for path in paths]
        ['photos/0/0.png', 'photos/0/1.png', 'photos/1/4.png', 'photos/1/5.png']
        >>> images, paths, names = load_image_folder("photos", transform="digits",
        ...                                          labels_from_subfolders=True)
        >>> images.shape, names
        (torch.Size([4, 1, 28, 28]), ['0', '0', '1', '1'])
        >>> torch.equal(images, digits[[0, 1, 4, 5]])  # PNG kept the pixels exactly
        True
    """
    names = _names(argument_names)
    root, paths, function = _image_files(directory, transform, extensions, limit, exclude, names)
    tensors = []
    transparent, first_frames = [], []
    for path in paths:
        tensor, see_through, several_frames = _read_image(path, transform, function, names)
        if see_through:
            transparent.append(_shown(path.relative_to(root)))
        if several_frames:
            first_frames.append(_shown(path.relative_to(root)))
        if tensors and tensor.shape != tensors[0].shape:
            raise _size_error(path, tensor, paths[0], tensors[0], transform, names)
        tensors.append(tensor)
    if transparent:
        _warn_transparent(transparent, len(paths), names, stacklevel=3)
    if first_frames:
        _warn_first_frames(first_frames, len(paths), names, stacklevel=3)
    images = torch.stack(tensors)
    if not labels_from_subfolders:
        return images, paths
    return images, paths, _first_folders(root, paths)


def _image_files(
    directory: str | os.PathLike,
    transform: Any,
    extensions: Sequence[str],
    limit: int | None,
    exclude: Sequence[str | os.PathLike],
    names: Mapping[str, str],
) -> tuple[Path, list[Path], Callable]:
    """The checked folder, its image files in path order (the first ``limit``) and the
    transform's function: what :func:`load_image_folder` and :class:`ImageFolderDataset`
    read."""
    folder = _arg(names, "directory", python=True)
    root = Path(directory).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{folder} not found: {str(directory)!r}.")
    if not root.is_dir():
        raise ValueError(f"{folder} {str(directory)!r} is not a directory.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{_arg(names, 'limit')} must be a positive int, got {limit!r}.")
    function = _resolve_transform(transform, names)
    hidden: list[str] = []
    paths = _find_images(root, extensions, [Path(p).expanduser() for p in exclude], names, hidden)
    if not paths:
        found_hidden = f"; skipped {_hidden_note(hidden)}" if hidden else ""
        raise ValueError(
            f"{folder} {str(directory)!r} holds no images with the endings "
            f"{', '.join(extensions)}{found_hidden}."
        )
    return root, paths if limit is None else paths[:limit], function


def _error_type(error: BaseException) -> str:
    """``SyntaxError``, ``struct.error``: an exception's type as a message shows it."""
    kind = type(error)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _read_image(
    path: Path, transform: Any, function: Callable, names: Mapping[str, str]
) -> tuple[Tensor, bool, bool]:
    """One image file as a float32 C x H x W tensor by ``function`` (the resolved
    ``transform``), whether it has transparent pixels, and whether it has several frames
    (an animated GIF, PNG or WebP, a multi-page TIFF) of which the first was read (both
    for named transforms only: a callable gets the image to read as it likes). A file
    that cannot be read (not an image, truncated, damaged: whatever Pillow's decoders raise
    for it, MemoryError aside) is a ValueError naming the file; so is an OSError or
    ValueError of a callable ``transform``, whose other errors are raised as they are."""
    from PIL import Image, UnidentifiedImageError

    transparent = several_frames = False
    users = False  # inside the user's callable transform
    try:
        with ExitStack() as opened:
            image = opened.enter_context(Image.open(path))
            if _turned_tiff(image):  # read from a stream: Pillow maps no file then
                image = opened.enter_context(Image.open(opened.enter_context(open(path, "rb"))))
            image.load()
            if callable(transform):
                users = True
                tensor = function(image)
            else:
                transparent = _has_transparent_pixels(image)
                opened_image = image
                image = _high_bit_depth(_upright(image), path, names)
                if isinstance(image, _UnitGrey) and function is not _plain_transform:
                    image = image.eight_bit()
                tensor = function(image)
                several_frames = _has_several_frames(opened_image)
    except (_ImageError, MemoryError):
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        # ValueError: PIL's conversions (a CIE-Lab TIFF to grey) and the user's transform
        # (chained: its traceback is the user's to read)
        raise ValueError(
            f"{_arg(names, 'directory')}: cannot read image {_shown(path)!r}: {error}"
        ) from (error if isinstance(error, ValueError) else None)
    except Exception as error:
        if users:  # the user's own transform failed: its error as it is
            raise
        # a damaged file: Pillow's decoders raise SyntaxError (a PNG chunk's length),
        # struct.error, EOFError, IndexError, TypeError, ... while reading it
        raise ValueError(
            f"{_arg(names, 'directory')}: cannot read image {_shown(path)!r}: the file is "
            f"damaged ({_error_type(error)}: {error})"
        ) from error
    if not isinstance(tensor, Tensor) or tensor.dim() != 3:
        got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(
            f"{_arg(names, 'transform')} must turn each image into a C x H x W tensor, got "
            f"{got} for {str(path)!r}."
        )
    return tensor.to(torch.float32), transparent, several_frames


def _has_several_frames(image) -> bool:
    """Whether the opened ``image`` has more than one frame (Pillow's ``is_animated``: an
    animated GIF, PNG or WebP, a multi-page TIFF); False where that cannot be told, and for
    a camera's multi-picture JPEG (MPO: the photo, then previews or a depth map), whose
    first frame is the photo."""
    if getattr(image, "format", None) == "MPO":
        return False
    try:
        return bool(getattr(image, "is_animated", False))
    except Exception:  # a damaged later frame: the first one was read
        return False


def _size_error(
    path: Path, tensor: Tensor, first: Path, shape_of: Any, transform: Any, names: Mapping[str, str]
):
    shape = tuple(shape_of.shape) if isinstance(shape_of, Tensor) else tuple(shape_of)
    return ValueError(
        f"{_arg(names, 'directory')}: {str(path)!r} gives a {tuple(tensor.shape)} tensor but "
        f"{str(first)!r} gives {shape}; with transform="
        f"{transform if isinstance(transform, str) else 'callable'!r} all images need the "
        "same size and channels (a transform that resizes: 'imagenet', or 'digits' for a "
        "digit model)."
    )


def _warn_transparent(
    transparent: Sequence[str], total: int, names: Mapping[str, str], *, stacklevel: int
) -> None:
    warnings.warn(
        f"{_arg(names, 'directory')}: {len(transparent)} of {total} images have transparent pixels "
        f"({', '.join(transparent[:3])}{', ...' if len(transparent) > 3 else ''}); their "
        "transparency is dropped (the colour stored under each pixel is read, as "
        "torchvision's ImageFolder does). Flatten them onto the background they are "
        "meant to be seen on first (PIL's Image.alpha_composite).",
        stacklevel=stacklevel,
    )


def _warn_first_frames(
    several: Sequence[str], total: int, names: Mapping[str, str], *, stacklevel: int
) -> None:
    warnings.warn(
        f"{_arg(names, 'directory')}: {len(several)} of {total} images have several frames "
        "(animated images or multi-page TIFFs: "
        f"{', '.join(several[:3])}{', ...' if len(several) > 3 else ''}); only the first "
        "frame of each is read, as torchvision's ImageFolder does. Save the frames you mean "
        "to explain as images of their own.",
        stacklevel=stacklevel,
    )


def _first_folders(root: Path, paths: Sequence[Path]) -> list[str]:
    """Each image's first sub-folder under ``root`` ("" for images directly in it)."""
    return [
        p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in paths
    ]


class ImageFolderDataset(torch.utils.data.Dataset):
    r"""The images of a folder read one at a time, for a ``DataLoader``: what
    :func:`load_image_folder` reads, without holding every image in memory (a folder of
    50,000 ImageNet images is 30 GB as one float32 batch). ``captum-ext score`` reads
    ``--images`` through it.

    Item ``i`` is ``(image, label)``: the ``C x H x W`` float32 image of ``paths[i]``
    (read and transformed when asked for) and its class from the first sub-folder's name
    (``folder_labels``; ``-1`` where unknown). The files, their order, the transforms
    and every error are :func:`load_image_folder`'s; an image of another size than the
    first file's is refused naming both files (in every ``DataLoader`` worker). Images with
    transparent pixels are listed in ``transparent`` as they are read (in each
    ``DataLoader`` worker's own copy), not warned about one by one; so are images of
    several frames in ``first_frames``.

    Args:
        directory (str or Path): the folder, read recursively.
        transform (str or Callable, optional): as in :func:`load_image_folder`.
            Default: ``"imagenet"``.
        extensions (Sequence[str], optional): as in :func:`load_image_folder`.
            Default: :data:`IMAGE_EXTENSIONS`.
        class_names (Sequence[str], optional): class names in the order of the model's
            outputs, for labels from folder names. Default: None.
        limit (int, optional): only the first ``limit`` images (in path order). Default: None.
        exclude (Sequence[str or Path], optional): folders not to read. Default: none.
        argument_names (Mapping[str, str], optional): how errors name the parameters, as in
            :func:`load_image_folder`. Default: None (their Python names).

    Attributes:
        paths (list[Path]): the files, in path order.
        names (list[str]): each file's path under ``directory``, as text.
        labels (Tensor): ``(N,)`` int64 classes, ``-1`` where unknown.
        transparent (list[str]): names of the images read so far that have transparent
            pixels.
        first_frames (list[str]): names of the images read so far that have several
            frames (animated, multi-page), of which the first was read.

    Examples::

        >>> from pathlib import Path
        >>> from PIL import Image
        >>> from torch.utils.data import DataLoader
        >>> from captum_ext.data import ImageFolderDataset, denormalize_digits, load_sample_digits
        >>> from captum_ext.metrics import score_dataset
        >>> digits, digit_labels = load_sample_digits()
        >>> for i in (0, 1, 4, 5):  # two 0s and two 1s as PNG files, one folder per class
        ...     folder = Path("photos") / str(int(digit_labels[i]))
        ...     folder.mkdir(parents=True, exist_ok=True)
        ...     pixels = (denormalize_digits(digits[i])[0] * 255).round().byte().numpy()
        ...     Image.fromarray(pixels).save(folder / f"{i}.png")
        >>> dataset = ImageFolderDataset("photos", transform="digits")
        >>> len(dataset), dataset.names[0], dataset.labels.tolist()
        (4, '0/0.png', [0, 0, 1, 1])
        >>> torch.equal(dataset[2][0], digits[4])  # read when asked for
        True
        >>> table = score_dataset(model, DataLoader(dataset, batch_size=2), ["softmax"],
        ...                       progress=False)
        >>> len(table)
        4
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        transform: str | Callable = "imagenet",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        *,
        class_names: Sequence[str] | None = None,
        limit: int | None = None,
        exclude: Sequence[str | os.PathLike] = (),
        argument_names: Mapping[str, str] | None = None,
    ) -> None:
        names = _names(argument_names)
        root, paths, function = _image_files(
            directory, transform, extensions, limit, exclude, names
        )
        self.root = root
        self.paths = paths
        self.transform = transform
        self.names = [_shown(p.relative_to(root).as_posix()) for p in paths]
        self.labels = torch.tensor(
            folder_labels(
                _first_folders(root, paths),
                class_names,
                argument_names={"directory": "directory", **names},
            ),
            dtype=torch.int64,
        )
        self.transparent: list[str] = []
        self.first_frames: list[str] = []
        self._reader = (transform, function, names)
        self._first: tuple[Path, tuple[int, ...]] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path = self.paths[index]
        tensor, see_through, several_frames = _read_image(path, *self._reader)
        if see_through and self.names[index] not in self.transparent:
            self.transparent.append(self.names[index])
        if several_frames and self.names[index] not in self.first_frames:
            self.first_frames.append(self.names[index])
        if self._first is None:  # the first file's size (in each DataLoader worker too)
            first = tensor if index == 0 else _read_image(self.paths[0], *self._reader)[0]
            self._first = (self.paths[0], tuple(first.shape))
        if tuple(tensor.shape) != self._first[1]:
            raise _size_error(
                path, tensor, self._first[0], self._first[1], self.transform, self._reader[2]
            )
        return tensor, self.labels[index]

    def warn_transparent(self) -> None:
        """One warning naming the images read so far that have transparent pixels, and one
        naming those of several frames (animated, multi-page) of which the first was read
        (as :func:`load_image_folder` gives them), if any."""
        if self.transparent:
            _warn_transparent(self.transparent, len(self), self._reader[2], stacklevel=3)
        if self.first_frames:
            _warn_first_frames(self.first_frames, len(self), self._reader[2], stacklevel=3)


def denormalize_for_display(x: Tensor, transform: str | Callable | None = "imagenet") -> np.ndarray:
    r"""Map images normalised by ``transform`` back to [0, 1] arrays for plotting.

    Args:
        x (Tensor): ``C x H x W`` or ``N x C x H x W`` images as :func:`load_image_folder`
            returns them.
        transform (str or Callable, optional): the transform they were made with:
            ``"imagenet"`` (undo the mean/std normalisation), ``"digits"`` (undo
            :func:`captum_ext.data.normalize_digits`), ``"none"`` / None (already in [0, 1]).
            For a callable (unknown normalisation) each image is min-max scaled.
            Default: ``"imagenet"``.

    Returns:
        numpy.ndarray: float32 ``H x W x C`` (or ``N x H x W x C``) in [0, 1].
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() not in (3, 4):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"`x` must be a float C x H x W or N x C x H x W tensor, got {got}.")
    single = x.dim() == 3
    batch = x.detach().to("cpu", torch.float32)
    if single:
        batch = batch.unsqueeze(0)
    if transform == "imagenet":
        if batch.shape[1] != 3:
            raise ValueError(
                f"`transform`='imagenet' expects 3 channels, got {batch.shape[1]} (use 'none'?)."
            )
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        batch = batch * std + mean
    elif transform == "digits":
        from captum_ext.data import denormalize_digits

        batch = denormalize_digits(batch)
    elif transform is None or transform == "none":
        pass
    elif callable(transform):
        flat = batch.flatten(1)
        low = flat.amin(1).view(-1, 1, 1, 1)
        span = (flat.amax(1).view(-1, 1, 1, 1) - low).clamp_min(1e-12)
        batch = (batch - low) / span
    else:
        raise ValueError(
            f"`transform`={transform!r}: expected one of {', '.join(TRANSFORMS)} or a callable."
        )
    array = batch.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()
    return array[0] if single else array


def read_class_names(
    path: str | os.PathLike, *, argument_names: Mapping[str, str] | None = None
) -> list[str]:
    """Class names from a text file, one per line, in the order of the model's outputs
    (trailing empty lines are ignored).

    Args:
        path (str or PathLike): the text file (UTF-8).
        argument_names (Mapping[str, str], optional): how errors name ``path``, e.g.
            ``{"path": "--classes"}`` (``captum-ext`` passes ``COMMAND_LINE_NAMES``).
            Default: None (```path```).

    Returns:
        list[str]: the names.
    """
    names = _names(argument_names)
    argument = _arg(names, "path")
    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(
            f"{argument} {str(path)!r} is a directory; expected a text file of class names."
        )
    if not file.is_file():
        raise FileNotFoundError(f"{argument} file not found: {str(path)!r}.")
    try:  # utf-8-sig: Windows editors start the file with a byte-order mark
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{argument} file {str(path)!r} is not UTF-8 text ({error.reason} at byte "
            f"{error.start}); save it as UTF-8."
        ) from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(
            f"{argument} file {str(path)!r} is empty; expected one class name per line."
        )
    blank = [number for number, name in enumerate(names, start=1) if not name]
    if blank:
        raise ValueError(
            f"{argument} file {str(path)!r} has an empty line (line {blank[0]}): every line "
            "names the class of the output at its position, so an empty one would shift all "
            "the names after it."
        )
    return names


def folder_labels(
    folders: Sequence[str],
    class_names: Sequence[str] | None,
    *,
    argument_names: Mapping[str, str] | None = None,
) -> list[int]:
    """The one rule for the true class of an image from its first-level sub-folder name:

    1. a name from ``class_names`` gives that class's index;
    2. otherwise a folder named by a class index in ASCII digits (``3/``) gives that index
       (when it is below ``len(class_names)``, if class names are given);
    3. otherwise (and for images directly in the folder, ``""``) the label is ``-1``
       (unknown).

    Names are compared in Unicode's composed form (NFC): a folder named on macOS, which
    stores ``café`` decomposed (``e`` and a combining accent), matches ``café`` typed in
    ``class_names``. When class names are given, folders that match no name and no index
    (``cat/`` for the name ``Cat``) are named in one warning, with the closest class names;
    their images stay unlabelled. Without class names (or with names that are the indices
    themselves, ``"0"``, ``"1"``, ...: the bundled digits') other folders are unlabelled
    silently. A name given twice (ImageNet's two "crane"s) labels its folder by the last of
    its outputs, with a warning.

    Args:
        folders (Sequence[str]): each image's first sub-folder name (``""`` for none).
        class_names (Sequence[str], optional): class names in the order of the model's
            outputs, or None.
        argument_names (Mapping[str, str], optional): how warnings name the parameters:
            ``class_names``, and ``directory``, the folder the names come from (named only
            when given), e.g. ``{"class_names": "--classes", "directory": "--images"}``.
            Default: None (```class_names```).

    Returns:
        list[int]: a label per folder, ``-1`` where unknown.

    Examples::

        >>> from captum_ext.data.loading import folder_labels
        >>> folder_labels(["cat", "dog", "1", ""], ["cat", "dog"])
        [0, 1, 1, -1]
        >>> folder_labels(["3", "x"], None)
        [3, -1]
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     folder_labels(["Cat", "7"], ["cat", "dog"])
        [-1, -1]
        >>> print(caught[0].message)
        2 folder(s) match no class name and no class index (0..1), so their images are
        unlabelled: 'Cat' (closest: 'cat'); '7'. ...
    """
    shown = _names(argument_names)
    given = _arg(shown, "class_names")
    names = [_composed(name) for name in class_names or []]
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        positions.setdefault(name, []).append(i)
    index = {name: at[-1] for name, at in positions.items()}  # the last of repeated names
    ambiguous = sorted({_composed(f) for f in folders if len(positions.get(_composed(f), ())) > 1})
    if ambiguous:  # ImageNet's names list has two "crane"s and two "maillot"s
        name = ambiguous[0]
        warnings.warn(
            f"{given} names {name!r} more than once (outputs "
            f"{', '.join(map(str, positions[name]))}); the images in the folder {name!r} are "
            f"labelled {positions[name][-1]}, the last. Rename the folder to the output index "
            "to choose another.",
            UserWarning,
            stacklevel=2,
        )
    # names that only repeat the indices (the digits' "0".."9") name nothing more
    named = any(name != str(i) for i, name in enumerate(names))
    labels = []
    unmatched: dict[str, None] = {}
    for folder in folders:
        name = _composed(folder)
        if name in index:
            labels.append(index[name])
        elif _ASCII_INDEX.fullmatch(name) and (class_names is None or int(name) < len(names)):
            labels.append(int(name))
        else:
            labels.append(-1)
            if named and folder:
                unmatched.setdefault(folder, None)
    if unmatched:
        where = f"{_arg(shown, 'directory')}: " if "directory" in shown else ""
        _warn_unmatched(list(unmatched), names, where)
    return labels


#: a class index as a folder name: ASCII digits only ("²" and "①" are digits to
#: ``str.isdigit`` but not to ``int``)
_ASCII_INDEX = re.compile(r"[0-9]+")


def _composed(name: str) -> str:
    """``name`` in Unicode's composed form (NFC), as folder names and class names are
    compared."""
    return unicodedata.normalize("NFC", name)


def _warn_unmatched(folders: Sequence[str], names: Sequence[str], where: str) -> None:
    """One warning naming the folders that match no class name and no index, each with the
    closest class names (compared ignoring case)."""
    by_case: dict[str, str] = {}
    for name in names:
        by_case.setdefault(name.casefold(), name)
    described = []
    for folder in folders[:_LIST_AT_MOST]:
        close = difflib.get_close_matches(_composed(folder).casefold(), list(by_case), n=3)
        hint = f" (closest: {', '.join(repr(by_case[c]) for c in close)})" if close else ""
        described.append(f"{_shown(folder)!r}{hint}")
    more = len(folders) - _LIST_AT_MOST
    listed = "; ".join(described) + (f"; and {more} more" if more > 0 else "")
    warnings.warn(
        f"{where}{len(folders)} folder(s) match no class name and no class index "
        f"(0..{len(names) - 1}), so their images are unlabelled: {listed}. Name each class "
        "folder exactly as its class (case and spelling) or by its output index.",
        UserWarning,
        stacklevel=3,
    )


@dataclasses.dataclass(frozen=True)
class ResolvedInputs:
    """What :func:`resolve_inputs` returns.

    Attributes:
        images (Tensor): ``N x C x H x W`` float32 images, preprocessed with ``transform``.
        labels (Tensor): ``N`` int64 true classes, ``-1`` where unknown (:func:`folder_labels`).
        names (list[str]): a name per image (its path under the folder, or
            ``"sample digit i"``).
        transform (str or Callable): the preprocessing applied.
        description (str): one line, e.g. ``"8 images from photos/"``.
    """

    images: Tensor
    labels: Tensor
    names: list[str]
    transform: str | Callable
    description: str

    def label_list(self) -> list[int | None] | None:
        """The labels as a list with None where unknown; None when no label is known."""
        labels = [int(v) if v >= 0 else None for v in self.labels.tolist()]
        return labels if any(v is not None for v in labels) else None


def resolve_inputs(
    images: str | os.PathLike | None = None,
    *,
    transform: str | Callable | None = None,
    default_transform: str = "imagenet",
    class_names: Sequence[str] | None = None,
    limit: int | None = None,
    exclude: Sequence[str | os.PathLike] = (),
    argument_names: Mapping[str, str] | None = None,
) -> ResolvedInputs:
    r"""Turn the images argument of ``captum-ext report`` / ``score`` into tensors: THE one
    place for the bundled default, the transform and the labels from folder names.

    Args:
        images (str or PathLike, optional): a folder of images, read recursively and sorted
            by path (:func:`load_image_folder`); the first sub-folder name gives the true
            class by :func:`folder_labels`. Default: None, the 40 bundled sample digits
            (:func:`captum_ext.data.load_sample_digits`, already normalised, with labels).
        transform (str or Callable, optional): preprocessing of ``images`` (one of
            :data:`TRANSFORMS` or a callable, see :func:`load_image_folder`). Must be None or
            ``"digits"`` for the sample digits. Default: None, ``default_transform``.
        default_transform (str, optional): the transform when ``transform`` is None.
            Default: ``"imagenet"``.
        class_names (Sequence[str], optional): class names in the order of the model's
            outputs, for labels from folder names. Default: None.
        limit (int, optional): keep only the first ``limit`` images. Default: None (all).
        exclude (sequence of paths, optional): folders not to read (the report being
            written inside ``images``). Default: none.
        argument_names (Mapping[str, str], optional): how errors name the parameters, e.g.
            ``{"images": "--images"}`` (``captum-ext`` passes ``COMMAND_LINE_NAMES``).
            Default: None (their Python names).

    Returns:
        :class:`ResolvedInputs`: images, labels (``-1`` = unknown), names, transform,
        description.

    Raises:
        ValueError: a bad ``limit`` or ``transform``, a folder without readable images.
        FileNotFoundError: ``images`` does not exist.

    Examples::

        >>> from captum_ext.data.loading import resolve_inputs
        >>> inputs = resolve_inputs(limit=4)  # the bundled sample digits
        >>> inputs.images.shape, inputs.transform
        (torch.Size([4, 1, 28, 28]), 'digits')
    """
    names = _names(argument_names)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{_arg(names, 'limit')} must be a positive int, got {limit!r}.")
    if images is None:
        if transform not in (None, "digits"):
            raise ValueError(
                f"{_arg(names, 'transform')} applies to {_arg(names, 'images')}; the bundled "
                "sample digits are already normalised for the bundled model (transform "
                "'digits')."
            )
        from captum_ext.data import load_sample_digits

        x, labels = load_sample_digits()
        if limit is not None:
            x, labels = x[:limit], labels[:limit]
        names = [f"sample digit {i}" for i in range(x.shape[0])]
        return ResolvedInputs(
            x, labels.to(torch.int64), names, "digits", f"{x.shape[0]} bundled sample digits"
        )
    chosen = default_transform if transform is None else transform
    folder_names = {"directory": names.get("images", "images"), **names}
    x, paths, folders = load_image_folder(
        images,
        chosen,
        labels_from_subfolders=True,
        limit=limit,
        exclude=exclude,
        argument_names=folder_names,
    )
    root = Path(images).expanduser()
    names = [_shown(p.relative_to(root).as_posix()) for p in paths]
    labels = torch.tensor(
        folder_labels(folders, class_names, argument_names=folder_names), dtype=torch.int64
    )
    return ResolvedInputs(x, labels, names, chosen, f"{x.shape[0]} images from {images}")


__getattr__ = moved_names(__name__, {"_parse_device": "captum_ext._utils.validation:parse_device"})


def check_folder_labels(labels: Tensor, names: Sequence[str], num_classes: int) -> None:
    """The classes that ``--images``' folders name (``3/``) must be outputs of the model:
    one line naming the folder, the same in ``report`` and ``score`` (``score`` counted an
    image in ``7/`` of a 3-class model as a wrong prediction, ``report`` refused it as
    "`labels`[1]=7")."""
    beyond = (labels >= num_classes).nonzero()[:, 0]
    if len(beyond):
        first, label = int(beyond[0]), int(labels[beyond[0]])
        folder = Path(names[first]).parts[0] if Path(names[first]).parts else ""
        named = folder if folder == str(label) else f"{folder!r} (class {label})"
        raise ValueError(
            f"`--images`: {names[first]!r} is in a folder named {named}, but the "
            f"model has {num_classes} classes (0..{num_classes - 1}); name the class folders "
            "by the model's output indices, or give --classes with the folder names."
        )


def check_class_names(model: Any, example: Tensor, class_names: list[str]) -> None:
    """``class_names`` (``--classes``) must name every output of ``model``: checked on one
    forward pass of ``example`` (already on the model's device). A model that fails on the
    example is left for the caller's own call to report."""
    try:
        with torch.no_grad():
            logits = model(example)
    except Exception:
        return
    outputs = logits.shape[-1] if isinstance(logits, Tensor) and logits.dim() == 2 else None
    if outputs is not None and outputs != len(class_names):
        raise ValueError(
            f"`--classes` has {len(class_names)} names but the model has {outputs} outputs."
        )
