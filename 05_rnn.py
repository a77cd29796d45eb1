"""Chapter 05: a recurrent network reads the last days of weather and predicts tomorrow.

What this chapter teaches
-------------------------
Chapter 03's dense network sees one row of numbers and has no idea that they come in an
order. Weather does: yesterday matters more than last week, and the same pattern ("a
warm spell is ending") can happen on any day of a window. A recurrent neural network
(RNN) reads a sequence one day at a time, keeps a running summary of what it has seen
(its *hidden state*) and uses the *same* weights at every step. Here you build one in
numpy, from the forward pass over time to backpropagation through time (BPTT) derived
and written by hand, check its gradients numerically, watch gradients explode when the
learning rate is too large, tame them with gradient clipping, and compare the RNN with
chapter 03's dense network fed the same days laid out flat.

New since chapter 03 (and 04)
-----------------------------
* sequences: `make_sequences` turns the weather table into windows of N days;
* the tanh recurrent cell, its forward pass over time and its backward pass (BPTT);
* a numerical gradient check for a whole network;
* clipping gradients by their global norm, and what happens without it;
* how far back in time the gradient reaches (it fades: the problem chapter 05b solves).

How to run it
-------------
    python 05_rnn.py                  # about 3 seconds on a 2-core CPU
    python 05_rnn.py --quick          # about a second: 2 epochs instead of 20
    python 05_rnn.py --window 30 --hidden-size 64 --data path/to/clean_weather.csv
    python 05_rnn.py --help           # every flag

It downloads the weather table into `data/` when it can, otherwise it generates a
stand-in table and says so. Plots go to `out/` when matplotlib is installed.

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

try:  # plots are optional: without matplotlib the chapter prints text views only
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

CHAPTER = "05_rnn"


# %% [markdown]
# # Chapter 05: recurrent networks
#
# A dense network maps a fixed-size row of numbers to an output. To predict tomorrow's
# highest temperature from the last `N` days we could lay those days out in one long
# row of `3 N` numbers and hand it to chapter 03's network; we do exactly that below,
# as the baseline to beat. But that network has to learn separately what "the day
# before yesterday was warm" means at each position of the row, and its size grows
# with `N`.
#
# A recurrent network instead reads the days in order and carries a *hidden state*
# `h`, a vector of `hidden_size` numbers that summarises everything read so far:
#
#     h_0 = 0
#     h_t = tanh(x_t W_x + h_{t-1} W_h + b)        for t = 1 .. N
#     prediction = h_N W_y + b_y
#
# `x_t` is day `t` of the window (tmax, tmin, rain). The same `W_x`, `W_h`, `b` are used
# at every step, so the network has the same number of weights whatever `N` is, and
# what it learns about "a warm day followed by rain" applies wherever that happens.


# %% [markdown]
# ## From a table of days to sequences
#
# Each example is now a *window*: the features of `window` consecutive days, ending
# today, and the target is today's `tmax_tomorrow`. With days `d` numbered from 0, the
# example ending on day `d` is
#
#     sequence = features[d - window + 1 .. d]      shape (window, 3)
#     target   = tmax_tomorrow[d]
#
# so a table of `D` days gives `D - window + 1` examples, stacked into an array of
# shape (examples, window, 3): examples, time steps, features. That is the shape every
# recurrent network in this course reads. The windows overlap (day `d` appears in
# `window` of them); numpy's `sliding_window_view` finds them all without a Python
# loop, and we copy the result into one compact array (a few megabytes) so the matrix
# products that read it later run at full speed.
#
# We then split the examples in time order with the carried `split_data`, so the test
# windows are all later than the training windows, as in every weather chapter.


# %%
def make_sequences(table, window):
    """Cut the weather table into overlapping windows of `window` days.

    Returns (sequences, targets): sequences of shape (examples, window, features) with
    the FEATURES columns, targets of shape (examples, 1) with tomorrow's tmax after the
    last day of each window. A window longer than the table is a DataError."""
    if window < 1:
        raise DataError(f"--window must be at least 1 day, not {window}")
    if window > len(table):
        raise DataError(f"--window {window} is longer than the data ({len(table)} days); "
                        f"use a window of at most {len(table)} days")
    features = table[:, [WEATHER_COLUMNS.index(name) for name in FEATURES]]
    # sliding_window_view gives (examples, features, window); put time before features.
    sequences = np.lib.stride_tricks.sliding_window_view(features, window, axis=0)
    sequences = np.ascontiguousarray(sequences.transpose(0, 2, 1))
    targets = table[window - 1:, [WEATHER_COLUMNS.index(TARGET)]]
    return sequences, targets


# %% [markdown]
# ## Set-up: flags, data and plots (not the lesson)
#
# The code in this section is what the chapter needs but does not teach; in a
# notebook its cells open collapsed. Every chapter shares its command line: `--seed`
# for repeatable runs, `--data` for a local copy of the data, `--quick` for a run of
# a few seconds (used by the tests) and `--out` for where files are written; this one
# adds the shape of the networks and of their training. Flags are checked before any
# work starts, so a typing mistake costs no time; a window longer than the data can
# only be caught once the data is loaded. In a notebook the flags come from the
# environment variable `ZERO_TO_GPT_ARGS`. The last line of output is `summary:` and
# a line of JSON with the chapter's headline figures.
#
# The weather table is chapter 01's, read by the same carried loader: downloaded
# once into `data/` and checked against its SHA-256 digest, or, offline, generated
# with the same shape.


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


# %% [markdown]
# ## Carried from chapter 03: losses, scaling and the dense network
#
# The losses, the scaling of inputs and the dense network of chapter 03, carried
# unchanged; see chapter 03 for their derivations. In short:
#
#     MSE = (1/n) sum_i (p_i - t_i)^2          d MSE / d p_i = 2 (p_i - t_i) / n
#     MAE = (1/n) sum_i |p_i - t_i|            (the error we report, in °F)
#
# `standardise` shifts and scales every column to mean 0 and spread 1 with numbers
# measured on the training set only. Applied to an array of windows, shape
# (examples, days, features), it standardises each (day, feature) column, which here
# amounts to standardising each feature.


# %% jupyter={"source_hidden": true}
def mse(predictions, targets):
    """Mean squared error: the average of (prediction - target)^2."""
    return float(np.mean((predictions - targets) ** 2))


def mae(predictions, targets):
    """Mean absolute error: the average distance between prediction and target."""
    return float(np.mean(np.abs(predictions - targets)))


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


def mse_grad(predictions, targets):
    """The gradient of `mse` with respect to each prediction: 2 (p - t) / n."""
    # exercise: the gradient of the MSE with respect to each prediction
    return 2 * (predictions - targets) / predictions.size
    # end exercise


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
# The dense network of chapter 03 is our baseline: it gets the same window of days as
# the recurrent network, laid out flat as one row of `3 * window` numbers. Its layers
# are a list of `(weight, bias)` pairs; the forward pass applies a ReLU after every
# layer but the last, and the backward pass walks back through the layers with the
# chain rule (chapter 03 derives it line by line).


# %% jupyter={"source_hidden": true}
def relu(x):
    """The rectified linear unit: x where x > 0, else 0, elementwise."""
    return np.maximum(x, 0)


def init_dense(layer_sizes, rng):
    """A dense network with the given layer sizes, e.g. [3, 32, 32, 1], as a list of
    (weight, bias) pairs: weight (inputs, outputs) drawn from a normal distribution
    with standard deviation sqrt(2 / inputs) (He initialisation), bias (1, outputs)
    zeros."""
    # exercise: weights drawn with He initialisation, biases zero, one pair a layer
    return [(rng.normal(0.0, np.sqrt(2.0 / inputs), size=(inputs, outputs)),
             np.zeros((1, outputs)))
            for inputs, outputs in zip(layer_sizes[:-1], layer_sizes[1:])]
    # end exercise


def dense_forward(layers, inputs):
    """Run `inputs` (rows, features) through the network. Returns the outputs (rows,
    last layer size) and the cache: one (layer input, pre-activation) pair a layer."""
    # exercise: linear then ReLU each layer (linear only at the end), caching what backward needs
    cache = []
    activations = inputs
    for index, (weight, bias) in enumerate(layers):
        pre_activation = activations @ weight + bias
        cache.append((activations, pre_activation))
        is_last = index == len(layers) - 1
        activations = pre_activation if is_last else relu(pre_activation)
    return activations, cache
    # end exercise


def dense_backward(layers, cache, output_grad):
    """Backpropagation: given `cache` from `dense_forward` and `output_grad`, the
    loss's gradient with respect to the network's outputs, return one (weight_grad,
    bias_grad) pair per layer, in the order of `layers`."""
    # exercise: backpropagation: each layer's weight and bias gradients, last layer first
    gradients = []
    grad = output_grad
    for index in reversed(range(len(layers))):
        weight, _ = layers[index]
        layer_inputs, pre_activation = cache[index]
        if index < len(layers) - 1:
            grad = grad * (pre_activation > 0)       # back through the ReLU
        gradients.append((layer_inputs.T @ grad, grad.sum(axis=0, keepdims=True)))
        grad = grad @ weight.T                       # on to the layer below
    return gradients[::-1]
    # end exercise


# %% [markdown]
# Two more helpers come from chapter 03: the central finite difference that checks a
# gradient, and the test for a training loss that has blown up.


# %% jupyter={"source_hidden": true}
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


def diverged(loss):
    """True when a training loss has blown up: overflowed to inf or nan, or grown past
    1e12 °F² (errors of a million degrees), where no later step can recover."""
    return not np.isfinite(loss) or loss > 1e12


# %% [markdown]
# ## Pictures
#
# One small helper draws every plot of the chapter: a few named curves against their
# index, optionally on a logarithmic axis (gradient sizes span many orders of
# magnitude). Without matplotlib it does nothing; the numbers are printed anyway.


# %% jupyter={"source_hidden": true}
def plot_curves(path, title, xlabel, ylabel, curves, log_scale=False):
    """Save a line plot of `curves` (label -> sequence of y values) to `path`."""
    if plt is None:
        return
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, values in curves.items():
        axes.plot(np.arange(len(values)), values, label=label)
    if log_scale:
        axes.set_yscale("log")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.legend()
    figure.tight_layout()
    show_figure(figure, path)
    plt.close(figure)


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
    parser.add_argument("--window", type=int, default=14,
                        help="days of weather each prediction reads (default 14)")
    parser.add_argument("--hidden-size", type=int, default=32,
                        help="units in the hidden state, and in each of the dense "
                             "baseline's two hidden layers (default 32)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="passes over the training windows (default 20, --quick 2)")
    parser.add_argument("--learning-rate", type=float, default=0.02,
                        help="step size of gradient descent (default 0.02)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="windows per mini-batch (default 32)")
    parser.add_argument("--max-norm", type=float, default=1.0,
                        help="clip gradients to this global norm (default 1.0)")
    parser.add_argument("--large-learning-rate", type=float, default=0.5,
                        help="the too-large learning rate of the clipping demonstration "
                             "(default 0.5)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.quick else 20
    for flag in ("window", "hidden_size", "epochs", "batch_size"):
        value = getattr(args, flag)
        if value < 1:
            raise DataError(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    for flag in ("learning_rate", "max_norm", "large_learning_rate"):
        value = getattr(args, flag)
        if not (value > 0 and np.isfinite(value)):
            raise DataError(f"--{flag.replace('_', '-')} must be a positive number, "
                            f"not {value}")
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
    rng = np.random.default_rng(ARGS.seed)
    dates, table, source = load_weather(ARGS.data, ARGS.seed)
    print(f"weather: {len(table)} days from {source} ({dates[0]} to {dates[-1]})")
    sequences, targets = make_sequences(table, ARGS.window)
    splits = split_data(sequences, targets)
    if min(len(inputs) for inputs, _ in splits) < 1:
        raise DataError(f"{len(table)} days make only {len(sequences)} windows of "
                        f"{ARGS.window} days, too few to split into train, valid and "
                        f"test; use a shorter --window or more data")
    (train_inputs, train_targets), _, (test_inputs, test_targets) = splits
    scaled_inputs = standardise(*(inputs for inputs, _ in splits))
    scaled_targets = standardise(*(targets for _, targets in splits))
    print(f"windows of {ARGS.window} days: {len(train_inputs)} train, "
          f"{len(splits[1][0])} valid, {len(test_inputs)} test")

    # The simplest forecast: tomorrow's tmax equals the last day's tmax in the window.
    persistence_mae = mae(test_inputs[:, -1, [FEATURES.index("tmax")]], test_targets)
    # Chapter 02's straight line, least squares on the last day of each window (with a
    # column of ones for the bias), fitted on the training windows: the yardstick every
    # weather chapter reports beside its own figure.
    [(weight, bias)] = least_squares(train_inputs[:, -1], train_targets)
    closed_form_mae = mae(test_inputs[:, -1] @ weight + bias, test_targets)
    print(f"test MAE of 'tomorrow = today': {persistence_mae:.2f} °F; of least squares "
          f"on the last day: {closed_form_mae:.2f} °F")


# %% [markdown]
# ## The recurrent cell, forward over time
#
# For a batch of `B` windows, `x_t` is a (B, features) matrix (day `t` of every window)
# and `h_t` a (B, hidden_size) matrix. One step of the cell is
#
#     a_t = x_t W_x + h_{t-1} W_h + b          (B, hidden_size)
#     h_t = tanh(a_t)
#
# `tanh` squashes every unit into (-1, 1), which keeps the hidden state bounded however
# long the sequence is: a linear recurrence `h_t = h_{t-1} W_h` would grow or shrink
# geometrically. After the last day a linear read-out gives the prediction,
# `h_N W_y + b_y`, of shape (B, 1).
#
# Initialisation: `W_x` and `W_h` are drawn with standard deviation `1/sqrt(inputs)`, so
# each `a_t` starts with a variance near 1 and tanh is neither flat (saturated) nor
# merely linear; biases start at zero. The term `x_t W_x + b` does not depend on the
# hidden state, so we compute it for all days in one matrix product before the loop;
# only `h_{t-1} W_h` has to wait for the previous step.


# %%
def init_rnn(input_size, hidden_size, rng):
    """The recurrent network's weights, a dict of named arrays."""
    return {
        "input_weight": rng.normal(0.0, 1 / np.sqrt(input_size), (input_size, hidden_size)),
        "hidden_weight": rng.normal(0.0, 1 / np.sqrt(hidden_size), (hidden_size, hidden_size)),
        "hidden_bias": np.zeros((1, hidden_size)),
        "output_weight": rng.normal(0.0, 1 / np.sqrt(hidden_size), (hidden_size, 1)),
        "output_bias": np.zeros((1, 1)),
    }


