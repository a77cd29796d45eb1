"""Classification: will it rain tomorrow, and which character comes next?

Chapters 02 and 03 predicted a number. Many questions instead ask for a choice
among classes: rain or no rain; which of a hundred characters comes next. This
chapter keeps chapter 03's network and changes only its last step and its loss:

* the **sigmoid** turns the network's output into a probability, and **binary
  cross-entropy** scores it; together they predict whether it rains tomorrow;
* the **softmax** turns one output per class into a probability distribution, made
  numerically stable, and **cross-entropy** scores it against **one-hot** targets;
  together they predict the next character of a text from the few before it, the
  job a GPT does at a far larger scale;
* **accuracy** and loss, always against a trivial baseline (the majority class; the
  character frequencies), and the text loss also in **bits per character**;
* the course's **text scoreboard**: the network against chapter 00's counting
  (bigram) model, in **bits per byte** on the same held-out text, where it needs
  about a bit a character less.

New since 03_dense.py: sigmoid, softmax, the two cross-entropy losses and their
gradients (derived by hand and checked with finite differences), one-hot
encoding, accuracy, baselines, sampling text from a model, and, carried from
chapter 00, the held-out cut, the bigram model and bits per byte.

Run it with `python 04_classify.py` (about 8 seconds on a 2-core CPU) or
`python 04_classify.py --quick` (a few seconds). `--data PATH` reads a local copy of
the weather table, `--text PATH` a local UTF-8 text file; `--help` lists every flag.

In a notebook (Jupyter, VS Code) the chapter ignores the kernel's command line and
takes its flags from the environment variable ZERO_TO_GPT_ARGS, for example
`ZERO_TO_GPT_ARGS="--quick"`; without it, the defaults.
"""

import argparse
import csv
import hashlib
import json
import math
import os
import shlex
import sys
import time
import urllib.request

import numpy as np

CHAPTER = "04_classify"


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
# gradients are nearly zero; too large and it grows until the numbers overflow
# (chapter 03 measured both). Biases start at zero.


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


# %% [markdown]
# ## From a score to a probability: the sigmoid
#
# For "will it rain tomorrow?" the network's single output can be any number, its
# **logit** z: large and positive for "surely rain", large and negative for "surely
# dry". The **sigmoid** squashes it into a probability between 0 and 1:
#
#     sigmoid(z) = 1 / (1 + exp(-z))
#
# sigmoid(0) = 0.5; sigmoid(-z) = 1 - sigmoid(z). Written this way, `exp(-z)`
# overflows for z below about -710, so we compute it as exp(-log(1 + exp(-z))), with
# `np.logaddexp(0, -z)` = log(exp(0) + exp(-z)), which numpy evaluates without
# overflow for any z.


# %%
def sigmoid(x):
    """The logistic function 1 / (1 + exp(-x)), elementwise, without overflow."""
    return np.exp(-np.logaddexp(0.0, -x))


# %% [markdown]
# ## Binary cross-entropy
#
# How wrong is a probability p of rain when the answer is y (1 for rain, 0 for
# dry)? The squared error of chapter 02 would work poorly: it barely punishes a
# confident wrong answer. **Cross-entropy** asks instead how surprised the model
# is by what happened: it scores -log(p) when it rained and -log(1 - p) when it did
# not,
#
#     loss = -[y log(p) + (1 - y) log(1 - p)],   averaged over the days.
#
# A model that says p = 0.99 and is wrong pays -log(0.01) = 4.6; one that hedges
# at 0.5 pays 0.69 either way. Minimising it is the same as maximising the
# probability the model gave to what really happened (maximum likelihood).
#
# **In terms of the logit**, using log(sigmoid(z)) = -log(1 + exp(-z)) and
# log(1 - sigmoid(z)) = log(sigmoid(-z)) = -log(1 + exp(z)):
#
#     loss = y * log(1 + exp(-z)) + (1 - y) * log(1 + exp(z))
#
# which `np.logaddexp` computes stably, without ever forming p.
#
# **The gradient.** The slope of log(1 + exp(-z)) is -exp(-z) / (1 + exp(-z)) =
# -(1 - sigmoid(z)), and the slope of log(1 + exp(z)) is sigmoid(z). So
#
#     d loss / d z = -y (1 - sigmoid(z)) + (1 - y) sigmoid(z) = sigmoid(z) - y
#
# per day, divided by the number of days for the average. It is the same shape as
# the MSE gradient, prediction minus truth: the sigmoid and the cross-entropy were
# made for each other.


