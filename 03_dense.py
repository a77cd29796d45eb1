"""A dense neural network by hand: hidden layers, ReLU and backpropagation.

This chapter turns chapter 02's linear model into a neural network: several layers
of weighted sums with a ReLU between them, trained with the same mini-batch
gradient descent on the same weather table. Everything is written out in numpy:

* the forward pass through the layers (`dense_forward`), keeping what the backward
  pass needs;
* the backward pass (`dense_backward`), backpropagation derived by hand in the
  comments with the chain rule, and checked against finite differences;
* He initialisation (`init_dense`), and what happens when the starting weights are
  too small or too large.

New since 02_linreg.py: hidden layers, the ReLU, random initialisation, and
backpropagation through several layers. Loading, splitting, normalising, the
loss, the training loop and the least-squares reference are carried unchanged, so
`diff 02_linreg.py 03_dense.py` shows just that.

Run it with `python 03_dense.py` (about 2 seconds on a 2-core CPU) or
`python 03_dense.py --quick` (about a second). `--data PATH` reads a local copy of
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

CHAPTER = "03_dense"


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
# ## The model: a dense network
#
# Chapter 02's linear model predicts with one weighted sum. Its weakness is that it
# can only draw a flat surface: doubling a feature's change always doubles its
# effect, whatever the season or the other features. A **dense network** stacks
# several weighted sums (**layers**), and between them bends the numbers with a
# simple non-linear function, so the whole can follow curves.
#
# Each layer is the linear model of chapter 02 with more outputs: `inputs @ weight +
# bias`, where weight has shape (inputs, outputs) and bias (1, outputs). With layer
# sizes [3, 32, 32, 1] the first layer turns each day's 3 features into 32 numbers
# (the **hidden units**), the second turns those 32 into 32 more, and the last into
# one prediction. We keep the parameters as a list of `(weight, bias)` pairs, one per
# layer, the same shape as in chapter 02, so the training loop barely changes.
#
# **Why a bend is needed.** Two linear layers in a row are still one linear layer:
# `(x @ W1) @ W2 = x @ (W1 @ W2)`. So after every hidden layer we apply the
# **ReLU** ("rectified linear unit"), `relu(z) = max(z, 0)`: it keeps positive
# numbers and zeros negative ones. Each hidden unit then switches on for some days
# and off for others, and the network adds up these pieces into a curved answer.
# The last layer has no ReLU: a temperature may be any number.


# %%
def relu(x):
    """The rectified linear unit: x where x > 0, else 0, elementwise."""
    return np.maximum(x, 0)


# %% [markdown]
# ## Initialisation
#
# A linear model could start from zeros. A network cannot: if every hidden unit
# starts with the same weights, every one computes the same number and receives the
# same gradient, and they stay identical copies for ever. So weights start random.
#
# How large? Take one unit of a layer with `n` inputs a_j and weights w_j drawn
# independently with mean 0 and variance v: its pre-activation z = sum_j a_j w_j
# has variance n * v * E[a^2]. If the inputs came out of a ReLU whose own input
# was symmetric around 0 with variance s^2, half of them are zeroed and
# E[a^2] = s^2 / 2. To keep the variance the same from layer to layer we need
# n * v / 2 = 1, that is v = 2 / n: weights drawn from a normal distribution with
# standard deviation sqrt(2 / n). This is **He initialisation** (He et al., 2015).
# Too small and the signal shrinks layer after layer until the output and all the
# gradients are nearly zero; too large and it grows until the numbers overflow. The
# experiment below measures both. Biases start at zero.


# %%
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


def start_from_mean(layers, targets):
    """Set the last layer's bias to the average target, so training starts from the
    sensible guess "every day is an average day" instead of from 0 °F, and the
    weights only have to learn the differences from the average."""
    weight, bias = layers[-1]
    return [*layers[:-1], (weight, bias + targets.mean())]


# %% [markdown]
# ## Forward pass
#
# The forward pass runs the layers in order. For layer k, with input a_(k-1) (the
# features for the first layer):
#
#     z_k = a_{k-1} @ W_k + b_k          the pre-activation, (rows, outputs)
#     a_k = relu(z_k)                    except after the last layer: a_K = z_K
#
# It keeps, for every layer, its input and its pre-activation in the `cache`: the
# backward pass needs exactly these two.


# %%
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


# %% [markdown]
# ## Backward pass: backpropagation by hand
#
# We need the gradient of the loss with respect to every weight and bias. The chain
# rule lets us get all of them in one sweep from the output back to the input,
# reusing at each layer what the layer above computed. That sweep is
# **backpropagation**.
#
# Start with G_K = d loss / d output (from `mse_grad`, shape (rows, 1)). Walking
# back through layer k, given G = d loss / d a_k of shape (rows, outputs):
#
# 1. Through the ReLU: a = max(z, 0) has slope 1 where z > 0 and 0 elsewhere,
#    so d loss / d z_k = G * (z_k > 0), elementwise (the last layer has no ReLU: its
#    gradient passes unchanged). Units that were off let no gradient through.
# 2. Into the weights: exactly chapter 02's linear-model gradient, with this layer's
#    input in place of the features: d loss / d W_k = a_{k-1}.T @ dz, shape (inputs,
#    outputs); d loss / d b_k = dz summed over the rows, shape (1, outputs).
# 3. Into the layer's input, for the layer below: z = a W + b, so each input
#    a_ij reaches every output z_il with weight W_jl, and
#    d loss / d a_{k-1} = dz @ W_k.T, shape (rows, inputs).
#
# Step 3 hands a new G to the next layer down, and the loop repeats. Each gradient
# has the same shape as the parameter it belongs to, which is a quick check on the
# maths.


# %%
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
# ## Set-up: flags, data and plots (not the lesson)
#
# The code in this section is what the chapter needs but does not teach; in a
# notebook its cells open collapsed. Every chapter shares its command line: `--seed`
# for repeatable runs, `--data` for a local copy of the data, `--quick` for a run of
# a few seconds (used by the tests) and `--out` for where files are written; this one
# adds `--hidden-sizes`, `--epochs`, `--learning-rate` and `--batch-size` for the
# final training run,
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
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[32, 32],
                        help="units in each hidden layer (default: 32 32)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the final training run (default 30, --quick 5)")
    parser.add_argument("--learning-rate", type=float, default=0.001,
                        help="step size of gradient descent (default 0.001)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="rows per mini-batch (default 32)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 5 if args.quick else 30
    if min(args.hidden_sizes) < 1:
        raise DataError(f"--hidden-sizes must all be at least 1, not {args.hidden_sizes}")
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
    predictions, cache = dense_forward(layers, inputs)
    by_hand = dense_backward(layers, cache, mse_grad(predictions, targets))

    def loss_of():
        return mse(dense_forward(layers, inputs)[0], targets)

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
    probe = init_dense([3, *ARGS.hidden_sizes, 1], rng)
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
            for start in range(0, len(inputs), batch_size):
                batch = order[start:start + batch_size]
                # Forward: predict this batch and keep what the backward pass needs.
                predictions, cache = dense_forward(layers, inputs[batch])
                # Backward: the loss's gradient for each prediction, then for each
                # weight and bias.
                gradients = dense_backward(layers, cache, mse_grad(predictions, targets[batch]))
                # The step: every parameter moves against its own gradient. New
                # arrays are made, so a model passed in is never changed.
                layers = [(weight - learning_rate * weight_grad, bias - learning_rate * bias_grad)
                          for (weight, bias), (weight_grad, bias_grad) in zip(layers, gradients)]
            history.append((mse(dense_forward(layers, inputs)[0], targets),
                            evaluate(layers, *valid_set)))
        if diverged(history[-1][0]):
            break  # more steps cannot bring it back
    return layers, history


def evaluate(layers, inputs, targets):
    """The model's mean absolute error on a set of rows, in °F."""
    return mae(dense_forward(layers, inputs)[0], targets)