def rnn_forward(params, sequences):
    """Run the RNN over `sequences` (batch, steps, features). Returns the predictions
    (batch, 1) and the cache that the backward pass needs: the inputs and every hidden
    state h_0 .. h_N."""
    batch, steps, _ = sequences.shape
    input_part = sequences @ params["input_weight"] + params["hidden_bias"]
    # exercise: the recurrence h_t = tanh(x_t W_x + b + h_{t-1} W_h), from h_0 = 0
    hidden = np.zeros((batch, params["hidden_weight"].shape[0]))
    hiddens = [hidden]
    for step in range(steps):
        hidden = np.tanh(input_part[:, step] + hidden @ params["hidden_weight"])
        hiddens.append(hidden)
    # end exercise
    predictions = hidden @ params["output_weight"] + params["output_bias"]
    return predictions, {"sequences": sequences, "hiddens": hiddens}


# %% [markdown]
# ## Backpropagation through time, derived
#
# Unroll the loop and the RNN is just a deep dense network, one layer per day, whose
# layers all share the same weights. Backpropagation through time (BPTT) is ordinary
# backpropagation on that unrolled network. Let `g = d loss / d prediction`, (B, 1);
# for the mean squared error over a batch of `B`, `g = 2 (prediction - target) / B`.
#
# **Read-out.** `prediction = h_N W_y + b_y`, exactly a dense layer, so
#
#     d loss / d W_y = h_N^T g        d loss / d b_y = sum of g over the batch
#     d loss / d h_N = g W_y^T
#
# **One step back.** Write `delta_t = d loss / d h_t`: everything the loss knows about
# `h_t`. `h_t` reaches the loss only through `a_{t+1}` (and, for `t = N`, the read-out),
# so with `tanh'(a) = 1 - tanh(a)^2 = 1 - h_t^2` (elementwise):
#
#     d loss / d a_t = delta_t * (1 - h_t^2)                    (elementwise product)
#     delta_{t-1}    = (d loss / d a_t) W_h^T
#     d loss / d x_t = (d loss / d a_t) W_x^T
#
# **Shared weights add up.** `W_x`, `W_h` and `b` are used at every step, so their
# gradient is the sum of what each step contributes (the multivariate chain rule sums
# over every path from a weight to the loss):
#
#     d loss / d W_x = sum over t of x_t^T     (d loss / d a_t)
#     d loss / d W_h = sum over t of h_{t-1}^T (d loss / d a_t)
#     d loss / d b   = sum over t and the batch of d loss / d a_t
#
# **Why gradients explode or vanish.** Chain the step rule `k` times:
#
#     delta_{t-k} = delta_t  J_t J_{t-1} ... J_{t-k+1},   J_s = diag(1 - h_s^2) W_h^T
#
# a product of `k` matrices. If they tend to stretch vectors (large `W_h`), the
# gradient of the earliest days grows geometrically with `k`: it *explodes*, one update
# throws the weights far away and training diverges. If they tend to shrink vectors
# (small `W_h`, or saturated units where `1 - h^2` is near 0), it *vanishes*: the
# network cannot learn how early days matter. Clipping, below, treats the first;
# gates (chapter 05b) treat the second.


