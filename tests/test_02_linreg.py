"""Tests of 02_linreg.py: the loss and its gradient, the linear model's gradients
against finite differences and torch.autograd, normalisation, the least-squares
reference, the weather loader (fallback, forward fill, bad files, time-ordered split)
and the chapter's command line."""
import numpy as np
import pytest
import torch

from conftest import (assert_clean_error, has_matplotlib, load_chapter, run_as_script,
                      run_chapter, without_matplotlib)

chapter = load_chapter("02_linreg")


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


def small_problem(seed=0, rows=7, features=3):
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(rows, features))
    targets = rng.normal(size=(rows, 1)) * 5 + 60
    layers = [(rng.normal(size=(features, 1)), rng.normal(size=(1, 1)))]
    return layers, inputs, targets


def test_mse_and_mae_values():
    predictions = np.array([[1.0], [2.0], [4.0]])
    targets = np.array([[1.0], [4.0], [1.0]])
    assert chapter.mse(predictions, targets) == pytest.approx((0 + 4 + 9) / 3)
    assert chapter.mae(predictions, targets) == pytest.approx((0 + 2 + 3) / 3)


def test_mse_grad_matches_finite_differences_and_autograd():
    _, _, targets = small_problem()
    predictions = targets + np.random.default_rng(1).normal(size=targets.shape)
    by_hand = chapter.mse_grad(predictions, targets)
    numeric = finite_differences(lambda: chapter.mse(predictions, targets), predictions)
    np.testing.assert_allclose(by_hand, numeric, rtol=1e-5, atol=1e-7)
    leaf = torch.tensor(predictions, requires_grad=True)
    torch.mean((leaf - torch.tensor(targets)) ** 2).backward()
    np.testing.assert_allclose(by_hand, leaf.grad.numpy(), rtol=1e-10)


def test_linear_backward_matches_finite_differences():
    layers, inputs, targets = small_problem()
    predictions, cache = chapter.linear_forward(layers, inputs)
    (weight_grad, bias_grad), = chapter.linear_backward(
        layers, cache, chapter.mse_grad(predictions, targets))
    weight, bias = layers[0]

    def loss_of():
        return chapter.mse(chapter.linear_forward(layers, inputs)[0], targets)

    np.testing.assert_allclose(weight_grad, finite_differences(loss_of, weight), rtol=1e-5)
    np.testing.assert_allclose(bias_grad, finite_differences(loss_of, bias), rtol=1e-5)
    assert chapter.gradient_error(layers, inputs, targets) < 1e-6


