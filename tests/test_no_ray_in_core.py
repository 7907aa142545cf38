import subprocess
import sys
from pathlib import Path


def test_anomaly_core_imports_with_ray_unavailable():
    """`import ray` inside anomaly_core would fail here: ray is made unimportable first."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import anomaly_core, anomaly_core.pipeline, anomaly_core.metrics, anomaly_core.artifact\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_no_ray_import_statement_in_core():
    core = Path(__file__).parents[1] / "anomaly_core"
    offenders = [p.name for p in core.rglob("*.py") if "import ray" in p.read_text()
                 or "from ray" in p.read_text()]
    assert offenders == []