# %% [markdown]
# ## The closed-form answer
#
# For linear regression there is no need to search at all: the weights with the
# smallest MSE solve a set of linear equations (the "normal equations"), and
# `np.linalg.lstsq` solves them exactly and stably. We add a column of ones to the
# inputs so that the last weight it finds is the bias. It is chapter 02's answer, and
# the yardstick for the network below. A network can represent every linear model
# (a network with no hidden layer is one), so on the training days it should do at
# least as well; on the test days it can still do worse, either from poor training
# or from **overfitting**, fitting quirks of the training days that do not recur
# (chapter 08 is about that), and it can only do better where the data has bends.


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
# ## Experiments: how the initial scale matters
#
# Each experiment trains a fresh model for a few epochs and reports the validation
# MAE, so the choices are made on validation days and the test days stay untouched
# until the end.
#
# To see He initialisation at work we build a *deep* network, eight hidden layers
# of 32 units, and scale its He weights by a factor: 0.5 (too small), 1 (He) and 2
# (too large). For each we measure the spread (standard deviation) of every layer's
# pre-activations on the training days, and the validation MAE after a few epochs.
# Each layer multiplies the spread by about the factor, so after eight layers a
# factor of 0.5 leaves 1/256 of the signal and a factor of 2 makes it 256 times
# larger.


