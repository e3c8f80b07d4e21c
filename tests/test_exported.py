"""Models saved with ``torch.export`` (``.pt2``): their layers are gone as modules, so hooks
need the wrapper of :mod:`captum_ext.exported`; every map and score must equal the eager
model's, the parameters stay shared and untouched, and the command line reads the archive."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_model_unchanged, model_snapshot

from captum_ext.attr import ContrastCAM, GradCAM
from captum_ext.exported import (
    exported_conv_layers,
    exported_layer_names,
    expose_exported_final_layer,
    expose_exported_layer,
    is_exported,
    load_exported,
)
from captum_ext.metrics import gradnorm, gradtrust


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    """(eager bundled model, its exported module read back from a .pt2 file, digits)."""
    from captum_ext.bundled import load_bundled_model
    from captum_ext.data import load_sample_digits

    model = load_bundled_model().eval()
    images, labels = load_sample_digits()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (images[:2],), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("exported") / "digits.pt2"
    torch.export.save(program, str(path))
    return model, load_exported(path), images[:8], labels[:8], path


def test_the_archive_reads_back_as_a_module_that_takes_eval(exported):
    model, module, images, _, _ = exported
    assert is_exported(module) and not is_exported(model)
    module.eval()  # the module torch.export returns refuses this
    torch.testing.assert_close(module(images), model(images), rtol=0, atol=0)
    assert exported_layer_names(module)[:3] == ["features", "features.0", "features.1"]
    assert exported_conv_layers(module) == ["features.0", "features.3", "features.6"]


def test_maps_and_trust_scores_equal_the_eager_models(exported):
    model, module, images, labels, _ = exported
    before = model_snapshot(module)
    wrapper, tap = expose_exported_layer(module, "features.7", example=images[:2])
    torch.testing.assert_close(
        GradCAM(wrapper, tap).attribute(images, target=labels),
        GradCAM(model, "features.7").attribute(images, target=labels),
        rtol=0,
        atol=1e-6,
    )
    torch.testing.assert_close(
        ContrastCAM(wrapper, tap).attribute(images, contrast="all"),
        ContrastCAM(model, "features.7").attribute(images, contrast="all"),
        rtol=0,
        atol=1e-6,
    )
    final = expose_exported_final_layer(module, example=images[:2])
    for score in (gradtrust, gradnorm):
        torch.testing.assert_close(score(final, images), score(model, images))
    # the sanity check randomises the final layer the same way (same draws, same values)
    from captum.attr import Saliency

    from captum_ext.metrics import model_randomisation

    randomised = model_randomisation(Saliency, final, images[:4], layers=["final_linear"])
    expected = model_randomisation(Saliency, model, images[:4], layers=["classifier"])
    torch.testing.assert_close(randomised.randomised, expected.randomised, rtol=0, atol=0)
    # the wrappers share the parameter objects: nothing was copied, nothing changed
    assert wrapper.final_linear.weight is module.get_parameter("classifier.weight")
    assert_model_unchanged(module, before)


def test_an_unknown_layer_lists_the_closest_paths(exported):
    _, module, _, _, _ = exported
    with pytest.raises(ValueError, match=r"^`layer`='features\.77'.*Closest layers: features\.7"):
        expose_exported_layer(module, "features.77")  # the Python argument, not `--layer`
    with pytest.raises(TypeError, match="torch.export program"):
        expose_exported_layer(torch.nn.Linear(2, 2), "weight")


def test_load_model_reads_the_archive_and_its_weights(exported, tmp_path):
    from captum_ext.data import load_model

    model, _, images, _, path = exported
    loaded = load_model(str(path))
    torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
    # a state dict of the eager model loads into the exported module's parameters
    zeroed = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
    torch.save(zeroed, tmp_path / "zeros.pt")
    assert not load_model(str(path), weights=str(tmp_path / "zeros.pt"))(images).any()
    (tmp_path / "broken.pt2").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="is not a torch.export archive"):
        load_model(str(tmp_path / "broken.pt2"))


def test_report_and_score_on_an_archive(exported, tmp_path, capsys):
    """The command line read .pt2 files as TorchScript and refused them."""
    import numpy as np

    from captum_ext.cli import main

    _, _, _, _, path = exported
    common = ["--limit", "4", "--no-progress"]
    code = main(["report", "--model", str(path), *common, "--out", str(tmp_path / "refused")])
    assert code == 2
    assert "the last convolutions are features.0, features.3, features.6" in (
        capsys.readouterr().err
    )
    sections = ["--sections", "contrastive,trust,evaluation"]
    code = main(["report", "--model", str(path), "--layer", "features.7", *common, *sections]
                + ["--out", str(tmp_path / "r")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "left out" not in captured.out + captured.err
    rows = {}
    for name, spec in (("eager", "captum_ext.bundled:load_bundled_model"), ("pt2", str(path))):
        csv = tmp_path / f"{name}.csv"
        code = main(["score", "--model", spec, *common, "--out", str(csv)]
                    + ["--scores", "gradtrust,gradnorm,softmax"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        lines = csv.read_text().strip().splitlines()
        rows[name] = np.array([[float(v) for v in line.split(",")[5:]] for line in lines[1:]])
    np.testing.assert_allclose(rows["pt2"], rows["eager"], rtol=1e-6, atol=1e-7)


def _tiny_vit() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )  # fmt: skip
    torch.nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero
    return vit.eval()


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_torchvision_models_exported_give_the_eager_maps_and_scores(name):
    """Residual stages with in-place ReLUs (the tap sits after the stage's last operator) and
    a vision transformer's token layer (folded by reshape_transform)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    if name == "vit":
        model, layer, size = _tiny_vit(), "encoder.layers.encoder_layer_1.ln_1", 32
        options = {"reshape_transform": lambda t: t[:, 1:].transpose(1, 2).unflatten(2, (4, 4))}
    else:
        model, layer, size = torchvision.models.resnet18(num_classes=6).eval(), "layer4", 64
        options = {}
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},))
    module = torch.fx.GraphModule(program.module(), program.module().graph)
    wrapper, tap = expose_exported_layer(module, layer, example=x[:2])
    torch.testing.assert_close(
        ContrastCAM(wrapper, tap).attribute(x, contrast="all", **options),
        ContrastCAM(model, layer).attribute(x, contrast="all", **options),
    )
    # (float32 rounding: the exported attention sums in another order)
    torch.testing.assert_close(gradtrust(wrapper, x), gradtrust(model, x), rtol=1e-5, atol=0)


