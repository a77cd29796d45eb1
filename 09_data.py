"""Chapter 9: text data at scale: clean, deduplicate, tokenize with BPE, shard and stream.

Chapter 8 trained networks on a table; a GPT learns from a lot of text, and before any
model sees a word the text goes through a pipeline. This chapter builds it from scratch:
acquire (tiny Shakespeare, checked against its SHA-256 digest; your own `.txt` files
with `--data`; offline, the Python documentation), clean (one spelling for line endings,
whitespace and Unicode), deduplicate (exact copies by hashing, near copies by MinHash),
tokenize (a byte-level BPE tokenizer trained from scratch, then loaded into tiktoken,
which gives the same ids much faster), shard (documents encoded in parallel into binary
token files that name their tokenizer, listed by a manifest; for a corpus of any size,
streamed from disk in constant memory, with our BPE, GPT-2's or a saved tokenizer) and
stream (a batch loader that splits the work between processes, shuffles with a seed
and resumes exactly from a saved position).

New since chapter 8: text instead of tables; tokenizers; binary file formats;
multiprocessing; data loading for several processes at once. No neural network is
trained here: chapter 13 trains its GPT on what this chapter writes.

How to run it:

    python 09_data.py                  # the whole lesson: about 2 s on a 2-core CPU
                                       # offline, a few seconds with tiny Shakespeare
    python 09_data.py --quick          # about 1 s, smaller vocabulary and corpus
    python 09_data.py --shards out/shards   # check and stream shards written before
    python 09_data.py --data my_texts/ --vocab-size 8192 --workers 4
    python 09_data.py --shard-corpus corpus/ --tokenizer gpt2 --out out/big
                                       # only shard a corpus of any size, streaming:
                                       # memory stays flat however big it is

It writes token shards (with a manifest and the tokenizer file, in `--out`/shards), and
plots to `--out` (default `out/`). In a
notebook (Jupyter, VS Code) the chapter ignores the kernel's command line and takes its
flags from the environment variable ZERO_TO_GPT_ARGS, for example
`ZERO_TO_GPT_ARGS="--quick"`; without it, the defaults.
"""
import argparse
import base64
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import re
import shlex
import shutil
import struct
import sys
import threading
import time
import unicodedata
import urllib.request
from collections import Counter, defaultdict, deque, namedtuple

import numpy as np
# `regex` is the pattern module that tiktoken itself depends on (so it is installed
# with tiktoken). We need it rather than the standard `re` because GPT-2's
# pre-tokenisation rule speaks of Unicode classes, \p{L} (any letter, in any script)
# and \p{N} (any number), which `re` cannot express.
import regex
import tiktoken

CHAPTER = "09_data"


# %% [markdown]
# # Chapter 9: text data at scale
#
# A language model is only as good as the text it learns from, and the text arrives
# messy: files in odd encodings, the same paragraph copied ten times, Windows and Unix
# line endings side by side. A GPT also cannot read characters directly: it reads
# *tokens*, integer ids of frequent pieces of text. And a real corpus is far bigger
# than memory, so training reads tokens from files on disk while several processes
# (one per GPU) each take their own share.
#
# This chapter walks the whole road from raw text files to batches of token ids:
#
#     .txt files -> clean -> deduplicate -> train BPE -> encode (parallel)
#                -> token shards on disk -> streaming batch loader -> (chapter 13)
#
# Every step is short, written out in plain Python and numpy, and checked.
# Each step's results are printed right under the text that explains it.

# %% [markdown]
# ## Clean
#
# The same text can be spelled in different bytes, and a tokenizer would learn every
# spelling separately. Cleaning picks one:
#
# * Unicode normalisation (NFC): "é" can be one code point or "e" plus a combining
#   accent; NFC makes both the single code point;
# * line endings: Windows `\r\n` and old Mac `\r` become `\n`;
# * control characters (NUL, escape codes, the C1 range) are removed, except tab and
#   newline; exotic spaces (no-break, thin, ideographic) become a plain space;
# * spaces at the end of lines go, and so do blank lines at the start and the end;
#   three or more line breaks become one blank line.
#
# Cleaning must not change what the text *says*: we leave case, punctuation and
# indentation alone (code in the Python documentation needs its indentation).
# Cleaning is also the first thing every byte of a big corpus goes through, so it
# must be fast: each step is one pass of a compiled loop (a precompiled pattern of the
# standard `re` module, `str.rstrip` on each line), about 75 MB/s in all on the Python
# documentation, where the same steps as `regex` substitutions ran at 14 MB/s. The
# exotic spaces are written out (the 16 characters of Unicode's class Zs besides the
# plain space) because `regex`'s `\p{Zs}`, though shorter, was the slowest step.
#
# What is a *document*? In a folder, each file is one. A single file (tiny
# Shakespeare, the Python documentation) is one long text, so we cut it at blank
# lines into paragraphs (a speech, a section of the manual) and treat those as the
# documents: they are what gets deduplicated, and what `<|endoftext|>` separates.

# %%
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # not \t, \n
UNICODE_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
BLANK_LINES = regex.compile(r"\n{3,}")


def clean_text(text):
    """`text` with one spelling for Unicode, line endings and whitespace."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_CHARACTERS.sub("", text)
    text = UNICODE_SPACES.sub(" ", text)
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    text = BLANK_LINES.sub("\n\n", text)
    return text.strip("\n")


def split_paragraphs(text):
    """The paragraphs of `text`, cleaned: the pieces between its blank lines."""
    return [paragraph for paragraph in clean_text(text).split("\n\n") if paragraph.strip()]


def clean_documents(texts):
    """Clean each (name, text) and return the list of documents: each file is one
    document, except a lone file, which is cut at blank lines into paragraphs."""
    if len(texts) == 1:
        return split_paragraphs(texts[0][1])
    cleaned = [clean_text(text) for _, text in texts]
    return [document for document in cleaned if document.strip()]


# %% [markdown]
# ## Set-up: flags, data and plots (not the lesson)
#
# The code in this section is what the chapter needs but does not teach; in a notebook
# its cells open collapsed, and the flags come from the environment variable
# `ZERO_TO_GPT_ARGS`. A problem with the learner's input ends the run with one sentence
# and exit code 2; downloads are checked against a recorded SHA-256 digest and renamed
# into place only when complete. Both are carried unchanged from the earlier chapters.
#
# The text chapters (00, 04, 09, 13) read one corpus: tiny Shakespeare, about a million
# characters of plays, downloaded once into `data/` and checked against its recorded
# SHA-256 digest. Offline, they use real English prose that ships with every Python
# installation: the language reference and library topics behind `help()`
# (`pydoc_data.topics`, about 465 KB). `--data` may instead name one `.txt` file or a
# folder, searched (sub-folders too) for `.txt` files, read in sorted order so runs
# are repeatable. A file that is not valid UTF-8 is named and skipped: decoding it
# "leniently" would replace its accented letters with question marks or worse, and
# the tokenizer would learn the garbage.
#
# Every chapter shares this command line: `--seed` for repeatable runs, `--data` for a
# local copy of the data, `--quick` for a run of a few seconds (used by the tests) and
# `--out` for where files are written. Its last line of output is `summary:` and a
# line of JSON with the chapter's headline figures, so scripts and tests can read it.
# The code that draws the chapter's two plots (shown under Pictures, at the end) is
# here too.


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
def read_corpus(path=None):
    """The raw corpus as (texts, source): `texts` is a list of (name, text) pairs, one
    per file read. Non-UTF-8 or empty files in a folder are reported and skipped."""
    if path and os.path.isdir(path):
        found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path)
                       for name in names if name.endswith(".txt"))
        texts = []
        for file_path in found:
            try:
                texts.append((file_path, load_text(file_path)[0]))
            except DataError as error:
                print(f"note: skipping a file: {error}", file=sys.stderr)
        if not texts:
            raise DataError(f"the corpus is empty: folder {path} holds {len(found)} .txt "
                            f"files and none is usable UTF-8 text; add some text files")
        return texts, path
    text, source = load_text(path)
    return [(source, text)], source


# %% jupyter={"source_hidden": true}
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--data", default=None,
                        help="a UTF-8 .txt file or a folder of them (default: download "
                             "tiny Shakespeare, else the Python documentation)")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds, for tests and a first look "
                             "(150,000 characters, vocabulary 512)")
    parser.add_argument("--out", default="out",
                        help="folder for plots and OUT/shards: the shards, their "
                             "manifest.json and tokenizer.tiktoken (default out/)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="tokens in the vocabulary, <|endoftext|> included; at least "
                             "257 (default 4096, --quick 512)")
    parser.add_argument("--workers", type=int, default=2,
                        help="processes that encode documents in parallel (default 2)")
    parser.add_argument("--shard-tokens", type=int, default=None,
                        help="tokens per shard (default 50000, --quick 20000; with "
                             "--shard-corpus 10000000)")
    parser.add_argument("--valid-fraction", type=float, default=0.1,
                        help="share of the text held out for validation (default 0.1; "
                             "with --shard-corpus, the share of documents, chosen by "
                             "their hash)")
    parser.add_argument("--threshold", type=float, default=0.8,
                        help="Jaccard similarity from which two documents count as near "
                             "duplicates (default 0.8)")
    parser.add_argument("--shards", default=None, metavar="FOLDER",
                        help="instead of building shards, check the shards already in "
                             "FOLDER (e.g. out/shards) and stream a batch from them")
    parser.add_argument("--shard-corpus", default=None, metavar="PATH",
                        help="instead of the lesson, stream PATH (a .txt or .jsonl file, or "
                             "a folder of them) into token shards in OUT/shards, with a "
                             "manifest and the tokenizer file; memory does not grow "
                             "with the corpus's size (only by ~70 bytes a document)")
    parser.add_argument("--tokenizer", default="bpe", metavar="{bpe,gpt2,FILE}",
                        help="with --shard-corpus: bpe trains the course's BPE "
                             "(--vocab-size tokens) on the first --bpe-sample-mb of the "
                             "training documents; gpt2 is GPT-2's tokenizer (its files "
                             "cached in data/tiktoken or downloadable); FILE is a "
                             "tokenizer file saved by this chapter (default bpe)")
    parser.add_argument("--bpe-sample-mb", type=float, default=None,
                        help="with --shard-corpus --tokenizer bpe: megabytes of text the "
                             "tokenizer is trained on (default 10, --quick 1)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="rows per batch in the loader demonstration (default 8)")
    parser.add_argument("--block-size", type=int, default=64,
                        help="tokens per row in the loader demonstration (default 64)")
    args = parser.parse_args(argv)
    if args.vocab_size is None:
        args.vocab_size = 512 if args.quick else 4096
    if args.shard_tokens is None:
        args.shard_tokens = 10_000_000 if args.shard_corpus else 20_000 if args.quick else 50_000
    if args.bpe_sample_mb is None:
        args.bpe_sample_mb = 1.0 if args.quick else 10.0
    return args


def check_args(args):
    """Refuse impossible settings before any work is done."""
    if not 257 <= args.vocab_size <= 2**32:
        raise DataError(f"--vocab-size {args.vocab_size} is out of range: a byte-level "
                        f"vocabulary needs at least 257 tokens (256 bytes and "
                        f"<|endoftext|>) and ids must fit in 32 bits")
    for name in ("workers", "shard_tokens", "batch_size", "block_size"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1 "
                            f"(got {getattr(args, name)})")
    if not 0 < args.valid_fraction < 1:
        raise DataError(f"--valid-fraction must lie between 0 and 1 "
                        f"(got {args.valid_fraction})")
    if not 0 < args.threshold <= 1:
        raise DataError(f"--threshold must lie in (0, 1] (got {args.threshold})")
    if args.bpe_sample_mb <= 0:
        raise DataError(f"--bpe-sample-mb must be positive (got {args.bpe_sample_mb})")
    if args.tokenizer != "bpe" and not args.shard_corpus:
        raise DataError("--tokenizer applies to --shard-corpus; the lesson always trains "
                        "its own BPE")
    if args.shard_corpus and args.shards:
        raise DataError("--shard-corpus writes shards and --shards reads them; give one")
    if args.shard_corpus and not os.path.exists(args.shard_corpus):
        raise DataError(f"corpus {args.shard_corpus} does not exist; give --shard-corpus "
                        f"a .txt or .jsonl file or a folder of them")
    if args.tokenizer not in ("bpe", "gpt2") and not os.path.isfile(args.tokenizer):
        raise DataError(f"--tokenizer {args.tokenizer} is neither bpe, gpt2 nor an existing "
                        f"tokenizer file (such as OUT/shards/tokenizer.tiktoken)")


def print_summary(figures):
    """The chapter's last line: `summary: ` and its headline figures as JSON."""
    print("summary: " + json.dumps(figures))


