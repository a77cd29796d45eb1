"""Tests of 01_linalg.py: the written-out dot product and matrix product against
numpy, finite-difference slopes against exact derivatives, the hand-set forecast,
and the chapter's quick run."""
import math

import numpy as np
import pytest

from conftest import has_matplotlib, load_chapter, run_chapter, without_matplotlib

chapter = load_chapter("01_linalg")


def test_dot_and_matmul_by_loops_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 5))
    assert chapter.dot(a[0], b[:, 0]) == pytest.approx(a[0] @ b[:, 0])
    np.testing.assert_allclose(chapter.matmul_by_loops(a, b), a @ b)
    with pytest.raises(ValueError):
        chapter.matmul_by_loops(a, a)
    with pytest.raises(ValueError):
        chapter.dot([1, 2], [1, 2, 3])


def test_slope_matches_exact_derivatives():
    assert chapter.slope(lambda x: x ** 2, 3.0) == pytest.approx(6.0, rel=1e-8)
    assert chapter.slope(math.sin, 0.3) == pytest.approx(math.cos(0.3), rel=1e-8)
    assert chapter.slope(math.exp, 1.0) == pytest.approx(math.e, rel=1e-8)


def test_least_squares_line_recovers_an_exact_line():
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(50, 3))
    weights, bias = chapter.least_squares_line(inputs, inputs @ [2.0, -1.0, 0.5] + 7.0)
    np.testing.assert_allclose(weights, [2.0, -1.0, 0.5], atol=1e-10)
    assert bias == pytest.approx(7.0, abs=1e-10)


def test_hand_set_model_pulls_towards_the_average():
    weights, bias = chapter.hand_set_model(0.8, 65.0)
    inputs = np.array([[75.0, 50.0, 0.2], [65.0, 40.0, 0.0]])
    # 10 °F above the average becomes 8 above; the average stays the average.
    np.testing.assert_allclose(chapter.linear_prediction(inputs, weights, bias), [73.0, 65.0])
    weights, bias = chapter.hand_set_model(1.0, 65.0)
    np.testing.assert_allclose(chapter.linear_prediction(inputs, weights, bias), inputs[:, 0])


def test_quick_run_beats_tomorrow_equals_today(tmp_path):
    run = run_chapter("01_linalg", "--quick", "--out", tmp_path, cwd=tmp_path)
    assert run.returncode == 0, run
    assert run.summary["chapter"] == "01_linalg" and run.summary["source"] == "generated"
    # The chapter's ladder: the hand-set pull beats "tomorrow = today" (by 0.08 °F on
    # the generated table, 0.09 on the real one), and least squares beats the pull.
    assert run.summary["hand_set_mae"] < run.summary["persistence_mae"] - 0.05
    assert run.summary["closed_form_mae"] < run.summary["hand_set_mae"]
    assert run.summary["hand_set_mae"] < 3.7
    assert run.summary["slope_error"] < 1e-6
    # The plot where matplotlib is installed, the text view where it is not.
    if has_matplotlib():
        assert (tmp_path / "01_linalg_slope.png").is_file(), run
    else:
        assert "matplotlib is not installed" in run.stdout, run


def test_without_matplotlib_prints_a_text_view(tmp_path):
    run = run_chapter("01_linalg", "--quick", "--out", tmp_path / "out", cwd=tmp_path,
                      env=without_matplotlib(tmp_path))
    assert run.returncode == 0 and run.summary["chapter"] == "01_linalg", run
    assert "matplotlib is not installed" in run.stdout, run
    assert "training MSE" in run.stdout, run
    assert not list(tmp_path.glob("out/*.png")), run
