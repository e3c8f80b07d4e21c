"""GradTrust beyond the last layer: the gradients at an inner weight layer of the bundled
digit model and over every parameter (``layer="all"``), each against a per-example float64
autograd loop written here (``torch.autograd.grad`` of the cross-entropy, one example and one
class at a time)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_ext.metrics import GradTrust, gradtrust


def loop_log_gradtrust(model: nn.Module, x: torch.Tensor, k: int, layer: str) -> torch.Tensor:
    """log(mean_Q Var(grad CE(z, Q)) / Var(grad CE(z, P))) for each example, by autograd in
    float64: the variance over every entry of the weight of ``layer``, or of all parameters
    concatenated into one vector for ``layer="all"``."""
    model = copy.deepcopy(model).double()
    if layer == "all":
        params = list(model.parameters())
    else:
        params = [dict(model.named_modules())[layer].weight]
    for p in params:
        p.requires_grad_(True)
    out = []
    for i in range(len(x)):
        xi = x[i : i + 1].double()
        with torch.no_grad():
            classes = model(xi).topk(k + 1, dim=1).indices[0].tolist()
        variances = []
        for c in classes:
            loss = F.cross_entropy(model(xi), torch.tensor([c]))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat(
                [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]
            )
            variances.append(flat.var())
        variances = torch.stack(variances)
        out.append(torch.log(variances[1:].mean() / variances[0]))
    return torch.stack(out)


@pytest.fixture(scope="module")
def digits64(bundled_digits):
    images, _ = bundled_digits
    return images[:6].double()


@pytest.fixture(scope="module")
def model64(_bundled_model_once):
    return copy.deepcopy(_bundled_model_once).double().eval()


@pytest.mark.parametrize("layer", ["features.0", "features.3", "features.6", "all"])
def test_bundled_model_layers_equal_float64_autograd_loop(model64, digits64, layer):
    before = model_snapshot(model64)
    scores = gradtrust(model64, digits64, layer=layer, log=True)
    assert_model_unchanged(model64, before)
    expected = loop_log_gradtrust(model64, digits64, 5, layer)
    assert scores.shape == (len(digits64),) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)
    # the raw score is exp of the log score
    raw = gradtrust(model64, digits64, layer=layer)
    torch.testing.assert_close(raw, expected.exp(), rtol=1e-9, atol=0)


def test_all_parameters_on_the_float32_bundled_model_equal_float64(bundled_model, sample_digits):
    images = sample_digits[0][:8]
    before = model_snapshot(bundled_model)
    scores32 = gradtrust(bundled_model, images, layer="all", log=True)
    assert_model_unchanged(bundled_model, before)
    scores64 = gradtrust(
        copy.deepcopy(bundled_model).double(), images.double(), layer="all", log=True
    )
    assert scores32.dtype == torch.float32
    torch.testing.assert_close(scores32.double(), scores64, rtol=1e-4, atol=1e-4)
    # not a function of the softmax vector alone: differs from the last-layer score
    last = gradtrust(bundled_model, images, log=True)
    assert not torch.allclose(scores32, last, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("k", [1, 3])
def test_all_parameters_tiny_cnn_with_batchnorm_and_residual(k):
    model = make_tiny_cnn(seed=2)  # float64, eval mode, batch norm with real statistics
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = loop_log_gradtrust(model, x, k, "all")
    torch.testing.assert_close(
        gradtrust(model, x, layer="all", k=k, log=True), expected, rtol=1e-9, atol=1e-12
    )
    # the GradTrust class passes layer="all" through
    torch.testing.assert_close(
        GradTrust(model, layer="all", k=k, log=True).score(x), expected, rtol=1e-9, atol=1e-12
    )


@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(1, 5),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_all_parameters_batched_equals_one_by_one(batch, k, seed):
    model = make_tiny_cnn(seed=1)
    x = torch.randn(
        batch, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    batched = gradtrust(model, x, layer="all", k=k, log=True)
    single = torch.cat(
        [gradtrust(model, x[i : i + 1], layer="all", k=k, log=True) for i in range(batch)]
    )
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-12)
    order = torch.arange(batch).flip(0)
    torch.testing.assert_close(
        gradtrust(model, x[order], layer="all", k=k, log=True),
        batched[order],
        rtol=1e-10,
        atol=1e-12,
    )


def test_frozen_parameters_count_and_model_left_exactly_as_found():
    model = make_tiny_cnn(seed=0)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = gradtrust(model, x, layer="all", log=True)
    # an unusual state that must survive: frozen layer, stale grads, mixed modes, a hook
    model.features[0].weight.requires_grad_(False)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    model.features[4].train()
    handle = model.head.register_forward_hook(lambda m, i, o: None)
    try:
        before = model_snapshot(model)
        scores = gradtrust(model, x, layer="all", log=True)
        assert_model_unchanged(model, before)
    finally:
        handle.remove()
    # the frozen weight still counts (the score describes the model function); dropout in
    # train mode is not part of the eval-mode expectation, so compare with eval-mode dropout
    model.features[4].eval()
    torch.testing.assert_close(
        gradtrust(model, x, layer="all", log=True), expected, rtol=1e-12, atol=0
    )
    assert torch.isfinite(scores).all()


def test_train_mode_batchnorm_statistics_untouched():
    model = make_tiny_cnn(seed=0).train()
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = model_snapshot(model)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        scores = gradtrust(model, x, layer="all", log=True)
    assert_model_unchanged(model, before)
    assert scores.shape == (3,)


def test_layer_all_bad_arguments():
    model = make_tiny_cnn(seed=0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="`layer`='all' is only defined for form='topk'"):
        gradtrust(model, x, layer="all", form="reference")
    with pytest.raises(ValueError, match="`layer`='all' has no closed form"):
        gradtrust(model, x, layer="all", method="closed_form")
    with pytest.raises(ValueError, match="`layer`='all' is only defined for form='topk'"):
        GradTrust(model, layer="all", form="reference")  # checked once, at construction
    with pytest.raises(TypeError, match="`layer`='all'.*not an nn.Module"):
        gradtrust(lambda t: model(t), x, layer="all")
    with pytest.raises(ValueError, match="`k`=5 is out of range"):
        gradtrust(model, x, layer="all", k=5)

    class NoParameters(nn.Module):
        def forward(self, t):
            return t.flatten(1)[:, :4]

    with pytest.raises(ValueError, match="`layer`='all'.*no parameters"):
        gradtrust(NoParameters(), x, layer="all")
    with pytest.raises(ValueError, match="`layer`='al'"):
        gradtrust(model, x, layer="al")  # a misspelling is a module name that does not exist


def test_all_parameters_vanishing_gradients_are_nan_like_autograd():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 3, bias=False))
    model = model.double().eval()
    x = torch.zeros(2, 3, dtype=torch.float64)  # every gradient is zero: 0 / 0
    with pytest.warns(RuntimeWarning, match="every score is NaN"):
        scores = gradtrust(model, x, layer="all", log=True, k=1)
    assert torch.isnan(scores).all()
    assert torch.isnan(loop_log_gradtrust(model, x, 1, "all")).all()


@pytest.mark.cuda
@pytest.mark.parametrize("layer", ["features.3.conv", "all"])
def test_inner_layer_and_all_parameters_on_cuda_equal_cpu(layer):
    model = make_tiny_cnn(seed=0)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cpu = gradtrust(model, x, layer=layer, log=True)
    gpu_model = copy.deepcopy(model).cuda()
    before = model_snapshot(gpu_model)
    gpu = gradtrust(gpu_model, x.cuda(), layer=layer, log=True)
    assert_model_unchanged(gpu_model, before)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-7, atol=1e-10)


def test_attention_under_per_example_gradients_leaves_no_torch_performance_note():
    """torch warns that its fused attention kernels have no batching rule under vmap; the
    note is about speed only, and it filled the report's log for every vision transformer."""
    import warnings

    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(16, 8, 1, 2, 8, 16, num_classes=3)
    with torch.no_grad():  # torchvision's fresh ViT head is all zeros
        vit.heads.head.weight.normal_(0, 1)
    vit.eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = gradtrust(vit, x, layer="encoder.layers.encoder_layer_0.mlp.0")
    assert scores.shape == (3,) and bool(torch.isfinite(scores).all())
    assert not [w for w in caught if "performance drop" in str(w.message)]


