"""How :func:`map_per_example` walks ``additional_forward_args``: any mapping and dataclass,
containers left as they are (the caller's own object) where nothing in them changes, tuple
subclasses kept or passed as plain tuples, cycles, and one walk per call for a long list
without tensors (also when the rows of one example at a time are selected)."""

import collections
import dataclasses
import types
import warnings

import pytest
import torch
import torch.nn as nn

from captum_ext._utils.validation import (
    map_per_example,
    per_example_tensors,
    select_examples,
    with_per_example_tensors,
)
from captum_ext.metrics import deletion, gradtrust

N = 4
ROWS = torch.tensor([3, 1])


@pytest.fixture
def meta():
    return torch.arange(N * 2.0).view(N, 2)


@dataclasses.dataclass
class Batch:
    meta: torch.Tensor
    name: str = "batch"


@dataclasses.dataclass(frozen=True)
class FrozenBatch:
    meta: torch.Tensor
    total: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "total", self.meta.sum(1))


class ReadOnlyMapping(collections.abc.Mapping):
    def __init__(self, data):
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


def test_any_mapping_is_walked_and_keeps_its_type(meta):
    user = collections.UserDict(meta=meta, name="x")
    user.tag = "kept"  # an attribute of the instance (BatchEncoding has some)
    proxy = types.MappingProxyType({"meta": meta})
    read_only = ReadOnlyMapping({"meta": meta})
    picked = select_examples((user, proxy, read_only), N, ROWS)
    assert type(picked[0]) is collections.UserDict and picked[0].tag == "kept"
    assert picked[0]["name"] == "x"
    assert type(picked[1]) is types.MappingProxyType
    assert type(picked[2]) is ReadOnlyMapping
    for mapping in picked:
        assert torch.equal(mapping["meta"], meta[ROWS])
    assert user["meta"] is meta and proxy["meta"] is meta  # the caller's are untouched


def test_dataclasses_are_walked_frozen_ones_too(meta):
    plain, frozen = select_examples((Batch(meta), FrozenBatch(meta)), N, ROWS)
    assert type(plain) is Batch and plain.name == "batch"
    assert torch.equal(plain.meta, meta[ROWS])
    assert type(frozen) is FrozenBatch
    assert torch.equal(frozen.meta, meta[ROWS])
    assert torch.equal(frozen.total, meta.sum(1)[ROWS])  # a field set after __init__ too


class MetaNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.meta = nn.Linear(2, 5)

    def forward(self, x, extra):
        meta = extra.meta if dataclasses.is_dataclass(extra) else extra["meta"]
        return self.features(x) + 3 * self.meta(meta)


@pytest.mark.parametrize("wrap", [collections.UserDict, types.MappingProxyType, Batch])
def test_deletion_pairs_rows_with_their_own_metadata_in_any_container(wrap):
    # batch_size=N: every chunk has N rows, so an unwalked container ran without an error,
    # pairing row k with example k's metadata instead of its own example's
    torch.manual_seed(0)
    net = MetaNet().eval()
    x, maps, meta = torch.randn(N, 3, 8, 8), torch.rand(N, 1, 8, 8), torch.randn(N, 2)
    kwargs = dict(target=torch.arange(N), n_steps=3, batch_size=N)
    as_dict = deletion(net, x, maps, additional_forward_args=({"meta": meta},), **kwargs)
    wrapped = wrap({"meta": meta}) if wrap is types.MappingProxyType else wrap(meta=meta)
    other = deletion(net, x, maps, additional_forward_args=(wrapped,), **kwargs)
    torch.testing.assert_close(other, as_dict)


def test_containers_without_a_change_are_the_callers_objects(meta):
    log, cache = [], {}
    value = (log, cache, ("a", 1), meta[:2])  # meta[:2]: 2 rows, not per-example
    assert map_per_example(value, N, lambda t: t[:1]) is value
    picked = select_examples((log, {"meta": meta, "cache": cache}), N, ROWS)
    assert picked[0] is log and picked[1]["cache"] is cache