# %%
def binary_cross_entropy(logits, labels):
    """Mean binary cross-entropy, in nats, of probabilities sigmoid(logits) against
    labels of 0 or 1 (same shape), computed from the logits for stability."""
    return float(np.mean(labels * np.logaddexp(0.0, -logits)
                         + (1 - labels) * np.logaddexp(0.0, logits)))


def binary_cross_entropy_grad(logits, labels):
    """The gradient of `binary_cross_entropy` with respect to each logit:
    (sigmoid(z) - y) / n."""
    # exercise: the gradient of the binary cross-entropy with respect to each logit
    return (sigmoid(logits) - labels) / logits.size
    # end exercise


def accuracy(predicted_classes, true_classes):
    """The fraction of predictions that name the right class."""
    return float(np.mean(predicted_classes == true_classes))


# %% [markdown]
# ## Will it rain tomorrow?
#
# The weather table has today's rain but no column for tomorrow's, so we make the
# labels: day d is labelled 1 when the *next* day had rain (more than 0 inches),
# else 0. The real table skips a few days, so a day is used only when the next row
# really is the next calendar day. The features are today's tmax, tmin and rain,
# standardised as in chapter 02.
#
# About one day in six is rainy. So a model that always says "dry" is right five
# times out of six: accuracy alone flatters. We therefore report two baselines: the
# **majority class** ("always dry") for accuracy, and for the loss the constant
# probability equal to the training days' rain rate, the best a model can do
# without looking at the weather.


# %%
def rain_tomorrow(dates, table):
    """Today's features (days, 3) and tomorrow's rain labels (days, 1) of 1.0 or 0.0,
    for every day whose next row is the next calendar day. Dates that are not
    YYYY-MM-DD are taken to be consecutive rows."""
    try:
        days = np.array(dates, dtype="datetime64[D]")
        consecutive = np.diff(days) == np.timedelta64(1, "D")
    except ValueError:
        consecutive = np.ones(len(dates) - 1, dtype=bool)
    inputs = table[:-1, :3][consecutive]
    labels = (table[1:, 2] > 0)[consecutive].astype(float)[:, None]
    return inputs, labels


def constant_logit(rate):
    """The logit whose sigmoid is `rate`: log(rate / (1 - rate)), kept finite."""
    rate = min(max(rate, 1e-6), 1 - 1e-6)
    return math.log(rate / (1 - rate))


# %% [markdown]
# ## Set-up: flags, data and plots (not the lesson)
#
# The code in this section is what the chapter needs but does not teach; in a
# notebook its cells open collapsed. Every chapter shares its command line: `--seed`
# for repeatable runs, `--data` for a local copy of the data, `--quick` for a run of
# a few seconds (used by the tests) and `--out` for where files are written. In a
# notebook the flags come from the environment variable `ZERO_TO_GPT_ARGS`. The last
# line of output is `summary:` and a line of JSON with the chapter's headline figures.
#
# This chapter reads two data sets: `--data` is the weather table and `--text` the
# text corpus. `--epochs` sets the rain classifier's training; `--context`,
# `--hidden-sizes`, `--steps`, `--learning-rate` and `--batch-size` the character
# model's. Bad values are refused before any work starts.
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
# ## The text corpus
#
# The text chapters (00, 04, 09, 13) read one corpus: tiny Shakespeare, about a million
# characters of plays, downloaded once into `data/` and checked against its recorded
# SHA-256 digest. Offline, they use real English prose that ships with every Python
# installation: the language reference and library topics behind `help()`
# (`pydoc_data.topics`, about 465 KB). Here `--text` takes a local `.txt` file
# instead (`--data` is this chapter's weather table).


# %% jupyter={"source_hidden": true}
TEXT_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
            "tinyshakespeare/input.txt")
