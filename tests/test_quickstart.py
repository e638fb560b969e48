"""The README's quickstart learns: held-out accuracy after RL is clearly above the warm-up's."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rlctl.cli import cli


@pytest.mark.slow
def test_quickstart_rl_beats_warmup(tmp_path):
    result = CliRunner().invoke(cli, ["run", "quickstart", "-o", str(tmp_path / "qs"), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    warmup, rl = summary["eval/warmup/accuracy"], summary["eval/rl/accuracy"]
    assert warmup > 0.2  # the warm-up taught the format and some arithmetic
    assert rl >= warmup + 0.08, (warmup, rl)  # RL adds clearly on held-out problems
    assert "held-out accuracy:" in result.output and "after warmup" in result.output
