"""Linear regression by gradient descent: predicting tomorrow's high temperature.

This chapter trains the simplest model there is, a straight-line (linear) prediction,
and trains it the way every network in the course is trained: guess, measure the
error, work out which way each number should move to shrink the error (the
gradient), move it a little, repeat. The pieces are:

* the mean squared error (MSE) and its gradient, derived by hand in the comments;
* the learning rate, and what happens when it is too small or too large;
* feature normalisation (`standardise`), which makes one learning rate suit every
  feature;
* mini-batches, which make many cheap steps instead of a few expensive ones;
* a check against the closed-form least-squares answer (`np.linalg.lstsq`), which
  solves the same problem exactly in one line.

New since 01_linalg.py: instead of setting the weights by hand, the chapter learns
them from the data, and checks its own gradient with finite differences.

Run it with `python 02_linreg.py` (about a second on a 2-core CPU) or
`python 02_linreg.py --quick` (under a second). `--data PATH` reads a local copy of
the weather table; `--help` lists every flag.

In a notebook (Jupyter, VS Code) the chapter ignores the kernel's command line and
takes its flags from the environment variable ZERO_TO_GPT_ARGS, for example
`ZERO_TO_GPT_ARGS="--quick"`; without it, the defaults.
"""

import argparse
import csv
import hashlib
import json
import os
import shlex
import sys
import time
import urllib.request

import numpy as np

CHAPTER = "02_linreg"


# %% [markdown]
# ## Measuring the error
#
# A model's prediction for a day is a number of degrees; the truth is another. We
# need one number that says how wrong a whole set of predictions is.
#
# * The **mean absolute error** (MAE) is the average distance between prediction and
#   truth, in °F. It is what we report, because a learner can read it directly:
#   "off by 3.5 degrees on a typical day".
# * The **mean squared error** (MSE) averages the *squared* distances. It is what we
#   train on, because its slope is simple and smooth everywhere (the absolute value
#   has a kink at zero), and it punishes a few big misses more than many small ones.
#
# For predictions p_i and targets t_i over n numbers:
#
#     MSE = (1/n) * sum_i (p_i - t_i)^2        MAE = (1/n) * sum_i |p_i - t_i|
#
# Gradient descent needs to know how the MSE changes when one prediction changes.
# One rule of calculus does all the work here and in every later chapter, the
# **chain rule**: when a result depends on a number only through a middle step,
# their slopes multiply. If y = f(u) and u = g(x), then
#
#     dy / dx = (dy / du) * (du / dx)
#
# For instance, nudging x by a little changes u by (du / dx) times as much, and each
# bit of change in u changes y by (dy / du) times as much. (Chapter 01's finite
# differences would measure the same product.) And when x reaches y along several
# paths, the paths' products add up.
#
# Only one term of the sum contains p_i. Its square (p_i - t_i)^2 is y = u^2 with
# u = p_i - t_i: dy / du = 2 u, and du / dp_i = 1, so the term's slope is
# 2 (p_i - t_i), and
#
#     d MSE / d p_i = 2 * (p_i - t_i) / n
#
# That is `mse_grad`: one number per prediction, positive when the prediction is too
# high (so it should go down), negative when it is too low.


# %%
def mse(predictions, targets):
    """Mean squared error: the average of (prediction - target)^2."""
    return float(np.mean((predictions - targets) ** 2))


def mae(predictions, targets):
    """Mean absolute error: the average distance between prediction and target."""
    return float(np.mean(np.abs(predictions - targets)))


def mse_grad(predictions, targets):
    """The gradient of `mse` with respect to each prediction: 2 (p - t) / n."""
    # exercise: the gradient of the MSE with respect to each prediction
    return 2 * (predictions - targets) / predictions.size
    # end exercise


# %% [markdown]
# ## Normalising the features
#
# Our three features live on very different scales: `tmax` is around 60, `tmin`
# around 45, `rain` mostly 0 with the odd 0.5. Gradient descent moves every weight
# with the same learning rate, and a weight's gradient is proportional to the size
# of its feature (see the derivation below: the gradient for weight j sums
# feature j times the error). So the temperature weights get huge gradients and the
# rain weight a tiny one: a learning rate small enough not to blow up the
# temperatures leaves rain almost untouched.
#
# The cure is to **standardise** each feature: subtract its mean and divide by its
# standard deviation, so every column has mean 0 and spread 1. We measure the mean
# and spread on the *training* rows only and apply the same numbers to validation
# and test rows: the model must not learn anything, not even an average, from the
# days it will be tested on.