# %% jupyter={"source_hidden": true}
def plot_results(out, vocab_sizes, train_compression, valid_compression, threshold):
    """Save compression.png and minhash.png to `out`; without matplotlib, say so once
    and print a text view instead."""
    similarities = np.linspace(0, 1, 101)
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plots, text view instead")
        for size, train_value, valid_value in zip(vocab_sizes, train_compression,
                                                  valid_compression):
            print(f"  vocabulary {size:6d}: {train_value:.2f} bytes/token on training "
                  f"text, {valid_value:.2f} held out")
        return []
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(vocab_sizes, train_compression, "o-", label="training text")
    axes.plot(vocab_sizes, valid_compression, "s--", label="held-out text")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("vocabulary size (tokens)")
    axes.set_ylabel("bytes per token")
    axes.set_title("BPE compression grows with every merge")
    axes.legend()
    figure.tight_layout()
    paths = [os.path.join(out, "compression.png")]
    show_figure(figure, paths[-1])
    plt.close(figure)
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(similarities, candidate_probability(similarities))
    axes.axvline(threshold, color="gray", linestyle=":", label=f"threshold {threshold}")
    axes.set_xlabel("Jaccard similarity of two documents")
    axes.set_ylabel("probability of being compared")
    axes.set_title(f"MinHash LSH, {MINHASH_BANDS} bands of {MINHASH_ROWS} rows")
    axes.legend()
    figure.tight_layout()
    paths.append(os.path.join(out, "minhash.png"))
    show_figure(figure, paths[-1])
    plt.close(figure)
    return paths


# %% [markdown]
# ## The corpus, read and cleaned
#
# The run, in order: read and clean the corpus; remove duplicates; hold back the
# validation documents; train the tokenizer on the rest and time it; check it against
# tiktoken and on hard strings; measure compression and encoding speed; write the
# shards in parallel and check they decode back to the documents; and finally stream
# batches for two ranks and resume a loader from a saved position.
#
# Two flags make a different, smaller run that skips the lesson: `--shards FOLDER`
# reads shards written earlier (checking each one) and streams one batch from them,
# the way chapter 13 will; `--shard-corpus PATH` only shards a corpus, of any size,
# streaming (its section comes after the shards').

# %%
# Every step of the run sits behind this guard: importing the file (as the tests do,
# and as every worker process of the parallel encoding does on macOS and Windows) must
# define the functions and run nothing. `figures` collects the headline numbers of each
# step for the summary line at the end.
if __name__ == "__main__":
    ARGS = chapter_args()
    check_args(ARGS)   # impossible settings are refused before anything is read
    started = time.perf_counter()
    figures = {"chapter": CHAPTER}
    MODE = "inspect" if ARGS.shards else "shard-corpus" if ARGS.shard_corpus else "lesson"
# A `--shards` or `--shard-corpus` run skips every step of the lesson, this one included.
if __name__ == "__main__" and MODE == "lesson":
    os.makedirs(ARGS.out, exist_ok=True)
    # --quick keeps the first 150,000 characters' worth of documents: enough for every
    # step to mean something, small enough to run in a few seconds.
    texts, source = read_corpus(ARGS.data)
    raw_bytes = sum(len(text.encode("utf-8")) for _, text in texts)
    documents = clean_documents(texts)
    if ARGS.quick:
        kept_characters, count = 0, 0
        while count < len(documents) and kept_characters < 150_000:
            kept_characters += len(documents[count])
            count += 1
        documents = documents[:count]
    if not documents:
        raise DataError(f"the corpus from {source} is empty after cleaning; it holds "
                        f"only whitespace and control characters")
    print(f"acquired {len(texts)} file(s) from {source}: {raw_bytes:,} bytes; "
          f"{len(documents):,} documents after cleaning"
          + (" (--quick: the first 150,000 characters)" if ARGS.quick else ""))
    figures.update(source=source, documents=len(documents))


# %% [markdown]
# ## Deduplicate
#
# Corpora repeat themselves: web pages are mirrored, licences and cookie banners
# appear on every page, a manual repeats a note in every section. A model trained on
# repeats wastes its time on them and learns to recite them; its validation loss
# also flatters it when a copy of a training document sits in the validation set.
#
# **Exact duplicates** are cheap to find: hash each document (SHA-256) and keep the
# first document with each hash. Equal hashes mean equal texts (a collision has
# never been observed), and comparing 32-byte digests is far faster than comparing
# texts pairwise.
#
# **Near duplicates** (the same paragraph with a word changed) need a measure of
# similarity. Cut each document into *shingles*, its runs of 5 consecutive words, and
# compare the sets: the Jaccard similarity of sets A and B is |A ∩ B| / |A ∪ B|, 1 for
# the same shingles, 0 for none shared. Changing one word of a 100-word paragraph
# changes the 5 shingles that contain it: (96 - 5) / (96 + 5) = 0.90. Two changed
# words give (96 - 10) / (96 + 10) = 0.81. Our threshold, **0.8**, thus calls two
# documents near duplicates when they differ in about 2 words per hundred or fewer.
#
# Comparing every pair of N documents costs N²/2 set comparisons: a billion for
# 45,000 documents. **MinHash** avoids that. Apply a random hash function h to every
# shingle of a document and keep the minimum. For two documents, the probability that
# their minima are equal is exactly their Jaccard similarity (the smallest hash over
# A ∪ B is equally likely to be any of its shingles, and the minima agree exactly when
# it belongs to A ∩ B). With 128 hash functions, each document gets a 128-number
# *signature*, and the fraction of equal entries estimates the similarity.
#
# **Locality-sensitive hashing** then finds the candidates without comparing all
# pairs: cut the signature into b = 16 *bands* of r = 8 numbers; documents that agree
# on all 8 numbers of any one band land in the same bucket. Two documents with
# similarity s agree on one band with probability s^8, and on at least one of 16 with
#
#     P(candidate) = 1 - (1 - s^8)^16
#
# an S-shaped curve: 0.06 at s = 0.5, 0.61 at s = 0.7, 0.95 at s = 0.8, 0.99988 at
# s = 0.9 (the run prints these four from the formula). Candidates are then checked
# with their exact Jaccard similarity, so the curve decides only what we might *miss*
# (about 5% of pairs right at 0.8, almost none of the clear copies), never what we
# wrongly remove.
#
# Very short documents ("Ay, my lord.", "See also:") repeat because language does, not
# because someone copied them; and a short document has too few shingles for the
# similarity to mean much (16 words make 12 shingles, and one changed word already
# drops the similarity to 7 / 17 = 0.41). So documents of fewer than 16 words are
# always kept.
#
# Two things to notice in the output. MinHash sees only words: two code examples that
# differ only in punctuation (`'1 2 3'.split()` and `'1,2,3'.split(',')`) look
# identical to it. And near duplicates are not always copies: the manual describes
# `str.ljust`, `str.rjust` and `str.center` in nearly the same words, and at 0.8 the
# second and third go. For training a language model that is the intent (the model
# still sees the template once); for a search engine it would not be.

# %%
SHINGLE_WORDS = 5        # words per shingle
MINHASH_BANDS = 16       # bands x rows = 128 hash functions
MINHASH_ROWS = 8
MINHASH_PRIME = 4294967311   # the smallest prime above 2**32: hashes are taken mod it
MIN_DEDUP_WORDS = 16     # shorter documents are always kept
WORD = regex.compile(r"\w+")


def shingles(document):
    """The set of runs of SHINGLE_WORDS consecutive words (lower-cased) of `document`,
    each hashed to a 32-bit integer with BLAKE2 (stable across runs, unlike hash())."""
    words = regex.findall(r"\w+", document.lower())
    runs = {" ".join(words[start:start + SHINGLE_WORDS])
            for start in range(max(len(words) - SHINGLE_WORDS + 1, 1))}
    return {int.from_bytes(hashlib.blake2b(run.encode(), digest_size=4).digest(), "little")
            for run in runs}


def minhash_signature(shingle_set, multipliers, offsets):
    """One minimum per hash function h(x) = (a x + b) mod p, over the shingle hashes.
    With a, b, x below 2**32, a x + b stays below 2**64: no overflow in uint64."""
    values = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set))
    hashed = (values[:, None] * multipliers[None, :] + offsets[None, :]) % MINHASH_PRIME
    return hashed.min(axis=0)


def is_short(document):
    """Whether `document` has fewer than MIN_DEDUP_WORDS words (it stops counting at
    MIN_DEDUP_WORDS, so a long document costs no more than a short one)."""
    words = WORD.finditer(document)
    return next(itertools.islice(words, MIN_DEDUP_WORDS - 1, None), None) is None


def candidate_probability(similarity, bands=MINHASH_BANDS, rows=MINHASH_ROWS):
    """The chance that two documents of Jaccard `similarity` share at least one band."""
    return 1 - (1 - similarity ** rows) ** bands


def deduplicate(documents, threshold=0.8, seed=0):
    """Drop exact and near duplicates, keeping the first of each group.

    Returns (kept documents, exact removals, near removals); each removal is a tuple
    (removed index, index of the kept document it copies, Jaccard similarity)."""
    rng = np.random.default_rng(seed)
    functions = MINHASH_BANDS * MINHASH_ROWS
    multipliers = rng.integers(1, 2**32, size=functions, dtype=np.uint64)
    offsets = rng.integers(0, 2**32, size=functions, dtype=np.uint64)
    first_with_digest = {}             # SHA-256 digest -> index of the kept document
    buckets = defaultdict(list)        # (band, its 8 minima) -> kept document indices
    kept_shingles = {}                 # index of a kept document -> its shingle set
    kept, exact, near = [], [], []
    for index, document in enumerate(documents):
        if is_short(document):
            kept.append(document)
            continue
        digest = hashlib.sha256(document.encode("utf-8")).digest()
        if digest in first_with_digest:
            exact.append((index, first_with_digest[digest], 1.0))
            continue
        first_with_digest[digest] = index
        shingle_set = shingles(document)
        signature = minhash_signature(shingle_set, multipliers, offsets)
        keys = [(band, signature[band * MINHASH_ROWS:(band + 1) * MINHASH_ROWS].tobytes())
                for band in range(MINHASH_BANDS)]
        candidates = {other for key in keys for other in buckets.get(key, ())}
        best_similarity, best_match = 0.0, None
        for other in sorted(candidates):
            other_set = kept_shingles[other]
            similarity = len(shingle_set & other_set) / len(shingle_set | other_set)
            if similarity > best_similarity:
                best_similarity, best_match = similarity, other
        if best_similarity >= threshold:
            near.append((index, best_match, best_similarity))
            continue
        kept.append(document)
        kept_shingles[index] = shingle_set
        for key in keys:
            buckets[key].append(index)
    return kept, exact, near


if __name__ == "__main__" and MODE == "lesson":
    # Removals are reported with the document they repeat, so you can judge for
    # yourself whether the threshold was right for your text.
    kept, exact, near = deduplicate(documents, ARGS.threshold, ARGS.seed)
    removed_bytes = sum(len(documents[index].encode("utf-8")) for index, _, _ in exact + near)
    total_bytes = sum(len(document.encode("utf-8")) for document in documents)
    print(f"deduplicated: removed {len(exact)} exact and {len(near)} near duplicates, "
          f"{removed_bytes:,} of {total_bytes:,} bytes ({100 * removed_bytes / total_bytes:.1f}%)")
    for kind, removals in (("exact", exact), ("near", sorted(near, key=lambda item: item[2]))):
        for index, original, similarity in removals[:2]:   # the least similar near pairs
            print(f"  {kind} (Jaccard {similarity:.2f}): document {index} repeats "
                  f"{original}: {documents[index][:60]!r}")
    print("  MinHash chance of comparing a pair: "
          + ", ".join(f"{candidate_probability(s):.5g} at {s}" for s in (0.5, 0.7, 0.8, 0.9)))
    figures.update(exact_duplicates=len(exact), near_duplicates=len(near))


