"""docs/faststream.md: its code blocks make one service and its test, and the test passes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "faststream.md"


def test_the_faststream_page_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```$", PAGE.read_text(), flags=re.S | re.M)
    service = [b for b in blocks if not b.startswith("# test_service.py")]
    [test] = [b for b in blocks if b.startswith("# test_service.py")]
    assert len(service) == 4
    (tmp_path / "service.py").write_text("\n\n".join(service))
    (tmp_path / "test_service.py").write_text(test)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            "test_service.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
