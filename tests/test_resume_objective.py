"""A resumed fit must optimise the objective of the fit that wrote the checkpoint.

ActivationMatchingMask.fit, IntrospectiveNetwork.fit and NetworkInversion.fit refused a
resume with another optimiser, seed or architecture, but took other loss weights, layers,
baseline, feature settings, ``eps`` or feature layer without a word (and so continued an
"identical" fit on another objective). Checkpoints now record those settings; a checkpoint
written before they were (simulated by deleting them) is compared with their defaults.

Also: a mask net made for another number of image channels is named before it runs,
instead of torch's "expected input[...] to have 1 channels" from inside the net.
"""

from __future__ import annotations

import re

import pytest
import torch
from _helpers import make_tiny_cnn
from torch import nn
from torch.utils.data import TensorDataset

from captum_ext._utils.training import load_checkpoint, save_checkpoint
from captum_ext.attr import ActivationMatchingMask
from captum_ext.attr._mask_net import MaskUNet
from captum_ext.introspection import IntrospectiveNetwork
from captum_ext.inversion import TIE, ConditionedGenerator, NetworkInversion

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _without(path, out, key, inner=None):
    """A copy of the checkpoint at ``path`` without ``key`` (of ``state[inner]`` if given),
    as a checkpoint written before the entry was recorded (checksum recomputed)."""
    state = dict(load_checkpoint(path))
    if inner is None:
        del state[key]
    else:
        state[inner] = dict(state[inner])
        del state[inner][key]
    save_checkpoint(state, out)
    return out


# ------------------------------------------------------------------ ActivationMatchingMask
AM_LAYERS = ["features.3"]


def _am_data(channels: int = 3) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(10, channels, 8, 8, generator=generator, dtype=torch.float64))


def _am_fit(method, **options):
    return method.fit(_am_data(), batch_size=5, progress=False, seed=2, **options)  # 2 steps/epoch


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"weights": "sparse"}, "`weights['ce']`=40.0 (the checkpoint's: 4.0)"),
        (
            {"weights": {"act": 0.6, "ce": 4.0, "kl": 0.54, "area": 100.0, "bin": 1.2,
                         "tv": 50.0, "rob": 10.0, "kl_temperature": 2.0}},
            "`weights['kl_temperature']`=2.0 (the checkpoint's: 1.0)",
        ),  # fmt: skip
        ({"layers": ["features.0"]}, "`layers`=['features.0'] (the checkpoint's: ['features.3'])"),
        (
            {"layers": {"features.3": 2.0}},
            "`layers`={'features.3': 2.0} (the checkpoint's: ['features.3'])",
        ),
        ({"baseline": -0.5}, "`baseline`=-0.5 (the checkpoint's: 0.0)"),
        (
            {"baseline": torch.full((1, 3, 1, 1), 0.25, dtype=torch.float64)},
            "`baseline`=a tensor of shape (1, 3, 1, 1) (the checkpoint's: 0.0)",
        ),
        ({"necessity_margin": 2.0}, "`necessity_margin`=2.0 (the checkpoint's: 1.0)"),
    ],
    ids=["preset", "weights_dict", "layers", "layer_weights", "baseline", "baseline_tensor",
         "necessity_margin"],
)  # fmt: skip
def test_activation_matching_resume_refuses_another_objective(tmp_path, settings, named):
    model = make_tiny_cnn()
    path = tmp_path / "m.pt"
    _am_fit(ActivationMatchingMask(model, AM_LAYERS), epochs=1, checkpoint=path)
    options = {"layers": AM_LAYERS, **settings}
    other = ActivationMatchingMask(model, options.pop("layers"), **options)
    with pytest.raises(ValueError, match=re.escape(named)):
        _am_fit(other, epochs=2, checkpoint=path, resume=True)
    assert other.mask_net is None and other.history == []


