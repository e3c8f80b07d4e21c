"""Faults and bad input in the long-running machinery (issue 12, "Hardening"): corrupted and
incomplete checkpoints of every trainer, file modes under the umask, temporary files left by
a killed run, failures in the middle of TIE.fit, progress output in logs, and an output
location the CLI cannot write."""

from __future__ import annotations

import copy
import errno
import io
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from _helpers import assert_model_unchanged, make_tiny_cnn, model_snapshot
from torch.utils.data import DataLoader, TensorDataset

import captum_ext.inversion.tie as tie_module
from captum_ext._utils.training import (
    CHECKSUM_KEY,
    atomic_path,
    load_checkpoint,
    progress_bar,
    save_checkpoint,
)
from captum_ext.attr import ActivationMatchingMask
from captum_ext.inversion import ConditionedGenerator, NetworkInversion
from captum_ext.inversion.tie import TIE

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 8, 8)
CLASSES = 5
TIE_SMALL = {
    "input_shape": SHAPE,
    "generator_steps": 2,
    "generator_batch_size": 6,
    "latent_dim": 8,
    "generator_width": 8,
    "batch_size": 16,
}


def tiny_data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=gen), torch.arange(n) % CLASSES


# --------------------------------------------------------------------------- checkpoints
def _inversion_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    generator = ConditionedGenerator(CLASSES, SHAPE, latent_dim=8, width=8, preprocess=(0.5, 0.25))
    classifier = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES)
    NetworkInversion(classifier, generator, batch_size=4, seed=1).fit(
        2, progress=False, checkpoint=path
    )


def _mask_checkpoint(path: Path) -> None:
    model = make_tiny_cnn()
    images = torch.randn(
        6, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    data = DataLoader(TensorDataset(images, torch.zeros(6, dtype=torch.long)), batch_size=3)
    ActivationMatchingMask(model, ["features.1", "head"]).fit(
        data, epochs=1, progress=False, checkpoint=path
    )


def _tie_checkpoint(path: Path) -> None:
    tie = TIE(make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES), **TIE_SMALL)
    tie.fit(*tiny_data(), epochs=1, progress=False, checkpoint=path)


