"""captum_ext.data.loading, fixes from an audit of the loaders: damaged image files, torchvision's
own checkpoint files, folder names (decomposed Unicode, non-ASCII digits, names that match no
class) and messages that name what the caller can pass (Python or the command line)."""

from __future__ import annotations

import re
import struct
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from captum_ext.cli import main
from captum_ext.data.loading import (
    COMMAND_LINE_NAMES,
    ImageFolderDataset,
    folder_labels,
    load_image_folder,
    load_model,
    load_state_dict_file,
    resolve_inputs,
)

torch.set_num_threads(1)


def _png(path: Path, seed: int = 0, size: tuple[int, int] = (20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _damaged_png(path: Path) -> Path:
    """A PNG whose IDAT chunk's length field says 40 bytes less than it holds (a bit flip):
    Pillow raises SyntaxError ("broken PNG file") from ``load()``."""
    _png(path, seed=1)
    data = path.read_bytes()
    at = data.index(b"IDAT") - 4
    length = int.from_bytes(data[at : at + 4], "big")
    path.write_bytes(data[:at] + (length - 40).to_bytes(4, "big") + data[at + 4 :])
    return path


def _one_line(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()


# --------------------------------------------------------------------------------------
# 1. damaged image files


def test_a_damaged_png_is_a_value_error_naming_the_file(tmp_path):
    """Pillow's PNG decoder raises SyntaxError for a damaged chunk; it escaped the loader
    (which caught OSError and ValueError only) as a traceback."""
    folder = tmp_path / "images"
    _png(folder / "a_ok.png")
    _damaged_png(folder / "b_broken.png")
    with pytest.raises(
        ValueError, match=r"`directory`: cannot read image .*b_broken\.png"
    ) as caught:
        load_image_folder(folder, "none")
    assert "SyntaxError" in str(caught.value)
    dataset = ImageFolderDataset(folder, "digits", argument_names=COMMAND_LINE_NAMES)
    with pytest.raises(ValueError, match=r"^`--images`: cannot read image .*b_broken\.png"):
        dataset[1]


@pytest.mark.parametrize(
    "error",
    [
        struct.error("unpack requires a buffer of 4 bytes"),
        EOFError(),
        IndexError("x"),
        TypeError("y"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_whatever_pillows_decoders_raise_is_a_value_error(tmp_path, monkeypatch, error):
    _png(tmp_path / "a.png")

    def load(self):
        raise error

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load, raising=False)
    with pytest.raises(ValueError, match=r"cannot read image .*a\.png.*the file is damaged"):
        load_image_folder(tmp_path, "none")


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_memory_errors_and_interrupts_are_not_swallowed(tmp_path, monkeypatch, error):
    _png(tmp_path / "a.png")

    def load(self):
        raise error

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load, raising=False)
    with pytest.raises(error):
        load_image_folder(tmp_path, "none")


def test_a_callable_transforms_own_errors_are_still_raised_as_they_are(tmp_path):
    _png(tmp_path / "a.png")

    def transform(image):
        raise TypeError("the user's bug")

    with pytest.raises(TypeError, match="the user's bug"):
        load_image_folder(tmp_path, transform)


def test_score_on_a_damaged_png_says_one_line(tmp_path, capsys):
    folder = tmp_path / "images"
    _png(folder / "a_ok.png")
    _damaged_png(folder / "b_broken.png")
    argv = ["score", "--images", str(folder), "--transform", "digits", "--scores", "softmax"]
    code = main([*argv, "--out", str(tmp_path / "s.csv"), "--no-progress"])
    lines = _one_line(capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert "`--images`: cannot read image" in lines[0] and "b_broken.png" in lines[0]


# --------------------------------------------------------------------------------------
# 2. torchvision's own checkpoint files


def _random_batch_norm_statistics(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.running_mean.shape
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)


@pytest.mark.parametrize("counters", [True, False], ids=["with-counters", "pre-0.4.1"])
def test_a_densenet_checkpoint_in_torchvisions_layout_loads(tmp_path, counters):
    """torchvision's DenseNet files keep the old keys 'denselayer1.norm.1.weight' (its
    builders rename them when they load); the strict load refused them. Files from before
    PyTorch 0.4.1 also have no BatchNorm counters (num_batches_tracked)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    source = torchvision.models.densenet121().eval()
    with torch.no_grad():
        _random_batch_norm_statistics(source)
    old = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value
        for key, value in source.state_dict().items()
        if counters or not key.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "densenet121-hub.pth")
    model = load_model("torchvision.models:densenet121", tmp_path / "densenet121-hub.pth")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    # a key missing besides the old names is still refused, naming the key as torchvision has it
    del old["features.denseblock1.denselayer1.conv.1.weight"]
    torch.save(old, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"1 missing key\(s\): .*denselayer1\.conv1\.weight"):
        load_model("torchvision.models:densenet121", tmp_path / "broken.pth")


@pytest.mark.parametrize(
    ("name", "aux", "size"),
    [
        ("inception_v3", True, 80),
        ("inception_v3", False, 80),
        ("googlenet", True, 64),
        ("googlenet", False, 64),
    ],
)
def test_inception_and_googlenet_weights_give_torchvisions_pretrained_model(
    tmp_path, name, aux, size
):
    """torchvision builds inception_v3 and googlenet with transform_input=True when given
    weights; the no-argument factory built them with transform_input=False, so the same
    weights computed other numbers, silently (and a file without the auxiliary heads did
    not load)."""
    torchvision = pytest.importorskip("torchvision")
    builder = getattr(torchvision.models, name)
    torch.manual_seed(0)
    # what torchvision builds from its weights: the source of the file
    source = builder(init_weights=True, transform_input=True, aux_logits=aux).eval()
    with torch.no_grad():
        _random_batch_norm_statistics(source)
    torch.save(source.state_dict(), tmp_path / f"{name}.pth")
    # the file cannot tell whether it came from torchvision: the build is said (found by
    # the second review: weights trained with transform_input=False changed silently)
    with pytest.warns(UserWarning, match=r"built as torchvision builds .*transform_input=False"):
        model = load_model(f"torchvision.models:{name}", tmp_path / f"{name}.pth")
    assert model.transform_input is True
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    if name == "googlenet":  # torchvision drops the heads its weights never trained
        assert model.aux_logits is False and model.aux1 is None and model.aux2 is None
    else:
        assert (model.AuxLogits is not None) is aux


def test_a_users_own_factory_is_built_as_written(tmp_path, monkeypatch):
    """Only torchvision's builders themselves are built as for their weights: a factory of
    the user's keeps its transform_input=False."""
    torchvision = pytest.importorskip("torchvision")
    (tmp_path / "_fix_own_googlenet.py").write_text(
        "import torchvision\n\n\ndef make():\n"
        "    return torchvision.models.googlenet(init_weights=False, aux_logits=False)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(
        torchvision.models.googlenet(init_weights=False, aux_logits=False).state_dict(),
        tmp_path / "g.pth",
    )
    try:
        model = load_model("_fix_own_googlenet:make", tmp_path / "g.pth")
    finally:
        sys.modules.pop("_fix_own_googlenet", None)
    assert model.transform_input is False


# --------------------------------------------------------------------------------------
# 3. decomposed Unicode folder names, folders that match no class name


def _nfd(name: str) -> str:
    return unicodedata.normalize("NFD", name)


def test_decomposed_folder_names_match_composed_class_names(tmp_path):
    """macOS (HFS+) stores 'café' decomposed; a --classes file typed normally has it
    composed: the images were left unlabelled."""
    assert _nfd("café") != "café"
    assert folder_labels([_nfd("café"), "eau", _nfd("thé")], ["café", "thé", "eau"]) == [0, 2, 1]
    assert folder_labels(["café"], [_nfd("café")]) == [0]
    for name in ("café", "thé", "eau"):
        _png(tmp_path / "images" / _nfd(name) / "a.png")
    inputs = resolve_inputs(
        tmp_path / "images", transform="digits", class_names=["café", "thé", "eau"]
    )
    assert inputs.labels.tolist() == [0, 2, 1]  # sorted: café, eau, thé


def test_folders_matching_no_class_name_are_named_in_one_warning():
    with pytest.warns(UserWarning) as caught:
        labels = folder_labels(["cat", "cat", "dog", "Bird", "2", "", "9"], ["Cat", "Dog", "bird"])
    assert labels == [-1, -1, -1, -1, 2, -1, -1]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("4 folder(s) match no class name and no class index (0..2)")
    for shown in ("'cat' (closest: 'Cat')", "'dog' (closest: 'Dog')", "'Bird' (closest: 'bird')"):
        assert shown in message
    assert "'9'" in message


def test_the_warning_lists_a_few_folders():
    folders = [f"class_{i}" for i in range(8)]
    with pytest.warns(UserWarning, match=r"8 folder\(s\) .*; and 3 more\.") as caught:
        folder_labels(folders, ["a", "b"])
    assert len(caught) == 1


@pytest.mark.parametrize(
    ("folders", "names"),
    [
        (["cat", "dog", "0", ""], ["cat", "dog"]),  # every folder a name or an index
        (["misc", "x"], None),  # no class names: indices only
        (["misc", "3"], [str(i) for i in range(10)]),  # names that are the indices
    ],
)
def test_no_warning_when_nothing_is_missed(folders, names):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder_labels(folders, names)


def test_the_warning_names_the_folder_argument_of_the_caller(tmp_path):
    _png(tmp_path / "images" / "cat" / "a.png")
    with pytest.warns(UserWarning, match=r"^`--images`: 1 folder\(s\) .*'cat' \(closest: 'Cat'\)"):
        ImageFolderDataset(
            tmp_path / "images",
            "digits",
            class_names=["Cat", "Dog"],
            argument_names=COMMAND_LINE_NAMES,
        )
    with pytest.warns(UserWarning, match=r"^`directory`: 1 folder\(s\)"):
        ImageFolderDataset(tmp_path / "images", "digits", class_names=["Cat", "Dog"])
    with pytest.warns(UserWarning, match=r"^`images`: 1 folder\(s\)"):
        resolve_inputs(tmp_path / "images", transform="digits", class_names=["Cat", "Dog"])


def test_score_warns_of_folders_its_classes_do_not_name(tmp_path, capsys):
    folder = tmp_path / "images"
    _png(folder / "cat" / "a.png")
    _png(folder / "Dog" / "a.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("Cat\nDog\n" + "".join(f"c{i}\n" for i in range(2, 10)))
    argv = ["score", "--images", str(folder), "--classes", str(classes), "--scores", "softmax"]
    assert main([*argv, "--out", str(tmp_path / "s.csv"), "--no-progress"]) == 0
    lines = _one_line(capsys)
    assert lines == [
        "captum-ext score: warning: `--images`: 1 folder(s) match no class name and no class "
        "index (0..9), so their images are unlabelled: 'cat' (closest: 'Cat'). Name each "
        "class folder exactly as its class (case and spelling) or by its output index."
    ]


def test_a_name_given_twice_is_warned_of_by_the_callers_argument_name():
    with pytest.warns(UserWarning, match=r"^`class_names` names 'crane' more than once"):
        folder_labels(["crane"], ["crane", "dog", "crane"])
    with pytest.warns(UserWarning, match=r"^`--classes` names 'crane' more than once"):
        folder_labels(["crane"], ["crane", "crane"], argument_names=COMMAND_LINE_NAMES)


# --------------------------------------------------------------------------------------
# 4. folders named by digits that int() does not read


def test_non_ascii_digit_folders_are_names_not_indices(tmp_path):
    """'①' and '²' are digits to str.isdigit but not to int(): folder_labels crashed."""
    assert folder_labels(["①", "²", "3"], None) == [-1, -1, 3]
    assert folder_labels(["①", "②"], ["①", "②"]) == [0, 1]
    for name in ("①", "②"):
        _png(tmp_path / "images" / name / "a.png")
    dataset = ImageFolderDataset(tmp_path / "images", "digits")
    assert dataset.labels.tolist() == [-1, -1]


# --------------------------------------------------------------------------------------
# 5. messages


def _torchscript(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


def test_a_torchscript_file_as_weights_is_told_to_be_the_model(tmp_path):
    """torch.load's own error advised weights_only=False (unsafe, and impossible from the
    command line), after a warning about dispatching to torch.jit.load."""
    path = _torchscript(tmp_path / "ts.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as caught:
            load_state_dict_file(path)
    message = str(caught.value)
    assert "is a TorchScript file" in message
    assert "give it as `spec` instead, without `weights`" in message
    assert "weights_only" not in message
    with pytest.raises(ValueError, match="give it as --model instead, without --weights"):
        load_state_dict_file(path, argument_names=COMMAND_LINE_NAMES)


def test_a_torch_export_archive_as_weights_is_told_to_be_the_model(tmp_path):
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    torch.export.save(program, tmp_path / "m.pt2")
    with pytest.raises(ValueError, match=r"is a torch\.export archive .*give it as `spec`"):
        load_state_dict_file(tmp_path / "m.pt2")


def test_score_with_a_torchscript_file_as_weights_says_one_line(tmp_path, capsys):
    path = _torchscript(tmp_path / "ts.pt")
    argv = ["score", "--model", "captum_ext.bundled:load_bundled_model", "--weights", str(path)]
    code = main([*argv, "--out", str(tmp_path / "s.csv"), "--no-progress"])
    lines = _one_line(capsys)
    assert code == 2
    assert len(lines) == 1, lines  # torch's "dispatching to torch.jit.load" warning is gone
    assert lines[0].endswith("give it as --model instead, without --weights."), lines[0]


def test_a_python_file_named_without_a_folder_gets_the_module_hint(tmp_path, monkeypatch):
    """`--model mymodels.py:net` (no './') said "cannot import module 'mymodels.py'"."""
    (tmp_path / "_fix_nets_file.py").write_text(
        "import torch.nn as nn\n\ndef build():\n    return nn.Linear(2, 2)\n"
    )
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(
            ValueError,
            match=r"^`spec` '_fix_nets_file\.py:build' names a Python file; give its module "
            r"instead, '_fix_nets_file:build', with '\.' as the current folder",
        ):
            load_model("_fix_nets_file.py:build")
        with pytest.raises(FileNotFoundError, match=r"file not found: 'ghost\.py'.*'ghost:build'"):
            load_model("ghost.py:build")
        with pytest.raises(FileNotFoundError, match=r"file not found: .*'ghost:build'"):
            load_model("./ghost.py:build")
    finally:
        sys.modules.pop("_fix_nets_file", None)


def test_skipped_endings_are_explained_as_the_caller_can_choose(tmp_path):
    """The command line has no option for the endings read; the warning named `extensions`."""
    _png(tmp_path / "a.png")
    Image.open(tmp_path / "a.png").save(tmp_path / "b.ppm")
    with pytest.warns(UserWarning, match=r"\(1 \.ppm; `extensions` lists those read\)"):
        load_image_folder(tmp_path, "none")
    with pytest.warns(UserWarning) as caught:
        load_image_folder(tmp_path, "none", argument_names=COMMAND_LINE_NAMES)
    message = str(caught[0].message)
    assert "`extensions`" not in message
    assert "(1 .ppm; only .png, .jpg, .jpeg" in message and ".webp files are read)" in message


def test_a_32_bit_image_out_of_range_is_explained_as_the_caller_can_act(tmp_path):
    """The command line cannot pass a callable `--transform`."""
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match=r"pass a callable `transform` that maps it"):
        load_image_folder(tmp_path, "none")
    with pytest.raises(ValueError) as caught:
        load_image_folder(tmp_path, "none", argument_names=COMMAND_LINE_NAMES)
    message = str(caught.value)
    assert "callable `--transform`" not in message
    assert "convert it to an 8- or 16-bit image first" in message


# --------------------------------------------------------------------------------------
# 6. 32-bit integer images: what the docstring says is what is done


def test_a_32_bit_image_of_8_bit_values_is_read_as_16_bit_as_documented(tmp_path):
    levels = np.arange(16, dtype=np.int32).reshape(4, 4) * 17  # 0..255
    Image.fromarray(levels).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    images, _ = load_image_folder(tmp_path, "none")
    torch.testing.assert_close(images[0, 0].double(), torch.from_numpy(levels / 65535.0))
    doc = " ".join(load_image_folder.__doc__.split())
    assert "32-bit integer ones with values in 0..65535 likewise" in doc
