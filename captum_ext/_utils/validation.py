"""Argument checks with messages that name the argument."""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from .caller import inside_expanding_wrapper, user_stacklevel


def outside_inference_mode(value: Any) -> Any:
    """A normal copy of a tensor made under ``torch.inference_mode()`` (anything else as it is).

    Such tensors (a serving or preprocessing pipeline's output) cannot take part in autograd:
    torch refuses them deep inside the backward ("Inference tensors cannot be saved for
    backward"). The copy is made outside inference mode, so it is an ordinary tensor even when
    the caller is inside an inference-mode block.
    """
    if isinstance(value, Tensor) and value.is_inference():
        with torch.inference_mode(False):
            return value.clone()
    return value


def check_not_meta(tensor: Tensor, argument: str) -> None:
    """Refuse a tensor on the ``meta`` device (shapes without values), by name."""
    if tensor.is_meta:
        raise ValueError(
            f"`{argument}` is on the meta device, which holds shapes but no values; nothing "
            "can be computed from it (load or create the values on 'cpu' or 'cuda')."
        )


#: types whose values hold no tensor: skipped without a look inside (a long vocabulary
#: list of strings is passed over by one ``set(map(type, ...))``)
_NO_TENSOR_TYPES = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        slice,
        range,
        torch.dtype,
        torch.device,
        torch.Size,
    }
)


def _holds_no_tensor(items: Any) -> bool:
    return set(map(type, items)) <= _NO_TENSOR_TYPES


def outside_inference_mode_nested(value: Any) -> Any:
    """:func:`outside_inference_mode` for every tensor in ``value``, also inside tuples, lists
    and dicts. A container is rebuilt only where one of its tensors was replaced (otherwise
    it is returned as it is), a named tuple by its fields and other containers by their
    type; one that cannot be rebuilt so is returned as it is. A container of numbers and
    strings only (a vocabulary) is passed over at once (:func:`_holds_no_tensor`)."""
    if isinstance(value, tuple | list):
        if _holds_no_tensor(value):
            return value
        items = [outside_inference_mode_nested(item) for item in value]
        if all(new is old for new, old in zip(items, value)):
            return value
        try:
            if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
                return type(value)(*items)
            return type(value)(items)
        except TypeError:  # a tuple or list subclass with a constructor of its own
            return value
    if isinstance(value, dict):
        if _holds_no_tensor(value.values()):
            return value
        items = {key: outside_inference_mode_nested(item) for key, item in value.items()}
        if all(items[key] is item for key, item in value.items()):
            return value
        return items
    return outside_inference_mode(value)


def format_inputs(inputs: Any, *, argument: str = "inputs") -> tuple[Tensor, ...]:
    """Captum's input convention: a tensor or a tuple of tensors, batch first, finite.
    Tensors made under ``torch.inference_mode()`` are replaced by normal copies."""
    as_tuple = inputs if isinstance(inputs, tuple) else (inputs,)
    as_tuple = tuple(outside_inference_mode(value) for value in as_tuple)
    if not as_tuple:
        raise ValueError(f"`{argument}` is an empty tuple; expected at least one tensor.")
    for i, tensor in enumerate(as_tuple):
        where = argument if len(as_tuple) == 1 else f"{argument}[{i}]"
        if not isinstance(tensor, Tensor):
            raise TypeError(f"`{where}` must be a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.dim() == 0:
            raise ValueError(f"`{where}` is a scalar; expected a batch with the examples first.")
        check_not_meta(tensor, where)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"`{where}` contains NaN or infinite values.")
    batch = as_tuple[0].shape[0]
    if batch == 0:
        where = argument if len(as_tuple) == 1 else f"{argument}[0]"
        raise ValueError(f"`{where}` has no examples (a batch of 0); nothing to explain.")
    for i, tensor in enumerate(as_tuple[1:], start=1):
        if tensor.shape[0] != batch:
            raise ValueError(
                f"`{argument}[{i}]` has {tensor.shape[0]} examples but `{argument}[0]` has "
                f"{batch}; every input tensor needs the same batch size."
            )
    return as_tuple


def format_additional_forward_args(additional_forward_args: Any) -> tuple:
    if additional_forward_args is None:
        return ()
    if not isinstance(additional_forward_args, tuple):
        additional_forward_args = (additional_forward_args,)
    return tuple(outside_inference_mode(value) for value in additional_forward_args)


#: arguments that Captum's NoiseTunnel, ``infidelity`` and ``sensitivity_max`` expand with
#: the inputs themselves: they arrive with one entry per (expanded) example, or one for all
EXPANDED_BY_CAPTUM = frozenset({"target"})


