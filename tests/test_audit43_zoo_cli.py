"""The command line on torchvision's model zoo (audit 43): SqueezeNet's final layer is a
1 x 1 convolution, weights trained for another class count than torchvision's 1000, and the
evaluation section's notes on models without ReLU modules and on tiny maps."""

from __future__ import annotations

import textwrap
import warnings

import numpy as np
import pytest
import torch
from _helpers import importable_module
from PIL import Image
from torch import nn

from captum_ext._utils.layers import find_last_linear
from captum_ext.cli import build_parser, main
from captum_ext.data import LogitsOutput
from captum_ext.data.loading import load_model
from captum_ext.viz.evaluation import compute_evaluation

MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class ConvHead(nn.Module):
        # SqueezeNet's layout: a 1 x 1 convolution gives one map per class, pooled
        def __init__(self, num_classes=4):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
            self.classifier = nn.Sequential(
                nn.Dropout(0.5), nn.Conv2d(6, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
            )

        def forward(self, x):
            return torch.flatten(self.classifier(self.features(x)), 1)


    def conv_head():
        torch.manual_seed(0)
        return ConvHead()


    class Small(nn.Module):
        def __init__(self, num_classes=5):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.features(x)), 1))


    def small():
        return Small()
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    yield from importable_module("_audit43_zoo_models", MODULE, tmp_path, monkeypatch)


def _images(folder, n=2, size=16):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    return str(folder)


# --------------------------------------------------------------------------------------
# 1. a final convolution (SqueezeNet)


def test_no_linear_layer_message_names_the_final_convolution():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError) as raised:
        find_last_linear(model, lambda: model(x))
    message = str(raised.value)
    assert "no linear layer" in message
    assert "final convolution" in message
    assert "'2' (Conv2d)" in message


def test_final_layer_help_says_a_final_convolution_is_taken():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    for command in ("report", "score"):
        option = next(
            a for a in commands.choices[command]._actions if "--final-layer" in a.option_strings
        )
        assert "convolution" in option.help and "SqueezeNet" in option.help


def test_score_on_a_final_convolution_names_it_and_the_option(tmp_path, capsys, user_module):
    images = _images(tmp_path / "imgs")
    argv = ["score", "--model", f"{user_module}:conv_head", "--images", images]
    argv += ["--transform", "none", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    # the option the advice is about, not GradTrust's `layer` (the command's --layer is
    # another option), and the layer to give it
    assert err.startswith("captum-ext score: error: `--final-layer`: ConvHead has no linear")
    assert "final convolution" in err and "'classifier.1' (Conv2d)" in err
    out = tmp_path / "t.csv"
    assert main(argv + ["--out", str(out), "--final-layer", "classifier.1"]) == 0, (
        capsys.readouterr().err
    )
    assert out.is_file()


def test_report_on_a_final_convolution_leaves_trust_out_with_the_advice(
    tmp_path, capsys, user_module
):
    """The default sections: the trust section is left out with the advice (on stderr and
    the page), the others are written; asked for with --final-layer it is built."""
    images = _images(tmp_path / "imgs")
    argv = ["report", "--model", f"{user_module}:conv_head", "--images", images]
    argv += ["--transform", "none", "--no-progress", "--layer", "features"]
    out = tmp_path / "rep"
    assert main(argv + ["--out", str(out)]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "trust section left out" in err and "'classifier.1' (Conv2d)" in err
    assert "final convolution" in (out / "index.html").read_text()
    asked = argv + ["--out", str(tmp_path / "rep2"), "--sections", "trust"]
    assert main(asked + ["--final-layer", "classifier.1"]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------------------
# 2. weights for another class count


@pytest.mark.parametrize("builder", ["squeezenet1_1", "mobilenet_v3_small"])
def test_torchvision_builder_takes_the_class_count_of_the_weights(tmp_path, builder):
    import torchvision

    torch.manual_seed(0)
    trained = getattr(torchvision.models, builder)(num_classes=3).eval()
    path = tmp_path / "w.pt"
    torch.save(trained.state_dict(), path)
    model = load_model(f"torchvision.models:{builder}", path)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))


def test_report_on_a_torchvision_model_with_ten_classes(tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "w10.pt"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), weights)
    images = _images(tmp_path / "imgs", size=32)
    argv = ["report", "--model", "torchvision.models:mobilenet_v3_small", "--weights"]
    argv += [str(weights), "--images", images, "--transform", "none", "--no-progress"]
    argv += ["--sections", "contrastive", "--out", str(tmp_path / "rep")]
    assert main(argv) == 0, capsys.readouterr().err