TRAINERS = {
    "NetworkInversion": _inversion_checkpoint,
    "ActivationMatchingMask": _mask_checkpoint,
    "TIE": _tie_checkpoint,
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if t.dtype.is_floating_point else flat


def _same(a, b) -> bool:
    """Equal content, independently of the checksum code: tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(_bits(a), _bits(b))
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and list(a.keys()) == list(b.keys())
            and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN in the logs
    return type(a) is type(b) and a == b


def _records(data: bytes) -> list[tuple[str, int, int]]:
    """(name, first byte, size) of every stored record of a torch.save zip file."""
    out = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 :][:4])
            start = info.header_offset + 30 + name_len + extra_len
            out.append((info.filename, start, info.compress_size))
    return out


@pytest.mark.slow  # three small trainers, then some fifty loads of their checkpoints
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_corrupted_checkpoint_is_refused_naming_the_file(tmp_path, trainer):
    path = tmp_path / "ckpt.pt"
    TRAINERS[trainer](path)
    good = path.read_bytes()
    original = load_checkpoint(path)
    assert isinstance(torch.load(path, weights_only=True)[CHECKSUM_KEY], str)  # plain dict
    # a byte in the middle of every stored tensor: always an error (the checksum covers
    # every tensor byte torch.load reads back)
    records = _records(good)
    targeted = [start + size // 2 for name, start, size in records if size > 0 and "/data/" in name]
    assert len(targeted) >= 3
    # offsets spread over the whole file, and the middle of the pickle: an error, or exactly
    # the original content (a flipped byte of the pickle may land on a memo index, whose
    # change leaves the loaded content as it was)
    spread = list(range(7, len(good), max(1, len(good) // 25)))
    spread += [start + size // 2 for name, start, size in records if name.endswith("data.pkl")]
    for offset in targeted + spread:
        bad = bytearray(good)
        bad[offset] ^= 0x5A
        path.write_bytes(bytes(bad))
        try:
            state = load_checkpoint(path)
        except ValueError as error:
            assert str(path) in str(error), (offset, str(error))
        else:
            assert offset not in targeted, f"corruption at byte {offset} was accepted"
            assert _same(dict(state), dict(original)), f"byte {offset}: content changed silently"


def test_a_corrupted_checkpoint_stops_resume_of_each_trainer(tmp_path):
    # the end-to-end path: fit(resume=True) of TIE on a corrupted pool tensor
    path = tmp_path / "tie.pt"
    _tie_checkpoint(path)
    data = path.read_bytes()
    name, start, size = next(r for r in _records(data) if r[2] > 1000 and "/data/" in r[0])
    bad = bytearray(data)
    bad[start + size // 2] ^= 0x01
    path.write_bytes(bytes(bad))
    tie = TIE(make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES), **TIE_SMALL)
    before = {k: v.clone() for k, v in tie.model.state_dict().items()}
    with pytest.raises(ValueError, match="corrupted") as caught:
        tie.fit(*tiny_data(), epochs=1, progress=False, checkpoint=path, resume=True)
    assert str(path) in str(caught.value)
    assert all(torch.equal(v, tie.model.state_dict()[k]) for k, v in before.items())


def test_missing_entry_is_a_value_error_naming_the_file(tmp_path):
    path = save_checkpoint({"format": "x", "step": 3}, tmp_path / "c.pt")
    state = load_checkpoint(path)
    assert state["step"] == 3
    with pytest.raises(ValueError, match=r"has no 'epoch' entry") as caught:
        state["epoch"]
    assert str(path) in str(caught.value)
    with pytest.raises(ValueError, match=r"lacks the entries \['epoch'\]"):
        load_checkpoint(path, keys=("step", "epoch"))


def test_incomplete_tie_checkpoint_is_a_value_error(tmp_path):
    path = tmp_path / "tie.pt"
    _tie_checkpoint(path)
    state = dict(load_checkpoint(path))
    del state["pool"]
    save_checkpoint(state, path)  # a valid checksum over incomplete content
    tie = TIE(make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES), **TIE_SMALL)
    with pytest.raises(ValueError, match=r"lacks the entries \['pool'\]"):
        tie.fit(*tiny_data(), epochs=1, progress=False, checkpoint=path, resume=True)


def test_checkpoint_without_checksum_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "captum_ext.TIE/1", "epoch": 1}, path)
    with pytest.raises(ValueError, match="has no checksum") as caught:
        load_checkpoint(path, argument="resume")
    assert "`resume`" in str(caught.value) and str(path) in str(caught.value)


# --------------------------------------------------------------------------- files
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_get_the_mode_of_any_new_file(tmp_path, umask, mode):
    from captum_ext.viz import Report

    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "table.csv") as temp:
            temp.write_text("a,b\n")
        save_checkpoint({"step": 1}, tmp_path / "ckpt.pt")
        index = Report("modes").write(tmp_path / "report")
        with open(tmp_path / "plain.txt", "w") as file:  # what any other file gets
            file.write("x")
    finally:
        os.umask(old)
    for file in (tmp_path / "table.csv", tmp_path / "ckpt.pt", index, tmp_path / "plain.txt"):
        assert file.stat().st_mode & 0o777 == mode, file.name


def test_temporaries_left_by_a_killed_write_are_removed_by_the_next(tmp_path):
    stale = [tmp_path / ".ckpt.pt.ab12_XYZ.tmp", tmp_path / ".ckpt.pt.00000000.tmp"]
    kept = [tmp_path / ".other.pt.ab12cd34.tmp", tmp_path / ".ckpt.pt.notes", tmp_path / "x.tmp"]
    for file in stale + kept:
        file.write_bytes(b"partial")
    save_checkpoint({"step": 1}, tmp_path / "ckpt.pt")
    assert not any(file.exists() for file in stale)
    assert all(file.exists() for file in kept)


def test_full_disk_leaves_no_temporary_and_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, target)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert load_checkpoint(target)["step"] == 1


# --------------------------------------------------------------------------- progress
def test_progress_off_a_terminal_is_a_few_plain_lines(monkeypatch):
    stream = io.StringIO()
    bar = progress_bar(200, True, desc="fitting", unit="step", file=stream)
    for _ in range(200):
        bar.update(1)
        bar.set_postfix(loss="0.5", refresh=False)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split("%")[0].split()[-1] for line in lines] == ["0", "25", "50", "75", "100"]
    assert lines[-1].startswith("fitting: 100% (200/200 step)")
    # stderr of a CI job: a pipe, not a terminal (the default stream)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    from captum_ext.viz.report import _progress_bar

    with _progress_bar(4, "maps", True) as images:
        images.update(4)
    assert "\r" not in __import__("sys").stderr.getvalue()
    assert len(__import__("sys").stderr.getvalue().splitlines()) == 2  # 0 % and 100 %


def test_trainer_progress_in_a_log_has_no_carriage_returns(capsys):
    torch.manual_seed(0)
    generator = ConditionedGenerator(CLASSES, SHAPE, latent_dim=8, width=8, preprocess=(0.5, 0.25))
    classifier = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES)
    NetworkInversion(classifier, generator, batch_size=4, seed=1).fit(40, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert 2 <= len(err.splitlines()) <= 5


# --------------------------------------------------------------------------- TIE.fit
def _tie_state(tie: TIE) -> dict:
    return {
        "classifier": model_snapshot(tie.model),
        "generator": model_snapshot(tie.generator),
        "optimizer": copy.deepcopy(tie.optimizer.state_dict()),
        "generator_optimizer": copy.deepcopy(tie.inversion.optimizer.state_dict()),
        "pool": None if tie.pool is None else tie.pool.clone(),
        "log": {k: list(v) for k, v in tie.log.items()},
        "epoch": tie.epoch,
        "generator_history": {k: list(v) for k, v in tie.inversion.history.items()},
    }


def _assert_tie_unchanged(tie: TIE, before: dict) -> None:
    assert_model_unchanged(tie.model, before["classifier"])
    assert_model_unchanged(tie.generator, before["generator"])
    assert _same(tie.optimizer.state_dict()["state"], before["optimizer"]["state"])
    generator_optimizer = tie.inversion.optimizer.state_dict()["state"]
    assert _same(generator_optimizer, before["generator_optimizer"]["state"])
    assert (tie.pool is None) == (before["pool"] is None)
    if tie.pool is not None:
        assert torch.equal(tie.pool, before["pool"])
    assert _same(tie.log, before["log"]) and tie.epoch == before["epoch"]
    assert _same(tie.inversion.history, before["generator_history"])


def test_tie_fit_refuses_non_finite_inputs_before_training():
    x, y = tiny_data()
    x[3, 0, 2, 2] = float("nan")
    x[7, 1, 0, 0] = float("inf")
    tie = TIE(make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES), **TIE_SMALL)
    before = _tie_state(tie)
    with pytest.raises(ValueError, match=r"`inputs` must be finite: 2 of 40 images"):
        tie.fit(x, y, epochs=1, progress=False)
    _assert_tie_unchanged(tie, before)
    assert tie.pool is None


class _NaNAfter:
    """cross_entropy that returns NaN from its ``n``-th call on (a NaN made in training)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(*args, **kwargs)
        return loss * float("nan") if self.calls >= self.n else loss


@pytest.mark.parametrize("failure", ["nan_in_training", "generator_raises", "interrupt"])
def test_failed_tie_fit_leaves_every_model_as_it_was(monkeypatch, failure):
    user = make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES)
    user.train()  # BatchNorm statistics would move in train mode
    user_before = model_snapshot(user)
    tie = TIE(user, **TIE_SMALL)
    x, y = tiny_data()
    tie.fit(x, y, epochs=1, progress=False)  # a first fit that succeeds
    before = _tie_state(tie)
    if failure == "nan_in_training":
        fake = type("F", (), {"cross_entropy": staticmethod(_NaNAfter(2))})
        monkeypatch.setattr(tie_module, "F", fake)
        expected = pytest.raises(FloatingPointError, match="training loss became nan")
    else:
        error = (
            RuntimeError("disk on fire") if failure == "generator_raises" else KeyboardInterrupt()
        )

        def broken(*args, **kwargs):
            raise error

        monkeypatch.setattr(tie.inversion, "fit", broken)
        expected = pytest.raises(type(error))
    with expected:
        tie.fit(x, y, epochs=2, progress=False)
    _assert_tie_unchanged(tie, before)
    assert_model_unchanged(user, user_before)
    monkeypatch.undo()
    # and the TIE trains on as if the failed call had never happened
    tie.fit(x, y, epochs=1, progress=False)
    twin = TIE(make_tiny_cnn(dtype=torch.float32, num_classes=CLASSES), **TIE_SMALL)
    twin.fit(x, y, epochs=1, progress=False)
    twin.fit(x, y, epochs=1, progress=False)
    assert _same(tie.log, twin.log)
    assert _same(tie.model.state_dict(), twin.model.state_dict())