def test_a_list_the_model_writes_to_records_every_call():
    class Logging(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1))

        def forward(self, x, log):
            log.append(x.shape[0])
            return self.f(x).flatten(1)

    torch.manual_seed(0)
    calls = []
    x, maps = torch.randn(N, 3, 8, 8), torch.rand(N, 1, 8, 8)
    deletion(Logging().eval(), x, maps, additional_forward_args=(calls,), n_steps=5)
    # the clean pass, then the N * (n_steps + 1) perturbed rows in one chunk
    assert calls == [N, N * 6]


class Tagged(tuple):
    """A tuple subclass whose constructor needs more than its items."""

    def __new__(cls, tag, items):
        made = super().__new__(cls, items)
        made.tag = tag
        return made


class Labelled(tuple):
    """A tuple subclass built from its items, with an attribute set afterwards."""


def test_tuple_subclasses_are_rebuilt_with_their_type_or_as_plain_tuples(meta):
    labelled = Labelled([meta, 1])
    labelled.label = "kept"
    rebuilt = select_examples(labelled, N, ROWS)
    assert type(rebuilt) is Labelled and rebuilt.label == "kept" and rebuilt[1] == 1
    assert torch.equal(rebuilt[0], meta[ROWS])
    tagged = Tagged("t", [meta])
    with pytest.warns(UserWarning, match="Tagged .* could not be rebuilt.*plain tuple"):
        plain = select_examples((tagged,), N, ROWS)
    # its class and tag are lost, but never its rows: they follow the examples
    assert type(plain[0]) is tuple and torch.equal(plain[0][0], meta[ROWS])
    structseq = torch.max(torch.randn(N, 3), dim=1)  # torch.return_types.max
    picked = select_examples(structseq, N, ROWS)
    assert type(picked) is type(structseq)
    assert torch.equal(picked.values, structseq.values[ROWS])


def test_a_cycle_is_left_as_it_is(meta):
    looped = [meta]
    looped.append(looped)
    picked = select_examples(looped, N, ROWS)
    assert torch.equal(picked[0], meta[ROWS]) and picked[1] is looped
    assert len(per_example_tensors(looped, N)) == 1


def test_a_container_reached_twice_is_rebuilt_once(meta):
    shared = {"meta": meta}
    picked = select_examples((shared, [shared]), N, ROWS)
    assert picked[0] is picked[1][0] and torch.equal(picked[0]["meta"], meta[ROWS])
    found = per_example_tensors((shared, [shared]), N)
    back = with_per_example_tensors((shared, [shared]), N, [t[:1] for t in found])
    assert back[0] is back[1][0] and torch.equal(back[0]["meta"], meta[:1])


class CountingList(list):
    """A list that counts the walks over it (each starts a new iteration)."""

    walks = 0

    def __iter__(self):
        CountingList.walks += 1
        return super().__iter__()


def test_a_layout_walks_the_value_once_for_many_selections(meta):
    from captum_ext._utils.validation import PerExampleLayout

    vocabulary = CountingList(f"tok{i}" for i in range(50))
    layout = PerExampleLayout((meta, vocabulary), N)
    CountingList.walks = 0
    for i in range(N):
        more = layout.select(slice(i, i + 1))
        assert more[1] is vocabulary and torch.equal(more[0], meta[i : i + 1])
    assert CountingList.walks == 0


def _walks_of_gradtrust(n: int) -> int:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.h = nn.Linear(4, 5)

        def forward(self, x, meta, vocabulary):
            return self.h(torch.relu(self.c(x)).mean((2, 3))) + meta

    torch.manual_seed(0)
    net = Net().eval()
    net.c.register_forward_hook(lambda *args: None)  # the per-example loop
    vocabulary = CountingList(f"tok{i}" for i in range(50))
    x, meta = torch.randn(n, 3, 8, 8), torch.randn(n, 5)
    CountingList.walks = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gradtrust(net, x, additional_forward_args=(meta, vocabulary), method="autograd")
    return CountingList.walks


def test_per_example_loops_walk_the_extra_arguments_a_fixed_number_of_times():
    # one example at a time: the list was walked once per example (200k strings: 3.8 s
    # for 64 examples instead of 0.1 s); now the walks do not depend on N
    assert _walks_of_gradtrust(2) == _walks_of_gradtrust(6)