TEXT_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def python_docs_text():
    """The offline corpus: every help() topic of the Python documentation, in a fixed
    order, separated by blank lines."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"


def load_text(path=None):
    """The corpus as (text, source). `path` (from --data) wins; then the downloaded
    tiny Shakespeare in data/; then the Python documentation, announced in one line."""
    if path:
        if not os.path.isfile(path):
            raise DataError(f"text file {path} does not exist; pass --data with the path "
                            f"of a UTF-8 .txt file")
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except UnicodeDecodeError as error:
            raise DataError(f"text file {path} is not valid UTF-8 (byte {error.start}); "
                            f"convert it to UTF-8 first")
        if not text.strip():
            raise DataError(f"text file {path} is empty; the model needs text to learn from")
        return text, path
    cached = os.path.join("data", "tinyshakespeare.txt")
    if download(TEXT_URL, cached, TEXT_SHA256):
        with open(cached, encoding="utf-8") as file:
            return file.read(), cached
    print("note: could not download tiny Shakespeare (offline?); using the Python "
          "documentation text instead", file=sys.stderr)
    return python_docs_text(), "python-docs"


# %% jupyter={"source_hidden": true}
RAIN_HIDDEN_SIZES = [16]      # the rain classifier: 3 features, 16 hidden units, 1 logit
RAIN_LEARNING_RATE = 0.1
RAIN_BATCH_SIZE = 32


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--data", default=None,
                        help="path of a local weather CSV (default: download, else generate)")
    parser.add_argument("--text", default=None,
                        help="path of a local UTF-8 text file (default: download tiny "
                             "Shakespeare, else the Python documentation)")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds, for tests and a first look")
    parser.add_argument("--out", default="out", help="folder for plots (default out/)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the rain classifier (default 10, --quick 3)")
    parser.add_argument("--context", type=int, default=3,
                        help="characters the character model sees (default 3)")
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[128],
                        help="units in each hidden layer of the character model (default 128)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of the character model (default 6000, --quick 1000)")
    parser.add_argument("--learning-rate", type=float, default=0.5,
                        help="step size for the character model (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="positions per batch for the character model (default 128)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 10
    if args.steps is None:
        args.steps = 1000 if args.quick else 6000
    for flag, value in (("--epochs", args.epochs), ("--context", args.context),
                        ("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--hidden-sizes", min(args.hidden_sizes))):
        if value < 1:
            raise DataError(f"{flag} must be at least 1, not {value}")
    if not (args.learning_rate > 0 and np.isfinite(args.learning_rate)):
        raise DataError(f"--learning-rate must be a positive number, not {args.learning_rate}")
    if args.text is not None and not os.path.isfile(args.text):
        # Checked here because the carried `load_text` names the flag --data, which in
        # this chapter is the weather table's.
        raise DataError(f"text file {args.text} does not exist; pass --text with the path "
                        f"of a UTF-8 .txt file")
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
    inputs, labels = rain_tomorrow(dates, table)
    if len(inputs) < 20:
        raise DataError(f"weather data from {source} has only {len(inputs)} pairs of "
                        f"consecutive days; the chapter needs at least 20")
    figures = {"chapter": CHAPTER, "source": source}


# %% [markdown]
# ## Many classes: one-hot targets and the softmax
#
# Predicting the next character means choosing among every character of the text,
# a hundred or so classes. The network now has one output per class, a logit
# z_c for each, and we need a probability for each that are all positive and add
# up to one. The **softmax** does that:
#
#     p_c = exp(z_c) / sum_k exp(z_k)
#
# With two classes it reduces to the sigmoid of the difference of the logits.
#
# **Numerical stability.** exp(1000) overflows to inf and the ratio becomes nan.
# But subtracting the same number m from every logit changes nothing, since
# exp(z_c - m) / sum_k exp(z_k - m) multiplies top and bottom by exp(-m). Taking
# m = the largest logit makes every exponent at most 0, so nothing overflows, and
# at least one term of the sum is exp(0) = 1, so we never divide by zero or take
# the log of zero.
#
# **One-hot targets.** The true class c is written as a vector of zeros with a 1 at
# position c; for three classes, class 2 is [0, 0, 1]. Then the answer has the same
# shape as the probabilities, and the loss and its gradient are plain arithmetic
# on arrays.


# %%
def one_hot(indices, classes):
    """Rows of zeros with a single 1.0 at each index: shape (len(indices), classes)."""
    return np.eye(classes)[indices]


def softmax(logits):
    """Probabilities from logits along the last axis, shifted by the largest logit
    so that exp never overflows."""
    # exercise: softmax along the last axis, shifted by the largest logit so exp never overflows
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)
    # end exercise


# %% [markdown]
# ## Cross-entropy for many classes
#
# The loss is the same idea as before, the surprise at what really happened: for a
# row with one-hot target y, loss = -sum_c y_c log(p_c) = -log(p of the true class).
# We compute log(p_c) directly from the shifted logits,
#
#     log p_c = (z_c - m) - log(sum_k exp(z_k - m)),
#
# never through p itself, which can round to 0 and give log(0) = -inf.
#
# **The gradient.** The derivative of log p_c with respect to the logit z_j is
# [c = j] - p_j (1 when c is j, else 0, minus p_j). So, for one row,
#
#     d loss / d z_j = -sum_c y_c ([c = j] - p_j) = -y_j + p_j * sum_c y_c = p_j - y_j,
#
# since the y_c add up to 1. Once again: prediction minus truth, now one number
# per class, divided by the rows for the average.


# %%
def cross_entropy(logits, targets):
    """Mean cross-entropy, in nats, of softmax(logits) against one-hot `targets`
    (both (rows, classes)), computed from the logits for stability."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-np.sum(targets * log_probabilities) / len(logits))


