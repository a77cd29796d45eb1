"""Tests for 06_autograd.py: every Tensor operation's gradient against torch.autograd
(and a composite against finite differences), a 100,000-node graph, the rebuilt dense
and recurrent networks against their hand-written versions, the optimisers against
torch.optim, a --quick run and its figures, and clear errors for bad inputs."""
import math

import numpy as np
import pytest
import torch

from conftest import (assert_clean_error, has_matplotlib, load_chapter, run_as_script,
                      run_chapter, without_matplotlib)

chapter = load_chapter("06_autograd")
Tensor = chapter.Tensor


def positive(shape):
    """Random numbers well away from 0, for log, division and fractional powers."""
    return lambda rng: rng.uniform(0.5, 2.0, size=shape)


def normal(shape):
    return lambda rng: rng.normal(size=shape)


# (name, engine function, torch function, makers of the inputs). The inputs are
# random; shapes include broadcasting (size-1 and missing leading axes) and keepdims.
CASES = [
    ("add", lambda a, b: a + b, lambda a, b: a + b, [normal((3, 4)), normal((4,))]),
    ("add-3d", lambda a, b: a + b, lambda a, b: a + b, [normal((2, 1, 4)), normal((3, 1))]),
    ("sub", lambda a, b: a - b, lambda a, b: a - b, [normal((3, 1)), normal((1, 4))]),
    ("mul", lambda a, b: a * b, lambda a, b: a * b, [normal((2, 3, 4)), normal((3, 1))]),
    ("div", lambda a, b: a / b, lambda a, b: a / b, [normal((3, 4)), positive((1, 4))]),
    ("pow2", lambda a: a ** 2, lambda a: a ** 2, [normal((3, 4))]),
    ("pow3", lambda a: a ** 3, lambda a: a ** 3, [normal((5,))]),
    ("pow-half", lambda a: a ** 0.5, lambda a: a ** 0.5, [positive((2, 3))]),
    ("pow-negative", lambda a: a ** -1.5, lambda a: a ** -1.5, [positive((2, 3))]),
    ("neg", lambda a: -a, lambda a: -a, [normal((3, 2))]),
    ("scalars-left", lambda a: 2 - a * 3 + 1 / a, lambda a: 2 - a * 3 + 1 / a,
     [positive((4,))]),
    ("scalars-right", lambda a: (a + 1.5) / 2 - 0.5, lambda a: (a + 1.5) / 2 - 0.5,
     [normal((2, 2))]),
    ("array-left", lambda a: np.arange(4.0) * a, lambda a: torch.arange(4.0, dtype=a.dtype) * a,
     [normal((3, 4))]),
    ("reuse", lambda a: a * a + a, lambda a: a * a + a, [normal((3, 3))]),
    ("matmul", lambda a, b: a @ b, lambda a, b: a @ b, [normal((3, 4)), normal((4, 5))]),
    ("matmul-batch-by-matrix", lambda a, b: a @ b, lambda a, b: a @ b,
     [normal((2, 3, 4)), normal((4, 5))]),
    ("matmul-batch", lambda a, b: a @ b, lambda a, b: a @ b,
     [normal((2, 3, 4)), normal((2, 4, 5))]),
    ("matmul-broadcast-batch", lambda a, b: a @ b, lambda a, b: a @ b,
     [normal((2, 3, 4)), normal((1, 4, 5))]),
    ("sum", lambda a: a.sum(), lambda a: a.sum(), [normal((3, 4))]),
    ("sum-axis", lambda a: a.sum(axis=0), lambda a: a.sum(dim=0), [normal((3, 4))]),
    ("sum-keepdims", lambda a: a.sum(axis=1, keepdims=True),
     lambda a: a.sum(dim=1, keepdim=True), [normal((3, 4))]),
    ("sum-axes", lambda a: a.sum(axis=(0, 2)), lambda a: a.sum(dim=(0, 2)),
     [normal((2, 3, 4))]),
    ("mean", lambda a: a.mean(), lambda a: a.mean(), [normal((3, 4))]),
    ("mean-axis", lambda a: a.mean(axis=-1), lambda a: a.mean(dim=-1), [normal((2, 3, 4))]),
    ("mean-keepdims", lambda a: a.mean(axis=0, keepdims=True),
     lambda a: a.mean(dim=0, keepdim=True), [normal((3, 4))]),
    ("max", lambda a: a.max(), lambda a: a.amax(), [normal((3, 4))]),
    ("max-axis", lambda a: a.max(axis=1), lambda a: a.amax(dim=1), [normal((3, 4))]),
    ("max-keepdims", lambda a: a.max(axis=0, keepdims=True),
     lambda a: a.amax(dim=0, keepdim=True), [normal((3, 4, 2))]),
    ("reshape", lambda a: a.reshape(6, 2), lambda a: a.reshape(6, 2), [normal((3, 4))]),
    ("reshape-tuple", lambda a: a.reshape((2, -1)), lambda a: a.reshape(2, -1),
     [normal((3, 4))]),
    ("transpose", lambda a: a.transpose(), lambda a: a.permute(1, 0), [normal((3, 4))]),
    ("transpose-axes", lambda a: a.transpose(2, 0, 1), lambda a: a.permute(2, 0, 1),
     [normal((2, 3, 4))]),
    ("T", lambda a: a.T, lambda a: a.T, [normal((3, 4))]),
    ("slice", lambda a: a[1:3], lambda a: a[1:3], [normal((4, 3))]),
    ("column", lambda a: a[:, 0], lambda a: a[:, 0], [normal((4, 3))]),
    ("step", lambda a: a[::-2, 1:], lambda a: a.flip(0)[::2, 1:], [normal((5, 3))]),
    ("repeated-index", lambda a: a[[0, 0, 2]], lambda a: a[[0, 0, 2]], [normal((3, 2))]),
    ("pairs-index", lambda a: a[np.arange(3), [1, 0, 1]],
     lambda a: a[torch.arange(3), torch.tensor([1, 0, 1])], [normal((3, 2))]),
    ("exp", lambda a: a.exp(), lambda a: a.exp(), [normal((3, 4))]),
    ("log", lambda a: a.log(), lambda a: a.log(), [positive((3, 4))]),
    ("tanh", lambda a: a.tanh(), lambda a: a.tanh(), [normal((3, 4))]),
    ("sigmoid", lambda a: a.sigmoid(), lambda a: a.sigmoid(), [normal((3, 4))]),
    ("relu", lambda a: a.relu(), lambda a: a.relu(), [normal((3, 4))]),
    ("softmax", lambda a: a.softmax(), lambda a: a.softmax(dim=-1), [normal((3, 4))]),
    ("softmax-axis0", lambda a: a.softmax(axis=0), lambda a: a.softmax(dim=0),
     [normal((3, 4))]),
    ("log_softmax", lambda a: a.log_softmax(), lambda a: a.log_softmax(dim=-1),
     [normal((3, 4))]),
    ("log_softmax-axis0", lambda a: a.log_softmax(axis=0), lambda a: a.log_softmax(dim=0),
     [normal((2, 3, 4))]),
    ("cross_entropy", lambda a: chapter.cross_entropy(a, np.array([0, 3, 1, 3, 2])),
     lambda a: torch.nn.functional.cross_entropy(a, torch.tensor([0, 3, 1, 3, 2])),
     [normal((5, 4))]),
    ("mse", lambda a, b: chapter.tensor_mse(a, b), lambda a, b: ((a - b) ** 2).mean(),
     [normal((6, 1)), normal((6, 1))]),
]


