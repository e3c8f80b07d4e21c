"""Hook registration that always cleans up, and capture of a layer's activations."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


@contextlib.contextmanager
def registered_hooks(*registrations) -> Iterator[list[RemovableHandle | CallHook]]:
    """Register hooks and remove every one of them on exit, also when the body raises.

    Each registration is a zero-argument callable returning a ``RemovableHandle`` or
    anything else with ``remove()`` (for example ``lambda: module.register_forward_hook(fn)``,
    or ``call_hook(module, fn)``, whose hook a copy of the model made meanwhile does not
    carry). If a registration itself
    fails, the hooks registered before it are removed before the error propagates.
    """
    handles: list[RemovableHandle | CallHook] = []
    try:
        for register in registrations:
            handles.append(register())
        yield handles
    finally:
        for handle in handles:
            handle.remove()


class InertHook:
    """What a :class:`CallHook` becomes in a deep copy or a pickle of its module: a hook
    that does nothing (returns None, stores nothing)."""

    def __call__(self, module: nn.Module, *args) -> None:
        return None


class CallHook:
    """A forward hook (or forward pre-hook) of one method call on one module.

    ``hook`` runs only while the call's hooks are registered and only on the module it was
    registered on (or an ``nn.DataParallel`` replica of it, which shares its hook dicts);
    elsewhere the hook returns None and stores nothing. A model copied while a call runs
    (``copy.deepcopy(model)``, ``torch.save(model)`` from another thread, or from inside the
    call) gets an :class:`InertHook` in its place: the copy's outputs and gradients are the
    model's own, and it pickles. Made by :func:`call_hook`; ``remove`` ends the call.
    With ``with_kwargs=True`` the hook also receives the forward's keyword arguments, as
    torch's own ``with_kwargs`` (``hook(module, args, kwargs)`` before the forward,
    ``hook(module, args, kwargs, output)`` after it).
    """

    def __init__(self, module: nn.Module, hook, *, pre: bool, with_kwargs: bool = False) -> None:
        self._module = module
        self._hook = hook
        self._hooks_dict = "_forward_pre_hooks" if pre else "_forward_hooks"
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handle = register(self, with_kwargs=with_kwargs)
        self._active = True

    def __call__(self, module: nn.Module, *args):
        if not self._active or not self._is_own(module):
            return None
        return self._hook(module, *args)

    def _is_own(self, module: nn.Module) -> bool:
        own = self._module
        return module is own or (
            getattr(module, self._hooks_dict, None) is getattr(own, self._hooks_dict)
        )

    def remove(self) -> None:
        """End the call: the hook is removed and inert from now on (also in copies)."""
        self._active = False
        self._handle.remove()

    def __deepcopy__(self, memo: dict) -> InertHook:
        return InertHook()

    def __reduce__(self):
        return (InertHook, ())


def call_hook(module: nn.Module, hook, *, pre: bool = False, with_kwargs: bool = False):
    """A registration for :func:`registered_hooks`: ``hook`` as a forward hook of ``module``
    (a forward pre-hook with ``pre=True``) that acts only during the block and only on
    ``module`` (a :class:`CallHook`). ``with_kwargs=True`` passes the forward's keyword
    arguments to ``hook`` too, as torch's ``register_forward_(pre_)hook(..., with_kwargs=True)``."""
    return lambda: CallHook(module, hook, pre=pre, with_kwargs=with_kwargs)


@dataclass
class LayerCapture:
    """Activations of one layer recorded during a forward pass, as gradient leaves.

    ``tensors`` holds, per call of the layer, the tuple of tensors captured (the output, or
    the positional tensor inputs). Each captured tensor is a detached leaf with
    ``requires_grad=True``; the model continues with a clone of it, so in-place operations
    after the layer (``ReLU(inplace=True)``) neither corrupt the activations nor break the
    gradient, and the backward pass stops at the layer.
    """

    tensors: list[tuple[Tensor, ...]] = field(default_factory=list)

    def single_call(self, layer_name: str) -> tuple[Tensor, ...]:
        """The activations, checking that the layer ran (once per device)."""
        if not self.tensors:
            raise ValueError(
                f"`layer` ({layer_name}) did not run during the forward pass, so it has no "
                "activations to explain; pick a module that forward_func calls."
            )
        if len(self.tensors) == 1:
            return self.tensors[0]
        devices = [call[0].device for call in self.tensors]
        if len(set(devices)) != len(devices):
            raise ValueError(
                f"`layer` ({layer_name}) ran {len(self.tensors)} times in one forward pass; "
                "its activations are ambiguous. Pick a module that runs once. (If it does run "
                "once: another thread ran the same model meanwhile, or the model called an "
                "explanation from inside its own forward pass. The method's hooks sit on the "
                "model's modules, so explain a copy of the model where it also serves "
                "predictions: with captum_ext.model_lock(model): twin = copy.deepcopy(model).)"
            )
        # nn.DataParallel replicas: one call per device, batch split in device order.
        order = sorted(range(len(devices)), key=lambda i: devices[i].index or 0)
        calls = [self.tensors[i] for i in order]
        return tuple(torch.cat([call[k] for call in calls]) for k in range(len(calls[0])))


