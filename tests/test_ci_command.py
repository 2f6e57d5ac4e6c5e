"""CI runs the test command README.md gives people, not a private variant of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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


def _run_with_stubs(tmp_path: Path, present: tuple[str, ...]) -> list[str]:
    """The README's command under bash with stand-ins on PATH: apt-get and python3 record their
    arguments; ``present`` names the browser programs that exist. Like the machines CI runs on, root
    has no sudo: the command must not need it then."""
    stubs, calls = tmp_path / "bin", tmp_path / "calls"
    stubs.mkdir()
    for name in ("apt-get", "python3", *(("sudo",) if os.geteuid() else ()), *present):
        script = stubs / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n' + ('exec "$@"\n' if name == "sudo" else ""))
        script.chmod(0o755)
    (stubs / "id").symlink_to(shutil.which("id") or "/usr/bin/id")
    subprocess.run(["/bin/bash", "-c", "set -euo pipefail\n" + readme_test_command()], env={"PATH": str(stubs)},
                   cwd=tmp_path, check=True)
    return calls.read_text().splitlines()


def test_a_machine_without_chromium_gets_it_installed_then_the_suite_runs(tmp_path: Path) -> None:
    calls = [call for call in _run_with_stubs(tmp_path, ()) if not call.startswith("sudo")]
    assert calls == ["apt-get update", "apt-get install -y chromium chromium-driver",
                     "python3 -m pip install .[test]", "python3 -m pytest"]


def test_a_machine_with_chromium_runs_the_suite_without_apt(tmp_path: Path) -> None:
    assert _run_with_stubs(tmp_path, ("chromium", "chromedriver")) == [
        "python3 -m pip install .[test]", "python3 -m pytest"]