# %%
def fresh_model(train_set, hidden_sizes, rng):
    """A new He-initialised network for these training rows, with the given hidden
    layer sizes and one output, starting from the mean target."""
    layer_sizes = [train_set[0].shape[1], *hidden_sizes, 1]
    return start_from_mean(init_dense(layer_sizes, rng), train_set[1])


def scale_weights(layers, factor):
    """The same network with every weight multiplied by `factor` (biases unchanged)."""
    return [(weight * factor, bias) for weight, bias in layers]


def signal_spreads(layers, inputs):
    """The standard deviation of each layer's pre-activations, first layer first."""
    _, cache = dense_forward(layers, inputs)
    return [float(pre_activation.std()) for _, pre_activation in cache]

if __name__ == "__main__":
    sweep_epochs = 1 if ARGS.quick else 3
    deep_sizes = [32] * 8
    print(f"initial scale of a network with {len(deep_sizes)} hidden layers of "
          f"{deep_sizes[0]}; spread of the pre-activations at layers 1, 4 and 8, and "
          f"validation MAE after {sweep_epochs} epoch(s) at learning rate "
          f"{ARGS.learning_rate:g}:")
    for factor in (0.5, 1.0, 2.0):
        deep = scale_weights(fresh_model((train_inputs, train_targets), deep_sizes,
                                         np.random.default_rng(ARGS.seed)), factor)
        spreads = signal_spreads(deep, train_inputs)
        _, history = train(deep, (train_inputs, train_targets), (valid_inputs, valid_targets),
                           ARGS.learning_rate, sweep_epochs, ARGS.batch_size,
                           np.random.default_rng(ARGS.seed))
        loss, valid_mae = history[-1]
        outcome = "diverged" if diverged(loss) else f"{valid_mae:.2f} °F"
        name = "He" if factor == 1.0 else f"{factor:g} x He"
        print(f"  {name:>8}: spread {spreads[0]:9.3g} {spreads[3]:9.3g} {spreads[7]:9.3g}; "
              f"validation MAE {outcome}")


# %% [markdown]
# ## The final model
#
# One more training run with the chosen settings (`--hidden-sizes`, `--epochs`,
# `--learning-rate`, `--batch-size`), then the test days, used for the first time,
# against the straight line and "tomorrow = today".
#
# The defaults differ from chapter 02's: a learning rate of 0.001 instead of 0.01,
# and 30 epochs instead of 20. A line's error surface is one smooth bowl; a
# network's gradient passes through every layer and is both larger and noisier.
# At 0.01 the eight-layer network of the experiment above diverges even at He
# scale, and this network's test MAE jumps from run to run (3.59 °F after 20
# epochs, 3.68 after 30, on the generated table). A ten times smaller step is
# steady, and needs more of them: hence 30 epochs.


