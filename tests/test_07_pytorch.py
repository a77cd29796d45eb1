"""Chapter 07: the PyTorch networks must compute exactly what the numpy networks of
chapters 03 and 05 compute, train along the same path, and save and load safely."""
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import (assert_clean_error, has_matplotlib, load_chapter, run_as_script,
                      run_chapter)

chapter = load_chapter("07_pytorch")


def small_dense(seed=0, sizes=(3, 8, 5, 1)):
    """A numpy network of chapter 03 and rows to run it on, in float64."""
    rng = np.random.default_rng(seed)
    layers = chapter.init_dense(list(sizes), rng)
    inputs = rng.normal(size=(20, sizes[0]))
    targets = rng.normal(60, 10, size=(20, 1))
    return chapter.start_from_mean(layers, targets), inputs, targets


@pytest.mark.parametrize("build", ["DenseNet", "nn.Sequential"])
def test_dense_predictions_and_gradients_match_numpy(build):
    layers, inputs, targets = small_dense()
    model = (chapter.dense_net_from_layers(layers) if build == "DenseNet"
             else chapter.sequential_from_layers(layers))
    predictions, cache = chapter.dense_forward(layers, inputs)
    by_hand = chapter.dense_backward(layers, cache, chapter.mse_grad(predictions, targets))
    torch_predictions = model(torch.from_numpy(inputs))
    assert torch_predictions.dtype == torch.float64
    nn.functional.mse_loss(torch_predictions, torch.from_numpy(targets)).backward()
    np.testing.assert_allclose(torch_predictions.detach().numpy(), predictions, rtol=0, atol=1e-12)
    by_torch = chapter.gradients_as_layers(model)
    assert len(by_torch) == len(by_hand) == 3
    for (weight_grad, bias_grad), (hand_weight_grad, hand_bias_grad) in zip(by_torch, by_hand):
        assert weight_grad.shape == hand_weight_grad.shape
        assert bias_grad.shape == hand_bias_grad.shape
        np.testing.assert_allclose(weight_grad, hand_weight_grad, rtol=0, atol=1e-12)
        np.testing.assert_allclose(bias_grad, hand_bias_grad, rtol=0, atol=1e-12)
    # The chapter's own comparison reports the same agreement.
    prediction_gap, gradient_gap = chapter.compare_dense(layers, inputs, targets)
    assert prediction_gap < 1e-12 and gradient_gap < 1e-12


def test_dense_net_initialises_like_init_dense():
    torch.manual_seed(0)
    model = chapter.DenseNet([400, 300, 1])
    assert [tuple(weight.shape) for weight in model.weights] == [(400, 300), (300, 1)]
    assert [tuple(bias.shape) for bias in model.biases] == [(1, 300), (1, 1)]
    assert abs(float(model.weights[0].detach().std()) - np.sqrt(2 / 400)) < 0.005  # He
    assert len(list(model.parameters())) == 4