@pytest.mark.parametrize("name, engine_function, torch_function, makers", CASES,
                         ids=[case[0] for case in CASES])
def test_gradient_matches_torch(name, engine_function, torch_function, makers):
    rng = np.random.default_rng(sum(map(ord, name)))
    arrays = [make(rng) for make in makers]
    tensors = [Tensor(array, requires_grad=True) for array in arrays]
    torch_tensors = [torch.tensor(array, requires_grad=True) for array in arrays]
    out = engine_function(*tensors)
    torch_out = torch_function(*torch_tensors)
    np.testing.assert_allclose(out.data, torch_out.detach().numpy(), rtol=1e-12, atol=1e-12)
    # Weigh the outputs with random numbers, so that every output element gets its own
    # gradient (a plain sum would give 1 everywhere and hide mistakes).
    weights = rng.normal(size=out.shape)
    (out * weights).sum().backward()
    (torch_out * torch.tensor(weights)).sum().backward()
    for tensor, torch_tensor in zip(tensors, torch_tensors):
        assert tensor.grad.shape == tensor.data.shape
        np.testing.assert_allclose(tensor.grad, torch_tensor.grad.numpy(), rtol=1e-10,
                                   atol=1e-12)


def test_composite_matches_finite_differences():
    """A small network-like expression: the engine's gradient against central
    differences, independently of torch."""
    rng = np.random.default_rng(1)
    inputs, weight, bias = rng.normal(size=(5, 3)), rng.normal(size=(3, 4)), rng.normal(size=(4,))

    def loss_of(weight):
        weight = weight if isinstance(weight, Tensor) else Tensor(weight)
        hidden = (Tensor(inputs) @ weight + bias).tanh()
        return (hidden.softmax(axis=1).log() * hidden.sigmoid()).mean(axis=0).max()

    tensor = Tensor(weight, requires_grad=True)
    loss_of(tensor).backward()
    numeric = np.zeros_like(weight)
    for index in np.ndindex(weight.shape):
        step = np.zeros_like(weight)
        step[index] = 1e-6
        numeric[index] = (loss_of(weight + step).item() - loss_of(weight - step).item()) / 2e-6
    np.testing.assert_allclose(tensor.grad, numeric, rtol=1e-6, atol=1e-9)


