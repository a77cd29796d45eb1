"""PyTorch: the networks of chapters 03 and 05 rebuilt on a real deep-learning library.

Chapter 06 built a miniature PyTorch: a `Tensor` that remembers how it was computed,
a `.backward()` that walks that graph with the chain rule, and SGD and Adam
optimisers. This chapter swaps the miniature for the real thing and shows which
PyTorch part does the job of which part you wrote: tensors and devices, autograd,
`nn.Module` and `nn.Parameter` (then `nn.Linear`, `nn.Sequential` and `nn.RNN`),
`torch.optim`, `Dataset`, `Sampler` and `DataLoader`, train and eval modes, and
saving and loading weights safely (`torch.load(weights_only=True)`).

The proof that nothing is lost in translation: given the same starting weights, the
PyTorch dense network computes the same predictions and the same gradients as
chapter 03's numpy network (to about 1e-14 in float64), trains along the same path
to the same test MAE, and the PyTorch recurrent network matches chapter 05's. Then
the chapter times a training step in numpy and in PyTorch, on the CPU and on a GPU
when there is one.

New since 06_autograd.py: the real library. The numpy networks of 03 and 05 are
carried unchanged, for the comparisons.

Run it with `python 07_pytorch.py` (about 12 seconds on a 2-core CPU) or
`python 07_pytorch.py --quick` (a few seconds); `--data PATH` reads a local copy of
the weather table, `--device cpu` or `--device cuda` picks the device, and `--help`
lists every flag. In a notebook (Jupyter, VS Code) the chapter takes its flags from
the environment variable ZERO_TO_GPT_ARGS, for example `ZERO_TO_GPT_ARGS="--quick"`,
and uses the defaults without it.
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
from torch.utils.data import DataLoader, Dataset, Sampler

CHAPTER = "07_pytorch"

# %% [markdown]
# ## From chapter 06 to PyTorch: what replaces what
#
# Chapter 06's miniature engine and PyTorch are built on the same ideas, so every
# piece you wrote has a counterpart:
#
# | chapter 06 (yours)                               | PyTorch                                       |
# |--------------------------------------------------|-----------------------------------------------|
# | `Tensor(data, requires_grad=True)` around numpy  | `torch.tensor(data, requires_grad=True)`      |
# | `tensor._parents` and `tensor._backward`          | `tensor.grad_fn` and its `next_functions`     |
# | `loss.backward()`: topological order, then rules | `loss.backward()`, the same walk in C++       |
# | `tensor.grad`, `optimizer.zero_grad()`            | `tensor.grad`, `optimizer.zero_grad()`        |
# | a list of weight Tensors                         | `nn.Parameter`s in an `nn.Module`             |
# | `SGD(parameters, learning_rate)`, `Adam`, `step` | `torch.optim.SGD(parameters, lr)`, `Adam`     |
# | slicing shuffled rows into batches by hand       | `Dataset`, `Sampler`, `DataLoader`            |
#
# The names are the same on purpose: chapter 06 followed PyTorch's design, so a
# training step reads identically in both, `zero_grad`, `backward`, `step`.
#
# What PyTorch adds is speed and breadth: hundreds of operations each with a tested
# backward rule, kernels tuned for CPUs and GPUs, and the same code running on either.
#
# ## Tensors and devices
#
# A `torch.Tensor` is an n-dimensional array, like a numpy array: same shapes, same
# broadcasting rules, same `@` for matrix multiply. Two differences matter from the
# start:
#
# * **dtype.** numpy computes in float64 by default; PyTorch in float32, which is
#   half the memory and, on a GPU, many times the speed. Its 7 significant digits are
#   plenty for training. We use float64 only where we compare with numpy to the last
#   digit.
# * **device.** A tensor lives in the memory of one device: `cpu`, or `cuda` (an
#   NVIDIA GPU). An operation runs on the device where its inputs live, and mixing
#   devices is an error, so a model and its data are moved together with `.to(device)`.
#
# `torch.from_numpy(array)` makes a tensor that *shares* the array's memory (no copy:
# change one and the other changes); `tensor.numpy()` goes back, for a CPU tensor.
# `torch.as_tensor(array, dtype=..., device=...)` copies only when it must.

# %%
def pick_device(name="auto"):
    """The device to compute on: "cuda" when asked for or when one is available with
    "auto", else "cpu". Asking for a GPU that is not there is a DataError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; "
                        "use --device cpu or --device auto")
    return torch.device(name)


def tensor_tour(inputs, device):
    """Show tensors beside numpy arrays on a few weather rows: shared memory, dtypes,
    devices, and the same arithmetic. Returns the largest difference between numpy's
    and PyTorch's answer to the same matrix product."""
    rows = np.ascontiguousarray(inputs[:4])
    shared = torch.from_numpy(rows)
    print(f"  torch.from_numpy: shape {tuple(shared.shape)}, dtype {shared.dtype}, "
          f"device {shared.device}, shares memory with the array: "
          f"{shared.data_ptr() == rows.__array_interface__['data'][0]}")
    on_device = shared.to(device=device, dtype=torch.float32)
    print(f"  .to({device.type!r}, float32): dtype {on_device.dtype}, device {on_device.device}")
    # The same product, in numpy and in PyTorch (float64 on the CPU): identical maths.
    by_numpy = rows @ rows.T
    by_torch = (shared @ shared.T).numpy()
    difference = float(np.abs(by_numpy - by_torch).max())
    print(f"  rows @ rows.T in numpy and in PyTorch differ by at most {difference:.1e}")
    return difference


# %% [markdown]
# ## Autograd
#
# A tensor created with `requires_grad=True` is a leaf of the computational graph,
# exactly like a weight `Tensor` in chapter 06. Every operation on it records a node
# (`result.grad_fn`) that knows its inputs and its backward rule. `loss.backward()`
# walks the graph from the loss back to the leaves and *adds* each leaf's gradient into
# its `.grad`.
#
# Two habits follow:
#
# * gradients **accumulate**: a second `backward()` adds to `.grad` instead of replacing
#   it (useful to sum gradients over several batches), so each training step starts by
#   zeroing them (`optimizer.zero_grad()`);
# * evaluation runs inside `with torch.no_grad():`, which records no graph: less memory
#   and time, and no risk of a stray gradient.
#
# The check below uses one linear layer, `predictions = x W + b`, whose gradient
# chapter 02 derived by hand: with `g = 2 (predictions - targets) / n`,
# `d loss / d W = x^T g` and `d loss / d b = sum of g`.