def test_activation_matching_resume_with_the_same_objective_is_the_uninterrupted_fit(tmp_path):
    model = make_tiny_cnn()
    settings = {
        "weights": "sparse",
        "baseline": torch.full((1, 3, 1, 1), 0.25, dtype=torch.float64),
        "necessity_margin": 2.0,
    }
    layers = {"features.3": 2.0, "features.0": 0.5}
    full = _am_fit(ActivationMatchingMask(model, layers, **settings), epochs=2)
    path = tmp_path / "m.pt"
    _am_fit(ActivationMatchingMask(model, layers, **settings), epochs=1, checkpoint=path)
    objective = load_checkpoint(path)["objective"]
    assert objective["layers"] == ["features.3", "features.0"]
    assert objective["layer_weights"] == [2.0, 0.5] and objective["necessity_margin"] == 2.0
    assert objective["weights"]["ce"] == 40.0 and torch.equal(
        objective["baseline"], settings["baseline"]
    )
    # the same baseline as another tensor object (and dtype) is the same objective
    same = {**settings, "baseline": torch.full((1, 3, 1, 1), 0.25, dtype=torch.float32)}
    resumed = _am_fit(
        ActivationMatchingMask(model, layers, **same), epochs=2, checkpoint=path, resume=True
    )
    assert resumed.history == full.history
    assert _same_parameters(resumed.mask_net, full.mask_net)


def test_a_number_baseline_and_the_same_value_as_a_float32_tensor_are_one_objective(tmp_path):
    """0.1 and float32(0.1) differ in float64 but the fit casts either to the images' dtype:
    the resume refused the very baseline it trained with."""
    from captum_ext.attr._activation_matching_training import _same_baseline

    assert _same_baseline(0.1, torch.tensor(0.1, dtype=torch.float32))
    assert _same_baseline(0.1, torch.tensor(0.1, dtype=torch.float64))
    assert not _same_baseline(0.1, torch.tensor(0.1000001, dtype=torch.float64))
    model = make_tiny_cnn()
    path = tmp_path / "m.pt"
    _am_fit(ActivationMatchingMask(model, AM_LAYERS, baseline=0.1), epochs=1, checkpoint=path)
    as_tensor = torch.tensor(0.1, dtype=torch.float32)
    _am_fit(
        ActivationMatchingMask(model, AM_LAYERS, baseline=as_tensor),
        epochs=2,
        checkpoint=path,
        resume=True,
    )


def test_activation_matching_checkpoint_without_the_objective_resumes_uncompared(tmp_path):
    """A checkpoint written before the objective was recorded cannot tell which settings it
    was fitted with (the user's, not necessarily the defaults): it resumes, as before."""
    model = make_tiny_cnn()
    full = _am_fit(ActivationMatchingMask(model, AM_LAYERS), epochs=2)
    path = tmp_path / "m.pt"
    _am_fit(ActivationMatchingMask(model, AM_LAYERS), epochs=1, checkpoint=path)
    old = _without(path, tmp_path / "old.pt", "objective")
    resumed = _am_fit(
        ActivationMatchingMask(model, AM_LAYERS), epochs=2, checkpoint=old, resume=True
    )
    assert resumed.history == full.history
    assert _same_parameters(resumed.mask_net, full.mask_net)
    # fitted with another baseline than the default: still resumes (nothing to compare)
    custom = tmp_path / "custom.pt"
    _am_fit(ActivationMatchingMask(model, AM_LAYERS, baseline=-0.5), epochs=1, checkpoint=custom)
    _am_fit(
        ActivationMatchingMask(model, AM_LAYERS, baseline=-0.5),
        epochs=2,
        checkpoint=_without(custom, tmp_path / "old2.pt", "objective"),
        resume=True,
    )
    # a loss weight added since the checkpoint was written: compared with its default
    state = dict(load_checkpoint(path))
    weights = {k: v for k, v in state["objective"]["weights"].items() if k != "conf"}
    state["objective"] = {**state["objective"], "weights": weights}
    partial = save_checkpoint(state, tmp_path / "partial.pt")
    resumed = _am_fit(
        ActivationMatchingMask(model, AM_LAYERS), epochs=2, checkpoint=partial, resume=True
    )
    assert resumed.history == full.history


# ------------------------------------------------------------------ mask net channels
def _grey_mask_net() -> MaskUNet:
    torch.manual_seed(0)
    return MaskUNet(1, depth=1, width=4).double()