class AttentionLayerOutput(TypeError):
    """The layer is an ``nn.MultiheadAttention``, whose output is a tuple (the attention
    output and its weights, None with ``need_weights=False``), not a tensor. A caller that
    can run the model adds the names of the modules to explain instead with ``suggestion``
    (:meth:`with_suggestion`)."""

    def __init__(self, output_type: str, suggestion: str = "") -> None:
        self.output_type = output_type
        super().__init__(
            f"`layer` (MultiheadAttention) returns a {output_type} (the attention output and "
            "its weights), not a tensor. Explain the module that produces its input instead "
            "(the norm before it: `ln_1` of a torchvision ViT encoder block), or a later "
            f"module whose output is a tensor (the block that holds it).{suggestion} "
            "attribute_to_layer_input=True does not give that input's map: the attention "
            "takes its input as query, key and value, three arguments, and gives one map for "
            "each, made with the gradient through that argument alone (q, k or v); the "
            "input's gradient is the sum of the three, which none of the maps uses."
        )

    def with_suggestion(self, suggestion: str) -> AttentionLayerOutput:
        """The same error with ``suggestion`` (a sentence naming modules) added."""
        return AttentionLayerOutput(self.output_type, suggestion)


def _as_leaves(values: tuple) -> tuple[tuple, tuple[Tensor, ...]]:
    leaves, replaced = [], []
    for value in values:
        if isinstance(value, Tensor) and value.is_floating_point():
            leaf = value.detach().requires_grad_(True)
            leaves.append(leaf)
            replaced.append(leaf.clone())
        else:
            replaced.append(value)
    return tuple(replaced), tuple(leaves)


@contextlib.contextmanager
def capture_layer(layer: nn.Module, *, layer_input: bool = False) -> Iterator[LayerCapture]:
    """Record ``layer``'s output (or its tensor inputs) as gradient leaves while in the block."""
    capture = LayerCapture()

    def on_output(module, args, output):
        if isinstance(output, Tensor):
            replaced, leaves = _as_leaves((output,))
            capture.tensors.append(leaves)
            return replaced[0]
        if isinstance(module, nn.MultiheadAttention):
            raise AttentionLayerOutput(type(output).__name__)
        raise TypeError(
            f"`layer` ({type(module).__name__}) returns {type(output).__name__}, not a tensor; "
            "pick a module whose output is a tensor, or set attribute_to_layer_input=True."
        )

    def on_input(module, args):
        replaced, leaves = _as_leaves(tuple(args))
        if not leaves:
            raise TypeError(
                f"`layer` ({type(module).__name__}) received no floating-point tensor input."
            )
        capture.tensors.append(leaves)
        return replaced

    register = call_hook(layer, on_input, pre=True) if layer_input else call_hook(layer, on_output)
    with registered_hooks(register):
        yield capture


