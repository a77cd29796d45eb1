"""Tests for tools/exercises.py: the exercises are there, each one alone stubbed makes
its chapter's own designated test fail with the stub's message (so no exercise goes
unchecked), a made copy fails through `--chapter` naming its exercises while the
chapter itself passes, and `make` never overwrites a learner's work."""
import importlib
import importlib.util
import itertools
import json
import subprocess
import sys
import traceback
import xml.etree.ElementTree as ElementTree
from contextlib import contextmanager

import pytest

import conftest
from conftest import ROOT, load_chapter

tool = conftest._exercises_tool()
EXERCISES = tool.all_exercises()
CHAPTERS = sorted({exercise.chapter for exercise in EXERCISES})
# Every chapter's tests, imported now as collection would: importing one later could be
# too late (12_triton must choose Triton's interpreter before anything imports triton).
TEST_MODULES = {chapter: importlib.import_module(f"test_{chapter}") for chapter in CHAPTERS}


def test_at_least_thirty_exercises_over_twelve_chapters_each_with_its_test():
    assert len(EXERCISES) >= 30 and len(CHAPTERS) >= 12, (len(EXERCISES), CHAPTERS)
    assert len({exercise.name for exercise in EXERCISES}) == len(EXERCISES)
    assert set(tool.TESTS) == {exercise.name for exercise in EXERCISES}
    for exercise in EXERCISES:
        source = (ROOT / "tests" / f"test_{exercise.chapter}.py").read_text(encoding="utf-8")
        assert f"def {exercise.test}(" in source, exercise.name
    # A carried region is the earlier chapter's exercise, not a second one.
    assert "03_dense.mse_grad" not in tool.TESTS and "02_linreg.mse_grad" in tool.TESTS