# %%
def rnn_backward(params, cache, output_grad, with_input_grad=False):
    """Backpropagation through time. `output_grad` is d loss / d predictions (batch, 1).
    Returns the gradients, a dict with the same names as `params`; with
    `with_input_grad=True`, also d loss / d sequences (batch, steps, features), which
    training does not need but which shows how far back the loss reaches."""
    sequences, hiddens = cache["sequences"], cache["hiddens"]
    steps = sequences.shape[1]
    grads = {
        "output_weight": hiddens[-1].T @ output_grad,
        "output_bias": output_grad.sum(axis=0, keepdims=True),
    }
    hidden_grad = output_grad @ params["output_weight"].T         # delta_N
    preactivation_grads = np.zeros(sequences.shape[:2] + hidden_grad.shape[1:])
    hidden_weight_grad = np.zeros_like(params["hidden_weight"])
    # exercise: backpropagation through time, from the last step back to the first
    for step in reversed(range(steps)):
        # hiddens[step + 1] is h_t and hiddens[step] is h_{t-1} for this step.
        preactivation_grad = hidden_grad * (1 - hiddens[step + 1] ** 2)
        preactivation_grads[:, step] = preactivation_grad
        hidden_weight_grad += hiddens[step].T @ preactivation_grad
        hidden_grad = preactivation_grad @ params["hidden_weight"].T    # delta_{t-1}
    # end exercise
    grads["hidden_weight"] = hidden_weight_grad
    # The sums over time of x_t^T (d loss / d a_t), in one product over (batch, time).
    flat_inputs = sequences.reshape(-1, sequences.shape[2])
    flat_grads = preactivation_grads.reshape(-1, preactivation_grads.shape[2])
    grads["input_weight"] = flat_inputs.T @ flat_grads
    grads["hidden_bias"] = flat_grads.sum(axis=0, keepdims=True)
    if with_input_grad:
        return grads, preactivation_grads @ params["input_weight"].T
    return grads