def test_linear_backward_matches_autograd():
    layers, inputs, targets = small_problem(seed=3)
    predictions, cache = chapter.linear_forward(layers, inputs)
    (weight_grad, bias_grad), = chapter.linear_backward(
        layers, cache, chapter.mse_grad(predictions, targets))
    weight = torch.tensor(layers[0][0], requires_grad=True)
    bias = torch.tensor(layers[0][1], requires_grad=True)
    output = torch.tensor(inputs) @ weight + bias
    torch.mean((output - torch.tensor(targets)) ** 2).backward()
    np.testing.assert_allclose(weight_grad, weight.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(bias_grad, bias.grad.numpy(), rtol=1e-10)


def test_standardise_uses_training_statistics_only():
    rng = np.random.default_rng(0)
    train = rng.normal(10, 3, size=(500, 3))
    train[:, 2] = 7.0  # a constant column must not be divided by zero
    other = rng.normal(10, 3, size=(50, 3))
    scaled_train, scaled_other = chapter.standardise(train, other)
    np.testing.assert_allclose(scaled_train[:, :2].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(scaled_train[:, :2].std(axis=0), 1, rtol=1e-12)
    np.testing.assert_array_equal(scaled_train[:, 2], 0)
    expected = (other[:, 0] - train[:, 0].mean()) / train[:, 0].std()
    np.testing.assert_allclose(scaled_other[:, 0], expected)


def test_gradient_descent_reaches_least_squares():
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(600, 3))
    true_weight = np.array([[2.0], [-1.0], [0.5]])
    targets = inputs @ true_weight + 60 + rng.normal(0, 0.1, size=(600, 1))
    exact = chapter.least_squares(inputs, targets)
    np.testing.assert_allclose(exact[0][0], true_weight, atol=0.02)
    model = chapter.fresh_model((inputs, targets))
    layers, history = chapter.train(model, (inputs, targets), (inputs, targets), 0.05, 10, 32,
                                    np.random.default_rng(0))
    np.testing.assert_allclose(layers[0][0], exact[0][0], atol=0.02)
    np.testing.assert_allclose(layers[0][1], exact[0][1], atol=0.02)
    assert history[-1][0] < 0.02  # training MSE near the noise variance, 0.01


def test_too_large_learning_rate_is_reported_as_diverged():
    rng = np.random.default_rng(0)
    inputs = rng.normal(50, 10, size=(200, 3))
    targets = inputs[:, :1] + 1
    _, history = chapter.train(chapter.fresh_model((inputs, targets)), (inputs, targets),
                               (inputs, targets), 1.0, 5, 32, np.random.default_rng(0))
    assert chapter.diverged(history[-1][0])
    assert len(history) < 5  # training stopped as soon as it diverged


# The weather loader (carried verbatim by chapters 01-08; tested here once).

def write(tmp_path, text, name="weather.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_read_weather_csv_forward_fills_missing_cells(tmp_path):
    path = write(tmp_path, ",tmax,tmin,rain,tmax_tomorrow\n"
                           "1970-01-01,,35,0.0,61\n"
                           "1970-01-02,61,,0.1,62\n"
                           "1970-01-03,62,40,,\n")
    dates, table = chapter.read_weather_csv(path)
    assert dates == ["1970-01-01", "1970-01-02", "1970-01-03"]
    # A leading gap takes the first known value; later gaps the previous day's value.
    np.testing.assert_array_equal(table, [[61, 35, 0.0, 61], [61, 35, 0.1, 62],
                                          [62, 40, 0.1, 62]])


def test_read_weather_csv_reorders_columns_by_header(tmp_path):
    path = write(tmp_path, "date,rain,tmax_tomorrow,tmin,tmax\n2000-01-01,0.5,70,50,68\n")
    _, table = chapter.read_weather_csv(path)
    np.testing.assert_array_equal(table, [[68, 50, 0.5, 70]])


@pytest.mark.parametrize("text, words", [
    ("", ["empty"]),
    (",tmax,tmin,rainfall,tmax_tomorrow\n1970-01-01,60,35,0,61\n", ["no column", "rain"]),
    (",tmax,tmin,rain,tmax_tomorrow\n1970-01-01,60,35,0,61\n1970-01-02,hot,35,0,61\n",
     ["line 3", "tmax", "not a number"]),
    (",tmax,tmin,rain,tmax_tomorrow\n", ["no rows"]),
])
def test_read_weather_csv_rejects_bad_files(tmp_path, text, words):
    with pytest.raises(chapter.DataError) as caught:
        chapter.read_weather_csv(write(tmp_path, text))
    for word in words:
        assert word in str(caught.value)


def test_read_weather_csv_missing_file(tmp_path):
    with pytest.raises(chapter.DataError, match="does not exist"):
        chapter.read_weather_csv(str(tmp_path / "nowhere.csv"))


def test_generated_weather_is_shaped_like_the_real_table():
    dates, table = chapter.generate_weather(seed=0)
    assert table.shape == (13509, 4) and len(dates) == 13509
    assert dates[0] == "1970-01-01"
    rainy = (table[:, 2] > 0).mean()
    assert 0.14 < rainy < 0.20  # the real table: about 17% of days
    assert 55 < table[:, 0].mean() < 75 and (table[:, 1] < table[:, 0]).mean() > 0.95
    np.testing.assert_array_equal(table[:-1, 3], table[1:, 0])  # tomorrow is tomorrow
    again = chapter.generate_weather(seed=0)[1]
    other = chapter.generate_weather(seed=1)[1]
    np.testing.assert_array_equal(table, again)
    assert not np.array_equal(table, other)


def test_load_weather_falls_back_to_generated_data_with_a_notice(tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)  # the loader looks for data/ in the current folder
    dates, table, source = chapter.load_weather(None, seed=3)
    assert source == "generated"
    np.testing.assert_array_equal(table, chapter.generate_weather(seed=3)[1])
    assert "could not download" in capsys.readouterr().err
    assert not (tmp_path / "data" / "clean_weather.csv").exists()


def test_split_is_time_ordered():
    days = np.arange(1000).reshape(-1, 1).astype(float)
    (train, _), (valid, _), (test, _) = chapter.split_data(days, days * 2)
    assert (len(train), len(valid), len(test)) == (700, 150, 150)
    np.testing.assert_array_equal(np.concatenate([train, valid, test]), days)
    assert train.max() < valid.min() and valid.max() < test.min()


# The chapter as a learner runs it.

def test_quick_run_matches_least_squares(tmp_path):
    run = run_chapter("02_linreg", "--quick", "--out", tmp_path, cwd=tmp_path)
    assert run.returncode == 0, run
    assert run.summary["chapter"] == "02_linreg" and run.summary["source"] == "generated"
    assert "could not download" in run.stderr
    # Gradient descent lands within 0.05 °F of the exact answer and beats persistence.
    assert abs(run.summary["test_mae"] - run.summary["closed_form_mae"]) < 0.05
    assert run.summary["test_mae"] < run.summary["persistence_mae"] - 0.1
    assert run.summary["test_mae"] < 3.8
    assert run.summary["gradient_error"] < 1e-6
    # The plots where matplotlib is installed, the text view where it is not.
    if has_matplotlib():
        assert (tmp_path / "02_linreg_loss.png").is_file(), run
        assert (tmp_path / "02_linreg_predictions.png").is_file(), run
    else:
        assert "matplotlib is not installed" in run.stdout, run


def test_without_matplotlib_prints_a_text_view(tmp_path):
    run = run_chapter("02_linreg", "--quick", "--out", tmp_path / "out", cwd=tmp_path,
                      env=without_matplotlib(tmp_path))
    assert run.returncode == 0 and run.summary["chapter"] == "02_linreg", run
    assert "matplotlib is not installed" in run.stdout, run
    assert "mean prediction" in run.stdout, run
    assert not list(tmp_path.glob("out/*.png")), run


@pytest.mark.parametrize("content, words", [
    (None, ["does not exist"]),
    (",tmax,tmin,tmax_tomorrow\n1970-01-01,60,35,61\n", ["no column", "rain"]),
    (",tmax,tmin,rain,tmax_tomorrow\n1970-01-01,60,35,0,61\n1970-01-02,60,35,wet,61\n",
     ["line 3", "not a number"]),
    ("", ["empty"]),
])
def test_bad_data_file_gives_one_clear_sentence(tmp_path, content, words):
    path = tmp_path / "weather.csv"
    if content is not None:
        path.write_text(content)
    run = run_chapter("02_linreg", "--quick", "--data", path, "--out", tmp_path / "out",
                      cwd=tmp_path)
    assert_clean_error(run, *words)
    assert not (tmp_path / "out").exists()  # nothing written before the error


def test_too_short_a_table_is_refused(tmp_path):
    rows = "".join(f"1970-01-{day:02d},60,40,0,61\n" for day in range(1, 6))
    path = write(tmp_path, ",tmax,tmin,rain,tmax_tomorrow\n" + rows)
    with pytest.raises(Exception, match="at least 20") as refused:
        run_as_script("02_linreg", "--quick", "--data", path, "--out", tmp_path / "out")
    assert type(refused.value).__name__ == "DataError"


@pytest.mark.parametrize("flags, word", [
    (["--epochs", "0"], "--epochs"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_flags_are_refused_before_any_work(flags, word):
    with pytest.raises(chapter.DataError, match=word):
        chapter.parse_args(["--quick", *flags])