class _ChannelMean(nn.Module):
    """A user's mask net without a first convolution: it is not refused."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x):
        return x.mean(1, keepdim=True) * self.scale


def test_a_mask_net_for_other_channels_is_named_in_attribute():
    model = make_tiny_cnn()
    explainer = ActivationMatchingMask(model, AM_LAYERS, mask_net=_grey_mask_net())
    x = _am_data().tensors[0][:2]
    with pytest.raises(
        ValueError,
        match=r"`mask_net` takes 1-channel images .*, but `inputs` have 3 channels "
        r"\(shape \(2, 3, 8, 8\)\)",
    ):
        explainer.attribute(x, mode="amortised", progress=False)
    mask = ActivationMatchingMask(model, AM_LAYERS, mask_net=_ChannelMean()).attribute(
        x, progress=False
    )
    assert mask.shape == (2, 1, 8, 8)


def test_a_mask_net_for_other_channels_is_named_in_fit():
    model = make_tiny_cnn()
    net = _grey_mask_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    explainer = ActivationMatchingMask(model, AM_LAYERS, mask_net=net)
    with pytest.raises(
        ValueError,
        match=r"`mask_net` takes 1-channel images .*, but the images of `data` have 3 channels",
    ):
        _am_fit(explainer, epochs=1)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    fitted = _am_fit(ActivationMatchingMask(model, AM_LAYERS, mask_net=_ChannelMean()), epochs=1)
    assert len(fitted.history) == 2


# ------------------------------------------------------------------ IntrospectiveNetwork
IN_SETTINGS = {"batch_size": 50, "lr": 1e-3, "seed": 1}


def _toy_problem():
    """Stage 1 whose layers "0" and "4" both have 12 weights: every feature setting below
    keeps 36 features per example (so the head's architecture is the same)."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)
    ).eval()
    points = torch.randn(100, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        labels = model(points).argmax(1)
    return model, points, labels


def _in_fit(model, points, labels, epochs, **options):
    settings = {k: options.pop(k) for k in ("layer", "form", "k", "normalize") if k in options}
    network = IntrospectiveNetwork(model, hidden_width=8, **settings)
    return network.fit(points, labels, epochs=epochs, progress=False, **IN_SETTINGS, **options)


@pytest.mark.parametrize(
    "written, settings, named",
    [
        ({}, {"normalize": None}, "`normalize`=None (the checkpoint's: 'per_class')"),
        ({}, {"normalize": "global"}, "`normalize`='global' (the checkpoint's: 'per_class')"),
        ({}, {"form": "topk", "k": 3}, "`form`='topk' (the checkpoint's: 'per_class')"),
        ({"form": "topk", "k": 3}, {"form": "topk", "k": 2}, "`k`=2 (the checkpoint's: 3)"),
        ({"layer": "4"}, {"layer": "0"}, "`layer`='0' (the checkpoint's: '4')"),
        ({}, {"layer": "module:0"}, "`layer`='0' (the checkpoint's: None)"),
    ],
    ids=["normalize_none", "normalize_global", "form", "k", "layer", "layer_module"],
)
def test_introspection_resume_refuses_other_feature_settings(tmp_path, written, settings, named):
    model, points, labels = _toy_problem()
    _in_fit(model, points, labels, 1, checkpoint_dir=tmp_path, **written)
    if settings.get("layer") == "module:0":
        settings = {"layer": model[0]}
    with pytest.raises(ValueError, match=re.escape(named)):
        _in_fit(model, points, labels, 2, checkpoint_dir=tmp_path, resume=True, **settings)


def test_introspection_resume_with_the_same_settings_and_an_older_checkpoint(tmp_path):
    model, points, labels = _toy_problem()
    settings = {"layer": "0", "form": "topk", "k": 3, "normalize": "global"}
    full = _in_fit(model, points, labels, 2, **settings)
    _in_fit(model, points, labels, 1, checkpoint_dir=tmp_path, **settings)
    assert load_checkpoint(tmp_path / "introspection.pt")["features"] == settings
    resumed = _in_fit(model, points, labels, 2, checkpoint_dir=tmp_path, resume=True, **settings)
    assert _same_parameters(resumed.head, full.head)
    # a checkpoint written before the settings were recorded: the defaults' fit resumes
    default_full = _in_fit(model, points, labels, 2)
    old_dir = tmp_path / "old"
    _in_fit(model, points, labels, 1, checkpoint_dir=old_dir)
    path = old_dir / "introspection.pt"
    _without(path, path, "features")
    resumed = _in_fit(model, points, labels, 2, checkpoint_dir=old_dir, resume=True)
    assert _same_parameters(resumed.head, default_full.head)
    with pytest.raises(ValueError, match=re.escape("`layer`='0' (the checkpoint's: None)")):
        _in_fit(model, points, labels, 3, checkpoint_dir=old_dir, resume=True, layer="0")


# ------------------------------------------------------------------ NetworkInversion
CLASSES = 5
SHAPE = (3, 8, 8)


def _classifier() -> nn.Module:
    return make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES)


def _generator() -> ConditionedGenerator:
    torch.manual_seed(0)
    return ConditionedGenerator(CLASSES, SHAPE, latent_dim=8, width=8, preprocess=(0.5, 0.25))


