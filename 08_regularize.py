"""Regularisation: overfitting made visible, then cured, each cure measured.

A network with far more weights than there are training examples can memorise
them: its training loss falls towards zero while its loss on days it has not seen
stops falling and climbs. That is **overfitting**, and this chapter provokes it on
purpose: a large network reads the last 14 days of weather (42 numbers, most of
them noise for tomorrow's temperature) and learns from only 500 days. Then it tries
the standard cures one at a time, on exactly the same set-up (same data, same
starting weights, same batches), and measures each against the overfit baseline:

* weight decay (an L2 pull towards zero, decoupled as in AdamW);
* dropout, written by hand and then PyTorch's `nn.Dropout`;
* layer normalisation, forward and backward written by hand (checked against
  `nn.LayerNorm` and autograd) and plugged into PyTorch as an `autograd.Function`;
* residual connections;
* gradient clipping by global norm (checked against `clip_grad_norm_`);
* early stopping, with the best weights saved as a checkpoint and restored;
* a learning-rate schedule: linear warmup, then cosine decay;
* and the cures for overfitting together.

It ends with a table of the best and final validation loss under each cure beside
the baseline, and a plot of the curves. Not every technique here is a cure for
overfitting: layer norm and residual connections exist to make deep networks train
at all, and the table shows honestly that here they do not help.

New since 07_pytorch.py: the tools above, and a training loop that accepts them.
The weather loader, `standardise`, `make_sequences`, the `Dataset`, `predict` and the
safe saving and loading of weights are carried from earlier chapters.

Run it with `python 08_regularize.py` (about 30 seconds on a 2-core CPU) or
`python 08_regularize.py --quick` (a few seconds). `--data PATH` reads a local copy
of the weather table; `--help` lists every flag.

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
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

CHAPTER = "08_regularize"


# %% [markdown]
# ## A set-up that overfits
#
# Overfitting needs three ingredients, and we supply all of them:
#
# * **many inputs, most of them noise.** Each example is a window of the last 14
#   days, flattened into 42 numbers (chapter 05's `make_sequences`). Tomorrow's
#   temperature depends mostly on today; the other 39 numbers carry little, but a
#   network can always find *some* pattern in them that happens to fit the
#   training days.
# * **few examples.** We train on only the first 500 days of the training years,
#   about 16 months, and pretend the rest do not exist. Validation and test days
#   are the usual later years, thousands of them, so their losses are reliable.
# * **a big network trained for long.** Three hidden layers of 256 units: about
#   143,000 parameters for 500 examples, and 100 epochs of AdamW.
#
# Targets are standardised too (mean 0, spread 1 on the training days), so the
# loss reads in units of the target's variance: on the training days, predicting
# their average scores 1.0 (the validation days, other years, spread a little
# more), and "tomorrow = today" gives a reference printed at the start. The
# network never sees the validation days; we only *watch* its loss there.


# %%
def overfit_data(table, window, train_days):
    """The chapter's data: windows of `window` days flattened into rows, split in time
    order (70/15/15), of which only the first `train_days` training rows are kept.
    Inputs and targets are standardised on those rows. Returns (train_set, valid_set,
    test_set, target_mean, target_spread), each set an (inputs, targets) pair."""
    sequences, targets = make_sequences(table, window)
    rows = sequences.reshape(len(sequences), -1)
    (train_rows, train_targets), valid_set, test_set = split_data(rows, targets)
    if not 2 <= train_days <= len(train_rows):
        raise DataError(f"--train-days must be between 2 and {len(train_rows)} (the "
                        f"training windows available), not {train_days}")
    train_rows, train_targets = train_rows[:train_days], train_targets[:train_days]
    train_inputs, valid_inputs, test_inputs = standardise(train_rows, valid_set[0], test_set[0])
    scaled_train, scaled_valid, scaled_test = standardise(train_targets, valid_set[1],
                                                          test_set[1])
    return ((train_inputs, scaled_train), (valid_inputs, scaled_valid),
            (test_inputs, scaled_test), float(train_targets.mean()),
            float(train_targets.std()))


# %% [markdown]
# ## Set-up: flags, data and plots (not the lesson)
#
# The code in this section is what the chapter needs but does not teach; in a
# notebook its cells open collapsed, and the flags come from the environment
# variable `ZERO_TO_GPT_ARGS`. The weather table is chapter 01's, read by the same
# carried loader; the pieces carried from earlier chapters follow it.
#
# Every chapter shares this command line: `--seed` for repeatable runs, `--data` for a
# local copy of the data, `--quick` for a run of a few seconds (used by the tests) and
# `--out` for where files are written. Its last line of output is `summary:` and a
# line of JSON with the chapter's headline figures, so scripts and tests can read it.
#
# This chapter adds the size of the set-up (`--window`, `--train-days`, `--width`,
# `--depth`, `--epochs`, `--learning-rate`, `--batch-size`) and the strength of each
# cure (`--weight-decay`, `--dropout`, `--max-norm`, `--patience`, `--warmup`), plus
# chapter 07's `--device` and `--threads`. Bad values are refused before any work.


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
# ## Carried from earlier chapters
#
# From chapter 03: the losses `mse` and `mae`, `standardise` (scale with the training
# rows' mean and spread only) and `diverged`. From chapter 05: `make_sequences`,
# which cuts the table into windows of consecutive days. From chapter 07: the
# device, the `Dataset`, `predict` (eval mode, no graph) and the safe saving and
# loading of weights, which early stopping uses for its checkpoint. All unchanged.


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


def standardise(train, *others):
    """Scale every column of `train` to mean 0 and standard deviation 1, and apply the
    same shift and scale (measured on `train` only) to each array in `others`.
    Returns the scaled arrays in the order given. A constant column (spread 0) is only
    shifted, never divided by zero."""
    mean = train.mean(axis=0)
    spread = train.std(axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    return tuple((array - mean) / spread for array in (train, *others))


def diverged(loss):
    """True when a training loss has blown up: overflowed to inf or nan, or grown past
    1e12 °F² (errors of a million degrees), where no later step can recover."""
    return not np.isfinite(loss) or loss > 1e12


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


def pick_device(name="auto"):
    """The device to compute on: "cuda" when asked for or when one is available with
    "auto", else "cpu". Asking for a GPU that is not there is a DataError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; "
                        "use --device cpu or --device auto")
    return torch.device(name)