def parameter_sets(function):
    """Every combination of the test's parametrize marks, as keyword arguments."""
    axes = []
    for mark in getattr(function, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
        rows = []
        for value in mark.args[1]:
            if hasattr(value, "marks") and hasattr(value, "values"):  # pytest.param
                value = value.values
            elif len(names) == 1:
                value = (value,)
            rows.append(dict(zip(names, value)))
        axes.append(rows)
    for combination in itertools.product(*axes):
        yield {key: value for row in combination for key, value in row.items()}


@contextmanager
def chapter_swapped(chapter, module, path):
    """The chapter's test module, with `module` (loaded from `path`) wherever the test
    module and the helpers of conftest would use the chapter."""
    real = load_chapter(chapter)
    tests = TEST_MODULES[chapter]
    saved = dict(vars(tests))
    saved_path = conftest._chapter_paths.get(chapter)
    for name, value in saved.items():
        if value is real:
            setattr(tests, name, module)
        elif not name.startswith("__") and hasattr(module, name) \
                and getattr(real, name, None) is value:
            setattr(tests, name, getattr(module, name))   # e.g. `Tensor = chapter.Tensor`
    conftest._loaded[chapter], conftest._chapter_paths[chapter] = module, path
    try:
        yield tests
    finally:
        vars(tests).update(saved)
        conftest._loaded[chapter] = real
        if saved_path is None:
            conftest._chapter_paths.pop(chapter, None)
        else:
            conftest._chapter_paths[chapter] = saved_path


def load_copy(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_designated(chapter, source, test_name, folder, tmp_path_factory):
    """Run one test function of the chapter against `source`, every parameter set,
    in this process; the formatted failure, or None when every set passes."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{chapter}.py"
    path.write_text(source, encoding="utf-8")
    name = f"exercise_copy_{chapter}_{folder.name}"
    module = load_copy(path, name)
    try:
        with chapter_swapped(chapter, module, path) as tests:
            test = getattr(tests, test_name)
            for arguments in parameter_sets(test):
                with pytest.MonkeyPatch.context() as monkeypatch:
                    fixtures = {"tmp_path": tmp_path_factory.mktemp("t"),
                                "monkeypatch": monkeypatch}
                    needed = test.__code__.co_varnames[:test.__code__.co_argcount]
                    arguments.update({n: fixtures[n] for n in needed if n not in arguments})
                    try:
                        test(**arguments)
                    except Exception as error:      # noqa: BLE001 - any failure counts
                        return "".join(traceback.format_exception(error))
    finally:
        sys.modules.pop(name, None)
    return None


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_each_exercise_alone_stubbed_fails_its_test(chapter, tmp_path, tmp_path_factory):
    """Proof that the tests can fail: each exercise, the only one stubbed, makes its
    designated test fail with that stub's message; the chapter's own text, loaded from
    another path the same way, passes those tests."""
    original = (ROOT / f"{chapter}.py").read_text(encoding="utf-8")
    exercises = [exercise for exercise in EXERCISES if exercise.chapter == chapter]
    for test_name in dict.fromkeys(exercise.test for exercise in exercises):
        assert run_designated(chapter, original, test_name, tmp_path / "solution",
                              tmp_path_factory) is None, test_name
    for index, exercise in enumerate(exercises):
        failure = run_designated(chapter, tool.learner_source(chapter, only=exercise.name),
                                 exercise.test, tmp_path / f"stub{index}", tmp_path_factory)
        assert failure is not None, f"{exercise.name}: {exercise.test} passes with the stub"
        assert f"exercise {exercise.name}: " in failure, failure[-2000:]


def pytest_outcomes(report):
    """{node name: failure text or None} from a junit report."""
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        outcomes[case.get("name")] = None if problem is None else (
            problem.get("message", "") + (problem.text or ""))
    return outcomes


def test_made_copies_fail_through_the_option_naming_their_exercises(tmp_path):
    """The learner's copies of every chapter, swapped in with --chapter in one pytest
    run: each chapter's designated tests fail, each failure names one of that chapter's
    exercises, and the summary lists the exercises behind the failures."""
    made = [tool.make(chapter, tmp_path / "exercises") for chapter in CHAPTERS]
    nodes = sorted({tool.test_node(exercise) for exercise in EXERCISES})
    report = tmp_path / "report.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", *nodes]
    for path in made:
        command += ["--chapter", str(path)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    outcomes = pytest_outcomes(report)
    assert outcomes and all(text is not None for text in outcomes.values()), outcomes
    for chapter in CHAPTERS:
        names = [e.name for e in EXERCISES if e.chapter == chapter]
        failures = [text for node, text in outcomes.items()
                    if any(node.split("[")[0] == e.test for e in EXERCISES
                           if e.chapter == chapter)]
        assert failures and all(any(f"exercise {n}: " in text for n in names)
                                for text in failures), chapter
    assert "exercises behind the failures: " in run.stdout
    assert "this test checks exercise " in run.stdout


def test_chapters_pass_through_the_option(tmp_path):
    """--chapter with each chapter's own file, copied elsewhere: the designated tests
    pass, so a failure of a copy is the copy's, not the option's."""
    copies = tmp_path / "copies"
    copies.mkdir()
    for chapter in CHAPTERS:
        (copies / f"{chapter}.py").write_bytes((ROOT / f"{chapter}.py").read_bytes())
    nodes = sorted({tool.test_node(exercise) for exercise in EXERCISES})
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodes]
    for chapter in CHAPTERS:
        command += ["--chapter", str(copies / f"{chapter}.py")]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "exercises.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_make_keeps_edits_list_grades_and_bad_names_are_refused(tmp_path):
    out = tmp_path / "exercises"
    assert run_tool("make", "01_linalg", "--out", out).returncode == 0
    copy = out / "01_linalg.py"
    text = copy.read_text(encoding="utf-8")
    assert json.loads((out / ".made.json").read_text())["01_linalg.py"] == tool.digest(text)
    assert text.count("raise NotImplementedError(") == 4
    # Making again over an untouched copy is fine; over an edited one it is refused.
    assert run_tool("make", "01_linalg", "--out", out).returncode == 0
    solution = tool.exercises_of("01_linalg")
    slope = next(e for e in solution if e.name == "01_linalg.slope")
    dot = next(e for e in solution if e.name == "01_linalg.dot")
    marker, *_, end = slope.text.splitlines(keepends=True)
    text = text.replace(marker + slope.stub + end, slope.text)   # the solution, back
    text = text.replace(dot.stub, dot.indent + "return 0.0\n")
    copy.write_text(text, encoding="utf-8")
    refused = run_tool("make", "01_linalg", "--out", out)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr and copy.read_text(encoding="utf-8") == text
    listing = run_tool("list", "--out", out).stdout.splitlines()
    states = {line.rsplit("[", 1)[1].split("]")[0]: line.rsplit("-- ", 1)[1]
              for line in listing if line.startswith("01_linalg")}
    assert states == {"dot": "fails", "matmul_by_loops": "stub", "slope": "passes",
                      "least_squares_line": "stub"}, listing
    assert all(line.endswith("-- not made") for line in listing
               if line.startswith("02_linreg"))
    assert run_tool("make", "01_linalg", "--out", out, "--force").returncode == 0
    assert copy.read_text(encoding="utf-8") == tool.learner_source("01_linalg")
    bad = run_tool("make", "99_nothing", "--out", out)
    assert bad.returncode == 2 and "no chapter" in bad.stderr