def test_worked_example_in_the_text():
    x = Tensor([[1.0, 2.0]])
    w = Tensor([[0.5], [-1.0]], requires_grad=True)
    loss = ((x @ w - 3) ** 2).mean()
    loss.backward()
    assert loss.item() == 20.25
    np.testing.assert_array_equal(w.grad, [[-9.0], [-18.0]])


def test_float32_stays_float32():
    x = Tensor(np.ones((2, 3), dtype=np.float32), requires_grad=True)
    loss = ((x * 2.5 + 1) ** 2).mean()
    loss.backward()
    assert loss.data.dtype == np.float32 and x.grad.dtype == np.float32


def test_leaf_gradients_accumulate_until_zero_grad():
    x = Tensor([1.0, 2.0], requires_grad=True)
    (x * 3).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, [6.0, 6.0])
    x.zero_grad()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, [2.0, 4.0])


def test_graph_of_100000_nodes():
    """A chain far deeper than Python's recursion limit, h <- tanh(w h) 50,000 times.
    Its gradients are checked against backpropagation written out with Python floats:
    going back one step multiplies by tanh'(w h) w, and w collects tanh'(w h) h."""
    start, scale = [0.3, -1.2, 0.8], 1.01
    x, w = Tensor(start, requires_grad=True), Tensor([scale], requires_grad=True)
    hidden = x
    for _ in range(50_000):
        hidden = (hidden * w).tanh()
    loss = hidden.sum()
    assert len(chapter.topological_order(loss)) > 100_000
    loss.backward()
    total_scale_grad = 0.0   # w is shared by the three elements: their parts add up
    for element, value in enumerate(start):
        states = [value]
        for _ in range(50_000):
            states.append(math.tanh(scale * states[-1]))
        grad, scale_grad = 1.0, 0.0
        for step in reversed(range(50_000)):
            local = 1 - states[step + 1] ** 2
            scale_grad += grad * local * states[step]
            grad *= local * scale
        assert x.grad[element] == pytest.approx(grad, rel=1e-9)
        total_scale_grad += scale_grad
    assert w.grad[0] == pytest.approx(total_scale_grad, rel=1e-9)


def test_rebuilt_dense_network_has_the_hand_written_gradients():
    rng = np.random.default_rng(3)
    layers = chapter.init_dense([3, 16, 8, 1], rng)
    inputs, targets = rng.normal(size=(20, 3)), rng.normal(size=(20, 1))
    difference = chapter.gradient_difference(layers, chapter.dense_forward,
                                             chapter.dense_backward,
                                             chapter.tensor_dense_forward, inputs, targets)
    assert difference < 1e-12


def test_rebuilt_rnn_has_the_hand_written_gradients():
    rng = np.random.default_rng(4)
    params = chapter.init_rnn(3, 6, rng)
    sequences, targets = rng.normal(size=(10, 5, 3)), rng.normal(size=(10, 1))
    difference = chapter.gradient_difference(params, chapter.rnn_forward, chapter.rnn_backward,
                                             chapter.tensor_rnn_forward, sequences, targets)
    assert difference < 1e-12


