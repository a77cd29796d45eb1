"""Shared test helpers: import a chapter by path, run one as a learner would, read its
`summary:` line, and keep every test off the network.

Chapter files start with digits (`02_linreg.py`), which `import` cannot name, so
`load_chapter("02_linreg")` loads the file by path. Loading runs no training: every
chapter keeps its run behind `if __name__ == "__main__":`.

`--chapter PATH` grades another file in place of the chapter its name gives
(`pytest tests/test_02_linreg.py --chapter exercises/02_linreg.py`): every helper here
finds a chapter through `chapter_path`, and a failing test says which exercise of
tools/exercises.py it reached.
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
_chapter_paths = {}  # chapter name -> the file `--chapter` puts in its place


def chapter_path(name):
    """The file that stands for chapter `name`: the chapter, unless --chapter swapped it."""
    return _chapter_paths.get(name, ROOT / f"{name}.py")


def load_chapter(name):
    """Import chapter `name` (e.g. "02_linreg") as a module, once per test session."""
    if name not in _loaded:
        path = chapter_path(name)
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
    path = str(chapter_path(name))
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
    command = [sys.executable, str(chapter_path(name)), *map(str, args)]
    full_env = {**os.environ, **OFFLINE_ENV, "PYTHONHASHSEED": "0", **(env or {})}
    completed = subprocess.run(command, cwd=cwd or ROOT, env=full_env, capture_output=True,
                               text=True, timeout=timeout)
    return ChapterRun(completed)


def pytest_addoption(parser):
    parser.addoption("--chapter", action="append", default=[], metavar="PATH",
                     help="test the file PATH in place of the chapter its name gives "
                          "(exercises/02_linreg.py stands for 02_linreg.py); repeatable")


def pytest_configure(config):
    """Swap the chapters named by --chapter before any test module loads one."""
    for given in config.getoption("chapter"):
        path = Path(given).resolve()
        if not path.is_file() or not (ROOT / path.name).is_file():
            raise pytest.UsageError(f"--chapter {given}: not a copy of a chapter (the file "
                                    f"must exist and be named like one, e.g. 02_linreg.py)")
        _chapter_paths[path.stem] = path


def _exercises_tool():
    """tools/exercises.py, loaded by path (it is a tool, not a package)."""
    if "exercises_tool" not in sys.modules:
        spec = importlib.util.spec_from_file_location("exercises_tool",
                                                      ROOT / "tools" / "exercises.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["exercises_tool"]


def exercises_reached(report, excinfo):
    """The exercises a failure points at: a stub's message in the traceback names its
    exercise; otherwise a traceback line inside an exercise region of a swapped file;
    otherwise the exercises whose designated test this is."""
    tool = _exercises_tool()
    text = report.longreprtext
    named = [name for name in tool.STUB_MESSAGE.findall(text) if "." in name]
    if named:
        return list(dict.fromkeys(named))
    found = []
    for chapter, path in _chapter_paths.items():
        try:
            regions = tool.find_regions(chapter, path.read_text(encoding="utf-8"))
        except (OSError, tool.ExerciseError):
            continue
        for entry in excinfo.traceback if excinfo else []:
            if Path(str(entry.path)).resolve() == path:
                found += [region.name for region in regions
                          if region.start <= entry.lineno <= region.end]
    if found:
        return list(dict.fromkeys(found))
    test = report.location[2].split("[")[0]
    module = Path(report.location[0]).stem
    return [name for name, designated in tool.TESTS.items()
            if designated == test and module == f"test_{name.split('.')[0]}"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under --chapter, a failing test says which exercise it reached."""
    outcome = yield
    report = outcome.get_result()
    if not _chapter_paths or not report.failed:
        return
    names = exercises_reached(report, call.excinfo)
    if names:
        report.sections.append(("exercise", "this test checks exercise "
                                + ", ".join(names)))
        item.config.stash.setdefault(_REACHED, {}).update(dict.fromkeys(names))


_REACHED = pytest.StashKey()


def pytest_terminal_summary(terminalreporter, config):
    reached = config.stash.get(_REACHED, {})
    if reached:
        terminalreporter.write_line("exercises behind the failures: " + ", ".join(reached))


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
