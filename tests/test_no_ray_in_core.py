"""anomaly_core is the method without the engine: no module of it, present or added later, imports Ray.
Ray belongs to jobs/, so the core runs in-process, in a notebook or under another scheduler."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
CORE = ROOT / "anomaly_core"


def core_modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package, subpackages included."""
    modules = {}
    for path in sorted(CORE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_ray(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == "ray" or a.name.startswith("ray.") for a in node.names)
    return (isinstance(node, ast.ImportFrom) and node.level == 0
            and (node.module == "ray" or node.module.startswith("ray.")))


def test_the_walk_finds_subpackages_and_every_module():
    modules = core_modules()
    assert {"anomaly_core", "anomaly_core.metrics", "anomaly_core.config"} <= modules.keys()
    assert len(modules) == len(list(CORE.rglob("*.py")))


def test_no_module_has_a_ray_import_statement_even_inside_a_function():
    offenders = [f"{name} line {node.lineno}" for name, path in core_modules().items()
                 for node in ast.walk(ast.parse(path.read_text(), filename=str(path))) if imports_ray(node)]
    assert offenders == [], f"anomaly_core must not import ray; move these to jobs/: {offenders}"


def test_importing_any_module_leaves_ray_unloaded():
    """In one fresh interpreter (each costs ~2 s of torch import), modules are imported one by one and
    sys.modules is read after each: it only grows, so the first module after which Ray is loaded is the
    one that brings it in, directly or through a third-party import."""
    code = ("import importlib, json, sys\n"
            "for name in json.loads(sys.argv[1]):\n"
            "    importlib.import_module(name)\n"
            "    if 'ray' in sys.modules:\n"
            "        print(name)\n"
            "        break\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(list(core_modules()))], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert done.stdout == "", f"importing {done.stdout.strip()} loads ray; anomaly_core must not depend on it"
