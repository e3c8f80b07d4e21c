"""The shared helper that finds the per-example tensors of ``additional_forward_args``
(first dimension N) at the top level and inside tuples, lists, named tuples and dicts, for
every method that re-indexes rows (subsets, chunks, repeated examples, one at a time)."""

from collections import OrderedDict, defaultdict, namedtuple

import torch

from captum_ext._utils.validation import (
    map_per_example,
    per_example_tensors,
    repeat_per_example,
    select_examples,
    with_per_example_tensors,
)

Pair = namedtuple("Pair", "meta scale")


def test_map_per_example_reaches_every_container_and_keeps_its_type():
    meta = torch.arange(8.0).view(4, 2)
    shared = torch.ones(2)  # 2 rows, not 4: one for all, left as it is
    value = (
        {"meta": meta, "name": "x"},
        [meta, shared],
        Pair(meta, 2),
        OrderedDict(b=meta, a=shared),
        defaultdict(list, meta=meta),
        meta,
        7,
    )
    rows = torch.tensor([3, 0])
    picked = select_examples(value, 4, rows)
    assert type(picked) is tuple and type(picked[1]) is list
    assert type(picked[2]) is Pair and picked[2].scale == 2
    assert type(picked[3]) is OrderedDict and list(picked[3]) == ["b", "a"]
    assert type(picked[4]) is defaultdict and picked[4].default_factory is list
    for tensor in (picked[0]["meta"], picked[1][0], picked[2].meta, picked[3]["b"], picked[5]):
        assert torch.equal(tensor, meta[rows])
    assert picked[1][1] is shared and picked[3]["a"] is shared
    assert picked[0]["name"] == "x" and picked[6] == 7
    # per_example_tensors / with_per_example_tensors: the same tensors, put back in order
    found = per_example_tensors(value, 4)
    assert len(found) == 6 and all(t is meta for t in found)
    back = with_per_example_tensors(value, 4, [t[:1] for t in found])
    assert torch.equal(back[0]["meta"], meta[:1]) and torch.equal(back[4]["meta"], meta[:1])
    # the top-level rule: a scalar tensor and a tensor of another length stay as they are
    scalar = torch.tensor(3.0)
    assert map_per_example((scalar, shared), 4, lambda t: None) == (scalar, shared)


def test_repeat_per_example_repeats_tensors_inside_dicts():
    meta = torch.arange(3.0)[:, None]
    repeated = repeat_per_example({"m": [meta]}, 3, 2, slice(1, 4))
    assert torch.equal(repeated["m"][0], meta.repeat_interleave(2, 0)[1:4])