def _inversion(**options) -> NetworkInversion:
    return NetworkInversion(_classifier(), _generator(), batch_size=4, seed=1, **options)


def _interrupted(path, **options) -> None:
    """A 4-step fit checkpointed every step and interrupted in its third step."""
    inversion = _inversion(**options)
    calls, record = {"n": 0}, inversion._record

    def interrupt(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        record(*args)

    inversion._record = interrupt
    with pytest.raises(KeyboardInterrupt):
        inversion.fit(4, progress=False, checkpoint=path, checkpoint_every=1)


@pytest.mark.parametrize(
    "written, settings, named",
    [
        ({}, {"weights": {"ce": 2.0}}, "`weights['ce']`=2.0 (the checkpoint's: 1.0)"),
        (
            {},
            {"weights": {"total_variation": 0.5}},
            "`weights['total_variation']`=0.5 (the checkpoint's: 0.0)",
        ),
        ({}, {"eps": 0.2}, "`eps`=0.2 (the checkpoint's: 0.1)"),
        ({}, {"feature_layer": "head.1"}, "`feature_layer`='head.1' (the checkpoint's: None)"),
        (
            {"feature_layer": "classifier"},
            {"feature_layer": "classifier", "feature_layer_input": True},
            "`feature_layer_input`=True (the checkpoint's: False)",
        ),
    ],
    ids=["weight", "added_term", "eps", "feature_layer", "feature_layer_input"],
)
def test_inversion_resume_refuses_another_objective(tmp_path, written, settings, named):
    path = tmp_path / "inversion.pt"
    _interrupted(path, **written)
    other = _inversion(**settings)
    before = {k: v.clone() for k, v in other.generator.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(named)):
        other.fit(4, progress=False, checkpoint=path, resume=True)
    assert all(torch.equal(v, other.generator.state_dict()[k]) for k, v in before.items())


def test_inversion_resume_with_the_same_objective_and_an_older_checkpoint(tmp_path):
    settings = {"weights": {"ce": 2.0, "total_variation": 0.5}, "eps": 0.2}
    full = _inversion(**settings)
    full.fit(4, progress=False)
    path = tmp_path / "inversion.pt"
    _interrupted(path, **settings)
    objective = load_checkpoint(path)["objective"]
    assert objective["eps"] == 0.2 and objective["weights"][0]["ce"] == 2.0
    resumed = _inversion(**settings)
    resumed.fit(4, progress=False, checkpoint=path, resume=True)
    assert _same_parameters(resumed.generator, full.generator)
    # written before the objective was recorded: the preset's defaults resume, others not
    default_full = _inversion()
    default_full.fit(4, progress=False)
    _interrupted(tmp_path / "default.pt")
    old = _without(tmp_path / "default.pt", tmp_path / "old.pt", "objective")
    resumed = _inversion()
    resumed.fit(4, progress=False, checkpoint=old, resume=True)
    assert _same_parameters(resumed.generator, default_full.generator)
    with pytest.raises(ValueError, match=re.escape("`eps`=0.2 (the checkpoint's: 0.1)")):
        _inversion(eps=0.2).fit(4, progress=False, checkpoint=old, resume=True)


def test_tie_checkpoint_without_the_inversion_objective_still_resumes(tmp_path, monkeypatch):
    """TIE builds its inversion with other weights than the preset's (no orthogonality) and
    checks them through its own config: its older checkpoints must not be compared with
    NetworkInversion's defaults."""
    small = {"input_shape": SHAPE, "generator_steps": 2, "generator_batch_size": 6,
             "latent_dim": 8, "generator_width": 8, "batch_size": 16, "seed": 3}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, *SHAPE, generator=gen), torch.arange(40) % CLASSES
    full = TIE(_classifier(), **small)
    full.fit(x, y, epochs=2, progress=False)
    broken = TIE(_classifier(), **small)
    original, calls = broken._invert_and_exclude, {"n": 0}

    def fail_second(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(broken, "_invert_and_exclude", fail_second)
    path = tmp_path / "part.pt"
    with pytest.raises(KeyboardInterrupt):
        broken.fit(x, y, epochs=2, progress=False, checkpoint=path)
    old = _without(path, tmp_path / "old.pt", "objective", inner="inversion")
    resumed = TIE(_classifier(), **small)
    resumed.fit(x, y, epochs=2, progress=False, checkpoint=old, resume=True)
    assert _same_parameters(resumed.generator, full.generator)
    assert _same_parameters(resumed.model, full.model)
