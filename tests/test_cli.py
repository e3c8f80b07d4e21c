"""The ``captum-ext`` command line: end to end in subprocesses, and argument errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_ext.cli import main

TESTS = Path(__file__).parent
IMG_SRC = re.compile(r'<img src="([^"]+)"')


def run_cli(*args: str, cwd: Path, executable: list[str] | None = None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    command = (executable or [sys.executable, "-m", "captum_ext"]) + list(args)
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def check_report(index: Path, contrastive: bool = True) -> str:
    assert index.is_file()
    html = index.read_text(encoding="utf-8")
    sources = IMG_SRC.findall(html)
    assert sources
    for src in sources:
        path = index.parent / urllib.parse.unquote(src)
        assert path.is_file(), src
        with Image.open(path) as image:
            assert np.asarray(image, dtype=float).std() > 0, f"{src} is blank"
    if contrastive:
        assert "ContrastCAM" in html and "CounterfactualCAM" in html
    return html


def default_figures(n: int, trust: bool = True, bundled: bool = True) -> int:
    """Pictures of a default report on n labelled images: contrastive (5 per image and a
    colour bar), VOICE (4 per image and a colour bar), metrics (the plot of the curves and one
    example row of 4), trust (the scatter and retention plots, a colour bar and 3 per
    least-trusted image, 10 at most); for the bundled model
    also masks (3 per image, and 2 circuit plots for each of the first 5) and inversion (the
    sample grid)."""
    figures = (5 * n + 1) + (4 * n + 1) + 1 + 4 + (2 + 1 + 3 * min(n, 10) if trust else 0)
    if bundled:
        figures += 3 * n + 2 * min(n, 5) + 1
    return figures


def write_pngs(folder: Path, count: int, size=(20, 20), mode="L") -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"class_{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(sub / f"{i}.png")


def test_report_with_bundled_model_and_digits(tmp_path):
    out = tmp_path / "report"
    result = run_cli("report", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    html = check_report(out / "index.html")
    assert len(IMG_SRC.findall(html)) == default_figures(40)
    assert "Why 0, rather than" in html
    assert "Uncertainty (VOICE, 9 contrasts)" in html and "deletion AUC" in html
    assert str(out / "index.html") in result.stdout
    assert "Traceback" not in result.stderr


def test_report_default_output_folder_and_console_script(tmp_path):
    script = shutil.which("captum-ext")
    if script is None:
        pytest.skip("the captum-ext console script is not on PATH")
    result = run_cli("report", "--limit", "3", "--no-progress", cwd=tmp_path, executable=[script])
    assert result.returncode == 0, result.stderr
    html = check_report(tmp_path / "report" / "index.html")
    assert len(IMG_SRC.findall(html)) == default_figures(3)
    assert result.stderr == ""  # --no-progress


def test_report_with_torchscript_model_and_image_folder(tmp_path):
    sys.path.insert(0, str(TESTS))
    try:
        import _factories
    finally:
        sys.path.remove(str(TESTS))
    model_path = tmp_path / "grey.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(_factories.grey_cnn().eval()), str(model_path))
    images = tmp_path / "pngs"
    write_pngs(images, 5)
    classes = tmp_path / "classes.txt"
    classes.write_text("class_0\nclass_1\nthird\nfourth\n")
    out = tmp_path / "ts-report"
    result = run_cli(
        "report",
        "--model",
        str(model_path),
        "--images",
        str(images),
        "--transform",
        "none",
        "--layer",
        "features.2",
        "--classes",
        str(classes),
        "--batch-size",
        "2",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    html = check_report(out / "index.html")
    # GradTrust reads the compiled final linear layer through an eager copy: all four
    # default sections are there
    assert len(IMG_SRC.findall(html)) == default_figures(5, trust=True, bundled=False)
    assert "left out" not in result.stderr and "Which predictions can I trust?" in html
    assert "class_0/0.png" in html and "true class class_0" in html
    assert "features.2" in html


def test_report_with_factory_spec_picks_the_layer(tmp_path, capsys):
    pytest.importorskip("torchvision")
    images = tmp_path / "photos"
    write_pngs(images, 2, size=(64, 48), mode="RGB")
    out = tmp_path / "r18"
    code = main(
        [
            "report",
            "--model",
            "torchvision.models:resnet18",
            "--images",
            str(images),
            "--out",
            str(out),
            "--no-progress",
            "--metrics-steps",
            "2",  # 1000 classes for VOICE, but few ResNet forward passes for the metrics
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "'layer4'" in captured.out and "--layer" in captured.out
    check_report(out / "index.html")


def test_report_options_in_process(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(["zero", "one", "two", "three", "four"] + list("56789")) + "\n\n")
    out = tmp_path / "out"
    code = main(
        ["report", "--limit", "2", "--classes", str(names), "--out", str(out), "--no-progress"]
        + ["--title", "My <digits>"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    html = check_report(out / "index.html")
    assert "Why zero, rather than" in html and "My &lt;digits&gt;" in html
    assert len(IMG_SRC.findall(html)) == default_figures(2)


def test_bad_model_in_subprocess_is_one_line_without_traceback(tmp_path):
    result = run_cli("report", "--model", "missing_model.pt", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--model" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["report", "--model", "no_such_module_xyz:build"], "--model"),
        (["report", "--model", "_factories:small_cnn", "--images", "{pngs}"], "--layer"),
        (["report", "--weights", "w.pt"], "--weights"),
        (["report", "--images", "{tmp}/nowhere"], "--images"),
        (["report", "--layer", "features.99"], "--layer"),
        (["report", "--classes", "{tmp}/none.txt"], "--classes"),
        (["report", "--transform", "imagenet"], "--transform"),
        (["report", "--sections", "voice", "--voice-contrasts", "10"], "--voice-contrasts"),
        (["report", "--device", "not-a-device"], "--device"),
        (
            ["report", "--model", "_factories:small_cnn", "--weights", "{tmp}/none.pt"],
            "--weights",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, monkeypatch, capsys, argv, pattern):
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "pngs", 2, mode="RGB")
    argv = [a.format(tmp=tmp_path, pngs=tmp_path / "pngs") for a in argv]
    assert main(argv + ["--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and pattern in err[0], err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["report", "--batch-size", "0"],
        ["report", "--bogus"],
        ["explain"],
        ["report", "--sections", "contrastive,bogus"],
        ["report", "--sections", ""],
        ["report", "--voice-contrasts", "0"],
        ["report", "--voice-contrasts", "some"],
        ["report", "--metrics-steps", "0"],
    ],
)
def test_argparse_errors_exit_2_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_report_sections_in_the_order_given(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["report", "--limit", "2", "--out", str(out), "--no-progress"]
    code = main(argv + ["--sections", "metrics,contrastive,metrics", "--voice-contrasts", "all"])
    assert code == 0, capsys.readouterr().err
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "VOICE" not in html
    assert html.index("deletion AUC") < html.index("ContrastCAM: Why")
    assert len(IMG_SRC.findall(html)) == 2 * 5 + 1 + 1 + 4  # contrastive + metrics, once each
    only = tmp_path / "only"
    assert main(argv[:-3] + ["--out", str(only), "--no-progress", "--sections", "contrastive"]) == 0
    html = check_report(only / "index.html")
    assert len(IMG_SRC.findall(html)) == 2 * 5 + 1 and "deletion" not in html.lower()


def test_masks_section_for_your_own_model_needs_a_mask_net(tmp_path, capsys):
    from captum_ext.bundled import BUNDLED_MASK_LAYERS, load_bundled_mask_explainer

    argv = ["report", "--model", "captum_ext.bundled:load_bundled_model", "--limit", "3"]
    argv += ["--no-progress", "--layer", "features.7", "--sections", "masks"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 2
    assert "needs `--mask-net`" in capsys.readouterr().err
    mask_net = load_bundled_mask_explainer().save(tmp_path / "mask_net.pt")
    layers = ",".join(BUNDLED_MASK_LAYERS)
    code = main(
        argv + ["--out", str(tmp_path / "b"), "--mask-net", str(mask_net), "--mask-layers", layers]
    )
    assert code == 0, capsys.readouterr().err
    html = check_report(tmp_path / "b" / "index.html", contrastive=False)
    assert "What is the least this image needs?" in html
    assert len(IMG_SRC.findall(html)) == 3 * 3 + 2 * 3


def test_inversion_section_trains_a_generator_for_your_own_model(tmp_path, capsys):
    argv = ["report", "--model", "captum_ext.bundled:load_bundled_model", "--limit", "2"]
    argv += ["--no-progress", "--layer", "features.7", "--sections", "inversion"]
    code = main(argv + ["--inversion-steps", "2", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    html = check_report(tmp_path / "out" / "index.html", contrastive=False)
    assert "each class looks like" in html and len(IMG_SRC.findall(html)) == 1


def test_help_and_docs_list_every_section(capsys):
    """`captum-ext --help`, `captum-ext report --help` and docs/api/cli.md name all the
    sections of the registry (eight), not a stale subset."""
    from captum_ext.cli import SECTION_DESCRIPTIONS, SECTIONS, build_parser

    assert len(SECTIONS) == 8 and tuple(SECTION_DESCRIPTIONS) == SECTIONS
    for argv in (["--help"], ["report", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        text = " ".join(capsys.readouterr().out.split())
        missing = [name for name in SECTIONS if name not in text]
        assert not missing, (argv, missing)
    docs = (TESTS.parent / "docs" / "api" / "cli.md").read_text(encoding="utf-8")
    missing = [name for name in SECTIONS if f"`{name}`" not in docs]
    assert not missing, missing
    assert "SECTION_DESCRIPTIONS" in docs  # the page prints the registry itself


def test_help_names_the_default_sections_the_report_builds(capsys):
    """The help said "Default: all of them for the bundled model", which builds six of the
    eight sections (introspection and evaluation only when asked for)."""
    from captum_ext.cli import build_parser
    from captum_ext.viz import ReportConfig
    from captum_ext.viz.build import USER_MODEL_SECTIONS, default_sections

    with pytest.raises(SystemExit):
        build_parser().parse_args(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    bundled = ",".join(default_sections(ReportConfig()))
    assert len(default_sections(ReportConfig())) == 6
    assert f"Default: {bundled} for the bundled model, {','.join(USER_MODEL_SECTIONS)}" in text


def test_report_prints_the_time_per_section(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["report", "--limit", "2", "--out", str(out), "--no-progress"]
    assert main(argv + ["--sections", "metrics,contrastive"]) == 0
    stdout = capsys.readouterr().out.splitlines()
    at = stdout.index("Time per section:")
    assert stdout[at - 1].startswith("Report written to ")
    lines = stdout[at + 1 :]
    names = [line.rsplit(None, 2)[0].strip() for line in lines]
    assert names == ["metrics", "contrastive", "(writing the page)", "total"]
    seconds = [float(line.rsplit(None, 2)[1]) for line in lines]
    assert all(line.endswith(" s") for line in lines) and min(seconds) >= 0
    assert abs(sum(seconds[:-1]) - seconds[-1]) <= 0.05 * len(seconds) + 1e-9  # to 0.1 s


def test_report_on_a_compiled_model(tmp_path, monkeypatch, capsys):
    """A factory that returns torch.compile(model): the --layer hint named the wrapper's class
    (OptimizedModule) and its prefixed names, and the evaluation section looked the layer up
    by a name its randomised copies do not have."""
    monkeypatch.syspath_prepend(str(TESTS))
    write_pngs(tmp_path / "pngs", 2, mode="RGB")
    common = ["report", "--model", "_factories:compiled_small_cnn", "--images"]
    common += [str(tmp_path / "pngs"), "--transform", "none", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "for a SmallCNN model (the last convolutions are features.0, features.2)" in err
    sections = "contrastive,voice,trust,evaluation"
    out = tmp_path / "out"
    code = main(common + ["--layer", "features.3", "--sections", sections, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    html = check_report(out / "index.html")
    assert "_orig_mod" not in html and "OptimizedModule" not in html


def _report_and_score(tmp_path, monkeypatch, capsys, factory: str, sections: str):
    """``report`` (the given sections, on two RGB PNGs) and ``score`` with a model from
    ``_factories``: the report's stdout and the score CSV's rows."""
    monkeypatch.syspath_prepend(str(TESTS))
    write_pngs(tmp_path / "pngs", 2, mode="RGB")
    common = ["--model", f"_factories:{factory}", "--images", str(tmp_path / "pngs")]
    common += ["--transform", "none", "--no-progress"]
    out = tmp_path / "out"
    layer = "0.features.3" if factory == "softmax_small_cnn" else "features.3"
    code = main(["report", *common, "--layer", layer, "--sections", sections]
                + ["--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    check_report(out / "index.html")
    scores = tmp_path / "scores.csv"
    code = main(["score", *common, "--out", str(scores)])
    scored = capsys.readouterr()
    assert code == 0, scored.err
    return captured.out + scored.out, scores.read_text().strip().splitlines()


def test_report_and_score_on_a_binary_model_with_one_logit(tmp_path, monkeypatch, capsys):
    """One logit per image: read as the two-class logits [-z/2, z/2] (before, the
    contrastive section refused the model and `score` failed in GradTrust)."""
    sections = "contrastive,voice,metrics,trust,evaluation"
    out, rows = _report_and_score(tmp_path, monkeypatch, capsys, "one_logit_small_cnn", sections)
    assert "one logit z per image (a binary classifier)" in out
    assert len(rows) == 3 and {row.split(",")[3] for row in rows[1:]} <= {"0", "1"}


def test_report_and_score_on_a_model_that_ends_in_a_softmax(tmp_path, monkeypatch, capsys):
    """Probabilities: read as log-probabilities (before, every softmax of the report was a
    second one, with warnings whose remedy the command line has no option for, and `score`
    failed in GradTrust)."""
    sections = "contrastive,voice,metrics,trust"
    out, rows = _report_and_score(tmp_path, monkeypatch, capsys, "softmax_small_cnn", sections)
    assert out.count("read as log-probabilities") == 2  # report, then score
    assert len(rows) == 3


def test_report_and_score_on_a_half_precision_model(tmp_path, monkeypatch, capsys):
    """The images load as float32; a bfloat16 model refused them in every section ("Input
    type (float) and bias type (c10::BFloat16) should be the same")."""
    sections = "contrastive,voice,metrics,trust,evaluation"
    _, rows = _report_and_score(tmp_path, monkeypatch, capsys, "half_precision_small_cnn", sections)
    assert len(rows) == 3 and not any("inf" in row for row in rows)


def test_score_on_a_double_precision_model(tmp_path, monkeypatch, capsys):
    """A float64 model got the float32 images and failed ("the model failed on images ...
    Check --transform"): only half precision was cast to."""
    monkeypatch.syspath_prepend(str(TESTS))
    write_pngs(tmp_path / "pngs", 2, mode="RGB")
    scores = tmp_path / "scores.csv"
    argv = ["score", "--model", "_factories:double_precision_small_cnn", "--images"]
    argv += [str(tmp_path / "pngs"), "--transform", "none", "--no-progress", "--out", str(scores)]
    assert main(argv) == 0, capsys.readouterr().err
    assert len(scores.read_text().strip().splitlines()) == 3


def test_report_and_score_on_a_model_returning_its_logits_in_a_field(tmp_path, monkeypatch, capsys):
    """Hugging Face's classifiers return an ImageClassifierOutput (here: a dict) with
    ``logits``; the commands refused them ("must return (N, classes) logits")."""
    out, rows = _report_and_score(
        tmp_path, monkeypatch, capsys, "logits_in_a_field", "contrastive,trust"
    )
    assert "its logits in a `logits` field" in out
    assert len(rows) == 3


def _score_rows(path: Path) -> tuple[list[str], np.ndarray]:
    """The score CSV's header and its numeric columns after ``correct`` (one row per image)."""
    header, *rows = path.read_text().strip().splitlines()
    values = [[float(value) for value in row.split(",")[5:]] for row in rows]
    return header.split(","), np.array(values)


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.parametrize(
    "factory, layer, said",
    [
        ("one_logit_small_cnn", "features.3", "one logit z per image (a binary classifier)"),
        ("softmax_small_cnn", "0.features.3", "read as log-probabilities"),
        ("logits_in_a_field", "features.3", "its logits in a `logits` field"),
    ],
)
def test_a_torchscript_file_is_read_as_its_eager_model(
    factory, layer, said, tmp_path, monkeypatch, capsys
):
    """A scripted model that returns one logit, probabilities or a dict of logits: the
    report refused the one-logit model, and read the probabilities as logits (a second
    softmax everywhere; GradTrust left out); `score` gave GradTrust and the softmax of the
    probabilities. Now both commands adapt the TorchScript file as they adapt the factory,
    and `score` gives the factory's numbers."""
    monkeypatch.syspath_prepend(str(TESTS))
    import _factories

    scripted = tmp_path / "model.pt"
    torch.jit.script(getattr(_factories, factory)().eval()).save(str(scripted))
    write_pngs(tmp_path / "pngs", 3, mode="RGB")
    images = ["--images", str(tmp_path / "pngs"), "--transform", "none", "--no-progress"]
    out = tmp_path / "out"
    sections = "contrastive,voice,metrics,trust"
    code = main(["report", "--model", str(scripted), "--layer", layer, *images]
                + ["--sections", sections, "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert said in captured.out and "left out" not in captured.out + captured.err
    check_report(out / "index.html")
    tables = {}
    for name, spec in (("eager", f"_factories:{factory}"), ("scripted", str(scripted))):
        for scores in ("gradtrust,softmax,margin", "softmax,margin"):  # without GradTrust's wrapper
            csv = tmp_path / f"{name}-{scores.count(',')}.csv"
            code = main(["score", "--model", spec, *images, "--scores", scores]
                        + ["--out", str(csv)])  # fmt: skip
            assert code == 0, capsys.readouterr().err
            tables[name, scores] = _score_rows(csv)
    for scores in ("gradtrust,softmax,margin", "softmax,margin"):
        header, eager = tables["eager", scores]
        assert tables["scripted", scores][0] == header
        np.testing.assert_allclose(tables["scripted", scores][1], eager, rtol=1e-4, atol=1e-6)
    assert said in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_the_evaluation_section_of_a_torchscript_file(tmp_path, monkeypatch, capsys):
    """The sanity check's randomisation called `reset_parameters`, which compiled layers
    lack: the section stopped the report with an AttributeError from inside torch."""
    monkeypatch.syspath_prepend(str(TESTS))
    import _factories

    scripted = tmp_path / "model.pt"
    torch.jit.script(_factories.small_cnn().eval()).save(str(scripted))
    write_pngs(tmp_path / "pngs", 2, mode="RGB")
    out = tmp_path / "out"
    code = main(["report", "--model", str(scripted), "--layer", "features.3", "--images"]
                + [str(tmp_path / "pngs"), "--transform", "none", "--no-progress"]
                + ["--sections", "evaluation", "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    html = check_report(out / "index.html", contrastive=False)
    assert "no final linear layer found to randomise" not in html


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_masks_and_introspection_sections_of_a_torchscript_file(tmp_path, capsys):
    """The masks section looked the explained layer up by its name in the TorchScript
    wrapper ("'features.7' is not a module of TorchScriptLayerModel"), and the introspection
    section put hooks on compiled layers (a RuntimeError from inside torch). Both now run,
    with the pages of the eager model; --mask-layers, which compiled layers cannot serve,
    is refused by name."""
    from captum_ext.bundled import (
        load_bundled_introspective_network,
        load_bundled_mask_explainer,
        load_bundled_model,
    )

    scripted = tmp_path / "model.pt"
    torch.jit.script(load_bundled_model()).save(str(scripted))
    mask_net = load_bundled_mask_explainer().save(tmp_path / "mask_net.pt")
    head = load_bundled_introspective_network().save(tmp_path / "head.pt")
    common = ["--layer", "features.7", "--limit", "3", "--no-progress"]
    common += ["--sections", "masks,introspection", "--mask-net", str(mask_net)]
    common += ["--introspection-head", str(head)]
    pages = {}
    for name, spec in (("eager", "captum_ext.bundled:load_bundled_model"), ("ts", str(scripted))):
        out = tmp_path / name
        code = main(["report", "--model", spec, *common, "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        pages[name] = check_report(out / "index.html", contrastive=False)
    eager, ts = [re.findall(r"<td[^>]*>([^<]*)</td>", page)[1:] for page in pages.values()]
    # the circuit table (a row of three numbers per digit) needs hooks inside the compiled
    # model: the TorchScript page says that no circuits are drawn, and why
    at = eager.index("sample digit 0")
    assert ts == eager[:at] + eager[at + 3 * 4 :]  # the same masks and introspective results
    assert "No circuits are drawn" in pages["ts"] and "compiled TorchScript" in pages["ts"]
    code = main(["report", "--model", str(scripted), *common, "--mask-layers", "features.6"]
                + ["--out", str(tmp_path / "refused")])  # fmt: skip
    assert code == 2 and "`--mask-layers` with a TorchScript" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_score_gradnorm_of_a_torchscript_file_equals_the_factory(tmp_path, monkeypatch, capsys):
    """gradnorm reads the final linear layer with a hook, as GradTrust does, but only
    GradTrust got the wrapper that runs an eager copy of it: `score --scores gradnorm` on a
    TorchScript file failed."""
    monkeypatch.syspath_prepend(str(TESTS))
    import _factories

    scripted = tmp_path / "model.pt"
    torch.jit.script(_factories.small_cnn().eval()).save(str(scripted))
    write_pngs(tmp_path / "pngs", 3, mode="RGB")
    common = ["--images", str(tmp_path / "pngs"), "--transform", "none", "--no-progress"]
    common += ["--scores", "gradnorm,energy"]
    rows = []
    for name, spec in (("eager", "_factories:small_cnn"), ("ts", str(scripted))):
        csv = tmp_path / f"{name}.csv"
        code = main(["score", "--model", spec, *common, "--out", str(csv)])
        assert code == 0, capsys.readouterr().err
        rows.append(_score_rows(csv))
    assert rows[0][0] == rows[1][0]
    np.testing.assert_allclose(rows[1][1], rows[0][1], rtol=1e-5, atol=1e-7)


def test_images_the_model_cannot_take_are_one_line_for_report_and_score(tmp_path, capsys):
    """RGB images for a one-channel model: `report` and `score` printed torch's traceback
    from inside the model (the first forward pass adapting its output ran before the check
    that names --transform). Now both say it in one line, before any work."""
    from captum_ext.cli import main

    write_pngs(tmp_path / "pngs", 3, mode="RGB")
    common = [
        "--model",
        "captum_ext.bundled:load_bundled_model",
        "--images",
        str(tmp_path / "pngs"),
    ]
    common += ["--transform", "none", "--no-progress"]
    for command in (
        ["report", "--out", str(tmp_path / "r")],
        ["score", "--out", str(tmp_path / "s.csv")],
    ):
        assert main([*command, *common]) == 2
        err = capsys.readouterr().err
        assert "the model failed on images of shape (2, 3, 20, 20)" in err, err
        assert "to have 1 channels, but got 3 channels" in err and "Check --transform" in err
        assert "Traceback" not in err
    assert not (tmp_path / "s.csv").exists()


def test_class_name_files_as_editors_write_them(tmp_path, capsys):
    """A byte-order mark (Windows Notepad) stayed in the first name, so the `cat/` images got
    label -1 and the page showed "\\ufeffcat"; a blank line in the middle became an empty
    class name that shifted every later label; a Latin-1 file failed with a bare codec
    message."""
    from captum_ext.data.loading import read_class_names

    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffcat\ndog\n".encode())
    assert read_class_names(bom) == ["cat", "dog"]
    blank = tmp_path / "blank.txt"
    blank.write_text("cat\n\ndog\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"`path` file .* has an empty line \(line 2\)"):
        read_class_names(blank)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="`path` file .* is not UTF-8 text"):
        read_class_names(latin)


def test_image_folders_as_users_keep_them(tmp_path, capsys):
    """A report written inside --images (the default `--out report` in a photo folder) was
    read back as input on the next run, and by `score`; a class folder reached through a
    symbolic link was skipped (the help promises a recursive read); a folder named by a class
    the model does not have counted as a wrong prediction in `score` and was refused as
    "`labels`[1]=7" in `report`."""
    from captum_ext.cli import main

    photos = tmp_path / "photos"
    write_pngs(photos, 4)  # class_0/, class_1/
    common = ["--images", str(photos), "--transform", "digits", "--no-progress"]
    out = photos / "report"
    for _ in range(2):
        code = main(["report", *common, "--sections", "contrastive", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        html = (out / "index.html").read_text(encoding="utf-8")
        assert "4 images from" in html and "report/images" not in html
    csv = tmp_path / "scores.csv"
    assert main(["score", *common, "--scores", "softmax", "--out", str(csv)]) == 0
    assert len(csv.read_text().strip().splitlines()) == 1 + 4
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "class_0").symlink_to(photos / "class_0", target_is_directory=True)
    (linked / "loop").symlink_to(linked, target_is_directory=True)  # read once, no loop
    assert main(["score", "--images", str(linked), "--transform", "digits", "--no-progress"]
                + ["--scores", "softmax", "--out", str(csv)]) == 0  # fmt: skip
    assert len(csv.read_text().strip().splitlines()) == 1 + 2
    numbered = tmp_path / "numbered"
    for folder in ("1", "12"):
        write_pngs(numbered / folder, 1)
    own = ["--model", "captum_ext.bundled:load_bundled_model"]  # no class names: indices
    report = ["report", "--layer", "features.7", "--out", str(tmp_path / "r")]
    for command in (report, ["score", "--out", str(csv)]):
        args = [*command, *own, "--images", str(numbered), "--transform", "digits"]
        assert main([*args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "is in a folder named 12, but the model has 10 classes (0..9)" in err, err


def test_a_failed_run_leaves_no_page_beside_other_pictures_and_files_are_checked_first(
    tmp_path, capsys, monkeypatch
):
    """A re-run into a report folder that failed halfway kept the first run's page, which
    then showed the second run's pictures; a missing --mask-net was found only when its
    section came, after the other sections' work; an unusable --device (meta, xpu, ...) gave
    a traceback."""
    from captum_ext.cli import main

    out = tmp_path / "report"
    common = ["--limit", "2", "--no-progress", "--out", str(out)]
    assert main(["report", "--sections", "contrastive", *common]) == 0
    assert (out / "index.html").exists()
    own = ["--model", "captum_ext.bundled:load_bundled_model", "--transform", "digits"]
    write_pngs(tmp_path / "pngs", 2)
    own += ["--images", str(tmp_path / "pngs")]
    assert main(["report", *own, "--sections", "contrastive,masks", *common]) == 2
    err = capsys.readouterr().err
    assert "the masks section needs `--mask-net`" in err
    assert (out / "index.html").exists()  # refused before any work: the old page stands
    missing = ["--mask-net", str(tmp_path / "nope.pt")]
    assert main(["report", *own, "--sections", "masks", *missing, *common]) == 2
    assert "`--mask-net`: no file at" in capsys.readouterr().err

    # a run that fails after writing pictures leaves no page of the earlier run beside them
    import dataclasses

    import captum_ext.viz.build as build

    def fail_in_section(*args, **kwargs):
        raise ValueError("a section failed")

    failing = dataclasses.replace(build.SECTION_REGISTRY["voice"], build=fail_in_section)
    monkeypatch.setitem(build.SECTION_REGISTRY, "voice", failing)
    assert main(["report", "--sections", "contrastive,voice", *common]) == 2
    assert "a section failed" in capsys.readouterr().err
    assert (out / "images" / "contrastive").is_dir()
    assert not (out / "index.html").exists()
    for device in ("meta", "xpu"):
        assert main(["score", "--device", device, "--out", str(tmp_path / "s.csv")]) == 2
        assert f"`--device`='{device}'" in capsys.readouterr().err


def test_file_names_that_are_not_utf8_and_oversized_images(tmp_path, capsys, monkeypatch):
    """A file name with a Latin-1 byte (café.png from an old archive) failed after all the
    work with "'utf-8' codec can't encode character '\\udce9'", naming neither the file nor
    an option; an image above PIL's decompression-bomb limit ended in a traceback."""
    import os

    from PIL import Image

    from captum_ext.cli import main

    folder = tmp_path / "names"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "plain.png")
    odd = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(os.fsdecode(odd))
    csv = tmp_path / "s.csv"
    common = ["--images", str(folder), "--transform", "digits", "--no-progress"]
    assert main(["score", *common, "--scores", "softmax", "--out", str(csv)]) == 0
    assert "caf\ufffd.png" in csv.read_text(encoding="utf-8")
    assert main(["report", *common, "--sections", "contrastive", "--out", str(tmp_path / "r")]) == 0
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 pixels: twice over, a "bomb"
    assert main(["score", *common, "--out", str(csv)]) == 2
    assert "`--images`: cannot read image" in capsys.readouterr().err


def test_weights_files_and_empty_options_get_one_clear_line(tmp_path, capsys):
    """A whole pickled model as --weights gave torch's message with its terminal colour codes
    and a cut-off sentence; a state dict with one non-tensor entry said it held "a dict"
    rather than a state dict; --final-layer 'nope' was reported as `layer`; empty values
    (--images "" read the current folder, --classes "" was ignored) are refused."""
    torchvision = pytest.importorskip("torchvision")
    from captum_ext.cli import main

    whole, extra = tmp_path / "whole.pt", tmp_path / "extra.pt"
    model = torchvision.models.resnet18(num_classes=3)
    torch.save(model, whole)
    torch.save({**model.state_dict(), "version": 2}, extra)
    common = ["--model", "torchvision.models:resnet18", "--out", str(tmp_path / "s.csv")]
    assert main(["score", *common, "--weights", str(whole)]) == 2
    err = capsys.readouterr().err
    assert "holds pickled Python objects" in err and "\x1b[" not in err
    assert main(["score", *common, "--weights", str(extra)]) == 2
    assert "its entry 'version' is of type int" in capsys.readouterr().err
    bundled = ["--model", "captum_ext.bundled:load_bundled_model", "--no-progress"]
    assert main(["score", *bundled, "--final-layer", "nope", "--out", str(tmp_path / "s.csv")]) == 2
    assert "`--final-layer`='nope' is not a module of DigitCNN" in capsys.readouterr().err
    for option in ("--images", "--classes", "--layer"):
        assert main(["report", option, "", "--out", str(tmp_path / "r")]) == 2
        assert f"`{option}` is empty" in capsys.readouterr().err


def test_section_files_that_are_not_the_sections_nets_name_their_option(tmp_path, capsys):
    """A file that is no mask net / introspective head was reported in the Python API's
    words ("`path`: ...", "resume=False"), naming no option of the command."""
    from captum_ext.cli import main

    other = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(2)}, other)
    common = ["--model", "captum_ext.bundled:load_bundled_model", "--layer", "features.7"]
    common += ["--limit", "2", "--no-progress", "--out", str(tmp_path / "r")]
    for option, section in (("--mask-net", "masks"), ("--introspection-head", "introspection")):
        assert main(["report", *common, option, str(other), "--sections", section]) == 2
        err = capsys.readouterr().err
        assert f"error: `{option}`: " in err and "`path`" not in err and "resume=" not in err


def test_a_layer_without_a_map_is_named_as_the_commands_option(tmp_path, capsys):
    """`report --layer classifier` said "GradCAM: `layer`='classifier' ...", the Python
    argument, where the command's option is --layer."""
    from captum_ext.cli import main

    args = ["report", "--model", "captum_ext.bundled:load_bundled_model", "--layer"]
    args += ["classifier", "--limit", "2", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "`--layer`='classifier' has an output of shape (2, 10)" in err, err


def test_a_missing_jinja2_is_named_before_any_section_is_computed(tmp_path, capsys, monkeypatch):
    """Without jinja2 the report computed every section and wrote its figures (532 files on
    the bundled model) before saying that the page needs jinja2."""
    import sys

    monkeypatch.setitem(sys.modules, "jinja2", None)  # `import jinja2` raises ImportError
    out = tmp_path / "out"
    code = main(["report", "--limit", "2", "--out", str(out), "--no-progress"])
    assert code != 0
    assert "needs jinja2: pip install 'captum-ext[report]'" in capsys.readouterr().err
    assert not out.exists() or not any(path.is_file() for path in out.rglob("*"))


class _ClosedPipe:
    """A standard output whose reader has gone away (``captum-ext ... | head -0``)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_pipe_before_scoring_still_writes_the_scores(tmp_path, monkeypatch, capsys):
    """A model ending in a softmax prints how it is read before any score is computed: with
    the pipe closed, that first line ended the command (status 141, no CSV)."""
    monkeypatch.syspath_prepend(str(TESTS))
    write_pngs(tmp_path / "pngs", 2, mode="RGB")
    scores = tmp_path / "scores.csv"
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    code = main(
        ["score", "--model", "_factories:softmax_small_cnn", "--images", str(tmp_path / "pngs")]
        + ["--transform", "none", "--no-progress", "--out", str(scores)]
    )
    assert code == 141
    assert len(scores.read_text().strip().splitlines()) == 3  # the header and two images
    assert "Traceback" not in capsys.readouterr().err


def test_a_closed_pipe_during_the_report_still_writes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    out = tmp_path / "report"
    code = main(["report", "--sections", "metrics", "--limit", "4", "--no-progress"]
                + ["--out", str(out)])  # fmt: skip
    assert code == 141
    check_report(out / "index.html")


def test_no_standard_output_at_all_still_writes_the_scores(tmp_path, monkeypatch):
    """`captum-ext score >&-` (or pythonw): sys.stdout is None, which print() skips."""
    monkeypatch.setattr(sys, "stdout", None)
    scores = tmp_path / "scores.csv"
    assert main(["score", "--limit", "3", "--no-progress", "--out", str(scores)]) == 0
    assert len(scores.read_text().strip().splitlines()) == 4