# %%
def autograd_tour(inputs, targets, rng):
    """Compare autograd with the hand-derived gradient of a linear layer, and show that
    gradients accumulate and that no_grad records nothing. Returns the largest
    difference between autograd's and the hand-derived weight gradient."""
    x = torch.from_numpy(inputs)
    t = torch.from_numpy(targets)
    weight = torch.tensor(rng.normal(size=(x.shape[1], 1)), requires_grad=True)
    bias = torch.zeros((1, 1), dtype=torch.float64, requires_grad=True)
    predictions = x @ weight + bias
    loss = ((predictions - t) ** 2).mean()
    print(f"  loss = {loss.item():.3f}, computed by {type(loss.grad_fn).__name__}, "
          f"whose inputs come from {type(loss.grad_fn.next_functions[0][0]).__name__}")
    loss.backward()
    g = 2 * (predictions.detach() - t) / len(t)
    by_hand = x.T @ g
    difference = float((weight.grad - by_hand).abs().max())
    print(f"  d loss / d W: autograd and x^T g differ by {difference:.1e}")
    first = weight.grad.clone()
    ((x @ weight + bias - t) ** 2).mean().backward()       # a second backward adds up
    print(f"  after a second backward, .grad is {float((weight.grad / first).mean()):.1f} "
          f"times the first: gradients accumulate until zeroed")
    with torch.no_grad():
        quiet = x @ weight + bias
    print(f"  under torch.no_grad() the result has grad_fn={quiet.grad_fn} and "
          f"requires_grad={quiet.requires_grad}")
    return difference


# %% [markdown]
# ## Set-up: flags, data and plots (not the lesson)
#
# The chapter needs the code of this section to run, but does not teach it; in the
# notebook its cells are folded away.
#
# **The weather table.** Every weather chapter (01-08) reads the same table: one row
# a day, from 1970-01-01 to 2022-11-26, with the day's highest temperature (`tmax`,
# °F), lowest temperature (`tmin`, °F), rainfall (`rain`, inches) and the next day's
# highest temperature (`tmax_tomorrow`), the number we learn to predict. The loader
# is carried unchanged from chapter to chapter. It downloads the table once into
# `data/`, checks it against a recorded SHA-256 digest (so a truncated or tampered
# download is never used), and writes it to a temporary file that is renamed into
# place only when complete, so an interrupted download never leaves half a file
# behind. Without a network it generates a stand-in table of the same shape, so the
# chapter still runs; it says so in one line.
#
# **The command line.** Every chapter shares `--seed` for repeatable runs, `--data`
# for a local copy of the data, `--quick` for a run of a few seconds (used by the
# tests) and `--out` for where files are written. Its last line of output is
# `summary:` and a line of JSON with the chapter's headline figures, so scripts and
# tests can read it. This chapter keeps chapter 03's `--hidden-sizes`, `--epochs`,
# `--learning-rate` and `--batch-size` for the dense network, takes chapter 05's
# `--window` and `--hidden-size` for the recurrent one, and adds `--device`. Bad
# values are refused before any work starts.
#
# **The plot.** One picture, drawn at the end: the validation MAE epoch by epoch for
# numpy's gradient descent, the same run replayed in PyTorch (the two curves lie on
# top of each other) and PyTorch with Adam.

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
WEATHER_URL = ("https://raw.githubusercontent.com/VikParuchuri/zero_to_gpt/"
               "master/data/clean_weather.csv")
