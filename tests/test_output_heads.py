"""Models whose output is not plain logits: a final sigmoid, softmax or log_softmax, or one logit.

Before: ``captum-ext score`` read a sigmoid's probability p as a logit, so every image was
class 1, without a word; ``energy`` of log-probabilities was 0 for every input (a ranking of
rounding noise), and the CLI gave that column for every softmax model; TIE and
NetworkInversion took a second softmax of a softmax model's output, and
ActivationMatchingMask did as well (and gave every one-logit image the confidence 1), all
silently; an explicit ``contrast`` on a one-logit model gave all-zero maps instead of the
refusal the default contrast gets. Each test compares with a computation of its own (float64
log-sum-exp, the model's own softmax or sigmoid, per-example autograd).
"""

from __future__ import annotations

import csv
import textwrap
import warnings

import pytest
import torch
from _helpers import importable_module
from torch import nn

from captum_ext.attr import ActivationMatchingMask, ContrastCAM, Contrastive, CounterfactualCAM
from captum_ext.cli import main
from captum_ext.data import LogitsOutput, log_probabilities, two_class_logits, with_logits_output
from captum_ext.inversion import TIE, NetworkInversion
from captum_ext.metrics import energy, purview

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """A small CNN with a choice of head on its k logits z."""

    def __init__(self, k: int = 5, head: str = "logits", in_channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, k)
        with torch.no_grad():
            self.fc.weight.mul_(20)
        self.head = head

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x)
        if self.head == "softmax":
            return torch.softmax(z, 1)
        if self.head == "log_softmax":
            return torch.log_softmax(z, 1)
        if self.head == "sigmoid":
            return torch.sigmoid(z)
        return z


def _images(n: int = 4, size: int = 12, channels: int = 3) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(1))


def _messages(record) -> list[str]:
    return [str(w.message) for w in record]


# ---------------------------------------------------------------------------------------------
# 1. a final sigmoid read as a logit


def test_two_class_logits_warns_of_a_sigmoid_probability():
    model = Net(k=1, head="sigmoid").eval()
    x = _images()
    with torch.no_grad():
        p = model(x)
        z = model.logits(x)
    assert bool(((p > 0) & (p < 1)).all())
    with pytest.warns(UserWarning, match=r"torch\.sigmoid.*torch\.logit"):
        read = two_class_logits(p)
    assert bool((read.argmax(1) == 1).all())  # what the warning is about: always class 1
    # the remedy it names gives the model's own probabilities back (float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = two_class_logits(torch.logit(p.double()))
        two_class_logits(z)  # the logits themselves (some negative): no warning
    torch.testing.assert_close(fixed.softmax(1)[:, 1], p[:, 0].double())
    assert not bool((z >= 0).all())


def test_with_logits_output_warns_of_a_sigmoid_probability_and_not_of_logits():
    x = _images()
    with pytest.warns(UserWarning, match=r"looks like a probability P\(class 1\)"):
        wrapped, _ = with_logits_output(Net(k=1, head="sigmoid").eval(), x)
    assert wrapped.reads == "one logit"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain, adapted = with_logits_output(Net(k=1).eval(), x)  # logits, some negative
    assert adapted and plain.reads == "one logit"