def test_the_final_layer_can_be_named(exported, tmp_path, capsys):
    """`--final-layer` named no hookable module of an exported model; now it picks the
    linear operator, and a path that is no linear layer is refused with the choices."""
    from captum_ext.cli import main

    model, module, images, _, path = exported
    final = expose_exported_final_layer(module, images[:2], final_layer="classifier")
    torch.testing.assert_close(gradtrust(final, images), gradtrust(model, images))
    with pytest.raises(ValueError, match=r"'features\.3' is not a linear layer.*classifier"):
        expose_exported_final_layer(module, final_layer="features.3")
    csv = tmp_path / "scores.csv"
    common = ["score", "--model", str(path), "--limit", "2", "--no-progress", "--out", str(csv)]
    assert main(common + ["--final-layer", "classifier"]) == 0, capsys.readouterr().err
    assert main(common + ["--final-layer", "features.3"]) == 2
    assert "`--final-layer`='features.3' is not a linear layer" in capsys.readouterr().err


def test_methods_that_need_modules_say_the_exported_graph_has_none(exported):
    """PathwayGradient said the model had "no nn.ReLU module to score", GradTrust "pass
    `layer`", the circuit readout "pass the layers": none of these exist in the graph."""
    from captum_ext.attr import PathwayGradient
    from captum_ext.circuits import CircuitReadout

    _, module, images, labels, _ = exported
    with pytest.raises(TypeError, match="torch.export program, whose ReLUs are graph operators"):
        PathwayGradient(module).attribute(images[:2], target=labels[:2])
    for call in (lambda: gradtrust(module, images[:2]), lambda: CircuitReadout(module)):
        with pytest.raises(ValueError, match="expose_exported_final_layer"):
            call()
    wrapper = expose_exported_final_layer(module)
    with pytest.raises(ValueError, match="operators of a torch.export graph, not modules"):
        CircuitReadout(wrapper).readout(images[:2], target=labels[:2])


