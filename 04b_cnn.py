"""Convolutional networks: reading handwritten digits with convolution and pooling.

Chapter 04 classified with a dense network: every input feature had its own weight
in every hidden unit. An image breaks that plan. A 28 x 28 digit is 784 numbers, and
a "7" shifted two pixels to the right lights up different pixels, so a dense layer
must learn every stroke again at every position. This optional chapter builds the
network that images call for, from scratch in numpy:

* **convolution**: one small filter of weights slides over the whole image, so a
  stroke detector learned in one place works everywhere; written first with plain
  loops, for clarity, then with **im2col** (image patches as rows of a matrix, so
  the work is one matrix multiply), for speed, and the two shown to agree;
* its **backward pass** by hand, checked against finite differences;
* **max pooling**, which keeps the strongest response in each 2 x 2 square;
* a convolutional network, conv -> ReLU -> pool twice, then chapter 04's dense
  layers, trained on handwritten digits (MNIST, or digits drawn by the chapter
  itself when offline), with a confusion matrix and a picture of the filters;
* the measurement behind the chapter's claim: chapter 04's dense network trained
  the same way on the same digits, and both networks tested on digits shifted by
  2 pixels, where in the default run the dense network loses three times as
  many points.

Run it with `python 04b_cnn.py` (about 30 seconds on an idle 2-core CPU; it reaches
about 99% on held-out generated digits, the dense network about 95%) or
`python 04b_cnn.py --quick` (a few seconds, about 93%). `--data PATH` reads a local folder with the four MNIST files;
`--help` lists every flag. In a notebook the chapter takes its flags from the
environment variable ZERO_TO_GPT_ARGS (e.g. `ZERO_TO_GPT_ARGS="--quick"`), and the
defaults otherwise.
"""
import argparse
import gzip
import hashlib
import json
import os
import shlex
import sys
import time
import urllib.request

import numpy as np

CHAPTER = "04b_cnn"
IMAGE_SIZE = 28        # MNIST images, and the generated ones, are 28 x 28
CLASSES = 10           # the digits 0 to 9



# %% [markdown]
# ## Why a dense network is the wrong tool for images
#
# Feed a 28 x 28 image to chapter 04's network and each of its 784 pixels gets its
# own weight in every hidden unit: 784 x 64 = 50,176 weights in the first layer
# alone. Worse, those weights know nothing of *where* a pixel is. A horizontal
# stroke at the top of the image and the same stroke two pixels lower touch
# different pixels, so the network must learn to recognise it separately at each
# position, from separate examples.
#
# Two facts about images suggest something better:
#
# 1. **Locality.** What a pixel means depends mostly on its neighbours: an edge, the
#    end of a stroke, a corner are all visible in a small square.
# 2. **Translation.** A stroke is a stroke wherever it is. The detector that works
#    at one place should work at every place.
#
# (The end of the chapter measures both claims: a dense network trained the same
# way, and both networks on digits moved by two pixels.)
#
# A **convolution** builds both in. It takes a small square of weights, a
# **filter** or **kernel** (5 x 5 here), lays it over the top-left corner of the
# image, multiplies each of the 25 pixels under it by its weight and adds them up
# (plus a bias): that sum is one output pixel. Then it slides the filter one pixel
# to the right and does it again, and so on over every position. The outputs form
# a new image, a **feature map**, that is bright wherever the image looks like the
# filter. A layer has several filters, each making its own feature map, and 25
# weights (and a bias) a filter, whatever the size of the image.
#
# In symbols, for image n, input channel c (1 for grey images; the feature maps of
# the layer below, later), filter f and output position (r, s):
#
#     out[n, f, r, s] = bias[f] + sum over c, i, j of
#                       image[n, c, r + i, s + j] * weight[f, c, i, j]
#
# with i and j running over the rows and columns of the kernel. The filter only
# fits where it lies wholly inside the image ("valid" convolution), so a 28 x 28
# image and a 5 x 5 kernel give 24 x 24 outputs: 28 - 5 + 1.
#
# (Mathematicians would call this a cross-correlation: a true convolution flips the
# kernel first. Deep-learning libraries all compute this version and call it a
# convolution; since the weights are learned, flipped or not makes no difference.)
#
# We store a batch of images as an array (images, channels, height, width) and a
# layer's weights as (filters, channels, kernel height, kernel width), the layout
# PyTorch uses, so we can check our results against it.

# %% [markdown]
# ## Convolution with loops
#
# First the definition, written as directly as possible: a loop over every image,
# filter and output position, each output one sum of an elementwise product. It is
# slow (four nested Python loops) but each line says what it does, and it is the
# reference that the fast version must match.

# %%
def conv_forward_loops(images, weight, bias):
    """Valid convolution (cross-correlation), stride 1, written with loops.
    images: (batch, channels, height, width); weight: (filters, channels, kernel_h,
    kernel_w); bias: (filters,). Returns (batch, filters, height - kernel_h + 1,
    width - kernel_w + 1)."""
    batch, _, height, width = images.shape
    filters, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = height - kernel_h + 1, width - kernel_w + 1
    outputs = np.zeros((batch, filters, out_h, out_w))
    for image in range(batch):
        for f in range(filters):
            for row in range(out_h):
                for column in range(out_w):
                    patch = images[image, :, row:row + kernel_h, column:column + kernel_w]
                    outputs[image, f, row, column] = np.sum(patch * weight[f]) + bias[f]
    return outputs



# %% [markdown]
# ## Convolution backward, by hand
#
# Let G = d loss / d out, an array shaped like the output. Each output is a sum of
# products, so, exactly as for a dense layer, the chain rule gives three gradients.
#
# **The filters.** weight[f, c, i, j] multiplies image[n, c, r + i, s + j] in output
# (n, f, r, s), for every image n and position (r, s). So
#
#     d loss / d weight[f, c, i, j] = sum over n, r, s of
#                                     G[n, f, r, s] * image[n, c, r + i, s + j]
#
# Every position the filter visited adds its patch, weighted by how much the loss
# cares about the output there. This is the dense layer's `inputs.T @ grad`, summed
# over positions as well as images: the price, and the point, of sharing weights.
#
# **The biases.** bias[f] is added to every output of filter f, so its gradient is
# G[:, f] summed over images and positions.
#
# **The input**, needed by the layer below. Pixel image[n, c, y, x] is under kernel
# entry (i, j) when the filter sits at (r, s) = (y - i, x - j), if that position
# exists. So
#
#     d loss / d image[n, c, y, x] = sum over f, i, j of
#                                    G[n, f, y - i, x - j] * weight[f, c, i, j]
#
# Read as a loop: every output position sends its gradient back, weighted by the
# filter, to the patch of input it was computed from; where patches overlap the
# contributions add up. (Written as a formula it is the convolution of G, padded by
# kernel - 1 zeros all round, with the filter turned 180 degrees: the backward pass
# of a convolution is itself a convolution.)

# %%
def conv_backward_loops(images, weight, output_grad):
    """Gradients of a loss through `conv_forward_loops`: given the layer's input
    images, its weight and output_grad = d loss / d outputs, return (images_grad,
    weight_grad, bias_grad), each shaped like what it is the gradient of."""
    batch, _, _, _ = images.shape
    filters, _, kernel_h, kernel_w = weight.shape
    _, _, out_h, out_w = output_grad.shape
    images_grad = np.zeros(images.shape)
    weight_grad = np.zeros(weight.shape)
    bias_grad = np.zeros(filters)
    for image in range(batch):
        for f in range(filters):
            for row in range(out_h):
                for column in range(out_w):
                    grad = output_grad[image, f, row, column]
                    window = (image, slice(None), slice(row, row + kernel_h),
                              slice(column, column + kernel_w))
                    weight_grad[f] += grad * images[window]
                    images_grad[window] += grad * weight[f]
                    bias_grad[f] += grad
    return images_grad, weight_grad, bias_grad