# %% [markdown]
# ### The unrolled network, drawn
#
# The picture of the two sections above: the RNN unrolled over its days, the same
# `W_x` and `W_h` at every step, the read-out `W_y` on the last state only. The red
# arrows are the backward pass: `delta_N` starts at the prediction and walks back
# through every `h_t`, picking up one factor `J_t` per day; each day also leaves its
# share of the gradients of the shared weights, which add up. Without matplotlib the
# same picture is printed as text.


# %% jupyter={"source_hidden": true}
def draw_unrolled_rnn(path, days=4):
    """Draw the RNN unrolled over `days` steps, forward in black, backpropagation through
    time in red, to `path`; without matplotlib, print the same picture as text."""
    names = [str(t) for t in range(1, days + 1)]
    if plt is None:
        print(f"the RNN unrolled over N = {days} days (matplotlib is not installed, so "
              f"as text); forward on the third line, backward (BPTT) on the fourth:")
        print((" " * 15 + "".join(f"{'x_' + name:<13}" for name in names)).rstrip())
        print((" " * 15 + f"{'v W_x':<13}" * days).rstrip())
        print("  h_0" + "".join(f" --W_h--> h_{name}" for name in names) + " --W_y--> prediction")
        print("  h_0" + "".join(f" <-delta- h_{name}" for name in names) + " <---g--- loss")
        print("  W_x, W_h and b are shared by every step: their gradients add up over t")
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure, axes = plt.subplots(figsize=(11, 4.2))
    boxes = dict(boxstyle="round,pad=0.4", fc="#e8f0fe", ec="#3b6fb6")
    weights = dict(ha="center", va="center", fontsize=9, color="#3b6fb6")
    forward = dict(arrowstyle="-|>", color="black", shrinkA=16, shrinkB=16)
    backward = dict(arrowstyle="-|>", color="#c0392b", shrinkA=16, shrinkB=16,
                    connectionstyle="arc3,rad=0.45")
    axes.text(0, 2, "$h_0$", ha="center", va="center", bbox=boxes)
    for column, name in enumerate(names, start=1):
        x = 2 * column
        axes.text(x, 0, f"$x_{{{name}}}$", ha="center", va="center",
                  bbox=dict(boxstyle="round,pad=0.4", fc="#fdf2e9", ec="#d35400"))
        axes.text(x, 2, f"$h_{{{name}}}$", ha="center", va="center", bbox=boxes)
        axes.annotate("", xy=(x, 2), xytext=(x, 0), arrowprops=forward)
        axes.text(x + 0.3, 1, "$W_x$", **weights)
        axes.annotate("", xy=(x, 2), xytext=(x - 2, 2), arrowprops=forward)
        axes.text(x - 1, 1.75, "$W_h$", **weights)
        axes.annotate("", xy=(x - 2, 2.15), xytext=(x, 2.15), arrowprops=backward)
        axes.text(x - 1, 2.95, f"$\\delta_{column - 1} = \\delta_{column} J_{column}$",
                  ha="center", fontsize=9, color="#c0392b")
    end = 2 * days
    axes.text(end + 2.2, 2, "prediction\n$h_N W_y + b_y$", ha="center", va="center",
              bbox=dict(boxstyle="round,pad=0.4", fc="#eafaf1", ec="#1e8449"))
    axes.annotate("", xy=(end + 1.4, 2), xytext=(end, 2), arrowprops=forward)
    axes.text(end + 0.7, 1.75, "$W_y$", **weights)
    axes.annotate("", xy=(end, 2.15), xytext=(end + 1.4, 2.15),
                  arrowprops={**backward, "shrinkA": 4})
    axes.text(end + 0.7, 2.95, f"$\\delta_{days} = g W_y^T$", ha="center", fontsize=9,
              color="#c0392b")
    axes.text(days + 1, -1.0, "the same $W_x$, $W_h$, $b$ at every step: "
              "their gradients add up over $t$", ha="center", fontsize=10, color="#3b6fb6")
    axes.text(days + 1, 3.6, f"an RNN unrolled over N = {days} days: forward left to "
              "right (black), backpropagation through time right to left (red)",
              ha="center", fontsize=10)
    axes.set(xlim=(-1, end + 3.5), ylim=(-1.4, 4.0))
    axes.axis("off")
    show_figure(figure, path)
    plt.close(figure)


