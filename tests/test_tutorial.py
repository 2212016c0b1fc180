"""docs/tutorial.md runs as written: every fenced block in it is checked or run here.

The tutorial's fences say what each block is (see its introduction):

- ```python excerpt PATH NAME``: real code; its lines must appear in order, with the same
  relative indentation, inside the function or class NAME (``Class.method``) of PATH; a
  line ``...`` leaves lines out. So an excerpt cannot drift from the code.
- ```python``: a complete program, run as a file in a subprocess with this Python.
- ```sh server``: the one command that starts the server the ``sh`` blocks talk to; run
  here with ``PORT=0`` (a free port), its printed URL becomes ``$TRELLIS_URL``.
- ```sh``: one shell session, in order, against that server (``set -euo pipefail``).
- ```text output``: what the program or shell block just before it prints, exactly.
- ```mermaid``: a diagram.

Any other fence fails the suite, so nothing unrun can slip into the document.
"""

from __future__ import annotations

import ast
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"
#: Printed by the shell between two blocks, to tell their outputs apart.
BLOCK_MARKER = "@@tutorial-block@@"
START_TIMEOUT_SECONDS = 15.0  # a cold interpreter on a busy 2-core machine
RUN_TIMEOUT_SECONDS = 45.0  # under the suite's 60 s per test; each block takes a few seconds
MERMAID_TYPES = ("flowchart", "sequenceDiagram", "stateDiagram-v2", "classDiagram")
MEASURED_HEADING = "### What one limiter costs, measured"
#: A line of an excerpt that stands for lines left out: ``...``, maybe with a comment.
ELISION = re.compile(r"\.\.\.(\s+#.*)?")


@dataclass(frozen=True)
class Block:
    """One fenced block: its info string, its text, the line its fence opens on, and the
    ``text output`` block that follows it (if any)."""

    info: str
    text: str
    line: int
    output: str | None = None

    @property
    def kind(self) -> str:
        words = self.info.split()
        if words[:2] == ["python", "excerpt"]:
            return "excerpt"
        return " ".join(words)


def parse_blocks(markdown: str) -> list[Block]:
    """The fenced blocks of ``markdown``, each ``text output`` attached to the block before
    it. Errors: ``AssertionError`` for an unclosed fence or a stray output block."""
    blocks: list[Block] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        opening = lines[index]
        index += 1
        if not opening.startswith("```"):
            continue
        start, body = index, []
        while index < len(lines) and lines[index] != "```":
            body.append(lines[index])
            index += 1
        assert index < len(lines), f"line {start}: the fence is never closed"
        index += 1
        block = Block(opening[3:].strip(), "\n".join(body) + "\n", start)
        if block.kind == "text output":
            assert blocks and blocks[-1].kind in ("python", "sh") and blocks[-1].output is None, (
                f"line {start}: an output block must follow a python or sh block"
            )
            blocks[-1] = Block(blocks[-1].info, blocks[-1].text, blocks[-1].line, block.text)
        else:
            blocks.append(block)
    return blocks


def tutorial_blocks(kind: str) -> list[Block]:
    return [block for block in parse_blocks(TUTORIAL.read_text()) if block.kind == kind]


# -- excerpts ---------------------------------------------------------------------------


def definition_lines(source: str, name: str) -> list[str]:
    """The source lines of ``name`` (``Class.method``, ``function``) in ``source``.

    Errors: ``AssertionError`` when no such function or class exists.
    """
    lines = source.splitlines()
    body: list[ast.stmt] = ast.parse(source).body
    node: ast.stmt | None = None
    for part in name.split("."):
        kinds = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        node = next((n for n in body if isinstance(n, kinds) and n.name == part), None)
        assert node is not None, f"no function or class {name}"
        body = node.body
    assert node is not None and node.end_lineno is not None
    return lines[node.lineno - 1 : node.end_lineno]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _matches_at(source: list[str], at: int, chunk: list[str]) -> bool:
    """Whether ``chunk`` is ``source[at:]`` line by line, modulo one indentation shift."""
    if at + len(chunk) > len(source):
        return False
    shift = _indent(source[at]) - _indent(chunk[0])
    for mine, theirs in zip(chunk, source[at:], strict=False):
        if mine.strip() != theirs.strip():
            return False
        if mine.strip() and _indent(theirs) - _indent(mine) != shift:
            return False
    return True


