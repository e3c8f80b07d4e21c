"""captum_ext.data.loading: user models (TorchScript, module:factory, state dicts), image
folders, display, default layers and the TorchScript layer wrapper."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captum_ext.attr import ContrastCAM, CounterfactualCAM
from captum_ext.data import normalize_digits
from captum_ext.data.loading import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TorchScriptLayerModel,
    _imagenet_pil,
    default_cam_layer,
    denormalize_for_display,
    expose_layer,
    load_image_folder,
    load_model,
    load_state_dict_file,
)

TESTS = Path(__file__).parent


@pytest.fixture
def factories(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    import _factories

    return _factories


def save_torchscript(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), str(path))
    return path


def assert_same_state(model: nn.Module, state_dict: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(state_dict)
    for name, tensor in state_dict.items():
        assert torch.equal(got[name], tensor), name


# ---------------------------------------------------------------------------------------
# models


def test_torchscript_file_is_loaded_in_eval_mode(tmp_path, factories):
    eager = factories.small_cnn().train()
    path = save_torchscript(eager, tmp_path / "model.ts")
    model = load_model(str(path))
    assert isinstance(model, torch.jit.ScriptModule)
    assert not model.training
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), eager.eval()(x))


def test_torchscript_file_with_weights(tmp_path, factories):
    path = save_torchscript(factories.small_cnn(), tmp_path / "model.pt")
    torch.manual_seed(5)
    trained = factories.SmallCNN()
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    model = load_model(path, weights=tmp_path / "weights.pt")
    assert_same_state(model, trained.state_dict())


def test_factory_spec_with_state_dict(tmp_path, factories):
    torch.manual_seed(7)
    trained = factories.SmallCNN()
    weights = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), weights)
    model = load_model("_factories:small_cnn", weights=str(weights))
    assert isinstance(model, factories.SmallCNN)
    assert not model.training
    assert_same_state(model, trained.state_dict())
    # without weights the factory's own initialisation is kept
    fresh = load_model("_factories:small_cnn")
    assert not torch.equal(fresh.classifier.weight, trained.classifier.weight)


def test_torchvision_resnet18_with_local_state_dict(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    model = load_model("torchvision.models:resnet18", weights=weights)
    assert type(model).__name__ == "ResNet"
    assert_same_state(model, reference.state_dict())
    assert not model.training


def test_wrapped_and_data_parallel_state_dicts(tmp_path, factories):
    torch.manual_seed(11)
    trained = factories.SmallCNN()
    nested = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, nested)
    assert_same_state(load_model("_factories:small_cnn", weights=nested), trained.state_dict())
    prefixed = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, prefixed)
    assert_same_state(load_model("_factories:small_cnn", weights=prefixed), trained.state_dict())
    # saved from torch.compile(model) ("_orig_mod."), also inside DataParallel and around it
    for prefix in ("_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        compiled = tmp_path / "compiled.pt"
        torch.save({f"{prefix}{k}": v for k, v in trained.state_dict().items()}, compiled)
        loaded = load_model("_factories:small_cnn", weights=compiled)
        assert_same_state(loaded, trained.state_dict())
    # a factory that returns torch.compile(model) takes the eager model's weights
    loaded = load_model("_factories:compiled_small_cnn", weights=nested)
    assert isinstance(loaded, torch._dynamo.eval_frame.OptimizedModule)
    assert_same_state(loaded._orig_mod, trained.state_dict())


def test_weights_are_read_with_weights_only(tmp_path, factories):
    pickled = tmp_path / "whole_model.pt"
    torch.save(factories.small_cnn(), pickled)  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="`weights`.*weights_only=True"):
        load_model("_factories:small_cnn", weights=pickled)


def test_safetensors_weights(tmp_path, factories):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(2)
    trained = factories.SmallCNN()
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file(trained.state_dict(), str(path))
    assert_same_state(load_model("_factories:small_cnn", weights=path), trained.state_dict())


@pytest.mark.parametrize(
    ("spec", "error", "pattern"),
    [
        ("missing/model.pt", FileNotFoundError, "`spec`.*not found"),
        ("model.ts", FileNotFoundError, "`spec`.*not found"),
        ("just_a_word", ValueError, "`spec`.*package.module:factory"),
        ("no_such_package_xyz:build", ValueError, "`spec`.*cannot import"),
        ("_factories:smal_cnn", ValueError, "`spec`.*no attribute.*small_cnn"),
        ("_factories:NOT_CALLABLE", ValueError, "`spec`.*not a callable"),
        ("_factories:needs_argument", ValueError, "`spec`.*without arguments"),
        ("_factories:not_a_model", ValueError, "`spec`.*returned a int"),
        (":small_cnn", ValueError, "`spec`"),
        ("", ValueError, "`spec`"),
    ],
)
def test_bad_model_specs_name_the_argument(factories, spec, error, pattern):
    with pytest.raises(error, match=pattern):
        load_model(spec)


def test_model_spec_that_is_not_torchscript(tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_text("not a model")
    with pytest.raises(ValueError, match="`spec`.*not a TorchScript file"):
        load_model(str(junk))
    with pytest.raises(ValueError, match="`spec`.*directory"):
        load_model(str(tmp_path))


def test_missing_weights_file(factories, tmp_path):
    with pytest.raises(FileNotFoundError, match="`weights`.*not found"):
        load_model("_factories:small_cnn", weights=tmp_path / "nope.pt")


def test_mismatched_state_dict_lists_keys(tmp_path, factories):
    state = factories.small_cnn().state_dict()
    state.pop("classifier.bias")
    state["extra.weight"] = torch.zeros(1)
    weights = tmp_path / "weights.pt"
    torch.save(state, weights)
    with pytest.raises(ValueError, match="`weights`") as caught:
        load_model("_factories:small_cnn", weights=weights)
    message = str(caught.value)
    assert "missing" in message and "classifier.bias" in message
    assert "unexpected" in message and "extra.weight" in message


def test_state_dict_with_wrong_shapes(tmp_path, factories):
    other = factories.SmallCNN(num_classes=7).state_dict()
    weights = tmp_path / "weights.pt"
    torch.save(other, weights)
    with pytest.raises(ValueError, match="`weights`.*classifier.weight"):
        load_model("_factories:small_cnn", weights=weights)


def test_state_dict_file_must_hold_tensors(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="`weights`.*state dict"):
        load_state_dict_file(path)


def test_bad_device(factories):
    with pytest.raises(ValueError, match="`device`"):
        load_model("_factories:small_cnn", device="not-a-device")


# ---------------------------------------------------------------------------------------
# layers


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
def test_default_cam_layers_of_torchvision_families():
    torchvision = pytest.importorskip("torchvision")
    models = torchvision.models
    expected = {
        models.resnet18: "layer4",
        models.vgg11: "features.19",
        models.densenet121: "features",
        models.mobilenet_v2: "features.18",
        models.mobilenet_v3_small: "features.12",
        models.swin_t: "permute",
        models.alexnet: "features.11",
        models.convnext_tiny: "features",
        models.efficientnet_b0: "features",
        models.efficientnet_v2_s: "features",
        models.squeezenet1_1: "features",
        models.mnasnet0_5: "layers",
        models.shufflenet_v2_x0_5: "conv5",
        models.googlenet: "inception5b",
        models.inception_v3: "Mixed_7c",
        models.maxvit_t: "blocks.3",
    }
    with torch.device("meta"):  # names only: no memory, no initialisation time
        for build, layer in expected.items():
            model = build()
            assert default_cam_layer(model) == layer, build.__name__
            assert layer in dict(model.named_modules())
            compiled = torch.compile(model, backend="aot_eager")  # compiles on first call only
            assert default_cam_layer(compiled) == layer, build.__name__


@pytest.mark.parametrize(
    "name",
    ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3",
     "maxvit_t", "mnasnet0_5", "mobilenet_v3_small", "regnet_y_400mf", "resnet18",
     "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "vgg11_bn", "vit_b_32"],
)  # fmt: skip
def test_every_torchvision_family_gets_a_layer_with_a_spatial_map(name):
    """The layer runs once and outputs N x C x h x w (a ViT: its class token and a square
    grid of patch tokens, which the report folds). Before, `captum-ext report` asked for
    `--layer` on ConvNeXt, EfficientNet, RegNet and six other families."""
    torchvision = pytest.importorskip("torchvision")
    options = (
        {"aux_logits": False, "init_weights": False}
        if name in ("googlenet", "inception_v3")
        else {}
    )
    # RegNet computes its widths with .tolist(), which meta tensors refuse: build it for real
    with torch.device("cpu" if name.startswith("regnet") else "meta"):
        model = torchvision.models.get_model(name, **options).eval()
        layer = default_cam_layer(model)
        outputs = []
        handle = dict(model.named_modules())[layer].register_forward_hook(
            lambda module, args, output: outputs.append(tuple(output.shape))
        )
        try:
            model(torch.empty(1, 3, 224, 224))
        finally:
            handle.remove()
    assert len(outputs) == 1, layer
    shape = outputs[0]
    if name.startswith("vit"):
        assert len(shape) == 3 and round((shape[1] - 1) ** 0.5) ** 2 == shape[1] - 1
    else:
        assert len(shape) == 4 and min(shape[2:]) >= 5, (layer, shape)


def test_no_default_layer_for_other_models(factories):
    assert default_cam_layer(factories.small_cnn()) is None


def test_default_layer_of_a_timm_style_vision_transformer():
    """timm names its ViT class VisionTransformer too, with blocks.<i>.norm1 (timm is not a
    dependency: a module tree with timm's names stands in for it)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.attn, self.norm2 = nn.LayerNorm(4), nn.Identity(), nn.LayerNorm(4)

    VisionTransformer = type("VisionTransformer", (nn.Module,), {})
    model = VisionTransformer()
    model.blocks = nn.Sequential(Block(), Block(), Block())
    model.norm = nn.LayerNorm(4)
    assert default_cam_layer(model) == "blocks.2.norm1"
    SwinTransformer = type("SwinTransformer", (nn.Module,), {})  # timm's: no "permute"
    swin = SwinTransformer()
    swin.layers = nn.Sequential(nn.Identity(), nn.Identity())
    swin.norm = nn.LayerNorm(4)
    assert default_cam_layer(swin) == "norm"


def test_expose_layer_passes_eager_models_through(factories):
    model = factories.small_cnn()
    forward, layer = expose_layer(model, "features.3")
    assert forward is model and layer is model.features[3]
    with pytest.raises(ValueError, match="`layer`=.*features.3"):
        expose_layer(model, "features.33")


@pytest.mark.parametrize(
    ("factory", "layer"),
    [("small_cnn", "features.3"), ("branchy_cnn", "blocks.1.conv"), ("branchy_cnn", "blocks")],
)
def test_torchscript_layer_maps_equal_eager_maps(tmp_path, factories, factory, layer):
    eager = getattr(factories, factory)().eval()
    scripted = load_model(save_torchscript(eager, tmp_path / "model.ts"))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    if layer == "blocks":  # a ModuleList never runs as a whole: the tap never fires
        forward, tap = expose_layer(scripted, layer)
        with pytest.raises(ValueError, match="did not run"):
            ContrastCAM(forward, tap).attribute(x)
        return
    forward, tap = expose_layer(scripted, layer, example=x[:2])
    assert isinstance(forward, TorchScriptLayerModel)
    torch.testing.assert_close(forward(x), eager(x))
    for method, kwargs in ((ContrastCAM, {}), (CounterfactualCAM, {"target": 1})):
        got = method(forward, tap).attribute(x, **kwargs)
        expected = method(eager, layer).attribute(x, **kwargs)
        torch.testing.assert_close(got, expected)
    assert not tap._forward_hooks and not tap._forward_pre_hooks


def test_torchscript_resnet18_layer_maps_equal_eager_maps(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=5).eval()
    scripted = load_model(save_torchscript(eager, tmp_path / "r18.ts"))
    assert default_cam_layer(scripted) == "layer4"
    x = torch.randn(2, 3, 64, 64)
    for layer in ("layer4", "layer3.1.conv2"):
        forward, tap = expose_layer(scripted, layer, example=x)
        torch.testing.assert_close(
            ContrastCAM(forward, tap).attribute(x, contrast=[1, 2]),
            ContrastCAM(eager, layer).attribute(x, contrast=[1, 2]),
        )


def test_expose_layer_rejects_unknown_torchscript_layer(tmp_path, factories):
    scripted = load_model(save_torchscript(factories.small_cnn(), tmp_path / "m.ts"))
    with pytest.raises(ValueError, match="`layer`=.*Closest names: features"):
        expose_layer(scripted, "feature.3")


# ---------------------------------------------------------------------------------------
# images


def write_image(path: Path, size=(20, 16), mode="RGB", seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    width, height = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if channels == 1 else array, mode=None).save(path)
    return array


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    write_image(root / "b_class" / "2.png", seed=1)
    write_image(root / "a_class" / "1.PNG", seed=2)
    write_image(root / "a_class" / "0.png", seed=3)
    write_image(root / "a_class" / "deeper" / "3.png", seed=4)
    write_image(root / "top.png", seed=5)
    (root / "notes.txt").write_text("not an image")
    return root


def test_imagenet_transform(image_folder):
    images, paths, labels = load_image_folder(image_folder, "imagenet", labels_from_subfolders=True)
    assert images.shape == (5, 3, 224, 224) and images.dtype == torch.float32
    assert [p.relative_to(image_folder).as_posix() for p in paths] == [
        "a_class/0.png",
        "a_class/1.PNG",
        "a_class/deeper/3.png",
        "b_class/2.png",
        "top.png",
    ]
    assert labels == ["a_class", "a_class", "a_class", "b_class", ""]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    lower, upper = (0 - mean) / std, (1 - mean) / std
    assert bool((images >= lower - 1e-5).all()) and bool((images <= upper + 1e-5).all())


def test_imagenet_pil_fallback_matches_torchvision(tmp_path):
    pytest.importorskip("torchvision")
    from captum_ext.data.loading import _imagenet_transform

    for size in ((300, 260), (260, 300), (256, 256), (100, 140)):
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        write_image(path, size=size, seed=size[0])
        with Image.open(path) as image:
            torch.testing.assert_close(
                _imagenet_pil(image), _imagenet_transform()(image), atol=1e-5, rtol=0
            )


def test_none_transform_keeps_pixels(tmp_path):
    root = tmp_path / "same"
    arrays = [write_image(root / f"{i}.png", size=(12, 10), seed=i) for i in range(3)]
    images, paths = load_image_folder(root, "none")
    assert images.shape == (3, 3, 10, 12)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    expected = torch.from_numpy(arrays[1]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(images[1], expected)
    grey = tmp_path / "grey"
    write_image(grey / "g.png", size=(9, 7), mode="L")
    assert load_image_folder(grey, "none")[0].shape == (1, 1, 7, 9)
    # every grey mode keeps one channel, as the docstring says (1-bit and grey-and-alpha
    # images became RGB, so a folder that mixed them with 8-bit grey ones failed)
    from PIL import Image

    base = Image.open(grey / "g.png")
    base.convert("1").save(grey / "h.png")
    base.convert("LA").save(grey / "i.png")
    images = load_image_folder(grey, "none")[0]
    assert images.shape == (3, 1, 7, 9)
    torch.testing.assert_close(images[2], images[0])  # the alpha channel is dropped


def test_none_transform_needs_equal_sizes(image_folder, tmp_path):
    write_image(image_folder / "z_other_size.png", size=(30, 30))
    with pytest.raises(ValueError, match="`directory`.*same size"):
        load_image_folder(image_folder, "none")


def test_digits_transform(tmp_path):
    root = tmp_path / "digits"
    write_image(root / "7" / "a.png", size=(40, 40), mode="L")
    write_image(root / "3" / "b.png", size=(28, 28), mode="RGBA")
    with pytest.warns(UserWarning, match=r"1 of 2 images have transparent pixels \(3/b.png\)"):
        images, _, labels = load_image_folder(root, "digits", labels_from_subfolders=True)
    assert images.shape == (2, 1, 28, 28)
    low, high = normalize_digits(torch.tensor([0.0, 255.0])).tolist()
    assert low - 1e-5 <= float(images.min()) and float(images.max()) <= high + 1e-5
    assert labels == ["3", "7"]


def test_callable_transform_limit_and_extensions(image_folder):
    write_image(image_folder / "b_class" / "photo.jpg", seed=6)
    images, paths = load_image_folder(
        image_folder, lambda image: torch.zeros(2, 5, 5), extensions=("png",), limit=2
    )
    assert images.shape == (2, 2, 5, 5)
    assert [p.name for p in paths] == ["0.png", "1.PNG"]
    images, paths = load_image_folder(image_folder, "none", extensions=(".JPG",))
    assert [p.name for p in paths] == ["photo.jpg"] and images.shape == (1, 3, 16, 20)


def test_image_folder_errors(tmp_path, image_folder):
    with pytest.raises(FileNotFoundError, match="`directory`.*not found"):
        load_image_folder(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="`directory`.*no images"):
        load_image_folder(empty)
    with pytest.raises(ValueError, match="`transform`"):
        load_image_folder(image_folder, "bicubic")
    with pytest.raises(ValueError, match="`limit`"):
        load_image_folder(image_folder, limit=0)
    (image_folder / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(image_folder)
    with pytest.raises(ValueError, match="`transform`.*C x H x W"):
        load_image_folder(image_folder, lambda image: torch.zeros(5, 5), limit=1)


def test_hidden_files_and_folders_are_skipped(image_folder):
    """Jupyter's checkpoint copies and macOS's resource forks are not the user's images (an
    empty ``._`` file failed the whole folder; ``.ipynb_checkpoints`` became a class)."""
    plain, plain_paths, plain_labels = load_image_folder(
        image_folder, "none", labels_from_subfolders=True
    )
    write_image(image_folder / ".ipynb_checkpoints" / "1-checkpoint.png", seed=9)
    write_image(image_folder / "a_class" / ".cache" / "4.png", seed=10)
    (image_folder / "a_class" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    images, paths, labels = load_image_folder(image_folder, "none", labels_from_subfolders=True)
    assert paths == plain_paths and labels == plain_labels
    assert torch.equal(images, plain)


def test_sixteen_bit_and_float_grey_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert() clips 16-bit values above 255: 99.6 % of this ramp came out white.
    "digits" and "imagenet" read a 16-bit PNG as its 8-bit rounding and a float TIFF in
    [0, 1] likewise; "none" keeps every level (it read them at 8 bits too: a ramp over 200
    of the 65,536 levels came out as 2 values); a float image outside [0, 1] is refused; a
    callable sees the 16-bit image."""
    ramp = np.linspace(0.0, 1.0, 40 * 50).reshape(40, 50)
    folder = tmp_path / "grey"
    folder.mkdir()
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(folder / "a16.png")
    Image.fromarray(ramp.astype(np.float32), mode="F").save(folder / "b_float.tiff")
    Image.fromarray(np.round(ramp * 255).astype(np.uint8)).save(folder / "c8.png")
    for transform in ("digits", "imagenet"):
        images, _ = load_image_folder(folder, transform)
        assert images.shape[0] == 3
        torch.testing.assert_close(images[0], images[2], atol=0, rtol=0)
        torch.testing.assert_close(images[1], images[2], atol=0, rtol=0)
    images, _ = load_image_folder(folder, "none")
    expected = torch.from_numpy(ramp).float()[None]
    torch.testing.assert_close(images[0], expected, atol=0.5 / 65535, rtol=0)
    torch.testing.assert_close(images[1], expected, atol=0, rtol=0)
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    levels = np.linspace(1000, 1200, 40 * 50).round().astype(np.uint16).reshape(40, 50)
    Image.fromarray(levels).save(narrow / "microscope.png")
    images, _ = load_image_folder(narrow, "none")
    assert images.unique().numel() == np.unique(levels).size == 201
    torch.testing.assert_close(images[0, 0].double(), torch.from_numpy(levels / 65535.0))
    modes = []
    load_image_folder(folder, lambda image: modes.append(image.mode) or torch.zeros(1, 2, 2))
    assert modes[0].startswith("I") and modes[1] == "F" and modes[2] == "L"
    Image.fromarray((ramp * 7).astype(np.float32), mode="F").save(folder / "d_float.tiff")
    with pytest.raises(ValueError, match=r"d_float.tiff.*'F' image with values in \[0, 7\]"):
        load_image_folder(folder, "none")


@pytest.mark.parametrize("orientation", [3, 6, 8, 2])
def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path, orientation):
    """A phone stores a portrait photo as the sensor's landscape pixels with EXIF orientation
    6 (turn 90 degrees clockwise to view). The named transforms show the model the photo
    as a viewer shows it; a callable gets PIL's pixels untouched, as ImageFolder gives them."""
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)  # 40 wide, 30 high
    upright = {
        2: stored[:, ::-1],  # mirrored left-right
        3: stored[::-1, ::-1],  # turned 180 degrees
        6: np.rot90(stored, k=-1),  # turned 90 degrees clockwise
        8: np.rot90(stored, k=1),  # turned 90 degrees anticlockwise
    }[orientation]
    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(folder / "turned.png", exif=exif)
    Image.fromarray(np.ascontiguousarray(upright)).save(folder / "upright.png")
    images, paths = load_image_folder(folder, "none")
    assert [path.name for path in paths] == ["turned.png", "upright.png"]
    assert images.shape[2:] == upright.shape[:2]
    torch.testing.assert_close(images[0], images[1], atol=0, rtol=0)
    torch.testing.assert_close(
        images[1], torch.from_numpy(np.ascontiguousarray(upright)).permute(2, 0, 1) / 255.0
    )
    resized, _ = load_image_folder(folder, "imagenet")
    torch.testing.assert_close(resized[0], resized[1], atol=0, rtol=0)
    sizes = []
    load_image_folder(folder, lambda image: sizes.append(image.size) or torch.zeros(1, 2, 2))
    assert sizes[0] == (40, 30)


def test_denormalize_for_display_inverts_each_transform():
    x = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    shown = denormalize_for_display((x - mean) / std, "imagenet")
    assert shown.shape == (2, 6, 5, 3) and shown.dtype == np.float32
    np.testing.assert_allclose(shown, x.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    single = denormalize_for_display(((x - mean) / std)[0], "imagenet")
    assert single.shape == (6, 5, 3)
    pixels = torch.randint(0, 256, (2, 1, 4, 4)).float()
    np.testing.assert_allclose(
        denormalize_for_display(normalize_digits(pixels), "digits"),
        (pixels / 255).permute(0, 2, 3, 1).numpy(),
        atol=1e-6,
    )
    np.testing.assert_allclose(denormalize_for_display(x, "none"), x.permute(0, 2, 3, 1))
    scaled = denormalize_for_display(x * 10 - 3, lambda image: image)
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    with pytest.raises(ValueError, match="transform"):
        denormalize_for_display(x, "sepia")


@pytest.mark.parametrize("how", ["script", "trace"])
def test_expose_final_layer_of_torchscript_matches_the_eager_gradtrust(factories, tmp_path, how):
    """GradTrust of a scripted / traced (and saved, reloaded) model, read through an eager
    copy of its last linear layer, equals GradTrust of the eager model; the compiled model
    keeps no .grad and the same weights."""
    from captum_ext.metrics import gradtrust
    from captum_ext.torchscript import expose_final_layer, last_linear_name

    model = factories.grey_cnn().eval()
    x = torch.rand(5, 1, 20, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
        torch.jit.save(compiled, str(tmp_path / "m.pt"))
        loaded = torch.jit.load(str(tmp_path / "m.pt"))
    name = last_linear_name(loaded)
    assert isinstance(model.get_submodule(name), nn.Linear)
    assert name == [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    wrapper = expose_final_layer(loaded, example=x[:2])
    torch.testing.assert_close(gradtrust(wrapper, x), gradtrust(model, x), rtol=1e-5, atol=0)
    assert all(p.grad is None for p in loaded.parameters())
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_check_class_names_counts_the_outputs():
    from captum_ext.data.loading import check_class_names

    model = torch.nn.Linear(3, 4)
    check_class_names(model, torch.zeros(1, 3), ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="--classes.*3 names.*4 outputs"):
        check_class_names(model, torch.zeros(1, 3), ["a", "b", "c"])
    check_class_names(model, torch.zeros(1, 5), ["a"])  # a failing model is left to the caller


def test_logits_output_shares_the_models_modules_names_and_mode(factories):
    from captum_ext.attr import GradCAM
    from captum_ext.data import LogitsOutput, with_logits_output

    model = factories.logits_in_a_field().eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    wrapped, adapted = with_logits_output(model, x[:1])
    assert adapted and isinstance(wrapped, LogitsOutput) and not model.training
    assert [n for n, _ in wrapped.named_modules()] == [n for n, _ in model.named_modules()]
    assert wrapped.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(wrapped(x), model(x)["logits"])
    wrapped.train()
    assert model.training and model.features[0].training
    wrapped.eval()
    expected = GradCAM(model, "features.3", output_transform=lambda out: out["logits"])
    torch.testing.assert_close(
        GradCAM(wrapped, "features.3").attribute(x, target=1), expected.attribute(x, target=1)
    )
    wrapped.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    plain = factories.small_cnn().eval()
    assert with_logits_output(plain, x[:1]) == (plain, False)
    compiled = torch.compile(model, backend="aot_eager")  # names of the eager model
    wrapped, _ = with_logits_output(compiled, x[:1].double())
    assert [n for n, _ in wrapped.named_modules()] == [n for n, _ in model.named_modules()]


def test_default_layer_of_numbered_pre_norm_blocks():
    """Hugging Face's ViTForImageClassification names its blocks vit.layers.<i> (transformers
    5; vit.encoder.layer.<i> before) with layernorm_before as the first norm."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layernorm_before, self.layernorm_after = nn.LayerNorm(4), nn.LayerNorm(4)

    ViTForImageClassification = type("ViTForImageClassification", (nn.Module,), {})
    model = ViTForImageClassification()
    model.vit = nn.Module()
    model.vit.layers = nn.ModuleList([Block() for _ in range(12)])
    model.vit.layernorm = nn.LayerNorm(4)
    assert default_cam_layer(model) == "vit.layers.11.layernorm_before"


def test_a_folder_named_by_a_duplicated_class_name_is_labelled_with_a_warning():
    """ImageNet's list of names has two "crane"s (outputs 134 and 517): a folder "crane" was
    labelled with the last of them silently; it still is (the folder cannot say which), and
    the user is told, with the way to choose."""
    from captum_ext.data.loading import folder_labels

    with pytest.warns(UserWarning, match=r"names 'crane' more than once \(outputs 0, 2\)"):
        assert folder_labels(["crane", "dog", "0"], ["crane", "dog", "crane"]) == [2, 1, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert folder_labels(["dog"], ["crane", "dog", "crane"]) == [1]


@pytest.mark.parametrize("link", ["best", "kittens", "new", "val", "aaa", "zzz"])
def test_a_link_beside_its_class_folder_never_takes_its_name(tmp_path, link):
    """Which name a linked class folder was read under followed the file system's listing
    order: for 7 of 13 names a link `best -> cat` took cat's images (label "best")."""
    root = tmp_path / "classes"
    write_image(root / "cat" / "1.png")
    write_image(root / "dog" / "1.png")
    (root / link).symlink_to(root / "cat", target_is_directory=True)
    outside = tmp_path / "elsewhere"
    write_image(outside / "2.png")
    (root / "more").symlink_to(outside, target_is_directory=True)
    (root / "zz_again").symlink_to(outside, target_is_directory=True)
    _, paths, labels = load_image_folder(root, "none", labels_from_subfolders=True)
    assert labels == ["cat", "dog", "more"]  # a folder outside: its first link in path order
    assert [p.name for p in paths] == ["1.png", "1.png", "2.png"]


def test_skipped_files_are_named_in_a_warning(tmp_path):
    """`.jfif` (a browser's "Save image as" JPEG), `.ppm` and links to nothing were dropped
    without a word."""
    root = tmp_path / "mixed"
    write_image(root / "a.png")
    write_image(root / "b.jpg")
    (root / "b.jpg").rename(root / "b.jfif")
    write_image(root / "c.png")
    from PIL import Image

    Image.open(root / "c.png").save(root / "d.ppm")
    (root / "notes.txt").write_text("not an image")
    (root / "e.png").symlink_to(root / "gone.png")
    with pytest.warns(
        UserWarning, match=r"1 files that Pillow may read .*\(1 \.ppm;.*1 links to nothing .*e\.png"
    ):
        _, paths = load_image_folder(root, "none")
    assert [p.name for p in paths] == ["a.png", "b.jfif", "c.png"]


def test_a_conversion_pil_cannot_do_names_the_file(tmp_path):
    """A CIE-Lab TIFF under "digits": PIL's "conversion from LAB to L not supported"
    escaped without the file's name."""
    from PIL import Image

    root = tmp_path / "lab"
    root.mkdir()
    Image.new("LAB", (8, 8), (50, 0, 0)).save(root / "lab.tif")
    with pytest.raises(ValueError, match=r"cannot read image .*lab\.tif.*conversion"):
        load_image_folder(root, "digits")


def test_a_transparent_grey_level_of_a_16_bit_image_is_compared_at_16_bits(tmp_path):
    """A 16-bit grey PNG's transparent colour (tRNS) was compared with the image cut to 8
    bits: a false alarm for a level no pixel has, none for one a pixel has."""
    from PIL import Image

    ramp = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    for level, warned in ((255, False), (1000, True)):
        root = tmp_path / str(level)
        root.mkdir()
        Image.fromarray(ramp).save(root / "ramp.png", transparency=level)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_image_folder(root, "none")
        assert any("transparent pixels" in str(w.message) for w in caught) == warned


def test_image_folder_dataset_reads_what_load_image_folder_reads(tmp_path):
    """The lazy dataset `score` uses: the same files, order, pixels and labels as the
    in-memory loader; another size is refused naming both files; transparent images are
    listed as read and warned about once."""
    from captum_ext.data import ImageFolderDataset

    root = tmp_path / "classes"
    for i, name in enumerate(["cat/a.png", "cat/b.png", "dog/c.png", "loose.png"]):
        write_image(root / name, size=(20, 16), seed=i)
    write_image(root / "dog" / "d.png", size=(20, 16), mode="RGBA", seed=9)
    with pytest.warns(UserWarning, match="transparent"):
        images, paths, _ = load_image_folder(root, "none", labels_from_subfolders=True)
    dataset = ImageFolderDataset(root, "none", class_names=["cat", "dog"])
    assert dataset.paths == paths and len(dataset) == 5
    assert dataset.labels.tolist() == [0, 0, 1, 1, -1]
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert torch.equal(image, images[i]) and int(label) == dataset.labels[i]
    assert dataset.transparent == ["dog/d.png"]
    with pytest.warns(UserWarning, match=r"1 of 5 images have transparent pixels \(dog/d.png\)"):
        dataset.warn_transparent()
    write_image(root / "zz.png", size=(30, 30))
    bigger = ImageFolderDataset(root, "none")
    bigger[0]
    with pytest.raises(ValueError, match=r"zz\.png.*gives a \(3, 30, 30\) tensor but .*a\.png"):
        bigger[len(bigger) - 1]
    assert len(ImageFolderDataset(root, "none", limit=2)) == 2


def test_image_folder_dataset_refuses_other_sizes_in_dataloader_workers(tmp_path):
    """Each worker took the first image it read as the reference size, so with workers a
    folder of mixed sizes was loaded in batches of different sizes without an error."""
    from torch.utils.data import DataLoader

    from captum_ext.data import ImageFolderDataset

    root = tmp_path / "mixed"
    for i in range(6):  # the second worker's batch, 2.png and 3.png, is the other size
        write_image(root / f"{i}.png", size=(30, 30) if i in (2, 3) else (20, 16), seed=i)
    loader = DataLoader(ImageFolderDataset(root, "none"), batch_size=2, num_workers=2)
    with pytest.raises(ValueError, match=r"2\.png.*gives a \(3, 30, 30\) tensor but .*0\.png"):
        list(loader)


@pytest.mark.parametrize("transform", ["imagenet", "none", "digits"])
def test_image_folder_dataset_pickles_for_spawned_workers(tmp_path, transform):
    """A DataLoader's workers started by spawn (macOS's and Windows' default) pickle the
    dataset; the "imagenet" transform was a local lambda ("Can't pickle local object")."""
    import pickle

    from captum_ext.data import ImageFolderDataset

    write_image(tmp_path / "images" / "a.png", size=(30, 24))
    dataset = ImageFolderDataset(tmp_path / "images", transform)
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[0][0], dataset[0][0])


def test_a_python_file_as_model_spec_says_how_to_name_its_module(tmp_path):
    """`--model path/to/nets.py:build` answered "file not found" although the file exists."""
    source = tmp_path / "nets.py"
    source.write_text("import torch.nn as nn\n\ndef build():\n    return nn.Linear(2, 2)\n")
    with pytest.raises(
        ValueError, match=r"names a Python file; give its module instead, 'nets:build'"
    ):
        load_model(f"{source}:build")
    with pytest.raises(FileNotFoundError, match="file not found"):
        load_model(f"{tmp_path / 'missing.py'}:build")