# %%
if __name__ == "__main__":
    draw_unrolled_rnn(os.path.join(ARGS.out, f"{CHAPTER}_unrolled.png"))


# %% [markdown]
# ## Checking the gradients
#
# A backward pass written by hand is easy to get subtly wrong, and a wrong gradient
# often still trains, just badly. Chapter 03 checked its dense network against finite
# differences; `network_gradient_error` does the same for any network given as its
# weights, its forward function and its backward function, so one check serves the
# RNN and the dense baseline. The weights come as a dict of named arrays (the RNN) or
# a list of `(weight, bias)` pairs (the dense network); `parameter_list` lays either
# out as one list of arrays in a fixed order, and the same function lays out their
# gradients, which have the same structure. The training loop and clipping below use
# it too. The check costs two forward passes per weight, so it runs on a small
# network of each kind and a few windows.


# %%
def parameter_list(params):
    """A network's weight arrays (or their gradients) in a fixed order: a dict of
    named arrays in the order of its names, or a list of (weight, bias) pairs."""
    if isinstance(params, dict):
        return [params[name] for name in sorted(params)]
    return [array for pair in params for array in pair]


def network_gradient_error(params, forward, backward, inputs, targets):
    """The largest difference between the gradients from `backward` and finite
    differences of the MSE, over every weight, relative to the largest gradient."""
    predictions, cache = forward(params, inputs)
    by_hand = backward(params, cache, mse_grad(predictions, targets))

    def loss_of():
        return mse(forward(params, inputs)[0], targets)

    worst, largest = 0.0, 1e-12
    for parameter, gradient in zip(parameter_list(params), parameter_list(by_hand)):
        numeric = numerical_gradient(loss_of, parameter)
        worst = max(worst, float(np.abs(numeric - gradient).max()))
        largest = max(largest, float(np.abs(numeric).max()))
    return worst / largest


# %% [markdown]
# ## Gradient clipping
#
# When a gradient explodes, one update of `learning_rate * gradient` can move the
# weights so far that the loss jumps up by orders of magnitude, or overflows to `inf`
# and `nan`, and training never recovers. *Clipping by global norm* caps the length of
# the whole gradient, all weight arrays seen as one long vector:
#
#     norm = sqrt(sum over every weight w of (d loss / d w)^2)
#     if norm > max_norm:  every gradient *= max_norm / norm
#
# The direction of the step is kept; only its length is limited, so an unusual batch
# can no longer throw the weights across the landscape. Scaling all arrays by the same
# factor matters: clipping each array (or each number) on its own would change the
# direction. Ordinary steps, with a norm below `max_norm`, are untouched.


# %%
def global_norm(grads):
    """The length of all gradients seen as one vector."""
    return float(np.sqrt(sum(np.sum(grad ** 2) for grad in parameter_list(grads))))


def clip_by_global_norm(grads, max_norm):
    """Scale `grads` in place so their global norm is at most `max_norm` (no clipping
    when max_norm is None or 0). Returns the norm before clipping."""
    # exercise: scale the gradients in place to a global norm of at most max_norm
    norm = global_norm(grads)
    if max_norm and norm > max_norm:
        for grad in parameter_list(grads):
            grad *= max_norm / norm
    return norm
    # end exercise


