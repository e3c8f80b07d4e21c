"""A renamed argument's DeprecationWarning points at the user's line, also where the
renaming decorator is wrapped by another one (NetworkInversion), so that Python's default
filters, which show DeprecationWarnings raised from __main__ only, show it."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_renamed_argument_warning_is_shown_under_default_filters():
    script = textwrap.dedent(
        """
        import torch
        from torch import nn
        from captum_ext.inversion import ConditionedGenerator, NetworkInversion

        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 5))
        generator = ConditionedGenerator(5, out_shape=(3, 6, 6), latent_dim=8)
        inversion = NetworkInversion(
            model, generator=generator, input_shape=(3, 6, 6), batch_size=4
        )
        assert inversion.generator is generator
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "DeprecationWarning" in done.stderr and "`generator` is renamed" in done.stderr
    assert "<string>" in done.stderr  # the user's line, not the package's