def cross_entropy_grad(logits, targets):
    """The gradient of `cross_entropy` with respect to each logit:
    (softmax(logits) - targets) / rows."""
    # exercise: the gradient of softmax and cross-entropy with respect to each logit
    return (softmax(logits) - targets) / len(logits)
    # end exercise


def gradient_error(layers, inputs, targets, loss, loss_grad):
    """The largest difference between backpropagated gradients of `loss` (with its
    hand-derived `loss_grad`) and finite differences, over every weight and bias,
    relative to the largest gradient."""
    outputs, cache = dense_forward(layers, inputs)
    by_hand = dense_backward(layers, cache, loss_grad(outputs, targets))

    def loss_of():
        return loss(dense_forward(layers, inputs)[0], targets)

    worst, largest = 0.0, 1e-12
    for parameters, gradients in zip(layers, by_hand):
        for parameter, gradient in zip(parameters, gradients):
            numeric = numerical_gradient(loss_of, parameter)
            worst = max(worst, float(np.abs(numeric - gradient).max()))
            largest = max(largest, float(np.abs(numeric).max()))
    return worst / largest


if __name__ == "__main__":
    # The hand-derived gradients of both losses, through a small network, against
    # finite differences.
    probe_inputs = rng.normal(size=(6, 3))
    errors = [gradient_error(init_dense([3, 5, 1], rng), probe_inputs,
                             (rng.random((6, 1)) < 0.5).astype(float),
                             binary_cross_entropy, binary_cross_entropy_grad),
              gradient_error(init_dense([3, 5, 4], rng), probe_inputs,
                             one_hot(rng.integers(0, 4, 6), 4), cross_entropy, cross_entropy_grad)]
    check = max(errors)
    print(f"gradient check: sigmoid + binary cross-entropy {errors[0]:.1e}, "
          f"softmax + cross-entropy {errors[1]:.1e} (largest relative difference)")


# %% [markdown]
# ## Training step
#
# Training is chapter 03's gradient descent, with the loss now passed in: forward,
# the loss's gradient for each output, backpropagation, a step against every
# gradient. `sgd_step` does one such step on one batch; the rain classifier calls it
# over shuffled mini-batches epoch by epoch, as before, and the character model on
# random batches of positions drawn from the training text.


# %%
def sgd_step(layers, inputs, targets, loss, loss_grad, learning_rate):
    """One step of gradient descent on one batch. Returns the new layers and the
    batch's loss before the step."""
    outputs, cache = dense_forward(layers, inputs)
    gradients = dense_backward(layers, cache, loss_grad(outputs, targets))
    layers = [(weight - learning_rate * weight_grad, bias - learning_rate * bias_grad)
              for (weight, bias), (weight_grad, bias_grad) in zip(layers, gradients)]
    return layers, loss(outputs, targets)


def train_classifier(layers, train_set, learning_rate, epochs, batch_size, rng):
    """Mini-batch gradient descent on the binary cross-entropy. Returns the trained
    layers and the mean training loss of each epoch."""
    inputs, labels = train_set
    history = []
    for epoch in range(epochs):
        order = rng.permutation(len(inputs))
        losses = []
        for start in range(0, len(inputs), batch_size):
            batch = order[start:start + batch_size]
            layers, batch_loss = sgd_step(layers, inputs[batch], labels[batch],
                                          binary_cross_entropy, binary_cross_entropy_grad,
                                          learning_rate)
            losses.append(batch_loss)
        history.append(float(np.mean(losses)))
    return layers, history


if __name__ == "__main__":
    # Will it rain tomorrow?
    (train_raw, train_labels), (valid_raw, valid_labels), (test_raw, test_labels) = \
        split_data(inputs, labels)
    train_inputs, test_inputs = standardise(train_raw, test_raw)
    rain_rate = float(train_labels.mean())
    print(f"rain tomorrow: {len(inputs)} days from {source}; rain on "
          f"{100 * rain_rate:.1f}% of training days")
    # The output bias starts at the logit of the training rain rate, the analogue of
    # chapter 03's start from the mean: the untrained network already gives the
    # baseline's probability, and training only has to learn departures from it.
    layers = init_dense([3, *RAIN_HIDDEN_SIZES, 1], rng)
    weight, bias = layers[-1]
    layers[-1] = (weight, bias + constant_logit(rain_rate))
    layers, rain_history = train_classifier(layers, (train_inputs, train_labels),
                                            RAIN_LEARNING_RATE, ARGS.epochs,
                                            RAIN_BATCH_SIZE, rng)
    test_logits, _ = dense_forward(layers, test_inputs)
    rain_loss = binary_cross_entropy(test_logits, test_labels)
    rain_accuracy = accuracy(test_logits > 0, test_labels > 0.5)
    baseline_loss = binary_cross_entropy(np.full_like(test_labels, constant_logit(rain_rate)),
                                         test_labels)
    majority_accuracy = accuracy(np.full(test_labels.shape, rain_rate > 0.5), test_labels > 0.5)
    caught = float(np.mean(test_logits[test_labels > 0.5] > 0)) if test_labels.any() else 0.0
    print(f"  test loss {rain_loss:.3f} nats (constant rain rate {baseline_loss:.3f}); "
          f"accuracy {100 * rain_accuracy:.1f}% ('always dry' {100 * majority_accuracy:.1f}%); "
          f"rainy days called: {100 * caught:.0f}%")