# %% [markdown]
# ## im2col: a convolution as one matrix multiply
#
# The loops above run their innermost line about 56 million times for one forward
# pass of our network over 10,000 digits (8 filters x 576 positions a digit in the
# first layer, 16 x 64 in the second): at a couple of microseconds a time, minutes
# for what should take a second. Python is slow at steps and fast at big array
# operations, so we rearrange the work into one matrix multiply.
#
# Look again at one output: the patch under the filter, flattened to a row of
# channels x kernel_h x kernel_w numbers, dotted with the filter flattened the same
# way. So copy every patch of every image into one row of a matrix, `cols`, of
# shape (batch x out_h x out_w, channels x kernel_h x kernel_w): "image to
# columns", **im2col**. Flatten the weights to a matrix of shape (filters,
# channels x kernel_h x kernel_w). Then
#
#     outputs = cols @ weight_matrix.T + bias     one row a position, one column a filter
#
# and a reshape puts the numbers back into feature maps. The price is memory: each
# pixel is copied into up to kernel_h x kernel_w rows. For our small images that is
# a few megabytes a batch, a bargain for a speed-up of several hundred times.
#
# numpy's `sliding_window_view` does the copying: it shows every kernel-sized
# window of the images as extra axes without copying anything, and the reshape to
# a matrix makes the one copy.
#
# **Backward** becomes chapter 03's dense layer, since the forward pass now *is* a
# dense layer applied to the rows of `cols`:
#
#     d loss / d weight_matrix = G_rows.T @ cols           (filters, patch size)
#     d loss / d bias          = G_rows summed over rows
#     d loss / d cols          = G_rows @ weight_matrix     (rows, patch size)
#
# where G_rows is the output gradient laid out like the output of the multiply. The
# last one is the gradient of every copied pixel; a pixel copied into several rows
# gets the sum of its copies' gradients ("col2im"). We add them back one kernel
# offset (i, j) at a time: kernel_h x kernel_w whole-array additions instead of a
# loop over positions.

# %%
def im2col(images, kernel_h, kernel_w):
    """Every kernel_h x kernel_w patch of `images` (batch, channels, height, width) as
    one row: shape (batch * out_h * out_w, channels * kernel_h * kernel_w), rows in
    the order (image, row, column), entries in the order (channel, i, j)."""
    batch, channels, height, width = images.shape
    windows = np.lib.stride_tricks.sliding_window_view(images, (kernel_h, kernel_w),
                                                       axis=(2, 3))
    # windows: (batch, channels, out_h, out_w, kernel_h, kernel_w), a view.
    out_h, out_w = height - kernel_h + 1, width - kernel_w + 1
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(
        batch * out_h * out_w, channels * kernel_h * kernel_w)


def conv_forward(images, weight, bias):
    """The same convolution as `conv_forward_loops`, as one matrix multiply."""
    batch, _, height, width = images.shape
    filters, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = height - kernel_h + 1, width - kernel_w + 1
    # exercise: the convolution as one matrix multiply of im2col patches by the filters
    outputs = im2col(images, kernel_h, kernel_w) @ weight.reshape(filters, -1).T + bias
    return outputs.reshape(batch, out_h, out_w, filters).transpose(0, 3, 1, 2)
    # end exercise


