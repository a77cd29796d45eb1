"""Zero to GPT, chapter 00: check the set-up and predict the next character by counting.

This first chapter does three things:

* it checks your set-up: the versions of Python, numpy, torch, triton and
  tiktoken, whether there is a CUDA GPU, and how the Triton kernels of chapters 12
  and 13 will run here (compiled on a GPU, interpreted on the CPU, or not at all);
* it shows, in miniature, what a GPT does: read a text and predict the next
  character. The model here only *counts*: how often each character follows each
  other character (a **bigram** model). It is scored on text it has not seen, in
  **bits per character** and **bits per byte**, and it writes a paragraph of its
  own. Its score opens the course's text scoreboard: chapter 04's network and
  chapter 13's GPT are scored on the same held-out text, in the same unit;
* it prints the course map: every chapter, and what it builds.

Nothing is trained yet; the rest of the course replaces counting with learning,
step by step, until chapter 13 trains a GPT on the same task.

Run it with `python 00_intro.py` (a few seconds on a 2-core CPU) or
`python 00_intro.py --quick`. `--data PATH` reads a local UTF-8 text file instead
of the default corpus; `--help` lists every flag.

In a notebook (Jupyter, VS Code) the chapter ignores the kernel's command line and
takes its flags from the environment variable ZERO_TO_GPT_ARGS, for example
`ZERO_TO_GPT_ARGS="--quick"`; without it, the defaults.
"""

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import time
import urllib.request

import numpy as np

CHAPTER = "00_intro"


# %% [markdown]
# ## Your set-up
#
# The course needs Python with numpy (chapters 00-06), torch (07 on), triton (12
# and 13) and tiktoken (09 and 13). We read each package's version from its
# installed metadata rather than importing it: importing triton on a machine
# without a GPU, before `TRITON_INTERPRET=1` is set, can leave it unusable for the
# rest of the process, and an import is slow. Only torch is imported, to ask it
# about the GPU.
#
# Triton compiles its kernels for a CUDA GPU. Without one, chapters 12 and 13 set
# `TRITON_INTERPRET=1` before importing triton, and the same kernels run in
# Triton's interpreter on the CPU: slowly, but with the same results, which is how
# the tests check them. Where triton is not installed at all (it ships for Linux
# only), those chapters run their plain PyTorch path instead.
#
# No GPU is needed until chapter 12: chapters 00-11 are sized for a laptop's CPU,
# and every chapter's tests pass without a GPU. A GPU makes the later chapters
# faster, and only chapter 13's full-size training really needs one. The device
# line below names the GPU torch can use, if any; the versions of torch and triton
# decide which of their features the later chapters can rely on (the course needs
# torch 2.6 or newer). If the report below says "not
# installed" for a package you need, `pip install -r requirements.txt` installs it.


# %%
PACKAGES = ["numpy", "torch", "triton", "tiktoken"]