# %% [markdown]
# ## The next character
#
# A GPT reads a text and, at every position, gives a probability to every possible
# next token. We do the same with characters and a small window: the network sees
# the `context` characters before a position (three by default) and predicts the
# character at that position.
#
# Each character becomes its number in the sorted list of the text's characters
# (its **vocabulary**), and each of the `context` characters is one-hot encoded;
# the one-hot vectors side by side form the network's input, of width
# `context * vocabulary size`. Multiplying a one-hot row by the first weight matrix
# just picks out one row of it per character: each character gets its own learned
# vector of numbers. Chapters 10 to 13 call that an *embedding*.
#
# The first 90% of the text trains the model; the last 10% is held out to measure
# it, cut at the line break before the 90% mark by chapter 00's
# `hold_out_validation`, carried unchanged, so that this chapter scores its network
# on exactly the characters chapter 00 scored the bigram on (and chapter 13 its
# GPT). (Text is a sequence, like the weather: splitting by position keeps the
# held-out passage unseen.) The network never trains on a held-out character: its
# training targets all lie before the cut. The first few held-out characters are
# predicted from the last characters before the cut, as inputs only, just as the
# bigram predicts the first held-out character from the line break before it.


# %%
VALIDATION_FRACTION = 0.1


def hold_out_validation(documents):
    """(train documents, validation documents): the last VALIDATION_FRACTION of all
    characters go to validation, the cut moved to the nearest line break before it."""
    total = sum(len(document) for document in documents)
    remaining = int(total * (1 - VALIDATION_FRACTION))
    for index, document in enumerate(documents):
        if remaining < len(document):
            cut = document.rfind("\n", 0, remaining) + 1 or remaining
            train = documents[:index] + ([document[:cut]] if cut else [])
            return train, [document[cut:]] + documents[index + 1:]
        remaining -= len(document)
    return documents, []


def encode(text, vocabulary):
    """The text as an array of character numbers, positions in `vocabulary`."""
    index = {character: number for number, character in enumerate(vocabulary)}
    return np.array([index[character] for character in text], dtype=np.int64)


def context_one_hot(ids, positions, context, vocab_size):
    """Network inputs for predicting ids[position] at each position: the one-hot
    codes of the `context` characters before it, side by side, shape
    (len(positions), context * vocab_size)."""
    return np.concatenate([one_hot(ids[positions - context + offset], vocab_size)
                           for offset in range(context)], axis=1)


def train_next_character(layers, ids, train_end, context, steps, batch_size,
                         learning_rate, rng):
    """Gradient descent on the cross-entropy of the next character, each step on
    `batch_size` random positions of ids[:train_end]. Returns the trained layers and
    the loss of every step, in nats."""
    vocab_size = layers[-1][1].shape[1]
    history = []
    for step in range(steps):
        positions = rng.integers(context, train_end, size=batch_size)
        layers, batch_loss = sgd_step(layers, context_one_hot(ids, positions, context, vocab_size),
                                      one_hot(ids[positions], vocab_size), cross_entropy,
                                      cross_entropy_grad, learning_rate)
        history.append(batch_loss)
    return layers, history


def text_scores(layers, ids, positions, context, chunk=4096):
    """Mean cross-entropy (nats) and accuracy of the model's next-character
    predictions at `positions`, computed a chunk of positions at a time so the
    one-hot inputs stay small."""
    vocab_size = layers[-1][1].shape[1]
    total_loss, correct = 0.0, 0.0
    for start in range(0, len(positions), chunk):
        part = positions[start:start + chunk]
        logits, _ = dense_forward(layers, context_one_hot(ids, part, context, vocab_size))
        total_loss += cross_entropy(logits, one_hot(ids[part], vocab_size)) * len(part)
        correct += accuracy(logits.argmax(axis=1), ids[part]) * len(part)
    return total_loss / len(positions), correct / len(positions)