def excerpt_problem(excerpt: str, source: list[str]) -> str | None:
    """``None`` when every chunk of ``excerpt`` (split at ``...`` lines, which may carry a
    comment) appears in ``source``, in order; else which chunk does not."""
    chunks: list[list[str]] = [[]]
    for line in textwrap.dedent(excerpt).splitlines():
        if ELISION.fullmatch(line.strip()):
            chunks.append([])
        else:
            chunks[-1].append(line)
    if not chunks[-1]:  # the excerpt ends with "...": the rest is left out
        chunks.pop()
    position = 0
    for chunk in chunks:
        assert chunk and chunk[0].strip(), "an excerpt chunk must start with a code line"
        found = next(
            (at for at in range(position, len(source)) if _matches_at(source, at, chunk)), None
        )
        if found is None:
            return "not found (after what matched before it):\n" + "\n".join(chunk)
        position = found + len(chunk)
    return None


def check_excerpt(block: Block) -> None:
    words = block.info.split()
    assert len(words) == 4, f"line {block.line}: ```python excerpt PATH NAME"
    path, name = ROOT / words[2], words[3]
    assert path.is_file(), f"line {block.line}: no file {words[2]}"
    source = definition_lines(path.read_text(), name)
    problem = excerpt_problem(block.text, source)
    assert problem is None, f"line {block.line}, excerpt of {words[2]} {name}: {problem}"


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b, id=f"{b.info.split()[2]}:{b.info.split()[-1]}")
        for b in tutorial_blocks("excerpt")
    ],
)
def test_tutorial_excerpt_is_the_real_code(block: Block) -> None:
    """Each excerpt appears, in order and modulo indentation, in the function it names."""
    check_excerpt(block)


def test_tutorial_excerpt_check_catches_drift() -> None:
    """A changed line, a wrong order or a wrong function is reported, not accepted."""
    source = ["def f():", "    a = 1", "    if a:", "        b = 2", "    return b"]
    assert excerpt_problem("if a:\n    b = 2\n", source) is None
    assert excerpt_problem("a = 1\n...\nreturn b\n", source) is None
    assert excerpt_problem("a = 1\n...  # and the rest\n", source) is None
    assert excerpt_problem("if a:\n    b = 3\n", source) is not None
    assert excerpt_problem("if a:\nb = 2\n", source) is not None  # indentation changed
    assert excerpt_problem("return b\n...\na = 1\n", source) is not None
    with pytest.raises(AssertionError, match="no function or class"):
        definition_lines("def f():\n    pass\n", "g")


# -- the document's shape ----------------------------------------------------------------


def test_tutorial_has_only_known_blocks() -> None:
    """Every fence is one of the kinds this module runs or checks; programs and shell
    blocks say what they print; there is one server command, on one line."""
    known = {"excerpt", "python", "sh", "sh server", "mermaid"}
    blocks = parse_blocks(TUTORIAL.read_text())
    assert [b for b in blocks if b.kind not in known] == []
    servers = [b for b in blocks if b.kind == "sh server"]
    assert len(servers) == 1 and len(servers[0].text.strip().splitlines()) == 1
    for block in blocks:
        if block.kind in ("python", "sh"):
            assert block.output is not None, f"line {block.line}: no ```text output after it"


def test_tutorial_mermaid_blocks_name_a_diagram_type() -> None:
    """Each Mermaid block starts with a diagram type Mermaid knows; no sequence diagram
    message holds a ``;`` (Mermaid reads it as the end of a statement: a parse error).

    (All of them were also rendered once with mermaid 11.17 in a headless chromium.)"""
    diagrams = tutorial_blocks("mermaid")
    assert len(diagrams) >= 4
    for block in diagrams:
        kind = block.text.split()[0]
        assert kind in MERMAID_TYPES, f"line {block.line}"
        assert kind != "sequenceDiagram" or ";" not in block.text, f"line {block.line}"


