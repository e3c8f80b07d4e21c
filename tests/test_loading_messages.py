"""What the loaders say about what they skip or refuse: hidden images, photos Pillow cannot
read, animated images, a ``torch.save`` file given as the model, and an ``--out`` folder
that cannot be written (named as the user wrote it, not by a scratch file's name)."""

from __future__ import annotations

import errno
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from captum_ext._utils.training import check_writable, writable_path_argument
from captum_ext.data.loading import (
    COMMAND_LINE_NAMES,
    ImageFolderDataset,
    _pillow_endings,
    load_image_folder,
    load_model,
)


def write_png(path: Path, colour: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def messages(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught]


# ------------------------------------------------------------------ hidden images


def test_a_folder_of_hidden_images_says_they_are_hidden(tmp_path):
    """A folder holding only `.a.png` and `.sub/b.png` was said to hold "no images with the
    endings .png, ...": both are images, skipped because their names start with "."."""
    folder = tmp_path / "hiddenonly"
    write_png(folder / ".a.png")
    write_png(folder / ".sub" / "b.png")
    (folder / ".DS_Store").write_bytes(b"\0")  # not an image: not counted
    with pytest.raises(ValueError) as raised:
        load_image_folder(folder, "none", argument_names=COMMAND_LINE_NAMES)
    text = str(raised.value)
    assert text.startswith("`--images` (directory)") and "holds no images" in text
    assert "1 hidden image file and 1 hidden folder of images (.a.png, .sub/:" in text
    assert "names starting with '.' are never read" in text
    assert ".DS_Store" not in text


def test_a_folder_without_images_hidden_or_not_says_nothing_of_hidden_ones(tmp_path):
    """The note is about hidden images only: a hidden folder without images is not one."""
    folder = tmp_path / "notes"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref")
    (folder / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="holds no images") as raised:
        load_image_folder(folder, "none")
    assert "hidden" not in str(raised.value)


def test_the_skip_warning_counts_hidden_images_too(tmp_path):
    """The warning on skipped files listed endings and links, not the hidden images skipped
    beside them."""
    folder = tmp_path / "mixed"
    write_png(folder / "a.png")
    Image.open(folder / "a.png").save(folder / "b.ppm")  # skipped by its ending: a warning
    write_png(folder / "cat" / "._c.png")
    with pytest.warns(UserWarning) as caught:
        _, paths = load_image_folder(folder, "none")
    assert [p.name for p in paths] == ["a.png"]
    (text,) = [m for m in messages(caught) if "skipped" in m]
    assert "1 files that Pillow may read as images" in text
    assert "1 hidden image file (cat/._c.png:" in text


def test_hidden_images_alone_give_no_warning(tmp_path):
    """Skipping hidden files is by design (Jupyter's checkpoints): no warning of its own."""
    folder = tmp_path / "plain"
    write_png(folder / "a.png")
    write_png(folder / ".ipynb_checkpoints" / "a-checkpoint.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, paths = load_image_folder(folder, "none")
    assert [p.name for p in paths] == ["a.png"]


# ------------------------------------------------------------------ photos Pillow cannot read


def test_phone_and_camera_photos_are_named_in_the_warning(tmp_path):
    """iPhone `.HEIC` files (and cameras' raw files) were skipped without a word: the warning
    counted only the endings Pillow registers."""
    unreadable = [e for e in (".heic", ".dng", ".cr2") if e not in _pillow_endings()]
    if not unreadable:
        pytest.skip("a Pillow plugin here reads these formats")
    folder = tmp_path / "phone"
    write_png(folder / "a.png")
    for ending in unreadable:
        (folder / f"IMG_0001{ending.upper()}").write_bytes(b"\0" * 24)
    with pytest.warns(UserWarning) as caught:
        _, paths = load_image_folder(folder, "none", argument_names=COMMAND_LINE_NAMES)
    assert [p.name for p in paths] == ["a.png"]
    (text,) = [m for m in messages(caught) if "skipped" in m]
    counts = ", ".join(f"1 {e}" for e in sorted(unreadable))
    assert text.startswith("`--images` ")
    assert f"skipped {len(unreadable)} files Pillow cannot read here ({counts}:" in text
    assert "convert them to JPEG or PNG" in text


# ------------------------------------------------------------------ animated images


def write_animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:])


def test_animated_images_give_their_first_frame_with_a_warning(tmp_path):
    """An animated GIF was read as its first frame without a word."""
    folder = tmp_path / "gifs"
    folder.mkdir()
    write_animated_gif(folder / "anim.gif")
    write_png(folder / "still.png", "green")
    with pytest.warns(UserWarning, match=r"1 of 2 images have several frames") as caught:
        images, paths = load_image_folder(folder, "none")
    assert [p.name for p in paths] == ["anim.gif", "still.png"]
    assert images[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]  # frame 0: red
    (text,) = [m for m in messages(caught) if "several frames" in m]
    assert "anim.gif" in text and "only the first frame of each is read" in text

    dataset = ImageFolderDataset(folder, "none")
    for index in range(len(dataset)):
        dataset[index]
    assert dataset.first_frames == ["anim.gif"]
    with pytest.warns(UserWarning, match=r"several frames \(animated images .*anim\.gif"):
        dataset.warn_transparent()