# %% [markdown]
# ## Baselines for text, and bits per character
#
# Two trivial models set the bar:
#
# * **majority class**: always predict the most frequent character of the training
#   text (usually the space). Its accuracy is the share of that character.
# * **unigram frequencies**: give every character its frequency in the training
#   text, whatever came before. Its cross-entropy is the best a model can do
#   without context. We add one to every count so that a character that never
#   appears in training still gets a small probability, not zero (log 0 = -inf).
#
# Cross-entropy in nats (natural log) becomes **bits** when divided by ln 2: the
# number of yes/no questions a perfect code built on the model needs per
# character. Uniform guessing among 100 characters costs log2(100) = 6.6 bits;
# English text compresses to well under 2 with a good model.


# %%
def unigram_baseline(ids, train_end, positions, vocab_size):
    """Accuracy of always predicting the commonest training character, and the
    cross-entropy (nats) of add-one smoothed training frequencies, at `positions`."""
    counts = np.bincount(ids[:train_end], minlength=vocab_size) + 1.0
    probabilities = counts / counts.sum()
    majority = accuracy(np.full(len(positions), counts.argmax()), ids[positions])
    return majority, float(-np.mean(np.log(probabilities[ids[positions]])))


def bits(nats):
    """A loss in nats expressed in bits."""
    return nats / math.log(2)


def sample_text(layers, vocabulary, prompt, length, context, rng):
    """Continue `prompt` (at least `context` characters) by `length` characters, each
    drawn at random from the model's softmax probabilities."""
    ids = list(encode(prompt, vocabulary))
    for _ in range(length):
        inputs = context_one_hot(np.array(ids), np.array([len(ids)]), context, len(vocabulary))
        probabilities = softmax(dense_forward(layers, inputs)[0])[0]
        ids.append(int(rng.choice(len(vocabulary), p=probabilities)))
    return "".join(vocabulary[number] for number in ids)


if __name__ == "__main__":
    text, text_source = load_text(ARGS.text)
    vocabulary = sorted(set(text))
    ids = encode(text, vocabulary)
    train_end = len("".join(hold_out_validation([text])[0]))
    held_out = text[train_end:]
    if len(ids) - train_end <= ARGS.context or train_end <= ARGS.context:
        raise DataError(f"the text from {text_source} has {len(ids)} characters, too few "
                        f"for --context {ARGS.context}; use a longer text or a shorter context")
    figures["text_source"] = text_source
    vocab_size = len(vocabulary)
    test_positions = np.arange(train_end, len(ids))   # every held-out character
    majority_text, unigram_loss = unigram_baseline(ids, train_end, test_positions, vocab_size)
    print(f"next character: {len(text):,} characters from {text_source}, "
          f"{vocab_size} distinct; trained on the first {train_end:,}, scored on the "
          f"last {len(test_positions):,} (10%, cut at a line break)")
    commonest = vocabulary[int(np.bincount(ids[:train_end]).argmax())]
    print(f"  baselines: always {commonest!r}, accuracy {100 * majority_text:.1f}%; unigram "
          f"frequencies "
          f"{bits(unigram_loss):.2f} bits per character")
    layer_sizes = [ARGS.context * vocab_size, *ARGS.hidden_sizes, vocab_size]
    print(f"  training layers {layer_sizes}: {ARGS.steps} steps of {ARGS.batch_size} "
          f"positions, learning rate {ARGS.learning_rate:g}")
    text_layers, text_history = train_next_character(
        init_dense(layer_sizes, rng), ids, train_end, ARGS.context, ARGS.steps,
        ARGS.batch_size, ARGS.learning_rate, rng)
    text_loss, text_accuracy = text_scores(text_layers, ids, test_positions, ARGS.context)
    if not np.isfinite(text_loss):
        raise DataError(f"training diverged at learning rate {ARGS.learning_rate:g}; "
                        f"try a smaller --learning-rate")
    print(f"  held-out: {bits(text_loss):.2f} bits per character "
          f"({text_loss:.3f} nats), accuracy {100 * text_accuracy:.1f}%")
    prompt = text[train_end:train_end + ARGS.context]
    sample = sample_text(text_layers, vocabulary, prompt, 120 if ARGS.quick else 300,
                         ARGS.context, rng)
    print(f"  a sample, starting from {prompt!r}:\n")
    print("\n".join("    " + line for line in sample.splitlines()))