WEATHER_SHA256 = "70d75ac02ccf0c0f45aed0077919fee302c6428b9f3c3401aadf090b0f6dfc8c"
WEATHER_COLUMNS = ["tmax", "tmin", "rain", "tmax_tomorrow"]
FEATURES = ["tmax", "tmin", "rain"]     # what the models see
TARGET = "tmax_tomorrow"                # what they predict


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
    parser.add_argument("--out", default="out",
                        help="folder for plots and saved weights (default out/)")
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[32, 32],
                        help="units in each hidden layer of the dense network (default: 32 32)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of dense training (default 30, --quick 1); the "
                             "recurrent network trains for a third of them")
    parser.add_argument("--learning-rate", type=float, default=0.001,
                        help="step size of gradient descent for the dense network "
                             "(default 0.001)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="rows per mini-batch (default 32)")
    parser.add_argument("--window", type=int, default=7,
                        help="days the recurrent network reads (default 7)")
    parser.add_argument("--hidden-size", type=int, default=32,
                        help="hidden units of the recurrent network (default 32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads PyTorch may use (default 1: the networks here are "
                             "small, and on small matrices more threads cost more than they save)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where PyTorch computes: auto (a GPU when there is one), "
                             "cpu or cuda (default auto)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 30
    if min(args.hidden_sizes) < 1:
        raise DataError(f"--hidden-sizes must all be at least 1, not {args.hidden_sizes}")
    if args.epochs < 1:
        raise DataError(f"--epochs must be at least 1, not {args.epochs}")
    if not (args.learning_rate > 0 and np.isfinite(args.learning_rate)):
        raise DataError(f"--learning-rate must be a positive number, not {args.learning_rate}")
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.window < 1:
        raise DataError(f"--window must be at least 1 day, not {args.window}")
    if args.hidden_size < 1:
        raise DataError(f"--hidden-size must be at least 1, not {args.hidden_size}")
    if args.threads < 1:
        raise DataError(f"--threads must be at least 1, not {args.threads}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DataError(f"--out {args.out} is a file; give a folder for plots and weights")
    return args


def print_summary(figures):
    """The chapter's last line: `summary: ` and its headline figures as JSON."""
    print("summary: " + json.dumps(figures))


def save_plots(out_dir, curves):
    """Save the validation curves (a dict from a label to a history of (train_mse,
    valid_mae) pairs) as a PNG in `out_dir`; without matplotlib, print them as text.
    Returns the files written."""
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plots; the validation MAE by epoch instead:")
        for label, history in curves.items():
            print(f"  {label:>22}: " + " ".join(f"{valid:.2f}" for _, valid in history))
        return []
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{CHAPTER}_validation.png")
    figure, axis = plt.subplots(figsize=(6, 4))
    for (label, history), style in zip(curves.items(), ["-", "--", "-", "-"]):
        axis.plot(range(1, len(history) + 1), [valid for _, valid in history], style,
                  marker="o", markersize=3, label=label)
    axis.set(xlabel="epoch", ylabel="validation MAE (°F)", title="numpy and PyTorch")
    axis.legend()
    figure.tight_layout()
    show_figure(figure, path)
    plt.close(figure)
    return [path]


# %% [markdown]
# ## Carried from chapter 03: the numpy dense network
#
# Chapter 03's losses, scaling and dense network (a list of `(weight, bias)` pairs,
# with the hand-written `dense_forward`, `dense_backward`, `train` and `evaluate`)
# follow unchanged, as the yardstick the PyTorch network must match number for number.

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


def start_from_mean(layers, targets):
    """Set the last layer's bias to the average target, so training starts from the
    sensible guess "every day is an average day" instead of from 0 °F, and the
    weights only have to learn the differences from the average."""
    weight, bias = layers[-1]
    return [*layers[:-1], (weight, bias + targets.mean())]


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


def diverged(loss):
    """True when a training loss has blown up: overflowed to inf or nan, or grown past
    1e12 °F² (errors of a million degrees), where no later step can recover."""
    return not np.isfinite(loss) or loss > 1e12


def evaluate(layers, inputs, targets):
    """The model's mean absolute error on a set of rows, in °F."""
    return mae(dense_forward(layers, inputs)[0], targets)


# %% [markdown]
# ## Carried from chapter 05: the numpy recurrent network
#
# Chapter 05's windows of days and its recurrent network, with backpropagation
# through time written by hand in `rnn_backward`, follow unchanged for the same test.

# %% jupyter={"source_hidden": true}
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
# ## Tensors and autograd on real rows
#
# The run starts here: it reads its flags, loads the weather table, splits it in time
# order and scales it, then repeats the two tours above on real training rows. The
# tensor tour shows a tensor sharing an array's memory and moving to the device; the
# autograd tour checks `loss.backward()` against the gradient derived by hand.
#
# The split and the scaling are chapter 03's, on purpose: the first 70% of days
# train, and the mean and spread that scale every set are measured on those days
# only, so nothing about the validation and test days leaks into training. The
# numpy and the PyTorch networks below then see exactly the same numbers, which is
# what lets their results agree to the last digit.

# %%
if __name__ == "__main__":
    ARGS = chapter_args()
    started = time.perf_counter()
    figures = {"chapter": CHAPTER}
    device = pick_device(ARGS.device)
    torch.manual_seed(ARGS.seed)
    torch.set_num_threads(ARGS.threads)
    dates, table, source = load_weather(ARGS.data, ARGS.seed)
    figures.update(source=source, device=device.type)
    inputs, targets = table[:, :3], table[:, 3:]
    (train_raw, train_targets), (valid_raw, valid_targets), (test_raw, test_targets) = \
        split_data(inputs, targets)
    print(f"weather: {len(table)} days from {source} ({dates[0]} to {dates[-1]}); "
          f"{len(train_raw)} train, {len(valid_raw)} valid, {len(test_raw)} test")
    print(f"PyTorch {torch.__version__}, computing on {device}"
          + ("" if torch.cuda.is_available() else " (no CUDA GPU found)")
          + f", {torch.get_num_threads()} CPU thread(s)")
    train_inputs, valid_inputs, test_inputs = standardise(train_raw, valid_raw, test_raw)
    # The weather thread's two yardsticks on these test days, printed beside the
    # networks' figures at the end: "tomorrow = today", and chapter 02's
    # least-squares line (a column of ones for the bias).
    persistence_mae = mae(test_raw[:, :1], test_targets)
    [(weight, bias)] = least_squares(train_inputs, train_targets)
    closed_form_mae = mae(test_inputs @ weight + bias, test_targets)
    figures.update(persistence_mae=round(persistence_mae, 3),
                   closed_form_mae=round(closed_form_mae, 3))
    train_set = (train_inputs, train_targets)
    valid_set = (valid_inputs, valid_targets)
    rng = np.random.default_rng(ARGS.seed)

    # A first look at tensors and autograd on a few real rows.
    print("\ntensors:")
    tensor_tour(train_inputs, device)
    print("autograd:")
    autograd_tour(train_inputs[:64], train_targets[:64], rng)


# %% [markdown]
# ## nn.Module and nn.Parameter: chapter 03's network in PyTorch
#
# `nn.Module` is the base class of every PyTorch model. A subclass creates its
# weights in `__init__`, wrapped in `nn.Parameter`, and computes its output in
# `forward`. Wrapping a tensor in `nn.Parameter` does two things: it sets
# `requires_grad=True`, and it *registers* the tensor with the module, so that
# `model.parameters()` lists it for the optimiser, `model.to(device)` moves it and
# `model.state_dict()` saves it. A list of parameters goes in an `nn.ParameterList`
# (a plain Python list would hide them from the module).
#
# `DenseNet` below is chapter 03's `dense_forward` line for line: the same weight
# shapes (inputs, outputs), the same He initialisation, a ReLU after every layer but
# the last. There is no backward method: autograd derives it from `forward`.

# %%
class DenseNet(nn.Module):
    """Chapter 03's dense network as an nn.Module, e.g. DenseNet([3, 32, 32, 1])."""

    def __init__(self, layer_sizes, dtype=torch.float32):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for inputs, outputs in zip(layer_sizes[:-1], layer_sizes[1:]):
            # He initialisation, as init_dense: standard deviation sqrt(2 / inputs).
            weight = torch.randn(inputs, outputs, dtype=dtype) * np.sqrt(2.0 / inputs)
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.zeros(1, outputs, dtype=dtype)))

    def forward(self, inputs):
        # Each operation below records a node in the graph, so `loss.backward()`
        # later finds its way back to every weight and bias.
        # exercise: the dense network's forward pass: linear layers with ReLU between
        activations = inputs
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            pre_activation = activations @ weight + bias
            is_last = index == len(self.weights) - 1
            activations = pre_activation if is_last else torch.relu(pre_activation)
        return activations
        # end exercise


def dense_net_from_layers(layers):
    """A DenseNet holding a copy of numpy `layers` (chapter 03's list of (weight, bias)
    pairs), in the layers' own dtype, so both compute with identical numbers."""
    sizes = [layers[0][0].shape[0]] + [weight.shape[1] for weight, _ in layers]
    model = DenseNet(sizes, dtype=torch.from_numpy(layers[0][0]).dtype)
    with torch.no_grad():  # copying into a parameter is not a step to differentiate
        for (weight, bias), weight_parameter, bias_parameter in zip(
                layers, model.weights, model.biases):
            weight_parameter.copy_(torch.from_numpy(weight))
            bias_parameter.copy_(torch.from_numpy(bias))
    return model


# %% [markdown]
# ### The same network from PyTorch's parts
#
# Nobody writes `x @ W + b` by hand in PyTorch: `nn.Linear(inputs, outputs)` is that
# layer, `nn.ReLU()` the bend, and `nn.Sequential` runs modules one after another.
# One detail: `nn.Linear` stores its weight as (outputs, inputs) and computes
# `x @ weight.T + bias`, the transpose of our convention, so copying our weights in
# means transposing them. Its default initialisation also differs (uniform, scaled by
# `1 / sqrt(inputs)`); with copied weights the two networks agree exactly.

# %%
def sequential_from_layers(layers):
    """The same network as `dense_net_from_layers`, built from nn.Linear and nn.ReLU."""
    modules = []
    for index, (weight, bias) in enumerate(layers):
        linear = nn.Linear(*weight.shape, dtype=torch.from_numpy(weight).dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight.T))
            linear.bias.copy_(torch.from_numpy(bias[0]))
        modules.append(linear)
        if index < len(layers) - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


