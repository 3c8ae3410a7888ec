"""`make demo-s3` as a user runs it: SeaweedFS on loopback, the corpus uploaded as 4 shards (one gzipped),
`tauon run --local` pre-trains the tiny Llama from s3://corpora/tiny/ on 2 CPU nodes (fsdp), credentials
only from the caller's environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.s3store import _store

REPO = Path(__file__).resolve().parents[2]


def test_demo_s3_pretrains_from_shards_in_seaweedfs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, str(REPO / "hack" / "demo_s3.py"), "--max-steps", "3", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "phase Succeeded" in r.stdout
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and m["worldSize"] == 2 and m["strategy"] == "fsdp" and m["trainSamples"] > 0
    assert (out / "model" / "config.json").is_file()
    # the store's secret is in no file the run wrote and in none of its output
    for f in out.rglob("*"):
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert _store.SECRET_KEY.encode() not in f.read_bytes(), f
    assert _store.SECRET_KEY not in r.stdout + r.stderr
