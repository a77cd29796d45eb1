"""Linear algebra with numpy on weather rows: vectors, matrices and slopes.

Every model in this course, a GPT included, is built from a handful of operations
on arrays of numbers. This chapter introduces them on real data, a few days of a
weather table, so that each operation has a meaning you can check by eye:

* a day's measurements as a **vector**, and arithmetic on vectors;
* the **dot product**, a weighted sum, the heart of every prediction;
* a table of days as a **matrix**, its shape, rows, columns and transpose;
* **matrix multiplication**: many dot products at once, and why numpy's `@` beats
  Python loops;
* **broadcasting**: how numpy combines arrays of different shapes;
* **derivatives as slopes**, measured with finite differences: how a small change
  in a number changes a result, the idea that makes learning possible.

It ends with a linear prediction of tomorrow's highest temperature whose weights
are set by hand, and its error: chapter 02 learns those weights from the data.

Run it with `python 01_linalg.py` (about a second on a 2-core CPU; `--quick` skips
the timing comparison). `--data PATH` reads a local copy of the weather table;
`--help` lists every flag.

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

CHAPTER = "01_linalg"


# %% [markdown]
# ## Vectors: one day of weather
#
# A **vector** is an ordered list of numbers. One row of the weather table, say
# `[tmax, tmin, rain]` for one day, is a vector of length 3. In numpy it is a 1-D
# array, and arithmetic on arrays works **elementwise**: `a + b` adds the first
# number of `a` to the first of `b`, the second to the second, and so on; `2 * a`
# doubles every number. No loop is written, and numpy runs the loop in fast
# compiled code.
#
# Two vectors' difference says how two days differ; its **length** (the square
# root of the sum of squares, `np.linalg.norm`) says by how much in one number.
#
# Every array has a **shape**, the size along each of its dimensions: a day's
# vector has shape (3,), the whole table (days, 4): the three measurements and the
# answer, tomorrow's tmax, in a fourth column. Most mistakes with arrays are
# shape mistakes, so the chapter prints the shape next to every result; it is a
# good habit to check it in your own code too.


# %%
def describe(name, array):
    """One line about an array: its name, shape and values (rounded for reading)."""
    return f"{name:<22} shape {str(array.shape):<9} {np.round(array, 2).tolist()}"


# %% [markdown]
# ## Set-up: flags and data (not the lesson)
#
# The code in this section is what the chapter needs but does not teach; in a
# notebook its cells open collapsed. Every chapter shares its command line: `--seed`
# for repeatable runs, `--data` for a local copy of the data, `--quick` for a run of
# a few seconds (used by the tests) and `--out` for where files are written. In a
# notebook the flags come from the environment variable `ZERO_TO_GPT_ARGS`. The last
# line of output is `summary:` and a line of JSON with the chapter's headline figures.
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
    args = parser.parse_args(argv)
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
    print(f"weather: {len(table)} days from {source}; columns {', '.join(WEATHER_COLUMNS)}")
    figures = {"chapter": CHAPTER, "source": source}


# %% [markdown]
# The first two days of the table. Indexing a row gives a 1-D array; its first three
# columns are today's measurements (the fourth is the answer).


# %%
if __name__ == "__main__":
    first, second = table[0, :3], table[1, :3]
    print(f"{dates[0]} and {dates[1]}, as vectors of {', '.join(FEATURES)}:")
    print("  " + describe("first day", first))
    print("  " + describe("second day", second))
    print("  " + describe("second - first", second - first))
    print("  " + describe("2 * first", 2 * first))
    print(f"  length of the difference: {np.linalg.norm(second - first):.2f}")


# %% [markdown]
# ## The dot product: a weighted sum
#
# The **dot product** of two vectors of the same length multiplies them
# elementwise and adds up the results:
#
#     a . b = a_1 b_1 + a_2 b_2 + ... + a_n b_n
#
# With `a` a day's measurements and `b` a vector of **weights**, the dot product is
# a weighted sum of the measurements: exactly a linear prediction. A weight says how
# much its measurement counts; a negative weight pulls the result down.
#
# Below, `dot` spells out the sum with a Python loop; `a @ b` (or `np.dot(a, b)`) is
# the same thing, computed by numpy.


# %%
def dot(a, b):
    """The dot product written out: the sum of a[i] * b[i]."""
    if len(a) != len(b):
        raise ValueError(f"a dot product needs two vectors of one length, not {len(a)} and {len(b)}")
    # exercise: the sum of a[i] * b[i] over every position
    return sum(float(x) * float(y) for x, y in zip(a, b))
    # end exercise


if __name__ == "__main__":
    weights = np.array([0.8, 0.1, -1.0])
    print(f"dot product of the first day with weights {weights.tolist()}:")
    print(f"  by hand: {first[0]:g}*0.8 + {first[1]:g}*0.1 + {first[2]:g}*(-1.0) = "
          f"{dot(first, weights):.2f}; numpy: first @ weights = {first @ weights:.2f}")


# %% [markdown]
# ## Matrices: a table of days
#
# A **matrix** is a table of numbers, a 2-D array: here one row per day and one
# column per measurement. Its **shape** is (rows, columns). `table[i]` is row i (a
# day, a vector), `table[:, j]` is column j (one measurement over all days), and
# `table.T`, the **transpose**, swaps rows and columns: shape (4, days). Below, the
# first five days' three measurements, `table[:5, :3]`, make a (5, 3) matrix.
#
# ## Matrix multiplication: many dot products at once
#
# To predict every day, we need the dot product of every row with the weights. A
# matrix times a vector does exactly that: `table @ weights` is a vector with one
# dot product per row. More generally, for A of shape (n, k) and B of shape (k, m),
#
#     (A @ B)[i, j] = sum over l of A[i, l] * B[l, j]
#
# the dot product of row i of A with column j of B; the result has shape (n, m).
# The inner sizes (k) must agree, the outer ones give the result's shape. That is
# the one rule to remember: (n, k) @ (k, m) -> (n, m). A network layer in chapter
# 03 is one such product: (days, features) @ (features, units).
#
# `matmul_by_loops` writes the definition out with three loops. It gives the same
# numbers as `@`, and the timing below shows why we never write it that way.
#
# The cost of a product is about n * k * m multiplications and as many additions.
# A GPT spends almost all of its time in such products, which is why GPUs, built to
# do thousands of them at once, made large models possible, and why chapter 12
# writes its own.


# %%
def matmul_by_loops(a, b):
    """Matrix product by its definition: out[i, j] = sum over l of a[i, l] * b[l, j]."""
    rows, inner = a.shape
    if b.shape[0] != inner:
        raise ValueError(f"cannot multiply shapes {a.shape} and {b.shape}: inner sizes differ")
    # exercise: out[i, j] = sum over k of a[i, k] * b[k, j], with three loops
    out = np.zeros((rows, b.shape[1]))
    for i in range(rows):
        for j in range(b.shape[1]):
            for k in range(inner):
                out[i, j] += a[i, k] * b[k, j]
    return out
    # end exercise


if __name__ == "__main__":
    # Five days, and the product with the weights. Stacking two weight vectors as the
    # columns of a (3, 2) matrix makes two predictions a day at once.
    days = table[:5, :3]
    print(f"the first five days as a matrix, shape {days.shape}:")
    print("  " + np.array2string(days, prefix="  ", precision=2))
    print(f"  column 0 (tmax): {days[:, 0].tolist()}; transpose shape {days.T.shape}")
    print(f"  days @ weights, one weighted sum a day, shape {(days @ weights).shape}: "
          f"{np.round(days @ weights, 2).tolist()}")
    two_sets = np.stack([weights, [1.0, 0.0, 0.0]], axis=1)
    print(f"  days {days.shape} @ two sets of weights {two_sets.shape} -> "
          f"{(days @ two_sets).shape}; loops agree with @: "
          f"{np.allclose(matmul_by_loops(days, two_sets), days @ two_sets)}")
    if not ARGS.quick:
        # The same product on 300 days, timed: loops against numpy.
        many = table[:300, :3]
        tick = time.perf_counter()
        matmul_by_loops(many, two_sets)
        loop_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        for _ in range(100):
            many @ two_sets
        numpy_seconds = (time.perf_counter() - tick) / 100
        print(f"  on 300 days: Python loops {1000 * loop_seconds:.2f} ms, numpy "
              f"{1000 * numpy_seconds:.4f} ms, {loop_seconds / numpy_seconds:.0f} times faster")
        figures["numpy_speedup"] = round(loop_seconds / numpy_seconds)


# %% [markdown]
# ## Broadcasting: combining different shapes
#
# What is `inputs - inputs.mean(axis=0)`, where `inputs = table[:, :3]` holds the
# three measurements of every day? `inputs` has shape (days, 3); its column means
# have shape (3,). numpy **broadcasts**: it lines the shapes up from the
# right, and where one array has size 1 or lacks a dimension it repeats it, here
# the row of means once for every day. So every value has its column's mean
# subtracted, with no loop and no copy of the means. The rule: compare the shapes
# from the last dimension backwards; each pair must be equal, or one of them 1.
# (days, 3) with (3,) works; (days, 3) with (days,) does not, but (days, 3) with
# (days, 1) does: one number per row, repeated across the columns.
#
# Broadcasting adds a model's bias to every prediction and, below, standardises
# the columns (mean 0, spread 1), which chapter 02 needs.


# %%
if __name__ == "__main__":
    # Subtract each column's mean, divide by its spread. The means and spreads come
    # from the training days only (the first 70%, see split_data), so nothing about
    # the test days leaks into the choices made here.
    inputs, targets = table[:, :3], table[:, 3]
    (train_inputs, train_targets), _, (test_inputs, test_targets) = split_data(inputs, targets)
    means = train_inputs.mean(axis=0)
    spreads = train_inputs.std(axis=0)
    standardised = (train_inputs - means) / spreads
    print(f"broadcasting: training days {train_inputs.shape} minus column means "
          f"{means.shape} = {np.round(means, 2).tolist()}")
    print(f"  after dividing by the spreads {np.round(spreads, 2).tolist()}: means "
          f"{np.round(standardised.mean(axis=0), 6).tolist()}, spreads "
          f"{np.round(standardised.std(axis=0), 6).tolist()}")


# %% [markdown]
# ## Derivatives as slopes
#
# The **derivative** of a function at a point is its slope there: how much the
# output changes per unit change of the input, for a very small change. For
# f(x) = x^2 the rules of calculus give f'(x) = 2x, so at x = 3 the slope is 6. We
# can also *measure* it, with a **finite difference**: nudge x by a small h both
# ways and divide the change of f by the change of x:
#
#     f'(x) ~ (f(x + h) - f(x - h)) / (2 h)
#
# This "central" difference is accurate to about h^2 (the errors of the two sides
# cancel to first order). h must be small, but not so small that rounding in
# f(x + h) - f(x - h) swamps the difference; 1e-5 is a good default for numbers
# around 1.
#
# Why this matters: a model's error is a function of its weights. Its slope with
# respect to a weight says which way to move the weight to shrink the error (the
# opposite way to the slope) and how sensitive the error is to it. Chapter 02 moves
# weights this way, over and over: gradient descent.


# %%
def slope(function, x, step=1e-5):
    """The slope of `function` at `x`, measured by central finite differences."""
    # exercise: the slope of `function` at `x` by central finite differences
    return (function(x + step) - function(x - step)) / (2 * step)
    # end exercise


if __name__ == "__main__":
    measured = slope(lambda x: x ** 2, 3.0)
    print(f"slope of x^2 at x = 3: measured {measured:.6f}, exact 6")


# %% [markdown]
# ## A hand-set prediction of tomorrow's high
#
# The simplest forecast is "tomorrow will be like today": prediction = today's
# tmax. But an unusually hot day is usually followed by a less unusual one:
# temperatures drift back towards the long-run average. So we pull today's tmax a
# fraction of the way towards the average of the training days:
#
#     prediction = average + pull * (tmax - average)
#                = pull * tmax + (1 - pull) * average
#
# which is a dot product of the day's `[tmax, tmin, rain]` with the weights
# `[pull, 0, 0]`, plus a bias `(1 - pull) * average`. With pull = 1 it is "tomorrow
# = today"; we start from pull = 0.8, a guess.
#
# Two numbers say how wrong a set of predictions p_i is against the truths t_i, over
# n days. The **mean absolute error**, MAE = (1/n) * sum_i |p_i - t_i|, is the
# typical miss in °F, easy to read, so it is the figure we report. The **mean squared
# error**, MSE = (1/n) * sum_i (p_i - t_i)^2, in °F², is the one we take slopes of:
# it is smooth everywhere (the absolute value has a kink at zero), and chapter 02
# trains on it.
#
# Beside "tomorrow = today" we print a second yardstick: **least squares**, the
# weights and bias of the straight line `inputs @ weights + bias` with the smallest
# training MSE of all. `np.linalg.lstsq` finds them in one line (how, and how to
# reach them step by step, is chapter 02); no linear forecast from these three
# numbers can do better on the training days, so it says how much a hand-set pull
# leaves on the table.
#
# We measure the errors on the test days, the last 15% of the table, which no choice
# here has looked at. Then we measure the slope of the training error with respect
# to `pull`, check it against the exact derivative, and see which way it says the
# pull should move. The exact derivative, for prediction p_i = pull * d_i + average
# with d_i = tmax_i - average:
#
#     d MSE / d pull = mean over days of 2 * (p_i - target_i) * d_i
#
# since only p_i depends on pull, with slope d_i.


# %%
def mse(predictions, targets):
    """Mean squared error: the average of (prediction - target)^2."""
    return float(np.mean((predictions - targets) ** 2))


def mae(predictions, targets):
    """Mean absolute error: the average distance between prediction and target."""
    return float(np.mean(np.abs(predictions - targets)))


def least_squares_line(inputs, targets):
    """The weights and bias with the smallest squared error on these rows: a column
    of ones is appended to `inputs` so that its weight is the bias."""
    # exercise: the least-squares weights and bias, with a column of ones for the bias
    with_ones = np.column_stack([inputs, np.ones(len(inputs))])
    solution = np.linalg.lstsq(with_ones, targets, rcond=None)[0]
    return solution[:-1], solution[-1]
    # end exercise


def hand_set_model(pull, average):
    """The weights and bias of 'pull today's tmax towards the average'."""
    return np.array([pull, 0.0, 0.0]), (1 - pull) * average


