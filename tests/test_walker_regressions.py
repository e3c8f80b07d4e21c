"""Regressions of the ``additional_forward_args`` walker (:class:`PerExampleLayout`): a tuple
subclass that cannot be rebuilt still has its rows follow the examples, dataclasses with an
unset ``field(init=False)``, attributes set after construction or a non-idempotent
``__post_init__``, ``nn.Module`` dataclasses, read-only mappings whose constructor takes no
dict, and the perturbation metrics' message for a model whose classes depend on its batch."""

import collections.abc
import dataclasses

import pytest
import torch
import torch.nn as nn

from captum_ext._utils.validation import select_examples
from captum_ext.metrics import deletion, deletion_curves, masking_score
from captum_ext.metrics.structure import structure_deletion

N = 4
ROWS = torch.tensor([1, 1, 2])


@pytest.fixture
def meta():
    return torch.arange(N * 2.0).view(N, 2)


class Pair(tuple):
    """A tuple subclass whose constructor takes its two items, not an iterable."""

    def __new__(cls, first, second):
        return super().__new__(cls, (first, second))


class BiasNet(nn.Module):
    """Adds a per-example bias ``extra[0]`` (N, 5) to the logits."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x, extra):
        return self.c(x).mean((2, 3)) + extra[0]


def test_a_tuple_subclass_that_cannot_be_rebuilt_still_follows_the_examples():
    # batch_size=N: every chunk has N rows, so the unindexed Pair ran without an error,
    # pairing perturbed row k with example k's bias instead of its own example's
    torch.manual_seed(0)
    net = BiasNet().eval()
    x, maps, bias = torch.randn(N, 3, 8, 8), torch.rand(N, 1, 8, 8), torch.randn(N, 5) * 5
    kwargs = dict(n_steps=3, batch_size=N)
    as_tuple = deletion_curves(net, x, maps, additional_forward_args=((bias, 0),), **kwargs)
    with pytest.warns(UserWarning, match="Pair .*plain tuple"):
        as_pair = deletion_curves(net, x, maps, additional_forward_args=(Pair(bias, 0),), **kwargs)
    torch.testing.assert_close(as_pair.curves, as_tuple.curves)


@dataclasses.dataclass
class LazyConfig:
    temperature: float
    cache: dict = dataclasses.field(init=False)  # filled by the model, later


@dataclasses.dataclass
class LazyMeta:
    meta: torch.Tensor
    cache: dict = dataclasses.field(init=False)


def test_an_unset_init_false_field_is_skipped(meta):
    config = LazyConfig(2.0)
    assert select_examples((config,), N, ROWS)[0] is config
    picked = select_examples((LazyMeta(meta),), N, ROWS)[0]
    assert type(picked) is LazyMeta and torch.equal(picked.meta, meta[ROWS])
    assert not hasattr(picked, "cache")


def test_deletion_runs_with_a_config_dataclass_whose_cache_is_unset():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 5, 3, padding=1)

        def forward(self, x, config):
            return self.c(x).mean((2, 3)) / config.temperature

    torch.manual_seed(0)
    x, maps = torch.randn(N, 3, 8, 8), torch.rand(N, 1, 8, 8)
    scores = deletion(Net().eval(), x, maps, additional_forward_args=(LazyConfig(2.0),), n_steps=3)
    assert scores.shape == (N,)


@dataclasses.dataclass
class Offsets:
    offsets: torch.Tensor

    def __post_init__(self):  # not idempotent: running it again sums twice
        self.offsets = self.offsets.cumsum(0)


@dataclasses.dataclass
class Scaled:
    meta: torch.Tensor


@dataclasses.dataclass(frozen=True, slots=True)
class Validated:
    meta: torch.Tensor
    k: int = 1

    def __post_init__(self):
        if self.meta.shape[0] != N:
            raise ValueError("needs the N examples")


def test_dataclasses_are_copied_not_reconstructed(meta):
    offsets = Offsets(torch.ones(N))
    picked = select_examples((offsets,), N, ROWS)[0]
    assert torch.equal(picked.offsets, offsets.offsets[ROWS])  # __post_init__ not run again
    scaled = Scaled(meta)
    scaled.scale = 0.5  # an attribute set after construction
    picked = select_examples((scaled,), N, ROWS)[0]
    assert picked.scale == 0.5 and torch.equal(picked.meta, meta[ROWS])
    assert scaled.meta is meta  # the caller's is untouched
    validated = Validated(meta)
    picked = select_examples((validated,), N, ROWS)[0]  # frozen, slots, validating
    assert type(picked) is Validated and torch.equal(picked.meta, meta[ROWS])
    assert validated.meta is meta


@dataclasses.dataclass
class Uncopyable:
    meta: torch.Tensor

    def __post_init__(self):
        if self.meta.shape[0] != N:
            raise ValueError("needs the N examples")

    def __copy__(self):
        raise TypeError("not copyable")


def test_a_dataclass_that_cannot_be_rebuilt_is_refused_naming_the_argument(meta):
    with pytest.raises(ValueError, match="`additional_forward_args` holds a Uncopyable"):
        select_examples((Uncopyable(meta),), N, ROWS)


def test_masking_score_keeps_attributes_set_after_construction():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 5, 3, padding=1)

        def forward(self, x, extra):
            return self.c(x).mean((2, 3)) + extra.meta * extra.scale

    torch.manual_seed(0)
    x, maps = torch.randn(N, 3, 8, 8), torch.rand(N, 1, 8, 8)
    extra = Scaled(torch.randn(N, 5))
    extra.scale = 0.5
    scores = masking_score(Net().eval(), x, maps, additional_forward_args=(extra,))
    assert scores.shape == (N,)


@dataclasses.dataclass(eq=False)
class Head(nn.Module):
    scale: torch.Tensor

    def __post_init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)


def test_a_module_dataclass_is_not_walked():
    torch.manual_seed(0)
    head = Head(torch.ones(N, 3))
    assert select_examples((head,), N, ROWS)[0] is head  # not rebuilt with fresh weights


class Columns(collections.abc.Mapping):
    """A read-only view over the columns of a table: its constructor takes the table."""

    def __init__(self, table):
        self.table = table

    def __getitem__(self, column):
        return self.table[:, column]

    def __iter__(self):
        return iter(range(self.table.shape[1]))

    def __len__(self):
        return self.table.shape[1]


def test_a_read_only_mapping_that_cannot_be_rebuilt_is_passed_as_a_dict(meta):
    with pytest.warns(UserWarning, match="Columns .*plain dict"):
        picked = select_examples((Columns(meta),), N, ROWS)[0]
    assert type(picked) is dict and list(picked) == [0, 1]
    for column in (0, 1):
        assert torch.equal(picked[column], meta[ROWS, column])


class InBatch(nn.Module):
    """Scores each image against the images of its own batch: as many classes as rows."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        features = self.c(x).mean((2, 3))
        return features @ features.T