def test_a_callable_transform_gets_no_frame_warning(tmp_path):
    """A callable gets the image as PIL opened it: its frames are its own to read."""
    folder = tmp_path / "gifs"
    folder.mkdir()
    write_animated_gif(folder / "anim.gif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image_folder(folder, lambda image: torch.zeros(3, 8, 8))


# ------------------------------------------------------------------ torch.save files as the model

UNPICKLED: list[str] = []


class Recorder(nn.Linear):
    """A module that records being unpickled: the loader must never do that."""

    def __setstate__(self, state):
        UNPICKLED.append("Recorder")
        super().__setstate__(state)


def test_a_pickled_whole_model_as_spec_is_named_so(tmp_path):
    """`torch.save(model)` given as `--model` was "not a TorchScript file (PytorchStreamReader
    failed locating file constants.pkl ...)", with nothing on what to do."""
    UNPICKLED.clear()
    whole = tmp_path / "whole.pt"
    torch.save(Recorder(2, 2), whole)
    with pytest.raises(ValueError) as raised:
        load_model(str(whole), argument_names=COMMAND_LINE_NAMES)
    text = str(raised.value)
    assert text.startswith(f"`--model` (spec) {str(whole)!r} is not a TorchScript file but a")
    assert "torch.save(model, path)" in text and "never unpickled" in text
    assert "torch.save(model.state_dict(), path)" in text
    assert "as --weights, with --model 'package.module:factory'" in text
    assert "constants.pkl" not in text
    assert UNPICKLED == []  # told apart with weights_only=True alone


@pytest.mark.parametrize("layout", ["plain", "checkpoint", "legacy"])
def test_a_state_dict_as_spec_is_named_so(tmp_path, layout):
    """A state dict given as `--model` (the model's weights without its architecture)."""
    state_dict = nn.Linear(2, 2).state_dict()
    path = tmp_path / "sd.pt"
    if layout == "plain":
        torch.save(state_dict, path)
    elif layout == "checkpoint":
        torch.save({"state_dict": state_dict, "epoch": 3}, path)
    else:
        torch.save(state_dict, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError) as raised:
        load_model(str(path), argument_names=COMMAND_LINE_NAMES)
    text = str(raised.value)
    assert text.startswith(f"`--model` (spec) {str(path)!r} is a state dict")
    assert "Give it as --weights, with --model 'package.module:factory'" in text
    with pytest.raises(ValueError, match=r"`spec` .* is a state dict.*as `weights`, with `spec`"):
        load_model(path)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream
def test_torchscript_files_still_load(tmp_path):
    model = nn.Linear(2, 2)
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(model), path)
    loaded = load_model(str(path))
    x = torch.randn(3, 2)
    torch.testing.assert_close(loaded(x), model(x))


# ------------------------------------------------------------------ --out that cannot be written


def refuse_scratch_files(monkeypatch, number: int, reason: str) -> None:
    def mkstemp(prefix="", dir=None, **_):
        raise OSError(number, reason, str(Path(dir) / f"{prefix}vz4vny_r"))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_a_read_only_folder_is_named_not_the_scratch_file(tmp_path, monkeypatch):
    """`--out rofs/s.csv` on a read-only disk named '/.../rofs/.captum-ext-check.vz4vny_r',
    a file the user never heard of."""
    monkeypatch.chdir(tmp_path)
    Path("rofs").mkdir()
    refuse_scratch_files(monkeypatch, errno.EROFS, "Read-only file system")
    with pytest.raises(OSError) as raised:
        check_writable("rofs/s.csv", folder=False)
    assert raised.value.errno == errno.EROFS and raised.value.filename == "rofs"
    with pytest.raises(ValueError) as refused:
        writable_path_argument("rofs/new/s.csv", "checkpoint")
    assert str(refused.value) == (
        "`checkpoint` 'rofs/new/s.csv' cannot be written (Read-only file system: 'rofs'); "
        "nothing was trained."
    )

    from captum_ext.viz.build import OutputError, check_output

    with pytest.raises(OutputError) as output:
        check_output(Path("rofs/s.csv"), folder=False)
    assert str(output.value) == (
        "`--out` 'rofs/s.csv' cannot be written (Read-only file system: 'rofs')."
    )
    assert ".captum-ext-check" not in str(output.value)


def test_a_folder_without_permission_stays_a_permission_error(tmp_path, monkeypatch):
    refuse_scratch_files(monkeypatch, errno.EACCES, "Permission denied")
    with pytest.raises(PermissionError) as raised:
        check_writable(tmp_path / "report", folder=True)
    assert raised.value.filename == str(tmp_path)  # the nearest existing folder


def test_scratch_check_in_the_current_folder_names_it_in_full(tmp_path, monkeypatch):
    """`--out s.csv` in a read-only current folder: '.' would say little; its full path."""
    monkeypatch.chdir(tmp_path)
    refuse_scratch_files(monkeypatch, errno.EROFS, "Read-only file system")
    with pytest.raises(OSError) as raised:
        check_writable("s.csv", folder=False)
    assert raised.value.filename == str(tmp_path)


def test_a_cameras_multi_picture_jpeg_is_not_called_animated(tmp_path):
    """Phone and camera JPEGs often hold a second picture (a preview or depth map: MPO),
    which Pillow reports as animated; the first frame is the photo, nothing to warn of."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    photo = Image.new("RGB", (16, 12), (200, 30, 30))
    preview = Image.new("RGB", (8, 6), (0, 0, 0))
    photo.save(folder / "photo.jpg", format="MPO", save_all=True, append_images=[preview])
    assert Image.open(folder / "photo.jpg").is_animated  # Pillow's view of it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, _ = load_image_folder(folder, "none")
    assert tuple(images.shape) == (1, 3, 12, 16)