# %% [markdown]
# ## The text scoreboard: against chapter 00's bigram
#
# The unigram frequencies are an easy bar: they ignore the context altogether.
# Chapter 00's **bigram** model is the fair one. It counts, in the same training
# text, how often each character follows each other one, and so it uses one
# character of context with no learning at all. A network that sees three
# characters must do better than counting pairs, or its weights have bought
# nothing. Its functions are carried here unchanged from chapter 00 (it derives
# them): `bigram_probabilities` counts the pairs of neighbouring characters, with
# one added to every count so that an unseen pair is not impossible, and
# `bigram_nats` averages -log P(next | previous) over the pairs it is given.
#
# The course keeps one **scoreboard** for text, in **bits per byte**: the total bits
# a model needs for the held-out text divided by the text's size in UTF-8 bytes
# (chapter 00 explains why bytes: chapter 13's GPT reads tokens, not characters,
# and bytes are what every model of the text shares). Every chapter that adds a
# model prints the rungs below it as well, all scored on the same held-out
# characters: chapter 00's three, then this chapter's network.


# %%
def bigram_probabilities(ids, vocab_size, alpha):
    """The (vocab_size, vocab_size) table P[a, b] = probability that character b
    follows character a, from the counts of pairs in `ids`, add-alpha smoothed."""
    # exercise: count the character pairs, then turn each row of counts into smoothed probabilities
    pairs = ids[:-1] * vocab_size + ids[1:]   # one number per (previous, next) pair
    counts = np.bincount(pairs, minlength=vocab_size * vocab_size).reshape(vocab_size, vocab_size)
    smoothed = counts + alpha
    return smoothed / smoothed.sum(axis=1, keepdims=True)
    # end exercise


def bigram_nats(probabilities, ids):
    """Average -log P(next | previous), in nats, over every pair of neighbours in ids."""
    return float(-np.mean(np.log(probabilities[ids[:-1], ids[1:]])))


def bits_per_byte(bits_per_character, text):
    """A character model's score on `text` in bits per byte: its total bits (the
    average per character times the characters) over the text's UTF-8 bytes."""
    return bits_per_character * len(text) / len(text.encode("utf-8"))


def scoreboard(rungs):
    """The text scoreboard as lines: one (model, bits per byte) rung a line, from
    the worst score to the best."""
    return [f"  {name:<36} {score:.3f}"
            for name, score in sorted(rungs, key=lambda rung: -rung[1])]


if __name__ == "__main__":
    # Chapter 00's models, counted on the same training text; ids[train_end - 1:]
    # pairs every held-out character with the one before it.
    counted = bigram_probabilities(ids[:train_end], vocab_size, 1.0)
    bigram_loss = bigram_nats(counted, ids[train_end - 1:])
    ladder = [("uniform guessing (00)", bits_per_byte(math.log2(vocab_size), held_out)),
              ("unigram frequencies (00)", bits_per_byte(bits(unigram_loss), held_out)),
              ("bigram counts (00)", bits_per_byte(bits(bigram_loss), held_out)),
              (f"network on {ARGS.context} characters (04)",
               bits_per_byte(bits(text_loss), held_out))]
    text_bpb, bigram_bpb = ladder[3][1], ladder[2][1]
    print(f"the text scoreboard: bits per byte on the held-out {len(held_out):,} "
          f"characters ({len(held_out.encode('utf-8')):,} bytes)")
    print("\n".join(scoreboard(ladder)))
    print(f"  the network is {abs(bigram_bpb - text_bpb):.2f} bits per byte "
          f"{'better' if text_bpb < bigram_bpb else 'worse'} than counting pairs")


# %% [markdown]
# ## Reading the results
#
# * **Rain.** The network's loss is well below the constant baseline (on the
#   generated table 0.368 nats against 0.448): today's rain and temperatures say
#   something about tomorrow's rain, because rain comes in spells (a wet day is
#   followed by another about half the time, a dry day by a wet one about one time
#   in ten) and mostly in the cool season. Its accuracy is only a point or so above
#   "always dry" (84.0% against 83.5%), because rain stays the less likely answer
#   on most days, even after a wet one, so the network says "rain" outright only
#   when it is fairly sure; the loss sees the sharper probabilities that accuracy
#   hides. The real table (`--data`) tells the same story.
# * **Characters.** Three characters of context already cut the loss far below the
#   unigram frequencies, and name the right character more than twice as often as
#   "always a space". On the scoreboard (the Python documentation, the offline
#   text) the network scores 2.39 bits per byte against the bigram's 3.35: two
#   more characters of context, and weights that treat similar contexts alike,
#   save almost a bit on every character. Counting could not follow it there:
#   a table of three-character contexts would have 103^3, about a million, rows,
#   most of them never seen in 418,527 training characters. (`--quick`, 1,000
#   steps instead of 6,000, gets about 2.86: still half a bit below the bigram.)
#   The samples show the spelling of short words and the rhythm of the text, but
#   no sense: three characters are too little memory. The following chapters give
#   the model a longer memory, and chapter 13 trains a GPT on the same task and
#   scores it on the same held-out text.