# %% [markdown]
# ## Training
#
# The loop of chapter 03, for any network: mini-batches in a shuffled order (shuffling
# the *windows* of the training years is safe; each window is a self-contained
# example and all of them come before the test years), the forward pass, the mean
# squared error and its gradient, the backward pass, clipping, and a plain gradient
# descent step `w -= learning_rate * d loss / d w`. It records the loss of every epoch
# on the training and validation windows and the gradient norm of every step, and it
# stops at once if the loss stops being a finite number (it has diverged).
#
# With a constant learning rate the weights never settle: each step jumps around the
# bottom of the valley by a random amount, and the last epoch is not always the best.
# So the loop keeps a copy of the weights from the epoch with the lowest validation
# loss and puts them back at the end. Choosing by the validation windows, never the
# test windows, keeps the test error an honest estimate.


# %%
def train(params, forward, backward, train_set, valid_set, learning_rate, epochs,
          batch_size, rng, max_norm=None):
    """Mini-batch gradient descent on the MSE with clipping, training `params` in place
    and ending with the weights of the epoch with the lowest validation loss. Returns
    the params and the history: train and valid MSE per epoch, gradient norm per step,
    and whether training diverged (then it stops at once)."""
    inputs, targets = train_set
    history = {"train_loss": [], "valid_loss": [], "grad_norm": [], "diverged": False}
    best = [array.copy() for array in parameter_list(params)]
    for _ in range(epochs):
        order = rng.permutation(len(inputs))
        losses = []
        for start in range(0, len(inputs), batch_size):
            batch = order[start:start + batch_size]
            predictions, cache = forward(params, inputs[batch])
            losses.append(mse(predictions, targets[batch]))
            if diverged(losses[-1]):
                history["diverged"] = True
                return params, history  # more steps cannot bring it back
            grads = backward(params, cache, mse_grad(predictions, targets[batch]))
            history["grad_norm"].append(clip_by_global_norm(grads, max_norm))
            for param, grad in zip(parameter_list(params), parameter_list(grads)):
                param -= learning_rate * grad
        history["train_loss"].append(float(np.mean(losses)))
        history["valid_loss"].append(mse(forward(params, valid_set[0])[0], valid_set[1]))
        if history["valid_loss"][-1] <= min(history["valid_loss"]):
            best = [array.copy() for array in parameter_list(params)]
    for array, saved in zip(parameter_list(params), best):
        array[...] = saved
    return params, history


# %% [markdown]
# ## Exploding and vanishing gradients, measured
#
# Two experiments make the products of Jacobians above visible.
#
# **How far back the gradient reaches.** `gradient_by_lag` runs the backward pass with
# `with_input_grad=True` and measures the size of `d loss / d x_{N-k}`, the gradient
# that reaches the day `k` days before the last one. We take one freshly initialised
# RNN and multiply its recurrent weights `W_h` by 0.5, 1 and 3. Small recurrent
# weights shrink the gradient at every step back in time (it vanishes: by 20 days back
# it is millions of times smaller than for the last day); large ones stretch it, and it
# grows geometrically with the lag (it explodes). The trained RNN's own curve, printed
# as well, fades with the lag too: it barely learns from the start of a long window.
#
# **Training with a learning rate that is too large.** `clipping_experiment` trains
# two copies of the same RNN with a large learning rate, one with clipping and one
# without. Without clipping each step makes the weights larger, larger weights give a
# larger gradient and hence a larger next step: the gradient norm grows by orders of
# magnitude every few steps until the loss blows up (chapter 03's `diverged`). This
# runaway is not special to recurrent networks, but the product of Jacobians makes
# an RNN prone to it: a small change in `W_h` is raised to the power of the window.
# Clipping caps every step at `learning_rate * max_norm`, and the same learning rate
# trains.


# %%
def gradient_by_lag(params, forward, backward, sequences, targets):
    """The size (2-norm over the batch and features) of d loss / d x for each day of the
    window, listed from the last day (lag 0) back to the first."""
    predictions, cache = forward(params, sequences)
    _, input_grad = backward(params, cache, mse_grad(predictions, targets),
                             with_input_grad=True)
    return np.sqrt((input_grad ** 2).sum(axis=(0, 2)))[::-1]


def recurrent_scale_experiment(sequences, targets, hidden_size, scales, rng):
    """gradient_by_lag for one fresh RNN whose recurrent weights are multiplied by each
    of `scales` in turn: a dict from scale to the gradient size at every lag."""
    params = init_rnn(sequences.shape[2], hidden_size, rng)
    hidden_weight = params["hidden_weight"].copy()
    reach = {}
    for scale in scales:
        params["hidden_weight"] = hidden_weight * scale
        reach[scale] = gradient_by_lag(params, rnn_forward, rnn_backward, sequences, targets)
    return reach


def clipping_experiment(params, forward, backward, train_set, valid_set, learning_rate,
                        epochs, batch_size, max_norm, seed):
    """Train two copies of `params` with the same (large) learning rate and the same
    order of batches, first without clipping and then with it. Returns both histories."""
    histories = []
    for clip in (None, max_norm):
        copy = {name: array.copy() for name, array in params.items()}
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is the point here
            histories.append(train(copy, forward, backward, train_set, valid_set,
                                   learning_rate, epochs, batch_size,
                                   np.random.default_rng(seed), clip)[1])
    return histories


