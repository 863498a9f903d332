"""The GPU bench script, checked where no GPU is: it parses, refuses unknown stages, and every
stage's Python entry runs through its code on CPU tensors (--dry-run; numbers meaningless)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"
SCRIPT = BENCH / "gpu.sh"


def test_gpu_script_parses_and_refuses_an_unknown_stage(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT), "smoke", "nonsense"], capture_output=True, text=True,
                       env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 2 and "unknown stage nonsense" in r.stderr
    assert not list(tmp_path.iterdir())  # refused before running anything


@pytest.mark.parametrize("stage", ["preflight", "smoke", "kernels", "decode", "offload"])
def test_gpu_stage_dry_run_on_cpu(tmp_path, stage):
    root = BENCH.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, str(BENCH / "gpu_stages.py"), stage, "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (tmp_path / f"{stage}.txt").read_text().splitlines()
    assert lines, "the stage appended nothing to its result file"
    if stage == "smoke":
        assert lines[-1] == "smoke: 0 failures" and all(line.startswith(("PASS", "smoke")) for line in lines)
        kinds = {line.split()[1] for line in lines[:-1]}
        assert kinds == {"qgemv", "qgemm", "fused_moe", "grouped-offload"}, kinds
    if stage == "offload":
        assert (tmp_path / "offload.md").is_file()
