"""The wheel: only the `audiobooks_scoring` package, with its SQL, prefect.yaml and py.typed, and a
CLI that runs the whole demo from an empty folder once installed.

The wheel is built from a copy of the project folder (so no `build/` folder or stale build output
lands in, or comes from, the working tree) and installed without dependencies into a fresh virtual
environment. Its dependencies come from this test environment, through a `.pth` file naming this
environment's site-packages folders, to keep the suite fast and offline; everything the project
itself ships (code, SQL files, prefect.yaml, the console script) comes from the wheel. A folder
named in a `.pth` file is only put on `sys.path`: its own `.pth` files, among them the editable
install's `__editable__*.pth` finder, are not processed, so the wheel's copy of the package is
the one imported; `test_installed_package_is_the_wheels` checks that it is.
"""

from __future__ import annotations

import os
import shutil
import site
import sqlite3
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "audiobooks_scoring"
NOT_COPIED_AT_THE_ROOT = {".git", ".venv", "build", "dist", "data"}
NOT_COPIED_ANYWHERE = shutil.ignore_patterns(".*_cache", "__pycache__", "*.egg-info", "*.pyc")


def not_copied(folder: str, names: list[str]) -> set[str]:
    """Version control, environments, caches and build output: not the project's sources."""
    ignored = set(NOT_COPIED_ANYWHERE(folder, names))
    if Path(folder) == ROOT:
        ignored |= NOT_COPIED_AT_THE_ROOT & set(names)
    return ignored


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without the project's, Prefect's or Python's path settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AUDIOBOOKS_", "PREFECT_"))
        and k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
    }
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", TF_CPP_MIN_LOG_LEVEL="3", **extra)
    return env


def run(command: list[str | Path], cwd: Path, env: dict[str, str], timeout: float):
    result = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-8000:]}"
    )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built by pip from a copy of the project folder."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=not_copied)
    out = work / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", source, "--no-deps", "-q", "-w", out],
        cwd=work,
        env=clean_environment(),
        timeout=600,
    )
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_files(wheel) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_wheel_holds_only_the_package_and_its_metadata(wheel_files):
    top = {name.split("/")[0] for name in wheel_files}
    metadata = {name for name in top if name.endswith(".dist-info")}
    assert len(metadata) == 1, top
    assert top - metadata == {PACKAGE}, f"unexpected top-level names: {sorted(top - metadata)}"


def test_wheel_holds_every_module_sql_file_prefect_yaml_and_py_typed(wheel_files):
    sources = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / PACKAGE).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    shipped = {name for name in wheel_files if name.endswith(".py")}
    assert sources - shipped == set(), "modules missing (a folder without __init__.py?)"
    assert shipped - sources == set(), "modules shipped that the project does not have"

    sql_files = {
        path.relative_to(ROOT / "sql").as_posix(): path.read_bytes()
        for path in (ROOT / "sql").rglob("*.sql")
    }
    assert sql_files, "no sql/**/*.sql files found in the project"
    prefix = f"{PACKAGE}/sql/"
    shipped_sql = {
        name[len(prefix) :]: data for name, data in wheel_files.items() if name.startswith(prefix)
    }
    assert sorted(shipped_sql) == sorted(sql_files)
    for name, data in sql_files.items():
        assert shipped_sql[name] == data, f"sql/{name} differs in the wheel"

    yaml_bytes = (ROOT / "deployments" / "prefect.yaml").read_bytes()
    assert wheel_files[f"{PACKAGE}/deployments/prefect.yaml"] == yaml_bytes
    assert f"{PACKAGE}/py.typed" in wheel_files


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel; its dependencies are this environment's."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    env = clean_environment()
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent, env=env, timeout=60)
    python = venv / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel],
        cwd=venv.parent,
        env=env,
        timeout=300,
    )
    purelib = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=venv.parent,
        env=env,
        timeout=60,
    ).stdout.strip()
    dependencies = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "_test_environment_dependencies.pth").write_text(
        "".join(f"{p}\n" for p in dependencies)
    )
    return venv


def empty_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An empty working folder and the environment of a user with only a data folder set."""
    folder = tmp_path / "empty"
    folder.mkdir()
    env = clean_environment(
        AUDIOBOOKS_DATA_DIR=str(folder / "data"),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        COLUMNS="200",
    )
    return folder, env


def test_installed_package_is_the_wheels(installed, tmp_path):
    folder, env = empty_folder(tmp_path)
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path

        import audiobooks_scoring
        from audiobooks_scoring.deployments.serve import PREFECT_YAML, read_deployments
        from audiobooks_scoring.warehouse.sql_text import SQL_DIR

        assert Path(sys.prefix).resolve() == Path(sys.argv[1]).resolve(), sys.prefix
        print(Path(audiobooks_scoring.__file__).resolve())
        print(SQL_DIR.resolve())
        print(PREFECT_YAML.resolve())
        assert {e["name"] for e in read_deployments()} == {"nightly", "on-demand", "weekly"}
        """
    )
    lines = run(
        [installed / "bin" / "python", "-c", code, installed], cwd=folder, env=env, timeout=120
    ).stdout.split()
    venv = installed.resolve()
    for path in map(Path, lines[-3:]):
        assert path.is_relative_to(venv), f"{path} is not inside the fresh environment {venv}"
    assert Path(lines[-3]).name == "__init__.py"
    assert list(folder.iterdir()) == []


def test_installed_cli_runs_init_and_the_demo_from_an_empty_folder(installed, tmp_path):
    folder, env = empty_folder(tmp_path)
    cli = installed / "bin" / "audiobooks-scoring"

    initialised = run([cli, "init"], cwd=folder, env=env, timeout=300)
    assert "warehouse ready" in initialised.stdout
    warehouse = folder / "data" / "warehouse.db"
    assert warehouse.is_file()

    demo = run([cli, "demo", "--customers", "2000"], cwd=folder, env=env, timeout=900)
    output = " ".join(demo.stdout.split())
    assert "run score-" in output, output[-3000:]
    assert "customers in" in output and "target list" in output, output[-3000:]
    assert "customer_scores" in output and "campaign_targets" in output, output[-3000:]

    with sqlite3.connect(warehouse) as connection:
        (scored,) = connection.execute("SELECT COUNT(*) FROM customer_scores").fetchone()
        (runs,) = connection.execute("SELECT COUNT(*) FROM scoring_runs").fetchone()
    assert scored > 0
    assert runs >= 1