# %% [markdown]
# ## Plots
#
# The two training curves: the rain classifier's loss on the training days, epoch
# by epoch, against the constant-probability baseline on the same days; and the
# character model's loss on its training batches, averaged over stretches of
# steps, against the unigram and bigram baselines on the held-out text.
#
# ### Exercises
# `python tools/exercises.py make 04_classify` cuts these out of a copy, and
# `python tools/exercises.py check 04_classify` grades it:
#
# * `binary_cross_entropy_grad`: the gradient of the binary cross-entropy with respect
#   to each logit.
# * `softmax`: softmax along the last axis, shifted by the largest logit so exp never
#   overflows.
# * `cross_entropy_grad`: the gradient of softmax and cross-entropy with respect to
#   each logit.
#
# To think about: Why subtract the largest logit before `exp` in softmax, and why is
# that allowed?
#
# Answers. Adding one constant to every logit multiplies numerator and denominator by
# the same factor, so the probabilities do not change. Unshifted, exp(1000) overflows
# to inf and inf / inf is NaN; shifted, the largest term is exp(0) = 1, so nothing
# overflows and the sum is never 0.


# %% jupyter={"source_hidden": true}
def save_plots(out_dir, rain_history, rain_baseline, text_history, unigram_loss,
               bigram_loss):
    """Save both loss curves as one PNG in `out_dir`; without matplotlib, print a
    compact text view instead. Returns the files written."""
    stretch = max(1, len(text_history) // 20)
    text_curve = [float(np.mean(text_history[start:start + stretch]))
                  for start in range(0, len(text_history), stretch)]
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plots; a text view instead:")
        print("  rain loss by epoch: " + " ".join(f"{loss:.3f}" for loss in rain_history)
              + f" (baseline {rain_baseline:.3f})")
        print(f"  text loss every {stretch} steps (bits): "
              + " ".join(f"{bits(loss):.2f}" for loss in text_curve)
              + f" (unigram {bits(unigram_loss):.2f}, bigram {bits(bigram_loss):.2f})")
        return []
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{CHAPTER}_loss.png")
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(range(1, len(rain_history) + 1), rain_history, marker="o", label="network")
    left.axhline(rain_baseline, color="grey", linestyle="--", label="constant rain rate")
    left.set(xlabel="epoch", ylabel="training binary cross-entropy (nats)",
             title="Rain tomorrow")
    left.legend()
    right.plot(np.arange(len(text_curve)) * stretch, [bits(loss) for loss in text_curve],
               label="network")
    right.axhline(bits(unigram_loss), color="grey", linestyle="--", label="unigram")
    right.axhline(bits(bigram_loss), color="black", linestyle=":", label="bigram (chapter 00)")
    right.set(xlabel="step", ylabel="cross-entropy (bits per character)",
              title="Next character")
    right.legend()
    figure.tight_layout()
    show_figure(figure, path)
    plt.close(figure)
    return [path]


# %%
if __name__ == "__main__":
    # The rain curve is the training loss, so its baseline line is measured on the
    # training days too; the character curve is per batch of training text.
    train_baseline = binary_cross_entropy(np.full_like(train_labels, constant_logit(rain_rate)),
                                          train_labels)
    for path in save_plots(ARGS.out, rain_history, train_baseline, text_history, unigram_loss,
                           bigram_loss):
        print(f"saved {path}")


# %%
if __name__ == "__main__":
    print_summary({**figures,
                   "rain_loss": round(rain_loss, 4), "rain_baseline_loss": round(baseline_loss, 4),
                   "rain_accuracy": round(rain_accuracy, 4),
                   "rain_majority_accuracy": round(majority_accuracy, 4),
                   "text_bits_per_char": round(bits(text_loss), 3),
                   "unigram_bits_per_char": round(bits(unigram_loss), 3),
                   "bigram_bits_per_char": round(bits(bigram_loss), 3),
                   "text_bits_per_byte": round(text_bpb, 3),
                   "bigram_bits_per_byte": round(bigram_bpb, 3),
                   "unigram_bits_per_byte": round(ladder[1][1], 3),
                   "text_accuracy": round(text_accuracy, 4),
                   "text_majority_accuracy": round(majority_text, 4),
                   "gradient_error": float(f"{check:.1e}"),
                   "seconds": round(time.perf_counter() - started, 1)})