# %%
if __name__ == "__main__":
    layer_sizes = [3, *ARGS.hidden_sizes, 1]
    print(f"training layers {layer_sizes}: {ARGS.epochs} epochs, learning rate "
          f"{ARGS.learning_rate:g}, batch {ARGS.batch_size}")
    layers, history = train(fresh_model((train_inputs, train_targets), ARGS.hidden_sizes,
                                        np.random.default_rng(ARGS.seed)),
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
    parameters = sum(weight.size + bias.size for weight, bias in layers)
    print(f"the network has {parameters} parameters; the linear model had 4")
    print(f"test MAE: network {test_mae:.2f} °F, least squares "
          f"{closed_form_mae:.2f} °F, 'tomorrow = today' {persistence_mae:.2f} °F")
    for path in save_plots(ARGS.out, history, dense_forward(layers, test_inputs)[0],
                           test_targets):
        print(f"saved {path}")


# %% [markdown]
# ## Reading the results
#
# What a run of this chapter shows (above):
#
# * **The check.** Backpropagation agrees with finite differences to about nine
#   digits, layer by layer, so the hand-derived gradients are right.
# * **Initialisation.** With half the He scale the signal shrinks by about half at
#   every layer, so the deep network's last layers see almost nothing and learn
#   slowly; with twice the He scale it grows by about two a layer and the first
#   steps overflow. He initialisation keeps the spread near 1 all the way down.
# * **The network against the line.** They tie: on the generated table the
#   network scores 3.56 °F against least squares' 3.56 °F, and within a few
#   hundredths either way with other `--seed`s. On the real table (`--data`) one run
#   gave the network 3.41 °F against 3.45 °F. The relation between today's weather
#   and tomorrow's high is nearly linear. The generated table does have bends, the
#   ones real weather has: rain cools the next day only when it rains (a step at
#   zero inches, not a slope), and rain after rain is likelier in winter than in
#   summer. But they are worth about a hundredth of a degree to a model that knows
#   them exactly (least squares given those bends as extra inputs gains at most
#   0.01 °F on the test days), less than the noise of training. Where a bend is large, the network
#   finds it: the chapter's tests fit y = |x|, which no line can.
#
# Chapter 04 keeps this network and changes what it predicts: a yes/no answer (will
# it rain tomorrow?) and then one of many characters, the job a GPT does.
#
# ### Exercises
# `python tools/exercises.py make 03_dense` cuts these out of a copy, and
# `python tools/exercises.py check 03_dense` grades it:
#
# * `init_dense`: weights drawn with He initialisation, biases zero, one pair a layer.
# * `dense_forward`: linear then ReLU each layer (linear only at the end), caching
#   what backward needs.
# * `dense_backward`: backpropagation: each layer's weight and bias gradients, last
#   layer first.
#
# To think about: Why does He initialisation draw weights with spread sqrt(2 /
# fan_in), not sqrt(1 / fan_in)? Why does a network with thousands of weights only tie
# a straight line here?
#
# Answers. ReLU zeroes about half of its inputs, halving the mean square of what it
# passes on; the factor 2 restores it, so the spread stays near 1 at every layer, as
# the chapter's half and double scales show. The tie is the data's: tomorrow's high
# depends on today's weather almost linearly, and the bends are worth less than
# training's noise.


# %%
if __name__ == "__main__":
    print_summary({**figures, "test_mae": round(test_mae, 3),
                   "closed_form_mae": round(closed_form_mae, 3),
                   "persistence_mae": round(persistence_mae, 3),
                   "gradient_error": float(f"{check:.1e}"),
                   "seconds": round(time.perf_counter() - started, 1)})
