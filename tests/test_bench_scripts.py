"""The GPU bench script, checked where no GPU is: it parses, and names its stages."""
import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "bench" / "gpu.sh"


def test_gpu_script_parses_and_refuses_an_unknown_stage(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT), "nonsense"], capture_output=True, text=True,
                       env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 2 and "unknown stage nonsense" in r.stderr
    assert (tmp_path / "machine.txt").is_file()  # what the machine was, written first
