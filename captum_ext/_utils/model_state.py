"""Guarantee that a method leaves the user's model as it found it."""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from .hooks import restored_buffers_of_modules_run
from .layers import compiled_code_runs_eagerly, is_exported
from .validation import outside_inference_mode_nested

_Function = TypeVar("_Function", bound=Callable[..., Any])


@contextlib.contextmanager
def preserved_state(
    modules: Iterable[nn.Module | None], *, hidden_model: bool = False, hidden_eval: bool = False
) -> Iterator[None]:
    """Restore training flags, ``requires_grad``, ``.grad``, buffers, grad mode and dtype.

    Applies to every submodule, parameter and buffer of the given modules, after the block
    exits normally or by an exception. Compiled code (``model.compile()``, compiled
    submodules) runs eagerly inside the block (``torch.compiler.set_stance("force_eager")``):
    a compiled graph does not take the per-example gradients' ``vmap`` and recompiles for
    each set of hooks a method registers (``torch.compile(model)`` itself is unwrapped by
    ``root_module``, which also spares torch's warning about global hooks). Buffers matter for
    models in train mode: a forward pass there updates BatchNorm's ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` in place, and a method must not leave those
    changed. Their values are copied back in place (the same tensor objects), so references
    the user holds stay valid; a buffer the block replaced by another tensor is left as it is.
    ``hidden_model=True`` (for a ``forward_func`` that is a plain function, whose model no
    method can name) also puts back the buffers of every other module that runs in the block
    (``restored_buffers_of_modules_run``); with ``hidden_eval=True`` those modules also run
    in eval mode, as a caller that calls ``set_eval_mode`` on a model it can name.

    Calls from several threads on the same model run one after the other: each block holds
    a lock on every submodule it covers for its whole length. The methods register hooks on
    the user's modules and swap parameters for per-example gradients (``functional_call``),
    which a second thread's forward pass would see; without the lock concurrent GradCAM
    calls on one model failed or, for GradTrust at a layer, returned wrong scores.
    """
    seen: dict[int, nn.Module] = {}
    for module in modules:
        if module is None:
            continue
        for sub in module.modules():
            seen.setdefault(id(sub), sub)
    hidden = (
        restored_buffers_of_modules_run(exclude=list(seen.values()), eval_mode=hidden_eval)
        if hidden_model
        else contextlib.nullcontext()
    )
    with _locked(seen), hidden:
        yield from _preserved(list(seen.values()))


def _preserved(submodules: list[nn.Module]) -> Iterator[None]:
    training = [(m, m.training) for m in submodules]
    params = {id(p): p for m in submodules for p in m.parameters(recurse=False)}
    flags = [(p, p.requires_grad, p.grad) for p in params.values()]
    buffers = {id(b): b for m in submodules for b in m.buffers(recurse=False)}
    saved_buffers = [(b, b.detach().clone()) for b in buffers.values()]
    grad_enabled = torch.is_grad_enabled()
    default_dtype = torch.get_default_dtype()
    try:
        with compiled_code_runs_eagerly():
            yield
    except RuntimeError as error:
        if "Inference tensors cannot be saved for backward" in str(error) and any(
            param.is_inference() for param in params.values()
        ):
            raise ValueError(
                "The model's parameters are inference tensors (the model was loaded or built "
                "inside torch.inference_mode()), and autograd cannot differentiate through "
                "them: load or build the model outside inference mode, or replace its "
                "parameters by clones made outside it."
            ) from error
        raise
    finally:
        for module, was_training in training:
            module.training = was_training  # per module: .train() would recurse
        for param, requires_grad, grad in flags:
            if param.requires_grad != requires_grad:
                # an inference tensor's flag can be set back to True only in inference mode
                with torch.inference_mode(param.is_inference()):
                    param.requires_grad_(requires_grad)
            if param.grad is not grad:
                param.grad = grad
        with torch.no_grad():
            for buffer, value in saved_buffers:
                if buffer.shape == value.shape and not torch.equal(buffer, value):
                    buffer.copy_(value)
        torch.set_grad_enabled(grad_enabled)
        if torch.get_default_dtype() != default_dtype:
            torch.set_default_dtype(default_dtype)


def set_eval_mode(
    model: nn.Module, *, fixed_batch: bool = False, argument: str = "forward_func"
) -> None:
    """``model.eval()``, also for the module of a ``torch.export`` program (or a model holding
    one, ``nn.Sequential(normalise, exported)``), whose ``.eval()`` torch refuses ("Calling
    eval() is not supported yet"): its mode was fixed when it was exported, so only its
    ``training`` flags are cleared, without calling it; every other module gets its own
    ``.eval()``. Call it inside :func:`preserved_state`, which puts the flags back.

    A program exported with a fixed batch size refuses every other batch ("Guard failed:
    input.size()[0] == 2") and the metrics run batches of their own size: it is refused
    (:func:`refuse_fixed_batch`, naming ``argument``: the caller's argument holding the
    model, by default the metrics' ``forward_func``) unless ``fixed_batch`` is True (for a
    caller that runs only its caller's batch)."""
    exported = [module for module in model.modules() if is_exported(module)]
    if not exported:
        model.eval()
        return
    if not fixed_batch:
        refuse_fixed_batch(exported, argument)
    if is_exported(model):
        for module in model.modules():
            module.training = False  # per module: its .train() raises
        return
    model.training = False  # not .eval(): it would recurse into the exported module
    for child in model.children():  # refused (or allowed) once above, for the whole model
        set_eval_mode(child, fixed_batch=True)