# --------------------------------------------------------------------------- CLI
def _no_work(monkeypatch):
    import captum_ext.bundled as bundled
    import captum_ext.data as data

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before `--out` was checked")

    monkeypatch.setattr(bundled, "load_bundled_model", forbidden)
    monkeypatch.setattr(data, "load_sample_digits", forbidden)


@pytest.mark.parametrize("command", ["report", "score"])
def test_unwritable_out_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, command):
    from captum_ext.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "sub" / ("scores.csv" if command == "score" else "report")
    _no_work(monkeypatch)
    assert main([command, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"captum-ext {command}: error: `--out` {str(out)!r} cannot be written")


def _full_disk(monkeypatch):
    real = os.replace

    def replace(source, target, *args, **kwargs):
        if os.fspath(target).endswith((".csv", ".html")):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(target))
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.slow  # the bundled model on two digits, once per command
@pytest.mark.parametrize("command", ["report", "score"])
def test_full_disk_is_one_line_naming_out_and_leaves_no_temporary(
    tmp_path, monkeypatch, capsys, command
):
    from captum_ext.cli import main

    folder = tmp_path / "out"
    folder.mkdir()
    leftover = folder / (
        ".index.html.k1ll3d00.tmp" if command == "report" else ".s.csv.k1ll3d00.tmp"
    )
    leftover.write_text("from a run that was killed")
    out = folder if command == "report" else folder / "s.csv"
    extra = ["--sections", "contrastive"] if command == "report" else ["--scores", "softmax"]
    _full_disk(monkeypatch)
    argv = [command, "--out", str(out), "--limit", "2", "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`--out`" in err and "No space left" in err
    assert not list(folder.glob(".*.tmp"))  # the stale one removed, the new one cleaned up


@pytest.mark.slow  # the bundled model on two digits
def test_score_refuses_too_few_class_names(tmp_path, capsys):
    from captum_ext.cli import main

    names = tmp_path / "names.txt"
    names.write_text("zero\none\ntwo\n")
    out = tmp_path / "s.csv"
    argv = ["score", "--classes", str(names), "--limit", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "captum-ext score: error: `--classes` has 3 names but the model has 10 outputs."
    assert not out.exists()


@pytest.mark.slow  # the bundled model, contrastive maps of 3 then 1 digits
def test_report_again_removes_only_its_own_stale_figures(tmp_path, capsys):
    from captum_ext.cli import main

    out = tmp_path / "out"
    mine = [out / "holiday.png", out / "images" / "mine.png", out / "images" / "contrastive.txt"]
    for file in mine:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"the user's")
    argv = ["report", "--out", str(out), "--sections", "contrastive"]
    assert main([*argv, "--limit", "3"]) == 0
    first = capsys.readouterr()
    assert "\r" not in first.err and "100%" in first.err  # plain progress lines in a log
    assert len(list((out / "images").rglob("*.png"))) > 4
    assert main([*argv, "--limit", "1", "--no-progress"]) == 0
    html = (out / "index.html").read_text()
    pngs = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")}
    linked = {p for p in pngs if f'src="{p}"' in html}
    assert pngs - {"images/mine.png"} == linked and linked
    assert all(file.read_bytes() == b"the user's" for file in mine)


@pytest.mark.slow  # the bundled model, contrastive maps of 3 then 1 digits
def test_figures_of_a_failed_report_run_are_removed_by_the_next(tmp_path, monkeypatch, capsys):
    """A run interrupted after a section wrote its figures lists them, so that the next run
    into the folder removes those it does not use (before: they stayed for good)."""
    import dataclasses

    from captum_ext.cli import main
    from captum_ext.viz import build

    out = tmp_path / "out"
    mine = out / "images" / "mine.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's")
    spec = build.SECTION_REGISTRY["contrastive"]

    def built_then_interrupted(*args):
        spec.build(*args)
        raise KeyboardInterrupt

    interrupted = dataclasses.replace(spec, build=built_then_interrupted)
    argv = ["report", "--out", str(out), "--sections", "contrastive", "--no-progress"]
    with monkeypatch.context() as patch:
        patch.setitem(build.SECTION_REGISTRY, "contrastive", interrupted)
        assert main([*argv, "--limit", "3"]) == 130  # Ctrl-C: "interrupted"
    left = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")}
    manifest = (out / "images" / ".captum-ext-figures").read_text().split()
    assert len(left) > 4 and set(manifest) == left - {"images/mine.png"}
    assert main([*argv, "--limit", "1"]) == 0
    html = (out / "index.html").read_text()
    pngs = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")}
    assert pngs - {"images/mine.png"} == {p for p in pngs if f'src="{p}"' in html}
    assert len(pngs) < len(left) and mine.read_bytes() == b"the user's"