# %% [markdown]
# ## Validation documents
#
# We hold back about 10% of the text, whole documents, before the tokenizer is
# trained, so that "bytes per token" on it measures how well the merges carry over to
# text they were not learned from, and chapter 13 can measure its model on text it
# never trained on. Here the held-out documents are the first ones, and they go to
# the validation shards (`valid_*.bin`), named as such in the manifest. (A corpus
# streamed from disk picks them by fingerprint instead: see "Sharding a corpus of any
# size".)

# %%
def split_validation(documents, valid_fraction):
    """(validation documents, training documents): the first documents until they hold
    `valid_fraction` of the characters, and the rest. Both are non-empty."""
    if len(documents) < 2:
        raise DataError(f"the corpus has {len(documents)} document after cleaning and "
                        f"deduplication; it needs at least 2 (one to validate on)")
    target = valid_fraction * sum(len(document) for document in documents)
    count, characters = 0, 0
    while count < len(documents) - 1 and (count == 0 or characters < target):
        characters += len(documents[count])
        count += 1
    return documents[:count], documents[count:]


# The split comes before the tokenizer is trained, and from the deduplicated documents:
# a copy of a training paragraph among the held-out ones would flatter every figure
# measured on them.
if __name__ == "__main__" and MODE == "lesson":
    valid_documents, train_documents = split_validation(kept, ARGS.valid_fraction)


# %% [markdown]
# ## Byte-pair encoding: the idea
#
# A model needs a fixed list of symbols, its *vocabulary*, and every text must be
# writable with it. Two extremes fail:
#
# * characters: a short list, but Unicode has about 150,000 of them, and a model that
#   reads one character at a time must look far back to see a few words;
# * whole words: short sequences, but an unseen word ("Pythonista") cannot be written.
#
# Byte-pair encoding (BPE) sits in between. Every text is a sequence of UTF-8 *bytes*,
# and there are only 256 byte values, so the 256 single bytes form a starting
# vocabulary that can write anything: emoji, Chinese, a typo. Then BPE learns
# shortcuts. Count every pair of neighbouring tokens in the training text; the most
# frequent pair, say `t` followed by `h`, becomes a new token `th`; replace it
# everywhere and count again. Each merge adds one token, and we stop when the
# vocabulary has the size we asked for. Frequent words end up as one token, rare words
# as a few pieces, and any string at all still encodes, falling back to single bytes.
#
# Two details from GPT-2's tokenizer:
#
# * **Pre-tokenisation.** Before BPE, the text is cut into chunks with a regular
#   expression: contractions (`'s`, `'ll`), a run of letters with at most one space in
#   front (` hello`), a run of digits, a run of punctuation, and runs of whitespace.
#   Merges happen only inside a chunk, so a token never glues the end of one word to
#   the start of the next (no token for `dog.` *and* `dog!` *and* `dog?`), which keeps
#   the vocabulary for real pieces of words.
# * **A special token** `<|endoftext|>` marks where one document ends and the next
#   begins. It is not made of bytes: it gets its own id after all the merges, and it
#   only ever appears where our code puts it, never because a document happened to
#   contain the 13 characters `<|endoftext|>`.
#
# A worked example, small enough to do by hand (the tests check it). Train on
# "the cat the hat the bat". Pre-tokenisation gives the chunks "the" once, " the"
# twice, and " cat", " hat", " bat" once each. Counting neighbouring pairs, each
# weighted by how often its chunk occurs:
#
#     t h: 3    h e: 3    a t: 3    " " t: 2    and 1 each for " " c, c a, " " h,
#                                                h a, " " b, b a
#
# Three pairs tie at 3; we break ties by the smaller ids (byte values), so "a"+"t"
# (97, 116) wins and becomes token 256, "at". Counting again: "h"+"e" (3) becomes 257,
# then "t"+"he" (3) becomes "the", then " "+"the" (2) becomes " the", and then every
# pair occurs once and the smallest, " "+"b", becomes " b". Five merges, and
# " the bat" is now three tokens: " the", " b", "at".
#
# **Training fast.** The obvious loop (count all pairs, merge the best, repeat) reads
# the whole text once per merge: 4,000 merges of a megabyte is 4 billion steps, far
# too slow in Python. Two observations fix it. Most chunks repeat, so we keep each
# distinct chunk once with its count (a megabyte of English has only some 30,000
# distinct chunks). And a merge changes only the chunks that contain the merged pair,
# so we keep, for every pair, its count and the set of chunks it appears in; after a
# merge we subtract the old pairs of just those chunks and add their new pairs. A heap
# (a priority queue) hands us the most frequent pair each time without scanning all
# of them. The result trains a 4,096-token vocabulary on a megabyte in seconds.
#
# **Encoding.** To encode new text we do not replay the merges one by one. Like
# tiktoken, we start each chunk as single bytes and repeatedly join the neighbouring
# pair whose joined bytes have the *lowest rank* (were learned earliest), until no
# neighbouring pair is a token. A token's id is its rank, so the whole tokenizer is
# one dictionary from bytes to ids: tiktoken's `mergeable_ranks`. Because our Python
# encoder follows the same rule as tiktoken's Rust one, the two must agree id for id,
# and a test checks that they do.

# %%
# GPT-2's pre-tokenisation rule, exactly as tiktoken's "gpt2" encoding writes it:
#   '(?:[sdmt]|ll|ve|re)   English contractions: 's 'd 'm 't 'll 've 're
#  | ?\p{L}+              letters of any script, with one optional leading space
#  | ?\p{N}+              digits and other numbers, same
#  | ?[^\s\p{L}\p{N}]+    punctuation and symbols (neither space, letter nor number)
#  |\s+(?!\S)             whitespace, but leave the last space for the next word
#  |\s+                   any remaining whitespace
# The lookahead `(?!\S)` is why "a   b" splits as "a", "  ", " b": the final space
# travels with the word, so " b" is the same token whether one space or three came
# before it.
GPT2_SPLIT_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                      r"""|\s+(?!\S)|\s+""")
END_OF_TEXT = "<|endoftext|>"   # the special token that separates documents


def train_bpe(text, vocab_size):
    """Learn byte-level BPE merges on `text` for at most `vocab_size` tokens, counting
    END_OF_TEXT (which separates documents and is never merged): tiktoken's
    `mergeable_ranks`, each token's bytes -> its id, the 256 single bytes first, then
    up to `vocab_size - 257` merges in the order learned (fewer when a small text runs
    out of pairs; ties go to the pair of smaller ids, so training is deterministic).
    `make_encoding` gives END_OF_TEXT the next id, `len(mergeable_ranks)`: that is
    `vocab_size - 1` only when every merge was learned.

    Speed comes from two ideas. (1) Count each distinct chunk once: " the" occurs
    thousands of times but is one entry with a count. (2) Never recount: keep every
    pair's count and, for each pair, the chunks it occurs in; a merge then touches
    only those chunks, subtracting their old pairs and adding their new ones. A heap
    finds the most frequent pair without scanning them all."""
    if vocab_size < 257:
        raise DataError(f"vocabulary size {vocab_size} is too small; a byte-level BPE "
                        f"needs at least 257 tokens (the 256 single bytes and "
                        f"{END_OF_TEXT})")
    chunk_counts = Counter()
    for document in text.split(END_OF_TEXT):
        chunk_counts.update(regex.findall(GPT2_SPLIT_PATTERN, document))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]   # chunks as ids
    counts = list(chunk_counts.values())

    token_bytes = [bytes([value]) for value in range(256)]   # id -> bytes
    id_of_bytes = {piece: rank for rank, piece in enumerate(token_bytes)}
    pair_counts = Counter()            # (left id, right id) -> occurrences in the text
    pair_words = defaultdict(set)      # (left id, right id) -> chunks that contain it
    for index, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            pair_words[pair].add(index)
    # Python's heapq pops the smallest item, so we store (-count, pair). A count that
    # changes gets a fresh entry; the old one is left behind and skipped when popped.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(token_bytes) < vocab_size - 1 and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -negative_count:
            continue                                   # stale entry: count changed
        merged_bytes = token_bytes[pair[0]] + token_bytes[pair[1]]
        # Rarely, two different pairs spell the same bytes ("a"+"bc", "ab"+"c").
        # tiktoken keys tokens by their bytes, so the second merge reuses the id.
        new_id = id_of_bytes.get(merged_bytes)
        if new_id is None:
            new_id = id_of_bytes[merged_bytes] = len(token_bytes)
            token_bytes.append(merged_bytes)
        changed = set()
        # exercise: rewrite each chunk holding the pair; update the pair counts and their chunks
        for index in pair_words.pop(pair):
            word, count = words[index], counts[index]
            merged, position = [], 0                   # replace the pair, left to right:
            while position < len(word):                # (a, a, a) -> (aa, a)
                if position + 1 < len(word) and (word[position], word[position + 1]) == pair:
                    merged.append(new_id)
                    position += 2
                else:
                    merged.append(word[position])
                    position += 1
            if len(merged) == len(word):
                continue                               # the pair had left this chunk
            for old in zip(word, word[1:]):            # forget the chunk's old pairs ...
                pair_counts[old] -= count
                changed.add(old)
            for new in zip(merged, merged[1:]):        # ... and count its new ones
                pair_counts[new] += count
                pair_words[new].add(index)
                changed.add(new)
            words[index] = merged
        # end exercise
        for changed_pair in changed:
            count = pair_counts[changed_pair]
            if count > 0:
                heapq.heappush(heap, (-count, changed_pair))
            else:                                      # gone from every chunk
                del pair_counts[changed_pair]
                pair_words.pop(changed_pair, None)
    return id_of_bytes


def bpe_encode(text, mergeable_ranks):
    """Encode `text` to token ids in pure Python, the way tiktoken does: cut it into
    chunks with GPT2_SPLIT_PATTERN; start each chunk as single bytes; repeatedly merge
    the neighbouring pair whose joined bytes have the lowest rank (the earliest
    learned merge), leftmost first, until no pair is a token. END_OF_TEXT in `text`
    is ordinary text here (13 characters), like tiktoken's `encode_ordinary`.

    Chunks repeat (Zipf's law: a few words make up most of any text), so each
    distinct chunk is encoded once and remembered for the rest of the call."""
    ids, remembered = [], {}
    for chunk in regex.findall(GPT2_SPLIT_PATTERN, text):
        if chunk not in remembered:
            parts = [bytes([value]) for value in chunk.encode("utf-8")]
            # exercise: merge the neighbouring pair of lowest rank until no pair is a token
            while len(parts) > 1:
                best_rank, best_position = None, None
                for position in range(len(parts) - 1):
                    rank = mergeable_ranks.get(parts[position] + parts[position + 1])
                    if rank is not None and (best_rank is None or rank < best_rank):
                        best_rank, best_position = rank, position
                if best_rank is None:
                    break                              # no neighbouring pair is a token
                parts[best_position:best_position + 2] = [parts[best_position]
                                                          + parts[best_position + 1]]
            # end exercise
            remembered[chunk] = [mergeable_ranks[part] for part in parts]
        ids.extend(remembered[chunk])
    return ids


def make_encoding(mergeable_ranks, name="course-bpe"):
    """A `tiktoken.Encoding` with our learned merges and GPT-2's splitting rule, and
    END_OF_TEXT as the one special token, numbered right after the merges."""
    return tiktoken.Encoding(name=name, pat_str=GPT2_SPLIT_PATTERN,
                             mergeable_ranks=mergeable_ranks,
                             special_tokens={END_OF_TEXT: len(mergeable_ranks)})