def test_engine_trains_to_the_hand_written_figures():
    """Same weights, same batches: chapter 05's `train` driven by the engine ends with
    the same weights as with the hand-written backward passes, for the dense network
    and for the recurrent one (with clipping)."""
    _, table = chapter.generate_weather(seed=5, days=500)
    (train_x, train_y), (valid_x, valid_y), (test_x, _) = \
        chapter.split_data(table[:, :3], table[:, 3:])
    train_x, valid_x, test_x = chapter.standardise(train_x, valid_x, test_x)
    start = chapter.fresh_model((train_x, train_y), [8], np.random.default_rng(0))
    hand, engine, hand_history, engine_history = chapter.compare_training(
        "dense", start, chapter.dense_forward, chapter.dense_backward,
        chapter.tensor_dense_forward, ((train_x, train_y), (valid_x, valid_y)),
        (2, 0.001, 32, None), np.random.default_rng(0))
    np.testing.assert_allclose(hand_history["valid_loss"], engine_history["valid_loss"],
                               rtol=1e-12)
    np.testing.assert_allclose(chapter.dense_forward(hand, test_x)[0],
                               chapter.dense_forward(engine, test_x)[0], rtol=1e-12)
    splits = chapter.split_data(*chapter.make_sequences(table, 4))
    sequences = chapter.standardise(*(inputs for inputs, _ in splits))
    targets = chapter.standardise(*(targets for _, targets in splits))
    rng = np.random.default_rng(0)
    params = chapter.init_rnn(3, 5, rng)
    hand, engine, hand_history, engine_history = chapter.compare_training(
        "recurrent", params, chapter.rnn_forward, chapter.rnn_backward,
        chapter.tensor_rnn_forward, ((sequences[0], targets[0]), (sequences[1], targets[1])),
        (2, 0.02, 16, 1.0), rng)
    np.testing.assert_allclose(hand_history["grad_norm"], engine_history["grad_norm"],
                               rtol=1e-10)
    for name in params:
        np.testing.assert_allclose(hand[name], engine[name], rtol=1e-10, atol=1e-12)


def test_training_loop_with_optimiser_learns():
    """The engine's own loop (zero_grad, backward, step) with Adam fits a line."""
    rng = np.random.default_rng(7)
    inputs = rng.normal(size=(200, 2))
    targets = inputs @ np.array([[2.0], [-1.0]]) + 0.5
    layers = chapter.as_tensors([(np.zeros((2, 1)), np.zeros((1, 1)))])
    losses = chapter.train_with_engine(lambda batch: chapter.tensor_dense_forward(layers, batch),
                                       chapter.Adam(chapter.parameter_list(layers), 0.05),
                                       (inputs, targets), 30, 20, rng)
    assert losses[-1] < 1e-3 < losses[0]
    np.testing.assert_allclose(layers[0][0].data[:, 0], [2.0, -1.0], atol=0.02)