# %% [markdown]
# ## The proof: same weights, same predictions, same gradients
#
# We take a numpy network from `init_dense`, copy it into PyTorch, run both on the
# same rows, and compare. In numpy the gradients come from chapter 03's hand-written
# `dense_backward`; in PyTorch from autograd on `nn.functional.mse_loss`, which is
# chapter 03's `mse`. In float64 both follow the same arithmetic, so the differences
# should be rounding noise, around 1e-12 and far below 1e-6.

# %%
def gradients_as_layers(model):
    """The gradients left in `model` by `backward()`, as chapter 03's list of
    (weight_grad, bias_grad) numpy pairs. An nn.Linear stores its weight transposed,
    and its bias as a vector, so those are turned back into our shapes."""
    if isinstance(model, DenseNet):
        return [(weight.grad.numpy(), bias.grad.numpy())
                for weight, bias in zip(model.weights, model.biases)]
    return [(module.weight.grad.numpy().T, module.bias.grad.numpy()[None, :])
            for module in model if isinstance(module, nn.Linear)]


def compare_dense(layers, inputs, targets, model=None):
    """Run numpy `layers` and a PyTorch copy (`model`, by default a DenseNet) on the
    same rows. Returns (largest prediction difference, largest gradient difference)."""
    predictions, cache = dense_forward(layers, inputs)
    gradients = dense_backward(layers, cache, mse_grad(predictions, targets))
    model = dense_net_from_layers(layers) if model is None else model
    torch_predictions = model(torch.from_numpy(inputs))
    loss = nn.functional.mse_loss(torch_predictions, torch.from_numpy(targets))
    model.zero_grad()
    loss.backward()
    prediction_gap = float(np.abs(torch_predictions.detach().numpy() - predictions).max())
    gradient_gap = max(float(np.abs(by_torch - by_hand).max())
                       for torch_pair, hand_pair in zip(gradients_as_layers(model), gradients)
                       for by_torch, by_hand in zip(torch_pair, hand_pair))
    return prediction_gap, gradient_gap


if __name__ == "__main__":
    # The same network in numpy and in PyTorch, on 64 training rows: chapter 03's
    # weights, copied into our DenseNet and into an nn.Sequential of nn.Linear layers.
    # Everything here is float64, so any difference beyond ~1e-12 would be a bug.
    layer_sizes = [3, *ARGS.hidden_sizes, 1]
    layers = start_from_mean(init_dense(layer_sizes, rng), train_targets)
    prediction_gap, gradient_gap = compare_dense(layers, train_inputs[:64], train_targets[:64])
    sequential_gaps = compare_dense(layers, train_inputs[:64], train_targets[:64],
                                    sequential_from_layers(layers))
    print(f"\ndense network {layer_sizes}, numpy against PyTorch (float64, same weights):")
    print(f"  DenseNet:      predictions differ by {prediction_gap:.1e}, "
          f"gradients by {gradient_gap:.1e}")
    print(f"  nn.Sequential: predictions differ by {sequential_gaps[0]:.1e}, "
          f"gradients by {sequential_gaps[1]:.1e}")
    figures.update(prediction_gap=float(f"{prediction_gap:.1e}"),
                   gradient_gap=float(f"{gradient_gap:.1e}"))


# %% [markdown]
# ## Chapter 05's recurrent network in PyTorch
#
# The recurrent network is a module too. Its parameters carry the names of chapter
# 05's dict (`input_weight`, `hidden_weight`, ...), so the module's `state_dict`, a
# dict from names to tensors, has the same keys as the numpy network, and copying
# one into the other is a single `load_state_dict`. The `forward` is `rnn_forward`
# without the cache: the Python loop over the days stays, and autograd records one
# node per step, which is backpropagation through time for free.
#
# PyTorch also has the layer ready-made: `nn.RNN` runs the same tanh recurrence in
# one call, with a fused, faster loop. It stores `W_x` and `W_h` transposed
# (`weight_ih_l0`, `weight_hh_l0`) and has two biases (`bias_ih_l0 + bias_hh_l0` play
# the part of our one `b`), so copying our weights in means transposing and splitting.
# `batch_first=True` makes it read (batch, steps, features), our layout.

