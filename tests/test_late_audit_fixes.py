"""Late review of this session's changes: nested and sparse tensors in the extra arguments,
NaN-holding metadata compared as equal, the ROAD family walks its extra arguments once per
call, and guided VOICE's activation warning once per model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_ext._utils import validation
from captum_ext._utils.validation import repeat_per_example, select_examples
from captum_ext.metrics import completeness, deletion, road, score_dataset


class _Net(nn.Module):
    """Logits of the image plus metadata read from a dict (``meta``, optional ``protos``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, extra=None):
        logits = self.conv(x).mean((2, 3))
        if extra is not None:
            meta = extra["meta"]
            logits = logits + (meta.to_dense() if meta.is_sparse else meta)
        return logits


def _data(n: int = 4):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=generator)
    maps = torch.rand(n, 1, 8, 8, generator=generator)
    meta = torch.randn(n, 4, generator=generator) * 3
    return x, maps, meta


def test_a_nested_tensor_in_the_extras_is_passed_as_it_is():
    """A torch.nested tensor of another number of rows than N (a shared ragged table) is
    not per-example and goes to every chunk unchanged (reading its shape crashed inside
    torch)."""
    torch.manual_seed(0)
    model = _Net().eval()
    x, maps, meta = _data()
    ragged = torch.nested.nested_tensor([torch.ones(2), torch.ones(3), torch.ones(1)])
    with_ragged = deletion(
        model, x, maps, target=0, additional_forward_args=({"meta": meta, "protos": ragged},)
    )
    plain = deletion(model, x, maps, target=0, additional_forward_args=({"meta": meta},))
    torch.testing.assert_close(with_ragged, plain)
    assert select_examples(({"protos": ragged},), 4, torch.tensor([0]))[0]["protos"] is ragged


def test_sparse_per_example_tensors_are_selected_and_repeated_by_rows():
    dense = torch.arange(12.0).view(4, 3)
    sparse = dense.to_sparse()
    rows = torch.tensor([3, 1])
    picked = select_examples(({"m": sparse},), 4, rows)[0]["m"]
    torch.testing.assert_close(picked.to_dense(), dense[rows])
    repeated = repeat_per_example((sparse,), 4, 2, rows=slice(1, 5))[0]
    torch.testing.assert_close(repeated.to_dense(), dense.repeat_interleave(2, 0)[1:5])


def test_score_dataset_cuts_a_sparse_per_example_tensor_per_batch():
    torch.manual_seed(0)
    model = _Net().eval()
    x, _, meta = _data(6)
    loader = DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=4)
    sparse = score_dataset(
        model,
        loader,
        scores=("softmax",),
        additional_forward_args=({"meta": meta.to_sparse()},),
        progress=False,
    )
    dense = score_dataset(
        model,
        loader,
        scores=("softmax",),
        additional_forward_args=({"meta": meta},),
        progress=False,
    )
    assert torch.equal(sparse["prediction"], dense["prediction"])
    torch.testing.assert_close(sparse["softmax"], dense["softmax"])


def test_equal_metadata_holding_nans_is_the_same_argument_for_every_score():
    torch.manual_seed(0)
    model = _Net().eval()
    x, _, meta = _data(6)
    meta[2, 1] = float("nan")
    loader = DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=4)

    def model_with_nan_safe_meta(inputs, extra):
        return model(inputs, {"meta": torch.nan_to_num(extra["meta"])})

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, inputs, extra):
            return model_with_nan_safe_meta(inputs, extra)

    table = score_dataset(
        Wrapped(),
        loader,
        scores=("softmax", "energy"),
        score_kwargs={
            "softmax": {"additional_forward_args": ({"meta": meta.clone()},)},
            "energy": {"additional_forward_args": ({"meta": meta.clone()},)},
        },
        progress=False,
    )
    assert len(table) == 6
    other = meta.clone()
    other[2, 1] = 0.0  # a NaN and a number are not the same
    with pytest.raises(ValueError, match="additional_forward_args"):
        score_dataset(
            Wrapped(),
            loader,
            scores=("softmax", "energy"),
            score_kwargs={
                "softmax": {"additional_forward_args": ({"meta": meta.clone()},)},
                "energy": {"additional_forward_args": ({"meta": other},)},
            },
            progress=False,
        )