def conv_backward(images, weight, output_grad):
    """The same gradients as `conv_backward_loops`, with im2col: (images_grad,
    weight_grad, bias_grad)."""
    filters, channels, kernel_h, kernel_w = weight.shape
    batch, _, out_h, out_w = output_grad.shape
    # exercise: convolution's backward: weight and bias gradients, and col2im for the images
    grad_rows = output_grad.transpose(0, 2, 3, 1).reshape(-1, filters)
    weight_grad = (grad_rows.T @ im2col(images, kernel_h, kernel_w)).reshape(weight.shape)
    bias_grad = grad_rows.sum(axis=0)
    cols_grad = (grad_rows @ weight.reshape(filters, -1)).reshape(
        batch, out_h, out_w, channels, kernel_h, kernel_w)
    images_grad = np.zeros(images.shape)
    for i in range(kernel_h):          # col2im: each copy's gradient back to its pixel
        for j in range(kernel_w):
            images_grad[:, :, i:i + out_h, j:j + out_w] += \
                cols_grad[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return images_grad, weight_grad, bias_grad
    # end exercise



# %% [markdown]
# ## Set-up: flags, data and plots (not the lesson)
#
# The loops and im2col are written; to compare them, and later to train, the chapter
# needs digits. This section holds what a run needs but the chapter
# does not teach: the command line, the digits (downloaded and checked, read from
# their files, or drawn when offline) and the helpers that turn a bad input into one
# plain sentence instead of a traceback. In the notebook its code cells start folded.
#
# Every chapter shares this command line: `--seed` for repeatable runs, `--data` for a
# local copy of the data, `--quick` for a run of a few seconds (used by the tests) and
# `--out` for where files are written. Its last line of output is `summary:` and a
# line of JSON with the chapter's headline figures, so scripts and tests can read it.
#
# Here `--data` is a folder holding the four MNIST idx files. `--filters` and
# `--kernel-size` shape the convolutions, `--hidden-sizes` the dense head, and
# `--epochs`, `--learning-rate`, `--batch-size` and `--train-size` the training.
# Bad values are refused before any work starts, including a stack of convolutions
# that would shrink the 28 x 28 image to nothing: each layer's valid convolution
# takes `kernel - 1` rows and columns off, and its 2 x 2 pooling (below) halves what
# is left, which `conv_output_size` works out.

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
POOL_SIZE = 2


def conv_output_size(image_size, filters, kernel_size):
    """The height (and width) of the feature maps after every conv + pool layer."""
    size = image_size
    for _ in filters:
        size = (size - kernel_size + 1) // POOL_SIZE
    return size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--data", default=None,
                        help="folder holding the four MNIST idx files, .gz or unpacked "
                             "(default: download MNIST, else draw digits)")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds, for tests and a first look")
    parser.add_argument("--out", default="out", help="folder for plots (default out/)")
    parser.add_argument("--filters", type=int, nargs="+", default=[8, 16],
                        help="filters in each convolution layer (default: 8 16)")
    parser.add_argument("--kernel-size", type=int, default=5,
                        help="height and width of every filter (default 5)")
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[64],
                        help="units in each hidden layer of the dense head (default 64)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="passes over the training images (default 5, --quick 3)")
    parser.add_argument("--learning-rate", type=float, default=0.1,
                        help="step size of gradient descent (default 0.1)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per mini-batch (default 32)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="training images used (default 15000, --quick 2000)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 5
    if args.train_size is None:
        args.train_size = 2000 if args.quick else 15000
    for flag, value in (("--filters", min(args.filters)), ("--kernel-size", args.kernel_size),
                        ("--hidden-sizes", min(args.hidden_sizes)), ("--epochs", args.epochs),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise DataError(f"{flag} must be at least 1, not {value}")
    if args.seed < 0:
        raise DataError(f"--seed must be zero or positive, not {args.seed}")
    if args.train_size < CLASSES:
        raise DataError(f"--train-size must be at least {CLASSES}, one image a digit, "
                        f"not {args.train_size}")
    if conv_output_size(IMAGE_SIZE, args.filters, args.kernel_size) < 1:
        raise DataError(f"{len(args.filters)} convolution layers of kernel size "
                        f"{args.kernel_size}, each followed by {POOL_SIZE} x {POOL_SIZE} "
                        f"pooling, shrink a {IMAGE_SIZE} x {IMAGE_SIZE} image to nothing; "
                        f"use fewer --filters layers or a smaller --kernel-size")
    if not (args.learning_rate > 0 and np.isfinite(args.learning_rate)):
        raise DataError(f"--learning-rate must be a positive number, not {args.learning_rate}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DataError(f"--out {args.out} is a file; give a folder for the plots")
    return args


def print_summary(figures):
    """The chapter's last line: `summary: ` and its headline figures as JSON."""
    print("summary: " + json.dumps(figures))



# %% [markdown]
# ### The digits
#
# MNIST is the classic collection of handwritten digits: 60,000 training images and
# 10,000 test images, each 28 x 28 grey pixels from 0 (paper) to 255 (ink), written by
# different people for the two sets. It comes as four gzip-compressed files in the
# simple "idx" format: a 4-byte **magic number** that says what the file holds
# (2051 for images, 2049 for labels), the size of each dimension, then the raw bytes.
#
# The chapter downloads the four files once into `data/`, checks each against its
# recorded SHA-256 digest, and writes it to a temporary file renamed into place only
# when complete: the course's usual download, carried unchanged from chapter 04.
# Without a network it draws its own digits (below) and says so in one line.

# %% jupyter={"source_hidden": true}
MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"]
# The four files and their SHA-256 digests (the same files on both mirrors), as
# recorded identically by several independent projects that download them. Beyond
# the digest, `read_idx` below checks each file's magic number and length.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}


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



# %% [markdown]
# ### Drawing digits when offline
#
# Without MNIST the chapter draws its own handwriting. Each digit is a **glyph**: a
# few pen strokes, each a polyline (a list of points joined by straight lines) on a
# 1 x 1 square, x to the right and y downwards. Curves are arcs of ellipses cut into
# short straight pieces. Several digits have more than one common form (a 1 with or
# without its flag, a 4 open or closed at the top, a 7 with or without a bar), so
# each has a few variants.
#
# Every image then gets its own "hand", drawn at random from the seed:
#
# * a gentle wobble of the strokes (a smooth random displacement, so lines bend
#   instead of staying ruler-straight);
# * a random slant (shear), rotation, width and height, and a shift of up to two
#   pixels, as people write at different sizes and angles;
# * a random pen width, and anti-aliasing: a pixel's ink falls off smoothly over one
#   pixel at the edge of a stroke, as in a scanned digit;
# * a little noise.
#
# The strokes are placed so that the digit fills about 20 x 20 pixels in the middle
# of a 28 x 28 image, the layout of MNIST, and pixels are floats from 0 to 1 like
# MNIST's after dividing by 255. Classes are balanced: each digit is exactly a
# tenth of the images (when the count is a multiple of 10), in shuffled order.

# %% jupyter={"source_hidden": true}
def arc(centre_x, centre_y, radius_x, radius_y, start, end, pieces=12):
    """Points along an arc of an ellipse from angle `start` to `end` in degrees
    (0 is to the right, 90 downwards, since y grows downwards)."""
    angles = np.radians(np.linspace(start, end, pieces + 1))
    return np.stack([centre_x + radius_x * np.cos(angles),
                     centre_y + radius_y * np.sin(angles)], axis=1)


def line(*points):
    """A polyline through the given (x, y) points."""
    return np.array(points, dtype=float)


# Each digit: a list of variants; each variant: a list of strokes (polylines).
GLYPHS = [
    [[arc(0.5, 0.5, 0.3, 0.47, -90, 270, 14)]],                                    # 0
    [[line((0.5, 0.0), (0.5, 1.0))],                                               # 1
     [line((0.25, 0.25), (0.55, 0.0), (0.55, 1.0))],
     [line((0.3, 0.2), (0.55, 0.0), (0.55, 1.0)), line((0.3, 1.0), (0.8, 1.0))]],
    [[np.concatenate([arc(0.5, 0.28, 0.3, 0.28, 200, 380, 10),                     # 2
                      line((0.72, 0.5), (0.2, 1.0), (0.85, 1.0))])],
     [np.concatenate([arc(0.5, 0.3, 0.3, 0.3, 190, 360, 10),
                      arc(0.2, 0.3, 0.6, 0.7, 0, 90, 6)[1:],
                      line((0.85, 1.0))])]],
    [[arc(0.48, 0.26, 0.27, 0.25, 200, 450, 10), arc(0.48, 0.74, 0.3, 0.26, 270, 520, 10)]],
    [[line((0.68, 1.0), (0.68, 0.0), (0.12, 0.68), (0.88, 0.68))],                 # 4
     [line((0.3, 0.0), (0.15, 0.6), (0.85, 0.6)), line((0.68, 0.3), (0.68, 1.0))]],
    [[np.concatenate([line((0.8, 0.0), (0.3, 0.0), (0.25, 0.45)),                  # 5
                      arc(0.48, 0.7, 0.3, 0.3, -130, 150, 12)])]],
    [[np.concatenate([arc(0.62, 0.7, 0.42, 0.7, -80, -180, 8),                     # 6
                      arc(0.5, 0.72, 0.3, 0.28, 180, 540, 12)])]],
    [[line((0.15, 0.0), (0.85, 0.0), (0.4, 1.0))],                                 # 7
     [line((0.15, 0.0), (0.85, 0.0), (0.4, 1.0)), line((0.35, 0.5), (0.78, 0.5))]],
    [[arc(0.5, 0.25, 0.23, 0.25, 90, 450, 12), arc(0.5, 0.74, 0.29, 0.26, -90, 270, 12)]],
    [[arc(0.47, 0.3, 0.3, 0.3, 0, 360, 12), line((0.77, 0.3), (0.65, 1.0))],       # 9
     [np.concatenate([arc(0.47, 0.3, 0.3, 0.3, 0, 360, 12),
                      arc(0.27, 0.3, 0.5, 0.7, 0, 80, 6)[1:]])]],
]


def glyph_segments(strokes):
    """The straight pieces of a glyph's strokes, as (pieces, 2 ends, 2 coordinates)."""
    return np.concatenate([np.stack([stroke[:-1], stroke[1:]], axis=1) for stroke in strokes])


def render_segments(segments, half_widths, size=IMAGE_SIZE):
    """Anti-aliased images of line segments in pixel coordinates.

    segments: (images, pieces, 2, 2); half_widths: (images,). A pixel's ink is
    1 within half a pen width of the nearest segment and falls linearly to 0 over
    the next pixel: clip(half_width - distance + 0.5, 0, 1)."""
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float32)
    pixel_x, pixel_y = columns.reshape(1, -1, 1), rows.reshape(1, -1, 1)
    start_x, start_y = segments[:, None, :, 0, 0], segments[:, None, :, 0, 1]
    along_x = segments[:, None, :, 1, 0] - start_x          # (images, 1, pieces)
    along_y = segments[:, None, :, 1, 1] - start_y
    to_x, to_y = pixel_x - start_x, pixel_y - start_y       # (images, pixels, pieces)
    # The nearest point of a segment a -> b to pixel p is a + t (b - a), with t the
    # projection of p - a on b - a, clipped to [0, 1] so it stays on the segment.
    length_squared = np.maximum(along_x ** 2 + along_y ** 2, 1e-9)
    fraction = np.clip((to_x * along_x + to_y * along_y) / length_squared, 0.0, 1.0)
    gap_x, gap_y = to_x - fraction * along_x, to_y - fraction * along_y
    distance = np.sqrt((gap_x ** 2 + gap_y ** 2).min(axis=-1))   # (images, pixels)
    ink = np.clip(half_widths[:, None] - distance + 0.5, 0.0, 1.0)
    return ink.reshape(len(segments), size, size)


def generate_digits(count, seed=0, size=IMAGE_SIZE, chunk=64):
    """`count` handwritten-looking digits drawn from the glyphs: images (count, size,
    size) of floats in [0, 1] and labels (count,), the same for the same `seed`
    (anything np.random.default_rng accepts, e.g. (seed, 0) for training digits and
    (seed, 1) for a held-out set drawn independently)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % CLASSES)
    variants = np.array([rng.integers(len(GLYPHS[label])) for label in labels], dtype=np.int64)
    # One random hand per image, drawn up front so the result does not depend on the
    # order in which images are rendered.
    angle = np.radians(rng.uniform(-15, 15, count))
    slant = rng.uniform(-0.35, 0.2, count)
    scale = rng.uniform(0.7, 1.1, (count, 2))
    shift = rng.uniform(-2.0, 2.0, (count, 2))
    wobble = rng.normal(0.0, 0.05, (count, 2, 2))           # amplitude, per axis, 2 waves
    wobble_frequency = rng.uniform(0.5, 1.5, (count, 2, 2, 2))
    wobble_phase = rng.uniform(0, 2 * np.pi, (count, 2, 2))
    half_width = rng.uniform(0.7, 1.5, count)
    ink = rng.uniform(0.75, 1.0, count)
    noise = rng.normal(0.0, 0.04, (count, size, size))
    images = np.zeros((count, size, size))
    for label in range(CLASSES):
        for variant, strokes in enumerate(GLYPHS[label]):
            chosen = np.flatnonzero((labels == label) & (variants == variant))
            if len(chosen) == 0:
                continue
            template = glyph_segments(strokes) - 0.5             # centred on (0, 0)
            for begin in range(0, len(chosen), chunk):
                which = chosen[begin:begin + chunk]
                points = np.broadcast_to(template, (len(which), *template.shape)).copy()
                # The wobble: each coordinate moves by a sum of two slow sine waves
                # of the position, so neighbouring points move together.
                for wave in range(2):
                    phase = (points @ wobble_frequency[which, wave].transpose(0, 2, 1)[:, None]
                             ) * 2 * np.pi + wobble_phase[which, None, None, wave]
                    points += wobble[which, None, None, wave] * np.sin(phase)
                # Size, slant and rotation as one 2 x 2 matrix on every point; the
                # glyph's 1 x 1 square becomes about 20 x 20 pixels, as in MNIST.
                cos, sin = np.cos(angle[which]), np.sin(angle[which])
                rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
                shear = np.zeros((len(which), 2, 2))
                shear[:, 0, 0] = shear[:, 1, 1] = 1.0
                shear[:, 0, 1] = slant[which]
                transform = rotation @ shear * (scale[which, None, :] * 20.0)
                points = np.einsum("nij,nsej->nsei", transform, points)
                points += (size - 1) / 2 + shift[which, None, None, :]
                images[which] = ink[which, None, None] * render_segments(
                    points.astype(np.float32), half_width[which].astype(np.float32), size)
    images = np.clip(images + noise, 0.0, 1.0)
    return images, labels



# %% [markdown]
# ### Reading the idx files
#
# An idx file is easy to read and easy to get wrong, so `read_idx` checks everything
# it can: the magic number (a labels file given where an images file belongs is
# caught here), that the file is as long as its header promises, and, in
# `read_mnist`, that images and labels agree in number and the labels are digits.
# Every problem becomes a DataError naming the file, so a learner with a broken copy
# gets one sentence, not a traceback. `--data` may hold the files compressed
# (`.gz`, as downloaded) or already unpacked.

# %% jupyter={"source_hidden": true}
IDX_MAGIC = {"images": 2051, "labels": 2049}


def read_idx(path, kind):
    """The array stored in the idx file at `path` (gzip-compressed if its name ends in
    .gz): (count, rows, columns) uint8 for kind "images", (count,) for "labels"."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"digits file {path} cannot be read ({error}); replace it with "
                        f"a fresh copy of the MNIST file")
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != IDX_MAGIC[kind]:
        raise DataError(f"digits file {path} is not an idx file of {kind} (its magic "
                        f"number is {magic}, not {IDX_MAGIC[kind]})")
    dimensions = 3 if kind == "images" else 1
    header = 4 + 4 * dimensions
    shape = tuple(int.from_bytes(raw[4 + 4 * axis:8 + 4 * axis], "big")
                  for axis in range(dimensions))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"digits file {path} holds {len(raw) - header} bytes of data but "
                        f"its header promises {int(np.prod(shape))}; it is truncated or "
                        f"damaged")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_file(folder, name):
    """The path of MNIST file `name` in `folder`, compressed or not."""
    for candidate in (name, name[:-len(".gz")]):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise DataError(f"digits folder {folder} has no {name} (nor the unpacked "
                    f"{name[:-len('.gz')]}); it needs the four MNIST idx files")