def test_optimisers_match_torch():
    rng = np.random.default_rng(6)
    start, target = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    for engine_optimizer, torch_optimizer in [
            (lambda p: chapter.SGD(p, 0.1, momentum=0.9),
             lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
            (lambda p: chapter.Adam(p, 0.05), lambda p: torch.optim.Adam(p, lr=0.05))]:
        weight = Tensor(start.copy(), requires_grad=True)
        torch_weight = torch.tensor(start.copy(), requires_grad=True)
        optimizer, torch_opt = engine_optimizer([weight]), torch_optimizer([torch_weight])
        for _ in range(4):
            optimizer.zero_grad()
            ((weight - target) ** 4).sum().backward()
            optimizer.step()
            torch_opt.zero_grad()
            ((torch_weight - torch.tensor(target)) ** 4).sum().backward()
            torch_opt.step()
        np.testing.assert_allclose(weight.data, torch_weight.detach().numpy(), rtol=1e-10)


def test_graph_view_lists_nodes_shapes_and_gradients():
    weight = Tensor(np.ones((3, 2)), requires_grad=True, name="weight")
    loss = (Tensor(np.ones((4, 3))) @ weight).relu().mean()
    loss.backward()
    view = chapter.show_graph(loss)
    assert "graph of 5 nodes" in view
    for expected in ("weight", "(3, 2)", "@", "relu", "mean", "(4, 2)", "0.5"):
        assert expected in view, (expected, view)
    long = Tensor(1.0, requires_grad=True)
    for _ in range(100):
        long = long * 1.0
    assert "more nodes" in chapter.show_graph(long.sum(), limit=10)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        Tensor(np.ones((2, 3))) @ Tensor(np.ones((4, 5)), requires_grad=True)
    with pytest.raises(ValueError, match="single number"):
        (Tensor(np.ones(3), requires_grad=True) * 2).backward()
    with pytest.raises(TypeError, match="exponent"):
        Tensor(2.0) ** Tensor(3.0)
    with pytest.raises(ValueError, match="one target class per row"):
        chapter.cross_entropy(Tensor(np.ones((3, 4))), [0, 1])


def test_benchmark_times_all_three():
    timings = chapter.benchmark(batch_size=8, hidden_size=8, repeats=3)
    assert set(timings) == {"by hand", "engine", "torch"}
    assert all(np.isfinite(fastest) and fastest > 0 for fastest, _ in timings.values())
    # The engine does the hand-written step's arithmetic plus its bookkeeping (a node
    # per operation, a sort, a backward closure each): on a network this small the
    # bookkeeping dominates, so its fastest step cannot beat the hand-written one.
    assert timings["engine"][0] > timings["by hand"][0], timings


def test_quick_run_reaches_its_figures(tmp_path):
    run = run_chapter("06_autograd", "--quick", "--out", tmp_path, cwd=tmp_path)
    assert run.returncode == 0, run
    figures = run.summary
    assert figures["chapter"] == "06_autograd" and "seconds" in figures
    # Stated figures: on the generated weather, after 2 epochs, both networks beat
    # "tomorrow = today" (3.68 °F), and the engine ends with the hand-written weights
    # (to rounding).
    assert figures["dense_test_mae_engine"] < figures["persistence_mae"], run
    assert figures["rnn_test_mae_engine"] < figures["persistence_mae"], run
    assert figures["closed_form_mae"] < figures["persistence_mae"], run
    assert "least squares" in run.stdout
    assert abs(figures["dense_test_mae_engine"] - figures["dense_test_mae_by_hand"]) < 1e-3
    assert abs(figures["rnn_test_mae_engine"] - figures["rnn_test_mae_by_hand"]) < 1e-3
    assert figures["trained_weight_difference"] < 1e-12, run
    assert figures["dense_gradient_difference"] < 1e-12
    assert figures["rnn_gradient_difference"] < 1e-12
    assert figures["unroll_gradient_difference"] < 1e-6
    assert "graph of" in run.stdout
    if has_matplotlib():
        assert (tmp_path / "06_autograd_training.png").stat().st_size > 0
        # The worked example's graph, drawn from the engine's own nodes.
        assert (tmp_path / "06_autograd_example_graph.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in run.stdout


def test_without_matplotlib_the_numbers_are_the_view(tmp_path):
    run = run_chapter("06_autograd", "--quick", "--out", tmp_path, cwd=tmp_path,
                      env=without_matplotlib(tmp_path))
    assert run.returncode == 0, run
    assert "matplotlib is not installed" in run.stdout, run
    assert "dense by hand:" in run.stdout and "recurrent engine:" in run.stdout, run
    assert not list(tmp_path.glob("*.png"))
    # The worked example's graph as show_graph's text: 7 nodes, w's gradient -9.
    assert "no drawing; the graph as text instead:\ngraph of 7 nodes" in run.stdout, run


def test_a_run_stops_at_a_window_longer_than_the_data(tmp_path, monkeypatch):
    # In-process, as a notebook runs it: the cells raise DataError, caught by name
    # (the run's DataError is a class of its own, not chapter.DataError).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="--window 20000 is longer than the data") as error:
        run_as_script("06_autograd", "--quick", "--window", "20000", "--out", tmp_path)
    assert type(error.value).__name__ == "DataError"


@pytest.mark.parametrize("flags, word", [
    (["--hidden-size", "0"], "hidden-size"),
    (["--window", "20000"], "window"),
    (["--data", "missing.csv"], "does not exist"),
])
def test_bad_flags_exit_cleanly(tmp_path, flags, word):
    run = run_chapter("06_autograd", *flags, "--quick", cwd=tmp_path)
    assert_clean_error(run, word)


def test_flags_are_checked_before_any_work(capsys):
    for flags in (["--epochs", "0"], ["--unroll", "-5"], ["--window", "0"]):
        with pytest.raises(chapter.DataError, match=flags[0]):
            chapter.parse_args(flags)
    for flags in (["--epochs", "many"], ["--no-such-flag"]):
        with pytest.raises(SystemExit) as exit_info:
            chapter.parse_args(flags)
        assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