def test_report_write_removes_only_figures_its_previous_page_listed(tmp_path):
    import numpy as np

    from captum_ext.viz import Report, Section, save_png

    out = tmp_path / "out"
    own = [save_png(np.zeros((4, 4, 3)), out / "images" / "maps" / f"{i}.png") for i in range(3)]
    outside = save_png(np.ones((4, 4, 3)), tmp_path / "elsewhere.png")  # copied into out
    users = [out / "images" / "mine.png", out / "images" / "maps" / "keep.png", out / "a.png"]
    for file in users:
        file.write_bytes(b"the user's")

    def write(paths):
        report = Report("twice")
        section = Section("Maps", "")
        section.add_row("row", [(str(i), p) for i, p in enumerate(paths)])
        report.add_section(section)
        return report.write(out)

    write([*own, outside])
    copied = out / "images" / "maps" / "elsewhere.png"
    assert copied.is_file()
    write(own[:1])
    assert own[0].is_file() and not own[1].exists() and not own[2].exists()
    assert not copied.exists()
    assert all(file.read_bytes() == b"the user's" for file in users)
    assert (out / "images" / ".captum-ext-figures").read_text() == "images/maps/0.png\n"


def test_plain_progress_says_the_time_so_far_and_left(monkeypatch):
    """A log of a long run (the report's inversion at 224 px: minutes between lines) says how
    long it took so far and, at the pace so far, about how long is left."""
    clock = iter([100.0, 160.0, 220.0, 280.0, 340.0])  # start, then one line per quarter
    monkeypatch.setattr("captum_ext._utils.training.time.monotonic", lambda: next(clock))
    stream = io.StringIO()
    bar = progress_bar(8, True, desc="inversion", unit="step", file=stream)
    for _ in range(8):
        bar.update(1)
    bar.close()
    assert stream.getvalue().splitlines() == [
        "inversion:   0% (0/8 step)",
        "inversion:  25% (2/8 step), 60 s, about 3.0 min left",
        "inversion:  50% (4/8 step), 2.0 min, about 2.0 min left",
        "inversion:  75% (6/8 step), 3.0 min, about 60 s left",
        "inversion: 100% (8/8 step), 4.0 min",
    ]


def test_plain_progress_of_a_run_under_a_second_has_no_clock(monkeypatch):
    clock = iter([0.0, 0.2, 0.4])
    monkeypatch.setattr("captum_ext._utils.training.time.monotonic", lambda: next(clock))
    stream = io.StringIO()
    bar = progress_bar(2, True, desc="scoring", unit="batch", file=stream)
    bar.update(1)
    bar.update(1)
    bar.close()
    assert stream.getvalue().splitlines() == [
        "scoring:   0% (0/2 batch)",
        "scoring:  50% (1/2 batch)",
        "scoring: 100% (2/2 batch)",
    ]