def test_other_factory_with_another_class_count_is_told_how_to_build_it(tmp_path, user_module):
    import importlib

    models = importlib.import_module(user_module)
    path = tmp_path / "w.pt"
    torch.save(models.Small(num_classes=3).state_dict(), path)
    with pytest.raises(ValueError) as raised:
        load_model(f"{user_module}:small", path, argument_names={"spec": "--model"})
    message = str(raised.value)
    assert "is for 3 classes" in message and "Small has 5" in message
    assert "'fc.weight'" in message and "num_classes=3" in message
    assert "the architecture these weights were trained with" not in message


def test_other_mismatches_are_still_the_architecture_question(tmp_path, user_module):
    """A state dict that differs in more than the class count keeps the old message."""
    state = {
        "features.0.weight": torch.zeros(7, 3, 3, 3),
        "features.0.bias": torch.zeros(7),
        "fc.weight": torch.zeros(3, 7),
        "fc.bias": torch.zeros(3),
    }
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="the architecture these weights were trained with"):
        load_model(f"{user_module}:small", path)


# --------------------------------------------------------------------------------------
# 3. the evaluation section's notes


class GeluNet(nn.Module):
    """No nn.ReLU, 2 x 2 maps at the explained layer, a 1 x 1 convolution as classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.GELU())
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(self.features(x)).mean(dim=(2, 3))


@pytest.mark.parametrize("wrapped", [False, True])
def test_evaluation_notes_are_ones_the_user_can_act_on(wrapped):
    torch.manual_seed(0)
    model = GeluNet().eval()
    forward = LogitsOutput(model) if wrapped else model  # as the report wraps it
    images = torch.rand(3, 3, 8, 8)
    scores = compute_evaluation(forward, "features", images, max_images=2, deletion_steps=2)
    notes = " ".join(scores.notes)
    # PathwayGradient: the user's model named, no option the command line lacks
    assert "PathwayGradient: GeluNet has no nn.ReLU modules (its activations: GELU)" in notes
    assert "`layers`" not in notes and "LogitsOutput" not in notes
    # LayerIBA runs without smoothing on 2 x 2 maps, and says so
    assert "LayerIBA" not in notes and "sigma" not in notes
    assert scores.scores["deletion AUC"]["LayerIBA"] == scores.scores["deletion AUC"]["LayerIBA"]
    remarks = " ".join(scores.remarks)
    assert "2 x 2 maps" in remarks and "sigma=None" in remarks
    # the randomisation check randomises the final convolution
    assert "randomisation" not in notes
    assert "head (Conv2d)" in remarks
    assert scores.scores["randomisation"]["Saliency"] == scores.scores["randomisation"]["Saliency"]


class HardswishNet(nn.Module):
    """One nn.ReLU and two nn.Hardswish, as in MobileNetV3."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.Hardswish(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Hardswish(),
        )
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("wrapped", [False, True])
def test_evaluation_turns_the_unscored_activations_warning_into_one_remark(wrapped):
    torch.manual_seed(0)
    model = HardswishNet().eval()
    forward = LogitsOutput(model) if wrapped else model  # as the report wraps it
    images = torch.rand(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = compute_evaluation(forward, "features.3", images, max_images=2, deletion_steps=2)
    leaked = [str(w.message) for w in caught if "PathwayGradient" in str(w.message)]
    assert not leaked  # its advice (pass `layers`) is for the Python API, not the report
    assert not any(note.startswith("PathwayGradient") for note in scores.notes)
    ours = [line for line in scores.remarks if line.startswith("PathwayGradient")]
    assert ours == [
        "PathwayGradient: scored only the outputs of the model's 1 nn.ReLU module, so its "
        "other activations (2 Hardswish) are not part of the pathway"
    ]
    assert "`layers`" not in ours[0]


def test_gradnorm_takes_the_final_layer_too(tmp_path, capsys, user_module):
    """--final-layer reached GradTrust's two scores but not gradnorm, which also needs the
    layer that gives the logits (a model without a linear layer: 'Not computed')."""
    images = _images(tmp_path / "imgs")
    out = tmp_path / "g.csv"
    argv = ["score", "--model", f"{user_module}:conv_head", "--images", images]
    argv += ["--transform", "none", "--no-progress", "--scores", "gradnorm"]
    code = main(argv + ["--out", str(out), "--final-layer", "classifier.1"])
    assert code == 0, capsys.readouterr().err
    header, *rows = out.read_text().strip().splitlines()
    assert "gradnorm" in header and len(rows) == 2