def package_versions():
    """The installed version of Python and of each package in PACKAGES, or
    "not installed", read from package metadata without importing anything."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def gpu_name():
    """The name of the first CUDA GPU torch can use, or None (no GPU, no torch, or a
    torch that cannot start)."""
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a broken torch install must not stop the set-up check
        return None


def triton_mode(versions, gpu):
    """How Triton kernels will run on this machine, in a few words."""
    if versions["triton"] == "not installed":
        return "unavailable (chapters 12 and 13 use their PyTorch path)"
    if gpu and os.environ.get("TRITON_INTERPRET") != "1":
        return f"compiled for the GPU ({gpu})"
    return "interpreted on the CPU (TRITON_INTERPRET=1): correct but slow"


if __name__ == "__main__":
    # Versions from package metadata, the GPU from torch, and what that means for
    # Triton.
    versions = package_versions()
    gpu = gpu_name()
    mode = triton_mode(versions, gpu)
    print("your set-up:")
    for name, version in versions.items():
        print(f"  {name:<9} {version}")
    print(f"  device    {'CUDA GPU: ' + gpu if gpu else 'CPU (no CUDA GPU found)'}")
    print(f"  triton    {mode}")


# %% [markdown]
# ## Set-up: flags and data (not the lesson)
#
# The code in this section is what the chapter needs but does not teach; in a
# notebook its cells open collapsed. Every chapter shares its command line: `--seed`
# for repeatable runs, `--data` for a local copy of the data, `--quick` for a run of
# a few seconds (used by the tests) and `--out` for where files are written; this one
# adds `--alpha`, the smoothing count, and `--length`, the length of the sampled
# paragraph. In a notebook the flags come from the environment variable
# `ZERO_TO_GPT_ARGS`. The last line of output is `summary:` and a line of JSON with
# the chapter's headline figures.
#
# The course downloads its data sets once into `data/`, checks each against a
# recorded SHA-256 digest (so a truncated or tampered download is never used), and
# writes it to a temporary file that is renamed into place only when complete, so an
# interrupted download never leaves half a file behind. These pieces are carried
# unchanged by every chapter that reads data; problems with the learner's input
# raise `DataError`, reported in one sentence.


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


# %% [markdown]
# ## The text corpus
#
# The text chapters (00, 04, 09, 13) read one corpus: tiny Shakespeare, about a million
# characters of plays, downloaded once into `data/` and checked against its recorded
# SHA-256 digest. Offline, they use real English prose that ships with every Python
# installation: the language reference and library topics behind `help()`
# (`pydoc_data.topics`, about 465 KB). `--data` takes a local `.txt` file instead.


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
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--data", default=None,
                        help="path of a local UTF-8 text file (default: download tiny "
                             "Shakespeare, else the Python documentation)")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds, for tests and a first look")
    parser.add_argument("--out", default="out", help="folder for plots (default out/)")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="count added to every pair of characters (default 1: add-one)")
    parser.add_argument("--length", type=int, default=None,
                        help="characters in the sampled paragraph (default 400, --quick 200)")
    args = parser.parse_args(argv)
    if args.length is None:
        args.length = 200 if args.quick else 400
    if not (args.alpha > 0 and np.isfinite(args.alpha)):
        raise DataError(f"--alpha must be a positive number, not {args.alpha}")
    if args.length < 1:
        raise DataError(f"--length must be at least 1, not {args.length}")
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
    text, source = load_text(ARGS.data)
    if len(text) < 20:
        raise DataError(f"the text from {source} has {len(text)} characters; the model "
                        f"needs at least 20 to count some and score the rest")
    figures = {"chapter": CHAPTER, "source": source, "python": versions["python"],
               "torch": versions["torch"], "triton": versions["triton"],
               "device": gpu or "cpu", "triton_mode": mode.split(" ")[0]}


# %% [markdown]
# ## A counting model of the next character
#
# A GPT reads text and, at every position, gives a probability to every possible
# next token. The simplest model that does the same job looks back one character
# only: the probability that character b follows character a is estimated by
# counting, in the training text, how often b followed a:
#
#     P(b | a) = count(a followed by b) / count(a followed by anything)
#
# This is a **bigram** model. Its parameters are a table of counts, one row per
# previous character and one column per next character. "Training" it is a single
# pass over the text that adds one to a cell for every pair of neighbours; numpy's
# `bincount` does the whole pass at once, after turning each pair (a, b) into the
# single number a * V + b, its cell's position in the flattened table.
#
# **Smoothing.** A pair never seen in training would get probability 0, and if it
# then appears in new text the model is infinitely surprised (log 0 = -inf). So we
# add a small count alpha to every cell ("add-one" smoothing when alpha = 1):
#
#     P(b | a) = (count(a, b) + alpha) / (count(a, anything) + alpha * V)
#
# where V is the number of distinct characters, the **vocabulary** size. Every
# character keeps a little probability, and the rows still add up to one.
#
# Characters become numbers first: each is replaced by its position in the sorted
# list of the text's characters. The same `encode` is used in chapter 04.
#
# **Counted text and held-out text.** A model is only worth what it predicts on
# text it has not seen, so the text is cut in two before anything is counted: the
# first 90% is counted, the last 10% is held out to score the model. The cut is
# moved back to the line break before it, so the held-out text starts at the start
# of a line rather than in the middle of a word. Chapters 04 and 13 cut their text
# with the same function, `hold_out_validation` (chapter 13's name: it can also
# cut a list of several documents), so that all three score their models on
# exactly the same held-out characters and their figures can be compared.


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


def bigram_probabilities(ids, vocab_size, alpha):
    """The (vocab_size, vocab_size) table P[a, b] = probability that character b
    follows character a, from the counts of pairs in `ids`, add-alpha smoothed."""
    # exercise: count the character pairs, then turn each row of counts into smoothed probabilities
    pairs = ids[:-1] * vocab_size + ids[1:]   # one number per (previous, next) pair
    counts = np.bincount(pairs, minlength=vocab_size * vocab_size).reshape(vocab_size, vocab_size)
    smoothed = counts + alpha
    return smoothed / smoothed.sum(axis=1, keepdims=True)
    # end exercise


if __name__ == "__main__":
    # One document, the whole text: the counted part is everything before the cut.
    train_documents, held_out_documents = hold_out_validation([text])
    train_end = len("".join(train_documents))
    held_out = text[train_end:]
    # The vocabulary is taken from the whole text, so every held-out character has
    # a number; one that never occurs in the counted part still gets a probability,
    # from smoothing.
    vocabulary = sorted(set(text))
    ids = encode(text, vocabulary)
    train_ids, test_ids = ids[:train_end], ids[train_end:]
    print(f"text: {len(text):,} characters from {source}, {len(vocabulary)} distinct; "
          f"counting the first {train_end:,}, scoring the last {len(held_out):,} "
          f"(10%, cut at a line break)")
    probabilities = bigram_probabilities(train_ids, len(vocabulary), ARGS.alpha)
    # One row of the table: what the model expects after the last counted character.
    after = text[train_end - 1]
    likeliest = np.argsort(probabilities[vocabulary.index(after)])[::-1][:5]
    print(f"after {after!r} the bigram model expects: " + ", ".join(
        f"{vocabulary[number]!r} {probabilities[vocabulary.index(after), number]:.2f}"
        for number in likeliest))


# %% [markdown]
# ## Scoring on unseen text: bits per character and bits per byte
#
# On the held-out text we measure the **cross-entropy**: the average of
# -log2 P(the character that really came next), over every held-out character (the
# first one predicted from the last counted character, the line break before the
# cut). It is the number of bits per character a compressor built on the model
# would need. For scale:
#
# * a model that knows nothing gives every character 1/V: log2(V) bits, about 6.7
#   for a vocabulary of 100;
# * the **unigram** model, the characters' overall frequencies without looking at
#   the previous one, does better, because spaces and e's are common;
# * the bigram model does better still; a GPT, with hundreds of characters of
#   context, gets far lower.
#
# **Bits per byte.** Bits per character only compares models that read the same
# characters. Chapter 13's GPT reads *tokens*, pieces of text of one to a dozen
# characters, and a model with longer tokens makes fewer, harder predictions. What
# every model of the text has in common is the text itself, stored as bytes. So the
# course's scoreboard divides the total bits a model needs for the held-out text by
# its size in UTF-8 bytes:
#
#     bits per byte = (sum over held-out characters of -log2 P(character)) / bytes
#
# An ASCII character is one byte, so on plain English the two figures are equal;
# a character such as "é" or "→" takes two or three bytes, so a text with some of
# them has a few more bytes than characters and a slightly lower bits per byte.
#
# The scoreboard printed below is the course's ladder for text: every model is
# scored in bits per byte on the same held-out text, and each chapter that adds a
# model prints the rungs below it too, so you see at once what it bought. Chapter
# 04 adds a trained network, chapter 13 a GPT.


# %%
def bits(nats):
    """A loss in nats expressed in bits."""
    return nats / math.log(2)


def bigram_nats(probabilities, ids):
    """Average -log P(next | previous), in nats, over every pair of neighbours in ids."""
    return float(-np.mean(np.log(probabilities[ids[:-1], ids[1:]])))


def unigram_nats(train_ids, test_ids, vocab_size, alpha):
    """Average -log P(character), in nats, over test_ids, with P the add-alpha
    smoothed character frequencies of train_ids."""
    counts = np.bincount(train_ids, minlength=vocab_size) + alpha
    return float(-np.mean(np.log((counts / counts.sum())[test_ids])))


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
    # ids[train_end - 1:] pairs every held-out character with the one before it.
    bigram_bits = bits(bigram_nats(probabilities, ids[train_end - 1:]))
    unigram_bits = bits(unigram_nats(train_ids, test_ids, len(vocabulary), ARGS.alpha))
    uniform_bits = math.log2(len(vocabulary))
    print(f"held-out bits per character: uniform {uniform_bits:.2f}, unigram "
          f"{unigram_bits:.2f}, bigram {bigram_bits:.2f}")
    rungs = [("uniform guessing (00)", bits_per_byte(uniform_bits, held_out)),
             ("unigram frequencies (00)", bits_per_byte(unigram_bits, held_out)),
             ("bigram counts (00)", bits_per_byte(bigram_bits, held_out))]
    print(f"the text scoreboard: bits per byte on the held-out {len(held_out):,} "
          f"characters ({len(held_out.encode('utf-8')):,} bytes)")
    print("\n".join(scoreboard(rungs)))


# %% [markdown]
# ## Writing with the model
#
# To generate text we start from one character and repeatedly draw the next one at
# random, with the probabilities of the row of the character before. That is how a
# GPT writes too, token by token; it just computes its probabilities from far more
# context than one character. The bigram's text has the right letters, spaces and
# short fragments of words, but no memory beyond one character.
#
# The draws come from a random generator seeded with `--seed`, so a run can be
# repeated exactly; another seed gives another paragraph from the same counts.
# Every chapter seeds its randomness this way, so its figures are reproducible.


# %%
def sample_bigram(probabilities, vocabulary, first, length, rng):
    """`length` characters drawn one at a time from the bigram probabilities,
    starting after the character `first`."""
    # exercise: draw each next character from the probability row of the one before it
    current = vocabulary.index(first)
    drawn = []
    for _ in range(length):
        current = int(rng.choice(len(vocabulary), p=probabilities[current]))
        drawn.append(vocabulary[current])
    return "".join(drawn)
    # end exercise


def save_plot(out_dir, probabilities, vocabulary, ids):
    """A heat map of the bigram probabilities among the 24 commonest characters, as a
    PNG in `out_dir`; without matplotlib, print the likeliest follower of each
    instead. Returns the files written."""
    common = np.argsort(np.bincount(ids, minlength=len(vocabulary)))[::-1][:24]
    labels = [repr(vocabulary[number])[1:-1] for number in common]
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot; the likeliest next character "
              "after each common one instead:")
        print("  " + ", ".join(f"{vocabulary[number]!r}->"
                               f"{vocabulary[int(probabilities[number].argmax())]!r}"
                               for number in common))
        return []
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{CHAPTER}_bigrams.png")
    figure, axis = plt.subplots(figsize=(7, 6))
    image = axis.imshow(probabilities[np.ix_(common, common)], cmap="Blues")
    axis.set_xticks(range(len(common)), labels)
    axis.set_yticks(range(len(common)), labels)
    axis.set(xlabel="next character", ylabel="previous character",
             title="P(next | previous), commonest characters")
    figure.colorbar(image)
    figure.tight_layout()
    show_figure(figure, path)
    plt.close(figure)
    return [path]


if __name__ == "__main__":
    # A paragraph of the model's own, starting after a line break (or after the
    # text's first character, for a text without one).
    rng = np.random.default_rng(ARGS.seed)
    sample = sample_bigram(probabilities, vocabulary, "\n" if "\n" in vocabulary else text[0],
                           ARGS.length, rng)
    print(f"a paragraph sampled from the bigram model ({ARGS.length} characters):\n")
    print("\n".join("    " + line for line in sample.splitlines()))
    for path in save_plot(ARGS.out, probabilities, vocabulary, train_ids):
        print(f"\nsaved {path}")


# %% [markdown]
# ## Reading the results
#
# On the Python documentation (the offline corpus) the bigram model scores 3.35
# bits per character on the held-out text, against 4.67 for the character
# frequencies alone and 6.69 for uniform guessing: one character of context saves
# well over a bit on every character. In bits per byte, the scoreboard's unit, the
# three are 3.35, 4.66 and 6.67: 575 characters of the documentation are not ASCII
# (curly quotes, arrows, accented names), so its held-out 46,521 characters take
# 46,607 bytes. The paragraph has the look of the text (the spacing, the
# punctuation, runs of dashes from tables) but not a word of sense.
#
# Counting cannot go much further. With two characters of context the table has
# V^3 cells, a million for V = 100, most of them never seen; with ten characters,
# 100^11 = 10^22 cells, more than any text could ever fill, so almost every
# context would be new and the counts would say nothing. The way out is to *learn* a
# function that maps a context to probabilities with far fewer numbers, and that
# treats similar contexts alike. That is what the rest of the course builds, from
# one weighted sum (chapter 02) to a GPT (chapter 13). Chapter 04's small network,
# which sees three characters, already scores about 2.4 bits per byte on the same
# held-out text, a bit a character below the bigram's 3.35.
#
# The set-up report tells you what to expect later: on a CPU the Triton chapters
# run in the interpreter at small sizes (their tests included); on a CUDA GPU they
# compile, and chapter 13 trains on the kernels of chapter 12.


# %% [markdown]
# ## The course map
#
# Each chapter is one file, read top to bottom and run on its own; each builds on
# the ones before, and `diff` between neighbours shows what is new.
#
# Three ways to read a chapter:
#
# * run it, `python 02_linreg.py`, and read its output next to its source;
# * open it as a notebook: the `# %%` lines divide it into cells, which Jupyter
#   (with the jupytext extension) and VS Code recognise, so you can run it a cell
#   at a time and change things between cells;
# * compare it with the chapter before, `diff 02_linreg.py 03_dense.py`: the code
#   a chapter carries over stays textually identical, so the diff is the lesson.
#
# ### Exercises
# `python tools/exercises.py make 00_intro` cuts these out of a copy, and
# `python tools/exercises.py check 00_intro` grades it:
#
# * `bigram_probabilities`: count the character pairs, then turn each row of counts
#   into smoothed probabilities.
# * `sample_bigram`: draw each next character from the probability row of the one
#   before it.
#
# To think about: Why add `alpha` to every count before normalising? What would a
# held-out text cost with `alpha = 0`?
#
# Answers. A pair never seen in training would get probability 0, and one such pair in
# the held-out text costs -log2(0), infinitely many bits; smoothing keeps every pair
# possible for a little probability taken from the seen ones.


# %%
COURSE = [
    ("00_intro.py", "the set-up check and a counting model of the next character"),
    ("01_linalg.py", "vectors, matrices, matrix multiply, broadcasting, slopes (weather)"),
    ("02_linreg.py", "linear regression by gradient descent: loss, gradient, learning rate"),
    ("03_dense.py", "a dense network with ReLU, backpropagation by hand, initialisation"),
    ("04_classify.py", "sigmoid, softmax, cross-entropy; rain tomorrow and the next character"),
    ("04b_cnn.py", "(optional) convolution and pooling from scratch: digits"),
    ("05_rnn.py", "recurrent networks over weather sequences, backpropagation through time"),
    ("05b_gru.py", "(optional) gated recurrent units"),
    ("06_autograd.py", "a miniature PyTorch: tensors with .backward()"),
    ("07_pytorch.py", "the same networks in PyTorch: modules, optimisers, data loaders"),
    ("08_regularize.py", "overfitting and its cures, each measured"),
    ("09_data.py", "text at scale: cleaning, a byte-pair tokenizer, tiktoken, shards"),
    ("10_seq2seq.py", "an encoder-decoder with attention for translation"),
    ("11_transformer.py", "the transformer: multi-head attention, masks, layer norm"),
    ("12_triton.py", "GPU kernels in Triton: softmax, norms, matmul, flash attention"),
    ("13_gpt.py", "a GPT trained on those kernels, on one GPU or many"),
]


def course_map(folder):
    """The chapter table as lines of text, marking the files present in `folder`."""
    lines = []
    for name, what in COURSE:
        here = "*" if os.path.exists(os.path.join(folder, name)) else " "
        lines.append(f"  {here} {name:<18} {what}")
    return lines


if __name__ == "__main__":
    print("the course (* = in this folder):")
    # A notebook has no __file__: its kernel runs in the notebook's own folder.
    folder = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
    print("\n".join(course_map(folder)))


# %%
if __name__ == "__main__":
    print_summary({**figures, "vocabulary": len(vocabulary),
                   "uniform_bits_per_char": round(uniform_bits, 3),
                   "unigram_bits_per_char": round(unigram_bits, 3),
                   "bigram_bits_per_char": round(bigram_bits, 3),
                   "uniform_bits_per_byte": round(rungs[0][1], 3),
                   "unigram_bits_per_byte": round(rungs[1][1], 3),
                   "bigram_bits_per_byte": round(rungs[2][1], 3),
                   "held_out_bytes": len(held_out.encode("utf-8")),
                   "seconds": round(time.perf_counter() - started, 1)})
