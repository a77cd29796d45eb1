"""Tests of 05_rnn.py: windows of days, the RNN's backpropagation through time against
finite differences and torch.autograd, clipping, the quick run's figures and its clean
errors."""
import numpy as np
import pytest
import torch

from conftest import (assert_clean_error, has_matplotlib, load_chapter, run_chapter,
                      without_matplotlib)

chapter = load_chapter("05_rnn")


def small_rnn(seed=0, features=3, hidden_size=5, batch=4, steps=6):
    """A small RNN with non-zero biases, random windows and targets."""
    rng = np.random.default_rng(seed)
    params = chapter.init_rnn(features, hidden_size, rng)
    params["hidden_bias"] = rng.normal(0, 0.3, params["hidden_bias"].shape)
    params["output_bias"] = rng.normal(0, 0.3, params["output_bias"].shape)
    sequences = rng.normal(size=(batch, steps, features))
    targets = rng.normal(size=(batch, 1))
    return params, sequences, targets


def torch_rnn_loss(params, sequences, targets):
    """The same RNN written with torch operations: the MSE, and the leaf tensors."""
    leaves = {name: torch.tensor(array, requires_grad=True) for name, array in params.items()}
    inputs = torch.tensor(sequences, requires_grad=True)
    hidden = torch.zeros(sequences.shape[0], params["hidden_weight"].shape[0],
                         dtype=torch.float64)
    for step in range(sequences.shape[1]):
        hidden = torch.tanh(inputs[:, step] @ leaves["input_weight"]
                            + hidden @ leaves["hidden_weight"] + leaves["hidden_bias"])
    predictions = hidden @ leaves["output_weight"] + leaves["output_bias"]
    loss = ((predictions - torch.tensor(targets)) ** 2).mean()
    return loss, predictions, leaves, inputs


def test_make_sequences_windows_and_targets():
    table = np.arange(40, dtype=float).reshape(10, 4)  # columns tmax, tmin, rain, tomorrow
    sequences, targets = chapter.make_sequences(table, 3)
    assert sequences.shape == (8, 3, 3) and targets.shape == (8, 1)
    np.testing.assert_array_equal(sequences[0], table[0:3, :3])
    np.testing.assert_array_equal(sequences[-1], table[7:10, :3])
    np.testing.assert_array_equal(targets[:, 0], table[2:, 3])
    assert chapter.make_sequences(table, 10)[0].shape == (1, 10, 3)
    with pytest.raises(chapter.DataError, match="longer than the data"):
        chapter.make_sequences(table, 11)


def test_rnn_backward_matches_finite_differences():
    params, sequences, targets = small_rnn()
    error = chapter.network_gradient_error(params, chapter.rnn_forward, chapter.rnn_backward,
                                           sequences, targets)
    assert error < 1e-6
    # The gradient with respect to the inputs, which measures how far back it reaches.
    predictions, cache = chapter.rnn_forward(params, sequences)
    _, input_grad = chapter.rnn_backward(params, cache, chapter.mse_grad(predictions, targets),
                                         with_input_grad=True)
    numeric = chapter.numerical_gradient(
        lambda: chapter.mse(chapter.rnn_forward(params, sequences)[0], targets), sequences)
    np.testing.assert_allclose(input_grad, numeric, rtol=1e-5, atol=1e-8)


