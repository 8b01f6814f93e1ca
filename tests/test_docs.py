"""Every Python block of the user documentation (the pages in ``PAGES``, the README included)
runs as written, the blocks of one page in order in one fresh interpreter (a block fenced ```py
instead of ```python is an illustration that needs a download, not run), in a temporary folder (with a tiny fake MNIST
t10k for the lab page, and a gloo group of one for the distributed pages)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest_lab import write_idx

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["torch.md", "lab.md", "distributed.md", "log_probs.md", "transformers.md", "../README.md"]


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_python_blocks_run(page: str, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    blocks = _blocks(page)
    assert blocks, f"docs/{page} has no python block"
    import numpy as np

    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((10000, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10000, dtype=np.uint8) % 10)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"docs/{page}:\n{done.stderr[-3000:]}"


def test_every_page_with_python_blocks_is_run() -> None:
    """A page not in ``PAGES`` may hold no ```python block (signatures and formulas are fenced
    ```text): none is left untested."""
    generated = ["api.md"]  # signatures from make_api.py; its examples run in test_package.py
    unlisted = [
        page.name for page in DOCS.glob("*.md") if page.name not in [*PAGES, *generated] and _blocks(page.name)
    ]
    assert not unlisted, f"python blocks in pages test_docs.py does not run: {unlisted}"