def expand_per_example(values: Tensor, n: int, argument: str) -> Tensor:
    """Match per-example ``values`` (L, ...) to a batch of ``n``.

    L == n is used as is; L == 1 is broadcast; for the arguments Captum does not know (our
    ``contrast``), L dividing n is repeated with ``repeat_interleave``, the order in which
    Captum's NoiseTunnel, ``infidelity`` and ``sensitivity_max`` expand the inputs while
    passing other keywords through unchanged. ``target`` (:data:`EXPANDED_BY_CAPTUM`) is
    expanded by those wrappers already, so a shorter one is the caller's mistake (Captum's
    own methods refuse it too) and is refused, not repeated.
    """
    length = values.shape[0]
    if length == n:
        return values
    if length == 1:
        return values.expand(n, *values.shape[1:])
    if (
        length
        and n % length == 0
        and argument not in EXPANDED_BY_CAPTUM
        and inside_expanding_wrapper()  # a direct call with a short list is a mistake
    ):
        return values.repeat_interleave(n // length, dim=0)
    raise ValueError(
        f"`{argument}` has {length} entries but the inputs have {n} examples; give one per "
        "example (or one for all)."
    )


_PER_EXAMPLE = "per example"  # a plan's leaf: a tensor with the examples first
_ITEMS, _ENTRIES, _FIELDS = "items", "entries", "fields"  # tuples / lists, mappings, dataclasses


def _plan(value: Any, n: int, seen: dict[int, Any]) -> Any:
    """Where the per-example tensors of ``value`` are: :data:`_PER_EXAMPLE`, ``None`` (none
    inside), or ``(kind, [(place, plan), ...])`` for a container, only its places that hold
    one. ``seen`` has the plan of every container met in this walk, by ``id``: one reached
    again (shared, or a cycle, whose plan is still ``None`` while it is being walked) is
    not walked twice."""
    if isinstance(value, Tensor):
        if value.is_nested:  # ragged rows (torch.nested): its first size is the rows
            return _PER_EXAMPLE if value.size(0) == n else None
        return _PER_EXAMPLE if value.dim() > 0 and value.shape[0] == n else None
    if type(value) in _NO_TENSOR_TYPES:
        return None
    if id(value) in seen:
        return seen[id(value)]
    if isinstance(value, torch.nn.Module):  # a model's weights are no example's rows
        return None
    if isinstance(value, tuple | list):
        kind, places = _ITEMS, (enumerate(value) if not _holds_no_tensor(value) else ())
    elif isinstance(value, Mapping):
        kind, places = _ENTRIES, (value.items() if not _holds_no_tensor(value.values()) else ())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind, places = _FIELDS, _set_fields(value)
    else:
        return None
    seen[id(value)] = None  # while walking it: a cycle back to it is left as it is
    children = []
    for place, item in places:
        if type(item) not in _NO_TENSOR_TYPES:
            child = _plan(item, n, seen)
            if child is not None:
                children.append((place, child))
    plan = (kind, children) if children else None
    seen[id(value)] = plan
    return plan


_UNSET = object()


def _set_fields(value: Any) -> list[tuple[str, Any]]:
    """The ``(name, value)`` of the fields of dataclass instance ``value`` that are set (a
    ``field(init=False)`` filled later, a lazy cache, may not be yet), then of its other
    instance attributes (set by ``__post_init__`` or after construction: a derived
    per-example tensor follows the examples with the fields it came from, since the copy
    does not run ``__post_init__`` again)."""
    names = [f.name for f in dataclasses.fields(value)]
    fields = [(name, getattr(value, name, _UNSET)) for name in names]
    own = getattr(value, "__dict__", {})  # others as stored (a property may shadow a name)
    extra = [(name, item) for name, item in own.items() if name not in set(names)]
    return [(name, item) for name, item in fields + extra if item is not _UNSET]


def _item(container: Any, kind: str, place: Any) -> Any:
    if kind != _FIELDS:
        return container[place]
    if _is_field(container, place):
        return getattr(container, place)
    return container.__dict__[place]  # another attribute, as stored (a property may shadow it)


def _is_field(instance: Any, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(instance))


def _rebuilt_items(value: tuple | list, changes: dict[int, Any]) -> Any:
    items = [changes.get(i, item) for i, item in enumerate(value)]
    if type(value) is tuple:
        return tuple(items)
    if type(value) is list:
        return items
    if isinstance(value, tuple) and hasattr(value, "_fields") and hasattr(value, "_replace"):
        return value._replace(**{value._fields[i]: new for i, new in changes.items()})
    if isinstance(value, list):  # a subclass: a copy keeps its class and attributes
        rebuilt = copy.copy(value)
        for i, new in changes.items():
            rebuilt[i] = new
        return rebuilt
    rebuilt = type(value)(items)  # a tuple subclass (torch.return_types) from its items
    if type(rebuilt) is not type(value) or len(rebuilt) != len(value):
        raise TypeError(f"{type(value).__name__}(items) did not rebuild it")
    if hasattr(value, "__dict__"):
        rebuilt.__dict__.update(value.__dict__)
    return rebuilt


def _rebuilt_entries(value: Mapping, changes: dict[Any, Any]) -> Any:
    if isinstance(value, MappingProxyType):  # read-only: a view of a new dict
        return MappingProxyType({**value, **changes})
    if isinstance(value, MutableMapping):  # a copy keeps the class, order and defaults
        rebuilt = copy.copy(value)
        if rebuilt is value:
            raise TypeError(f"copy.copy returned the {type(value).__name__} itself")
        for key, new in changes.items():
            rebuilt[key] = new
        return rebuilt
    rebuilt = type(value)({**value, **changes})  # another read-only mapping, from its items
    _check_rebuilt_mapping(value, rebuilt, changes)
    return rebuilt


def _check_rebuilt_mapping(value: Mapping, rebuilt: Any, changes: dict[Any, Any]) -> None:
    """Raise ``TypeError`` unless ``rebuilt`` is a mapping with the keys of ``value`` and the
    changed values in place (a mapping whose constructor takes no dict, or that builds its
    values on access, is not rebuilt by ``type(value)(items)``)."""
    if not isinstance(rebuilt, Mapping) or set(rebuilt.keys()) != set(value.keys()):
        raise TypeError(f"{type(value).__name__}(dict) did not rebuild it")
    if any(rebuilt[key] is not new for key, new in changes.items()):
        raise TypeError(f"{type(value).__name__}(dict) did not keep the new values")


def _rebuilt_fields(value: Any, changes: dict[str, Any]) -> Any:
    """A shallow copy of dataclass instance ``value`` with the ``changes`` set: frozen and
    slots classes too, attributes set after construction kept, ``__post_init__`` not run
    again. ``dataclasses.replace`` only where the instance cannot be copied."""
    try:
        rebuilt = copy.copy(value)
    except Exception:  # noqa: BLE001 - a class of the user's that refuses copying
        rebuilt = value
    if rebuilt is value:
        return _replaced_fields(value, changes)
    for name, new in changes.items():
        if _is_field(rebuilt, name):  # through its setter, if any (frozen classes too)
            object.__setattr__(rebuilt, name, new)
        else:  # another attribute, as stored
            rebuilt.__dict__[name] = new
    return rebuilt


def _replaced_fields(value: Any, changes: dict[str, Any]) -> Any:
    init = {f.name for f in dataclasses.fields(value) if f.init}
    rebuilt = dataclasses.replace(value, **{k: v for k, v in changes.items() if k in init})
    for name, new in changes.items():
        if name not in init:  # a field set by __post_init__ (frozen classes too)
            object.__setattr__(rebuilt, name, new)
    return rebuilt


def _plain_container(value: Any, kind: str, changes: dict[Any, Any]) -> Any:
    """``value`` with ``changes`` as a plain ``tuple``, ``list`` or ``dict`` (its class lost),
    for a container that cannot be rebuilt with its own type; ``None`` for a dataclass."""
    if kind == _ITEMS:
        items = [changes.get(i, item) for i, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if kind == _ENTRIES:
        return {**value, **changes}
    return None


_REBUILDERS = {_ITEMS: _rebuilt_items, _ENTRIES: _rebuilt_entries, _FIELDS: _rebuilt_fields}


class PerExampleLayout:
    """Where the per-example tensors of ``value`` are, found once, to be mapped many times.

    A per-example tensor is one whose first dimension is the batch's ``n``, at the top level
    or inside tuples, lists, mappings (``dict``, ``collections.UserDict`` such as Hugging
    Face's ``BatchEncoding``, ``types.MappingProxyType``, any
    ``collections.abc.Mapping``) and dataclass instances, however deeply nested:
    ``({"meta": meta},)`` or ``((meta, mask),)`` follow the examples as a plain ``meta``
    does. Anything else (scalars, tensors of another length, strings, other objects) is
    left as it is.

    The walk is made once, when the layout is made: a caller that selects the rows of one
    example at a time (N selections) walks a long list of strings or numbers (a vocabulary)
    once, and each :meth:`map` rebuilds only the containers that hold a per-example tensor.
    A container is walked once even when reached several times (shared, or a cycle back to
    itself: the cycle is left as it is).

    :meth:`map` returns ``value`` itself, and every container in it, where nothing inside
    changes: a list or dict the model writes to (a call log, a cache) stays the caller's
    object. A container that changes is rebuilt with its type: a list or mutable mapping as
    a shallow copy (its class, attributes, order and ``defaultdict`` factory kept) with the
    changed items assigned, a named tuple by ``_replace``, another tuple subclass from its
    items, a ``MappingProxyType`` as a view of a new dict, another read-only mapping from a
    dict of its items (kept only where that gives the same keys with the new values), a
    dataclass as a shallow copy with the changed fields set (frozen and slots ones too;
    attributes set after construction kept, ``__post_init__`` not run again). One that
    cannot be rebuilt so (a tuple subclass with a constructor of its own, a mapping whose
    constructor takes no dict) is passed as a plain ``tuple``, ``list`` or ``dict``, with a
    warning: its rows follow the examples, its class is lost. A dataclass that can be
    neither copied nor rebuilt by ``dataclasses.replace`` is refused (``ValueError``).
    An ``nn.Module`` is never walked: its weights are no example's rows (a dataclass
    module too).

    Args:
        value (Any): ``additional_forward_args`` (or any argument read the same way).
        n (int): the number of examples of the batch.
    """

    def __init__(self, value: Any, n: int) -> None:
        self.value = value
        self.n = n
        self._plan = _plan(value, n, {})
        self._warned: set[type] = set()

    @property
    def has_per_example_tensors(self) -> bool:
        return self._plan is not None

    def map(self, function: Callable[[Tensor], Any]) -> Any:
        """``value`` with ``function`` applied to each per-example tensor (its result takes
        the tensor's place), in the order of :meth:`tensors`."""
        if self._plan is None:
            return self.value
        return self._apply(self.value, self._plan, function, {})

    def _apply(self, value: Any, plan: Any, function: Callable, done: dict[int, Any]) -> Any:
        if plan is _PER_EXAMPLE:
            return function(value)
        if id(value) in done:  # a container reached again: rebuilt once
            return done[id(value)]
        kind, children = plan
        changes = {}
        for place, child in children:
            old = _item(value, kind, place)
            new = self._apply(old, child, function, done)
            if new is not old:
                changes[place] = new
        rebuilt = value
        if changes:
            try:
                rebuilt = _REBUILDERS[kind](value, changes)
            except Exception as error:  # noqa: BLE001 - a class of the user's
                rebuilt = self._rebuilt_plain(value, kind, changes, error)
        done[id(value)] = rebuilt
        return rebuilt

    def _rebuilt_plain(self, value: Any, kind: str, changes: dict, error: Exception) -> Any:
        """``value`` with ``changes`` as a plain container, with a warning (once per class),
        where its own type cannot be rebuilt: its per-example tensors are never passed with
        all N rows to a call on other rows. A dataclass that can be neither copied nor
        rebuilt by ``dataclasses.replace`` is refused."""
        name = type(value).__name__
        plain = _plain_container(value, kind, changes)
        if plain is None:
            raise ValueError(
                f"`additional_forward_args` holds a {name} with tensors whose first dimension "
                f"is the N={self.n} examples, but it can be neither copied nor rebuilt by "
                f"dataclasses.replace ({type(error).__name__}: {error}), so its rows cannot "
                "follow the examples. Pass those tensors in a tuple, list, dict or another "
                "dataclass."
            ) from error
        if type(value) not in self._warned:
            self._warned.add(type(value))
            warnings.warn(
                f"A {name} in `additional_forward_args` holding tensors with the examples "
                f"first (N={self.n}) could not be rebuilt with its own type, so it is passed "
                f"as a plain {type(plain).__name__} (its class and attributes are lost) "
                "whose rows follow the examples. Pass them in a tuple, list, dict, named "
                "tuple or dataclass to keep the type.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return plain

    def select(self, examples: Tensor | slice) -> Any:
        """``value`` with the rows ``examples`` (an index tensor or a slice) of each
        per-example tensor."""

        return self.map(lambda tensor: take_rows(tensor, examples))

    def tensors(self) -> list[Tensor]:
        """The per-example tensors, in the order in which :meth:`with_tensors` puts
        replacements back (a container reached twice counts once)."""
        found: list[Tensor] = []

        def collect(tensor: Tensor) -> Tensor:
            found.append(tensor)
            return tensor

        self.map(collect)
        return found

    def with_tensors(self, replacements: Sequence[Any]) -> Any:
        """``value`` with its per-example tensors (:meth:`tensors`) replaced, in order, by
        ``replacements``."""
        remaining = iter(replacements)
        return self.map(lambda _: next(remaining))


def map_per_example(value: Any, n: int, function: Callable[[Tensor], Any]) -> Any:
    """``value`` with ``function`` applied to each of its per-example tensors.

    A per-example tensor is one whose first dimension is the batch's ``n``, found at the
    top level and inside tuples, lists, mappings and dataclasses, however deeply nested
    (:class:`PerExampleLayout` has the containers walked and how each is rebuilt;
    ``value`` itself is returned where nothing changes).

    This is the one place where the methods that re-index rows (subsets, chunks, repeated
    examples, one example at a time) find the rows of the additional arguments: a nested
    tensor passed unchanged would pair example ``i``'s row with example ``j``'s metadata
    whenever a chunk happens to have ``n`` rows.

    Captum has no such rule: its ``_expand_additional_forward_args`` (which its methods use
    where they expand the batch: integration steps, NoiseTunnel samples, perturbations)
    expands every top-level tensor with at least one dimension, whatever its first
    dimension, and never looks inside tuples, lists, dicts or other containers. A Captum
    explainer called inside our methods (the method :class:`~captum_ext.attr.Contrastive`
    wraps, say) therefore does not follow nested per-example tensors: pass those at the
    top level there.

    The rule reads the first dimension only, at the top level as inside containers: a
    tensor shared by all examples whose first dimension happens to equal ``n`` (a
    ``(C, D)`` prototype or class-embedding table with ``C == n``) is indexed as if it
    were per-example. Keep such a table out of the additional arguments: bind it in a
    closure or a module attribute, ``forward_func=lambda x, meta: model(x, meta, table)``.
    The perturbation metrics refuse the logits whose classes then change with the rows
    (:func:`captum_ext.metrics._perturbation.check_logits_like_clean`), where a chunk's
    row count differs from ``n``; a chunk of exactly ``n`` rows keeps the shape and is
    not refused.

    Args:
        value (Any): ``additional_forward_args`` (or any argument read the same way).
        n (int): the number of examples of the batch.
        function (Callable): applied to each per-example tensor; its result takes the
            tensor's place.
    """
    return PerExampleLayout(value, n).map(function)


def take_rows(tensor: Tensor, examples: Tensor | slice) -> Tensor:
    """The rows ``examples`` (an index tensor or a slice) of ``tensor``. Tensors that take
    no advanced indexing: ``torch.nested`` ones rebuilt from their rows (same layout),
    sparse COO ones by ``index_select``, CSR and CSC ones through COO and back to their
    layout; block-sparse ones (BSR, BSC) are refused."""
    if tensor.layout == torch.strided and not tensor.is_nested:
        if isinstance(examples, Tensor):
            return tensor[examples.to(tensor.device)]
        return tensor[examples]
    if not isinstance(examples, Tensor):
        examples = torch.arange(tensor.size(0))[examples]
    elif examples.dtype == torch.bool:
        examples = examples.nonzero()[:, 0]
    if tensor.is_nested:  # unbound once: indexing a jagged tensor row by row is slow
        rows = tensor.unbind()
        picked = [rows[i] for i in examples.tolist()]
        return torch.nested.as_nested_tensor(picked, layout=tensor.layout)
    index = examples.to(tensor.device)
    if tensor.layout == torch.sparse_coo:
        return tensor.index_select(0, index)
    if tensor.layout in (torch.sparse_bsr, torch.sparse_bsc) or tensor.dim() != 2:
        raise ValueError(
            f"`additional_forward_args`: a {tensor.dim()}-D {tensor.layout} tensor with the "
            "examples first cannot be split into their rows here (only COO tensors and 2-D "
            "CSR / CSC ones can); pass it as a COO tensor (tensor.to_sparse_coo())."
        )
    return tensor.to_sparse_coo().index_select(0, index).to_sparse(layout=tensor.layout)


def select_examples(value: Any, n: int, examples: Tensor | slice) -> Any:
    """The rows ``examples`` (an index tensor or a slice) of every per-example tensor of
    ``value`` (:func:`map_per_example`); everything else as it is. A caller selecting many
    times from one ``value`` makes a :class:`PerExampleLayout` once and calls its
    :meth:`~PerExampleLayout.select`."""
    return PerExampleLayout(value, n).select(examples)


def per_example_tensors(value: Any, n: int) -> list[Tensor]:
    """The per-example tensors of ``value`` (:func:`map_per_example`), in the order in
    which :func:`with_per_example_tensors` puts replacements back."""
    return PerExampleLayout(value, n).tensors()


def with_per_example_tensors(value: Any, n: int, replacements: Sequence[Any]) -> Any:
    """``value`` with its per-example tensors (:func:`per_example_tensors`) replaced, in
    order, by ``replacements`` (e.g. their rows for one example, inside ``vmap``)."""
    return PerExampleLayout(value, n).with_tensors(replacements)


def repeat_per_example(value: Any, n: int, repeats: int, rows: slice | None = None) -> Any:
    """Repeat each example of per-example tensors (leading dim ``n``) ``repeats`` times.

    Used where a batch is expanded with ``repeat_interleave`` (noisy copies, one row per
    (example, class) pair): tensors whose first dimension is ``n`` follow it, also inside
    tuples, lists, mappings and dataclasses (:func:`map_per_example`), optionally keeping
    only ``rows`` of the expanded batch; anything else (scalars, broadcastable tensors,
    non-tensors) is returned as it is.
    """

    def repeat(tensor: Tensor) -> Tensor:
        if tensor.layout != torch.strided or tensor.is_nested:  # sparse, nested: by rows
            order = torch.arange(tensor.size(0)).repeat_interleave(repeats)
            return take_rows(tensor, order if rows is None else order[rows])
        repeated = tensor.repeat_interleave(repeats, dim=0)
        return repeated if rows is None else repeated[rows]

    return map_per_example(value, n, repeat)


#: what the message of :func:`check_examples_first` suggests for a tokens-first layer, by
#: where the layer is read: the CAM classes (a ``reshape_transform`` can move the examples
#: first) and code that takes the layer's output as it is (``expose_token_grid``)
TOKENS_FIRST_REMEDY = {
    "reshape_transform": (
        "Build the model with batch_first=True, or pass a `reshape_transform` that moves the "
        "examples first before folding the tokens, e.g. lambda t: fold(t.transpose(0, 1))."
    ),
    "as_is": (
        "Build the model with batch_first=True, or explain the layer with a CAM class and a "
        "`reshape_transform` that moves the examples first before folding the tokens, e.g. "
        "lambda t: fold(t.transpose(0, 1))."
    ),
}


def rows_read_as_examples(shape: tuple[int, ...], n: int) -> bool:
    """Whether activations of ``shape`` can be read with the ``n`` examples first: the rule
    of :func:`check_examples_first` (``n`` rows, or feature maps of a multiple of ``n``
    rows, examples folded with frames or crops, that do not look tokens-first)."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return False
    if shape[0] == n:
        return True
    tokens_first = len(shape) >= 2 and shape[1] == n
    # folded rows only as feature maps (rows x C x H x W): a layer without its batch axis
    # (a squeeze inside the model, (C, H, W) for one example) or flattened tokens
    # ((T * N, D), token-major) would also be "a multiple of n rows"
    feature_maps = len(shape) >= 4
    folded = n > 0 and shape[0] > 0 and shape[0] % n == 0 and feature_maps
    return folded and not tokens_first


def check_examples_first(
    shape: tuple[int, ...],
    n: int,
    *,
    what: str,
    remedy: str = "reshape_transform",
    where: str = "output",
) -> None:
    """Refuse a layer's activations whose first dimension cannot be read as the batch of
    ``n`` examples.

    Every method reads row ``i`` of a layer's output as example ``i``. A layer laid out
    tokens-first, ``(tokens, N, D)`` (``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention`` with their default ``batch_first=False``), would otherwise give
    one "map" per token, or a 1 x 1 grid, without an error. ``what`` names the activations in
    the message (e.g. "`layer` ('encoder.layers.1') output"); ``remedy`` is a key of
    :data:`TOKENS_FIRST_REMEDY`; ``where`` ("output" or "input") is what the message asks
    for when it suggests another layer.

    The rule, for activations of shape ``(A_0, A_1, ...)``:

    - ``A_0 == n``: the examples come first; allowed.
    - otherwise refused when ``A_1 == n`` (the examples sit in dimension 1: tokens-first;
      this also refuses ``(17, 1, 32)`` for a single example), when ``A_0`` is not a
      multiple of ``n`` (no reading of the rows as examples exists), or when the
      activations have fewer than 4 dimensions (a layer without its batch axis, e.g.
      ``(C, H, W)`` after a squeeze for one example, or flattened tokens ``(T * N, D)``).
    - otherwise (feature maps ``(k * n, C, H, W, ...)`` with ``C != n``) allowed: a model
      that folds another axis into the batch (frames or crops, ``(N, T, C, H, W)`` reshaped
      to ``(N * T, C, H, W)``) has ``k`` rows per example, and the methods give one map per
      row (``A_0`` maps, as Captum's layer methods do), each row explained for its own
      example's target.

    What the shape cannot tell apart: a tokens-first layer whose token count equals ``n``
    passes (read as examples-first), a folded layer whose dimension 1 happens to equal
    ``n`` (e.g. ``n`` channels) is refused as tokens-first, and folded rows are read
    example-major (the ``k`` rows of example 0 first), as ``x.reshape(N * T, ...)`` of an
    ``(N, T, ...)`` tensor gives them.

    Raises:
        ValueError: ``shape`` is empty, or refused by the rule above; the message says when
            the layout looks tokens-first (dimension 1 has the ``n`` examples).
    """
    shape = tuple(int(s) for s in shape)
    if rows_read_as_examples(shape, n):
        return
    if not shape:
        raise ValueError(
            f"{what} is a scalar; a layer explained for N={n} examples must have a tensor "
            f"{where} with the examples first."
        )
    tokens_first = len(shape) >= 2 and shape[1] == n
    message = (
        f"{what} has shape {shape} for N={n} example{'' if n == 1 else 's'}: its first "
        "dimension is not the "
        "batch, and every method reads row i of a layer's activations as example i."
    )
    if tokens_first:
        examples = "example" if n == 1 else f"{n} examples"
        message += (
            f" Dimension 1 has the {examples}: the layer looks tokens-first, "
            f"(tokens, N, D), the layout of nn.TransformerEncoderLayer and "
            f"nn.MultiheadAttention with batch_first=False (their default). "
            + TOKENS_FIRST_REMEDY[remedy]
        )
    elif n > 0 and shape[0] % n == 0:  # a multiple of n rows, but no feature maps
        message += (
            f" Its {shape[0]} rows are read as folded examples only for feature maps (rows x "
            f"C x H x W, frames or crops folded into the batch); a {len(shape)}-D {where} "
            "with another row count has lost its batch axis (a squeeze inside the model) or "
            "folds tokens into it. Explain a layer whose "
            f"{where} has the examples first."
        )
    else:
        message += (
            f" Its {shape[0]} rows are no whole number of rows per example (a model that "
            "folds frames or crops into the batch has a multiple of N rows). Explain a "
            f"layer whose {where} has the examples first."
        )
    raise ValueError(message)


ALL_CLASSES = "all"

_SEVERAL_CLASSES_HINT = (
    "For several classes per example pass a 2-D tensor of class indices (e.g. "
    "torch.tensor([[0, 1]]) for classes 0 and 1 of every example) or 'all'."
)


def _tuple_on_logits_error(value: Any, argument: str, *, in_list: bool = False) -> ValueError:
    what = f" holds the tuple {value!r}" if in_list else f"={value!r}"
    return ValueError(
        f"`{argument}`{what}: in Captum a tuple of {len(value)} indices selects one element "
        f"of an output with {len(value) + 1} dimensions (batch first; a list of tuples gives "
        f"one such element per example), but forward_func returns (N, C) logits. "
        f"{_SEVERAL_CLASSES_HINT}"
    )


def single_logit_hint(*, takes_output_transform: bool = True, needs_module: bool = False) -> str:
    """What a binary classifier with one logit needs: its two-class logits ``[-z/2, z/2]``.

    ``takes_output_transform``: the caller's public function has an ``output_transform``
    argument to pass; else the model is wrapped: in a lambda, or, where the method needs an
    ``nn.Module`` whose layers it finds by name (``needs_module``), in
    :class:`captum_ext.data.LogitsOutput`, which keeps the layer names."""
    if takes_output_transform:
        fix = "pass output_transform=captum_ext.data.two_class_logits"
    elif needs_module:
        fix = (
            "wrap the model, captum_ext.data.LogitsOutput(model, reads='one logit'), which "
            "returns them (its layers keep their names)"
        )
    else:
        fix = "wrap the model, forward_func=lambda x: captum_ext.data.two_class_logits(model(x))"
    return (
        f" A binary classifier with one logit z (P(class 1) = sigmoid(z)) has the two-class "
        f"logits [-z/2, z/2]: {fix}."
    )


def check_several_classes(
    logits: Tensor,
    what: str,
    *,
    why: str = "the softmax of one output is always 1, so the scores would be constant",
    takes_output_transform: bool = True,
    needs_module: bool = False,
) -> None:
    """Refuse (N, 1) logits where ``what`` needs several classes (a softmax over one class is
    always 1), naming :func:`captum_ext.data.two_class_logits` (``takes_output_transform``
    and ``needs_module``: see :func:`single_logit_hint`)."""
    if logits.dim() == 2 and logits.shape[1] == 1:
        raise ValueError(
            f"{what}: the model has 1 output, and {why}."
            + single_logit_hint(
                takes_output_transform=takes_output_transform, needs_module=needs_module
            )
        )


def refuse_one_output_contrast(
    num_classes: int, *, argument: str = "contrast", per_position: bool = False
) -> None:
    """Refuse a contrast class on a model with one output, whatever the class given.

    A contrast Q is explained through the cross-entropy ``-log softmax(z)_Q``; over one
    output the log-softmax is 0 for every input, so its gradients, and every contrastive map,
    would be zeros without an error. The message names
    :func:`captum_ext.data.two_class_logits`, which turns one logit into the two classes
    that a contrast can be taken between (``per_position``: an output (N, 1, *positions), one
    logit per position, gets the transform that does the same at each position)."""
    if num_classes == 1:
        hint = (
            " A binary segmentation output of one logit z per position has the two-class "
            "logits [-z/2, z/2] along dimension 1: pass "
            "output_transform=lambda z: torch.cat([-z / 2, z / 2], dim=1)."
            if per_position
            else single_logit_hint()
        )
        raise ValueError(
            f"`{argument}`: the model has only 1 output, and a contrast is explained through "
            "the cross-entropy -log softmax(z)_Q, which over one output is 0 for every input: "
            "every contrastive map would be zeros." + hint
        )


def parse_class_selection(
    value: Any, n: int, device: torch.device | str | None = None, *, argument: str
) -> tuple[Tensor, bool]:
    """Parse explicit classes in Captum's forms for (N, C) logits, without the logits.

    The part of :func:`class_selection` that needs only the batch size: ``value`` is an int,
    a 0-dim or 1-element tensor, a tuple of one int, a list of ints or of one-int tuples or a
    1-D tensor (one class per example), or a 2-D tensor / list of lists (N or 1 rows of C'
    classes each); numpy integers and integer arrays are read as tensors. None and ``"all"``
    need the logits and are not accepted here. Indices are returned as given (negative ones
    included); :func:`check_class_range` checks and wraps them once the number of classes is
    known.

    Returns:
        (classes, multi): an (N, C') long tensor on ``device`` and whether several classes
        per example were asked for.
    """
    multi = False
    if type(value).__module__ == "numpy":  # labels from numpy: np.int64 scalars, int arrays
        import numpy as np

        try:
            # a reversed view (np.flip, argsort()[::-1]) has negative strides, which torch
            # refuses; the contiguous copy holds the same indices
            value = torch.as_tensor(np.ascontiguousarray(value) if np.ndim(value) else value)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"`{argument}`: a numpy value that is not class indices: {error}"
            ) from None
    if isinstance(value, tuple):
        if len(value) != 1:
            raise _tuple_on_logits_error(value, argument)
        value = value[0]
    if isinstance(value, bool):
        raise TypeError(f"`{argument}` must be a class index, not a bool.")
    if isinstance(value, int):
        return torch.full((n, 1), value, dtype=torch.long, device=device), False
    if isinstance(value, list):
        for item in value:
            if isinstance(item, tuple) and len(item) != 1:
                # Captum: a list of tuples holds one multi-dimensional index per example
                raise _tuple_on_logits_error(item, argument, in_list=True)
        value = [v[0] if isinstance(v, tuple) else v for v in value]
        try:
            value = torch.tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"`{argument}` must be an int, a list of ints, 'all' or a tensor of "
                f"class indices: {error}"
            ) from None
    if not isinstance(value, Tensor):
        raise TypeError(
            f"`{argument}` must be an int, a list, 'all' or a tensor of class indices, got "
            f"{type(value).__name__}."
        )
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"`{argument}` must hold integer class indices, got {value.dtype}.")
    check_not_meta(value, argument)
    # a serving pipeline's predictions (argmax under inference_mode) index logits that autograd
    # differentiates: an inference tensor there fails deep inside the backward
    value = outside_inference_mode(value).to(device=device, dtype=torch.long)
    if value.numel() == 1 and value.dim() <= 1:
        classes = value.reshape(1, 1).expand(n, 1)
    elif value.dim() == 1:
        classes = expand_per_example(value, n, argument).unsqueeze(1)
    elif value.dim() == 2:
        classes = expand_per_example(value, n, argument)
        multi = True
    else:
        raise ValueError(
            f"`{argument}` has {value.dim()} dimensions; expected 1 (one class per example) "
            "or 2 (several classes per example)."
        )
    # a tensor of its own: results hand the classes back, and a view of the caller's `target`
    # (or a stride-0 expansion of a single class) would let an edit of one change the other;
    # made outside inference mode, as the classes index logits that autograd differentiates
    with torch.inference_mode(False):
        return torch.clone(classes, memory_format=torch.contiguous_format), multi


def check_class_range(classes: Tensor, num_classes: int, *, argument: str) -> Tensor:
    """Check class indices against ``num_classes`` and wrap negative ones (-1: the last class).

    Indices in [-num_classes, num_classes) are accepted, as in PyTorch indexing (Captum
    accepts negative indices in int and tuple targets; here every form does).
    """
    if classes.numel() and (int(classes.min()) < -num_classes or int(classes.max()) >= num_classes):
        raise ValueError(
            f"`{argument}` holds class indices outside [-{num_classes}, {num_classes}) for a "
            f"model with {num_classes} outputs (negative indices count from the last class)."
        )
    if classes.numel() and int(classes.min()) < 0:
        classes = torch.where(classes < 0, classes + num_classes, classes)
    return classes


def runner_up_classes(logits: Tensor, predicted: Tensor | None = None) -> Tensor:
    """``(N,)`` the most likely class other than ``predicted`` (default: the arg-max), ties
    to the lowest index, read from the logits in at least float32.

    ``topk(2)[1]`` is not that: on an exact tie with the top class it may return the
    prediction itself, and on probabilities that rounded to 0 (a confident float32 softmax)
    any of the other classes."""
    scores = logits.detach()
    if not scores.is_floating_point() or scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    if predicted is None:
        predicted = scores.argmax(dim=1)
    others = scores.scatter(1, predicted.reshape(-1, 1), float("-inf"))
    return others.argmax(dim=1)


def class_selection(
    value: Any, logits: Tensor, *, argument: str, default: str
) -> tuple[Tensor, bool]:
    """Turn a Captum-style ``target``/``contrast`` into a (N, C') tensor of class indices.

    Accepted: None (``default``: "predicted" or "runner_up"), an int, a 0-dim or
    1-element tensor, a tuple of one int, a list of ints or of one-int tuples or a 1-D tensor
    (one class per example), ``"all"`` (every class), or a 2-D tensor / list of lists
    (N or 1 rows of C' classes each). Negative indices count from the last class (-1 is the
    last), as in PyTorch indexing. A tuple of several ints (or a list of such tuples) is
    Captum's index into an output with more than two dimensions, so it is refused here with
    a message pointing to the 2-D tensor form of several classes per example.

    ``default="runner_up"`` marks a contrast class (ContrastCAM, Contrastive): it is
    explained through a cross-entropy, which over one output is 0 for every input, so on a
    model with one output every contrast is refused (the default and any class given), with
    a message naming :func:`captum_ext.data.two_class_logits`.

    Returns:
        (classes, multi): the indices on the logits' device, in [0, C), and whether the caller
        asked for several classes per example (so the output keeps a class dimension).
    """
    n, num_classes = logits.shape
    device = logits.device
    if default == "runner_up" and num_classes < 2:
        if value is None:
            raise ValueError(
                f"`{argument}` defaults to the runner-up class, but the model has only "
                f"{num_classes} output." + single_logit_hint()
            )
        refuse_one_output_contrast(num_classes, argument=argument)
    if value is None:
        if default == "runner_up":
            classes = runner_up_classes(logits)[:, None]
        else:
            classes = logits.detach().argmax(dim=1, keepdim=True)
        return classes, False
    if isinstance(value, str):
        if value != ALL_CLASSES:
            raise ValueError(f"`{argument}`={value!r}: the only string accepted is 'all'.")
        classes = torch.arange(num_classes, device=device).expand(n, num_classes)
        return classes, True
    classes, multi = parse_class_selection(value, n, device, argument=argument)
    return check_class_range(classes, num_classes, argument=argument), multi


def _index_of(entry: Any, argument: str) -> int:
    if isinstance(entry, Tensor) and entry.numel() == 1 and not entry.is_floating_point():
        entry = entry.item()
    if isinstance(entry, bool) or not isinstance(entry, int):
        raise TypeError(
            f"`{argument}` must hold integer indices, got {type(entry).__name__} {entry!r}."
        )
    return entry


def output_selection(
    value: Any, output: Tensor, *, argument: str, default: str
) -> tuple[Tensor, bool]:
    """Captum's targets for an output of any rank, as columns of ``output.flatten(1)``.

    For (N, C) logits this is :func:`class_selection`. For an output with more than two
    dimensions, (N, C, d_1, ..., d_k), Captum's forms select ONE element per example: a tuple
    ``(c, i_1, ..., i_k)`` (the same element of every example) or a list of N such tuples (one
    per example); negative indices count from the end of their dimension. Dimension 1 is the
    class axis. Anything else (None, an int, a list of ints, a tensor, ``"all"``) does not
    name one element per example and is refused with a message that says so.

    Returns:
        (columns, multi): an (N, C') long tensor of column indices into ``output.flatten(1)``
        (``c * d_1 * ... * d_k + ravelled position``), and whether several selections per
        example were asked for (always False for outputs of more than two dimensions).
    """
    if output.dim() == 2:
        return class_selection(value, output, argument=argument, default=default)
    if default == "runner_up":  # a contrast: the cross-entropy over one class is 0
        refuse_one_output_contrast(int(output.shape[1]), argument=argument, per_position=True)
    n, sizes = output.shape[0], tuple(output.shape[1:])
    shape = f"(N, {', '.join(str(s) for s in sizes)})"
    names = {1: ["k"], 2: ["h", "w"], 3: ["d", "h", "w"]}.get(
        len(sizes) - 1, [f"i_{a}" for a in range(1, len(sizes))]
    )
    form = f"a tuple of {len(sizes)} indices (class, {', '.join(names)})"
    hint = (
        f"give {form}, the same for every example, or a list of N such tuples (Captum's "
        "convention), or reduce the output to (N, classes) scores with `output_transform` "
        "(e.g. each class's logits summed over a pixel mask)"
    )
    if value is None:
        raise ValueError(
            f"`{argument}` is required when forward_func returns an output of shape {shape}, "
            f"more than (N, classes): {hint}."
        )
    if isinstance(value, tuple):
        entries = [value]
    elif isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
        entries = value
    else:
        raise ValueError(
            f"`{argument}`={value!r} does not select one element per example of an output of "
            f"shape {shape}: {hint}."
        )
    rows = []
    for entry in entries:
        if len(entry) != len(sizes):
            raise ValueError(
                f"`{argument}` holds the tuple {entry!r} of {len(entry)} indices; an output of "
                f"shape {shape} needs {len(sizes)}: {hint}."
            )
        row = []
        for axis, (raw, size) in enumerate(zip(entry, sizes), start=1):
            index = _index_of(raw, argument)
            if not -size <= index < size:
                raise ValueError(
                    f"`{argument}` holds the index {index} for dimension {axis} of the output, "
                    f"which has size {size} (output shape {shape})."
                )
            row.append(index % size)
        rows.append(row)
    positions = torch.tensor(rows, dtype=torch.long, device=output.device)  # (L, k)
    strides = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
    strides = torch.tensor(strides, dtype=torch.long, device=output.device)
    flat = (positions * strides).sum(dim=1)
    if isinstance(value, tuple):
        return flat.reshape(1, 1).expand(n, 1), False
    return expand_per_example(flat, n, argument).unsqueeze(1), False


# ---------------------------------------------------------------------------------------------
# numbers, devices and dtypes: the one place every module checks them


#: torch's out-of-memory error: ``torch.OutOfMemoryError`` from torch 2.5, before that only
#: ``torch.cuda.OutOfMemoryError`` (the same class where both exist)
OutOfMemoryError: type[BaseException] = getattr(
    torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError
)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. A ``TypeError`` that is also a ``ValueError``, so
    callers who catch either (both were raised for this in earlier releases) still do."""


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer, numpy's included (``np.int64(3)``); bools are not."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number, numpy's included (``np.float32(0.5)``); bools
    (also ``np.True_``) are not."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(value: Any, argument: str, *, minimum: int = 1) -> int:
    """``value`` as an ``int`` of at least ``minimum`` (bools refused); numpy integers pass.

    Raises:
        ArgumentTypeError: ``value`` is not an integer.
        ValueError: ``value`` is below ``minimum``.
    """
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(
            f"`{argument}` must be an int >= {minimum}, got {type(value).__name__} {value!r}."
        )
    if value < minimum:
        bound = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"`{argument}` must be {bound}, got {value!r}.")
    return int(value)


def check_number(
    value: Any,
    argument: str,
    *,
    minimum: float | None = 0.0,
    allow_minimum: bool = False,
    maximum: float | None = None,
    allow_maximum: bool = True,
) -> float:
    """``value`` as a finite ``float`` in the given range (by default ``> 0``).

    Raises:
        ArgumentTypeError: ``value`` is not a real number (bools refused).
        ValueError: ``value`` is not finite or outside the range.
    """
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"`{argument}` must be a number, got {type(value).__name__} {value!r}."
        )
    number = float(value)
    low_ok = minimum is None or number > minimum or (allow_minimum and number == minimum)
    high_ok = maximum is None or number < maximum or (allow_maximum and number == maximum)
    if not math.isfinite(number) or not low_ok or not high_ok:
        parts = []
        if minimum is not None:
            parts.append(f"{'>=' if allow_minimum else '>'} {minimum:g}")
        if maximum is not None:
            parts.append(f"{'<=' if allow_maximum else '<'} {maximum:g}")
        bound = " and ".join(parts)
        raise ValueError(f"`{argument}`={value!r}: expected a finite number {bound}.".rstrip())
    return number


def torch_device(device: Any, *, argument: str = "device") -> torch.device:
    """``torch.device(device)``, or a ValueError naming ``argument`` for what torch cannot
    read as a device (``"gpu7"``, a dtype); whether the device exists is not checked."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"`{argument}`={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {error}"
        ) from None


def check_float_dtype(dtype: Any, argument: str = "dtype") -> torch.dtype:
    """``dtype`` if it is a floating-point ``torch.dtype``, else a TypeError naming it."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"`{argument}` must be a floating-point torch.dtype (e.g. torch.float32), got "
            f"{dtype!r}."
        )
    return dtype


def parse_device(device: Any, *, argument: str = "device") -> torch.device:
    """``device`` (a string or ``torch.device``) as a ``torch.device`` that exists here."""
    parsed = torch_device(device, argument=argument)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`{argument}`={device!r}: CUDA is not available on this machine.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"`{argument}`={device!r}: only {torch.cuda.device_count()} CUDA device(s) here."
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`{argument}`={device!r}: MPS is not available on this machine.")
    if parsed.type == "meta" and argument.startswith("--"):
        raise ValueError(
            f"`{argument}`={device!r}: the meta device holds shapes, not values; nothing can "
            "be computed on it."
        )
    if parsed.type not in ("cpu", "cuda", "mps", "meta"):  # xpu, hpu, vulkan, ...
        backend = getattr(torch, parsed.type, None)
        try:
            available = bool(backend.is_available())  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - no such backend, or it fails to answer
            available = False
        if not available:
            raise ValueError(
                f"`{argument}`={device!r}: no {parsed.type} device is available to this torch "
                f"({torch.__version__})."
            )
    return parsed


def model_device(model: Any) -> torch.device | None:
    """The one device of ``model``'s parameters and buffers (``model`` may be a bound method
    of a module); None when it has none or they are spread over several devices."""
    from captum_ext._utils.layers import root_module

    module = root_module(model)
    if module is None:
        return None
    devices = {t.device for t in [*module.parameters(), *module.buffers()]}
    return devices.pop() if len(devices) == 1 else None


def model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of ``model``'s first floating-point parameter or buffer; CPU and
    float32 when it has none."""
    from captum_ext._utils.layers import root_module

    module = root_module(model)
    tensors = [] if module is None else [*module.parameters(), *module.buffers()]
    for tensor in tensors:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def same_model_output(got: Any, expected: Any) -> bool:
    """Whether two model outputs agree: tensors to float32 rounding, or dicts, tuples and
    lists of them (a dict of logits, ``(logits, features)``) item by item."""
    if isinstance(expected, Tensor):
        return (
            isinstance(got, Tensor)
            and got.shape == expected.shape
            and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
        )
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and got.keys() == expected.keys()
            and all(same_model_output(got[key], expected[key]) for key in expected)
        )
    if isinstance(expected, (tuple, list)):
        return (
            isinstance(got, (tuple, list))
            and len(got) == len(expected)
            and all(same_model_output(a, b) for a, b in zip(got, expected))
        )
    return False


def check_flag(value: Any, argument: str) -> bool:
    """``value`` if it is a bool (numpy's included), else a TypeError naming ``argument``: a
    string such as ``"False"`` is truthy and would silently mean True."""
    import numpy as np

    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise TypeError(f"`{argument}` must be True or False, got {type(value).__name__} {value!r}.")


def refuse_ignored_settings(settings: dict[str, tuple[Any, Any]], reason: str) -> None:
    """Refuse each setting (``name -> (value, default)``) given a value other than its default
    where it would be ignored; ``reason`` says why, e.g. "it sets the generator built here,
    and `generator_net` is given"."""
    for name, (value, default) in settings.items():
        if value is not default and not _equal_setting(value, default):
            raise ValueError(f"`{name}`={value!r} would be ignored: {reason}.")


def _equal_setting(value: Any, default: Any) -> bool:
    try:
        return bool(value == default)
    except (TypeError, RuntimeError, ValueError):  # a tensor compared with None, ...
        return False


def to_model_input(tensor: Tensor, model: Any) -> Tensor:
    """``tensor`` on the device of ``model`` (an ``nn.Module`` or a callable wrapping one;
    left where it is for a model spread over several devices), and, when both are floating
    point and all the model's floating-point parameters and buffers have one dtype, in that
    dtype (float32 images for a float64 model: a convolution refuses mixed dtypes deep
    inside torch); a model whose parameters mix dtypes gets the dtype as given. Unchanged
    for a model without parameters or buffers."""
    from captum_ext._utils.layers import root_module

    module = root_module(model)
    if module is None or next(iter([*module.parameters(), *module.buffers()]), None) is None:
        return tensor
    device = model_device(module)
    dtype = model_input_dtype(module)
    if tensor.is_floating_point() and dtype is not None:
        tensor = tensor.to(dtype)
    return tensor if device is None else tensor.to(device)


def model_input_dtype(model: Any) -> torch.dtype | None:
    """The one dtype of ``model``'s floating-point parameters and buffers, which its
    floating-point inputs are given; None where they mix dtypes (the inputs as given) or
    it has none."""
    from captum_ext._utils.layers import root_module

    module = root_module(model)
    if module is None:
        return None
    dtypes = {t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def row_sum_tolerance(classes: int) -> float:
    """How far from 1 a row of ``classes`` probabilities may sum: ``max(1e-2, classes *
    5e-5)``, at most 0.5, the same for every dtype and every row of that width (so the
    accumulator, which checks each batch, and the function on the concatenated batches
    agree).

    The check is there for rows that are no distribution at all: per-class sigmoids sum to
    about C / 2 (2.4 for a few classes), unnormalised scores in [0, 1] to anything (0.35);
    both miss 1 by far more than this. What it must accept is rounding:

    - half precision: a float16 softmax misses 1 by up to about 4e-4, a bfloat16 one by up
      to about 3e-3, and so does their mean taken in float32 (MC dropout, test-time
      augmentation of an autocast model);
    - probabilities written with 4 decimals (a CSV): each value is off by at most 5e-5, so
      a row of C classes by at most ``C * 5e-5`` (0.05 for 1000 classes; measured on
      softmaxes of 1000 classes at temperatures 0.01..12: at most 6.3e-3, about
      ``sqrt(C) * 2.9e-5`` when the errors do not all lean one way).

    The 0.5 cap keeps refusing sums below 0.5 or above 1.5 for any number of classes: a
    4-decimal rounding that loses half the mass (classes of which most fall below 5e-5) no
    longer describes the distribution either."""
    return min(max(1e-2, classes * 5e-5), 0.5)


def check_rows_sum_to_one(probabilities: Tensor, argument: str, advice: str = "") -> None:
    """A ValueError naming ``argument`` unless every row of the (N, C) ``probabilities``
    sums to 1 within :func:`row_sum_tolerance`: per-class sigmoids, or logits that happen
    to lie in [0, 1], are no distribution over the classes (their ECE or UE means nothing).
    ``advice`` ends the message (the caller's alternative form, if it has one)."""
    sums = probabilities.sum(dim=1, dtype=torch.float64)
    tolerance = row_sum_tolerance(probabilities.shape[1])
    bad = ((sums - 1).abs() > tolerance).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(
            f"`{argument}` rows must sum to 1 (class probabilities; apply softmax to logits "
            f"first), but row {row} sums to {float(sums[row]):.6g} (tolerance {tolerance:g})."
            + advice
        )