def test_a_program_with_a_fixed_batch_size_is_refused_naming_the_fix(exported, tmp_path, capsys):
    """Exported with the default static shapes, the program refuses other batch sizes, and
    the report died on "AssertionError: Guard failed: x.size()[0] == 2" from inside the
    graph. It is refused on loading, with the export call that fixes it."""
    from captum_ext.cli import main
    from captum_ext.exported import FixedBatchError, fixed_batch_size

    model, module, images, _, _ = exported
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(model, (images[:2],)), str(path))
    with pytest.raises(FixedBatchError, match=r"fixed batch size of 2.*dynamic_shapes"):
        load_exported(path)
    static = load_exported(path, fixed_batch=True)
    assert fixed_batch_size(static) == 2 and fixed_batch_size(module) is None
    torch.testing.assert_close(static(images[:2]), model(images[:2]))
    code = main(["report", "--model", str(path), "--layer", "features.7", "--limit", "4"]
                + ["--no-progress", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2 and "fixed batch size of 2" in capsys.readouterr().err


def test_the_masks_section_of_an_archive_matches_the_explained_layer(exported, tmp_path, capsys):
    """With --mask-layers the names of an exported model are bare parameter holders that
    never run; only the explained layer's tap can be matched, and the flag is refused."""
    from captum_ext.bundled import load_bundled_mask_explainer
    from captum_ext.cli import main

    _, _, _, _, path = exported
    mask_net = load_bundled_mask_explainer().save(tmp_path / "mask_net.pt")
    common = ["report", "--model", str(path), "--layer", "features.7", "--limit", "2"]
    common += ["--no-progress", "--sections", "masks", "--mask-net", str(mask_net)]
    assert main(common + ["--out", str(tmp_path / "ok")]) == 0, capsys.readouterr().err
    code = main(common + ["--mask-layers", "features.6", "--out", str(tmp_path / "refused")])
    assert code == 2 and "`--mask-layers` with a TorchScript or torch.export" in (
        capsys.readouterr().err
    )


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize(
    ("name", "layer"),
    [("resnet18", "layer4"), ("alexnet", "features.11"), ("mobilenet_v3_small", "features.12")],
)
def test_the_default_layer_of_an_exported_torchvision_model_is_the_eager_ones(name, layer):
    """`captum-ext report --model x.pt2` asked for `--layer` on every torchvision model: the
    archive keeps no modules, so the family was not recognised. The graph records the class
    of every module it came from, the model's own among them."""
    torchvision = pytest.importorskip("torchvision")
    from captum_ext.data import default_cam_layer
    from captum_ext.data.loading import _model_class_name
    from captum_ext.exported import exported_module_types

    with torch.device("meta"):  # the graph's records only: no weights, no initialisation
        model = torchvision.models.get_model(name).eval()
        batch = torch.export.Dim("batch")
        program = torch.export.export(
            model, (torch.empty(2, 3, 224, 224),), dynamic_shapes=({0: batch},)
        )
    module = program.module()
    assert default_cam_layer(model) == layer
    assert default_cam_layer(module) == layer
    assert _model_class_name(module) == type(model).__name__
    types = exported_module_types(module)
    assert (
        types[""] == type(model).__name__
        and types[layer] == type(model.get_submodule(layer)).__name__
    )


def test_a_stage_list_that_never_runs_as_a_whole_still_gives_the_default_layer():
    """MaxViT's stages sit in a ModuleList, which never runs, so the graph records only its
    children; the last stage is still found (a stand-in with MaxViT's class and names: the
    real one takes 10 s to export)."""
    from captum_ext.data import default_cam_layer

    class MaxVit(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.blocks = torch.nn.ModuleList(torch.nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
            self.classifier = torch.nn.Linear(4, 2)

        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = block(x).relu()
            return self.classifier(x.mean(dim=(2, 3)))

    model = MaxVit().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    module = program.module()
    assert "blocks" not in exported_layer_names(module)  # the list itself never ran
    assert default_cam_layer(model) == default_cam_layer(module) == "blocks.2"
    x = torch.randn(3, 3, 8, 8)
    wrapper, tap = expose_exported_layer(module, "blocks.2", example=x[:2])
    torch.testing.assert_close(
        GradCAM(wrapper, tap).attribute(x, target=1),
        GradCAM(model, "blocks.2").attribute(x, target=1),
    )


def test_images_of_another_size_than_the_program_was_exported_with_are_one_line(
    exported, tmp_path, capsys
):
    """A program exported with a dynamic batch still fixes the image size; images of another
    size died on "AssertionError: Guard failed: x.size()[2] == 28" from inside the graph,
    in `report` and `score`. Now one line gives the program's input shape."""
    import numpy as np
    from PIL import Image

    from captum_ext.cli import main
    from captum_ext.exported import exported_input_shape

    _, module, _, _, path = exported
    assert exported_input_shape(module) == (None, 1, 28, 28)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    common = ["--model", str(path), "--images", str(folder), "--transform", "none", "--no-progress"]
    for command in (
        ["report", "--out", str(tmp_path / "r")],
        ["score", "--out", str(tmp_path / "s.csv")],
    ):
        assert main([*command, *common]) == 2
        err = capsys.readouterr().err
        assert "failed on images of shape (2, 1, 20, 20)" in err, err
        assert "takes inputs of shape (N, 1, 28, 28) only" in err and "--transform" in err
        assert "Traceback" not in err


def test_a_module_path_of_the_program_is_refused_naming_the_wrapper(exported):
    """The program lists the original module paths, but only as holders of the parameters:
    a hook there never fires, and the error said "did not run during the forward pass ...
    pick a module that forward_func calls", which the user had done."""
    from captum_ext.attr import LayerIBA

    _, module, images, labels, _ = exported
    calls = (
        lambda: GradCAM(module, "features.7").attribute(images[:2], target=labels[:2]),
        lambda: GradCAM(module, module.get_submodule("features.6")).attribute(images[:2]),
        lambda: LayerIBA(module, "features.7").estimate(images[:4]),
        lambda: gradtrust(module, images[:2], layer="features.6"),
    )
    for call in calls:
        with pytest.raises(ValueError, match=r"expose_exported_layer\(model, 'features\.[67]'\)"):
            call()
    wrapper, tap = expose_exported_layer(module, "features.7")  # the way the message names
    assert GradCAM(wrapper, tap).attribute(images[:2], target=labels[:2]).shape == (2, 1, 7, 7)


class _DictSegmenter(torch.nn.Module):
    """A fully convolutional net returning a dict, as torchvision's segmentation models do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1)
        )

    def forward(self, x):
        return {"out": self.body(x)}


def test_a_program_returning_a_dict_is_checked_item_by_item():
    """`example=` compared outputs only as tensors, so every dict-returning model (all of
    torchvision's segmentation models) was refused as "did not reproduce the model's
    output", though the wrapper's maps equal the eager model's."""
    model = _DictSegmenter().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    program = torch.export.export(model, (x,)).module()
    wrapper, tap = expose_exported_layer(program, "body.1", x)
    target = (1, 3, 4)
    head = lambda output: output["out"]  # noqa: E731
    maps = GradCAM(wrapper, tap, output_transform=head).attribute(x, target=target)
    eager = GradCAM(model, "body.1", output_transform=head).attribute(x, target=target)
    torch.testing.assert_close(maps, eager)