def test_tutorial_has_one_table_for_the_measured_numbers() -> None:
    """One heading for the naive-vs-Trellis numbers, one table under it, a link to the
    README's Performance section; the README links the tutorial. (The values are the
    lead's to fill in from `make bench`: not checked here.)"""
    text = TUTORIAL.read_text()
    assert text.count(MEASURED_HEADING) == 1
    section = text.split(MEASURED_HEADING)[1].split("\n#")[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].count("|") == 4 and set(rows[1]) <= {"|", "-"}
    assert [row.split("|")[1].strip() for row in rows[2:]] == [
        "short request p99, idle",
        "short request p99, K=16 runs holding threads",
        "short request p99, K=64 runs holding threads",
        "short request p99, K=256 runs holding threads",
        "queue position visible",
        "SIGTERM with 100 runs in flight",
    ]
    assert "(../README.md#performance)" in section
    assert "(docs/tutorial.md)" in (ROOT / "README.md").read_text()


# -- programs ----------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without ``TRELLIS_*`` settings, this Python first on ``PATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    return env | extra


@pytest.mark.slow
@pytest.mark.parametrize(
    "block", [pytest.param(b, id=f"line{b.line}") for b in tutorial_blocks("python")]
)
def test_tutorial_program_prints_what_the_tutorial_shows(block: Block, tmp_path: Path) -> None:
    """Each program runs to the end and prints exactly its output block."""
    program = tmp_path / "program.py"
    program.write_text(block.text)
    result = subprocess.run(
        [sys.executable, str(program)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == block.output, result.stderr


# -- the shell session -------------------------------------------------------------------


class DocServer:
    """The tutorial's server command, run by bash on a free port (``PORT=0``)."""

    def __init__(self, command: str, cwd: Path) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=cwd,
            env=clean_env(PORT="0"),
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT_SECONDS)
        line = self.process.stdout.readline() if ready else ""
        match = re.fullmatch(r"trellis: serving on (http://127\.0\.0\.1:\d+)\n", line)
        if match is None:
            self.kill()
            raise AssertionError(f"the server did not start: {line!r} {self.read_stderr()}")
        self.url = match.group(1)

    def read_stderr(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as Ctrl-C in its terminal would; the exit code and stderr."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=15), self.read_stderr()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.stderr.close()


def session_script(blocks: list[Block]) -> str:
    """The shell blocks as one script, a marker line printed after each."""
    parts = ["set -euo pipefail"]
    for block in blocks:
        parts += [block.text, f'echo "{BLOCK_MARKER}"']
    return "\n".join(parts) + "\n"


@pytest.mark.slow
def test_tutorial_shell_session_against_a_real_server(tmp_path: Path) -> None:
    """The server command starts a server; the shell blocks, run in order in one shell
    against it, print exactly their output blocks; SIGTERM then stops it cleanly."""
    for tool in ("bash", "curl", "jq"):
        if shutil.which(tool) is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"the tutorial's shell session needs {tool}: .ci/run installs it")
            pytest.skip(f"the tutorial's shell session needs {tool} (apt-get install {tool})")
    (server_block,) = tutorial_blocks("sh server")
    blocks = tutorial_blocks("sh")
    server = DocServer(server_block.text.strip(), tmp_path)
    try:
        result = subprocess.run(
            ["bash", "-c", session_script(blocks)],
            cwd=tmp_path,
            env=clean_env(TRELLIS_URL=server.url),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_SECONDS,
            check=False,
        )
        assert result.returncode == 0, (result.stdout, result.stderr)
        outputs = result.stdout.split(f"{BLOCK_MARKER}\n")
        assert len(outputs) == len(blocks) + 1 and outputs[-1] == ""
        for block, printed in zip(blocks, outputs, strict=False):
            assert printed == block.output, f"line {block.line}"
        code, stderr = server.stop()
        assert code == 0, stderr
        assert "SIGTERM received: draining" in stderr and "stopped cleanly" in stderr
    finally:
        server.kill()
