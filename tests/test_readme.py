"""The README's set-up lines are the ones CI runs, and `xvlm --help` lists every subcommand with one line."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = re.search(r"README_TEST_COMMAND='([^']+)'", ci).group(1)
    blocks = re.findall(r"```bash\n(.+?)\n```", readme)
    assert ci_command in blocks, "the README's test command and .ci/run differ"
    assert any(b.endswith("xvlm quickstart") for b in blocks[:2])


def test_cli_help_lists_subcommands():
    from tools.cli import SUBCOMMANDS

    out = subprocess.run([sys.executable, "-m", "tools.cli", "--help"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", out, re.M), f"{name} missing from xvlm --help"