def test_a_parametrized_layer_scores_as_the_same_model_with_its_weight_folded(sample_digits):
    """weight_norm / spectral_norm layers: torch.func stopped with "attempted to call in-place
    operation (aten::set_...) that would mutate a captured Tensor" (later a clear refusal);
    the layer's computed weight is now differentiated on the plain-autograd path (under
    ``parametrize.cached()``), so the scores are those of a model whose layer holds that
    weight as a plain parameter. Other layers and all parameters still work."""
    import copy

    from torch.nn.utils import parametrizations

    from captum_ext.bundled import load_bundled_model
    from captum_ext.metrics import gradtrust

    folded = copy.deepcopy(load_bundled_model())
    model = copy.deepcopy(folded)
    parametrizations.weight_norm(model.features[6])
    with torch.no_grad():  # the folded model holds the weight the parametrization computes
        folded.features[6].weight.copy_(model.features[6].weight)
    x = sample_digits[0][:4]
    torch.testing.assert_close(
        gradtrust(model, x, layer="features.6"), gradtrust(folded, x, layer="features.6")
    )
    assert torch.isfinite(gradtrust(model, x, layer="features.3")).all()
    assert torch.isfinite(gradtrust(model, x, layer="all")).all()


def test_train_mode_batch_norm_scores_each_example_with_its_own_forward_pass():
    """On the autograd path a train-mode model runs each example alone (its batch norm uses
    that example's statistics), but the cotangents p - e_Q and the contrast classes came
    from the whole batch's forward pass: two different forward passes mixed (scores off by
    up to 0.4). Now they come from each example's own pass, so the scores equal the float64
    loop that runs every example alone."""
    model = make_tiny_cnn(seed=1).train()
    model.features[4].eval()  # the dropouts off: only the batch norm depends on the batch
    model.head[3].eval()
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    before = model_snapshot(model)
    for layer in ("features.0", "all"):
        got = gradtrust(model, x, layer=layer, k=3, log=True)
        torch.testing.assert_close(
            got, loop_log_gradtrust(model, x, 3, layer), rtol=1e-9, atol=1e-9
        )
    assert_model_unchanged(model, before)
    assert model.training and not model.features[4].training