def test_rnn_forward_and_backward_match_torch_autograd():
    params, sequences, targets = small_rnn(seed=1, hidden_size=7, batch=5, steps=9)
    predictions, cache = chapter.rnn_forward(params, sequences)
    grads, input_grad = chapter.rnn_backward(params, cache,
                                             chapter.mse_grad(predictions, targets),
                                             with_input_grad=True)
    loss, torch_predictions, leaves, inputs = torch_rnn_loss(params, sequences, targets)
    loss.backward()
    np.testing.assert_allclose(predictions, torch_predictions.detach().numpy(), rtol=1e-12)
    assert set(grads) == set(params)
    for name in params:
        np.testing.assert_allclose(grads[name], leaves[name].grad.numpy(), rtol=1e-9,
                                   atol=1e-12, err_msg=name)
    np.testing.assert_allclose(input_grad, inputs.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_dense_baseline_on_flattened_windows_matches_finite_differences():
    rng = np.random.default_rng(2)
    layers = chapter.init_dense([12, 6, 6, 1], rng)
    windows = rng.normal(size=(5, 4, 3))
    error = chapter.network_gradient_error(layers, chapter.dense_forward,
                                           chapter.dense_backward,
                                           chapter.flatten_windows(windows),
                                           rng.normal(size=(5, 1)))
    assert error < 1e-6


def test_clip_by_global_norm_keeps_direction_and_caps_length():
    grads = {"a": np.array([[3.0, 0.0]]), "b": np.array([[0.0], [4.0]])}  # norm 5
    assert chapter.clip_by_global_norm(grads, 10.0) == pytest.approx(5.0)
    np.testing.assert_array_equal(grads["a"], [[3.0, 0.0]])  # below the cap: untouched
    assert chapter.clip_by_global_norm(grads, 1.0) == pytest.approx(5.0)
    assert chapter.global_norm(grads) == pytest.approx(1.0)
    np.testing.assert_allclose(grads["a"], [[0.6, 0.0]])
    np.testing.assert_allclose(grads["b"], [[0.0], [0.8]])
    pairs = [(np.full((2, 2), 2.0), np.full((1, 2), 2.0))]  # the dense net's structure
    chapter.clip_by_global_norm(pairs, 1.0)
    assert chapter.global_norm(pairs) == pytest.approx(1.0)


def test_large_recurrent_weights_explode_and_small_ones_vanish():
    rng = np.random.default_rng(3)
    sequences = rng.normal(size=(64, 40, 3))
    targets = rng.normal(size=(64, 1))
    reach = chapter.recurrent_scale_experiment(sequences, targets, 16, (0.5, 3), rng)
    assert reach[0.5][39] < 1e-6 * reach[0.5][0]   # vanished 39 days back
    assert reach[3][39] > 1e3 * reach[3][0]        # exploded 39 days back


def test_quick_run_reaches_its_figures(tmp_path):
    # One BLAS thread: the matrices are small, and extra threads only spin (twice the
    # time or worse on a busy 2-core machine).
    run = run_chapter("05_rnn", "--quick", "--out", tmp_path, cwd=tmp_path,
                      env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run
    figures = run.summary
    assert figures["chapter"] == "05_rnn" and figures["source"] == "generated"
    # Generated weather, 2 epochs: the RNN beats "tomorrow = today" (3.68 °F) and the
    # dense network, which is still far from done.
    assert figures["rnn_test_mae"] < 3.7
    assert figures["rnn_test_mae"] < figures["persistence_mae"]
    assert figures["rnn_test_mae"] < figures["dense_test_mae"]
    assert figures["closed_form_mae"] < figures["persistence_mae"]
    assert figures["dense_test_mae"] < 4.5  # it learned: the average alone scores ~7 °F
    assert figures["gradient_error"] < 1e-6
    assert figures["unclipped_diverged"] and not figures["clipped_diverged"]
    assert figures["rnn_first_day_gradient"] < 0.2  # the gradient fades with the lag
    if has_matplotlib():
        assert (tmp_path / "05_rnn_clipping.png").stat().st_size > 0
        # The unrolled network with its backward arrows, drawn right after BPTT's prose.
        assert (tmp_path / "05_rnn_unrolled.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in run.stdout


def test_default_run_the_rnn_wins(tmp_path):
    # The chapter's headline, on its default run (a few seconds): the RNN beats the
    # dense network and chapter 02's least-squares line on the same test windows.
    run = run_chapter("05_rnn", "--out", tmp_path, cwd=tmp_path,
                      env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run
    figures = run.summary
    assert figures["rnn_test_mae"] < figures["dense_test_mae"] - 0.02, figures
    assert figures["rnn_test_mae"] < figures["closed_form_mae"] < figures["persistence_mae"]
    assert "least squares" in run.stdout and "rnn network" in run.stdout


def test_without_matplotlib_the_numbers_are_the_view(tmp_path):
    run = run_chapter("05_rnn", "--quick", "--out", tmp_path, cwd=tmp_path,
                      env={"OMP_NUM_THREADS": "1", **without_matplotlib(tmp_path)})
    assert run.returncode == 0, run
    assert "matplotlib is not installed" in run.stdout, run
    assert run.summary["rnn_test_mae"] < run.summary["persistence_mae"]
    assert not list(tmp_path.glob("*.png"))
    # The unrolled network as text: forward and backward through every hidden state.
    assert "h_0 --W_h--> h_1" in run.stdout and " <-delta- h_1" in run.stdout, run


def test_window_longer_than_the_data_is_a_clean_error(tmp_path):
    lines = [",tmax,tmin,rain,tmax_tomorrow"]
    lines += [f"2000-01-{day:02d},{50 + day},{40 + day},0.0,{51 + day}" for day in range(1, 11)]
    (tmp_path / "short.csv").write_text("\n".join(lines) + "\n")
    run = run_chapter("05_rnn", "--data", "short.csv", "--window", "30", cwd=tmp_path)
    assert_clean_error(run, "window", "longer than the data")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("--hidden-size", "0"), ("--hidden-size", "-3"),
                                         ("--window", "0"), ("--max-norm", "-1")])
def test_impossible_flags_are_refused_before_any_work(flag, value):
    # The same DataError that the run above turned into "error: ..." and exit code 2.
    with pytest.raises(chapter.DataError, match=flag):
        chapter.parse_args([flag, value])