# %%
class RecurrentNet(nn.Module):
    """Chapter 05's recurrent network as an nn.Module, its parameters named as in
    `init_rnn`."""

    def __init__(self, input_size, hidden_size, dtype=torch.float32):
        super().__init__()
        # The initialisation of init_rnn: standard deviation 1 / sqrt(inputs).
        def drawn(inputs, outputs):
            return nn.Parameter(torch.randn(inputs, outputs, dtype=dtype) / np.sqrt(inputs))
        self.input_weight = drawn(input_size, hidden_size)
        self.hidden_weight = drawn(hidden_size, hidden_size)
        self.hidden_bias = nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.output_weight = drawn(hidden_size, 1)
        self.output_bias = nn.Parameter(torch.zeros(1, 1, dtype=dtype))

    def forward(self, sequences):
        # As rnn_forward: the input part of every day in one product, then the loop.
        input_part = sequences @ self.input_weight + self.hidden_bias
        # The first hidden state is zeros, made on the inputs' device and in their
        # dtype: a tensor made without them would be float32 on the CPU.
        hidden = torch.zeros(sequences.shape[0], self.hidden_weight.shape[0],
                             dtype=sequences.dtype, device=sequences.device)
        for step in range(sequences.shape[1]):
            hidden = torch.tanh(input_part[:, step] + hidden @ self.hidden_weight)
        return hidden @ self.output_weight + self.output_bias


class BuiltinRecurrentNet(nn.Module):
    """The same network from PyTorch's parts: nn.RNN and an nn.Linear read-out."""

    def __init__(self, input_size, hidden_size, dtype=torch.float32):
        super().__init__()
        self.rnn = nn.RNN(input_size, hidden_size, batch_first=True, dtype=dtype)
        self.readout = nn.Linear(hidden_size, 1, dtype=dtype)

    def forward(self, sequences):
        _, last_hidden = self.rnn(sequences)   # (layers = 1, batch, hidden_size)
        return self.readout(last_hidden[0])


def recurrent_nets_from_params(params):
    """Both PyTorch versions of chapter 05's numpy network `params`, holding copies of
    its weights: (RecurrentNet, BuiltinRecurrentNet)."""
    input_size, hidden_size = params["input_weight"].shape
    dtype = torch.from_numpy(params["input_weight"]).dtype
    ours = RecurrentNet(input_size, hidden_size, dtype)
    ours.load_state_dict({name: torch.from_numpy(array) for name, array in params.items()})
    builtin = BuiltinRecurrentNet(input_size, hidden_size, dtype)
    builtin.load_state_dict({
        "rnn.weight_ih_l0": torch.from_numpy(params["input_weight"].T),
        "rnn.weight_hh_l0": torch.from_numpy(params["hidden_weight"].T),
        "rnn.bias_ih_l0": torch.from_numpy(params["hidden_bias"][0]),
        "rnn.bias_hh_l0": torch.zeros(hidden_size, dtype=dtype),
        "readout.weight": torch.from_numpy(params["output_weight"].T),
        "readout.bias": torch.from_numpy(params["output_bias"][0]),
    })
    return ours, builtin


def compare_recurrent(params, sequences, targets):
    """Run chapter 05's numpy network and both PyTorch copies on the same windows.
    Returns (largest prediction difference of RecurrentNet, largest gradient difference
    of RecurrentNet, largest prediction difference of nn.RNN), all against numpy."""
    predictions, cache = rnn_forward(params, sequences)
    gradients = rnn_backward(params, cache, mse_grad(predictions, targets))
    ours, builtin = recurrent_nets_from_params(params)
    torch_predictions = ours(torch.from_numpy(sequences))
    nn.functional.mse_loss(torch_predictions, torch.from_numpy(targets)).backward()
    prediction_gap = float(np.abs(torch_predictions.detach().numpy() - predictions).max())
    gradient_gap = max(float(np.abs(parameter.grad.numpy() - gradients[name]).max())
                       for name, parameter in ours.named_parameters())
    with torch.no_grad():
        builtin_predictions = builtin(torch.from_numpy(sequences)).numpy()
    return prediction_gap, gradient_gap, float(np.abs(builtin_predictions - predictions).max())


if __name__ == "__main__":
    # The recurrent network: windows of days, split in time order and standardised
    # with the training windows' statistics, then the same three-way comparison.
    sequences, sequence_targets = make_sequences(table, ARGS.window)
    (train_windows, train_window_targets), (valid_windows, valid_window_targets), \
        (test_windows, test_window_targets) = split_data(sequences, sequence_targets)
    train_windows, valid_windows, test_windows = standardise(train_windows, valid_windows,
                                                             test_windows)
    params = init_rnn(3, ARGS.hidden_size, rng)
    params["output_bias"] += train_window_targets.mean()  # start from the mean, as 03
    rnn_gaps = compare_recurrent(params, train_windows[:64], train_window_targets[:64])
    print(f"recurrent network over {ARGS.window} days, {ARGS.hidden_size} hidden units, "
          f"numpy against PyTorch (float64):")
    print(f"  RecurrentNet: predictions differ by {rnn_gaps[0]:.1e}, gradients by "
          f"{rnn_gaps[1]:.1e}; nn.RNN: predictions differ by {rnn_gaps[2]:.1e}")
    figures["rnn_gradient_gap"] = float(f"{rnn_gaps[1]:.1e}")


