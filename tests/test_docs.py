"""README.md and docs/: the README stays an entry page, every link between the pages resolves, and
every command in their bash blocks runs as written.

"As written" is checked as far as this machine allows: `gptoss` lines go through the real argument
parser, `make` lines name targets the Makefile has, `python -m` lines name modules that import,
repository paths exist; the README's quick start (make-tiny, then a float32 generate) really runs.
Lines with placeholders (DIR, PATH, $VAR, ..., <x>) are for a reader to fill in and are not parsed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from deploy.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250  # an entry page: what it is, how to start, where to read on

FENCE = re.compile(r"^[ \t]*```(\S*)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDERS = ("DIR", "PATH", "$", "...", "<")
GPTOSS = ("gptoss", ".venv/bin/gptoss")
PYTHON = ("python", "python3", ".venv/bin/python")
# Tokens starting with these are paths inside the repository, which must exist.
REPO_DIRS = ("cluster/", "deploy/", "model_shards/", "k8s/", "tests/", "docs/")


class Command(NamedTuple):
    where: str  # page:line, for the failure message
    line: str  # as written (continuation lines joined)
    tokens: list[str]  # the shell words, comments dropped, leading VAR=value assignments dropped


def _prose(text: str) -> str:
    """The page without code, where links cannot be."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in HEADING.findall(FENCE.sub("", page.read_text()))}


def _commands(page: Path) -> Iterator[Command]:
    text = page.read_text()
    for block in FENCE.finditer(text):
        if block.group(1) != "bash":
            continue
        first_line = text[:block.start(2)].count("\n") + 1
        pending, start = "", 0
        for offset, raw in enumerate(block.group(2).splitlines()):
            line = raw.strip()
            if not pending:
                start = offset
            pending = f"{pending} {line}" if pending else line
            if pending.endswith("\\"):  # a continuation line
                pending = pending[:-1].rstrip()
                continue
            try:
                tokens = shlex.split(pending, comments=True)
            except ValueError:  # a quoted string (a JSON body) goes on over the next line
                continue
            while tokens and ENV_ASSIGNMENT.match(tokens[0]):
                tokens.pop(0)
            if tokens:
                yield Command(f"{page.relative_to(REPO)}:{first_line + start}", pending, tokens)
            pending = ""
        assert not pending, f"{page.name}: a bash block ends inside a command: {pending!r}"


COMMANDS = [c for page in PAGES for c in _commands(page)]


def _has_placeholder(command: Command) -> bool:
    return any(p in token for token in command.tokens for p in PLACEHOLDERS)


def _of_kind(kind: tuple[str, ...]) -> list[Command]:
    return [c for c in COMMANDS if c.tokens[0] in kind]


def _ids(commands: list[Command]) -> list[str]:
    return [c.where for c in commands]


GPTOSS_COMMANDS = [c for c in _of_kind(GPTOSS) if not _has_placeholder(c)]
MAKE_COMMANDS = _of_kind(("make",))
MODULE_COMMANDS = [c for c in _of_kind(PYTHON) if len(c.tokens) > 2 and c.tokens[1] == "-m"]


def _makefile_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        # `name: prerequisites`, not `NAME := value` and not a recipe line (those start with a tab)
        match = re.match(r"^([A-Za-z0-9_.\- ]+?)\s*::?(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


def test_readme_is_an_entry_page() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_pages_have_commands_to_check() -> None:
    # Guards the extraction itself: the README's command line block must be found and parsed.
    readme = [c for c in GPTOSS_COMMANDS if c.where.startswith("README.md")]
    assert readme and MAKE_COMMANDS and MODULE_COMMANDS


@pytest.mark.parametrize("command", GPTOSS_COMMANDS, ids=_ids(GPTOSS_COMMANDS))
def test_gptoss_command_parses(command: Command, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        build_parser().parse_args(command.tokens[1:])
    except SystemExit:
        pytest.fail(f"{command.where}: {command.line}\n{capsys.readouterr().err.strip()}")


@pytest.mark.parametrize("command", MAKE_COMMANDS, ids=_ids(MAKE_COMMANDS))
def test_make_target_exists(command: Command) -> None:
    wanted = [t for t in command.tokens[1:] if not t.startswith("-") and "=" not in t]
    missing = set(wanted) - _makefile_targets()
    assert not missing, f"{command.where}: the Makefile has no target {sorted(missing)}"


@pytest.mark.parametrize("command", MODULE_COMMANDS, ids=_ids(MODULE_COMMANDS))
def test_python_module_exists(command: Command) -> None:
    module = command.tokens[2]
    assert importlib.util.find_spec(module) is not None, f"{command.where}: no module {module}"


def test_repository_paths_in_commands_exist() -> None:
    missing = []
    for command in COMMANDS:
        for token in command.tokens:
            path = token.rpartition("=")[2]  # --from-file=k8s/... names a path too
            if path.startswith(REPO_DIRS) and not (REPO / path).exists():
                missing.append(f"{command.where}: {path}")
    assert not missing, "\n".join(missing)


def _gptoss_exe() -> str:
    return shutil.which("gptoss") or str(Path(sys.executable).parent / "gptoss")


@pytest.mark.slow
def test_readme_quick_start_runs(vocab: Path, tmp_path: Path) -> None:
    """The README's first make-tiny line, then its float32 generate lines on that checkpoint, as
    written but for the checkpoint's directory (a fresh one here) and --vocab-dir (offline)."""
    readme = [c for c in GPTOSS_COMMANDS if c.where.startswith("README.md")]
    make_tiny = next(c for c in readme if c.tokens[1] == "make-tiny")
    written_dir = make_tiny.tokens[2]
    generates = [c for c in readme if c.tokens[1] == "generate" and written_dir in c.tokens
                 and "float32" in c.tokens and "--json" in c.tokens]
    assert generates, f"the README has no float32 generate --json line on {written_dir}"
    here = str(tmp_path / Path(written_dir).name)

    def run(command: Command) -> subprocess.CompletedProcess[str]:
        args = [here if t == written_dir else t for t in command.tokens[1:]]
        return subprocess.run([_gptoss_exe(), "--vocab-dir", str(vocab), *args], capture_output=True,
                              text=True, timeout=300)

    made = run(make_tiny)
    assert made.returncode == 0, f"{make_tiny.where}: {make_tiny.line}\n{made.stderr}"
    for command in generates:
        done = run(command)
        assert done.returncode == 0, f"{command.where}: {command.line}\n{done.stderr}"
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert "error" not in out, out
        # What the line asks for, read back through the same parser.
        asked = build_parser().parse_args(command.tokens[1:])
        assert out["prompt_token_ids"] == list(asked.prompt_ids)
        assert 0 < len(out["token_ids"]) == len(out["logprobs"]) <= asked.max_tokens
        assert out["finish_reason"] in ("stop", "length")