def refuse_fixed_batch(exported: Iterable[nn.Module], argument: str) -> None:
    """Raise :class:`captum_ext.exported.FixedBatchError` (a ``ValueError`` naming
    ``argument``) when one of the ``torch.export`` modules ``exported`` was exported with a
    fixed batch size, as :func:`captum_ext.exported.load_exported` refuses such a program:
    the metrics call the model with batches of their own size (perturbed copies, stacked
    classes), which the program's guard rejects deep inside torch."""
    from captum_ext.exported import FixedBatchError, fixed_batch_size

    for module in exported:
        size = fixed_batch_size(module)
        if size is not None:
            raise FixedBatchError(
                f"`{argument}`: the torch.export program was exported with a fixed batch size "
                f"of {size}, and the metrics call it with batches of other sizes. Export it "
                "with a dynamic batch dimension: torch.export.export(model, (example,), "
                "dynamic_shapes=({0: torch.export.Dim('batch')},))."
            )


@contextlib.contextmanager
def gradients_on() -> Iterator[None]:
    """``torch.enable_grad()`` that also holds inside ``torch.inference_mode()``.

    ``enable_grad`` alone does not undo inference mode, and a method called in a serving
    block would find that its model's output "does not depend on the inputs". Inference mode
    is left only where gradients are taken: tensors made in it (the inputs are copied by
    ``format_inputs``) stay usable for everything else.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _locked(modules: dict[int, nn.Module]) -> Iterator[None]:
    """Hold the (re-entrant) lock of every module, taken in one global order (by ``id``) so
    that two threads locking overlapping sets cannot wait on each other."""
    with _LOCKS_GUARD:
        locks = [_LOCKS.setdefault(modules[key], threading.RLock()) for key in sorted(modules)]
    with contextlib.ExitStack() as stack:
        for lock in locks:
            stack.enter_context(lock)
        yield


@contextlib.contextmanager
def model_lock(model: nn.Module) -> Iterator[nn.Module]:
    """Hold the lock that the methods' calls on ``model`` hold, so that no explanation runs
    on it (from another thread) inside the block; yields ``model``.

    While a method explains, its hooks sit on the model's modules. Copy or save the model
    under the lock to get it without them::

        with captum_ext.model_lock(model):
            twin = copy.deepcopy(model)  # or torch.save(model, path)

    A call waits for the block to end (and the block for a call to end). Re-entrant: a
    method may be called inside the block from the same thread.

    Args:
        model (nn.Module): the model, as passed to the methods (a wrapper that holds it,
            ``torch.compile(model)`` or ``nn.DataParallel(model)``, locks it too).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    with _locked({id(sub): sub for sub in model.modules()}):
        yield model


def leaves_inference_mode(function: _Function) -> _Function:
    """Run a public method or function outside ``torch.inference_mode()`` when it is called
    inside it: it optimises, copies or re-initialises models, or differentiates through code
    the package does not own (a Captum method). Tensor arguments made in inference mode (also
    inside tuples, lists and dicts) are replaced by normal copies. Outside inference mode the
    call is unchanged."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_inference_mode_enabled():
            return function(*args, **kwargs)
        args, kwargs = outside_inference_mode_nested(args), outside_inference_mode_nested(kwargs)
        with torch.inference_mode(False):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def detached(value: Any) -> Any:
    """``value`` with every tensor in it (nested tuples, lists, dicts: a tuple of attributions
    with a convergence delta, a scripted model's outputs) detached from autograd."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple | list):
        return type(value)(detached(item) for item in value)
    if isinstance(value, dict):
        return {key: detached(item) for key, item in value.items()}
    return value


def module_state(module: nn.Module) -> list[tuple]:
    """What :func:`restore_module_state` restores: per submodule its train/eval flag and
    its parameters and buffers (the tensor objects, copies of their values in their dtype
    and device, ``requires_grad``, and ``.grad``: the object and a copy of its value)."""
    saved = []
    for sub in module.modules():
        parameters = {
            name: (p, p.detach().clone(), p.requires_grad, p.grad, _clone(p.grad))
            for name, p in sub._parameters.items()
            if p is not None
        }
        buffers = {
            name: (b, b.detach().clone()) for name, b in sub._buffers.items() if b is not None
        }
        saved.append((sub, sub.training, parameters, buffers))
    return saved


def _clone(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone()


def restore_module_state(saved: list[tuple]) -> None:
    """Undo training and ``.to()`` on the modules of :func:`module_state` (the same
    parameter and buffer objects, with their old values, dtype, device and flags)."""
    with torch.no_grad():
        for sub, training, parameters, buffers in saved:
            sub.training = training  # per module: .train() would recurse
            for name, (param, value, requires_grad, grad, grad_value) in parameters.items():
                param.grad = None
                param.data = value
                param.requires_grad_(requires_grad)
                if grad is not None:  # .to() converts a .grad in place (its .data)
                    grad.data = grad_value
                param.grad = grad
                sub._parameters[name] = param
            for name, (buffer, value) in buffers.items():
                buffer.data = value
                sub._buffers[name] = buffer