def test_a_train_mode_batchnorm1d_says_to_call_eval():
    """BatchNorm1d in train mode cannot normalise one example, and the per-example path ended
    in torch's "Expected more than 1 value per channel when training"."""
    from captum_ext.metrics import gradnorm, purview

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).train()
    x = torch.randn(10, 6)
    assert gradtrust(model, x).shape == (10,)  # the closed form runs the batch as it is
    for call in (
        lambda: gradtrust(model, x, layer="0"),
        lambda: gradtrust(model, x, layer="all"),
        lambda: gradnorm(model, x, layer="0"),
        lambda: purview(model, x),
    ):
        with pytest.raises(ValueError, match=r"cannot normalise a single example.*model\.eval\(\)"):
            call()
    model.eval()
    assert torch.isfinite(gradtrust(model, x, layer="0")).all()


@pytest.mark.parametrize("layer", [None, "all"])
def test_log_score_of_many_near_uniform_classes_keeps_its_float64_order(layer):
    """log(1 - p_P) came from the float32 log-probabilities' log-sum-exp, whose rounding (1e-6
    at 21,843 classes) is as large as the log-score of a near-uniform prediction: at 4,000
    classes float32 scores were 0.6 % off a float64 copy of the model and out of order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4000))
    with torch.no_grad():
        model[2].weight.mul_(0.02)
    double = copy.deepcopy(model).double()
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    single_scores = gradtrust(model, x, log=True, layer=layer)
    double_scores = gradtrust(double, x.double(), log=True, layer=layer)
    torch.testing.assert_close(single_scores.double(), double_scores, rtol=2e-5, atol=0)
    assert single_scores.argsort().tolist() == double_scores.argsort().tolist()
