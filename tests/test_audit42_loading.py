"""Audit 42 (loading): ``--out`` among the ``--images``, ``{"model": ...}`` checkpoints,
directories given as files, and TIFFs turned by their orientation tag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captum_ext.cli import main
from captum_ext.data import load_image_folder, load_state_dict_file
from captum_ext.data.loading import REPORT_MARKER, read_class_names

QUICK = ["--transform", "digits", "--no-progress"]
REPORT = ["report", "--sections", "contrastive", *QUICK]


def write_pngs(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"class_{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (20, 20), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i}.png")


def scored_rows(capsys, images: Path, csv: Path) -> int:
    code = main(["score", "--images", str(images), "--scores", "softmax", *QUICK]
                + ["--out", str(csv)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    return len(csv.read_text().strip().splitlines()) - 1


# ------------------------------------------------------------------ report --out in --images


def test_report_out_in_an_image_folder_inside_images_is_refused(tmp_path, capsys):
    """`--out photos/class_0` dropped the images of class_0 from the report, silently, and
    the marker left there dropped them from every later run (`score` included)."""
    photos = tmp_path / "photos"
    write_pngs(photos, 4)
    out = photos / "class_0"
    assert main([*REPORT, "--images", str(photos), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "`--out`" in err and "inside `--images`" in err and "holds 2 of its images" in err, err
    assert not (out / REPORT_MARKER).exists() and not (out / "index.html").exists()
    assert scored_rows(capsys, photos, tmp_path / "s.csv") == 4


def test_report_out_reaching_images_through_a_link_is_refused(tmp_path, capsys):
    """The check walked `--out` without following links, which the loader follows: a
    folder holding only a link to images elsewhere passed, and its marker hid them."""
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    write_pngs(photos, 2)
    write_pngs(elsewhere, 4)
    out = photos / "linked"
    out.mkdir()
    (out / "class_0").symlink_to(elsewhere / "class_0", target_is_directory=True)
    assert main([*REPORT, "--images", str(photos), "--out", str(out)]) == 2
    assert "holds 2 of its images" in capsys.readouterr().err
    assert not (out / REPORT_MARKER).exists()


@pytest.mark.parametrize("where", [".hidden", "old_report/images"])
def test_report_out_where_the_loader_reads_nothing_is_taken(tmp_path, capsys, where):
    """A hidden folder, or one inside an earlier report's folder, is never read as input:
    an `--out` there hides nothing and is taken."""
    photos = tmp_path / "photos"
    write_pngs(photos, 2)
    (photos / "old_report").mkdir()
    (photos / "old_report" / REPORT_MARKER).write_text("")
    out = photos / where
    write_pngs(out, 2)  # pictures there, which no read of `photos` takes
    assert main([*REPORT, "--images", str(photos), "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "index.html").exists()


def test_report_out_holding_images_is_refused(tmp_path, capsys):
    """`--images data/photos --out data`: the marker in `data` hid the photos from every
    later run on `data` or a folder above it."""
    data = tmp_path / "data"
    write_pngs(data / "photos", 2)
    assert main([*REPORT, "--images", str(data / "photos"), "--out", str(data)]) == 2
    err = capsys.readouterr().err
    assert "holds the `--images` folder" in err, err
    assert not (data / REPORT_MARKER).exists()


def test_report_out_that_is_the_images_folder_says_so(tmp_path, capsys, monkeypatch):
    """`--images . --out .` answered "'.' holds no images" for a folder of images."""
    for i in range(2):
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert main([*REPORT, "--images", ".", "--out", "."]) == 2
    err = capsys.readouterr().err
    assert "`--out` '.' is the `--images` folder" in err, err
    assert "holds no images" not in err
    assert not (tmp_path / REPORT_MARKER).exists()


def test_report_into_an_empty_folder_inside_images_still_works(tmp_path, capsys):
    """A new, empty folder inside --images is fine (as the default `--out report` is)."""
    photos = tmp_path / "photos"
    write_pngs(photos, 2)
    out = photos / "report"
    out.mkdir()
    code = main([*REPORT, "--images", str(photos), "--out", str(out), "--limit", "2"])
    assert code == 0, capsys.readouterr().err
    assert "2 images from" in (out / "index.html").read_text(encoding="utf-8")
    assert scored_rows(capsys, photos, tmp_path / "s.csv") == 2


# ------------------------------------------------------------------ score --out an image


def test_score_out_naming_an_input_image_is_refused(tmp_path, capsys):
    """`score --out photos/class_0/0.png` read the image, then wrote the CSV over it."""
    photos = tmp_path / "photos"
    write_pngs(photos, 2)
    target = photos / "class_0" / "0.png"
    before = target.read_bytes()
    code = main(["score", "--images", str(photos), "--scores", "softmax", *QUICK]
                + ["--out", str(target)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "`--out`" in err and "one of the `--images` files" in err, err
    assert target.read_bytes() == before
    elsewhere = tmp_path / "picture.JPG"  # an image that is not an input
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(elsewhere, format="JPEG")
    before = elsewhere.read_bytes()
    assert main(["score", "--limit", "2", "--scores", "softmax", "--no-progress"]
                + ["--out", str(elsewhere)]) == 2  # fmt: skip
    assert "is an existing image file" in capsys.readouterr().err
    assert elsewhere.read_bytes() == before


# ------------------------------------------------------------------ checkpoints, directories


def test_checkpoint_with_its_state_dict_under_model_loads(tmp_path):
    """timm / DeiT / detectron2 checkpoints, {"model": state_dict, "epoch": ...}, were
    refused with "save model.state_dict() itself"."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": net.state_dict(), "epoch": 3, "optimizer": {}, "args": [1]}, path)
    state = load_state_dict_file(path)
    assert state.keys() == net.state_dict().keys()
    for name, value in net.state_dict().items():
        assert torch.equal(state[name], value), name
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    other.load_state_dict(state)
    x = torch.randn(5, 3)
    net.eval()
    other.eval()
    assert torch.equal(net(x), other(x))


