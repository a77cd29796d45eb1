"""Chapter 08: the hand-written layer norm, dropout and clipping against PyTorch, the
learning-rate schedule, early stopping, and the cures beating the overfit baseline."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import (assert_clean_error, has_matplotlib, load_chapter, run_as_script,
                      run_chapter, without_matplotlib)

chapter = load_chapter("08_regularize")


def random_layer_norm_case(shape=(4, 3, 10), seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(*shape, dtype=torch.float64, generator=generator) * 2 + 0.5
    weight = torch.randn(shape[-1], dtype=torch.float64, generator=generator)
    bias = torch.randn(shape[-1], dtype=torch.float64, generator=generator)
    output_grad = torch.randn(*shape, dtype=torch.float64, generator=generator)
    return inputs, weight, bias, output_grad


def test_layer_norm_forward_and_backward_match_torch():
    inputs, weight, bias, output_grad = random_layer_norm_case()
    outputs, cache = chapter.layer_norm_forward(inputs, weight, bias)
    input_grad, weight_grad, bias_grad = chapter.layer_norm_backward(output_grad, cache)
    # The same computation by PyTorch's own layer norm, differentiated by autograd.
    leaves = [tensor.clone().requires_grad_(True) for tensor in (inputs, weight, bias)]
    expected = nn.functional.layer_norm(leaves[0], (inputs.shape[-1],), leaves[1], leaves[2],
                                        eps=1e-5)
    expected.backward(output_grad)
    torch.testing.assert_close(outputs, expected.detach(), rtol=0, atol=1e-10)
    for mine, leaf in zip((input_grad, weight_grad, bias_grad), leaves):
        assert mine.shape == leaf.shape
        torch.testing.assert_close(mine, leaf.grad, rtol=0, atol=1e-10)


def test_layer_norm_function_passes_gradcheck():
    """Finite differences against the hand-written backward, through autograd.Function."""
    inputs, weight, bias, _ = random_layer_norm_case(shape=(3, 5), seed=1)
    leaves = tuple(tensor.requires_grad_(True) for tensor in (inputs, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x, w, b: chapter.LayerNormFunction.apply(x, w, b, 1e-5), leaves)


def test_hand_layer_norm_module_is_a_drop_in_for_nn_layer_norm():
    gaps = chapter.check_layer_norm()
    assert set(gaps) == {"forward", "input_grad", "weight_grad", "bias_grad"}
    assert max(gaps.values()) < 1e-10
    assert set(chapter.HandLayerNorm(7).state_dict()) == set(nn.LayerNorm(7).state_dict())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics_match_nn_dropout(p):
    torch.manual_seed(0)
    ones = torch.ones(200_000)
    for module in (chapter.HandDropout(p), nn.Dropout(p)):
        module.train()
        dropped = module(ones)
        zero_fraction = float((dropped == 0).float().mean())
        assert abs(zero_fraction - p) < 0.01, (module, zero_fraction)
        assert abs(float(dropped.mean()) - 1) < 0.01                  # mean preserved
        kept = dropped[dropped != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
        module.eval()
        assert torch.equal(module(ones), ones)                        # identity in eval
    statistics = chapter.check_dropout(p)
    for zero_fraction, mean, identity in statistics.values():
        assert abs(zero_fraction - p) < 0.01 and abs(mean - 1) < 0.01 and identity


def test_dropout_gradient_is_the_scaled_mask():
    torch.manual_seed(1)
    inputs = torch.randn(1000, requires_grad=True)
    outputs = chapter.dropout(inputs, 0.25, training=True)
    outputs.sum().backward()
    kept = (outputs != 0).float()
    torch.testing.assert_close(inputs.grad, kept / 0.75)
    assert chapter.dropout(inputs, 0.0, training=True) is inputs


def test_clipping_matches_clip_grad_norm():
    assert chapter.check_clipping() < 1e-12
    # Below the limit nothing changes; above it the norm becomes the limit.
    parameter = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    parameter.grad = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    assert chapter.clip_gradients([parameter], 10.0) == pytest.approx(5.0)
    assert torch.equal(parameter.grad, torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64))
    chapter.clip_gradients([parameter], 1.0)
    assert float(parameter.grad.norm()) == pytest.approx(1.0, abs=1e-6)


def test_clipping_without_gradients_returns_zero_like_pytorch():
    # Before the first backward() no parameter has a gradient: nothing to clip.
    parameters = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2))]
    assert chapter.clip_gradients(parameters, 1.0) == 0.0
    assert float(nn.utils.clip_grad_norm_(parameters, 1.0)) == 0.0
    assert all(parameter.grad is None for parameter in parameters)


def test_warmup_cosine_schedule():
    rates = [chapter.warmup_cosine(step, 100, 10, 1.0) for step in range(101)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(later <= earlier for earlier, later in zip(rates[10:], rates[11:]))
    assert rates[55] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.5)) / 2)
    assert rates[100] == pytest.approx(0.1)


def test_early_stopping_restores_the_best_weights(tmp_path):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(60, 12))
    targets = inputs[:, :1] + rng.normal(size=(60, 1))
    train_set, valid_set = (inputs[:20], targets[:20]), (inputs[20:], targets[20:])
    torch.manual_seed(0)
    model = chapter.RegularNet(12, 64, 2)
    loader = torch.utils.data.DataLoader(chapter.WeatherDataset(*train_set), batch_size=5,
                                         shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    history = chapter.train_torch(model, loader, torch.optim.Adam(model.parameters(), lr=3e-3),
                                  200, train_set, valid_set, device, patience=5,
                                  checkpoint=str(tmp_path / "best.pt"))
    valid_losses = [valid for _, valid in history]
    assert len(history) < 200                                # it stopped early
    assert np.argmin(valid_losses) == len(history) - 6       # 5 epochs without a new best
    restored = chapter.mse(chapter.predict(model, valid_set[0], device), valid_set[1])
    assert restored == pytest.approx(min(valid_losses), rel=1e-6)


def test_quick_run_cures_beat_the_overfit_baseline(tmp_path):
    run = run_chapter("08_regularize", "--quick", "--out", tmp_path, cwd=tmp_path)
    assert run.returncode == 0, run
    summary = run.summary
    assert summary["chapter"] == "08_regularize"
    # Overfitting is visible: validation loss ends well above its best.
    assert summary["baseline_final"] > 1.1 * summary["baseline_best"]
    # Each cure for overfitting ends at least 10% below the baseline's final loss.
    for cure in ("weight_decay", "hand_dropout", "nn_dropout", "early_stopping", "all"):
        assert summary[f"{cure}_final"] < 0.9 * summary["baseline_final"], cure
    # Early stopping keeps the best weights it saw; together the cures end within 3%
    # of the lowest loss the baseline ever reached, and predict the test days better.
    assert summary["early_stopping_final"] == pytest.approx(summary["early_stopping_best"],
                                                            rel=1e-3)
    assert summary["all_final"] < 1.03 * summary["baseline_best"]
    assert summary["all_test_mae"] < summary["baseline_test_mae"] - 0.1
    # ...but, as the chapter says, 500 (here 200) examples are too few to beat the
    # weather thread's yardsticks on the test days: least squares stays ahead.
    assert summary["closed_form_mae"] < summary["persistence_mae"]
    assert summary["closed_form_mae"] < summary["all_test_mae"]
    assert summary["layer_norm_gap"] < 1e-10 and summary["clip_gap"] < 1e-10
    assert abs(summary["dropout_zero_fraction"] - 0.3) < 0.01
    assert (tmp_path / "08_regularize_best.pt").exists()
    if has_matplotlib():
        assert (tmp_path / "08_regularize_curves.png").exists()
    else:
        assert "matplotlib is not installed" in run.stdout


def test_without_matplotlib_prints_the_curves_as_text(tmp_path):
    run = run_chapter("08_regularize", "--quick", "--epochs", "3", "--out", tmp_path / "out",
                      cwd=tmp_path, env=without_matplotlib(tmp_path))
    assert run.returncode == 0 and run.summary is not None, run
    assert "matplotlib is not installed" in run.stdout, run
    assert "all cures together:" in run.stdout, run
    assert not (tmp_path / "out" / "08_regularize_curves.png").exists()


@pytest.mark.parametrize("flags, word", [
    (["--dropout", "1"], "dropout"), (["--dropout", "-0.1"], "dropout"),
    (["--warmup", "1.5"], "warmup"), (["--weight-decay", "-1"], "weight-decay"),
    (["--depth", "0"], "depth"), (["--max-norm", "0"], "max-norm"),
    (["--patience", "0"], "patience"),
])
def test_bad_flags_refused_early(flags, word):
    with pytest.raises(chapter.DataError, match=word):
        chapter.parse_args(flags)


def test_bad_inputs_exit_cleanly(tmp_path, monkeypatch):
    run = run_chapter("08_regularize", "--quick", "--dropout", "1", cwd=tmp_path)
    assert_clean_error(run, "dropout")
    # More training days than the data has: refused once the data is loaded, before
    # any training or writing (in-process: the path to exit code 2 is checked above).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="train-days") as refused:
        run_as_script("08_regularize", "--quick", "--train-days", "100000",
                      "--out", tmp_path / "out")
    assert type(refused.value).__name__ == "DataError"
    assert not (tmp_path / "out").exists()
