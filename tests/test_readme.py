"""The README's example and set-up commands stay true."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_gives_the_shapes_it_claims():
    text = README.read_text()
    (example,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    n = namespace["images"].shape[0]
    assert namespace["why_not_runner_up"].shape == (n, 1, 7, 7)
    assert namespace["why_not_three"].shape == (n, 1, 28, 28)
    assert namespace["every_contrast"].shape == (n, 10, 7, 7)
    assert torch.isfinite(namespace["every_contrast"]).all()


def test_readme_has_exactly_the_two_setup_commands_ci_uses():
    text = README.read_text()
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        block = text.split(marker, 1)[1]
        command = re.search(r"```bash\n(.*?)\n```", block, flags=re.S).group(1)
        assert "\n" not in command.strip(), f"{marker} must be one command line"
        assert command.startswith("pip install torch==2.14.1 torchvision==0.29.1")
    assert "captum-ext report" in text.split("<!-- main-command -->", 1)[1].split("```")[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci
