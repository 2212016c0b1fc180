"""The README's embedding example runs as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.slow
def test_embed_example_runs_custom_kind_to_the_end() -> None:
    """examples/embed.py registers its own agent kind and both conversations finish."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines() == [
        "hello: finished after 1 step(s): ['echo: hello']",
        "trio: finished after 1 step(s): ['echo: trio', 'echo: trio']",
        "<RunSupervisor runs 0/2 running, 0 queued | io 0/8 | tools 0/16>",
    ]
