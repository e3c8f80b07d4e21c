"""One API across the attribution, inversion and circuit classes: None where the other
methods take None, a lone layer where the others take one, the old name of an argument
refused with a message that says what it is, and result objects that print compactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import LayerGradCam, Saliency

from captum_ext._utils.summaries import compact_repr, names_summary, tensor_summary
from captum_ext._utils.validation import ArgumentTypeError
from captum_ext.attr import VOICE, ActivationMatchingResult, Contrastive, GradCAM, VOICEResult
from captum_ext.circuits import CircuitReadout
from captum_ext.inversion import NetworkInversion

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "features.3"


# ------------------------------------------------------------------ VOICE: contrasts=None


def test_voice_contrasts_none_is_the_default_all(tiny_cnn, tiny_inputs):
    """``contrasts=None`` is documented as the default, ``"all"``: the same result."""
    voice = VOICE(GradCAM(tiny_cnn, LAYER))
    by_none = voice.attribute(tiny_inputs, contrasts=None)
    by_default = voice.attribute(tiny_inputs)
    torch.testing.assert_close(by_none.uncertainty, by_default.uncertainty)
    # "all": every class but P, so K - 1 = 4 contrasts for the 5-class model
    assert by_none.n_contrasts.tolist() == [4] * len(tiny_inputs)


# ------------------------------------------------------------------ NetworkInversion


@pytest.mark.parametrize(
    "random_source", [torch.Generator().manual_seed(0), 3], ids=["Generator", "int"]
)
def test_inversion_old_generator_name_with_a_random_source(tiny_cnn, random_source):
    """``generator`` is the old name of ``generator_net`` (the network); a random source
    given there is refused naming both and pointing to ``seed``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(TypeError) as raised:
            NetworkInversion(tiny_cnn, input_shape=(3, 6, 6), generator=random_source)
    message = str(raised.value)
    assert "`generator`" in message and "old name of `generator_net`" in message
    assert "seed=<int>" in message


def test_inversion_seed_of_the_wrong_type_is_an_argument_type_error(tiny_cnn):
    """A torch.Generator as ``seed`` is a type error like every other int argument's
    (check_int): ArgumentTypeError, a TypeError that is also a ValueError."""
    with pytest.raises(ArgumentTypeError, match="`seed`"):
        NetworkInversion(tiny_cnn, input_shape=(3, 6, 6), seed=torch.Generator())
    with pytest.raises(ValueError, match="`seed`"):
        NetworkInversion(tiny_cnn, input_shape=(3, 6, 6), seed=-1)


# ------------------------------------------------------------------ compact result reprs


def _voice_result(n: int, size: int) -> VOICEResult:
    maps = torch.rand(n, 1, size, size)
    per_example = torch.zeros(n)
    classes = torch.zeros(n, dtype=torch.int64)
    return VOICEResult(
        maps, maps, maps, per_example, per_example, per_example.double(), classes, classes,
        classes, classes,
    )  # fmt: skip


def test_voice_result_repr_is_one_line_of_shapes():
    """N=16 maps of 224 x 224 print as their shapes and dtypes, not their values."""
    text = repr(_voice_result(16, 224))
    assert "\n" not in text and len(text) < 1500
    assert text.startswith("VOICEResult(explanation=Tensor(shape=(16, 1, 224, 224), dtype=float32)")
    assert "log_likelihood=Tensor(shape=(16,), dtype=float64)" in text
    assert "n_contrasts=Tensor(shape=(16,), dtype=int64)" in text


def test_activation_matching_result_repr_is_one_line_of_shapes():
    """Every tensor field as ``Tensor(shape=..., dtype=...)``; the optional fields left at
    None print as None."""
    n = 16
    mask = torch.rand(n, 1, 224, 224)
    per_example = torch.rand(n)
    result = ActivationMatchingResult(
        mask, mask, torch.rand(n, 3, 224, 224), *[torch.zeros(n, dtype=torch.int64)] * 3,
        per_example > 0.5, *[per_example] * 5, fits=torch.ones(n, dtype=torch.int64),
    )  # fmt: skip
    text = repr(result)
    assert "\n" not in text and len(text) < 1500
    assert "explanation=Tensor(shape=(16, 3, 224, 224), dtype=float32)" in text
    assert "agreement=Tensor(shape=(16,), dtype=bool)" in text
    assert text.endswith("fits=Tensor(shape=(16,), dtype=int64), pruned=None, start=None)")


def test_summaries_of_small_values_and_long_sequences():
    """Small scalars and lists print as they are; long sequences by count, first two, last."""
    assert tensor_summary(3) == "3" and tensor_summary(None) == "None"
    assert tensor_summary([1, 2]) == "[1, 2]"
    assert tensor_summary((torch.zeros(2, dtype=torch.int64),)) == (
        "(Tensor(shape=(2,), dtype=int64),)"
    )
    assert tensor_summary(list(range(12))) == "[12 items: 0, 1, ..., 11]"
    assert names_summary(("a", "b", "c", "d"), "layer") == "<4 layers: 'a', 'b', ..., 'd'>"
    assert compact_repr(_voice_result(2, 4), target="P").count("target=P") == 1


# ------------------------------------------------------------------ Contrastive: target=None


@pytest.mark.parametrize("wrapped", ["Saliency", "LayerGradCam"])
def test_contrastive_accepts_target_none(tiny_cnn, tiny_inputs, wrapped):
    """target=None (the other methods' default, accepted by ContrastCAM) changes nothing;
    a class as ``target`` is still refused."""
    if wrapped == "Saliency":
        explainer = Contrastive(Saliency, tiny_cnn)
    else:
        explainer = Contrastive(LayerGradCam, tiny_cnn, tiny_cnn.features[3])
    torch.testing.assert_close(
        explainer.attribute(tiny_inputs, target=None), explainer.attribute(tiny_inputs)
    )
    with pytest.raises(TypeError, match="`contrast`, not `target`"):
        explainer.attribute(tiny_inputs, target=1)


# ------------------------------------------------------------------ CircuitReadout: one layer


def test_circuit_readout_takes_a_lone_layer(tiny_cnn):
    """A lone name or module is one stage, as PathwayGradient and ActivationMatchingMask take
    it; a non-sequence of another type is still refused naming `layers`."""
    listed = CircuitReadout(tiny_cnn, layers=[LAYER])
    assert CircuitReadout(tiny_cnn, layers=LAYER).layers == listed.layers == (LAYER,)
    assert CircuitReadout(tiny_cnn, layers=tiny_cnn.features[3]).layers == (LAYER,)
    with pytest.raises(TypeError, match="`layers`"):
        CircuitReadout(tiny_cnn, layers=3)


def test_circuit_readout_refuses_a_module_list_as_one_stage():
    from torch import nn

    from captum_ext.circuits import CircuitReadout

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3)])
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x.mean((2, 3)))

    model = Blocks()
    with pytest.raises(TypeError, match=r"`layers` is an nn.ModuleList.*list\(model.blocks\)"):
        CircuitReadout(model, layers=model.blocks)