# %% [markdown]
# ## The experiment
#
# The set-up's last cell loaded the weather, cut it into windows, split them in time
# order and scaled inputs and targets with the training set's mean and standard
# deviation (the networks learn faster on numbers near 0 and 1; predictions are
# turned back into °F to report them). It also scored two yardsticks on the test
# windows: "tomorrow's tmax = today's", and chapter 02's least-squares line on the
# window's last day. Then, for the RNN and for chapter 03's dense network fed the
# same window laid out flat, the chapter checks the gradients, trains with the same
# loop, learning rate and clipping, and prints the test error in °F beside the
# yardsticks. Last come the two gradient experiments.
#
# What to expect, with 14-day windows, from the default run on the generated table:
# RNN 3.54 °F, dense network 3.59 °F, least squares 3.56 °F, "tomorrow = today"
# 3.68 °F. One run's gap of a few hundredths is inside the noise of training, so we
# measured more: over `--seed` 0 to 4 (each seed also draws a new generated table)
# the RNN beat the dense network every time, by 0.01 to 0.12 °F (0.07 on average),
# and beat least squares in four runs of five, by up to 0.07 °F (a tie in the
# fifth); on the real table (`--data`, seeds 0 to 2) it beat the dense network by
# 0.02 to 0.08 °F and least squares by 0.02 to 0.06 °F. So the RNN wins, by a little
# and with half the weights: tomorrow depends mostly on the last day or two, which
# the dense network reads directly, and the fading gradient means the RNN hardly
# uses the first week of its window anyway (the last lines of the output show it).


# %%
def flatten_windows(sequences):
    """(examples, days, features) -> (examples, days * features): a window as one row,
    the input of a dense network."""
    return sequences.reshape(len(sequences), -1)


# %% [markdown]
# ### Training both networks
#
# Each network's gradients are checked against finite differences, then it is
# trained with the same loop, learning rate and clipping, and scored on the test days
# in °F beside "tomorrow = today".


# %%
if __name__ == "__main__":
    # Each network: how to make one of a given hidden size, its forward and backward
    # functions, and the shape of input it reads (windows, or windows laid out flat).
    features = len(FEATURES)
    models = {
        "rnn": (lambda hidden_size: init_rnn(features, hidden_size, rng),
                rnn_forward, rnn_backward, lambda windows: windows),
        "dense": (lambda hidden_size: init_dense(
                      [ARGS.window * features, hidden_size, hidden_size, 1], rng),
                  dense_forward, dense_backward, flatten_windows),
    }
    figures = {"chapter": CHAPTER, "source": source, "window": ARGS.window,
               "persistence_mae": round(persistence_mae, 3),
               "closed_form_mae": round(closed_form_mae, 3)}
    losses, predictions, reach, worst_check = {}, {}, {}, 0.0
    print(f"\ntraining {ARGS.epochs} epochs, learning rate {ARGS.learning_rate:g}, batch "
          f"{ARGS.batch_size}, gradients clipped at norm {ARGS.max_norm:g}:")
    for name, (make, forward, backward, shape) in models.items():
        sets = [(shape(inputs), targets)
                for inputs, targets in zip(scaled_inputs, scaled_targets)]
        # The hand-written gradients against finite differences: a small network of
        # the same kind and three windows are enough to catch a bug. Not too small: with
        # a handful of units a window can switch off every unit of a ReLU layer, and
        # the next layer's pre-activation then sits exactly on the ReLU's kink at 0,
        # where a finite difference sees half a slope and the check fails for nothing.
        check = network_gradient_error(make(8), forward, backward, sets[0][0][:3],
                                       sets[0][1][:3])
        worst_check = max(worst_check, check)
        params, history = train(make(ARGS.hidden_size), forward, backward, sets[0],
                                sets[1], ARGS.learning_rate, ARGS.epochs,
                                ARGS.batch_size, rng, ARGS.max_norm)
        if history["diverged"]:
            raise DataError(f"training the {name} network diverged; use a smaller "
                            f"--learning-rate or --max-norm")
        # Back from standardised units to °F: multiply by the spread, add the mean.
        predictions[name] = (forward(params, sets[2][0])[0] * train_targets.std()
                             + train_targets.mean())
        test_mae = mae(predictions[name], test_targets)
        losses[name] = history["valid_loss"]
        figures[f"{name}_test_mae"] = round(test_mae, 3)
        weights = sum(array.size for array in parameter_list(params))
        print(f"  {name:>5}: {weights} weights, gradient check {check:.1e}, valid MSE "
              f"{history['valid_loss'][0]:.3f} -> {min(history['valid_loss']):.3f} (best), "
              f"test MAE {test_mae:.2f} °F")
        if name != "dense":
            reach[name] = gradient_by_lag(params, forward, backward, *sets[2])
    figures["gradient_error"] = float(f"{worst_check:.1e}")
    print("test MAE, lower is better:")
    for name, value in (("'tomorrow = today'", persistence_mae),
                        ("least squares", closed_form_mae),
                        *((f"{name} network", figures[f"{name}_test_mae"]) for name in models)):
        print(f"  {name:<20} {value:.2f} °F")


# %% [markdown]
# ### Exploding gradients and clipping
#
# A learning rate that is too large, first without and then with clipping.