# %%
def standardise(train, *others):
    """Scale every column of `train` to mean 0 and standard deviation 1, and apply the
    same shift and scale (measured on `train` only) to each array in `others`.
    Returns the scaled arrays in the order given. A constant column (spread 0) is only
    shifted, never divided by zero."""
    mean = train.mean(axis=0)
    spread = train.std(axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    return tuple((array - mean) / spread for array in (train, *others))


# %% [markdown]
# ## The model: one linear layer
#
# Linear regression predicts with a weighted sum of the features plus a constant:
#
#     prediction = tmax * w_1 + tmin * w_2 + rain * w_3 + b
#
# For a whole table at once, `inputs` has one row per day and one column per
# feature, shape (rows, 3), the weights are a column of shape (3, 1) and the bias
# has shape (1, 1); then `inputs @ weight + bias` gives all predictions, shape
# (rows, 1), with the bias broadcast down the rows (chapter 01).
#
# We keep the parameters as a list of `(weight, bias)` pairs, here a list of one.
# Chapter 03 stacks several such layers into a network, and this shape lets the
# training loop below stay the same.
#
# **The gradient, by hand.** Write g_i = d MSE / d p_i (from `mse_grad`). Each
# prediction is p_i = sum_j x_ij w_j + b, so d p_i / d w_j = x_ij and d p_i / d b = 1.
# A weight reaches the MSE through every row's prediction, so by the chain rule its
# slope is the sum over the rows of (d MSE / d p_i) * (d p_i / d w_j):
#
#     d MSE / d w_j = sum_i g_i * x_ij      ->  weight_grad = inputs.T @ g   (3, 1)
#     d MSE / d b   = sum_i g_i             ->  bias_grad   = g summed over rows (1, 1)
#
# `linear_forward` also returns a `cache`, what the backward pass needs to reuse
# (here just the inputs), so nothing is computed twice.


# %%
def init_linear(input_size):
    """A linear model with `input_size` features, as a list of one (weight, bias)
    pair: weight (input_size, 1) and bias (1, 1), all zeros. For a linear model any
    start works: its error surface is a single bowl with one lowest point."""
    return [(np.zeros((input_size, 1)), np.zeros((1, 1)))]


def start_from_mean(layers, targets):
    """Set the last layer's bias to the average target, so training starts from the
    sensible guess "every day is an average day" instead of from 0 °F, and the
    weights only have to learn the differences from the average."""
    weight, bias = layers[-1]
    return [*layers[:-1], (weight, bias + targets.mean())]


def linear_forward(layers, inputs):
    """Predictions of shape (rows, 1) for `inputs` of shape (rows, features), and the
    cache the backward pass needs."""
    (weight, bias), = layers
    return inputs @ weight + bias, inputs


def linear_backward(layers, cache, output_grad):
    """Gradients of the loss with respect to the weight and bias, given the cache of
    `linear_forward` and `output_grad`, the loss's gradient with respect to each
    prediction (rows, 1). Returns a list of one (weight_grad, bias_grad) pair."""
    # exercise: the gradients of the loss with respect to the weight and the bias
    inputs = cache
    return [(inputs.T @ output_grad, output_grad.sum(axis=0, keepdims=True))]
    # end exercise


# %% [markdown]
# ## Set-up: flags, data and plots (not the lesson)
#
# The code in this section is what the chapter needs but does not teach; in a
# notebook its cells open collapsed. Every chapter shares its command line: `--seed`
# for repeatable runs, `--data` for a local copy of the data, `--quick` for a run of
# a few seconds (used by the tests) and `--out` for where files are written; this one
# adds `--epochs`, `--learning-rate` and `--batch-size` for the final training run,
# and refuses bad values before any work starts. In a notebook the flags come from
# the environment variable `ZERO_TO_GPT_ARGS`. The last line of output is `summary:`
# and a line of JSON with the chapter's headline figures.
#
# Every weather chapter (01-08) reads the same table: one row a day, from
# 1970-01-01 to 2022-11-26, with the day's highest temperature (`tmax`, °F), lowest
# temperature (`tmin`, °F), rainfall (`rain`, inches) and the next day's highest
# temperature (`tmax_tomorrow`), the number we learn to predict. The loader is
# carried unchanged from chapter to chapter. It downloads the table once into
# `data/`, checks it against a recorded SHA-256 digest (so a truncated or tampered
# download is never used), and writes it to a temporary file that is renamed into
# place only when complete, so an interrupted download never leaves half a file
# behind. Without a network it generates a stand-in table of the same shape, so the
# chapter still runs; it says so in one line.
#
# The plots are two pictures: the training loss epoch by epoch (it should fall
# quickly, then flatten), and predicted against true temperatures on the test days (a
# perfect model would put every point on the diagonal).


# %% jupyter={"source_hidden": true}
WEATHER_URL = ("https://raw.githubusercontent.com/VikParuchuri/zero_to_gpt/"
               "master/data/clean_weather.csv")
WEATHER_SHA256 = "70d75ac02ccf0c0f45aed0077919fee302c6428b9f3c3401aadf090b0f6dfc8c"
WEATHER_COLUMNS = ["tmax", "tmin", "rain", "tmax_tomorrow"]
FEATURES = ["tmax", "tmin", "rain"]     # what the models see
TARGET = "tmax_tomorrow"                # what they predict


# %% jupyter={"source_hidden": true}
class DataError(Exception):
    """A problem with the input that the user can fix. A script run ends with its one
    sentence (`error: ...`) and exit code 2; a notebook shows the sentence alone."""


def in_notebook():
    """True inside Jupyter or VS Code's notebook, where the command line is the kernel's."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and ipython.get_ipython() is not None


def report_data_errors():
    """Make a DataError end the run with its one sentence instead of a traceback."""
    def one_sentence(error):
        print(f"error: {error}", file=sys.stderr)
    if in_notebook():
        sys.modules["IPython"].get_ipython().set_custom_exc(
            (DataError,), lambda shell, kind, error, trace, tb_offset=None: one_sentence(error))
        return

    def exit_with_sentence(kind, error, trace):
        if not issubclass(kind, DataError):
            return sys.__excepthook__(kind, error, trace)
        one_sentence(error)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.excepthook = exit_with_sentence


def chapter_args():
    """This run's flags: the command line in a script; in a notebook, which has the
    kernel's command line instead, the environment variable ZERO_TO_GPT_ARGS."""
    report_data_errors()
    if in_notebook():
        return parse_args(shlex.split(os.environ.get("ZERO_TO_GPT_ARGS", "")))
    return parse_args()


def show_figure(figure, path):
    """Save a matplotlib figure as a PNG at `path`; in a notebook, also show it here."""
    figure.savefig(path, dpi=100, bbox_inches="tight")
    if in_notebook():
        from IPython.display import Image, display
        display(Image(filename=path))


# %% jupyter={"source_hidden": true}
def sha256_of(path):
    """The SHA-256 digest of a file, read in 1 MiB pieces so big files fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for piece in iter(lambda: file.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def download(url, path, sha256, timeout=20):
    """Fetch `url` into `path` unless a verified copy is already there.

    The bytes go to `path + ".part"` first and are renamed into place only after the
    digest matches, so `path` is either absent or complete and correct. Returns True
    when `path` holds the verified file, False when the download failed (no network,
    a wrong digest); the caller then falls back to generated data."""
    if os.path.exists(path) and sha256_of(path) == sha256:
        return True
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as file:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while piece := response.read(1 << 16):
                file.write(piece)
                done += len(piece)
                if total:
                    print(f"\rdownloading {os.path.basename(path)}: {100 * done // total}%",
                          end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        if sha256_of(partial) != sha256:
            os.remove(partial)
            print(f"download of {url} did not match its recorded SHA-256; not using it",
                  file=sys.stderr)
            return False
        os.replace(partial, path)
        return True
    except (OSError, ValueError):  # no network, refused, timed out, disk full
        if os.path.exists(partial):
            os.remove(partial)
        return False


def read_weather_csv(path):
    """Read the weather CSV at `path` into a float array of shape (days, 4) whose
    columns are WEATHER_COLUMNS, and the list of dates from its first column.

    A missing cell means the station recorded nothing that day; we fill it with the
    previous day's value ("forward fill"), the usual choice for slowly changing
    measurements. Any other problem is the learner's to fix, so it raises DataError
    with a sentence that names the file, the line and what to do."""
    if not os.path.isfile(path):
        raise DataError(f"weather file {path} does not exist; pass --data with the path "
                        f"of a CSV with columns {', '.join(WEATHER_COLUMNS)}")
    try:
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"weather file {path} is not a readable CSV text file ({error})")
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise DataError(f"weather file {path} is empty; it needs a header line and one "
                        f"row per day")
    header = [cell.strip() for cell in rows[0]]
    missing = [name for name in WEATHER_COLUMNS if name not in header]
    if missing:
        raise DataError(f"weather file {path} has no column {', '.join(missing)}; the header "
                        f"must name {', '.join(WEATHER_COLUMNS)} (it has {', '.join(header)})")
    where = [header.index(name) for name in WEATHER_COLUMNS]
    dates, table = [], []
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line, e.g. at the end of the file
        values = []
        for column, name in zip(where, WEATHER_COLUMNS):
            cell = row[column].strip() if column < len(row) else ""
            try:
                values.append(float(cell) if cell else np.nan)
            except ValueError:
                raise DataError(f"weather file {path}, line {line_number}: {name} is "
                                f"{cell!r}, not a number")
        dates.append(row[0].strip())
        table.append(values)
    if not table:
        raise DataError(f"weather file {path} has a header but no rows of data")
    table = np.array(table)
    for column in range(table.shape[1]):  # forward fill, then back fill a leading gap
        values = table[:, column]
        known = np.where(~np.isnan(values), np.arange(len(values)), 0)
        np.maximum.accumulate(known, out=known)
        values[:] = values[known]
        if np.isnan(values).all():
            raise DataError(f"weather file {path}: column {WEATHER_COLUMNS[column]} has no values")
        values[np.isnan(values)] = values[~np.isnan(values)][0]
    return dates, table


def generate_weather(seed=0, days=13509):
    """A stand-in for the real table, used when it cannot be downloaded.

    It has the real table's columns and the features the course's models learn from,
    modelled on a coastal climate with wet winters and dry summers:

    * rain persists: whether a day is wet is a two-state (wet, dry) Markov chain, so
      a wet day is followed by another a little over half the time and a dry day by
      a wet one about one time in ten, which makes wet spells; both chances rise in
      the wet season (winter) and fall almost to nothing in summer, and about 17% of
      days are wet over the year; a wet day's rainfall is drawn from an exponential
      distribution (about 0.27 inches on average);
    * temperatures follow the season (a high of about 66 °F on average, ±8 °F over
      the year, warmest in late summer) plus an anomaly that carries from day to day
      (an AR(1) process: yesterday's anomaly, shrunk, plus a random step);
    * rain cools the day: a wet day's high is 3 °F lower and its range from low to
      high narrower (about 11 °F instead of 16 °F), as clouds hold the night's heat.

    Deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    day_of_year = np.arange(days) % 365.25
    season = 66 + 8 * np.sin(2 * np.pi * (day_of_year - 140) / 365.25)
    wetness = (1 + np.cos(2 * np.pi * (day_of_year - 20) / 365.25)) / 2  # 1 in late January
    rain_after_dry = 0.01 + 0.21 * wetness ** 1.5  # the chain's two chances of a wet day
    rain_after_rain = 0.3 + 0.35 * wetness
    chance = rng.random(days)
    rainy = np.zeros(days, dtype=bool)
    for day in range(1, days):
        rainy[day] = chance[day] < (rain_after_rain if rainy[day - 1] else rain_after_dry)[day]
    rain = np.where(rainy, np.maximum(0.01, np.round(rng.exponential(0.27, days), 2)), 0.0)
    anomaly = np.zeros(days)
    steps = rng.normal(0, 4.0, days)
    for day in range(1, days):
        anomaly[day] = 0.7 * anomaly[day - 1] + steps[day]
    tmax = np.round(season + anomaly - 3 * rainy)
    spread = 16 + 2 * np.sin(2 * np.pi * (day_of_year - 200) / 365.25) - 5 * rainy
    tmin = np.round(tmax - spread + rng.normal(0, 3.5, days))
    tmax_tomorrow = np.append(tmax[1:], tmax[-1])
    start = np.datetime64("1970-01-01")
    dates = [str(start + day) for day in range(days)]
    return dates, np.stack([tmax, tmin, rain, tmax_tomorrow], axis=1)


def load_weather(path=None, seed=0):
    """The weather table as (dates, table, source). `path` (from --data) wins; then the
    downloaded copy in data/; then generated data, announced in one line."""
    if path:
        return (*read_weather_csv(path), path)
    cached = os.path.join("data", "clean_weather.csv")
    if download(WEATHER_URL, cached, WEATHER_SHA256):
        return (*read_weather_csv(cached), cached)
    print("note: could not download the weather table (offline?); using generated "
          "weather of the same shape instead", file=sys.stderr)
    return (*generate_weather(seed), "generated")


def split_data(inputs, targets, train_fraction=0.7, valid_fraction=0.15):
    """Split rows in time order into train, validation and test sets.

    Weather is a time series: shuffling before splitting would let the model peek at
    tomorrow while training on today, and its test score would flatter it. So the
    first 70% of days train, the next 15% tune choices, the last 15% are the test."""
    rows = len(inputs)
    train_end = int(rows * train_fraction)
    valid_end = int(rows * (train_fraction + valid_fraction))
    return ((inputs[:train_end], targets[:train_end]),
            (inputs[train_end:valid_end], targets[train_end:valid_end]),
            (inputs[valid_end:], targets[valid_end:]))


# %% jupyter={"source_hidden": true}
def save_plots(out_dir, history, predictions, targets):
    """Save the loss curve and the predictions plot as PNGs in `out_dir`; without
    matplotlib, print a compact text view instead. Returns the files written."""
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plots; a text view instead:")
        for low in range(20, 110, 10):
            chosen = (targets[:, 0] >= low) & (targets[:, 0] < low + 10)
            if chosen.any():
                print(f"  true {low:3d}-{low + 9:3d} °F: {chosen.sum():5d} days, "
                      f"mean prediction {predictions[chosen].mean():6.1f} °F")
        return []
    os.makedirs(out_dir, exist_ok=True)
    loss_path = os.path.join(out_dir, f"{CHAPTER}_loss.png")
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(range(1, len(history) + 1), [loss for loss, _ in history], marker="o")
    axis.set(xlabel="epoch", ylabel="training MSE (°F²)", title="Training loss")
    figure.tight_layout()
    show_figure(figure, loss_path)
    plt.close(figure)
    scatter_path = os.path.join(out_dir, f"{CHAPTER}_predictions.png")
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(targets[:, 0], predictions[:, 0], s=2, alpha=0.4)
    low, high = float(targets.min()), float(targets.max())
    axis.plot([low, high], [low, high], color="black", linewidth=1)
    axis.set(xlabel="true tmax tomorrow (°F)", ylabel="predicted (°F)",
             title="Test days")
    figure.tight_layout()
    show_figure(figure, scatter_path)
    plt.close(figure)
    return [loss_path, scatter_path]


# %% jupyter={"source_hidden": true}
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--data", default=None,
                        help="path of a local weather CSV (default: download, else generate)")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds, for tests and a first look")
    parser.add_argument("--out", default="out", help="folder for plots (default out/)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the final training run (default 20, --quick 5)")
    parser.add_argument("--learning-rate", type=float, default=0.01,
                        help="step size of gradient descent (default 0.01)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="rows per mini-batch (default 32)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 5 if args.quick else 20
    if args.epochs < 1:
        raise DataError(f"--epochs must be at least 1, not {args.epochs}")
    if not (args.learning_rate > 0 and np.isfinite(args.learning_rate)):
        raise DataError(f"--learning-rate must be a positive number, not {args.learning_rate}")
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, not {args.batch_size}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DataError(f"--out {args.out} is a file; give a folder for the plots")
    return args


def print_summary(figures):
    """The chapter's last line: `summary: ` and its headline figures as JSON."""
    print("summary: " + json.dumps(figures))


# %%
if __name__ == "__main__":
    ARGS = chapter_args()
    started = time.perf_counter()
    dates, table, source = load_weather(ARGS.data, ARGS.seed)
    if len(table) < 20:
        raise DataError(f"weather data from {source} has only {len(table)} days; the "
                        f"chapter needs at least 20")
    inputs, targets = table[:, :3], table[:, 3:]
    (train_raw, train_targets), (valid_raw, valid_targets), (test_raw, test_targets) = \
        split_data(inputs, targets)
    train_inputs, valid_inputs, test_inputs = standardise(train_raw, valid_raw, test_raw)
    print(f"weather: {len(table)} days from {source} ({dates[0]} to {dates[-1]}); "
          f"{len(train_raw)} train, {len(valid_raw)} valid, {len(test_raw)} test")
    figures = {"chapter": CHAPTER, "source": source}


# %% [markdown]
# ## Checking the gradient with finite differences
#
# A hand-derived gradient is easy to get subtly wrong, and a wrong gradient often
# still trains, just badly. So we check it the way chapter 01 measured slopes: nudge
# one number up by a small step h and down by h, and see how much the loss moves:
#
#     d loss / d w  ~  (loss(w + h) - loss(w - h)) / (2 h)
#
# This "central difference" is accurate to about h^2. It costs two loss evaluations
# per number, far too slow for training, but perfect for checking a few rows.


# %%
def numerical_gradient(loss_of, array, step=1e-6):
    """The gradient of `loss_of()` with respect to every entry of `array`, by central
    differences. `array` is nudged in place and restored after each entry."""
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + step
        loss_up = loss_of()
        array[index] = original - step
        loss_down = loss_of()
        array[index] = original
        gradient[index] = (loss_up - loss_down) / (2 * step)
    return gradient


def gradient_error(layers, inputs, targets):
    """The largest difference between the hand-written gradients and finite
    differences, over every weight and bias, relative to the largest gradient."""
    predictions, cache = linear_forward(layers, inputs)
    by_hand = linear_backward(layers, cache, mse_grad(predictions, targets))

    def loss_of():
        return mse(linear_forward(layers, inputs)[0], targets)

    worst, largest = 0.0, 1e-12
    for parameters, gradients in zip(layers, by_hand):
        for parameter, gradient in zip(parameters, gradients):
            numeric = numerical_gradient(loss_of, parameter)
            worst = max(worst, float(np.abs(numeric - gradient).max()))
            largest = max(largest, float(np.abs(numeric).max()))
    return worst / largest

if __name__ == "__main__":
    # On a few rows and a model that is not at its optimum (there the gradient is
    # zero, an easy case).
    rng = np.random.default_rng(ARGS.seed)
    probe = [(rng.normal(size=(3, 1)), rng.normal(size=(1, 1)))]
    check = gradient_error(probe, train_inputs[:8], train_targets[:8])
    print(f"gradient check: largest relative difference from finite differences {check:.1e}")


# %% [markdown]
# ## Training: gradient descent on mini-batches
#
# Gradient descent repeats one step: move every parameter a little against its
# gradient, `parameter -= learning_rate * gradient`. The gradient points uphill, so
# the step goes downhill; the **learning rate** says how far.
#
# Computing the gradient on all 9,000-odd training days for every step is wasteful:
# a few dozen days already point roughly the right way. So each **epoch** (one pass
# over the training rows) shuffles the rows and cuts them into **mini-batches** of
# `batch_size` rows, taking one step per batch. The steps are noisier, but there are
# hundreds of them per epoch instead of one. (We shuffle *within* the training set:
# the time-ordered split already keeps the test days out of sight.)
#
# After each epoch we record the training MSE and the validation MAE, so we can see
# training progress and spot a learning rate that makes the loss blow up: when it
# overflows, or grows past any error a thermometer could make, training stops and
# reports it.


# %%
def diverged(loss):
    """True when a training loss has blown up: overflowed to inf or nan, or grown past
    1e12 °F² (errors of a million degrees), where no later step can recover."""
    return not np.isfinite(loss) or loss > 1e12


def train(layers, train_set, valid_set, learning_rate, epochs, batch_size, rng):
    """Mini-batch gradient descent on the MSE. Returns the trained layers and the
    history: one (train_mse, valid_mae) pair per epoch."""
    inputs, targets = train_set
    history = []
    for epoch in range(epochs):
        order = rng.permutation(len(inputs))
        # A learning rate that is too large makes the numbers overflow on purpose in
        # the experiments below; we detect that from the loss, without warnings.
        with np.errstate(over="ignore", invalid="ignore"):
            # exercise: forward, backward and a gradient step for every mini-batch
            for start in range(0, len(inputs), batch_size):
                batch = order[start:start + batch_size]
                # Forward: predict this batch and keep what the backward pass needs.
                predictions, cache = linear_forward(layers, inputs[batch])
                # Backward: the loss's gradient for each prediction, then for each
                # weight and bias.
                gradients = linear_backward(layers, cache, mse_grad(predictions, targets[batch]))
                # The step: every parameter moves against its own gradient. New
                # arrays are made, so a model passed in is never changed.
                layers = [(weight - learning_rate * weight_grad, bias - learning_rate * bias_grad)
                          for (weight, bias), (weight_grad, bias_grad) in zip(layers, gradients)]
            # end exercise
            history.append((mse(linear_forward(layers, inputs)[0], targets),
                            evaluate(layers, *valid_set)))
        if diverged(history[-1][0]):
            break  # more steps cannot bring it back
    return layers, history


def evaluate(layers, inputs, targets):
    """The model's mean absolute error on a set of rows, in °F."""
    return mae(linear_forward(layers, inputs)[0], targets)


# %% [markdown]
# ## The closed-form answer
#
# For linear regression there is no need to search at all: the weights with the
# smallest MSE solve a set of linear equations (the "normal equations"), and
# `np.linalg.lstsq` solves them exactly and stably. We add a column of ones to the
# inputs so that the last weight it finds is the bias. Gradient descent should land
# close to this answer; a gap means too few epochs, a poor learning rate, or a bug.


# %%
def least_squares(inputs, targets):
    """The exact MSE-minimising linear model, as a list of one (weight, bias) pair."""
    # At the lowest point of the bowl every gradient is zero. With X the inputs
    # plus a column of ones and w the weights plus the bias, the gradient of the
    # MSE is (2/n) X.T @ (X @ w - t), so the best w solves X.T @ X @ w = X.T @ t.
    # lstsq finds that w without forming X.T @ X, which would square the rounding
    # errors.
    with_ones = np.hstack([inputs, np.ones((len(inputs), 1))])
    solution = np.linalg.lstsq(with_ones, targets, rcond=None)[0]
    return [(solution[:-1], solution[-1:])]

if __name__ == "__main__":
    # Two baselines, so every later figure has something to beat: "tomorrow will be
    # like today" and the exact least-squares line.
    persistence_mae = mae(test_raw[:, :1], test_targets)
    closed_form = least_squares(train_inputs, train_targets)
    closed_form_mae = evaluate(closed_form, test_inputs, test_targets)
    print(f"test MAE of 'tomorrow = today': {persistence_mae:.2f} °F; "
          f"of least squares: {closed_form_mae:.2f} °F")


# %% [markdown]
# ## Experiments: learning rate, normalisation, batch size
#
# Each experiment trains a fresh model for a few epochs and reports the validation
# MAE, so the choices are made on validation days and the test days stay untouched
# until the end.
#
# * **Learning rate against normalisation.** The same training with learning rates
#   a factor of ten apart, once on the raw features and once standardised. Why it
#   matters: the largest safe learning rate is set by the steepest direction of the
#   error surface, and raw temperatures around 60 make that direction thousands of
#   times steeper than the others.
# * **Batch size.** The same number of epochs, so the same amount of arithmetic,
#   with one batch of every training day, with batches of 256 and with batches of
#   32. Smaller batches give noisier steps but many more of them.
#
# Every run starts from the same model and the same shuffling (the same seed), so
# the differences come from the setting being varied and nothing else.


# %%
def fresh_model(train_set):
    """A new linear model for these training rows, starting from the mean target."""
    return start_from_mean(init_linear(train_set[0].shape[1]), train_set[1])


def learning_rate_table(raw_sets, scaled_sets, learning_rates, epochs, seed):
    """Validation MAE after `epochs` epochs for each learning rate, on raw and on
    standardised features. Returns {"raw": [...], "standardised": [...]} where each
    entry is an MAE or None when training diverged."""
    table = {}
    for name, (train_set, valid_set) in (("raw", raw_sets), ("standardised", scaled_sets)):
        row = []
        for learning_rate in learning_rates:
            _, history = train(fresh_model(train_set), train_set, valid_set, learning_rate,
                               epochs, 32, np.random.default_rng(seed))
            loss, valid_mae = history[-1]
            row.append(None if diverged(loss) else valid_mae)
        table[name] = row
    return table


def format_cell(value):
    """A table cell: a figure to two decimals, or "diverged"."""
    return f"{value:>12.2f}" if value is not None else f"{'diverged':>12}"

if __name__ == "__main__":
    learning_rates = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    sweep_epochs = 1 if ARGS.quick else 3
    table_of_rates = learning_rate_table(((train_raw, train_targets), (valid_raw, valid_targets)),
                                         ((train_inputs, train_targets),
                                          (valid_inputs, valid_targets)),
                                         learning_rates, sweep_epochs, ARGS.seed)
    print(f"validation MAE (°F) after {sweep_epochs} epoch(s), batch 32:")
    print(f"{'learning rate':>14}" + "".join(f"{rate:>12g}" for rate in learning_rates))
    for name, row in table_of_rates.items():
        print(f"{name:>14}" + "".join(format_cell(value) for value in row))

    # With the same number of epochs (the same amount of arithmetic), small batches
    # take many more steps.
    print(f"\nbatch size, {sweep_epochs} epoch(s) at learning rate 0.01:")
    for batch_size in (len(train_inputs), 256, 32):
        _, history = train(fresh_model((train_inputs, train_targets)),
                           (train_inputs, train_targets), (valid_inputs, valid_targets),
                           0.01, sweep_epochs, batch_size, np.random.default_rng(ARGS.seed))
        steps = sweep_epochs * -(-len(train_inputs) // batch_size)
        print(f"  batch {batch_size:5d}: {steps:4d} steps, validation MAE {history[-1][1]:.2f} °F")


# %% [markdown]
# ## The final model
#
# One more training run with the chosen settings (`--epochs`, `--learning-rate`,
# `--batch-size`), then the test days, used for the first time, and the weights it
# learned beside the exact answer's.


# %%
if __name__ == "__main__":
    print(f"training: {ARGS.epochs} epochs, learning rate {ARGS.learning_rate:g}, "
          f"batch {ARGS.batch_size}")
    layers, history = train(fresh_model((train_inputs, train_targets)),
                            (train_inputs, train_targets), (valid_inputs, valid_targets),
                            ARGS.learning_rate, ARGS.epochs, ARGS.batch_size,
                            np.random.default_rng(ARGS.seed))
    for epoch, (loss, valid_mae) in enumerate(history, start=1):
        if epoch in (1, len(history)) or epoch % max(1, len(history) // 5) == 0:
            print(f"  epoch {epoch:3d}: train MSE {loss:9.2f}, validation MAE {valid_mae:.2f} °F")
    if diverged(history[-1][0]):
        raise DataError(f"training diverged at learning rate {ARGS.learning_rate:g}; "
                        f"try a smaller --learning-rate")
    test_mae = evaluate(layers, test_inputs, test_targets)
    (weight, bias), = layers
    print(f"learned weights (per standard deviation of tmax, tmin, rain): "
          f"{np.round(weight[:, 0], 2).tolist()}, bias {bias[0, 0]:.2f}")
    print(f"least-squares weights:                                        "
          f"{np.round(closed_form[0][0][:, 0], 2).tolist()}, bias {closed_form[0][1][0, 0]:.2f}")
    print(f"test MAE: gradient descent {test_mae:.2f} °F, least squares "
          f"{closed_form_mae:.2f} °F, 'tomorrow = today' {persistence_mae:.2f} °F")
    for path in save_plots(ARGS.out, history, linear_forward(layers, test_inputs)[0],
                           test_targets):
        print(f"saved {path}")


# %% [markdown]
# ## Reading the results
#
# What a run of this chapter shows (above), on the real table and on the generated one:
#
# * **Learning rate.** On standardised features, rates from 0.001 to 0.1 all come
#   within about two tenths of a degree of each other; 0.0001 is still crawling after
#   three epochs, and 1.0
#   overshoots further at every step until the numbers overflow ("diverged").
# * **Normalisation.** On raw features only the smallest rate survives, and even it
#   is far behind: the temperature weights force a tiny step that the rain weight
#   and the bias cannot make progress with.
# * **Mini-batches.** Full-batch descent makes three steps in three epochs and is
#   nowhere near the answer; batches of 32 make almost nine hundred steps for the
#   same arithmetic and are already there.
# * **The check.** Gradient descent ends within a few hundredths of a degree of the
#   exact least-squares answer, and its weights nearly match: most of tomorrow's
#   high is today's high. The remaining gap comes from the noise of mini-batch
#   steps, which a smaller learning rate at the end would shrink (chapter 08).
#
# A straight line can only go so far: chapter 03 adds hidden layers.
#
# ### Exercises
# `python tools/exercises.py make 02_linreg` cuts these out of a copy, and
# `python tools/exercises.py check 02_linreg` grades it:
#
# * `mse_grad`: the gradient of the MSE with respect to each prediction.
# * `linear_backward`: the gradients of the loss with respect to the weight and the
#   bias.
# * `train`: forward, backward and a gradient step for every mini-batch.
#
# To think about: Why do raw features leave only the smallest learning rate usable?
# Why does gradient descent end near least squares' answer but not on it?
#
# Answers. Each weight's gradient scales with its feature: temperatures in tens of °F
# give steps so large that only a tiny rate is stable, and at that rate the rain
# weight and the bias hardly move. The end is mini-batch noise: each batch's gradient
# points a little off, so a constant rate keeps the weights jittering around the
# minimum; a rate that decays (chapter 08) or full batches would settle.


# %%
if __name__ == "__main__":
    print_summary({**figures, "test_mae": round(test_mae, 3),
                   "closed_form_mae": round(closed_form_mae, 3),
                   "persistence_mae": round(persistence_mae, 3),
                   "gradient_error": float(f"{check:.1e}"),
                   "seconds": round(time.perf_counter() - started, 1)})