# %% [markdown]
# ## Dataset, Sampler and DataLoader
#
# Chapter 03's `train` shuffles the row numbers each epoch and slices mini-batches
# itself. PyTorch splits that job in three:
#
# * a **`Dataset`** says how many examples there are (`__len__`) and hands out one by
#   its number (`__getitem__`): here a day's features and its target, or a window of
#   days and its target. It could just as well read images from disk on demand.
# * a **`Sampler`** decides the order of the example numbers. `shuffle=True` uses a
#   random one; below we also write our own that draws exactly the permutation chapter
#   03's `train` draws, from the same numpy generator, to replay its batches.
# * a **`DataLoader`** pulls `batch_size` examples in the sampler's order and stacks
#   them into batch tensors (its `collate` step). With `num_workers > 0` it would load
#   batches in background processes while the model trains, which matters when
#   examples come from disk; for a table already in memory it would only add overhead.
#
# The split pays off as data grows: the same training loop works whether the
# examples are rows of a table, windows of days (below), images on disk or, in
# chapter 09, tokens streamed from shards; only the `Dataset` changes. The last
# batch of an epoch is smaller when the rows do not divide evenly, exactly as in
# chapter 03's loop (`drop_last=True` would skip it).

# %%
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


class NumpyShuffle(Sampler):
    """Each epoch, the order `rng.permutation(rows)`: the batches of chapter 03's
    `train` when given a generator in the same state."""

    def __init__(self, rows, rng):
        self.rows = rows
        self.rng = rng

    def __len__(self):
        return self.rows

    def __iter__(self):
        return iter(self.rng.permutation(self.rows).tolist())


# %% [markdown]
# ## Training with torch.optim, and train and eval modes
#
# An optimiser from `torch.optim` is given the model's parameters once, and then each
# step is three lines, always in this order:
#
#     optimizer.zero_grad()    # forget the last step's gradients (they accumulate)
#     loss.backward()          # autograd fills every parameter's .grad
#     optimizer.step()         # SGD: parameter -= learning_rate * parameter.grad
#
# `torch.optim.SGD` is chapter 03's update; `torch.optim.Adam` keeps running averages
# of each gradient and of its square and divides one by the root of the other, as
# chapter 06's Adam did, so every parameter gets a step of a sensible size.
#
# `model.train()` and `model.eval()` switch a module's **mode**. Our networks behave
# the same in both, but some layers do not: dropout (chapter 08) drops units only
# while training, and batch normalisation uses batch statistics while training and
# running averages when evaluating. Calling them in the right place from the start
# costs nothing and avoids a classic bug. Evaluation also runs under
# `torch.no_grad()`, so no graph is recorded.
#
# After each epoch the loop records what chapter 03's `train` records: the MSE over
# all training rows and the validation MAE, so the two histories can be compared
# epoch by epoch.

# %%
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


def train_torch(model, loader, optimizer, epochs, train_set, valid_set, device):
    """Train `model` with batches from `loader` and `optimizer`. Returns the history:
    one (train_mse, valid_mae) pair per epoch, as chapter 03's `train`."""
    history = []
    for _ in range(epochs):
        model.train()  # predict() below switches to eval mode; switch back each epoch
        # exercise: for every batch: the loss, zero the gradients, backward, an optimiser step
        for inputs, targets in loader:
            # The loader gives CPU tensors; the model may live on a GPU.
            inputs, targets = inputs.to(device), targets.to(device)
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        # end exercise
        history.append((mse(predict(model, train_set[0], device), train_set[1]),
                        mae(predict(model, valid_set[0], device), valid_set[1])))
        if diverged(history[-1][0]):
            break  # more steps cannot bring it back, as in chapter 03
    return history


if __name__ == "__main__":
    # Training: chapter 03's numpy loop, then the same batches replayed in PyTorch.
    # Both start from the same weights and draw their batch order from generators in
    # the same state, so if the two libraries compute the same thing, the two runs
    # follow the same path and end at the same test MAE.
    print(f"\ntraining {layer_sizes} for {ARGS.epochs} epochs, SGD at learning rate "
          f"{ARGS.learning_rate:g}, batches of {ARGS.batch_size}:")
    clock = time.perf_counter()
    trained_layers, numpy_history = train(layers, train_set, valid_set, ARGS.learning_rate,
                                          ARGS.epochs, ARGS.batch_size,
                                          np.random.default_rng(ARGS.seed))
    numpy_seconds = time.perf_counter() - clock
    numpy_mae = evaluate(trained_layers, test_inputs, test_targets)
    print(f"  numpy (chapter 03's train):       test MAE {numpy_mae:.4f} °F "
          f"({numpy_seconds:.1f} s)")
    model = dense_net_from_layers(layers).to(device)
    loader = DataLoader(WeatherDataset(*train_set, dtype=torch.float64),
                        batch_size=ARGS.batch_size,
                        sampler=NumpyShuffle(len(train_inputs), np.random.default_rng(ARGS.seed)))
    clock = time.perf_counter()
    sgd_history = train_torch(model, loader, torch.optim.SGD(model.parameters(),
                                                             lr=ARGS.learning_rate),
                              ARGS.epochs, train_set, valid_set, device)
    sgd_seconds = time.perf_counter() - clock
    sgd_mae = mae(predict(model, test_inputs, device), test_targets)
    print(f"  PyTorch SGD, same batches:        test MAE {sgd_mae:.4f} °F "
          f"({sgd_seconds:.1f} s); difference {abs(sgd_mae - numpy_mae):.1e} °F")
    if diverged(numpy_history[-1][0]):
        raise DataError(f"training diverged at learning rate {ARGS.learning_rate:g}; "
                        f"try a smaller --learning-rate")
    figures.update(numpy_test_mae=round(numpy_mae, 4), torch_test_mae=round(sgd_mae, 4))