def gpt2_encoding(timeout=15.0):
    """GPT-2's own tokenizer from tiktoken (50,257 tokens), or None when its two files
    are neither cached (under data/tiktoken) nor downloadable.

    tiktoken fetches the files with no time limit, so a network that swallows packets
    could hang it for minutes; we wait at most `timeout` seconds in a background
    thread and then carry on without it. Offline it usually fails at once."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join("data", "tiktoken"))
    found = []

    def fetch():
        try:
            found.append(tiktoken.get_encoding("gpt2"))
        except Exception:  # whatever tiktoken's HTTP client raises offline, or a bad hash
            pass

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout)
    return found[0] if found else None


# %% [markdown]
# ## Training the tokenizer on the training documents
#
# Documents are joined with END_OF_TEXT, which train_bpe cuts at again: no merge may
# span two documents. The timing is the headline figure of this step. The first merges
# are the commonest pairs (spaces, "th", "he"); the longest tokens show what the corpus
# repeats most: in the Python documentation, the borders of its ASCII tables, which BPE
# learns as single tokens. Last, one sentence cut into its tokens shows a rare word
# ("Pythonista") falling apart into pieces.

# %%
if __name__ == "__main__" and MODE == "lesson":
    train_text = END_OF_TEXT.join(train_documents)
    train_bytes = len(train_text.encode("utf-8"))
    clock = time.perf_counter()
    mergeable_ranks = train_bpe(train_text, ARGS.vocab_size)
    train_seconds = time.perf_counter() - clock
    encoding = make_encoding(mergeable_ranks)
    print(f"trained BPE on {train_bytes:,} bytes: {encoding.n_vocab} tokens "
          f"({len(mergeable_ranks) - 256} merges + {END_OF_TEXT} as id {encoding.eot_token}) "
          f"in {train_seconds:.2f} s")
    if encoding.n_vocab < ARGS.vocab_size:
        print(f"  note: the text ran out of pairs to merge before {ARGS.vocab_size} tokens")
    by_rank = sorted(mergeable_ranks, key=mergeable_ranks.get)
    print("  first merges:", " ".join(repr(piece.decode("utf-8", "replace"))
                                      for piece in by_rank[256:266]))
    print("  longest tokens:", " ".join(repr(piece.decode("utf-8", "replace")) for piece in
                                        sorted(by_rank[256:], key=len)[-5:]))
    example = "The tokenizer splits unfamiliar words like Pythonista into pieces."
    print("  " + "|".join(encoding.decode_single_token_bytes(token).decode("utf-8", "replace")
                          for token in encoding.encode_ordinary(example)))
    figures.update(vocab_size=encoding.n_vocab, train_bytes=train_bytes,
                   bpe_seconds=round(train_seconds, 2))


# %% [markdown]
# ## Checking the tokenizer
#
# Two promises must hold for *any* string, not just the English we trained on:
#
# 1. the pure-Python encoder and tiktoken give the same ids, so tiktoken really is
#    "our tokenizer, only faster";
# 2. decoding the ids gives back the exact string (`decode(encode(s)) == s`). This is
#    what byte-level BPE buys: every string is UTF-8 bytes, and every byte is a token.
#    ("Every string" means every valid Unicode text. Python also allows a lone half
#    of a UTF-16 surrogate pair, "\ud800", which has no UTF-8 form and cannot occur in
#    a text file; tiktoken replaces it with "\ufffd" and our encoder refuses it.)
#
# The strings below are chosen to break weaker tokenizers: emoji (4 bytes in UTF-8),
# a family emoji made of several joined by zero-width joiners, flags made of two
# "regional indicator" letters, combining accents that are *not* normalised (decode
# must not "fix" them), Chinese and Japanese, right-to-left Arabic and Hebrew, control
# characters, odd whitespace, and the special token's text itself inside a document.
#
# One honest limit: the pure-Python encoder classifies characters with the `regex`
# module's Unicode tables and tiktoken with those compiled into its Rust code. For the
# handful of characters added to Unicode in its newest versions (rare letters of
# historic scripts), the two tables can disagree on "is this a letter?", and then so
# do the chunks. For every character of the long-established scripts they agree.

# %%
HARD_STRINGS = [
    "Hello, world! It's 3.14159 o'clock; we'll see.",
    "emoji: 🤖🚀 family: 👨‍👩‍👧‍👦 flag: 🇫🇷 skin tone: 👍🏽",
    "combining: e\u0301 a\u0308 n\u0303 (not normalised) vs é ä ñ; Zalgo: Z\u0351\u0334a\u0362",
    "中文分词很难。日本語のテキスト、カタカナ。한국어 문장.",
    "RTL: שלום עולם and مرحبا بالعالم mixed with English 123.",
    "control \x00\x01\x1b[31m red \x7f\x85 and tabs\tand\r\nline endings\u2028sep",
    "spaces:   three,\u00a0no-break,\u3000ideographic, trailing   ",
    "a document that mentions <|endoftext|> in its text",
    "numbers ½ ² ٣ 〇 Ⅻ and math ∑∫√ and code: x += 1  # comment",
    "",
]


def tokenizer_checks(mergeable_ranks, encoding, texts):
    """(identical, round_trip): whether bpe_encode equals tiktoken's encode_ordinary on
    every text, and whether decoding gives every text back."""
    identical = all(bpe_encode(text, mergeable_ranks) == encoding.encode_ordinary(text)
                    for text in texts)
    round_trip = all(encoding.decode(encoding.encode_ordinary(text)) == text
                     for text in texts)
    return identical, round_trip


if __name__ == "__main__" and MODE == "lesson":
    # On the hard strings and on 100,000 characters of held-out text. The special
    # token's text inside a document shows the three ways tiktoken can treat it:
    # refuse (the default of encode), plain text (encode_ordinary), or the special id.
    valid_text = END_OF_TEXT.join(valid_documents)
    sample = valid_text[:100_000]
    identical, round_trip = tokenizer_checks(mergeable_ranks, encoding, HARD_STRINGS + [sample])
    print(f"pure Python and tiktoken give identical ids: {identical}; "
          f"decode(encode(s)) == s on hard strings: {round_trip}")
    special = "one document<|endoftext|>another"
    try:
        encoding.encode(special)
        print("  (unexpected) tiktoken encoded the special token's text without being asked")
    except ValueError:
        print(f"  text containing {END_OF_TEXT} is refused by encode() unless allowed; as "
              f"ordinary text it is {len(encoding.encode_ordinary(special))} tokens, as the "
              f"special token {len(encoding.encode(special, allowed_special='all'))}")
    figures.update(identical_ids=identical, round_trip=round_trip)


# %% [markdown]
# ## Speed and compression
#
# Pure Python is timed on the 100,000-character sample (it is the slow one), tiktoken
# on the whole training text; each the best of three runs, because a run can only be
# slowed down by whatever else the machine is doing, never sped up, so the fastest is
# the fairest figure.
#
# Compression is bytes per token: how many bytes of text one token stands for on
# average, on the training text and on the held-out text the merges were not learned
# from; more bytes per token means shorter sequences for the same text, so a model with
# a fixed context length sees more of it. Compression at smaller
# vocabularies costs nothing extra to measure: the first k ranks of a BPE vocabulary are
# themselves a complete tokenizer (the k - 256 merges learned first), so we cut the
# dictionary and encode again. GPT-2's own tokenizer, when its files are cached or can
# be downloaded, is the yardstick: 50,257 tokens trained on web text.

# %%
def bytes_per_token(encoding, texts):
    """Compression: UTF-8 bytes of `texts` divided by the tokens they encode to."""
    data = sum(len(text.encode("utf-8")) for text in texts)
    return data / max(sum(len(encoding.encode_ordinary(text)) for text in texts), 1)


def best_time(function, *arguments, repeats=3):
    """The fastest of `repeats` timed calls, in seconds: the least disturbed by
    whatever else the machine is doing."""
    times = []
    for _ in range(repeats):
        clock = time.perf_counter()
        function(*arguments)
        times.append(time.perf_counter() - clock)
    return min(times)


if __name__ == "__main__" and MODE == "lesson":
    pure_speed = len(sample.encode("utf-8")) / best_time(bpe_encode, sample, mergeable_ranks) / 1e6
    tiktoken_speed = train_bytes / best_time(encoding.encode_ordinary, train_text) / 1e6
    print(f"encoding speed: pure Python {pure_speed:.2f} MB/s, tiktoken {tiktoken_speed:.1f} "
          f"MB/s ({tiktoken_speed / pure_speed:.0f}x)")
    vocab_sizes = [size for size in (256, 512, 1024, 2048, 4096, 8192, 16384)
                   if size < len(mergeable_ranks)] + [len(mergeable_ranks)]
    train_compression, valid_compression = [], []
    for size in vocab_sizes:
        smaller = make_encoding({piece: rank for piece, rank in mergeable_ranks.items()
                                 if rank < size}, name=f"course-bpe-{size}")
        train_compression.append(bytes_per_token(smaller, train_documents))
        valid_compression.append(bytes_per_token(smaller, valid_documents))
    print(f"compression: {train_compression[-1]:.2f} bytes/token on training text, "
          f"{valid_compression[-1]:.2f} on held-out text (single bytes: 1.00)")
    gpt2 = gpt2_encoding()
    gpt2_compression = bytes_per_token(gpt2, valid_documents) if gpt2 else None
    if gpt2:
        print(f"  GPT-2's tokenizer (50,257 tokens, trained on web text): "
              f"{gpt2_compression:.2f} bytes/token on the same held-out text")
    else:
        print("  GPT-2's tokenizer files are not cached and could not be downloaded "
              "(offline?); skipping that comparison")
    figures.update(bytes_per_token=round(valid_compression[-1], 3),
                   gpt2_bytes_per_token=gpt2_compression and round(gpt2_compression, 3),
                   pure_python_mb_s=round(pure_speed, 2),
                   tiktoken_mb_s=round(tiktoken_speed, 1))


# %% [markdown]
# ## Token shards: a tiny binary file format
#
# Token ids are small integers. Written as text ("464 3290 ...") they would take
# about 5 bytes each and need parsing; written as raw 16-bit integers they take 2
# bytes each and load with one call, straight into a numpy array, or are
# *memory-mapped*: the operating system reads only the pages we touch, so shards far
# bigger than memory are fine. 16 bits hold ids up to 65,535, enough for GPT-2's
# 50,257 tokens; bigger vocabularies need 32 bits.
#
# A raw file has no way to say what it is, nor which tokenizer its numbers belong
# to: id 464 is " The" for one tokenizer and "ing" for another, and a model fed
# shards of the wrong tokenizer trains on noise without any error. So each shard
# starts with a 48-byte header:
#
#     bytes 0-7    magic       b"Z2GTOKEN": "this is a token shard" (anything else: not ours)
#     bytes 8-11   version     2: lets a future format change be detected, not misread
#     bytes 12-15  itemsize    2 (uint16 ids, vocabulary of at most 65,536) or 4 (uint32)
#     bytes 16-23  count       the number of tokens that follow
#     bytes 24-31  vocab_size  the tokenizer's vocabulary: every id in the shard is below it
#     bytes 32-47  digest      the tokenizer's fingerprint (below)
#
# all little-endian, then `count * itemsize` bytes of ids. The tokenizer's
# *fingerprint* is the first 16 bytes of the SHA-256 of its complete description:
# every token's bytes and id, in the tokenizer file's own format (one line
# "base64-bytes id" per token, by id), then one line per special token. Two
# tokenizers with the same fingerprint give every text the same ids; any other pair
# differs (16 bytes make an accidental match a 1-in-2^128 event), and the same
# training on the same text gives the same fingerprint in every run.
#
# A reader checks everything: magic, version, an id size that fits the vocabulary,
# the file's length, that the largest id is below the vocabulary, and, when it is
# told which tokenizer to expect, the vocabulary and the fingerprint. A truncated
# copy, somebody else's file or shards of another tokenizer are refused with a clear
# message instead of becoming garbage tokens. Writes go to a temporary file that is
# renamed into place, so a crash never leaves half a shard under the real name.

# %%
SHARD_MAGIC = b"Z2GTOKEN"
SHARD_VERSION = 2
# magic, version, bytes per id, token count, vocabulary size, tokenizer fingerprint
SHARD_HEADER = struct.Struct("<8sIIQQ16s")
ShardHeader = namedtuple("ShardHeader", "version itemsize count vocab_size digest")
NO_DIGEST = bytes(16)    # "tokenizer unknown": for shards of made-up ids (tests, benchmarks)


def tokenizer_digest(encoding):
    """The tokenizer's 16-byte fingerprint: the start of the SHA-256 of its tokens,
    each as "base64-bytes id" by id, then its special tokens as "special name id"."""
    digest = hashlib.sha256()
    for piece, rank in sorted(encoding._mergeable_ranks.items(), key=lambda item: item[1]):
        digest.update(b"%s %d\n" % (base64.b64encode(piece), rank))
    for name, token in sorted(encoding._special_tokens.items()):
        digest.update(b"special %s %d\n" % (base64.b64encode(name.encode("utf-8")), token))
    return digest.digest()[:16]


def shard_dtype(vocab_size):
    """The id type of a shard: uint16 for vocabularies of at most 65,536, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_shard(path, tokens, vocab_size=None, digest=NO_DIGEST):
    """Write token ids to `path` as a shard: the header, then the ids as uint16 or
    uint32 (`shard_dtype`). `vocab_size` is the tokenizer's (every id must be below
    it; default: the largest id + 1) and `digest` its `tokenizer_digest`. Atomic: a
    temporary file, then a rename."""
    tokens = np.asarray(tokens)
    if vocab_size is None:
        vocab_size = int(tokens.max()) + 1 if tokens.size else 1
    if not 1 <= vocab_size <= 2**32 or len(digest) != 16:
        raise DataError(f"shard {path}: vocabulary size {vocab_size} must lie in 1..2**32 "
                        f"and the tokenizer digest must be 16 bytes")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DataError(f"token ids for shard {path} must lie in 0..{vocab_size - 1}")
    dtype = shard_dtype(vocab_size)
    temporary = path + ".part"
    try:
        with open(temporary, "wb") as file:
            file.write(SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, dtype.itemsize,
                                         tokens.size, vocab_size, digest))
            tokens.astype(dtype, copy=False).tofile(file)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_shard_header(path):
    """The ShardHeader of the shard at `path`, checked: a DataError for a missing
    file, a foreign file (bad magic), an unknown version, an id size that does not
    fit the vocabulary, or a file length that disagrees with the token count."""
    if not os.path.isfile(path):
        raise DataError(f"token shard {path} does not exist; write shards with 09_data.py")
    size = os.path.getsize(path)
    if size < SHARD_HEADER.size:
        raise DataError(f"token shard {path} is truncated: {size} bytes, shorter than "
                        f"its {SHARD_HEADER.size}-byte header")
    with open(path, "rb") as file:
        magic, *fields = SHARD_HEADER.unpack(file.read(SHARD_HEADER.size))
    header = ShardHeader(*fields)
    if magic != SHARD_MAGIC:
        raise DataError(f"{path} is not a token shard (bad magic {magic!r}, expected "
                        f"{SHARD_MAGIC!r})")
    if header.version != SHARD_VERSION:
        raise DataError(f"token shard {path} has format version {header.version}; this "
                        f"code reads version {SHARD_VERSION}; write the shards again")
    if not 1 <= header.vocab_size <= 2**32 or \
            header.itemsize != shard_dtype(header.vocab_size).itemsize:
        raise DataError(f"token shard {path} has a damaged header: {header.itemsize}-byte "
                        f"ids for a vocabulary of {header.vocab_size}; write it again")
    expected = SHARD_HEADER.size + header.count * header.itemsize
    if size != expected:
        raise DataError(f"token shard {path} has the wrong length: its header promises "
                        f"{header.count} tokens ({expected} bytes) but the file has {size} "
                        f"bytes (truncated or damaged; write it again)")
    return header


