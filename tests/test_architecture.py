"""The package's layers: the library never imports Prefect; flows, deployments and CLI sit above.

The library is every module of `audiobooks_scoring` except `audiobooks_scoring.flows`,
`audiobooks_scoring.deployments` and `audiobooks_scoring.cli`. Each check runs in a fresh
interpreter so that modules other tests imported cannot hide (or cause) a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABOVE_THE_LIBRARY = (
    "audiobooks_scoring.flows",
    "audiobooks_scoring.deployments",
    "audiobooks_scoring.cli",
)
NEVER_IN_THE_LIBRARY = ("prefect", "prefect_dask", *ABOVE_THE_LIBRARY)
LIBRARY = (
    "settings",
    "contract",
    "files",
    "progress",
    "pipeline",
    "bench",
    "warehouse",
    "model",
    "scoring",
    "publishing",
    "monitoring",
    "reporting",
    "inputs",
    "outcomes",
)

# Runs in a fresh interpreter: lists the library's modules from the file system (without
# importing the excluded packages, as pkgutil.walk_packages would), imports them one at a time
# and notes, for every forbidden module, which library module pulled it in and the chain of
# module bodies executing at that moment (from a meta-path hook that only watches).
PROBE = r"""
import json, os, pkgutil, sys, traceback

EXCLUDED = tuple(json.loads(sys.argv[1]))
FORBIDDEN = tuple(json.loads(sys.argv[2]))


def excluded(name):
    return any(name == e or name.startswith(e + ".") for e in EXCLUDED)


def library_modules(path, prefix):
    for info in sorted(pkgutil.iter_modules(path, prefix), key=lambda i: i.name):
        if excluded(info.name):
            continue
        yield info.name
        if info.ispkg:
            folder = os.path.join(info.module_finder.path, info.name.rpartition(".")[2])
            yield from library_modules([folder], info.name + ".")


chains = {}


class Watch:
    # Records who imports a forbidden module first; never finds anything itself.
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        top = fullname if fullname in FORBIDDEN else fullname.split(".")[0]
        if top in FORBIDDEN and top not in chains:
            chains[top] = [
                f"{frame.filename}:{frame.lineno}"
                for frame in traceback.extract_stack()[:-1]
                if frame.name == "<module>" and not frame.filename.startswith("<")
            ]
        return None


sys.meta_path.insert(0, Watch)
import audiobooks_scoring

modules = ["audiobooks_scoring"]
modules += library_modules(audiobooks_scoring.__path__, "audiobooks_scoring.")
offenders = {}
for name in modules:
    __import__(name)
    for forbidden in FORBIDDEN:
        if forbidden in sys.modules and forbidden not in offenders:
            offenders[forbidden] = {"imported_by": name, "chain": chains.get(forbidden, [])}
print(json.dumps({
    "file": audiobooks_scoring.__file__, "modules": modules, "offenders": offenders,
}))
"""


def run_python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter of this environment, from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_library_imports_neither_prefect_nor_the_layers_above_it():
    result = run_python(PROBE, json.dumps(ABOVE_THE_LIBRARY), json.dumps(NEVER_IN_THE_LIBRARY))
    assert result.returncode == 0, f"importing the library failed:\n{result.stderr[-6000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    modules = report["modules"]

    assert Path(report["file"]).resolve().parent == ROOT / "audiobooks_scoring"
    for name in LIBRARY:  # the walk found the library (and would notice a module going missing)
        assert f"audiobooks_scoring.{name}" in modules
    assert not [m for m in modules if m.startswith(ABOVE_THE_LIBRARY)]

    problems = [
        f"{forbidden} was imported while importing {found['imported_by']}; chain of module "
        "bodies executing (outermost first):\n    " + "\n    ".join(found["chain"])
        for forbidden, found in report["offenders"].items()
    ]
    assert not problems, "\n\n".join(problems)


def test_flows_and_cli_import_and_the_cli_imports_flows_lazily():
    code = textwrap.dedent(
        """
        import sys

        import typer

        import audiobooks_scoring.cli as cli

        assert isinstance(cli.app, typer.Typer)
        lazy = [m for m in ("audiobooks_scoring.flows", "prefect") if m in sys.modules]
        assert not lazy, f"importing the CLI imported {lazy}; it must import flows lazily"

        from prefect import Flow

        from audiobooks_scoring.flows.retrain_model import retrain_model
        from audiobooks_scoring.flows.score_customers import score_customers

        assert isinstance(score_customers, Flow) and score_customers.name == "score-customers"
        assert isinstance(retrain_model, Flow) and retrain_model.name == "retrain-model"
        import audiobooks_scoring.deployments.serve  # noqa: F401
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-6000:]


def lint_imports() -> str:
    beside = Path(sys.executable).parent / "lint-imports"
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    return found


def test_import_linter_contracts_are_kept():
    """The `[tool.importlinter]` contracts of pyproject.toml, as `make test` runs them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [lint_imports(), "--no-cache", "--no-logo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert "0 broken" in result.stdout