# %% [markdown]
# On the real weather table (`--data` pointing at a copy of it) the default run
# prints, among other lines:
#
#     DenseNet:      predictions differ by 1.4e-14, gradients by 1.4e-14
#     RecurrentNet: predictions differ by 1.4e-14, gradients by 5.3e-15; nn.RNN: ... 0.0e+00
#     numpy (chapter 03's train):       test MAE 3.4197 °F
#     PyTorch SGD, same batches:        test MAE 3.4197 °F; difference 0.0e+00 °F
#
# Same weights, same arithmetic: the differences are a few units in the 14th digit,
# the rounding of float64, and 8,880 steps of training later the two test MAEs
# still agree to every printed digit. Everything chapters 03 to 06 built by hand is
# what PyTorch computes.
#
# ### PyTorch's own way: float32, a shuffled DataLoader and Adam
#
# The replay above copied chapter 03's habits. Written the way PyTorch code usually
# is, the same network trains in float32, from `DenseNet`'s own He initialisation
# drawn from torch's seeded generator, with a `DataLoader` that shuffles through its
# own seeded generator (so the run repeats exactly) and with Adam. On the real table
# it lands in the same place by its own path (`test MAE 3.4223 °F`; least squares
# scores 3.45 °F and "tomorrow = today" 3.60 on these test days).
#
# Float32 carries about 7 significant digits, so this run can no longer match numpy
# to the 14th digit; it does not need to. The rounding of each step is far smaller
# than the noise of choosing mini-batches, and what counts is where training ends,
# which the test MAE measures. Halving the bytes of every number is what makes large
# models fit in memory and run fast on a GPU.

# %%
if __name__ == "__main__":
    adam_model = DenseNet(layer_sizes).to(device)
    with torch.no_grad():
        adam_model.biases[-1] += float(train_targets.mean())  # start from the mean, as 03
    adam_loader = DataLoader(WeatherDataset(*train_set), batch_size=ARGS.batch_size,
                             shuffle=True,
                             generator=torch.Generator().manual_seed(ARGS.seed))
    clock = time.perf_counter()
    adam_history = train_torch(adam_model, adam_loader,
                               torch.optim.Adam(adam_model.parameters(), lr=1e-3),
                               ARGS.epochs, train_set, valid_set, device)
    adam_mae = mae(predict(adam_model, test_inputs, device), test_targets)
    print(f"  PyTorch Adam, float32, shuffled:  test MAE {adam_mae:.4f} °F "
          f"({time.perf_counter() - clock:.1f} s)")
    figures["adam_test_mae"] = round(adam_mae, 4)


# %% [markdown]
# ## Saving and loading weights
#
# A module's `state_dict()` is an ordered dict from parameter names to tensors: the
# weights and nothing else. That is what to save. `torch.save` writes it with Python's
# pickle format, and here two precautions make it safe:
#
# * **Atomic write.** We save into a temporary file beside the target and `os.replace`
#   it into place, as the weather download does: a crash or a full disk mid-write
#   leaves the old file intact, never half a new one.
# * **`torch.load(path, weights_only=True)`.** Unpickling an arbitrary file can run
#   arbitrary code, so a checkpoint downloaded from a stranger could take over your
#   machine. With `weights_only=True` PyTorch refuses everything but tensors and plain
#   containers. `map_location="cpu"` lets a checkpoint saved on a GPU load anywhere.
#
# Loading rebuilds the same architecture and fills it with `load_state_dict`, which
# checks that every name and shape matches. A missing, damaged or mismatched file is
# the learner's to fix, so it becomes a DataError with one sentence.

# %%
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


if __name__ == "__main__":
    # Save the Adam-trained weights, load them into a fresh network, compare. The
    # fresh network has other random weights until load_state_dict overwrites them,
    # so identical predictions prove that the file holds everything that matters.
    weights_path = os.path.join(ARGS.out, f"{CHAPTER}_dense.pt")
    save_weights(adam_model, weights_path)
    reloaded = load_weights(DenseNet(layer_sizes), weights_path).to(device)
    reload_gap = float(np.abs(predict(reloaded, test_inputs, device)
                              - predict(adam_model, test_inputs, device)).max())
    print(f"  saved to {weights_path} and loaded back (weights_only=True): "
          f"predictions differ by {reload_gap:.1e}")

# %% [markdown]
# The difference must be exactly zero, not merely small: the file stores every
# weight bit for bit, and the reloaded network runs the same operations on the same
# device, so any nonzero gap would mean a weight was lost or changed on the way.

# %% [markdown]
# ### The recurrent network, trained with nn.RNN
#
# The last network of the run is chapter 05's, as `nn.RNN` with Adam, starting from
# chapter 05's weights (in float32). It trains for a third as many epochs as the
# dense network, because each epoch does `window` times the work. On the real table
# the default run ends at a test MAE of 3.4737 °F after 10 epochs.
#
# Starting from chapter 05's weights rather than `nn.RNN`'s own initialisation keeps
# the comparison with chapter 05 honest: the only new things are the library, the
# float32 arithmetic and Adam. The training loop is the same `train_torch` as for
# the dense network, because it asks nothing of the model but `model(inputs)`.

