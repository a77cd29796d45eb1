"""Tests of 05b_gru.py: the GRU's backward pass against finite differences and
torch.autograd, the code shared with 05_rnn.py kept identical, how far back the
gradient reaches, the quick run's figures and its clean errors."""
import inspect

import numpy as np
import pytest
import torch

from conftest import (assert_clean_error, has_matplotlib, load_chapter, run_chapter,
                      without_matplotlib)

chapter = load_chapter("05b_gru")
rnn_chapter = load_chapter("05_rnn")


def small_gru(seed=0, features=3, hidden_size=5, batch=4, steps=6):
    """A small GRU with random (non-zero) biases, random windows and targets."""
    rng = np.random.default_rng(seed)
    params = chapter.init_gru(features, hidden_size, rng)
    for name in params:
        if name.endswith("bias"):
            params[name] = params[name] + rng.normal(0, 0.3, params[name].shape)
    sequences = rng.normal(size=(batch, steps, features))
    targets = rng.normal(size=(batch, 1))
    return params, sequences, targets


def torch_gru_loss(params, sequences, targets):
    """The same GRU written with torch operations: the MSE, predictions and leaves."""
    leaves = {name: torch.tensor(array, requires_grad=True) for name, array in params.items()}
    inputs = torch.tensor(sequences, requires_grad=True)
    hidden = torch.zeros(sequences.shape[0], params["update_hidden_weight"].shape[0],
                         dtype=torch.float64)

    def gate(name, x, h):
        return x @ leaves[f"{name}_input_weight"] + h @ leaves[f"{name}_hidden_weight"] \
            + leaves[f"{name}_bias"]

    for step in range(sequences.shape[1]):
        x = inputs[:, step]
        update = torch.sigmoid(gate("update", x, hidden))
        reset = torch.sigmoid(gate("reset", x, hidden))
        candidate = torch.tanh(gate("candidate", x, reset * hidden))
        hidden = (1 - update) * hidden + update * candidate
    predictions = hidden @ leaves["output_weight"] + leaves["output_bias"]
    loss = ((predictions - torch.tensor(targets)) ** 2).mean()
    return loss, predictions, leaves, inputs


def test_sigmoid_is_stable_and_exact():
    x = np.array([-800.0, -2.0, 0.0, 2.0, 800.0])
    np.testing.assert_allclose(chapter.sigmoid(x), torch.sigmoid(torch.tensor(x)).numpy(),
                               rtol=1e-12)


def test_gru_backward_matches_finite_differences():
    params, sequences, targets = small_gru()
    error = chapter.network_gradient_error(params, chapter.gru_forward, chapter.gru_backward,
                                           sequences, targets)
    assert error < 1e-6
    predictions, cache = chapter.gru_forward(params, sequences)
    _, input_grad = chapter.gru_backward(params, cache, chapter.mse_grad(predictions, targets),
                                         with_input_grad=True)
    numeric = chapter.numerical_gradient(
        lambda: chapter.mse(chapter.gru_forward(params, sequences)[0], targets), sequences)
    np.testing.assert_allclose(input_grad, numeric, rtol=1e-5, atol=1e-8)


