"""bench/storage.py still runs against the current code (no timings asserted: those are its output)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_storage_benchmark_saves_and_restores_on_both_targets(tmp_path):
    out = tmp_path / "storage.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # its own endpoint and credentials
    result = subprocess.run([sys.executable, str(REPO / "bench" / "storage.py"), "--shapes", "demo", "--saves", "1", "--loader-steps", "5",
                             "--output", str(out)], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    local, s3 = summary["demo local"], summary["demo s3"]
    assert local["bytes"] == s3["bytes"] > 1e6  # the same checkpoint on both targets
    assert all(row[k] > 0 for row in (local, s3) for k in ("write_s", "publish_s", "restore_s"))
    cold, warm = json.loads(out.read_text())["loader"]
    assert cold["downloads"] > 0 and (warm["downloads"], warm["stall_s"]) == (0, 0.0)  # the second read: all cached