def linear_prediction(inputs, weights, bias):
    """A linear prediction for every row: inputs @ weights + bias."""
    return inputs @ weights + bias


def save_plots(out_dir, pulls, errors, pull, error, gradient):
    """Plot the training MSE against the pull with the tangent line at `pull`; without
    matplotlib, print a compact table instead. Returns the files written."""
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot; the curve as a table instead:")
        for value, mse_value in zip(pulls[::4], errors[::4]):
            print(f"  pull {value:4.2f}: training MSE {mse_value:6.2f}")
        return []
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{CHAPTER}_slope.png")
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(pulls, errors, label="training MSE")
    near = np.linspace(pull - 0.15, pull + 0.15, 2)
    axis.plot(near, error + gradient * (near - pull), linestyle="--",
              label=f"slope at {pull:g}: {gradient:.1f}")
    axis.scatter([pull], [error], color="black", zorder=3)
    axis.set(xlabel="pull", ylabel="MSE (°F²)", title="The error as a function of one weight")
    axis.legend()
    figure.tight_layout()
    show_figure(figure, path)
    plt.close(figure)
    return [path]


if __name__ == "__main__":
    # The error is measured on test days; the slope on training days, because
    # choosing a weight by its test error would make the test a part of training.
    average = float(train_inputs[:, 0].mean())
    pull = 0.8
    weights, bias = hand_set_model(pull, average)
    hand_set_mae = mae(linear_prediction(test_inputs, weights, bias), test_targets)
    persistence_mae = mae(test_inputs[:, 0], test_targets)
    print(f"hand-set prediction: {pull} * tmax + {bias:.2f} (the training average is "
          f"{average:.2f} °F)")
    closed_form_mae = mae(linear_prediction(test_inputs, *least_squares_line(train_inputs,
                                                                             train_targets)),
                          test_targets)
    print("  test MAE, lower is better:")
    for name, value in (("'tomorrow = today'", persistence_mae),
                        ("hand-set pull 0.8", hand_set_mae),
                        ("least squares", closed_form_mae)):
        print(f"    {name:<20} {value:.2f} °F")

    def training_error(value):
        return mse(linear_prediction(train_inputs, *hand_set_model(value, average)),
                   train_targets)

    measured = slope(training_error, pull)
    deviations = train_inputs[:, 0] - average
    exact = float(np.mean(2 * (linear_prediction(train_inputs, weights, bias) - train_targets)
                          * deviations))
    slope_error = abs(measured - exact) / max(abs(exact), 1e-12)
    print(f"  slope of the training MSE with respect to pull: measured {measured:.3f}, "
          f"exact {exact:.3f} (relative difference {slope_error:.1e})")
    # One small step against the slope: the move chapter 02 repeats thousands of
    # times. The step is the slope times a small number (a "learning rate").
    stepped = pull - 0.002 * exact
    print(f"  the slope is {'positive' if exact > 0 else 'negative'}, so a "
          f"{'smaller' if exact > 0 else 'larger'} pull lowers the error: training MSE "
          f"{training_error(pull):.3f} at pull {pull}, {training_error(stepped):.3f} at "
          f"{stepped:.4f}")
    pulls = np.linspace(0.5, 1.1, 25)
    for path in save_plots(ARGS.out, pulls, [training_error(value) for value in pulls], pull,
                           training_error(pull), exact):
        print(f"saved {path}")