class WeatherDataset(Dataset):
    """Examples (inputs[i], targets[i]) as tensors of one dtype: rows of features, or
    windows of days."""

    def __init__(self, inputs, targets, dtype=torch.float32):
        self.inputs = torch.as_tensor(inputs, dtype=dtype)
        self.targets = torch.as_tensor(targets, dtype=dtype)

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]


def predict(model, inputs, device, batch_size=4096):
    """The model's predictions for `inputs` (a numpy array) as a numpy array, computed
    in eval mode without recording a graph, a few thousand rows at a time."""
    dtype = next(model.parameters()).dtype
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            rows = torch.as_tensor(inputs[start:start + batch_size], dtype=dtype, device=device)
            outputs.append(model(rows).cpu().numpy())
    return np.concatenate(outputs).astype(np.float64)


def save_weights(model, path):
    """Save `model.state_dict()` to `path` atomically: write a temporary file, then
    rename it into place."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = path + ".part"
    try:
        torch.save(model.state_dict(), partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def load_weights(model, path):
    """Fill `model` with the weights saved at `path` (tensors only: weights_only=True).
    Returns the model; a missing, unreadable or mismatched file is a DataError."""
    if not os.path.isfile(path):
        raise DataError(f"weights file {path} does not exist; save one first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file raises pickle, zip or runtime errors
        raise DataError(f"weights file {path} is not a readable PyTorch weights file "
                        f"({type(error).__name__})")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise DataError(f"weights file {path} does not fit this model ({first_line})")
    return model


# %% [markdown]
# ## Plots
#
# Left: the baseline's training and validation loss, the picture of overfitting
# (the curves part ways). Right: the validation loss under each cure.


# %% jupyter={"source_hidden": true}
def save_plots(out_dir, results):
    """Save the curves of `results` (name -> run_cure's dict) as a PNG in `out_dir`;
    without matplotlib, print a compact text view. Returns the files written."""
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plots; validation loss every tenth "
              "epoch instead:")
        for name, result in results.items():
            losses = [valid for _, valid in result["history"]]
            print(f"  {name:>22}: " + " ".join(f"{loss:.3f}" for loss in losses[::10]))
        return []
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{CHAPTER}_curves.png")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    baseline = next(iter(results.values()))["history"]
    epochs = range(1, len(baseline) + 1)
    left.plot(epochs, [train for train, _ in baseline], label="training")
    left.plot(epochs, [valid for _, valid in baseline], label="validation")
    top = 1.4 * max(valid for _, valid in baseline[len(baseline) // 10:])
    left.set(xlabel="epoch", ylabel="MSE (standardised)", ylim=(0, top),
             title="The baseline overfits")
    left.legend()
    for name, result in results.items():
        losses = [valid for _, valid in result["history"]]
        right.plot(range(1, len(losses) + 1), losses, label=name,
                   linewidth=2.5 if name == "all cures together" else 1.2)
    lowest = min(result["best"] for result in results.values())
    right.set(xlabel="epoch", ylabel="validation MSE (standardised)",
              ylim=(0.9 * lowest, top), title="Validation loss under each cure")
    right.legend(fontsize=7)
    figure.tight_layout()
    show_figure(figure, path)
    plt.close(figure)
    return [path]


# %% jupyter={"source_hidden": true}
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--data", default=None,
                        help="path of a local weather CSV (default: download, else generate)")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds, for tests and a first look")
    parser.add_argument("--out", default="out",
                        help="folder for plots and the early-stopping checkpoint (default out/)")
    parser.add_argument("--window", type=int, default=14,
                        help="days of weather in each example (default 14: 42 inputs)")
    parser.add_argument("--train-days", type=int, default=None,
                        help="training examples kept (default 500, --quick 200)")
    parser.add_argument("--width", type=int, default=256,
                        help="units in each hidden layer (default 256)")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers (default 3)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every run (default 100, --quick 30)")
    parser.add_argument("--learning-rate", type=float, default=3e-4,
                        help="peak learning rate of AdamW (default 0.0003)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="examples per mini-batch (default 32)")
    parser.add_argument("--weight-decay", type=float, default=10.0,
                        help="decoupled weight decay of the weight matrices (default 10; "
                             "large because this run has few steps, see the chapter)")
    parser.add_argument("--dropout", type=float, default=0.3,
                        help="probability of dropping a unit, from 0 up to but not "
                             "including 1 (default 0.3)")
    parser.add_argument("--max-norm", type=float, default=1.0,
                        help="largest global gradient norm when clipping (default 1)")
    parser.add_argument("--patience", type=int, default=10,
                        help="epochs without a better validation loss before early "
                             "stopping (default 10)")
    parser.add_argument("--warmup", type=float, default=0.05,
                        help="fraction of all steps spent warming up the learning rate "
                             "(default 0.05)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads PyTorch may use (default 1)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where PyTorch computes: auto (a GPU when there is one), "
                             "cpu or cuda (default auto)")
    args = parser.parse_args(argv)
    if args.train_days is None:
        args.train_days = 200 if args.quick else 500
    if args.epochs is None:
        args.epochs = 30 if args.quick else 100
    for name in ("window", "width", "depth", "epochs", "batch_size", "patience", "threads"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1, "
                            f"not {getattr(args, name)}")
    for name in ("learning_rate", "max_norm"):
        if not (getattr(args, name) > 0 and np.isfinite(getattr(args, name))):
            raise DataError(f"--{name.replace('_', '-')} must be a positive number, "
                            f"not {getattr(args, name)}")
    if not (args.weight_decay >= 0 and np.isfinite(args.weight_decay)):
        raise DataError(f"--weight-decay must be 0 or more, not {args.weight_decay}")
    if not 0 <= args.dropout < 1:
        raise DataError(f"--dropout must be at least 0 and below 1, not {args.dropout}")
    if not 0 <= args.warmup < 1:
        raise DataError(f"--warmup must be a fraction from 0 up to but not including 1, "
                        f"not {args.warmup}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DataError(f"--out {args.out} is a file; give a folder for plots and checkpoints")
    return args


def print_summary(figures):
    """The chapter's last line: `summary: ` and its headline figures as JSON."""
    print("summary: " + json.dumps(figures))


# %%
if __name__ == "__main__":
    ARGS = chapter_args()
    started = time.perf_counter()
    device = pick_device(ARGS.device)
    torch.set_num_threads(ARGS.threads)
    dates, table, source = load_weather(ARGS.data, ARGS.seed)
    # The small, noisy training set; validation and test keep their usual size.
    data = overfit_data(table, ARGS.window, ARGS.train_days)
    (train_inputs, _), (valid_inputs, valid_targets), (test_inputs, _), _, _ = data
    print(f"weather: {len(table)} days from {source} ({dates[0]} to {dates[-1]})")
    print(f"examples: {ARGS.window} days x 3 features = {train_inputs.shape[1]} inputs; "
          f"{len(train_inputs)} training, {len(valid_inputs)} validation, "
          f"{len(test_inputs)} test; PyTorch on {device}")
    # "Tomorrow = today" in the same standardised units: the last day's tmax, scaled
    # like the targets, against the scaled targets.
    today = table[ARGS.window - 1:, 0]
    (_, _), (valid_today, _), _ = split_data(today[:, None], today[:, None])
    _, _, _, target_mean, target_spread = data
    persistence = mse((valid_today - target_mean) / target_spread, valid_targets)
    print(f"validation MSE (standardised) of predicting the training days' average: "
          f"{mse(np.zeros_like(valid_targets), valid_targets):.3f}; of 'tomorrow = today': "
          f"{persistence:.3f}")
    # The weather thread's two yardsticks on the test days, in °F: "tomorrow = today",
    # and chapter 02's least-squares line on the window's last day (its last three
    # inputs), fitted on the same 500 training windows as the network.
    (train_rows, train_scaled), _, (test_rows, test_scaled) = data[:3]
    test_truth = test_scaled * target_spread + target_mean
    persistence_mae = mae(split_data(today[:, None], today[:, None])[2][0], test_truth)
    [(weight, bias)] = least_squares(train_rows[:, -3:], train_scaled)
    closed_form_mae = mae((test_rows[:, -3:] @ weight + bias) * target_spread + target_mean,
                          test_truth)
    print(f"test MAE of 'tomorrow = today': {persistence_mae:.2f} °F; of least squares on "
          f"the last day: {closed_form_mae:.2f} °F")


# %% [markdown]
# ## Dropout, by hand
#
# Dropout (Srivastava et al., 2014) switches off a random fraction `p` of a layer's
# units at every training step: each unit's output is multiplied by a fresh random
# mask `m`, 0 with probability `p` and 1 otherwise. No unit can rely on a particular
# partner being present, so the network cannot build the fragile, many-unit
# coincidences that memorising noise needs; it is like training a crowd of thinned
# networks that share weights, and predicting with their average.
#
# At evaluation every unit is on. For the next layer to see the same average input
# in both modes, the kept units are scaled up during training ("inverted dropout"):
#
#     y = x * m / (1 - p)        E[y] = x * (1 - p) / (1 - p) = x
#
# So at evaluation dropout is simply the identity, and nothing needs rescaling
# there. The backward pass is the same mask: d y / d x = m / (1 - p), which autograd
# derives by itself because the mask is just a tensor we multiply by. `p` must be
# below 1 (at 1 nothing would be kept and the scale would divide by zero).


# %%
def dropout(inputs, p, training):
    """Inverted dropout: in training, zero each entry with probability `p` and scale
    the rest by 1 / (1 - p); in evaluation, return `inputs` unchanged."""
    if not training or p == 0:
        return inputs
    # exercise: zero each entry with probability p and scale the rest by 1 / (1 - p)
    keep = torch.rand_like(inputs) >= p
    return inputs * keep / (1 - p)
    # end exercise


class HandDropout(nn.Module):
    """`dropout` as a module, so `model.train()` and `model.eval()` switch it, exactly
    as they switch nn.Dropout."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, inputs):
        return dropout(inputs, self.p, self.training)


# %% [markdown]
# ## Layer normalisation, forward and backward by hand
#
# Layer normalisation (Ba et al., 2016) rescales each example's vector of hidden
# units to mean 0 and spread 1, then lets the network choose its own scale and shift
# with two learned vectors, `weight` (gamma) and `bias` (beta). For one row `x` of
# `N` units:
#
#     mu    = (1/N) sum_j x_j
#     var   = (1/N) sum_j (x_j - mu)^2
#     s     = 1 / sqrt(var + eps)          eps = 1e-5 keeps a flat row finite
#     xhat  = (x - mu) * s
#     y     = weight * xhat + bias
#
# Whatever the previous layer does to the size of its outputs, the next layer sees
# numbers of a steady size, which lets deep stacks train with one learning rate. It
# is the normalisation inside the transformers of chapters 10 and 11; chapter 13's
# GPT uses RMSNorm, a lighter variant that skips the mean and the bias.
#
# **Backward.** Given `g = d loss / d y` (same shape as `x`), the two parameters are
# easy because `y` is linear in them; they are shared by every row, so their
# gradients add up over the rows:
#
#     d loss / d bias   = sum over rows of g
#     d loss / d weight = sum over rows of g * xhat
#
# For the input, write `h = g * weight` (the gradient reaching `xhat`). Every
# `xhat_k` depends on every `x_j` through `mu` and `s`:
#
#     d xhat_k / d x_j = s * (delta_jk - 1/N) - (x_k - mu) * s^3 * (x_j - mu) / N
#
# (the first term from `x_k - mu`, the second from `s`, since
# `d var / d x_j = 2 (x_j - mu) / N` and `d s / d var = -s^3 / 2`). Summing over `k`
# with weights `h_k`, and writing `xhat = (x - mu) s`:
#
#     d loss / d x_j = s * ( h_j - mean_k(h_k) - xhat_j * mean_k(h_k * xhat_k) )
#
# Three terms: the gradient itself, minus its mean (shifting every unit equally
# changes nothing after normalisation), minus its component along `xhat` (scaling
# the row changes nothing either). The forward pass keeps `xhat` and `s` for it.


# %%
def layer_norm_forward(inputs, weight, bias, eps=1e-5):
    """Normalise each row (the last dimension) of `inputs` to mean 0 and spread 1, then
    scale by `weight` and shift by `bias`. Returns (outputs, cache)."""
    # exercise: normalise each row to mean 0 and spread 1, then scale and shift
    mean = inputs.mean(dim=-1, keepdim=True)
    variance = ((inputs - mean) ** 2).mean(dim=-1, keepdim=True)
    inverse_std = 1 / torch.sqrt(variance + eps)
    normalised = (inputs - mean) * inverse_std
    return normalised * weight + bias, (normalised, inverse_std, weight)
    # end exercise


def layer_norm_backward(output_grad, cache):
    """The gradients (input_grad, weight_grad, bias_grad) of layer norm, from the
    loss's gradient with respect to its outputs, as derived above."""
    # exercise: layer norm's input, weight and bias gradients
    normalised, inverse_std, weight = cache
    rows_dims = tuple(range(output_grad.dim() - 1))  # every dimension but the units
    bias_grad = output_grad.sum(dim=rows_dims)
    weight_grad = (output_grad * normalised).sum(dim=rows_dims)
    h = output_grad * weight
    input_grad = inverse_std * (h - h.mean(dim=-1, keepdim=True)
                                - normalised * (h * normalised).mean(dim=-1, keepdim=True))
    return input_grad, weight_grad, bias_grad
    # end exercise


# %% [markdown]
# ### Plugging a hand-written backward into PyTorch
#
# `torch.autograd.Function` lets us tell autograd: "for this operation, do not
# record the inside; here is its forward, and here is its backward". Autograd calls
# our `forward` with plain tensors, keeps what we save in `ctx`, and when the loss's
# backward reaches this node it calls our `backward` with d loss / d outputs and
# expects one gradient per input (None for `eps`, which is not learned). This is how
# chapter 12 will plug hand-written GPU kernels into PyTorch. With it, `HandLayerNorm`
# trains exactly like `nn.LayerNorm`, and its parameters have the same names
# (`weight`, `bias`), so a state_dict moves freely between them.


# %%
class LayerNormFunction(torch.autograd.Function):
    """Layer norm whose backward is `layer_norm_backward`, not autograd's own."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, eps):
        outputs, cache = layer_norm_forward(inputs, weight, bias, eps)
        ctx.save_for_backward(*cache)
        return outputs

    @staticmethod
    def backward(ctx, output_grad):
        input_grad, weight_grad, bias_grad = layer_norm_backward(output_grad,
                                                                 ctx.saved_tensors)
        return input_grad, weight_grad, bias_grad, None


class HandLayerNorm(nn.Module):
    """Layer norm over the last dimension of size `size`, with the hand-written
    forward and backward; a drop-in for nn.LayerNorm(size)."""

    def __init__(self, size, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, inputs):
        return LayerNormFunction.apply(inputs, self.weight, self.bias, self.eps)


# %% [markdown]
# ## Residual connections
#
# A residual connection (He et al., 2015) adds a block's input to its output:
# `h = h + block(h)` instead of `h = block(h)`. The block then only has to learn a
# *correction* to what is already there, and starting near zero it changes little,
# so a deep stack starts out close to a shallow one. Backward, the sum passes the
# gradient straight through: d h_out / d h_in = 1 + d block / d h_in, so the
# gradient reaches early layers undiminished however deep the stack. Transformers
# stack dozens of such blocks, each normalising its input first ("pre-norm"):
#
#     h = h + dropout(relu(linear(layer_norm(h))))
#
# `RegularNet` below is the over-sized network with each ingredient switchable: a
# first layer from the inputs to `width` units, `depth - 1` hidden blocks of that
# width, and a linear read-out. With everything off it is a plain dense network like
# chapter 07's; the blocks gain a layer norm, a residual path and dropout on demand.


# %%
class RegularNet(nn.Module):
    """A dense network of `depth` hidden layers of `width` units, with optional
    dropout (by hand or nn.Dropout), layer norm (by hand) and residual connections."""

    def __init__(self, input_size, width, depth, dropout_p=0.0, hand_dropout=False,
                 layer_norm=False, residual=False):
        super().__init__()
        self.residual = residual

        def dropout_layer():
            return HandDropout(dropout_p) if hand_dropout else nn.Dropout(dropout_p)

        self.input_layer = nn.Linear(input_size, width)
        self.input_dropout = dropout_layer()
        self.hidden_layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.norms = nn.ModuleList(HandLayerNorm(width) if layer_norm else nn.Identity()
                                   for _ in range(depth - 1))
        self.dropouts = nn.ModuleList(dropout_layer() for _ in range(depth - 1))
        self.output_layer = nn.Linear(width, 1)

    def forward(self, inputs):
        hidden = self.input_dropout(torch.relu(self.input_layer(inputs)))
        for linear, norm, drop in zip(self.hidden_layers, self.norms, self.dropouts):
            update = drop(torch.relu(linear(norm(hidden))))
            hidden = hidden + update if self.residual else update
        return self.output_layer(hidden)


# %% [markdown]
# ## Weight decay
#
# Weight decay adds a pull towards zero to every weight, so only weights that earn
# their size by lowering the loss keep it; the wild, large weights that fit noise
# shrink away. The classic form adds `(lambda / 2) * sum of w^2` (L2) to the loss, whose
# gradient is `lambda * w`. With Adam that is a poor idea: Adam divides each gradient
# by its running size, so the pull gets divided too, unevenly. AdamW (Loshchilov and
# Hutter, 2019) *decouples* it: after Adam's step, every weight is shrunk directly,
#
#     w <- w - learning_rate * lambda * w
#
# We decay the weight matrices only: biases and layer-norm gains do not make the
# network more complex when they grow, and decaying a gain towards 0 would fight
# the normalisation. AdamW takes two groups of parameters with their own settings,
# the same split nanoGPT and most transformer trainers use. (`foreach=True` asks
# AdamW to update all tensors of a group in one call instead of a Python loop over
# them: the same arithmetic, less overhead.)
#
# **Why `--weight-decay` defaults to 10**, a hundred to a thousand times the 0.01 to
# 0.1 seen in most AdamW recipes: PyTorch's AdamW multiplies lambda by the learning
# rate, as in the rule above, so what shrinks the weights is `learning_rate *
# lambda` per step, summed over the steps. A large language model trains for
# hundreds of thousands of steps at a rate near 6e-4 with lambda 0.1: a total of
# about 6e-4 * 0.1 * 600,000 = 36. Here 500 examples in batches of 32 make 16 steps
# an epoch, 1,600 in 100 epochs, at 3e-4: lambda 0.1 would total 0.05, a pull too
# weak to see, while lambda 10 totals 4.8, the same order as a long run's. Try
# `--weight-decay 0.1` to watch it do nothing.


# %%
def make_optimizer(model, learning_rate, weight_decay):
    """AdamW with weight decay on the weight matrices (2 or more dimensions) and none
    on biases and layer-norm parameters."""
    matrices = [parameter for parameter in model.parameters() if parameter.dim() >= 2]
    others = [parameter for parameter in model.parameters() if parameter.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                              {"params": others, "weight_decay": 0.0}], lr=learning_rate,
                             foreach=True)


# %% [markdown]
# ## Gradient clipping
#
# Chapter 05 clipped the gradients of its recurrent network in numpy; here is the
# same rule for any PyTorch model. All gradients are seen as one long vector; when
# its length (global norm) exceeds `max_norm`, every gradient is scaled by
# `max_norm / norm`, which keeps the direction of the step and caps its size. One
# unlucky batch can then no longer throw the weights far away. PyTorch has it as
# `torch.nn.utils.clip_grad_norm_`, which the check in `main` compares with ours; like
# it, we add 1e-6 to the norm in the division, so a norm of exactly 0 cannot divide
# by zero (and the two agree to the last digit).


# %%
def clip_gradients(parameters, max_norm):
    """Scale the gradients of `parameters` in place so that their global norm is at
    most `max_norm`. Returns the norm before clipping: 0 when no parameter has a
    gradient yet, as PyTorch's clip_grad_norm_ does."""
    gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not gradients:
        return 0.0
    norm = torch.sqrt(sum((gradient ** 2).sum() for gradient in gradients))
    if norm > max_norm:
        for gradient in gradients:
            gradient.mul_(max_norm / (norm + 1e-6))
    return float(norm)


# %% [markdown]
# ## Learning-rate warmup and cosine decay
#
# At the start, Adam's running averages are built from a handful of gradients and
# the weights are random, so full-size steps can be wild. **Warmup** raises the rate
# linearly from near 0 to its peak over the first steps. Later, a large rate keeps the
# weights jittering around a minimum; **cosine decay** lowers it smoothly, fast in
# the middle and gently at both ends, to a floor (here a tenth of the peak):
#
#     warmup:  rate(step) = peak * (step + 1) / warmup_steps
#     then:    progress   = (step - warmup_steps) / (total_steps - warmup_steps)
#              rate(step) = floor + (peak - floor) * (1 + cos(pi * progress)) / 2
#
# It is the schedule GPT-style models are trained with. We set the rate of every
# parameter group by hand before each step, which makes the rule explicit
# (`torch.optim.lr_scheduler` offers the same as objects).


# %%
def warmup_cosine(step, total_steps, warmup_steps, peak_rate, floor_fraction=0.1):
    """The learning rate at `step` (from 0): linear warmup over `warmup_steps`, then
    cosine decay from `peak_rate` to `floor_fraction * peak_rate` at `total_steps`."""
    if step < warmup_steps:
        return peak_rate * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    floor = floor_fraction * peak_rate
    return floor + (peak_rate - floor) * (1 + np.cos(np.pi * progress)) / 2


# %% [markdown]
# ## The training loop, with every cure as an option
#
# Chapter 07's `train_torch` with four additions, each off unless asked for:
#
# * `schedule`: a function from the step number to the learning rate;
# * `max_norm`: clip the gradients before each step;
# * `patience` and `checkpoint`: **early stopping**. After every epoch, if the
#   validation loss is the best so far, the weights are saved to `checkpoint`
#   (atomically, with chapter 07's `save_weights`); after `patience` epochs without
#   a new best, training stops, and at the end the best weights are loaded back
#   (`torch.load(weights_only=True)`). The validation days choose *when* to stop,
#   which is a decision like any other: the test days stay unseen.
#
# One change besides: chapter 07 recorded the validation MAE in °F; here the history
# records the training and validation loss in the same unit, MSE on standardised
# targets, after every epoch, both measured in eval mode (dropout off), so the two
# curves can be drawn on one axis and compared, and early stopping watches the very
# loss that training lowers.


# %%
def train_torch(model, loader, optimizer, epochs, train_set, valid_set, device,
                schedule=None, max_norm=None, patience=None, checkpoint=None):
    """Train `model`; returns the history, one (train_mse, valid_mse) pair per epoch.
    With `patience`, stops early and restores the best weights saved at `checkpoint`."""
    history = []
    best_loss, epochs_without_best, step, saved = np.inf, 0, 0, False
    for _ in range(epochs):
        model.train()  # predict() below switches to eval mode; switch back each epoch
        for inputs, targets in loader:
            # The loader gives CPU tensors; the model may live on a GPU.
            inputs, targets = inputs.to(device), targets.to(device)
            if schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = schedule(step)
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            if max_norm is not None:
                clip_gradients(model.parameters(), max_norm)
            optimizer.step()
            step += 1
        history.append((mse(predict(model, train_set[0], device), train_set[1]),
                        mse(predict(model, valid_set[0], device), valid_set[1])))
        if diverged(history[-1][0]):
            break  # more steps cannot bring it back, as in chapter 03
        if patience is not None:
            if history[-1][1] < best_loss:
                best_loss, epochs_without_best, saved = history[-1][1], 0, True
                save_weights(model, checkpoint)
            else:
                epochs_without_best += 1
                if epochs_without_best >= patience:
                    break
    if saved:  # this run's best weights (never a file left by an earlier run)
        load_weights(model, checkpoint)
    return history


# %% [markdown]
# ## Checking the hand-written pieces against PyTorch
#
# Before trusting them in training, each hand-written piece is compared with its
# PyTorch counterpart:
#
# * layer norm: our forward against `nn.LayerNorm` with the same `weight` and `bias`,
#   and our backward against autograd's gradients through `nn.LayerNorm`, in
#   float64 so that any difference beyond rounding would be a bug;
# * dropout: on a large tensor of ones, the fraction of zeros should be about `p`
#   and the mean about 1 (inverted scaling), for ours and for `nn.Dropout`, and
#   both should be the identity in eval mode;
# * clipping: our `clip_gradients` against `torch.nn.utils.clip_grad_norm_` on the
#   same gradients.


# %%
def check_layer_norm(rows=8, size=16, seed=0):
    """Largest differences (forward, input gradient, weight and bias gradients)
    between HandLayerNorm and nn.LayerNorm on random float64 data."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, size, dtype=torch.float64, generator=generator) * 3 + 1
    output_grad = torch.randn(rows, size, dtype=torch.float64, generator=generator)
    ours = HandLayerNorm(size).double()
    builtin = nn.LayerNorm(size).double()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(size, dtype=torch.float64, generator=generator))
        ours.bias.copy_(torch.randn(size, dtype=torch.float64, generator=generator))
    builtin.load_state_dict(ours.state_dict())   # the same names: weight, bias
    gaps = {}
    results = []
    for module in (ours, builtin):
        leaf = inputs.clone().requires_grad_(True)
        outputs = module(leaf)
        outputs.backward(output_grad)
        results.append((outputs.detach(), leaf.grad, module.weight.grad, module.bias.grad))
    for name, mine, theirs in zip(["forward", "input_grad", "weight_grad", "bias_grad"],
                                  *results):
        gaps[name] = float((mine - theirs).abs().max())
    return gaps


def check_dropout(p, size=200_000, seed=0):
    """Statistics of our dropout and of nn.Dropout on a tensor of ones: the fraction
    of zeros and the mean in training mode, and whether eval mode is the identity.
    Returns {"hand": (zero_fraction, mean, identity_in_eval), "nn": (...)}."""
    torch.manual_seed(seed)
    ones = torch.ones(size)
    statistics = {}
    for name, module in (("hand", HandDropout(p)), ("nn", nn.Dropout(p))):
        module.train()
        dropped = module(ones)
        module.eval()
        statistics[name] = (float((dropped == 0).float().mean()), float(dropped.mean()),
                            bool(torch.equal(module(ones), ones)))
    return statistics


def check_clipping(max_norm=0.5, seed=0):
    """Largest difference between gradients clipped by `clip_gradients` and by
    torch.nn.utils.clip_grad_norm_, on a small network's real gradients."""
    torch.manual_seed(seed)
    model = RegularNet(6, 8, 2, layer_norm=True, residual=True).double()
    nn.functional.mse_loss(model(torch.randn(5, 6, dtype=torch.float64)),
                           torch.randn(5, 1, dtype=torch.float64)).backward()
    saved = [parameter.grad.clone() for parameter in model.parameters()]
    clip_gradients(model.parameters(), max_norm)
    ours = [parameter.grad.clone() for parameter in model.parameters()]
    for parameter, gradient in zip(model.parameters(), saved):
        parameter.grad = gradient
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return max(float((mine - parameter.grad).abs().max())
               for mine, parameter in zip(ours, model.parameters()))


if __name__ == "__main__":
    # The hand-written pieces, each against PyTorch, before any of them trains.
    print("\nchecks against PyTorch:")
    layer_norm_gaps = check_layer_norm()
    print("  layer norm by hand against nn.LayerNorm, largest differences: " + ", ".join(
        f"{name} {gap:.1e}" for name, gap in layer_norm_gaps.items()))
    statistics = check_dropout(ARGS.dropout)
    for name, (zero_fraction, mean, identity) in statistics.items():
        label = "by hand   " if name == "hand" else "nn.Dropout"
        print(f"  dropout {label} p={ARGS.dropout:g}: {zero_fraction:.3f} zeroed, mean "
              f"{mean:.3f}, identity in eval mode: {identity}")
    clip_gap = check_clipping()
    print(f"  clip_gradients against clip_grad_norm_: largest difference {clip_gap:.1e}")


# %% [markdown]
# ## One experiment per cure
#
# Every row of the final table comes from `run_cure`: a fresh `RegularNet`, built
# right after `torch.manual_seed(seed)` so every cure starts from the *same*
# weights (layer norm's parameters are ones and zeros and draw nothing random), the
# same batches in the same order (the loader's own seeded generator), the same
# epochs and peak learning rate. Only the cure differs, so the difference in the
# validation loss is the cure's doing.
#
# For each run we keep the best validation loss and its epoch, and the validation
# loss of the weights we end up with: the last epoch's, except under early stopping,
# which restores the best. The gap between best and final is how much overfitting
# cost; a cure should shrink it, and ideally lower the best as well. The test MAE
# of the final weights, in °F, is there for a sense of scale.
#
# The last row combines the cures aimed at overfitting: weight decay, dropout,
# clipping, the schedule and early stopping. Layer norm and residual connections
# change the architecture rather than restrain it, and on a network only three
# layers deep they have nothing to rescue; they get their own rows, and their real
# work starts with the deep stacks of chapter 11.


# %%
def cure_settings(args):
    """The experiments: (name, key, settings), the baseline first and all cures
    together last. The settings are keyword arguments for `run_cure`."""
    return [
        ("baseline (no cure)", "baseline", {}),
        ("weight decay", "weight_decay", {"weight_decay": args.weight_decay}),
        ("dropout, by hand", "hand_dropout", {"dropout_p": args.dropout, "hand_dropout": True}),
        ("dropout, nn.Dropout", "nn_dropout", {"dropout_p": args.dropout}),
        ("layer norm, by hand", "layer_norm", {"layer_norm": True}),
        ("residual connections", "residual", {"residual": True}),
        ("gradient clipping", "clipping", {"max_norm": args.max_norm}),
        ("early stopping", "early_stopping", {"patience": args.patience}),
        ("warmup + cosine decay", "warmup_cosine", {"schedule": True}),
        ("all cures together", "all", {"weight_decay": args.weight_decay,
                                       "dropout_p": args.dropout, "hand_dropout": True,
                                       "max_norm": args.max_norm, "patience": args.patience,
                                       "schedule": True}),
    ]


def run_cure(data, args, device, weight_decay=0.0, dropout_p=0.0, hand_dropout=False,
             layer_norm=False, residual=False, max_norm=None, patience=None, schedule=False):
    """Train one over-sized network with the given cures. Returns a dict with the
    history, the best validation loss and its epoch (from 1), the final validation
    and training loss of the weights kept, and their test MAE in °F."""
    train_set, valid_set, test_set, target_mean, target_spread = data
    torch.manual_seed(args.seed)
    model = RegularNet(train_set[0].shape[1], args.width, args.depth, dropout_p, hand_dropout,
                       layer_norm, residual).to(device)
    optimizer = make_optimizer(model, args.learning_rate, weight_decay)
    loader = DataLoader(WeatherDataset(*train_set), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    total_steps = args.epochs * len(loader)
    warmup_steps = max(1, round(args.warmup * total_steps))

    def learning_rate_at(step):
        return warmup_cosine(step, total_steps, warmup_steps, args.learning_rate)

    checkpoint = os.path.join(args.out, f"{CHAPTER}_best.pt")
    history = train_torch(model, loader, optimizer, args.epochs, train_set, valid_set, device,
                          schedule=learning_rate_at if schedule else None, max_norm=max_norm,
                          patience=patience, checkpoint=checkpoint)
    valid_losses = [valid for _, valid in history]
    test_predictions = predict(model, test_set[0], device) * target_spread + target_mean
    return {"history": history,
            "best": float(min(valid_losses)), "best_epoch": int(np.argmin(valid_losses)) + 1,
            "final": mse(predict(model, valid_set[0], device), valid_set[1]),
            "train": mse(predict(model, train_set[0], device), train_set[1]),
            "test_mae": mae(test_predictions, test_set[1] * target_spread + target_mean)}


if __name__ == "__main__":
    parameters = sum(parameter.numel() for parameter in
                     RegularNet(train_inputs.shape[1], ARGS.width, ARGS.depth).parameters())
    print(f"\n{ARGS.depth} hidden layers of {ARGS.width}: {parameters:,} parameters for "
          f"{len(train_inputs)} examples; {ARGS.epochs} epochs of AdamW at "
          f"{ARGS.learning_rate:g}, batches of {ARGS.batch_size}")
    # One run per cure, each from the same weights and batches as the baseline.
    results, keys = {}, {}
    for name, key, settings in cure_settings(ARGS):
        clock = time.perf_counter()
        results[name] = run_cure(data, ARGS, device, **settings)
        keys[name] = key
        result = results[name]
        print(f"  {name:<22} best {result['best']:.3f} at epoch {result['best_epoch']:3d}, "
              f"final {result['final']:.3f} ({time.perf_counter() - clock:.1f} s)")


# %% [markdown]
# ## Reading the table
#
# On the real weather table (`--data`) the default run gives (validation MSE,
# standardised; "tomorrow = today" scores 0.407 there, and on the test days 3.60 °F,
# least squares on the last day 3.51 °F):
#
#     cure                    best  epoch  final  vs baseline  train  test MAE
#     baseline (no cure)     0.430     14  0.633         +0%  0.005   4.85 °F
#     weight decay           0.389     16  0.422        -33%  0.173   3.95 °F
#     dropout, by hand       0.409     14  0.514        -19%  0.047   4.39 °F
#     dropout, nn.Dropout    0.414     18  0.528        -17%  0.046   4.46 °F
#     layer norm, by hand    0.453      5  0.526        -17%  0.001   4.47 °F
#     residual connections   0.435     14  0.680         +7%  0.003   5.01 °F
#     gradient clipping      0.418      8  0.608         -4%  0.006   4.85 °F
#     early stopping         0.430     14  0.430        -32%  0.155   3.88 °F
#     warmup + cosine decay  0.423     17  0.600         -5%  0.002   4.77 °F
#     all cures together     0.387     37  0.387        -39%  0.234   3.71 °F
#
# What to take from it:
#
# * **The baseline overfits.** Its validation loss is lowest after 14 epochs and
#   then climbs by almost half while its training loss keeps falling to zero.
#   It ends far worse than the rule "tomorrow = today".
# * **Weight decay and dropout restrain the fit.** Both lower the best loss and,
#   above all, slow the climb; the training loss stays well above zero, a sign that
#   the network is no longer memorising. The two dropouts differ only by their
#   random masks.
# * **Early stopping** cannot lower the best loss, but it keeps it: it ends exactly
#   at the baseline's best, for the price of a validation set and a checkpoint.
# * **Layer norm, residual connections, clipping and the schedule** are not cures
#   for overfitting, and the table says so: on a shallow network that trains
#   without trouble they change where the curve goes by chance more than by design.
#   Layer norm even makes the best worse: it normalises away the size of each
#   day's hidden vector, and here that size carries the temperature itself. What
#   they do well shows in the training column: layer norm drives the training loss
#   to zero fastest. Making fitting easier is their job, and on 500 examples easier
#   fitting means faster memorising.
# * **Together** the cures end lower than any of them alone, with a test MAE more
#   than a degree better than the baseline's. They do *not* beat the simple rules.
#   On validation they only draw level with "tomorrow = today" (0.387 against 0.407
#   here; on the generated table 0.327 against 0.344 in the default run, and over
#   `--seed` 0 to 2 lower by 0.001 to 0.017, a margin inside the noise of one run),
#   and on the test days both yardsticks stay ahead: 3.71 °F against 3.60 for
#   "tomorrow = today" and 3.51 for least squares (generated table: 3.69 against 3.68
#   and 3.57). Cures limit the damage of fitting 143,000 weights to 500 examples;
#   they cannot add the information that 500 examples lack.
#
# The generated stand-in table tells the same story with other numbers (the table
# printed below). No cure's strength is universal: `--weight-decay`, `--dropout` and
# `--patience` are knobs to tune on the validation set, as every other choice in
# this course.
#
# ### Exercises
# `python tools/exercises.py make 08_regularize` cuts these out of a copy, and
# `python tools/exercises.py check 08_regularize` grades it:
#
# * `dropout`: zero each entry with probability p and scale the rest by 1 / (1 - p).
# * `layer_norm_forward`: normalise each row to mean 0 and spread 1, then scale and
#   shift.
# * `layer_norm_backward`: layer norm's input, weight and bias gradients.
#
# To think about: Why does dropout scale the entries it keeps by 1 / (1 - p)? Why do
# all the cures together still not beat 'tomorrow = today' on the test days?
#
# Answers. With the scaling, each entry's expected value during training equals its
# value at evaluation, when dropout is off, so nothing needs rescaling afterwards. The
# cures limit the damage of fitting 143,000 weights to 500 examples, but they cannot
# add the information those 500 examples lack; more data or a smaller model would.


# %%
if __name__ == "__main__":
    # The table: how low each run ever got, where it ended, and the training loss
    # and test MAE of the weights it ended with. "final vs baseline" compares where
    # the runs ended; a training loss near 0 beside a high validation loss is
    # memorisation.
    baseline = results["baseline (no cure)"]
    print(f"\nvalidation MSE (standardised; baseline best {baseline['best']:.3f}, "
          f"final {baseline['final']:.3f}):")
    print(f"  {'':<22} {'best':>6} {'epoch':>6} {'final':>7} {'final vs baseline':>18} "
          f"{'train':>6} {'test MAE':>9}")
    for name, result in results.items():
        change = 100 * (result["final"] / baseline["final"] - 1)
        print(f"  {name:<22} {result['best']:6.3f} {result['best_epoch']:6d} "
              f"{result['final']:7.3f} {change:+17.0f}% {result['train']:6.3f} "
              f"{result['test_mae']:7.2f} °F")
    print("test MAE, lower is better:")
    for name, value in (("'tomorrow = today'", persistence_mae),
                        ("least squares", closed_form_mae),
                        ("all cures together", results["all cures together"]["test_mae"]),
                        ("baseline (no cure)", baseline["test_mae"])):
        print(f"  {name:<20} {value:.2f} °F")


# %%
if __name__ == "__main__":
    for path in save_plots(ARGS.out, results):
        print(f"saved {path}")


# %%
if __name__ == "__main__":
    figures = {"chapter": CHAPTER, "source": source, "persistence_mse": round(persistence, 4),
               "layer_norm_gap": float(f"{max(layer_norm_gaps.values()):.1e}"),
               "dropout_zero_fraction": round(statistics["hand"][0], 4),
               "clip_gap": float(f"{clip_gap:.1e}")}
    for name, result in results.items():
        figures[f"{keys[name]}_best"] = round(result["best"], 4)
        figures[f"{keys[name]}_final"] = round(result["final"], 4)
    figures["all_test_mae"] = round(results["all cures together"]["test_mae"], 3)
    figures["baseline_test_mae"] = round(baseline["test_mae"], 3)
    figures["persistence_mae"] = round(persistence_mae, 3)
    figures["closed_form_mae"] = round(closed_form_mae, 3)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print_summary(figures)