# %%
if __name__ == "__main__":
    # Exploding gradients: a learning rate that is too large, without and with clipping.
    demo_windows = min(3000, len(train_inputs))
    unclipped, clipped = clipping_experiment(
        init_rnn(features, ARGS.hidden_size, rng), rnn_forward, rnn_backward,
        (scaled_inputs[0][:demo_windows], scaled_targets[0][:demo_windows]),
        (scaled_inputs[1], scaled_targets[1]), ARGS.large_learning_rate, 3,
        ARGS.batch_size, ARGS.max_norm, ARGS.seed)
    largest = max(unclipped["grad_norm"])
    print(f"\nlearning rate {ARGS.large_learning_rate:g} without clipping: gradient norm "
          f"{unclipped['grad_norm'][0]:.2g} at the first step, "
          + (f"{largest:.2g}" if np.isfinite(largest) else "overflowing")
          + f" after {len(unclipped['grad_norm'])} steps; "
          + ("the loss blew up (diverged)" if unclipped["diverged"] else
             f"valid MSE {min(unclipped['valid_loss']):.3f}"))
    print(f"learning rate {ARGS.large_learning_rate:g} clipped at {ARGS.max_norm:g}: "
          f"largest norm before clipping {max(clipped['grad_norm']):.2g}, "
          + ("diverged" if clipped["diverged"] else
             f"valid MSE {min(clipped['valid_loss']):.3f}"))
    figures["unclipped_diverged"] = unclipped["diverged"]
    figures["clipped_diverged"] = clipped["diverged"]


# %% [markdown]
# ### How far back the gradient reaches
#
# A fresh RNN with its recurrent weights scaled down, unchanged and up, on long
# windows; then the trained networks on their own windows.


# %%
if __name__ == "__main__":
    # How far back the gradient reaches: a fresh RNN with scaled recurrent weights on
    # long windows, then the trained networks on their own windows.
    long_window = min(60, len(table) // 2)  # at least two windows, even from a tiny file
    long_inputs, long_targets = make_sequences(table, long_window)
    long_inputs, long_targets = (standardise(long_inputs[:256])[0],
                                 standardise(long_targets[:256])[0])
    scales = {f"RNN, W_h x {scale:g}": curve for scale, curve in recurrent_scale_experiment(
        long_inputs, long_targets, ARGS.hidden_size, (0.5, 1, 3), rng).items()}
    lags = [lag for lag in (0, 1, 2, 5, 10, 20, 40, 59) if lag < long_window]
    print(f"\nsize of d loss / d x for the day k days before the last (freshly "
          f"initialised networks, {long_window}-day windows):")
    print("  lag k          " + "".join(f"{lag:>9}" for lag in lags))
    for label, curve in scales.items():
        print(f"  {label:<15}" + "".join(f"{curve[lag]:9.1e}" for lag in lags))
    fresh = scales["RNN, W_h x 1"]
    figures["fresh_rnn_first_day_gradient"] = float(f"{fresh[-1] / fresh[0]:.2g}")
    for name, curve in reach.items():
        shown = [lag for lag in lags if lag < ARGS.window]
        print(f"  trained {name} ({ARGS.window}-day windows), relative to lag 0: "
              + ", ".join(f"lag {lag} {curve[lag] / curve[0]:.2g}" for lag in shown))
        figures[f"{name}_first_day_gradient"] = float(f"{curve[-1] / curve[0]:.2g}")


# %% [markdown]
# ### Pictures
#
# The validation loss of both networks, the gradient norms with and without
# clipping, the gradient's reach, and the last 120 test days.
#
# ### Exercises
# `python tools/exercises.py make 05_rnn` cuts these out of a copy, and
# `python tools/exercises.py check 05_rnn` grades it:
#
# * `rnn_forward`: the recurrence h_t = tanh(x_t W_x + b + h_{t-1} W_h), from h_0 = 0.
# * `rnn_backward`: backpropagation through time, from the last step back to the
#   first.
# * `clip_by_global_norm`: scale the gradients in place to a global norm of at most
#   max_norm.
#
# To think about: Why clip by the global norm of all gradients instead of clipping
# each entry? Why do gradients through time explode or vanish?
#
# Answers. Scaling every gradient by the same factor keeps the step's direction and
# only shortens it; clipping entries one by one changes the direction. Backpropagation
# through time multiplies by W_h (and by tanh', at most 1) once per step, so over many
# steps the product grows or shrinks roughly geometrically; the chapter's plot of the
# gradient's reach shows how few steps back it stays useful.


# %%
if __name__ == "__main__":
    if plt is None:
        print("note: matplotlib is not installed; the numbers above are the only view")
    else:
        os.makedirs(ARGS.out, exist_ok=True)
        plot_curves(os.path.join(ARGS.out, f"{CHAPTER}_loss.png"), "Validation loss",
                    "epoch", "MSE (standardised units)", losses)
        plot_curves(os.path.join(ARGS.out, f"{CHAPTER}_clipping.png"),
                    f"Gradient norm at learning rate {ARGS.large_learning_rate:g}", "step",
                    "global gradient norm", {"without clipping": unclipped["grad_norm"],
                                             "with clipping": clipped["grad_norm"]},
                    log_scale=True)
        plot_curves(os.path.join(ARGS.out, f"{CHAPTER}_reach.png"),
                    "How far back the gradient reaches", "days before the last (lag)",
                    "size of d loss / d x", scales, log_scale=True)
        last = slice(-120, None)
        plot_curves(os.path.join(ARGS.out, f"{CHAPTER}_predictions.png"),
                    "The last 120 test days", "day", "tmax tomorrow (°F)",
                    {"truth": test_targets[last, 0],
                     **{name: values[last, 0] for name, values in predictions.items()}})
        print(f"plots saved in {ARGS.out}/")


# %%
if __name__ == "__main__":
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print_summary(figures)