def test_recurrent_nets_match_numpy():
    rng = np.random.default_rng(1)
    params = chapter.init_rnn(3, 6, rng)
    params["output_bias"] += 60.0
    sequences = rng.normal(size=(10, 5, 3))
    targets = rng.normal(60, 10, size=(10, 1))
    prediction_gap, gradient_gap, builtin_gap = chapter.compare_recurrent(params, sequences,
                                                                          targets)
    assert prediction_gap < 1e-12 and gradient_gap < 1e-12 and builtin_gap < 1e-12
    # And directly: nn.RNN's gradients, mapped back to our names, equal BPTT by hand.
    predictions, cache = chapter.rnn_forward(params, sequences)
    by_hand = chapter.rnn_backward(params, cache, chapter.mse_grad(predictions, targets))
    _, builtin = chapter.recurrent_nets_from_params(params)
    nn.functional.mse_loss(builtin(torch.from_numpy(sequences)),
                           torch.from_numpy(targets)).backward()
    np.testing.assert_allclose(builtin.rnn.weight_hh_l0.grad.numpy().T, by_hand["hidden_weight"],
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(builtin.rnn.weight_ih_l0.grad.numpy().T, by_hand["input_weight"],
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(builtin.rnn.bias_ih_l0.grad.numpy(), by_hand["hidden_bias"][0],
                               rtol=0, atol=1e-12)


def test_sgd_replay_trains_like_numpy():
    """Same weights, same batches, same learning rate: PyTorch's SGD follows chapter
    03's numpy training step for step, to the same validation and test MAE."""
    rng = np.random.default_rng(2)
    layers, _, _ = small_dense(seed=2)
    inputs = rng.normal(size=(120, 3))
    targets = 60 + 5 * inputs[:, :1] - 3 * inputs[:, 1:2] ** 2 + rng.normal(size=(120, 1))
    train_set, valid_set = (inputs[:100], targets[:100]), (inputs[100:], targets[100:])
    trained, numpy_history = chapter.train(layers, train_set, valid_set, 0.01, 3, 16,
                                           np.random.default_rng(5))
    model = chapter.dense_net_from_layers(layers)
    loader = torch.utils.data.DataLoader(
        chapter.WeatherDataset(*train_set, dtype=torch.float64), batch_size=16,
        sampler=chapter.NumpyShuffle(100, np.random.default_rng(5)))
    torch_history = chapter.train_torch(model, loader, torch.optim.SGD(model.parameters(),
                                                                       lr=0.01),
                                        3, train_set, valid_set, torch.device("cpu"))
    np.testing.assert_allclose(torch_history, numpy_history, rtol=0, atol=1e-12)
    assert numpy_history[-1][0] < numpy_history[0][0]   # it did learn something
    np.testing.assert_allclose(chapter.predict(model, valid_set[0], torch.device("cpu")),
                               chapter.dense_forward(trained, valid_set[0])[0], rtol=0, atol=1e-12)


def test_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model = chapter.DenseNet([3, 7, 1])
    path = str(tmp_path / "weights" / "dense.pt")
    chapter.save_weights(model, path)
    assert os.listdir(tmp_path / "weights") == ["dense.pt"]   # no temporary file left
    reloaded = chapter.load_weights(chapter.DenseNet([3, 7, 1]), path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name])
    rows = torch.randn(4, 3)
    assert torch.equal(model(rows), reloaded(rows))
    # The file holds tensors only, so the safe loader accepts it.
    assert set(torch.load(path, weights_only=True)) == set(model.state_dict())


def test_bad_weights_files(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "dense.pt")
    chapter.save_weights(chapter.DenseNet([3, 7, 1]), path)
    with pytest.raises(chapter.DataError, match="does not fit"):
        chapter.load_weights(chapter.DenseNet([3, 8, 1]), path)
    with pytest.raises(chapter.DataError, match="does not exist"):
        chapter.load_weights(chapter.DenseNet([3, 7, 1]), str(tmp_path / "missing.pt"))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(chapter.DataError, match="not a readable"):
        chapter.load_weights(chapter.DenseNet([3, 7, 1]), str(tmp_path / "broken.pt"))


def test_device_choice():
    assert chapter.pick_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        assert chapter.pick_device("cuda").type == "cuda"
    else:
        assert chapter.pick_device("auto").type == "cpu"
        with pytest.raises(chapter.DataError, match="cuda"):
            chapter.pick_device("cuda")


@pytest.mark.parametrize("flags, word", [
    (["--epochs", "0"], "epochs"), (["--batch-size", "0"], "batch-size"),
    (["--learning-rate", "-1"], "learning-rate"), (["--window", "0"], "window"),
    (["--hidden-size", "0"], "hidden-size"), (["--threads", "0"], "threads"),
])
def test_bad_flags_refused_early(flags, word):
    with pytest.raises(chapter.DataError, match=word):
        chapter.parse_args(flags)


def test_quick_run(tmp_path):
    run = run_chapter("07_pytorch", "--quick", "--out", tmp_path, cwd=tmp_path)
    assert run.returncode == 0, run
    summary = run.summary
    assert summary["chapter"] == "07_pytorch"
    # float64 throughout: the chapter calls anything beyond ~1e-12 a bug.
    assert summary["prediction_gap"] < 1e-12 and summary["gradient_gap"] < 1e-12
    assert summary["rnn_gradient_gap"] < 1e-12
    assert abs(summary["numpy_test_mae"] - summary["torch_test_mae"]) < 1e-6
    # Generated weather, one epoch: every network beats "tomorrow = today", which
    # scores 3.68 °F on those test days, and Adam gets within 0.05 °F of least squares.
    persistence = summary["persistence_mae"]
    assert summary["numpy_test_mae"] < persistence
    assert summary["adam_test_mae"] < persistence and summary["rnn_test_mae"] < persistence
    assert summary["closed_form_mae"] < persistence
    assert summary["adam_test_mae"] < summary["closed_form_mae"] + 0.05
    assert summary["reload_gap"] == 0
    assert (tmp_path / "07_pytorch_dense.pt").exists()
    if has_matplotlib():
        assert (tmp_path / "07_pytorch_validation.png").exists()
    else:
        assert "matplotlib is not installed" in run.stdout


def test_without_matplotlib_prints_the_curves_as_text(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` fails
    monkeypatch.chdir(tmp_path)
    result = run_as_script("07_pytorch", "--quick", "--out", tmp_path / "out")
    printed = capsys.readouterr().out
    assert "matplotlib is not installed" in printed and "PyTorch Adam:" in printed
    assert not (tmp_path / "out" / "07_pytorch_validation.png").exists()
    assert printed.strip().splitlines()[-1].startswith("summary: ")
    assert result["figures"]["reload_gap"] == 0


def test_bad_inputs_exit_cleanly(tmp_path):
    run = run_chapter("07_pytorch", "--quick", "--hidden-sizes", "8", "0", cwd=tmp_path)
    assert_clean_error(run, "hidden-sizes")
    # A missing data file is refused before anything is written (in-process: the
    # command-line path to exit code 2 is the one checked just above).
    # The run's DataError is its own class, not chapter.DataError: check it by name.
    with pytest.raises(Exception, match="does not exist") as error:
        run_as_script("07_pytorch", "--quick", "--data", tmp_path / "nowhere.csv",
                      "--out", tmp_path / "out")
    assert type(error.value).__name__ == "DataError"
    assert not (tmp_path / "out").exists()