@contextlib.contextmanager
def restored_buffers_of_modules_run(
    exclude: Iterable[nn.Module | None] = (), *, eval_mode: bool = False
) -> Iterator[list[nn.Module]]:
    """Put back the buffers of every module that runs in the block, as they were before it ran.

    ``preserved_state`` covers the modules a method can name (the model behind
    ``forward_func``, the layer). A ``forward_func`` that is a plain function hides its
    model; a model in train mode would then keep the BatchNorm statistics that the method's
    forward pass updated. A global forward pre-hook, removed on exit, records each module the
    first time it runs (before its forward) together with a copy of its own buffers; on exit
    changed buffers are copied back in place (the same tensor objects). Only modules run by
    the calling thread are recorded (another thread training a model keeps its updates).
    Modules inside ``exclude`` (already restored by the caller) are skipped. Yields the list
    of modules seen. ``eval_mode=True`` also runs each of them in eval mode (its flag and
    those of its submodules cleared before its first forward in the block, put back on
    exit), as the metrics run a model they can name: a train-mode model behind a plain
    function then gives the same scores on every call and for every batch size (dropout
    off, batch norm on its running statistics). The flags are the modules' own: another
    thread running the same model meanwhile sees them too, as it would a named model's.
    Torch's warning that a compiled module runs while global hooks exist
    (this one, not the user's) is silenced inside the block. Not covered: a hidden
    TorchScript model (global module hooks do not fire in TorchScript code), and two
    threads calling methods on the same hidden model at once (each puts back its own
    snapshot; pass the model itself, whose calls ``preserved_state`` runs one at a time).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Using `torch\.compile\(module\)` when there are global hooks"
        )
        yield from _restoring_buffers_of_modules_run(exclude, eval_mode)


def _restoring_buffers_of_modules_run(
    exclude: Iterable[nn.Module | None], eval_mode: bool
) -> Iterator[list[nn.Module]]:
    seen: dict[int, tuple[nn.Module, list[tuple[Tensor, Tensor]]]] = {}
    modules: list[nn.Module] = []  # in the order they first ran
    trained: list[nn.Module] = []  # those switched to eval mode here
    skipped = {id(sub) for module in exclude if module is not None for sub in module.modules()}
    thread = threading.get_ident()

    def on_forward(module: nn.Module, args) -> None:
        if id(module) in seen or id(module) in skipped or threading.get_ident() != thread:
            return
        seen[id(module)] = (module, [(b, b.detach().clone()) for b in module.buffers(False)])
        modules.append(module)
        if eval_mode:  # its whole subtree, before any child's flag is read (a forward may
            # read `self.bn.training`, or call a child's functional form, without running it)
            for sub in module.modules():
                if sub.training and id(sub) not in skipped:
                    trained.append(sub)
                    sub.training = False

    handle = torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
    try:
        yield modules
    finally:
        handle.remove()
        for module in trained:
            module.training = True
        with torch.no_grad():
            for _, buffers in seen.values():
                for buffer, value in buffers:
                    if buffer.shape == value.shape and not torch.equal(buffer, value):
                        buffer.copy_(value)


@dataclass
class OutputBytes:
    """What :func:`counted_output_bytes` records: ``bytes`` of the tensors the leaf modules
    returned from the moment counting ``started``, and ``total`` from the start."""

    bytes: int = 0
    total: int = 0
    started: bool = False


def _tensor_bytes(value) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


@contextlib.contextmanager
def counted_output_bytes(
    layer: nn.Module | Iterable[nn.Module] | None = None,
) -> Iterator[OutputBytes]:
    """Count the bytes of the outputs of every leaf module (one without children) that runs
    in the block on this thread: ``total`` from the start, ``bytes`` from the start too, or
    with ``layer`` (a module or several) from the moment it (the first of them) starts its
    forward (what runs after it is, in a feed-forward network, what a backward pass from
    the output to the layer goes through). Under ``torch.func.vmap`` an output counts with
    its per-example shape.

    An estimate of the memory a backward pass works in: it keeps a gradient for about every
    activation it goes through (the batched backward of :mod:`batched_grad`, one per class
    of a chunk). Not counted: functions that are not modules (``torch.flatten`` in a
    ``forward``) and TorchScript code (global hooks do not fire in it, and a ScriptModule
    given as ``layer`` takes no hook): the count is then low, never high, so a caller sizing
    chunks by it errs towards the size it would choose without it."""
    starts = [layer] if isinstance(layer, nn.Module) else list(layer or ())
    counter = OutputBytes(started=layer is None)
    thread = threading.get_ident()

    def on_output(module: nn.Module, args, output) -> None:
        if threading.get_ident() == thread and not module._modules:
            size = _tensor_bytes(output)
            counter.total += size
            if counter.started:
                counter.bytes += size

    def on_layer(module: nn.Module, args) -> None:
        counter.started = True

    registrations = [lambda: torch.nn.modules.module.register_module_forward_hook(on_output)]
    registrations += [
        call_hook(module, on_layer, pre=True)
        for module in starts
        if not isinstance(module, torch.jit.ScriptModule)
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Using `torch\.compile\(module\)` when there are global hooks"
        )
        with registered_hooks(*registrations):
            yield counter