def test_gru_forward_and_backward_match_torch_autograd():
    params, sequences, targets = small_gru(seed=1, hidden_size=7, batch=5, steps=9)
    predictions, cache = chapter.gru_forward(params, sequences)
    grads, input_grad = chapter.gru_backward(params, cache,
                                             chapter.mse_grad(predictions, targets),
                                             with_input_grad=True)
    loss, torch_predictions, leaves, inputs = torch_gru_loss(params, sequences, targets)
    loss.backward()
    np.testing.assert_allclose(predictions, torch_predictions.detach().numpy(), rtol=1e-12)
    assert set(grads) == set(params)
    for name in params:
        np.testing.assert_allclose(grads[name], leaves[name].grad.numpy(), rtol=1e-9,
                                   atol=1e-12, err_msg=name)
    np.testing.assert_allclose(input_grad, inputs.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_code_shared_with_chapter_05_is_identical():
    # `diff 05_rnn.py 05b_gru.py` must show the gates, not drift in carried code.
    for name in ("download", "read_weather_csv", "load_weather", "split_data", "standardise",
                 "dense_forward", "dense_backward", "make_sequences", "init_rnn",
                 "rnn_forward", "rnn_backward", "parameter_list", "network_gradient_error",
                 "clip_by_global_norm", "train", "gradient_by_lag",
                 "recurrent_scale_experiment", "clipping_experiment", "plot_curves"):
        assert inspect.getsource(getattr(chapter, name)) == \
            inspect.getsource(getattr(rnn_chapter, name)), name


def test_fresh_gru_gradient_reaches_further_back_than_fresh_rnn():
    rng = np.random.default_rng(4)
    sequences = rng.normal(size=(128, 40, 3))
    targets = rng.normal(size=(128, 1))
    for seed in range(3):
        rnn = chapter.gradient_by_lag(chapter.init_rnn(3, 16, np.random.default_rng(seed)),
                                      chapter.rnn_forward, chapter.rnn_backward,
                                      sequences, targets)
        gru = chapter.gradient_by_lag(chapter.init_gru(3, 16, np.random.default_rng(seed)),
                                      chapter.gru_forward, chapter.gru_backward,
                                      sequences, targets)
        assert gru[39] / gru[0] > 100 * rnn[39] / rnn[0]


def test_memory_task_targets_are_the_first_day():
    table = chapter.generate_weather(0, days=200)[1]
    sequences, targets = chapter.make_memory_task(table, 7, 50, np.random.default_rng(0))
    assert sequences.shape == (50, 7, 3) and targets.shape == (50, 1)
    np.testing.assert_array_equal(targets[:, 0], sequences[:, 0, 0])


def test_gru_solves_the_memory_task_the_rnn_cannot():
    # The chapter's headline, at its default size (4000 windows of 25 days, 6 epochs):
    # the RNN stays near the average's MSE of 1, the GRU falls far below it.
    rng = np.random.default_rng(0)
    networks = {"rnn": (lambda size: chapter.init_rnn(3, size, rng), chapter.rnn_forward,
                        chapter.rnn_backward),
                "gru": (lambda size: chapter.init_gru(3, size, rng), chapter.gru_forward,
                        chapter.gru_backward)}
    results = chapter.memory_experiment(networks, chapter.generate_weather(0)[1], 25, 4000,
                                        32, 0.1, 6, 32, 1.0, rng)
    rnn, gru = (min(results[name][0]) for name in ("rnn", "gru"))
    assert rnn > 0.9 and gru < 0.5, (rnn, gru)


def test_quick_run_reaches_its_figures(tmp_path):
    # One BLAS thread: the matrices are small, and extra threads only spin (twice the
    # time or worse on a busy 2-core machine).
    run = run_chapter("05b_gru", "--quick", "--out", tmp_path, cwd=tmp_path,
                      env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run
    figures = run.summary
    assert figures["chapter"] == "05b_gru" and figures["source"] == "generated"
    # Generated weather, 2 epochs: both recurrent nets beat "tomorrow = today" (3.68 °F).
    assert figures["gru_test_mae"] < 3.7
    assert figures["gru_test_mae"] < figures["persistence_mae"]
    assert figures["rnn_test_mae"] < figures["persistence_mae"]
    assert figures["closed_form_mae"] < figures["persistence_mae"]
    assert figures["gradient_error"] < 1e-6
    assert figures["fresh_gru_first_day_gradient"] > 100 * figures["fresh_rnn_first_day_gradient"]
    if has_matplotlib():
        assert (tmp_path / "05b_gru_memory.png").stat().st_size > 0
        # The diagrams: chapter 05's unrolled RNN, carried, and the GRU cell's gates.
        assert (tmp_path / "05b_gru_unrolled.png").stat().st_size > 0
        assert (tmp_path / "05b_gru_cell.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in run.stdout


def test_without_matplotlib_the_numbers_are_the_view(tmp_path):
    run = run_chapter("05b_gru", "--quick", "--out", tmp_path, cwd=tmp_path,
                      env=without_matplotlib(tmp_path))
    assert run.returncode == 0, run
    assert "matplotlib is not installed" in run.stdout, run
    assert run.summary["gru_test_mae"] < run.summary["persistence_mae"]
    assert not list(tmp_path.glob("*.png"))
    # Both diagrams as text: the unrolled RNN, and the GRU cell with its keep path.
    assert "h_0 --W_h--> h_1" in run.stdout, run
    assert "* (1 - z_t)" in run.stdout and "(the keep path)" in run.stdout, run


def test_bad_inputs_are_clean_errors(tmp_path):
    lines = [",tmax,tmin,rain,tmax_tomorrow"]
    lines += [f"2000-01-{day:02d},{50 + day},{40 + day},0.0,{51 + day}" for day in range(1, 11)]
    (tmp_path / "short.csv").write_text("\n".join(lines) + "\n")
    run = run_chapter("05b_gru", "--data", "short.csv", "--window", "11", cwd=tmp_path)
    assert_clean_error(run, "window", "longer than the data")
    # Refused in-process too, before any work: the same DataError, hence exit code 2.
    for flag, value in (("--hidden-size", "0"), ("--hidden-size", "-3"),
                        ("--memory-window", "0")):
        with pytest.raises(chapter.DataError, match=flag):
            chapter.parse_args([flag, value])