# %% [markdown]
# ## Reading the results
#
# * The dot product of a day with a set of weights is one number, a weighted sum;
#   a matrix product computes one such number for every day and every set of
#   weights at once. numpy's `@` gives exactly the loops' numbers, hundreds of
#   times faster, because its loops run in compiled code on whole blocks of
#   memory. The same holds on a GPU, thousands of times over (chapter 12).
# * Broadcasting turned "subtract each column's mean" into one expression; after
#   it, every column has mean 0 and spread 1.
# * The finite difference agrees with the exact derivative to many digits, for
#   x^2 and for the error of a forecast. The slope of the error tells which way to
#   move a weight; one small step that way lowers the error.
# * The hand-set forecast, "pull today's high a fifth of the way to the average",
#   beats "tomorrow = today" on test days it never saw (3.59 °F against 3.68 °F on
#   the generated table, 3.51 against 3.60 on the real one). It has one weight we
#   chose by reasoning; least squares, with every weight chosen from the data, does
#   a little better still (3.56 °F). Chapter 02 lets the slope choose all the
#   weights and lands on least squares' answer.
#
# ### Exercises
# `python tools/exercises.py make 01_linalg` cuts these out of a copy, and
# `python tools/exercises.py check 01_linalg` grades it:
#
# * `dot`: the sum of a[i] * b[i] over every position.
# * `matmul_by_loops`: out[i, j] = sum over k of a[i, k] * b[k, j], with three loops.
# * `slope`: the slope of `function` at `x` by central finite differences.
# * `least_squares_line`: the least-squares weights and bias, with a column of ones
#   for the bias.
#
# To think about: The slope is measured on the training days and the error on the test
# days. Why not choose the pull by its test error?
#
# Answers. A pull chosen by its test error makes the test days part of training, so
# their error no longer tells how the forecast does on days it never saw.


# %%
if __name__ == "__main__":
    print_summary({**figures, "hand_set_mae": round(hand_set_mae, 3),
                   "persistence_mae": round(persistence_mae, 3),
                   "closed_form_mae": round(closed_form_mae, 3),
                   "slope_error": float(f"{slope_error:.1e}"),
                   "seconds": round(time.perf_counter() - started, 1)})