@pytest.mark.parametrize("metric", [road, completeness])
def test_the_road_family_walks_the_extra_arguments_once_per_call(metric, monkeypatch):
    from captum_ext.metrics import remove_and_debias

    torch.manual_seed(0)
    model = _Net().eval()
    x, maps, meta = _data()
    walks = []
    original = validation.PerExampleLayout

    class Counted(original):
        def __init__(self, value, n):
            walks.append(n)
            super().__init__(value, n)

    monkeypatch.setattr(remove_and_debias, "PerExampleLayout", Counted)
    metric(model, x, maps, target=0, batch_size=2, additional_forward_args=({"meta": meta},))
    assert len(walks) == 1


def test_guided_voice_warns_about_unguided_activations_once_per_model():
    from captum.attr import GuidedBackprop

    from captum_ext.attr import VOICE

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    explainer = VOICE(GuidedBackprop(model))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            explainer.attribute(x)
    unguided = [w for w in record if "guides the gradient through" in str(w.message)]
    assert len(unguided) == 1


def test_per_example_nested_and_csr_tensors_follow_the_examples():
    rows = [torch.full((k + 1,), float(k)) for k in range(4)]
    ragged = torch.nested.nested_tensor(rows)
    picked = select_examples(({"tokens": ragged},), 4, torch.tensor([3, 1]))[0]["tokens"]
    assert [t.tolist() for t in picked.unbind()] == [rows[3].tolist(), rows[1].tolist()]
    dense = torch.arange(12.0).view(4, 3)
    csr = select_examples((dense.to_sparse_csr(),), 4, torch.tensor([True, False, True, False]))
    assert csr[0].layout == torch.sparse_csr
    torch.testing.assert_close(csr[0].to_dense(), dense[[0, 2]])
    with pytest.raises(ValueError, match="additional_forward_args.*sparse_bsr"):
        select_examples((dense.to_sparse_bsr((1, 3)),), 4, torch.tensor([0]))


def test_a_dataclass_attribute_shadowed_by_a_property_is_read_as_stored():
    import dataclasses

    @dataclasses.dataclass
    class Meta:
        x: torch.Tensor

        @property
        def y(self):
            return self.__dict__["y"] * 0 + 100

    meta = Meta(torch.arange(4.0))
    meta.__dict__["y"] = torch.arange(4.0) + 1
    picked = select_examples((meta,), 4, torch.tensor([0, 1]))[0]
    torch.testing.assert_close(picked.__dict__["y"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(picked.x, torch.tensor([0.0, 1.0]))


def test_a_users_folder_beside_the_package_counts_as_the_users():
    import os

    from captum_ext._utils import caller

    package = os.path.dirname(os.path.dirname(caller.__file__))
    sibling = package + "_examples" + os.sep + "script.py"
    assert not sibling.startswith(caller._PACKAGES)
    assert os.path.join(package, "attr", "voice.py").startswith(caller._PACKAGES)


def test_per_example_gradients_take_sparse_and_nested_extras_one_example_at_a_time():
    """vmap takes no sparse or nested tensor: such per-example extras go through the
    one-example-at-a-time path, with the same scores as the dense extras."""
    from captum_ext.metrics import gradnorm

    torch.manual_seed(0)
    model = _Net().eval()
    x, _, meta = _data()
    dense = gradnorm(model, x, layer="conv", additional_forward_args=({"meta": meta},))
    sparse = gradnorm(model, x, layer="conv", additional_forward_args=({"meta": meta.to_sparse()},))
    torch.testing.assert_close(sparse, dense)


def test_a_batched_csr_tensor_is_refused_by_name():
    batched = torch.ones(2, 3, 4).to_sparse_csr()
    with pytest.raises(ValueError, match="additional_forward_args.*3-D"):
        select_examples((batched,), 2, torch.tensor([1]))


def test_equal_sparse_arguments_are_compared_without_densifying(monkeypatch):
    from captum_ext.metrics.dataset import _same_arguments

    meta = torch.zeros(6, 1000)
    meta[2, 17] = 1.0
    a, b = meta.to_sparse(), meta.clone().to_sparse()
    monkeypatch.setattr(torch.Tensor, "to_dense", lambda self: pytest.fail("densified"))
    assert _same_arguments((a,), (b,))
    c = meta.clone()
    c[3, 4] = 2.0
    assert not _same_arguments((a,), (c.to_sparse(),))
