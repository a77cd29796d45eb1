"""Tests of 03_dense.py: ReLU, He initialisation, the forward pass, backpropagation
against finite differences and torch.autograd, and the chapter's quick run."""
import numpy as np
import pytest
import torch

from conftest import load_chapter, run_chapter

chapter = load_chapter("03_dense")


def finite_differences(loss_of, array, step=1e-6):
    """Central differences of loss_of() with respect to each entry of array."""
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + step
        up = loss_of()
        array[index] = original - step
        down = loss_of()
        array[index] = original
        gradient[index] = (up - down) / (2 * step)
    return gradient


def small_network(seed=0, sizes=(4, 6, 5, 2), rows=9):
    rng = np.random.default_rng(seed)
    layers = chapter.init_dense(list(sizes), rng)
    # Non-zero biases, so the test also covers them.
    layers = [(weight, rng.normal(size=bias.shape)) for weight, bias in layers]
    inputs = rng.normal(size=(rows, sizes[0]))
    targets = rng.normal(size=(rows, sizes[-1]))
    return layers, inputs, targets


def test_relu():
    np.testing.assert_array_equal(chapter.relu(np.array([-2.0, 0.0, 3.0])), [0, 0, 3])


def test_init_dense_shapes_and_he_scale():
    layers = chapter.init_dense([3, 400, 200, 1], np.random.default_rng(0))
    assert [(weight.shape, bias.shape) for weight, bias in layers] == [
        ((3, 400), (1, 400)), ((400, 200), (1, 200)), ((200, 1), (1, 1))]
    assert all(not bias.any() for _, bias in layers)
    assert layers[1][0].std() == pytest.approx(np.sqrt(2 / 400), rel=0.03)
    # The point of He initialisation: the signal keeps its size through ReLU layers.
    deep = chapter.init_dense([64] * 9, np.random.default_rng(1))
    spreads = chapter.signal_spreads(deep, np.random.default_rng(2).normal(size=(2000, 64)))
    assert 0.4 < spreads[-1] / spreads[0] < 2.5


def test_forward_is_relu_between_layers_and_linear_at_the_end():
    layers, inputs, _ = small_network()
    outputs, cache = chapter.dense_forward(layers, inputs)
    hidden = inputs
    for weight, bias in layers[:-1]:
        hidden = np.maximum(hidden @ weight + bias, 0)
    np.testing.assert_allclose(outputs, hidden @ layers[-1][0] + layers[-1][1])
    assert len(cache) == len(layers)
    # One layer and no hidden layer: exactly chapter 02's linear model.
    single = [(np.array([[2.0], [-1.0]]), np.array([[0.5]]))]
    np.testing.assert_allclose(chapter.dense_forward(single, np.array([[1.0, 3.0]]))[0],
                               [[-0.5]])


def test_backpropagation_matches_finite_differences():
    layers, inputs, targets = small_network()
    outputs, cache = chapter.dense_forward(layers, inputs)
    by_hand = chapter.dense_backward(layers, cache, chapter.mse_grad(outputs, targets))

    def loss_of():
        return chapter.mse(chapter.dense_forward(layers, inputs)[0], targets)

    for (weight, bias), (weight_grad, bias_grad) in zip(layers, by_hand):
        assert weight_grad.shape == weight.shape and bias_grad.shape == bias.shape
        np.testing.assert_allclose(weight_grad, finite_differences(loss_of, weight),
                                   rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(bias_grad, finite_differences(loss_of, bias),
                                   rtol=1e-5, atol=1e-8)
    assert chapter.gradient_error(layers, inputs, targets) < 1e-6


def test_backpropagation_matches_autograd():
    layers, inputs, targets = small_network(seed=5, sizes=(3, 8, 8, 8, 1), rows=16)
    outputs, cache = chapter.dense_forward(layers, inputs)
    by_hand = chapter.dense_backward(layers, cache, chapter.mse_grad(outputs, targets))
    parameters = [(torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True))
                  for weight, bias in layers]
    hidden = torch.tensor(inputs)
    for index, (weight, bias) in enumerate(parameters):
        hidden = hidden @ weight + bias
        if index < len(parameters) - 1:
            hidden = torch.relu(hidden)
    np.testing.assert_allclose(hidden.detach().numpy(), outputs, rtol=1e-12)
    torch.mean((hidden - torch.tensor(targets)) ** 2).backward()
    for (weight, bias), (weight_grad, bias_grad) in zip(parameters, by_hand):
        np.testing.assert_allclose(weight_grad, weight.grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(bias_grad, bias.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_network_learns_a_curve_a_line_cannot():
    # y = |x|: least squares can only fit a flat line; two ReLU layers fit the bend.
    rng = np.random.default_rng(0)
    inputs = rng.uniform(-2, 2, size=(800, 1))
    targets = np.abs(inputs)
    line_mae = chapter.evaluate(chapter.least_squares(inputs, targets), inputs, targets)
    layers, history = chapter.train(chapter.fresh_model((inputs, targets), [16, 16], rng),
                                    (inputs, targets), (inputs, targets), 0.02, 30, 16,
                                    np.random.default_rng(1))
    assert line_mae > 0.45
    assert history[-1][1] < 0.1


def test_quick_run_ties_with_least_squares(tmp_path):
    run = run_chapter("03_dense", "--quick", "--out", tmp_path, cwd=tmp_path)
    assert run.returncode == 0, run
    assert run.summary["chapter"] == "03_dense" and run.summary["source"] == "generated"
    # The chapter's claim: the network and the line tie within a few hundredths (the
    # generated table's bends are worth about 0.01 °F), and both beat "tomorrow = today".
    assert abs(run.summary["test_mae"] - run.summary["closed_form_mae"]) < 0.04
    assert run.summary["test_mae"] < run.summary["persistence_mae"] - 0.05
    assert run.summary["gradient_error"] < 1e-6


def test_bad_hidden_size_is_refused():
    with pytest.raises(chapter.DataError, match="--hidden-sizes"):
        chapter.parse_args(["--hidden-sizes", "32", "0"])