def read_shard(path, vocab_size=None, digest=None):
    """The token ids of the shard at `path` as a read-only numpy array (memory-mapped:
    pages are read from disk only when used), after every check of
    `read_shard_header`, a check that its largest id is below its vocabulary, and,
    when given, that it was written with a tokenizer of `vocab_size` tokens and
    fingerprint `digest`. Each failed check is a DataError."""
    header = read_shard_header(path)
    if ((vocab_size is not None and header.vocab_size != vocab_size) or
            (digest is not None and header.digest != digest)):
        raise DataError(f"token shard {path} was written with another tokenizer "
                        f"({header.vocab_size} tokens, fingerprint {header.digest.hex()}) "
                        f"than the one expected ({vocab_size} tokens, fingerprint "
                        f"{digest.hex() if digest else 'any'}); shard the corpus again "
                        f"with this tokenizer")
    dtype = shard_dtype(header.vocab_size)
    if header.count == 0:
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=SHARD_HEADER.size,
                       shape=(header.count,))
    largest = int(tokens.max())
    if largest >= header.vocab_size:
        raise DataError(f"token shard {path} holds id {largest}, not below its vocabulary "
                        f"of {header.vocab_size} tokens (damaged); write it again")
    return tokens


def check_shards(paths, vocab_size=None, digest=None):
    """The headers of the shards at `paths`, each read and checked by `read_shard` one
    at a time; all must share one tokenizer: `vocab_size` and `digest` when given,
    else those of the first shard."""
    headers = []
    for path in paths:
        read_shard(path, vocab_size, digest)
        headers.append(read_shard_header(path))
        vocab_size, digest = headers[0].vocab_size, headers[0].digest
    return headers


# %% [markdown]
# ## Encoding in parallel and writing shards
#
# tiktoken is fast, but one Python process still uses one core. Documents are
# independent, so a pool of worker processes can each encode some of them. Each
# worker receives the `Encoding` once (when it starts, not with every document), and
# the documents go out in batches and come back *in order*, so the shards come out
# the same whatever the number of workers. At most two batches per worker are out
# at any time: the obvious `pool.imap` would read ahead through *all* of its input
# to keep the workers busy, which is harmless for a list already in memory and fatal
# for a corpus streamed from disk (below), whose whole point is never to hold it.
#
# Starting processes is why every step of the run sits behind `if __name__ ==
# "__main__"`, and why the workers' functions are defined at the top level of the file.
# On macOS and Windows each worker starts a fresh Python ("spawn") that imports this
# file to find `encode_batch`; without the guard, every worker would start the whole
# pipeline again. A notebook's cells are no file that a fresh Python can import, so
# there, unless workers are forked copies of the notebook (Linux), the documents are
# encoded in the notebook's own process.
#
# Documents are ordinary text, encoded with `encode_ordinary`: a document containing
# the characters `<|endoftext|>` gets them as ordinary tokens. The real special token
# is put *after* every document by our code (as chapter 13 does), so every document
# ends with one and every document but the first starts right after one: a model
# trained on the shards learns that `<|endoftext|>` means "this document is over",
# and sampling after it starts a new one.
#
# The shards of one run form a set, written together into a folder: the validation
# shards `valid_000000.bin, valid_000001.bin, ...` and the training shards
# `train_000000.bin, ...`, each of exactly `shard_tokens` tokens but the last of its
# split (a shard often ends in the middle of a document: the loader joins them back
# into one stream); the tokenizer, in tiktoken's file format, as `tokenizer.tiktoken`
# (the shards are numbers, and only this file says which text each number stands
# for); and `manifest.json`, which lists the shards of each split by name with their
# token counts, and the tokenizer's vocabulary, fingerprint and end-of-text id. A
# reader takes the splits from the manifest, never from guessing at file names.
#
# Everything is written into a fresh folder beside the real one, which replaces it
# only once the last file is complete: a run that fails half-way, or is stopped,
# leaves the shards of the previous run as they were.

# %%
worker_encoding = None   # the Encoding inside each worker process


def start_worker(encoding):
    """Pool initializer: keep the encoding for this worker's documents."""
    global worker_encoding
    worker_encoding = encoding


def encode_batch(documents):
    """One uint32 array: each document's tokens, then `<|endoftext|>`, in order."""
    arrays = [np.array(worker_encoding.encode_ordinary(document)
                       + [worker_encoding.eot_token], dtype=np.uint32) for document in documents]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint32)


def usable_workers(workers):
    """`workers`, or 1 in a notebook that cannot start fresh worker processes."""
    if workers > 1 and in_notebook() and multiprocessing.get_start_method() != "fork":
        print(f"note: a notebook cannot start {workers} fresh worker processes on this "
              f"system; encoding in this one")
        return 1
    return workers


def encode_batches(encoding, batches, workers=1):
    """For each (tag, documents) of `batches`, in order: (tag, `encode_batch` of the
    documents), with `workers` processes (1: this one). At most 2 batches per worker
    are out at a time, so `batches` may be a stream of any length."""
    workers = usable_workers(workers)
    if workers <= 1:
        start_worker(encoding)
        for tag, documents in batches:
            yield tag, encode_batch(documents)
        return
    # `pending` is a queue of batches handed out, oldest first: results are taken in
    # the order the batches were given, whichever worker finishes first.
    with multiprocessing.Pool(workers, initializer=start_worker,
                              initargs=(encoding,)) as pool:
        pending = deque()
        for tag, documents in batches:
            pending.append((tag, pool.apply_async(encode_batch, (documents,))))
            if len(pending) >= 2 * workers:
                tag, result = pending.popleft()
                yield tag, result.get()
        while pending:
            tag, result = pending.popleft()
            yield tag, result.get()


def in_groups(items, size):
    """Lists of `size` consecutive items (the last one shorter)."""
    items = iter(items)
    while group := list(itertools.islice(items, size)):
        yield group


def encode_documents(encoding, documents, workers=1):
    """The token ids of `documents` as one uint32 array, `<|endoftext|>` after each
    document, encoded by `workers` processes."""
    batches = (("", group) for group in in_groups(documents, 64))
    return np.concatenate([np.zeros(0, dtype=np.uint32)] +
                          [tokens for _, tokens in encode_batches(encoding, batches, workers)])


# %% jupyter={"source_hidden": true}
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.tiktoken"
SHARD_NAME = regex.compile(r"(train|valid)_\d{6}\.bin")


def save_merges(mergeable_ranks, path):
    """Save the tokenizer in tiktoken's own file format (one "base64-bytes rank" line
    per token), so `tiktoken.load.load_tiktoken_bpe(path)` reads it back."""
    temporary = path + ".part"
    with open(temporary, "w") as file:
        for piece, rank in sorted(mergeable_ranks.items(), key=lambda item: item[1]):
            file.write(f"{base64.b64encode(piece).decode()} {rank}\n")
    os.replace(temporary, path)


def load_tokenizer(path, name="course-bpe"):
    """The tokenizer saved at `path` by `save_merges`, as a tiktoken Encoding with
    END_OF_TEXT after its tokens. A file that is not one is a DataError."""
    ranks = {}
    try:
        with open(path, "rb") as file:
            for line in file:
                if line.strip():
                    piece, rank = line.split()
                    ranks[base64.b64decode(piece, validate=True)] = int(rank)
    except (OSError, ValueError):   # unreadable, not two fields, bad base64 or number
        ranks = {}
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))) or \
            any(bytes([value]) not in ranks for value in range(256)):
        raise DataError(f"{path} is not a tokenizer file written by 09_data.py (one "
                        f"\"base64-bytes id\" line per token, every byte a token)")
    return make_encoding(ranks, name)


