"""The README's quickstart runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quickstart") :]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    plugins = next(b for b in blocks if b.startswith("# myapp/plugins.py"))
    main = next(b for b in blocks if b.startswith("# main.py"))
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "plugins.py").write_text(plugins)
    (tmp_path / "main.py").write_text(main)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "main.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "tenant-42: page 1"
    assert lines[1] == "{'key': 'a', 'cached': 1}"
    assert lines[2] == "kernel said: builtins.ValueError pages start at 1"
    assert lines[3] == "['tenant-42'] 1 True"
    assert lines[4].isdigit()