_USER_MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, k, head):
            super().__init__()
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, k)
            with torch.no_grad():
                self.fc.weight.mul_(20)
            self.head = head

        def logits(self, x):
            return self.fc(self.pool(self.features(x)).flatten(1))

        def forward(self, x):
            z = self.logits(x)
            if self.head == "softmax":
                return torch.softmax(z, 1)
            if self.head == "log_softmax":
                return torch.log_softmax(z, 1)
            if self.head == "sigmoid":
                return torch.sigmoid(z)
            return z


    def sigmoid1():
        return Net(1, "sigmoid").eval()


    def logit1():
        return Net(1, "logits").eval()


    def softmax10():
        return Net(10, "softmax").eval()


    def logsoftmax10():
        return Net(10, "log_softmax").eval()


    def logits10():
        return Net(10, "logits").eval()
    """
)


@pytest.fixture
def heads_module(tmp_path, monkeypatch):
    yield from importable_module("_output_heads_models", _USER_MODELS, tmp_path, monkeypatch)


def _score(module: str, factory: str, scores: str, out) -> int:
    argv = ["score", "--model", f"{module}:{factory}", "--limit", "6", "--no-progress"]
    return main(argv + ["--scores", scores, "--out", str(out)])


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_score_warns_of_a_sigmoid_output(tmp_path, capsys, heads_module):
    """The command prints warnings as one line on stderr."""
    out = tmp_path / "s.csv"
    assert _score(heads_module, "sigmoid1", "softmax", out) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "looks like a probability P(class 1)" in err
    # the reading it warns of: every image class 1, at confidence sigmoid(p), not p
    from captum_ext.data import load_sample_digits

    images, _ = load_sample_digits()
    model = __import__(heads_module).sigmoid1()
    with torch.no_grad():
        p = model(images[:6])[:, 0].double()
    rows = _rows(out)
    assert all(row["prediction"] == "1" for row in rows)
    got = torch.tensor([float(row["softmax"]) for row in rows], dtype=torch.float64)
    torch.testing.assert_close(got, torch.sigmoid(p), rtol=1e-5, atol=1e-6)
    assert _score(heads_module, "logit1", "softmax", tmp_path / "l.csv") == 0
    assert "looks like a probability" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 2. energy and purview need the real logits


def _same_logits(head: str) -> tuple[nn.Module, nn.Module]:
    base, other = Net(head="logits").eval(), Net(head=head).eval()
    other.load_state_dict(base.state_dict())
    return base, other


def test_energy_matches_float64_logsumexp_on_logits():
    base, _ = _same_logits("softmax")
    x = _images()
    with torch.no_grad():
        z = base.logits(x).double()
    for t in (1.0, 2.0):
        expected = t * torch.logsumexp(z / t, dim=1)
        torch.testing.assert_close(energy(base, x, temperature=t).double(), expected)


@pytest.mark.parametrize(
    "head, transform",
    [("log_softmax", None), ("softmax", log_probabilities), ("softmax", None)],
    ids=["log_softmax", "softmax+log_probabilities", "softmax"],
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_energy_refuses_outputs_that_are_not_the_logits(head, transform, temperature):
    _, model = _same_logits(head)
    x = _images()
    # what it computed before: 0 for every input at T = 1 (log-probabilities)
    with torch.no_grad():
        log_p = torch.log_softmax(model.logits(x).double(), 1)
    assert torch.logsumexp(log_p, 1).abs().max() < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probabilities warning of a softmax
        with pytest.raises(ValueError, match=r"energy needs the model's real logits"):
            energy(model, x, temperature=temperature, output_transform=transform)


@pytest.mark.parametrize(
    "head, transform",
    [("log_softmax", None), ("softmax", log_probabilities)],
    ids=["log_softmax", "softmax+log_probabilities"],
)
def test_purview_refuses_log_probabilities(head, transform):
    _, model = _same_logits(head)
    with pytest.raises(ValueError, match=r"purview needs the model's real logits"):
        purview(model, _images(), output_transform=transform)


def test_purview_on_logits_matches_per_example_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    got = purview(model, x)
    expected = []
    for row in x:
        z = model(row[None])
        loss = nn.functional.softplus(-z).mean()  # mean_c BCEWithLogits(z_c, 1)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        expected.append(-sum(g.pow(2).sum() for g in grads))  # the two groups are one layer
    torch.testing.assert_close(got, torch.stack(expected))


@pytest.mark.parametrize("factory", ["softmax10", "logsoftmax10"])
def test_score_leaves_energy_and_purview_out_for_probabilities(
    tmp_path, capsys, heads_module, factory
):
    out = tmp_path / "s.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _score(heads_module, factory, "softmax,energy,purview", out) == 0
    printed = capsys.readouterr().out
    assert "energy and purview left out" in printed
    rows = _rows(out)
    assert "energy" not in rows[0] and "purview" not in rows[0]
    # the softmax column is the model's own (its logits before the final softmax), float64
    from captum_ext.data import load_sample_digits

    images, _ = load_sample_digits()
    model = getattr(__import__(heads_module), factory)()
    with torch.no_grad():
        own = torch.softmax(model.logits(images[:6]).double(), 1).amax(1)
    got = torch.tensor([float(row["softmax"]) for row in rows], dtype=torch.float64)
    torch.testing.assert_close(got, own, rtol=1e-5, atol=1e-6)
    # nothing left to score: the error names the option
    assert _score(heads_module, factory, "energy", tmp_path / "e.csv") == 2
    assert "`--scores`" in capsys.readouterr().err


def test_score_keeps_energy_of_a_logits_model(tmp_path, capsys, heads_module):
    out = tmp_path / "s.csv"
    assert _score(heads_module, "logits10", "energy,purview", out) == 0
    assert "left out" not in capsys.readouterr().out
    from captum_ext.data import load_sample_digits

    images, _ = load_sample_digits()
    model = __import__(heads_module).logits10()
    with torch.no_grad():
        expected = torch.logsumexp(model(images[:6]).double(), 1)
    got = torch.tensor([float(row["energy"]) for row in _rows(out)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. TIE and NetworkInversion on a softmax model


def test_tie_warns_once_of_a_softmax_model_and_the_remedy_gives_the_logits_models_probabilities():
    base, softmax_model = _same_logits("softmax")
    x = _images(size=12)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        TIE(softmax_model, input_shape=(3, 12, 12))
    messages = [m for m in _messages(record) if "look like probabilities" in m]
    assert len(messages) == 1 and "LogitsOutput(model, reads='probabilities')" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = TIE(LogitsOutput(softmax_model, reads="probabilities"), input_shape=(3, 12, 12))
        plain = TIE(base, input_shape=(3, 12, 12))
    got = wrapped.probabilities(x)
    torch.testing.assert_close(got, plain.probabilities(x))
    # untrained, TIE's probabilities of the n classes are the model's own softmax, rescaled
    with torch.no_grad():
        own = torch.softmax(base.logits(x).double(), 1)
    torch.testing.assert_close((got[:, :-1] / got[:, :-1].sum(1, keepdim=True)).double(), own)


def test_network_inversion_warns_once_of_a_softmax_model():
    _, softmax_model = _same_logits("softmax")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        NetworkInversion(softmax_model, input_shape=(3, 12, 12), batch_size=8)
    messages = [m for m in _messages(record) if "look like probabilities" in m]
    assert len(messages) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NetworkInversion(Net().eval(), input_shape=(3, 12, 12), batch_size=8)


# ---------------------------------------------------------------------------------------------
# 4. ActivationMatchingMask


_AMM = {"mode": "per_image", "steps": 2, "progress": False, "restarts": 0}


def test_activation_matching_warns_of_a_softmax_model():
    base, softmax_model = _same_logits("softmax")
    x = _images(2)
    with pytest.warns(UserWarning, match=r"look like probabilities.*LogitsOutput"):
        ActivationMatchingMask(softmax_model, ["features.2"]).attribute(x, **_AMM)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = ActivationMatchingMask(base, ["features.2"]).attribute(
            x, return_details=True, **_AMM
        )
    assert not [m for m in _messages(record) if "look like probabilities" in m]
    with torch.no_grad():
        own = torch.softmax(base.logits(x).double(), 1).amax(1)
    torch.testing.assert_close(result.confidence.double(), own)


def test_activation_matching_refuses_one_logit():
    model = Net(k=1).eval()
    x = _images(2)
    method = ActivationMatchingMask(model, ["features.2"])
    with pytest.raises(ValueError, match=r"1 output.*LogitsOutput\(model, reads='one logit'\)"):
        method.attribute(x, **_AMM)
    with pytest.raises(ValueError, match=r"1 output"):
        method.fit((x,), epochs=1, batch_size=2, progress=False)
    # the remedy: the two-class logits, confidences those of the model's own sigmoid
    wrapped = ActivationMatchingMask(LogitsOutput(model, reads="one logit"), ["features.2"])
    result = wrapped.attribute(x, return_details=True, **_AMM)
    with torch.no_grad():
        p = torch.sigmoid(model(x)[:, 0].double())
    torch.testing.assert_close(result.confidence.double(), torch.maximum(p, 1 - p))


# ---------------------------------------------------------------------------------------------
# 5. contrasts on one output


@pytest.mark.parametrize("contrast", [0, [0, 0], torch.tensor([0, 0]), "all", -1])
def test_contrast_cam_refuses_any_contrast_on_one_logit(contrast):
    model = Net(k=1).eval()
    with pytest.raises(ValueError, match=r"`contrast`.*1 output.*two_class_logits"):
        ContrastCAM(model, "features.2").attribute(_images(2), contrast=contrast)


@pytest.mark.parametrize("contrast", ["all", -1])
def test_contrastive_refuses_contrasts_it_reads_from_the_output_on_one_logit(contrast):
    from captum.attr import Saliency

    with pytest.raises(ValueError, match=r"`contrast`.*1 output.*two_class_logits"):
        Contrastive(Saliency, Net(k=1).eval()).attribute(_images(2), contrast=contrast)


def test_contrast_cam_with_two_class_logits_matches_float64_cross_entropy_gradients():
    model = Net(k=1).eval()
    x = _images(2)
    cam = ContrastCAM(model, "features.3", output_transform=two_class_logits)
    got = cam.attribute(x, contrast=0, relu_attributions=False)
    # independent: d CE([-z/2, z/2], 0) / dA = d softplus(z) / dA, Grad-CAM weighting
    double = Net(k=1).double().eval()
    acts = double.features(x.double())
    acts.requires_grad_()
    z = double.fc(double.pool(acts).flatten(1))[:, 0]
    (grad,) = torch.autograd.grad(nn.functional.softplus(z).sum(), acts)
    expected = (grad.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True)
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-4, atol=1e-6)


def test_contrast_cam_refuses_a_one_channel_segmentation_output():
    class Segmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    with pytest.raises(ValueError, match=r"1 output.*torch\.cat\(\[-z / 2, z / 2\], dim=1\)"):
        ContrastCAM(Segmenter(), "body").attribute(_images(2), contrast=(0, 1, 1))


def test_counterfactual_cam_on_one_logit_is_not_refused():
    """CounterfactualCAM explains the logit itself (negated Grad-CAM weights): legitimate on
    one output, and the same as the negated weights of d z / dA in float64."""
    model = Net(k=1).eval()
    x = _images(2)
    got = CounterfactualCAM(model, "features.3").attribute(x, relu_attributions=False)
    double = Net(k=1).double().eval()
    acts = double.features(x.double())
    acts.requires_grad_()
    z = double.fc(double.pool(acts).flatten(1))[:, 0]
    (grad,) = torch.autograd.grad(z.sum(), acts)
    expected = (-grad.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True)
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-4, atol=1e-6)


def test_contrastive_refuses_an_explicit_class_on_one_logit():
    from captum.attr import Saliency

    with pytest.raises(ValueError, match=r"`contrast`.*1 output.*two_class_logits"):
        Contrastive(Saliency, Net(k=1).eval()).attribute(_images(2), contrast=0)


def test_energy_of_one_row_of_real_logits_near_a_log_sum_exp_of_zero_is_scored():
    """Real logits whose log-sum-exp falls near 0 by chance (about 4 in 10,000 single rows
    of N(-6, 3) logits over 10 classes) were refused as log-probabilities, the last batch
    of one of a dataset included; one row is now scored, with a warning, and two or more
    such rows are still refused."""
    z = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    z = z - torch.logsumexp(z, dim=1, keepdim=True) + 5e-5  # log-sum-exp 5e-5
    model = torch.nn.Sequential(torch.nn.Flatten(), _Constant(z))
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="One example only"):
        score = energy(model, x)
    torch.testing.assert_close(score, torch.logsumexp(z, dim=1))
    with pytest.raises(ValueError, match="log-probabilities"):
        energy(model, x.expand(2, 1, 2, 2))


class _Constant(torch.nn.Module):
    """Returns the same logits row for every example."""

    def __init__(self, row: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("row", row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.row.expand(x.shape[0], -1) + 0 * x.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_energy_refuses_half_precision_log_probabilities_cast_to_float32(dtype):
    """A half-precision log_softmax model read through ``output_transform=lambda o:
    o.float()``: its rows' log-sum-exp is off 0 by its own rounding (up to 5e-4 in float16,
    4e-3 in bfloat16), beyond float32's tolerance, and energy scored them as real logits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.LogSoftmax(dim=1)).to(dtype)
    x = torch.randn(40, 3, 2, 2).to(dtype) * 4
    with pytest.raises(ValueError, match="log-probabilities"):
        energy(model, x, output_transform=lambda o: o.float())


def test_whole_number_float32_logits_keep_float32s_tolerance():
    """Float32 logits that half precision holds exactly (whole numbers) were judged with
    half precision's tolerance (2e-2) and refused as log-probabilities at a log-sum-exp of
    0.0074; whole numbers keep their own dtype's 1e-4."""
    z = torch.tensor([[0.0, -6.0, -6.0, -6.0]]).expand(8, 4).contiguous()
    model = nn.Sequential(nn.Flatten(), _Constant(z[:1]))
    x = torch.zeros(8, 1, 2, 2)
    torch.testing.assert_close(energy(model, x), torch.logsumexp(z, dim=1))