# %%
if __name__ == "__main__":
    rnn_epochs = max(1, ARGS.epochs // 3)
    _, builtin = recurrent_nets_from_params(
        {name: array.astype(np.float32) for name, array in params.items()})
    builtin = builtin.to(device)
    rnn_loader = DataLoader(WeatherDataset(train_windows, train_window_targets),
                            batch_size=ARGS.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(ARGS.seed))
    clock = time.perf_counter()
    rnn_history = train_torch(builtin, rnn_loader,
                              torch.optim.Adam(builtin.parameters(), lr=3e-3), rnn_epochs,
                              (train_windows, train_window_targets),
                              (valid_windows, valid_window_targets), device)
    rnn_mae = mae(predict(builtin, test_windows, device), test_window_targets)
    print(f"recurrent network (nn.RNN) for {rnn_epochs} epochs with Adam: test MAE "
          f"{rnn_mae:.4f} °F ({time.perf_counter() - clock:.1f} s)")
    figures.update(rnn_test_mae=round(rnn_mae, 4), reload_gap=float(f"{reload_gap:.1e}"))
    # Every network of this chapter beside the yardsticks (the recurrent network's test
    # windows end on the same last 15% of days).
    print("test MAE, lower is better:")
    for name, value in (("'tomorrow = today'", persistence_mae),
                        ("least squares", closed_form_mae),
                        ("dense, SGD", sgd_mae), ("dense, Adam", adam_mae),
                        ("nn.RNN, Adam", rnn_mae)):
        print(f"  {name:<20} {value:.2f} °F")


# %% [markdown]
# ## Speed: numpy against PyTorch, CPU against GPU
#
# We time one training step (forward, backward and an SGD update) of a dense
# network, three ways: chapter 03's numpy code, PyTorch on the CPU, and PyTorch on
# the GPU when there is one, at two sizes. On a small network most of a step is
# bookkeeping, and numpy's thin layer over the arithmetic can beat PyTorch, which
# records a graph and dispatches each operation through several layers of C++. On a
# large network the matrix products dominate and PyTorch's multi-threaded kernels
# take over; a GPU, with thousands of arithmetic units, goes much further.
#
# GPU work is *asynchronous*: a call returns as soon as the work is queued. Timing
# it honestly means waiting for the GPU to finish (`torch.cuda.synchronize()`)
# before reading the clock, and a few warm-up steps first (the first calls load
# kernels and allocate memory).
#
# **Threads.** PyTorch can split one large operation across several CPU cores
# (`torch.set_num_threads`). For the small matrices of our networks the
# coordination costs more than it saves, and on a machine busy with other programs
# extra threads can slow a run several times over, so this chapter uses one thread
# unless `--threads` asks for more. Try `--threads 2` and compare the large
# network's time: that is where more cores pay.
#
# Read the numbers as orders of magnitude, not as a contest: they depend on the
# machine, its load, and the libraries numpy and PyTorch were built with.

# %%
def time_step(step, repeats, device=None):
    """Milliseconds per call of `step()`, after three warm-up calls."""
    for _ in range(3):
        step()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / repeats


def benchmark(layer_sizes, batch_size, repeats, devices, rng, learning_rate=1e-3):
    """Milliseconds per training step of a dense network with `layer_sizes` on a batch
    of `batch_size` random rows: a dict from "numpy" and each device ("cpu", "cuda")
    to the time, all in float32."""
    inputs = rng.normal(size=(batch_size, layer_sizes[0])).astype(np.float32)
    targets = rng.normal(size=(batch_size, 1)).astype(np.float32)
    layers = [(weight.astype(np.float32), bias.astype(np.float32))
              for weight, bias in init_dense(layer_sizes, rng)]

    def numpy_step():
        nonlocal layers
        predictions, cache = dense_forward(layers, inputs)
        gradients = dense_backward(layers, cache, mse_grad(predictions, targets))
        layers = [(weight - learning_rate * weight_grad, bias - learning_rate * bias_grad)
                  for (weight, bias), (weight_grad, bias_grad) in zip(layers, gradients)]

    # Each library gets the same weights, the same batch and the same update rule;
    # only who does the arithmetic differs.
    timings = {"numpy": time_step(numpy_step, repeats)}
    for device in devices:
        model = dense_net_from_layers(layers).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
        batch = torch.from_numpy(inputs).to(device)
        truth = torch.from_numpy(targets).to(device)

        def torch_step():
            loss = nn.functional.mse_loss(model(batch), truth)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        timings[device.type] = time_step(torch_step, repeats, device)
    return timings


if __name__ == "__main__":
    # Speed of one training step: the course's small network, and a large one.
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if device.type == "cuda" else [])
    print("\nmilliseconds per training step (forward, backward, SGD update; float32):")
    for label, sizes, batch_size, repeats in (
            ("small", layer_sizes, ARGS.batch_size, 50 if ARGS.quick else 300),
            ("large", [3, 256, 256, 1] if ARGS.quick else [3, 512, 512, 1],
             1024 if ARGS.quick else 2048, 2 if ARGS.quick else 10)):
        timings = benchmark(sizes, batch_size, repeats, devices, rng)
        print(f"  {label} {sizes}, batch {batch_size}: " + ", ".join(
            f"{name} {milliseconds:.2f} ms" for name, milliseconds in timings.items()))
        figures.update({f"{name}_ms_{label}": round(milliseconds, 3)
                        for name, milliseconds in timings.items()})

# %% [markdown]
# The speed lines depend on the machine, but their shape does not: for the small
# network numpy's step is several times faster than PyTorch's (PyTorch's bookkeeping
# per operation costs more than the arithmetic of a 32 x 32 matrix); for the large
# one PyTorch is several times faster than numpy even on one thread, and a GPU,
# where there is one, is usually faster again by a wide margin. Deep learning lives
# at the large end, which is why from here on the course uses PyTorch.
#
# ## The curves, and the summary
#
# The picture of the three dense runs (drawn by the plotting helper of the set-up),
# then the summary line with the run's headline figures.
#
# What to look for: the replayed PyTorch curve hides the numpy curve exactly, epoch
# after epoch, because both runs take the same steps; Adam's curve follows a path
# of its own, since it scales each parameter's step by the running size of its
# gradient, and usually falls faster in the first epochs. Where the curves end is
# what the summary's test MAEs report.
#
# ### Exercises
# `python tools/exercises.py make 07_pytorch` cuts these out of a copy, and
# `python tools/exercises.py check 07_pytorch` grades it:
#
# * `DenseNet.forward`: the dense network's forward pass: linear layers with ReLU
#   between.
# * `train_torch`: for every batch: the loss, zero the gradients, backward, an
#   optimiser step.
#
# To think about: What goes wrong if the loop leaves out `optimizer.zero_grad()`? Why
# is numpy faster than PyTorch on the small network?
#
# Answers. PyTorch's `backward` adds into `.grad`, as chapter 06's engine does, so
# without zeroing each step would follow the sum of every gradient so far, and the
# replay would no longer match numpy. On a 32 x 32 network PyTorch's bookkeeping per
# operation costs more than the arithmetic; on the large one the arithmetic dominates
# and PyTorch wins.

# %%
if __name__ == "__main__":
    curves = {"numpy SGD": numpy_history, "PyTorch SGD (replay)": sgd_history,
              "PyTorch Adam": adam_history}
    for path in save_plots(ARGS.out, curves):
        print(f"saved {path}")
    print_summary({**figures, "seconds": round(time.perf_counter() - started, 1)})