def check_replaceable(folder):
    """Refuse to replace `folder` when it holds anything but shards of this chapter."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DataError(f"{folder} is a file, not a shard folder; choose another --out")
    if os.path.isdir(folder):
        foreign = [name for name in sorted(os.listdir(folder)) if name not in
                   (MANIFEST, TOKENIZER_FILE) and not SHARD_NAME.fullmatch(name)]
        if foreign:
            raise DataError(f"folder {folder} holds {foreign[0]}, which is not a shard, and "
                            f"new shards replace the folder; choose another --out")


def replace_folder(new, folder):
    """Put the complete folder `new` in the place of `folder` (two renames)."""
    # A rename within one file system is atomic: readers see the old folder or the
    # new one, never a mix. Between the two renames `folder` is briefly absent; a
    # crash there leaves both sets complete, under `new` and `new + ".old"`.
    if os.path.exists(folder):
        old = new + ".old"
        os.rename(folder, old)
        os.rename(new, folder)
        shutil.rmtree(old)
    else:
        os.rename(new, folder)


# %%
class ShardFolder:
    """A set of shards, written as the tokens come: `add(split, tokens)` appends ids
    to split "train" or "valid", and every `shard_tokens` of them become one shard.
    Used in a `with` block: at its end the last shards, the tokenizer file and the
    manifest are written, then the folder replaces `folder`; if the block fails, the
    new files are deleted and `folder` is left untouched. Memory: one buffer of
    `shard_tokens` ids per split."""

    def __init__(self, folder, encoding, shard_tokens, name="course-bpe"):
        check_replaceable(folder)
        self.folder, self.encoding, self.name = folder, encoding, name
        self.staging = folder.rstrip("/\\") + f".part-{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)    # left by a crashed run
        os.makedirs(self.staging)
        self.vocab_size, self.digest = encoding.n_vocab, tokenizer_digest(encoding)
        dtype = shard_dtype(self.vocab_size)
        # np.empty only reserves the memory: the operating system hands out pages as
        # they are first written, so a split that stays small costs little.
        self.buffers = {split: np.empty(shard_tokens, dtype) for split in ("train", "valid")}
        self.filled = {"train": 0, "valid": 0}
        self.files = {"train": [], "valid": []}
        self.details = {}                  # more facts for the manifest, from the caller

    def add(self, split, tokens):
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise DataError(f"token id {int(tokens.max())} is not below the vocabulary "
                            f"of {self.vocab_size}")
        # Copy as much as fits into the split's buffer; a full buffer becomes a shard
        # and starts again empty, so one batch may complete several shards, and a
        # shard may hold the end of one batch and the start of the next.
        buffer = self.buffers[split]
        while len(tokens):
            start = self.filled[split]
            piece = tokens[:len(buffer) - start]
            buffer[start:start + len(piece)] = piece
            self.filled[split] += len(piece)
            tokens = tokens[len(piece):]
            if self.filled[split] == len(buffer):
                self.flush(split)

    def flush(self, split):
        """Write the buffered ids of `split`, if any, as its next shard."""
        if self.filled[split]:
            name = f"{split}_{len(self.files[split]):06d}.bin"
            write_shard(os.path.join(self.staging, name),
                        self.buffers[split][:self.filled[split]], self.vocab_size, self.digest)
            self.files[split].append({"file": name, "tokens": self.filled[split]})
            self.filled[split] = 0

    def paths(self, split):
        return [os.path.join(self.folder, entry["file"]) for entry in self.files[split]]

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        try:
            if kind is None:
                self.finish()
        finally:
            if os.path.exists(self.staging):          # failed: drop the new files
                shutil.rmtree(self.staging, ignore_errors=True)
        return False

    def finish(self):
        for split in self.files:
            self.flush(split)
        for split, words in (("valid", "validation"), ("train", "training")):
            if not self.files[split]:
                raise DataError(f"no document went to the {words} shards; give the "
                                f"corpus more documents or change --valid-fraction")
        save_merges(self.encoding._mergeable_ranks, os.path.join(self.staging, TOKENIZER_FILE))
        with open(os.path.join(self.staging, MANIFEST), "w") as file:
            json.dump(manifest_of(self), file, indent=1)
        replace_folder(self.staging, self.folder)


def manifest_of(shards):
    """The manifest of a finished ShardFolder, as a dict for JSON."""
    return {"format": SHARD_MAGIC.decode(), "version": SHARD_VERSION,
            "tokenizer": {"name": shards.name, "file": TOKENIZER_FILE,
                          "vocab_size": shards.vocab_size, "digest": shards.digest.hex(),
                          "end_of_text": shards.encoding.eot_token},
            "end_of_text": "after each document",
            "dtype": shard_dtype(shards.vocab_size).name,
            "train": shards.files["train"], "valid": shards.files["valid"], **shards.details}


def read_manifest(folder, vocab_size=None, digest=None):
    """The shard set in `folder`, from its manifest, every shard checked: a dict with
    "train" and "valid" (lists of shard paths, in order), "tokenizer" (the manifest's
    record, its "file" made a path) and "manifest" (the whole manifest). Each shard
    must exist, pass `read_shard`, hold the manifest's token count and carry the
    manifest's tokenizer, which must be `vocab_size` and `digest` when given."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as file:
            manifest = json.load(file)
        tokenizer = manifest["tokenizer"]
        listed = {split: [(entry["file"], int(entry["tokens"])) for entry in manifest[split]]
                  for split in ("train", "valid")}
        expected = int(tokenizer["vocab_size"]), bytes.fromhex(tokenizer["digest"])
    except FileNotFoundError:
        raise DataError(f"{folder} holds no {MANIFEST}; write shards there with "
                        f"python 09_data.py --out DIR (they go to DIR/shards)")
    except (OSError, ValueError, KeyError, TypeError):   # not JSON, a field missing
        raise DataError(f"{path} is damaged (not the JSON manifest 09_data.py writes); "
                        f"write the shards again")
    if ((vocab_size is not None and expected[0] != vocab_size) or
            (digest is not None and expected[1] != digest)):
        raise DataError(f"the shards in {folder} were written with another tokenizer "
                        f"({expected[0]} tokens, fingerprint {expected[1].hex()}); shard "
                        f"the corpus again with this one")
    # Each shard is checked against the manifest, not only against itself: a shard
    # copied in from another set, or one left behind by an older run, would pass its
    # own checks and still be the wrong data.
    result = {"tokenizer": {**tokenizer, "file": os.path.join(folder, tokenizer["file"])},
              "manifest": manifest}
    for split, entries in listed.items():
        result[split] = [os.path.join(folder, name) for name, _ in entries]
        headers = check_shards(result[split], *expected)
        for (name, count), header in zip(entries, headers):
            if header.count != count:
                raise DataError(f"shard {name} in {folder} holds {header.count} tokens, "
                                f"its manifest says {count}; write the shards again")
    return result


def write_shards(valid_documents, train_documents, encoding, folder, shard_tokens,
                 workers=1):
    """Encode the documents with `workers` processes and write them, in order, as a
    shard set in `folder` (`ShardFolder`). Returns (validation paths, training paths)."""
    batches = itertools.chain(
        (("valid", group) for group in in_groups(valid_documents, 64)),
        (("train", group) for group in in_groups(train_documents, 64)))
    with ShardFolder(folder, encoding, shard_tokens) as shards:
        for split, tokens in encode_batches(encoding, batches, workers):
            shards.add(split, tokens)
        shards.details["documents"] = {"valid": len(valid_documents),
                                       "train": len(train_documents)}
    return shards.paths("valid"), shards.paths("train")


if __name__ == "__main__" and MODE == "lesson":
    folder = os.path.join(ARGS.out, "shards")
    clock = time.perf_counter()
    valid_paths, train_paths = write_shards(valid_documents, train_documents, encoding,
                                            folder, ARGS.shard_tokens, ARGS.workers)
    shard_seconds = time.perf_counter() - clock
    shard_set = read_manifest(folder, encoding.n_vocab, tokenizer_digest(encoding))
    valid_tokens = sum(len(read_shard(path)) for path in valid_paths)
    train_tokens = sum(len(read_shard(path)) for path in train_paths)
    print(f"wrote {len(valid_paths) + len(train_paths)} shards, {TOKENIZER_FILE} and "
          f"{MANIFEST} to {folder} with {ARGS.workers} worker(s) in {shard_seconds:.2f} s: "
          f"validation {valid_tokens:,} tokens, training {train_tokens:,} tokens, ids as "
          f"{shard_set['manifest']['dtype']}, tokenizer fingerprint "
          f"{shard_set['tokenizer']['digest'][:16]}...")
    # The strongest check of the whole path: the shards decode back to exactly the
    # documents, each followed by one <|endoftext|>, in order, whatever the number of
    # workers; and the saved tokenizer file is the same tokenizer (same fingerprint).
    decoded = encoding.decode(np.concatenate([read_shard(path) for path in
                                              valid_paths + train_paths]).tolist())
    shards_exact = decoded == "".join(document + END_OF_TEXT for document in
                                      valid_documents + train_documents)
    same_tokenizer = (tokenizer_digest(load_tokenizer(shard_set["tokenizer"]["file"]))
                      == tokenizer_digest(encoding))
    print(f"  the shards decode back to the documents exactly: {shards_exact}; the "
          f"saved tokenizer file has the same fingerprint: {same_tokenizer}")
    figures.update(valid_tokens=valid_tokens, train_tokens=train_tokens,
                   shards=len(valid_paths) + len(train_paths),
                   shards_exact=shards_exact and same_tokenizer)


# %% [markdown]
# ## Sharding a corpus of any size
#
# Everything so far held the whole corpus in memory: fine for a few megabytes, and
# impossible for the 10 billion tokens (some 45 GB of text) that GPT-2 small is
# trained on. `shard_documents` does the same job as a stream: it takes the
# documents one at a time, from any iterable (`stream_documents` reads them from
# files), and at no moment holds more than
#
# * one piece of the file being read (a megabyte) and the paragraph being cut from it;
# * one batch of documents per worker being encoded (about a megabyte of text each);
# * the shard being filled: `--shard-tokens` ids (10 million by default: 20 MB as uint16);
# * the fingerprints of the documents seen, for exact deduplication: 8 bytes of
#   BLAKE2b per document, kept as Python integers in a set, about 70 bytes each (10
#   million documents: 700 MB; two different documents share a fingerprint with
#   probability about n^2 / 2^65, one in 400,000 for 10 million of them).
#
# The last item is the only one that grows with the corpus, and slowly: memory does
# not depend on how many bytes the corpus has, only on how many documents. Near
# duplicates are not removed here: MinHash (above) keeps every kept document's band
# keys and shingles, which grow with the corpus; at this scale, near deduplication is
# a pass of its own before sharding, with band tables on disk.
#
# Validation documents cannot be "the first 10%" of a stream whose length is not
# known, and the first files of a corpus are rarely a fair sample of it. So each
# document's fingerprint decides: a document goes to validation when its fingerprint,
# read as a number in [0, 2^64), is below `valid_fraction * 2^64`. That picks a
# random-looking `valid_fraction` of the documents from everywhere in the corpus,
# the same ones in every run, and a copy of a document always lands in the same
# split as the original (the copy is dropped anyway).
#
# The tokenizer is one of three (`--tokenizer`): `bpe` trains ours on a bounded
# sample, the first `--bpe-sample-mb` megabytes of the training documents (a short
# first pass over the start of the corpus; validation documents are left out, as in
# the lesson); `gpt2` is GPT-2's 50,257-token tokenizer, whose files tiktoken
# downloads once into `data/tiktoken` (offline, without them, the run stops with one
# sentence before writing anything); a file name loads a tokenizer saved by an
# earlier run, so a second corpus can be sharded with the same ids. Whichever it is,
# the shard set carries its file and its fingerprint.
#
# What is a document here: a `.txt` file given by itself is cut into paragraphs at
# blank lines, exactly as in the lesson, but read a megabyte at a time (a cut is made
# only at a blank line followed by a line of text, so it never splits what the
# whole-text cut would keep together); in a folder, each `.txt` file is one document
# (read whole: memory holds the largest file); in a `.jsonl` file, each line is a
# JSON object whose "text" is one document, which is how web corpora (FineWeb-Edu,
# for one) are exported. A file that is not valid UTF-8, or a `.jsonl` line that is
# not such an object, is named in one line and the rest of that file skipped.

# %%
PIECE_CHARACTERS = 1 << 18     # characters read from a file at a time
BATCH_CHARACTERS = 1 << 18     # characters of documents encoded as one batch
# What cleaning empties a line of: spaces and tabs, exotic spaces, control characters.
BLANK = r" \t\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
# A run of blank lines, followed by a line with something visible on it.
PARAGRAPH_BREAK = regex.compile(rf"\n(?:[{BLANK}]*\n)+(?=[{BLANK}]*[^\n{BLANK}])")


