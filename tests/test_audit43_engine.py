"""Engine audit: several-class maps inside autograd's anomaly mode, per-example parameter
gradients inside the caller's ``torch.autocast`` on batch-norm models, PathwayGradient's
automatic pass size on models that normalise with batch statistics (and its warning where
the output does not depend on the neurons), and CircuitReadouts pickled before the stages
they were connected for were recorded."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from torch import nn

import captum_ext.attr.pathway_gradient as pathway_module
from captum_ext.attr import ContrastCAM, GradCAM, LayerGradCamPlusPlus, PathwayGradient
from captum_ext.circuits import CircuitReadout
from captum_ext.metrics import gradnorm, gradtrust, purview

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_bn_net(track_running_stats: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6, track_running_stats=track_running_stats),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


def _inputs(n: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ 1. anomaly mode


@pytest.mark.parametrize(
    "explain",
    [
        lambda m, x: ContrastCAM(m, "3").attribute(x, contrast="all"),
        lambda m, x: GradCAM(m, "3").attribute(x, target=torch.tensor([[1, 2]] * len(x))),
        lambda m, x: LayerGradCamPlusPlus(m, "3").attribute(
            x, target=torch.tensor([[0, 4]] * len(x))
        ),
    ],
    ids=["contrast_all", "gradcam_2d", "gradcam_pp_2d"],
)
@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_several_class_maps_inside_detect_anomaly(explain):
    model = _conv_bn_net().eval()
    x = _inputs()
    expected = explain(model, x)
    with torch.autograd.detect_anomaly():
        inside = explain(model, x)
    torch.testing.assert_close(inside, expected)
    torch.autograd.set_detect_anomaly(True)
    try:
        after_set = explain(model, x)
    finally:
        torch.autograd.set_detect_anomaly(False)
    torch.testing.assert_close(after_set, expected)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_detect_anomaly_chunks_of_classes_keep_their_order():
    model = _conv_bn_net().eval()
    x = _inputs()
    expected = ContrastCAM(model, "3").attribute(x, contrast="all", max_batch=2)
    with torch.autograd.detect_anomaly():
        inside = ContrastCAM(model, "3").attribute(x, contrast="all", max_batch=2)
    torch.testing.assert_close(inside, expected)


# ------------------------------------------------------------------ 2. autocast


@pytest.mark.parametrize(
    "score",
    [
        lambda m, x: purview(m, x),
        lambda m, x: gradtrust(m, x, method="autograd", log=True),
        lambda m, x: gradtrust(m, x, layer="3", log=True),
        lambda m, x: gradnorm(m, x, layer="3"),
    ],
    ids=["purview", "gradtrust_autograd", "gradtrust_conv", "gradnorm_conv"],
)
def test_per_example_gradients_inside_autocast_on_a_batch_norm_model(score):
    model = _conv_bn_net().eval()
    x = _inputs()
    expected = score(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = score(model, x)
    # computed without autocast, in the model's float32: the same numbers
    assert inside.dtype == expected.dtype
    torch.testing.assert_close(inside, expected)


def test_autocast_autograd_path_agrees_with_the_closed_form():
    model = _conv_bn_net().eval()
    x = _inputs(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        closed = gradtrust(model, x, log=True)
        autograd = gradtrust(model, x, method="autograd", log=True)
    # the closed form reads the bfloat16 logits and features: equal to bfloat16's precision
    torch.testing.assert_close(autograd, closed, atol=0.05, rtol=0.02)


def test_autocast_on_a_train_mode_batch_norm_model():
    model = _conv_bn_net().train()
    x = _inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = gradtrust(model, x, layer="3", log=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = gradtrust(model, x, layer="3", log=True)
    torch.testing.assert_close(inside, expected)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training


# ------------------------------------------------------------------ 3. PathwayGradient


def _pass_sizes(model: nn.Module) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = model[0].register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    return sizes, handle


def _integrated_passes(model, x, n_steps, target=0):
    sizes, handle = _pass_sizes(model)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = PathwayGradient(model).attribute(
                x, target=target, score="integrated", n_steps=n_steps
            )
    finally:
        handle.remove()
    pass_warnings = [w for w in caught if "statistics of its batch" in str(w.message)]
    # scoring pass, integrated passes, pruned pass
    return out, sizes[1:-1], pass_warnings


@pytest.mark.parametrize("track_running_stats", [True, False], ids=["train", "eval_no_stats"])
def test_integrated_runs_every_row_together_on_batch_statistics_models_when_they_fit(
    track_running_stats,
):
    model = _conv_bn_net(track_running_stats)
    model.train(track_running_stats)  # train mode, or eval without running statistics
    x = _inputs(3)
    n_steps = 7
    one_pass = PathwayGradient(model).attribute(
        x, target=0, score="integrated", n_steps=n_steps, internal_batch_size=3 * n_steps
    )
    automatic, passes, pass_warnings = _integrated_passes(model, x, n_steps)
    torch.testing.assert_close(automatic, one_pass)
    assert passes == [3 * n_steps] * 2  # all rows together, for each of the two ReLU sites
    assert not pass_warnings


@pytest.mark.parametrize("track_running_stats", [True, False], ids=["train", "eval_no_stats"])
@pytest.mark.parametrize("chunk_bytes", [1, 4096], ids=["under_a_row", "a_row_or_two"])
def test_integrated_keeps_the_budget_on_batch_statistics_models_and_warns(
    monkeypatch, track_running_stats, chunk_bytes
):
    model = _conv_bn_net(track_running_stats)
    model.train(track_running_stats)
    x = _inputs(3)
    n_steps = 7  # 21 rows
    monkeypatch.setattr(pathway_module, "_CHUNK_BYTES", chunk_bytes)
    _, passes, pass_warnings = _integrated_passes(model, x, n_steps)
    assert sum(passes) == 21 * 2
    assert len(passes) > 2  # not all rows in one pass
    site = passes[: len(passes) // 2]
    assert min(site) >= 2  # never a row alone (a training batch norm fails on it)
    assert max(site) - min(site) <= 1
    assert len(pass_warnings) == 1
    message = str(pass_warnings[0].message)
    assert "model.eval()" in message and "internal_batch_size" in message
    assert pass_warnings[0].filename == __file__


@pytest.mark.parametrize("chunk_bytes", [1, "one_row"])
def test_integrated_automatic_passes_respect_the_budget_on_eval_models(monkeypatch, chunk_bytes):
    model = _conv_bn_net().eval()
    x = _inputs(3)
    n_steps = 3  # 9 rows
    expected = PathwayGradient(model).attribute(x, target=1, score="integrated", n_steps=n_steps)
    if chunk_bytes == "one_row":  # a budget of one row and a half
        per_row = 2 * sum(o.numel() * o.element_size() for o in _module_outputs(model, x[:1]))
        chunk_bytes = int(1.5 * per_row)
    monkeypatch.setattr(pathway_module, "_CHUNK_BYTES", chunk_bytes)
    automatic, passes, pass_warnings = _integrated_passes(model, x, n_steps, target=1)
    torch.testing.assert_close(automatic, expected)
    assert passes == [1] * 9 * 2  # 9 rows for each of the two ReLU sites, one at a time
    assert not pass_warnings


def _module_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda m, a, o: outputs.append(o))
        for m in model.modules()
        if not list(m.children())  # the leaf modules, as the pass-size estimate counts them
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


def test_integrated_explicit_internal_batch_size_is_honoured():
    model = _conv_bn_net().eval()
    x = _inputs(3)
    sizes, handle = _pass_sizes(model)
    try:
        PathwayGradient(model).attribute(
            x, target=0, score="integrated", n_steps=3, internal_batch_size=4
        )
    finally:
        handle.remove()
    assert sizes[1:-1] == [4, 4, 1] * 2


class _Probe(nn.Module):
    """A linear probe whose backbone runs under torch.no_grad() in forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.backbone(x)
        return self.head(h)