def read_mnist(folder):
    """MNIST from the four idx files in `folder`, as (train_images, train_labels,
    test_images, test_labels): images float (count, 28, 28) scaled to [0, 1], labels
    int64."""
    if os.path.isfile(folder):
        raise DataError(f"--data {folder} is a file; give the folder that holds the four "
                        f"MNIST idx files")
    if not os.path.isdir(folder):
        raise DataError(f"digits folder {folder} does not exist; pass --data with a folder "
                        f"holding the four MNIST idx files")
    parts = []
    for images_name, labels_name in (("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                                     ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        images_path = find_idx_file(folder, images_name)
        images = read_idx(images_path, "images")
        labels = read_idx(find_idx_file(folder, labels_name), "labels")
        if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
            raise DataError(f"digits file {images_path} holds images of shape "
                            f"{images.shape[1:]} and {len(images)} of them for {len(labels)} "
                            f"labels; MNIST has one 28 x 28 image a label")
        if labels.max(initial=0) >= CLASSES or len(labels) == 0:
            raise DataError(f"digits labels in {folder} must be digits 0-9, one or more")
        parts += [images.astype(np.float64) / 255.0, labels.astype(np.int64)]
    return tuple(parts)


def load_digits(path=None, seed=0, train_count=15000, test_count=2000):
    """The digits as (train_images, train_labels, test_images, test_labels, source).
    `path` (from --data, a folder) wins; then MNIST downloaded into data/; then
    digits generated from the seed, announced in one line. The counts apply to
    generated digits only; MNIST comes whole."""
    if path:
        return (*read_mnist(path), path)
    folder = os.path.join("data", "mnist")
    for name, sha256 in MNIST_FILES.items():
        if not any(download(mirror + name, os.path.join(folder, name), sha256)
                   for mirror in MNIST_MIRRORS):
            print("note: could not download MNIST (offline?); using digits drawn by the "
                  "chapter instead", file=sys.stderr)
            return (*generate_digits(train_count, (seed, 0)),
                    *generate_digits(test_count, (seed, 1)), "generated")
    return (*read_mnist(folder), folder)



# %% [markdown]
# ## The digits, loaded
#
# A run starts with the data, so that a bad `--data` folder is reported before any
# work. Without `--data` the chapter uses MNIST when it can download it and draws
# its own digits otherwise; `--quick` keeps 2,000 training images and 500 held-out
# ones. The line below says which digits it got, and how many of each it trains on:
# with classes of about equal size, no digit is easy to score on just by being
# common.

# %%
if __name__ == "__main__":
    ARGS = chapter_args()
    started = time.perf_counter()
    figures = {"chapter": CHAPTER}
    rng = np.random.default_rng(ARGS.seed)
    test_count = 500 if ARGS.quick else 2000
    train_images, train_labels, test_images, test_labels, source = load_digits(
        ARGS.data, ARGS.seed, ARGS.train_size, test_count)
    if len(train_images) > ARGS.train_size:  # MNIST: a random subset of the 60,000
        keep = rng.permutation(len(train_images))[:ARGS.train_size]
        train_images, train_labels = train_images[keep], train_labels[keep]
    if ARGS.quick:
        test_images, test_labels = test_images[:test_count], test_labels[:test_count]
    train_images, test_images = train_images[:, None], test_images[:, None]  # 1 channel
    print(f"digits: {len(train_images)} training and {len(test_images)} held-out images "
          f"of {IMAGE_SIZE} x {IMAGE_SIZE} from {source}; training digits per class "
          f"{np.bincount(train_labels, minlength=CLASSES).tolist()}")
    figures.update(source=source, train_images=len(train_images),
                   test_images=len(test_images))



# %% [markdown]
# ## The two convolutions agree
#
# The loops are the definition and im2col is the fast rewrite, so the rewrite must
# give the same numbers. `check_convolutions` runs both, forward and all three
# gradients, on random images the size of a digit and a random layer shaped like
# the network's first, and times each.
#
# **Reading the result.** They agree to rounding error (about 1e-13): the same sums,
# added in a different order. And im2col is a hundred to a few hundred times faster
# (the figure varies with the machine), the difference between minutes and seconds
# for one pass over the digits.

# %%
def check_convolutions(rng, batch=2):
    """Loops against im2col on random images and a random layer shaped like the
    network's first: the largest difference of the outputs and of the three
    gradients, and the time each version took."""
    images = rng.random((batch, 1, IMAGE_SIZE, IMAGE_SIZE))
    weight, bias = rng.normal(size=(8, 1, 5, 5)), rng.normal(size=8)
    output_grad = rng.normal(size=(batch, 8, IMAGE_SIZE - 4, IMAGE_SIZE - 4))
    timings = []
    results = []
    for forward, backward in ((conv_forward_loops, conv_backward_loops),
                              (conv_forward, conv_backward)):
        began = time.perf_counter()
        results.append((forward(images, weight, bias), *backward(images, weight, output_grad)))
        timings.append(time.perf_counter() - began)
    difference = max(float(np.abs(loop - fast).max()) for loop, fast in zip(*results))
    return difference, timings


if __name__ == "__main__":
    difference, (loop_seconds, fast_seconds) = check_convolutions(rng)
    print(f"convolution, loops against im2col (forward and all three gradients): largest "
          f"difference {difference:.1e}; loops {1000 * loop_seconds:.0f} ms, im2col "
          f"{1000 * fast_seconds:.1f} ms, {loop_seconds / fast_seconds:.0f} times faster")
    figures["conv_difference"] = float(f"{difference:.1e}")



# %% [markdown]
# ## Max pooling
#
# A feature map says "this filter matched here" at every position. Its exact
# position rarely matters to the digit: a stroke one pixel to the left is the same
# stroke. **Max pooling** keeps only the strongest response in each 2 x 2 square,
# halving the height and width:
#
#     pooled[n, c, r, s] = max over i, j in {0, 1} of x[n, c, 2r + i, 2s + j]
#
# That quarters the numbers the next layer has to handle, makes the network
# tolerant of small shifts, and lets the next convolution's 5 x 5 filter see a
# region twice as wide of the original image. A row or column left over at an odd
# edge is dropped, as PyTorch's `max_pool2d` does by default.
#
# **Backward.** Within a square, the maximum moves one-for-one with the winning
# input and not at all with the other three (nudging a loser a little changes
# nothing). So each pooled gradient goes, whole, to the position that won its
# square, and the others get zero. Ties (common after a ReLU: a square of zeros) go
# to the first maximum in reading order, as in PyTorch; a tie of zeros gets no
# gradient through the ReLU anyway.

# %%
def pool_offsets(inputs, size):
    """For each offset (i, j) inside a size x size square, the view of `inputs`
    (batch, channels, height, width) holding the entry at that offset of every
    square: shape (batch, channels, height // size, width // size)."""
    out_h, out_w = inputs.shape[2] // size, inputs.shape[3] // size
    return [inputs[:, :, i:out_h * size:size, j:out_w * size:size]
            for i in range(size) for j in range(size)]


def max_pool_forward(inputs, size=2):
    """Max pooling over non-overlapping size x size squares: the largest of the
    size * size offset views, taken one view at a time."""
    offsets = pool_offsets(inputs, size)
    pooled = offsets[0].copy()
    for view in offsets[1:]:
        np.maximum(pooled, view, out=pooled)
    return pooled


def max_pool_backward(inputs, output_grad, size=2):
    """d loss / d inputs of `max_pool_forward(inputs, size)`, given d loss / d outputs:
    each output's gradient goes to its square's first maximum in reading order."""
    # exercise: each output's gradient goes to the first maximum of its square
    pooled = max_pool_forward(inputs, size)
    inputs_grad = np.zeros(inputs.shape)
    taken = np.zeros(pooled.shape, dtype=bool)       # squares whose winner is found
    for view, grad_view in zip(pool_offsets(inputs, size), pool_offsets(inputs_grad, size)):
        wins = (view == pooled) & ~taken
        grad_view[...] = np.where(wins, output_grad, 0.0)   # writes into inputs_grad
        taken |= wins
    return inputs_grad
    # end exercise



# %% [markdown]
# ## The head: chapter 04's dense network, carried
#
# The convolutions turn an image into a few hundred numbers that say which strokes
# appear where; chapter 04's dense network, whose code is carried here unchanged
# (folded; chapter 04 derives every line), turns those numbers into one logit a
# digit. In short: each layer computes `z = a @ W + b` and, except the last, bends it
# with `relu(z) = max(z, 0)`; weights start with He initialisation, standard
# deviation `sqrt(2 / inputs)`; the forward pass keeps each layer's input and
# pre-activation for the backward pass. The softmax turns the ten logits into
# probabilities, shifted by the largest logit so that `exp` never overflows; the
# cross-entropy against one-hot targets is `-log(p of the true class)`, and its
# gradient with respect to the logits is `(p - y) / rows`, prediction minus truth.
# `numerical_gradient` checks gradients by central differences,
# `(loss(w + h) - loss(w - h)) / (2 h)`, and `accuracy` is the share of images whose
# largest logit names the true digit (guessing scores 10%).
#
# The docstrings travel with the code, so `init_dense` still gives chapter 03's
# example, layer sizes [3, 32, 32, 1]: the weather network, three measurements of a
# day in, one temperature out. Here the head's sizes are [256, 64, 10]: the 16
# feature maps of 4 x 4 flattened into 256 numbers, 64 hidden units, ten logits,
# one a digit.

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


def accuracy(predicted_classes, true_classes):
    """The fraction of predictions that name the right class."""
    return float(np.mean(predicted_classes == true_classes))


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



# %% [markdown]
# ### The head hands its input gradient down
#
# The backward pass walks from the logits down through the layers. At layer k, given
# G = d loss / d a_k, it goes back through the ReLU (`G * (z_k > 0)`), into the
# weights (`a_{k-1}.T @ dz` and `dz` summed over the rows) and on to the layer's
# input (`dz @ W_k.T`), which is the next layer's G.
#
# In chapter 04 the network's inputs were data, so that last gradient, d loss /
# d inputs, was computed and thrown away. Here the inputs are the output of the
# convolutions, which have weights of their own to train: they need exactly that
# gradient. `with_input_grad=True` returns it (the same switch chapter 05 gives
# `rnn_backward`); called without it, the function is chapter 04's.

# %%
def dense_backward(layers, cache, output_grad, with_input_grad=False):
    """Backpropagation: given `cache` from `dense_forward` and `output_grad`, the
    loss's gradient with respect to the network's outputs, return one (weight_grad,
    bias_grad) pair per layer, in the order of `layers`; with `with_input_grad=True`,
    also d loss / d inputs, for a layer below the network (the convolutions)."""
    gradients = []
    grad = output_grad
    for index in reversed(range(len(layers))):
        weight, _ = layers[index]
        layer_inputs, pre_activation = cache[index]
        if index < len(layers) - 1:
            grad = grad * (pre_activation > 0)       # back through the ReLU
        gradients.append((layer_inputs.T @ grad, grad.sum(axis=0, keepdims=True)))
        grad = grad @ weight.T                       # on to the layer below
    if with_input_grad:
        return gradients[::-1], grad
    return gradients[::-1]



# %% [markdown]
# ## The convolutional network
#
# The network stacks the pieces:
#
#     image (1 x 28 x 28)
#       -> conv 5 x 5, 8 filters  -> ReLU -> max pool 2 x 2   (8 x 12 x 12)
#       -> conv 5 x 5, 16 filters -> ReLU -> max pool 2 x 2   (16 x 4 x 4)
#       -> flatten (256 numbers)
#       -> dense 256 -> 64 -> ReLU -> 10 logits               (chapter 04's head)
#       -> softmax cross-entropy
#
# The first layer's filters see 5 x 5 pixels and learn strokes and edges; the
# second layer's filters combine 8 feature maps over 5 x 5 pooled positions, about
# 14 x 14 pixels of the image, and learn parts of digits (a loop, a corner). The
# dense head decides which digit those parts make. The model is a pair: the list of
# convolution layers, each a (weight, bias), and the dense head's layers.
#
# Convolution weights start with He initialisation, like the dense layers: a
# filter's output sums channels x kernel_h x kernel_w products, its "inputs", so
# the weights get standard deviation sqrt(2 / (channels x kernel_h x kernel_w)).
#
# **Backward** runs the same steps in reverse, each with its own gradient from the
# sections above: the head (with the gradient of its input, reshaped back into
# feature maps), then for each convolution layer from the top: the pooling, the
# ReLU (the mask `pre_activation > 0`, as in the dense layers), the convolution.
#
# **Weights.** The two convolution layers hold 8 x 25 + 16 x 8 x 25 = 3,400
# weights; a dense first layer from 784 pixels to 64 units alone would hold
# 50,176. Sharing weights over positions is what makes the network small and
# what lets it recognise a stroke wherever it is.

# %%
def init_cnn(filters, kernel_size, hidden_sizes, rng, image_size=IMAGE_SIZE, channels=1):
    """A convolutional network: (conv_layers, head). conv_layers holds one (weight,
    bias) a layer, weight (filters, channels, kernel_size, kernel_size) with He
    initialisation and bias (filters,) zeros; head is `init_dense` for the flattened
    feature maps, hidden_sizes, and one output a class."""
    conv_layers = []
    for count in filters:
        fan_in = channels * kernel_size * kernel_size
        conv_layers.append((rng.normal(0.0, np.sqrt(2.0 / fan_in),
                                       size=(count, channels, kernel_size, kernel_size)),
                            np.zeros(count)))
        channels = count
    side = conv_output_size(image_size, filters, kernel_size)
    return conv_layers, init_dense([channels * side * side, *hidden_sizes, CLASSES], rng)


def cnn_forward(model, images):
    """Logits (batch, classes) for images (batch, channels, height, width), and the
    cache the backward pass needs."""
    conv_layers, head = model
    conv_cache = []
    activations = images
    for weight, bias in conv_layers:
        pre_activation = conv_forward(activations, weight, bias)
        rectified = relu(pre_activation)
        conv_cache.append((activations, pre_activation, rectified))
        activations = max_pool_forward(rectified, POOL_SIZE)
    logits, head_cache = dense_forward(head, activations.reshape(len(images), -1))
    return logits, (conv_cache, activations.shape, head_cache)


def cnn_backward(model, cache, output_grad):
    """Backpropagation through the whole network: given `cache` from `cnn_forward`
    and d loss / d logits, the gradients shaped like the model: (conv_grads,
    head_grads), each a list of (weight_grad, bias_grad)."""
    conv_layers, head = model
    conv_cache, pooled_shape, head_cache = cache
    head_grads, grad = dense_backward(head, head_cache, output_grad, with_input_grad=True)
    grad = grad.reshape(pooled_shape)                  # back into feature maps
    conv_grads = []
    for (weight, _), (layer_inputs, pre_activation, rectified) in zip(
            reversed(conv_layers), reversed(conv_cache)):
        grad = max_pool_backward(rectified, grad, POOL_SIZE)
        grad = grad * (pre_activation > 0)             # back through the ReLU
        grad, weight_grad, bias_grad = conv_backward(layer_inputs, weight, grad)
        conv_grads.append((weight_grad, bias_grad))
    return conv_grads[::-1], head_grads


def model_parameters(model):
    """Every weight and bias array of the model, convolutions first, in a flat list
    (the same order for a model and for its gradients)."""
    conv_layers, head = model
    return [array for layer in [*conv_layers, *head] for array in layer]


def cnn_gradient_error(model, images, targets):
    """The largest difference between backpropagated gradients of the cross-entropy
    and finite differences, over every parameter of the model, relative to the
    largest gradient."""
    logits, cache = cnn_forward(model, images)
    by_hand = model_parameters(cnn_backward(model, cache, cross_entropy_grad(logits, targets)))

    def loss_of():
        return cross_entropy(cnn_forward(model, images)[0], targets)

    worst, largest = 0.0, 1e-12
    for parameter, gradient in zip(model_parameters(model), by_hand):
        numeric = numerical_gradient(loss_of, parameter)
        worst = max(worst, float(np.abs(numeric - gradient).max()))
        largest = max(largest, float(np.abs(numeric).max()))
    return worst / largest



# %% [markdown]
# ### Checking the whole network's gradients
#
# A wrong gradient often still trains, just badly, so before training the chapter
# checks the whole chain of hand-written backward passes at once: the head, the
# pooling, the ReLUs and both convolutions, against finite differences of the
# cross-entropy. It uses a small network (2 and 3 filters of 3 x 3, a head of 5
# units) and three 12 x 12 images, so that nudging every weight twice stays cheap.
# They agree to about 1e-9 of the largest gradient: the backward passes are right.

# %%
if __name__ == "__main__":
    # A small network on small images, so that nudging every weight twice stays cheap.
    probe = init_cnn([2, 3], 3, [5], rng, image_size=12)
    probe_images = rng.random((3, 1, 12, 12))
    check = cnn_gradient_error(probe, probe_images, one_hot(rng.integers(0, CLASSES, 3), CLASSES))
    print(f"gradient check of the whole network: largest relative difference from finite "
          f"differences {check:.1e}")
    figures["gradient_error"] = float(f"{check:.1e}")



# %% [markdown]
# ## Training
#
# Training is chapter 04's mini-batch gradient descent, with the convolutional
# network in place of the dense one: shuffle the training images each epoch, and
# for each batch run forward, take the cross-entropy's gradient, backpropagate, and
# move every weight and bias a step against its gradient. The model is updated in
# place: the arrays in `model_parameters` are the ones the forward pass reads.
#
# One change: the step size shrinks as training goes on, linearly from the
# learning rate down to a tenth of it. Each batch pulls the weights towards its
# own few images; early on, large steps make quick progress, but at the end they
# leave the weights wherever the last few batches pushed them, which can cost a
# percent or more of accuracy on one unlucky digit. Small final steps let the
# weights settle. (Chapter 08 measures learning-rate schedules properly.)
#
# Predictions for many images are made a chunk at a time, so that im2col's copies
# stay a few megabytes however large the test set is.

# %%
def train_step(model, images, targets, learning_rate):
    """One step of gradient descent on one batch, in place. Returns the batch's loss
    before the step."""
    logits, cache = cnn_forward(model, images)
    gradients = cnn_backward(model, cache, cross_entropy_grad(logits, targets))
    for parameter, gradient in zip(model_parameters(model), model_parameters(gradients)):
        parameter -= learning_rate * gradient
    return cross_entropy(logits, targets)


def train_cnn(model, train_set, learning_rate, epochs, batch_size, rng, report=None):
    """Mini-batch gradient descent on the cross-entropy over shuffled batches of
    (images, labels), the step size falling linearly from `learning_rate` to a
    tenth of it. Returns the model and the mean training loss of each epoch;
    `report(epoch, loss)`, if given, is called after every epoch."""
    images, labels = train_set
    steps = epochs * -(-len(images) // batch_size)   # batches per epoch, rounded up
    step = 0
    history = []
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        losses = []
        for start in range(0, len(images), batch_size):
            batch = order[start:start + batch_size]
            step_size = learning_rate * (1 - 0.9 * step / steps)
            losses.append(train_step(model, images[batch], one_hot(labels[batch], CLASSES),
                                     step_size))
            step += 1
        history.append(float(np.mean(losses)))
        if report:
            report(epoch + 1, history[-1])
    return model, history


def predict(model, images, chunk=500):
    """The predicted class of each image, computed a chunk of images at a time."""
    return np.concatenate([cnn_forward(model, images[start:start + chunk])[0].argmax(axis=1)
                           for start in range(0, len(images), chunk)])



# %% [markdown]
# ### Training the network
#
# The default network, two convolutions of 8 and 16 filters of 5 x 5 and a head of
# 64 units, trains for 5 epochs on 15,000 digits (`--quick`: 3 epochs on 2,000).
# Each epoch prints its mean training loss; it falls fast in the first epoch, as the
# filters find strokes, and slowly after. A loss that turns into inf or nan means
# the steps were too large, and the run stops with a sentence saying so.

# %%
if __name__ == "__main__":
    model = init_cnn(ARGS.filters, ARGS.kernel_size, ARGS.hidden_sizes, rng)
    parameters = sum(array.size for array in model_parameters(model))
    print(f"\ntraining a network of {parameters:,} parameters: convolutions "
          f"{ARGS.filters} of {ARGS.kernel_size} x {ARGS.kernel_size}, dense head "
          f"{ARGS.hidden_sizes}; {ARGS.epochs} epochs, batch {ARGS.batch_size}, "
          f"learning rate {ARGS.learning_rate:g}")
    training_started = time.perf_counter()

    def report(epoch, loss):
        print(f"  epoch {epoch}: training loss {loss:.4f} nats "
              f"({time.perf_counter() - training_started:.0f} s)")

    model, history = train_cnn(model, (train_images, train_labels), ARGS.learning_rate,
                               ARGS.epochs, ARGS.batch_size, rng, report)
    if not np.isfinite(history[-1]):
        raise DataError(f"training diverged at learning rate {ARGS.learning_rate:g}; "
                        f"try a smaller --learning-rate")
    figures["final_train_loss"] = round(history[-1], 4)



# %% [markdown]
# ## Accuracy and the confusion matrix
#
# The held-out digits were never trained on, so their accuracy is the honest score;
# the same figure on (up to 2,000 of) the training digits shows how much of it is
# memorised. A single accuracy hides *which* digits go wrong, so the chapter also
# counts, for every true digit, what it was read as: the **confusion matrix**.
#
# **Reading the results.** On the generated digits the default run (15,000 training
# images, 5 epochs) scores about 99% on 2,000 held-out digits, against 10% for
# guessing; `--quick` (2,000 images, 3 epochs) about 93%. The few mistakes sit
# between shapes that a random slant and wobble can bring close: a 5 whose bowl
# curls round reads as a 6, a 6 whose loop closes high as an 8, a 1 with a long
# flag as a 2 or a 7. On MNIST a network of this shape is expected to reach about
# 98-99% on the 10,000 test digits with the default settings, the usual figure for
# small convolutional networks; we have not measured it here (this chapter's tests
# and offline runs use the generated digits). Real handwriting is more varied than
# our glyphs, and more training data (`--train-size 60000`) and more epochs help.

# %%
def confusion_matrix(predicted, true, classes=CLASSES):
    """counts[t, p]: how many images of class t were predicted as class p. The
    diagonal holds the correct answers; everything off it is a mistake, and where
    it sits says which digit was taken for which."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (true, predicted), 1)
    return counts


if __name__ == "__main__":
    predicted = predict(model, test_images)
    test_accuracy = accuracy(predicted, test_labels)
    seen = min(len(train_images), 2000)  # enough training images to compare with
    train_accuracy = accuracy(predict(model, train_images[:seen]), train_labels[:seen])
    confusion = confusion_matrix(predicted, test_labels)
    print(f"held-out accuracy {100 * test_accuracy:.1f}% (on {seen} training images "
          f"{100 * train_accuracy:.1f}%; guessing {100 / CLASSES:.0f}%)")
    print("confusion matrix (rows: true digit, columns: predicted):")
    print("       " + " ".join(f"{digit:>4}" for digit in range(CLASSES)))
    for digit, row in enumerate(confusion):
        print(f"  {digit:>3}  " + " ".join(f"{count:>4}" for count in row))
    mistakes = confusion - np.diag(np.diag(confusion))
    true_digit, taken_for = np.unravel_index(mistakes.argmax(), mistakes.shape)
    if mistakes.max() > 0:
        print(f"the commonest mistake: {true_digit} read as {taken_for} "
              f"({mistakes.max()} times)")
    figures.update(test_accuracy=round(test_accuracy, 4),
                   train_accuracy=round(train_accuracy, 4))



# %% [markdown]
# ## Is a dense network really the wrong tool? Measured
#
# The chapter opened with an argument: a dense network gives every pixel its own
# weights, so it must learn each stroke again at each position, while a filter that
# slides learns it once. An argument from counting weights is not a measurement, so
# here are two.
#
# **A dense baseline.** Chapter 04's network, trained on the same digits in the same
# way: the same head of 64 hidden units, the same epochs, batches, learning rate and
# schedule, only without the convolutions, so its first layer sees the 784 pixels
# directly. It needs no new code: `init_cnn` with an empty list of convolution
# layers *is* that network, since `cnn_forward` then only flattens each image and
# runs the dense head on it, and `cnn_backward` only runs the head's backward pass.
#
# **Shifted digits.** Every held-out digit moved by 2 pixels, a quarter of them each
# way (down, up, right, left), the strip left behind filled with blank paper. To a
# reader nothing has changed. For the dense network it has: most of the pixels a
# stroke covered are now other pixels, with other weights. The convolutions slide
# with the digit, and the pooling absorbs a pixel or two of what is left.
#
# **Reading the results.** On the generated digits, default run: the dense network
# reaches about 95% on the held-out digits, four points below the convolutional
# network's 99%, with two and a half times the parameters (50,890 against 20,522).
# Shifted by 2 pixels, the dense network falls to about 78%, a drop of 17 points;
# the convolutional one to about 94%, a drop of 5. Both lose something, and that is
# worth seeing too: the training digits were never more than 2 pixels off centre
# (the hand that draws them shifts them by up to 2), so a further 2 takes some
# digits where no training digit went, and the convolutional network ends in a
# dense head that reads its 4 x 4 feature maps position by position. Sharing
# weights over positions makes a network far more tolerant of shifts, not immune
# to them. With little training the gap is narrower: `--quick` (2,000 digits, 3
# epochs) gives about 92% and 81% unshifted, and drops of 13 to 20 points against
# 21 to 23, measured over three seeds.

# %%
SHIFT = 2   # pixels each held-out digit is moved for the shifted-digit test


def shift_images(images, rows, columns):
    """`images` (..., height, width) moved `rows` pixels down and `columns` pixels
    right (negative: up, left); what moves in from outside the image is blank paper,
    0, and what moves out is lost."""
    height, width = images.shape[-2:]
    shifted = np.zeros_like(images)
    shifted[..., max(rows, 0):height + min(rows, 0), max(columns, 0):width + min(columns, 0)] = \
        images[..., max(-rows, 0):height + min(-rows, 0), max(-columns, 0):width + min(-columns, 0)]
    return shifted


def shifted_test_set(images, pixels=SHIFT):
    """Every image moved `pixels` in one of the four directions, in turn: image k
    down when k % 4 is 0, up when 1, right when 2, left when 3. Labels are unchanged."""
    directions = [(pixels, 0), (-pixels, 0), (0, pixels), (0, -pixels)]
    shifted = np.empty_like(images)
    for turn, (rows, columns) in enumerate(directions):
        shifted[turn::4] = shift_images(images[turn::4], rows, columns)
    return shifted


if __name__ == "__main__":
    # No convolution layers: chapter 04's dense network on the flattened pixels.
    dense = init_cnn([], ARGS.kernel_size, ARGS.hidden_sizes, rng)
    dense, dense_history = train_cnn(dense, (train_images, train_labels), ARGS.learning_rate,
                                     ARGS.epochs, ARGS.batch_size, rng)
    if not np.isfinite(dense_history[-1]):
        raise DataError(f"the dense baseline diverged at learning rate "
                        f"{ARGS.learning_rate:g}; try a smaller --learning-rate")
    shifted_images = shifted_test_set(test_images)
    rows = []
    for name, network in (("convolutional", model), ("dense (chapter 04)", dense)):
        plain = accuracy(predict(network, test_images), test_labels)
        moved = accuracy(predict(network, shifted_images), test_labels)
        size = sum(array.size for array in model_parameters(network))
        rows.append((plain, moved))
        print(f"  {name:<19} {size:>10,} parameters: held-out {100 * plain:5.1f}%, "
              f"shifted {SHIFT} px {100 * moved:5.1f}% (drop {100 * (plain - moved):4.1f} points)")
    (_, cnn_shifted), (dense_accuracy, dense_shifted) = rows
    figures.update(dense_test_accuracy=round(dense_accuracy, 4),
                   cnn_shifted_accuracy=round(cnn_shifted, 4),
                   dense_shifted_accuracy=round(dense_shifted, 4))



# %% [markdown]
# ## Pictures: the filters and the confusion matrix
#
# The first layer's filters are small images themselves, 5 x 5 weights each, and
# can be drawn: positive weights light, negative dark. After training they look
# like stroke and edge detectors: a light bar beside a dark one responds to an
# edge at that angle. The second figure is the confusion matrix, whose off-diagonal
# cells show which digits the network takes for which. Without matplotlib the
# filters are printed as characters, darker characters for larger weights.
#
# **Reading the pictures.** Several first-layer filters turn into oriented edge
# detectors, a light band beside a dark one, which respond where a stroke's edge
# runs in that direction; others stay mixed, since a short run leaves them little
# time to settle. The second layer, not drawn, combines these edge maps into parts
# of digits.

# %%
SHADES = " .:-=+*#%@"


def filter_text(weight):
    """The first input channel of each filter as lines of characters, side by side,
    each filter scaled to its own range of weights."""
    rows = []
    for row in range(weight.shape[2]):
        pieces = []
        for kernel in weight[:, 0]:
            low, high = kernel.min(), kernel.max()
            levels = (kernel[row] - low) / max(high - low, 1e-12) * (len(SHADES) - 1)
            pieces.append("".join(SHADES[int(round(level))] for level in levels))
        rows.append(" | ".join(pieces))
    return rows


def save_plots(out_dir, weight, confusion, images, labels, predicted):
    """Save the first layer's filters (with a few test digits and the predictions)
    and the confusion matrix as PNGs in `out_dir`; without matplotlib, print the
    filters as text instead. Returns the files written."""
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plots; the first layer's filters as text:")
        print("\n".join("  " + line for line in filter_text(weight)))
        return []
    os.makedirs(out_dir, exist_ok=True)
    filters_path = os.path.join(out_dir, f"{CHAPTER}_filters.png")
    shown = min(len(weight), 16)
    figure, axes = plt.subplots(2, shown, figsize=(1.3 * shown, 3.6))
    for index in range(shown):
        kernel = weight[index, 0]
        limit = np.abs(kernel).max()
        axes[0, index].imshow(kernel, cmap="gray", vmin=-limit, vmax=limit)
        axes[0, index].set_title(f"filter {index + 1}", fontsize=8)
        axes[1, index].imshow(images[index, 0], cmap="gray_r", vmin=0, vmax=1)
        colour = "black" if predicted[index] == labels[index] else "red"
        axes[1, index].set_title(f"{labels[index]} -> {predicted[index]}", fontsize=8,
                                 color=colour)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("first-layer filters (light = positive weight); test digits, "
                    "true -> predicted", fontsize=9)
    figure.tight_layout()
    show_figure(figure, filters_path)
    plt.close(figure)
    confusion_path = os.path.join(out_dir, f"{CHAPTER}_confusion.png")
    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.imshow(np.log1p(confusion), cmap="Blues")
    for true_class in range(CLASSES):
        for predicted_class in range(CLASSES):
            count = confusion[true_class, predicted_class]
            if count:  # white on the dark cells, black on the light ones
                dark = np.log1p(count) > 0.6 * np.log1p(confusion.max())
                axis.text(predicted_class, true_class, str(count), ha="center",
                          va="center", fontsize=7, color="white" if dark else "black")
    axis.set(xticks=range(CLASSES), yticks=range(CLASSES), xlabel="predicted digit",
             ylabel="true digit", title="Confusion matrix on the held-out digits")
    figure.tight_layout()
    show_figure(figure, confusion_path)
    plt.close(figure)
    return [filters_path, confusion_path]


if __name__ == "__main__":
    for path in save_plots(ARGS.out, model[0][0][0], confusion, test_images, test_labels,
                           predicted):
        print(f"saved {path}")



# %% [markdown]
# ## Summary
#
# The last line gathers the run's headline figures, the checks, the accuracies and
# the final training loss, as `summary:` and one line of JSON, so that scripts and
# tests read them without parsing the prose above.
#
# ### Exercises
# `python tools/exercises.py make 04b_cnn` cuts these out of a copy, and
# `python tools/exercises.py check 04b_cnn` grades it:
#
# * `conv_forward`: the convolution as one matrix multiply of im2col patches by the
#   filters.
# * `conv_backward`: convolution's backward: weight and bias gradients, and col2im for
#   the images.
# * `max_pool_backward`: each output's gradient goes to the first maximum of its
#   square.
#
# To think about: im2col copies each pixel up to k^2 times, yet the convolution gets
# faster. Why? And why does max pooling send each gradient to one position only?
#
# Answers. The copies turn many small loops into one large matrix multiply, which BLAS
# runs close to the machine's peak; memory is the price. Near a point where one input
# is strictly the largest, the max equals that input, so its derivative is 1 there and
# 0 for the rest; at a tie it is not differentiable, and picking the first maximum (as
# PyTorch does, which the tests compare with) keeps the total gradient equal to the
# upstream one.

# %%
if __name__ == "__main__":
    print_summary({**figures, "seconds": round(time.perf_counter() - started, 1)})