def file_paragraphs(file, piece_characters=PIECE_CHARACTERS):
    """The paragraphs of an open text file, as `split_paragraphs` of its whole text,
    read `piece_characters` at a time."""
    # `pending` is the text read but not yet cut: at most one piece plus the end of
    # the paragraph that the last cut left open.
    pending = ""
    while piece := file.read(piece_characters):
        pending += piece
        last = None
        for last in PARAGRAPH_BREAK.finditer(pending):
            pass
        if last is not None:
            yield from split_paragraphs(pending[:last.start()])
            pending = pending[last.end():]
    yield from split_paragraphs(pending)


def jsonl_documents(file, path):
    """The cleaned "text" of each line of an open .jsonl file."""
    for number, line in enumerate(file, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            text = None
        if not isinstance(text, str):   # a damaged file: its later lines are suspect too
            print(f"note: skipping the rest of {path}: line {number} is not a JSON object "
                  f"with a \"text\" string", file=sys.stderr)
            return
        document = clean_text(text)
        if document.strip():
            yield document


def corpus_files(path):
    """The files of the corpus at `path`: itself, or the .txt and .jsonl files in the
    folder and its sub-folders, in sorted order."""
    if os.path.isfile(path):
        return [path]
    found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path)
                   for name in names if name.endswith((".txt", ".jsonl")))
    if not found:
        raise DataError(f"folder {path} holds no .txt or .jsonl files; nothing to shard")
    return found


def stream_documents(path, piece_characters=PIECE_CHARACTERS):
    """The cleaned documents of the corpus at `path`, one at a time (see above)."""
    alone = os.path.isfile(path)
    for file_path in corpus_files(path):
        try:
            with open(file_path, encoding="utf-8") as file:
                if file_path.endswith(".jsonl"):
                    yield from jsonl_documents(file, file_path)
                elif alone:
                    yield from file_paragraphs(file, piece_characters)
                else:
                    document = clean_text(file.read())
                    if document.strip():
                        yield document
        except UnicodeDecodeError:
            print(f"note: skipping (the rest of) {file_path}: it is not valid UTF-8",
                  file=sys.stderr)
        except OSError as error:
            print(f"note: skipping {file_path}: {error.strerror}", file=sys.stderr)


def route_documents(documents, valid_fraction, counts):
    """(split, document) for each document that is no exact copy of an earlier one
    (short ones are always kept, as in `deduplicate`); split is "valid" when its
    fingerprint is below `valid_fraction * 2**64`, else "train". Tallies documents,
    their UTF-8 bytes and the duplicates dropped in the Counter `counts`."""
    # The fingerprint is 8 bytes of BLAKE2b (fast, and stable across runs and
    # machines, unlike Python's hash()), read as an integer in [0, 2**64).
    seen, limit = set(), valid_fraction * 2**64
    for document in documents:
        data = document.encode("utf-8")
        key = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        counts["documents"] += 1
        counts["bytes"] += len(data)
        if not is_short(document):
            if key in seen:
                counts["exact_duplicates"] += 1
                continue
            seen.add(key)
        yield ("valid" if key < limit else "train"), document


def peak_memory_mb(who="self"):
    """The peak resident memory of this process ("self") or of its largest finished
    child ("children"), in MB; None where the resource module is missing (Windows).

    On Linux, this process's own peak is read from /proc (VmHWM): `getrusage` there
    also counts the memory of the process that started this one, up to its exec."""
    if who == "self" and os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 2**10, 1)
    try:
        import resource
    except ImportError:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF if who == "self" else
                               resource.RUSAGE_CHILDREN)
    return round(usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10), 1)


# %%
def shard_documents(documents, encoding, folder, shard_tokens, valid_fraction, workers=1,
                    name="course-bpe"):
    """Stream `documents` into a shard set in `folder`: exact copies dropped, each
    document routed by `route_documents`, encoded in batches by `workers` processes,
    and written as shards of `shard_tokens` as the tokens come (`ShardFolder`).
    Returns the run's figures: documents, bytes, duplicates, tokens, MB/s."""
    counts = Counter()

    # Documents are gathered per split into batches of about BATCH_CHARACTERS, each
    # encoded as one task; the two splits' shards grow side by side.
    def batches():
        groups, sizes = {"train": [], "valid": []}, {"train": 0, "valid": 0}
        for split, document in route_documents(documents, valid_fraction, counts):
            counts[split + "_documents"] += 1
            groups[split].append(document)
            sizes[split] += len(document)
            if sizes[split] >= BATCH_CHARACTERS:
                yield split, groups[split]
                groups[split], sizes[split] = [], 0
        yield from ((split, group) for split, group in groups.items() if group)

    clock = time.perf_counter()
    with ShardFolder(folder, encoding, shard_tokens, name) as shards:
        for split, tokens in encode_batches(encoding, batches(), workers):
            shards.add(split, tokens)
            counts[split + "_tokens"] += len(tokens)
        shards.details["documents"] = {key: counts[key] for key in
                                       ("documents", "exact_duplicates", "valid_documents",
                                        "train_documents")}
    seconds = time.perf_counter() - clock
    keys = ("documents", "bytes", "exact_duplicates", "valid_documents", "train_documents",
            "valid_tokens", "train_tokens")
    return {**{key: counts[key] for key in keys}, "train_shards": len(shards.files["train"]),
            "valid_shards": len(shards.files["valid"]), "seconds": seconds,
            "mb_s": counts["bytes"] / 1e6 / max(seconds, 1e-9)}


def bpe_sample(documents, megabytes, valid_fraction):
    """The training documents at the start of `documents`, up to `megabytes` of
    UTF-8 text: what `--tokenizer bpe` trains on."""
    sample, size, counts = [], 0, Counter()
    for split, document in route_documents(documents, valid_fraction, counts):
        if split == "train":
            sample.append(document)
            size += len(document.encode("utf-8"))
            if size >= megabytes * 1e6:
                break
    return sample


# %% [markdown]
# ### The lesson's corpus, streamed
#
# The documents read at the start, before MinHash, go through `shard_documents` with
# the tokenizer trained above, as if they were far too big for memory. The exact
# duplicates it drops must be those the in-memory pass found, and its shards must
# hold exactly the ids of encoding all its training documents at once. On a corpus
# this small the speed is mostly start-up; `--shard-corpus` on a big one shows the
# real rate (the README has the measurements).

# %%
if __name__ == "__main__" and MODE == "lesson":
    streamed_folder = os.path.join(ARGS.out, "streamed-shards")
    streamed = shard_documents(iter(documents), encoding, streamed_folder, ARGS.shard_tokens,
                               ARGS.valid_fraction)
    expected_train = [document for split, document in
                      route_documents(documents, ARGS.valid_fraction, Counter())
                      if split == "train"]
    streamed_set = read_manifest(streamed_folder, encoding.n_vocab, tokenizer_digest(encoding))
    streamed_exact = bool(np.array_equal(
        np.concatenate([read_shard(path) for path in streamed_set["train"]]),
        encode_documents(encoding, expected_train)))
    print(f"streamed {streamed['documents']:,} documents ({streamed['bytes']:,} bytes) into "
          f"{streamed_folder} at {streamed['mb_s']:.1f} MB/s: dropped "
          f"{streamed['exact_duplicates']} exact duplicates (in memory: {len(exact)}); "
          f"{streamed['valid_documents']} validation and {streamed['train_documents']} "
          f"training documents, chosen by fingerprint")
    print(f"  the training shards hold exactly the ids of encoding those documents at "
          f"once: {streamed_exact}; peak memory of this process so far: "
          f"{peak_memory_mb()} MB")
    figures.update(streamed_exact=streamed_exact and
                   streamed["exact_duplicates"] == len(exact))


# %% [markdown]
# ### `--shard-corpus PATH`: only the sharding
#
# With `--shard-corpus`, the run is this cell alone: it refuses an unusable output
# folder or tokenizer before reading any text, trains or loads the tokenizer, shards
# the corpus into `--out`/shards, checks every shard against the manifest, and
# reports the speed (megabytes of text per second, reading, cleaning, deduplicating,
# encoding and writing together) and the peak memory. `--workers` encoding processes
# share the work; each reports its own peak too.

# %%
def corpus_tokenizer(args):
    """(encoding, name) for `--shard-corpus`: GPT-2's, a saved file's, or a BPE trained
    on the first `--bpe-sample-mb` of the corpus's training documents."""
    if args.tokenizer == "gpt2":
        encoding = gpt2_encoding()
        if encoding is None:
            raise DataError("GPT-2's tokenizer files are neither cached in data/tiktoken "
                            "nor downloadable (offline?); go online once, or use "
                            "--tokenizer bpe or a saved tokenizer file")
        return encoding, "gpt2"
    if args.tokenizer != "bpe":
        name = os.path.splitext(os.path.basename(args.tokenizer))[0]
        try:                            # beside shards: keep the name their manifest gives
            with open(os.path.join(os.path.dirname(args.tokenizer), MANIFEST)) as file:
                name = json.load(file)["tokenizer"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return load_tokenizer(args.tokenizer, name), name
    sample = bpe_sample(stream_documents(args.shard_corpus), args.bpe_sample_mb,
                        args.valid_fraction)
    if not sample:
        raise DataError(f"the corpus at {args.shard_corpus} has no training document to "
                        f"train the tokenizer on; give it text")
    return make_encoding(train_bpe(END_OF_TEXT.join(sample), args.vocab_size)), "course-bpe"


def shard_corpus(args, started):
    """The `--shard-corpus` run (see above); prints its own summary."""
    # Everything that can be refused is refused before the long part: an output
    # folder with foreign files, a folder with no text, an unavailable tokenizer.
    folder = os.path.join(args.out, "shards")
    check_replaceable(folder)
    corpus_files(args.shard_corpus)
    encoding, name = corpus_tokenizer(args)
    tokenizer_seconds = time.perf_counter() - started
    result = shard_documents(stream_documents(args.shard_corpus), encoding, folder,
                             args.shard_tokens, args.valid_fraction, args.workers, name)
    shard_set = read_manifest(folder, encoding.n_vocab, tokenizer_digest(encoding))
    print(f"sharded {result['bytes'] / 1e6:,.1f} MB of text ({result['documents']:,} "
          f"documents, {result['exact_duplicates']:,} exact duplicates dropped) with "
          f"{name} ({encoding.n_vocab:,} tokens) into {folder}: {result['train_tokens']:,} "
          f"training tokens in {result['train_shards']} shards, "
          f"{result['valid_tokens']:,} validation tokens in {result['valid_shards']}")
    print(f"  {result['mb_s']:.1f} MB/s with {args.workers} worker(s); peak memory "
          f"{peak_memory_mb()} MB" + (f" (each worker up to {peak_memory_mb('children')} MB)"
                                      if args.workers > 1 else "")
          + f"; tokenizer ready in {tokenizer_seconds:.1f} s")
    print_summary({"chapter": CHAPTER, "mode": "shard-corpus", "tokenizer": name,
                   "vocab_size": encoding.n_vocab,
                   "tokenizer_digest": shard_set["tokenizer"]["digest"],
                   **{key: result[key] for key in
                      ("documents", "bytes", "exact_duplicates", "train_documents",
                       "valid_documents", "train_tokens", "valid_tokens", "train_shards",
                       "valid_shards")},
                   "shard_mb_s": round(result["mb_s"], 2), "peak_memory_mb": peak_memory_mb(),
                   "worker_peak_memory_mb": peak_memory_mb("children") if args.workers > 1
                   else None, "seconds": round(time.perf_counter() - started, 1)})


if __name__ == "__main__" and MODE == "shard-corpus":
    shard_corpus(ARGS, started)


# %% [markdown]
# ## Streaming batches from shards
#
# Training reads *windows* of the token stream: `block_size + 1` consecutive tokens,
# of which the first `block_size` are the inputs and the last `block_size` the
# targets (each input's next token). Think of all shards, in order, as one long
# stream, and cut it into windows that start every `block_size` tokens:
#
#     stream:   t0 t1 t2 t3 | t4 t5 t6 t7 | t8 ...      (block_size = 4)
#     window 0: inputs t0..t3, targets t1..t4
#     window 1: inputs t4..t7, targets t5..t8
#
# Every token is an input exactly once per pass (an *epoch*), and a window may
# straddle two shards: the loader stitches the pieces, so no token at a shard
# boundary is skipped or repeated.
#
# Each epoch visits the windows in an order shuffled by `seed` and the epoch number
# (so every epoch differs, and every run with the same seed is the same). With
# several processes (`world_size` of them, one per GPU, numbered by `rank`), each step
# takes the next `batch_size * world_size` windows of that order and gives rank r the
# r-th slice of `batch_size`: the ranks' batches are disjoint, and together they form
# one big batch. All ranks run the same number of steps per epoch (data parallel
# training needs them in lock-step); the last few windows that cannot fill a whole
# step, fewer than `batch_size * world_size` of them, sit out that epoch only, since
# the next epoch's shuffle puts other windows at the end.
#
# The loader's whole position is two integers, the epoch and the step: that is what
# `state_dict()` returns, and `load_state_dict()` restores it, so a resumed training
# run sees exactly the batches it would have seen without the interruption.

# %%
class ShardLoader:
    """Batches of (inputs, targets), int64 arrays of shape (batch_size, block_size),
    read from token shards. Rank `rank` of `world_size` gets its own disjoint share;
    `seed=None` keeps the windows in stream order (useful for evaluation)."""

    def __init__(self, paths, batch_size, block_size, rank=0, world_size=1, seed=0):
        if batch_size < 1 or block_size < 1:
            raise DataError(f"batch size and block size must be at least 1 (got "
                            f"{batch_size} and {block_size})")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in 0..{world_size - 1}")
        if not paths:
            raise DataError("no token shards given to the loader")
        self.shards = [read_shard(path) for path in paths]
        # starts[i] is the position of shard i's first token in the joined stream.
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])
        self.tokens = int(self.starts[-1])
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.windows = max(self.tokens - 1, 0) // block_size
        self.steps_per_epoch = self.windows // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"the shards hold {self.tokens} tokens: too few for one batch "
                            f"of {batch_size} x {block_size + 1} tokens on each of "
                            f"{world_size} ranks; use more text or smaller batches")
        self.epoch, self.step, self.order = 0, 0, None

    def window_order(self, epoch):
        """The order in which epoch `epoch` visits the windows."""
        if self.seed is None:
            return np.arange(self.windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.windows)

    def read(self, start, length):
        """`length` tokens of the joined stream from position `start`, as int64,
        stitched across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[shard])
            piece = self.shards[shard][offset:offset + length]
            pieces.append(piece)
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return np.concatenate(pieces).astype(np.int64)

    def next_batch(self):
        """The next (inputs, targets) for this rank; targets are inputs shifted by one."""
        if self.step == self.steps_per_epoch:
            self.epoch, self.step, self.order = self.epoch + 1, 0, None
        if self.order is None:
            self.order = self.window_order(self.epoch)
        first = (self.step * self.world_size + self.rank) * self.batch_size
        rows = np.stack([self.read(int(window) * self.block_size, self.block_size + 1)
                         for window in self.order[first:first + self.batch_size]])
        self.step += 1
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def state_dict(self):
        """The position, as plain integers (JSON- and torch.save-friendly). Every rank
        is at the same position, so one rank's state restores them all."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "tokens": self.tokens, "batch_size": self.batch_size,
                "block_size": self.block_size, "world_size": self.world_size}

    def load_state_dict(self, state):
        """Continue from a position saved by `state_dict()` on the same shards and
        settings; anything else would silently feed different batches, so it refuses."""
        for key in ("seed", "tokens", "batch_size", "block_size", "world_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"cannot resume the loader: saved {key} is "
                                f"{state.get(key)}, now {getattr(self, key)}; resume with "
                                f"the same shards and settings")
        self.epoch, self.step, self.order = int(state["epoch"]), int(state["step"]), None