@pytest.mark.parametrize("score", ["taylor", "integrated"])
def test_pathway_gradient_warns_when_no_neuron_has_a_gradient(score):
    model = _Probe().eval()
    with pytest.warns(UserWarning, match="exactly zero for every example"):
        attributions = PathwayGradient(model).attribute(_inputs(2), target=0, score=score)
    assert not attributions.any()


def test_pathway_gradient_does_not_warn_at_high_sparsity():
    model = _conv_bn_net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PathwayGradient(model).attribute(_inputs(2), target=0, sparsity=0.999)


# ------------------------------------------------------------------ 4. CircuitReadout pickles


def test_old_pickled_readout_refuses_changed_layers(bundled_model, sample_digits):
    readout = CircuitReadout(bundled_model)
    del readout.__dict__["_connected"]  # as pickled before it was recorded
    loaded = pickle.loads(pickle.dumps(readout))
    loaded.layers = readout.layers[1:]
    loaded.top_k = 3
    with pytest.raises(ValueError, match="`layers` was changed after construction"):
        loaded.readout(sample_digits[0][:2])


def test_old_pickled_readout_still_reads_out(bundled_model, sample_digits):
    readout = CircuitReadout(bundled_model)
    x = sample_digits[0][:2]
    expected = readout.readout(x)
    del readout.__dict__["_connected"]
    loaded = pickle.loads(pickle.dumps(readout))
    graphs = loaded.readout(x)
    assert [sorted(g.nodes) for g in graphs] == [sorted(g.nodes) for g in expected]


class _DetachedBranch(nn.Module):
    """A ReLU branch whose output is detached, beside a direct linear path: no scored neuron
    has a gradient, but the input does (around the branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.direct = nn.Linear(6, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.branch(x).detach()) + self.direct(x)


def test_pathway_gradient_warning_does_not_call_a_map_through_other_paths_zero():
    model = _DetachedBranch().eval()
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="around the scored layers") as caught:
        attributions = PathwayGradient(model).attribute(x, target=0)
    assert attributions.abs().amax() > 0
    assert "every map is zero" not in str(caught[0].message)