def test_classes_that_depend_on_the_batch_are_not_blamed_on_extra_arguments():
    torch.manual_seed(0)
    x, maps = torch.randn(N, 3, 8, 8), torch.rand(N, 1, 8, 8)
    with pytest.raises(ValueError, match="depends on the batch") as refused:
        deletion(InBatch().eval(), x, maps, n_steps=3, batch_size=3, target=0)
    assert "additional_forward_args" not in str(refused.value)


def test_check_logits_like_clean_without_per_example_extras():
    from captum_ext.metrics._perturbation import check_logits_like_clean

    with pytest.raises(ValueError, match=r"\(6, 6\).*\(4,\).*depends on the batch"):
        check_logits_like_clean(torch.zeros(6, 6), (4,), N, per_example_extras=False)


@pytest.mark.parametrize("metric", [deletion, structure_deletion])
def test_docs_say_a_shared_table_is_refused_only_for_other_chunk_sizes(metric):
    doc = " ".join(metric.__doc__.split())
    assert "refused (ValueError) where a chunk's row count differs from N" in doc
    assert "closure" in doc


def test_a_dataclass_attribute_derived_in_post_init_follows_the_examples():
    """A per-example tensor that ``__post_init__`` derives into a non-field attribute is
    re-indexed with the fields (the copy does not run ``__post_init__`` again)."""
    import dataclasses

    from captum_ext._utils.validation import select_examples

    @dataclasses.dataclass
    class Extra:
        bias: torch.Tensor

        def __post_init__(self):
            self.scaled = self.bias * 2

    bias = torch.arange(8.0).view(4, 2)
    picked = select_examples((Extra(bias),), 4, torch.tensor([3, 1]))[0]
    torch.testing.assert_close(picked.bias, bias[[3, 1]])
    torch.testing.assert_close(picked.scaled, bias[[3, 1]] * 2)