# %% [markdown]
# ### Two ranks, and an exact resume
#
# Two loaders play two processes of a data-parallel run. The position of rank 1 goes
# through JSON, as it would through a checkpoint file, into a fresh loader, which must
# then produce exactly the batch the original produces next.

# %%
if __name__ == "__main__" and MODE == "lesson":
    loaders = [ShardLoader(train_paths, ARGS.batch_size, ARGS.block_size, rank=rank,
                           world_size=2, seed=ARGS.seed) for rank in (0, 1)]
    first_batches = [loader.next_batch() for loader in loaders]
    print(f"loader: {loaders[0].windows:,} windows of {ARGS.block_size + 1} tokens, "
          f"{loaders[0].steps_per_epoch} steps per epoch with 2 ranks of "
          f"{ARGS.batch_size} rows; rank 0 row 0 reads "
          f"{encoding.decode(first_batches[0][0][0][:16].tolist())!r}")
    resumed = ShardLoader(train_paths, ARGS.batch_size, ARGS.block_size, rank=1,
                          world_size=2, seed=ARGS.seed)
    resumed.load_state_dict(json.loads(json.dumps(loaders[1].state_dict())))
    expected, got = loaders[1].next_batch(), resumed.next_batch()
    resume_exact = bool(np.array_equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]))
    print(f"  a loader restored from a saved position gives the identical next batch: "
          f"{resume_exact}")
    figures.update(resume_exact=resume_exact)


# %% [markdown]
# ### Shards written before (`--shards FOLDER`)
#
# The `--shards` run reads the folder's manifest, checks every shard it lists (magic,
# version, length, largest id, and the manifest's tokenizer: vocabulary and
# fingerprint, also against the tokenizer file beside them), and streams one batch
# from the training shards, the way chapter 13 reads them. It prints its own summary
# and is the whole of that run.

# %%
def inspect_shards(folder, args, started):
    """The `--shards` run: check the shard set in `folder` (`read_manifest`) and its
    tokenizer file, then stream one batch from the training shards."""
    if not os.path.isdir(folder):
        raise DataError(f"shard folder {folder} does not exist; write shards first with "
                        f"python 09_data.py --out DIR (they go to DIR/shards)")
    shard_set = read_manifest(folder)
    tokenizer = shard_set["tokenizer"]
    if tokenizer_digest(load_tokenizer(tokenizer["file"])).hex() != tokenizer["digest"]:
        raise DataError(f"{tokenizer['file']} is not the tokenizer the shards in {folder} "
                        f"were written with (its fingerprint differs); write them again")
    counts = {}
    for path in shard_set["valid"] + shard_set["train"]:
        tokens = read_shard(path)
        counts[os.path.basename(path)] = len(tokens)
        print(f"{os.path.basename(path)}: {len(tokens):,} tokens as {tokens.dtype.name}")
    print(f"tokenizer {tokenizer['name']}: {tokenizer['vocab_size']:,} tokens, fingerprint "
          f"{tokenizer['digest']}")
    loader = ShardLoader(shard_set["train"], args.batch_size, args.block_size, seed=args.seed)
    inputs, targets = loader.next_batch()
    print(f"streamed a batch of shape {inputs.shape}; {loader.steps_per_epoch} batches "
          f"per epoch")
    print_summary({"chapter": CHAPTER, "shards": len(counts),
                   "tokens": sum(counts.values()), "batch_shape": list(inputs.shape),
                   "vocab_size": tokenizer["vocab_size"], "tokenizer_digest": tokenizer["digest"],
                   "seconds": round(time.perf_counter() - started, 1)})


if __name__ == "__main__" and MODE == "inspect":
    inspect_shards(ARGS.shards, ARGS, started)


# %% [markdown]
# ## Pictures
#
# Two plots, when matplotlib is installed: how compression (bytes per token) grows
# with the number of merges, on the training text and on held-out text; and the
# MinHash S-curve, the chance that a pair of documents is examined as a function of
# how similar they are, with our threshold marked.
# Both are saved as PNG files in `--out`, and in a notebook they also appear below.
# Without matplotlib, the compression figures are printed as a small table instead.

# %%
if __name__ == "__main__" and MODE == "lesson":
    plots = plot_results(ARGS.out, vocab_sizes, train_compression, valid_compression,
                         ARGS.threshold)
    if plots:
        print("saved plots:", ", ".join(plots))


# %% [markdown]
# ## What comes next
#
# Chapter 13 carries `train_bpe`, `make_encoding`, `gpt2_encoding`, the shard format
# and `ShardLoader` from this file unchanged. It trains its GPT on a shard set
# written here (`--data out/shards`), taking the splits from the manifest and
# refusing shards whose tokenizer is not its own; each of its processes asks the
# loader for its own rank's batches, and every checkpoint saves the loader's position
# so a resumed run sees exactly the batches it would have seen.
#
# Things to try:
#
# * `--vocab-size 256` is refused, but 257 works: a byte-level model. Compare bytes per
#   token at 512, 4,096 and 16,384, and look at the plot: each doubling of the
#   vocabulary buys less compression, while the model's embedding table grows.
# * Copy a file into a folder twice, change two words in one copy, and run
#   `--data` on the folder: one exact and one near duplicate should go.
# * Time `--workers 1` against `--workers 4` on a bigger corpus; with a few hundred
#   kilobytes, starting the processes costs more than it saves.
# * Shard a big corpus with `--shard-corpus` twice, the second time ten times larger,
#   and compare the two "peak memory" lines; then shard a second corpus with
#   `--tokenizer OUT/shards/tokenizer.tiktoken` and check that both manifests carry
#   the same fingerprint.
#
# The pieces that chapter 13 carries, to be kept textually identical there:
#
#   GPT2_SPLIT_PATTERN, END_OF_TEXT     the pre-tokenisation rule, the special token
#   train_bpe(text, vocab_size)         -> mergeable_ranks {token bytes: id}
#   bpe_encode(text, mergeable_ranks)   -> list of ids (pure Python)
#   make_encoding(mergeable_ranks, name="course-bpe") -> tiktoken.Encoding
#   gpt2_encoding()                     -> GPT-2's tiktoken.Encoding, or None offline
#   SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER, ShardHeader, NO_DIGEST
#   tokenizer_digest(encoding)          -> 16 bytes: the tokenizer's fingerprint
#   shard_dtype(vocab_size)             -> uint16 up to 65,536 tokens, else uint32
#   write_shard(path, tokens, vocab_size=None, digest=NO_DIGEST)
#   read_shard_header(path)             -> ShardHeader(version, itemsize, count,
#                                                      vocab_size, digest)
#   read_shard(path, vocab_size=None, digest=None) -> numpy array (memory-mapped)
#   check_shards(paths, vocab_size=None, digest=None) -> [ShardHeader, ...]
#   MANIFEST, TOKENIZER_FILE, load_tokenizer(path, name="course-bpe")
#   read_manifest(folder, vocab_size=None, digest=None)
#       -> {"train": [paths], "valid": [paths], "tokenizer": {...}, "manifest": {...}}
#   encode_documents(encoding, documents, workers=1) -> uint32 ids, END_OF_TEXT after
#       each document (with start_worker, encode_batch, usable_workers,
#       encode_batches and in_groups)
#   ShardLoader(paths, batch_size, block_size, rank=0, world_size=1, seed=0)
#       .next_batch() -> (inputs, targets), .state_dict(), .load_state_dict(state)
#
# They need DataError (carried from the earlier chapters) and the imports base64,
# hashlib, heapq, itertools, json, multiprocessing, os, struct, threading,
# collections (Counter, defaultdict, deque, namedtuple), numpy, regex, tiktoken.
#
# ### Exercises
# `python tools/exercises.py make 09_data` cuts these out of a copy, and
# `python tools/exercises.py check 09_data` grades it:
#
# * `train_bpe`: rewrite each chunk holding the pair; update the pair counts and their
#   chunks.
# * `bpe_encode`: merge the neighbouring pair of lowest rank until no pair is a token.
#
# To think about: Why does `train_bpe` update only the chunks that hold the merged
# pair instead of counting all pairs again? Why must `bpe_encode` merge the
# lowest-rank pair first?
#
# Answers. A merge changes only the pairs that overlap an occurrence of the merged
# pair; recounting the whole corpus at every merge costs the corpus size times the
# number of merges. Ranks are the order in which training learned the merges, and
# applying them in that order rebuilds the tokens training made; another order can
# give different tokens for the same text.

# %%
# The last line of every run: the headline figures of each step, gathered as they were
# printed, and the time the whole pipeline took.
if __name__ == "__main__" and MODE == "lesson":
    print_summary({**figures, "seconds": round(time.perf_counter() - started, 1)})
