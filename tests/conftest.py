"""Shared test helpers: import a chapter by path, run one as a learner would, read its
`summary:` line, and keep every test off the network.

Chapter files start with digits (`02_linreg.py`), which `import` cannot name, so
`load_chapter("02_linreg")` loads the file by path. Loading runs no training: every
chapter keeps its run behind `if __name__ == "__main__":`.
"""
import importlib.util
import json
import os
import runpy
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tests never use the network. Subprocesses inherit these variables, so urllib (and
# anything else that honours the usual proxy variables) tries a closed local port and
# fails at once, exactly as on a machine that is offline; the chapters then fall back
# to their generated data.
OFFLINE_ENV = {
    "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "", "NO_PROXY": "",
}
os.environ.update(OFFLINE_ENV)
# The tests use small shapes, where a second thread costs more in coordination than it
# saves; on a busy machine extra threads mostly wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# On a GPU, compile one tile configuration per kernel instead of autotuning every
# candidate at every shape the checks meet (minutes of compiling that test nothing).
os.environ.setdefault("ZERO_TO_GPT_AUTOTUNE", "0")

_loaded = {}


def load_chapter(name):
    """Import `ROOT/<name>.py` (e.g. "02_linreg") as a module, once per test session."""
    if name not in _loaded:
        path = ROOT / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"chapter_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look modules up here
        spec.loader.exec_module(module)
        _loaded[name] = module
    return _loaded[name]


class ChapterRun:
    """What a chapter run printed and returned, with its summary already parsed."""

    def __init__(self, completed):
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        self.summary = None
        if lines and lines[-1].startswith("summary: "):
            self.summary = json.loads(lines[-1][len("summary: "):])

    def __repr__(self):
        return (f"ChapterRun(returncode={self.returncode}, summary={self.summary},\n"
                f"stdout tail={self.stdout[-1500:]!r},\nstderr tail={self.stderr[-1500:]!r})")


def run_as_script(name, *args):
    """Run chapter `name` in this process as `python <name>.py *args` would: its cells
    run top to bottom under `__name__ == "__main__"`. A DataError reaches the caller
    (pytest.raises) instead of ending the process; returns the run's globals."""
    path = str(ROOT / f"{name}.py")
    saved_argv, saved_hook = sys.argv, sys.excepthook
    sys.argv = [path, *map(str, args)]
    try:
        return runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv, sys.excepthook = saved_argv, saved_hook


def without_matplotlib(folder):
    """Environment for a subprocess in which `import matplotlib` fails, as on a machine
    without it: a stand-in package that raises ImportError, first on PYTHONPATH."""
    stand_in = Path(folder) / "no_matplotlib" / "matplotlib"
    stand_in.mkdir(parents=True, exist_ok=True)
    (stand_in / "__init__.py").write_text('raise ImportError("matplotlib is not installed")\n')
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(stand_in.parent),
                                                       os.environ.get("PYTHONPATH")]))}


def has_matplotlib():
    """Whether this Python can plot; tests of a plot check the text view otherwise."""
    return importlib.util.find_spec("matplotlib") is not None


def run_chapter(name, *args, cwd=None, timeout=300, env=None):
    """Run `python <name>.py *args` in `cwd` (a temporary folder, so `data/` and `out/`
    start empty) and return a ChapterRun."""
    command = [sys.executable, str(ROOT / f"{name}.py"), *map(str, args)]
    full_env = {**os.environ, **OFFLINE_ENV, "PYTHONHASHSEED": "0", **(env or {})}
    completed = subprocess.run(command, cwd=cwd or ROOT, env=full_env, capture_output=True,
                               text=True, timeout=timeout)
    return ChapterRun(completed)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """In-process code gets the same treatment: any urlopen fails as if offline."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("tests run offline")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests where there is no CUDA GPU, and say why."""
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_clean_error(run, *words):
    """A bad input must end with exit code 2, one plain sentence on stderr naming the
    problem, and no traceback."""
    assert run.returncode == 2, run
    assert "Traceback" not in run.stderr, run
    message = run.stderr.strip().splitlines()
    assert message and message[-1].startswith("error: "), run
    for word in words:
        assert word.lower() in message[-1].lower(), (word, run)