def test_model_entry_that_is_no_state_dict_is_still_refused(tmp_path):
    path = tmp_path / "config.pt"
    torch.save({"model": {"depth": 3}, "epoch": 1}, path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict_file(path)


def test_a_directory_as_weights_or_classes_says_it_is_a_directory(tmp_path, capsys):
    """A folder given as --weights or --classes was "file not found"."""
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"`weights` '.*folder' is a directory; expected"):
        load_state_dict_file(folder)
    with pytest.raises(ValueError, match=r"`path` '.*folder' is a directory; expected a text"):
        read_class_names(folder)
    own = ["--model", "captum_ext.bundled:load_bundled_model"]
    for option in (["--weights", str(folder), *own], ["--classes", str(folder)]):
        code = main(["score", *option, "--out", str(tmp_path / "s.csv"), "--no-progress"])
        assert code == 2
        err = capsys.readouterr().err
        assert f"`{option[0]}`" in err and "is a directory" in err, err
        assert "not found" not in err


# ------------------------------------------------------------------ turned grey TIFFs


def _pixels(mode: str) -> np.ndarray:
    grey = (np.arange(35, dtype=np.uint8).reshape(5, 7) * 7).astype(np.uint8)
    if mode == "I;16":
        return grey.astype(np.uint16) * 250
    if mode == "RGBA":
        return np.stack([grey, 255 - grey, grey // 2, np.full_like(grey, 255)], axis=-1)
    return grey


@pytest.mark.parametrize("mode", ["L", "I;16", "RGBA"])
def test_tiffs_turned_by_their_orientation_tag_match_the_png(tmp_path, mode):
    """A grey (L, I;16) TIFF with orientation tag 5 to 8 came out scrambled, silently:
    Pillow mapped the file at the turned size. Each orientation reads as the PNG of the same
    pixels and tag does."""
    pixels = _pixels(mode)
    for orientation in range(1, 9):
        image = Image.fromarray(pixels)
        exif = image.getexif()
        exif[0x0112] = orientation
        loaded = {}
        for ending in ("png", "tif"):
            folder = tmp_path / f"{mode.replace(';', '')}_{orientation}_{ending}"
            folder.mkdir()
            image.save(folder / f"x.{ending}", exif=exif.tobytes())
            loaded[ending], _ = load_image_folder(folder, "none")
        turned = orientation in (5, 6, 7, 8)
        assert loaded["png"].shape[-2:] == ((7, 5) if turned else (5, 7))
        assert torch.equal(loaded["tif"], loaded["png"]), (mode, orientation)
