"""CI runs the test command README.md gives people, not a private variant of it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("Run the whole test suite"):]
    found = re.search(r"```bash\n(.*?)\n```", section, re.S)
    assert found is not None, "README.md has no test command block after 'Run the whole test suite'"
    return found.group(1).strip()


def test_ci_runs_exactly_the_readme_s_test_command() -> None:
    lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[-1] == readme_test_command()


def test_the_command_installs_chromium_only_when_it_is_missing_then_runs_the_suite() -> None:
    command = readme_test_command()
    check, install = command.index("command -v chromium"), command.index("apt-get install -y chromium chromium-driver")
    assert check < command.index("apt-get update") < install < command.index("python3 -m pytest")
    assert command.endswith("python3 -m pip install '.[test]' && python3 -m pytest")
