"""The README's test command is what CI runs, so a newcomer runs what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command() -> None:
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_commands = [block for block in blocks if "pytest" in block]
    assert len(test_commands) == 1, "the README must show exactly one test command"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_commands[0] in ci_lines


def test_readme_main_command_uses_existing_subcommands() -> None:
    from AirwaySegmentationLib.cli import build_parser

    blocks = _bash_blocks((ROOT / "README.md").read_text())
    main_command = blocks[0]
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public accessor
    used = set(re.findall(r"\bairway (\w+)", main_command))
    assert used and used <= subcommands
