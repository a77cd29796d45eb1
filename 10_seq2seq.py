"""Translation with a recurrent encoder-decoder and attention.

This chapter teaches a network to translate: it reads a sentence in English and writes
it in French. It is the first model in the course whose output is itself a sequence of
any length, and it introduces the ideas every later chapter keeps: an *encoder* that
reads the whole input, a *decoder* that writes the output one token at a time, and
*attention*, which lets the decoder look back at whichever input words it needs.

New since the previous chapters:
- sentence pairs as data: tokenisation into words, a vocabulary, padding, masks and
  batches of sentences of similar length;
- a bidirectional GRU encoder (the GRU of 05b, run forwards and backwards);
- a GRU decoder with additive attention (Bahdanau, Cho and Bengio, 2014);
- teacher forcing, and a schedule that weans the decoder off it;
- greedy decoding with a maximum length, exact-match and token accuracy on a held-out
  set, and a picture of where the model looks (the attention map).

Data: online, the English-French sentence pairs from the Tatoeba project that PyTorch's
own translation tutorial uses. Offline (and in the tests), a generated task with real
grammar: every number from 0 to 999,999 written out in English words and in French
words ("quatre-vingt-onze", "soixante et onze", "deux cents" but "deux cent mille"), with
a fixed held-out set of numbers that training never sees.

Run it with `python 10_seq2seq.py` (about a minute on a 2-core CPU: 40 seconds of
training, then evaluation; it translates 99-100% of the held-out numbers exactly) or
`python 10_seq2seq.py --quick` (100 steps, 10-20 seconds). Chapter 11 solves the same
task with a transformer and the same training time, so the two `summary:` lines
compare directly.

In a notebook (Jupyter, VS Code) the chapter ignores the kernel's command line and
takes its flags from the environment variable ZERO_TO_GPT_ARGS, for example
`ZERO_TO_GPT_ARGS="--quick"`; without it, the defaults.
"""

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
import urllib.request
import zipfile
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHAPTER = "10_seq2seq"


# %% [markdown]
# # Translation with a recurrent encoder-decoder and attention
#
# A translation model reads a *source* sentence and writes a *target* sentence. Both
# are sequences of tokens of any length, and the two lengths differ ("ninety-one" is
# three tokens, "quatre-vingt-onze" is five). The recurrent networks of chapters 05 and
# 05b read a sequence and produced one number per step; here we need two of them:
#
# 1. an **encoder** reads the whole English sentence and turns every word into a
#    vector that knows about its neighbours;
# 2. a **decoder** writes the French sentence one word at a time, each word chosen
#    from the words it has already written and from the encoder's vectors.
#
# The link between them is **attention**: at every step the decoder scores each
# encoder vector ("how useful is this source word now?"), turns the scores into
# weights that sum to one, and reads the weighted average. Chapter 11 keeps everything
# in this file except the model, and replaces the recurrence by attention alone.


# %% [markdown]
# ## Tokens, vocabulary, padding
#
# A network reads numbers, not words. We cut each sentence into *tokens*, here words
# and punctuation marks (`"quatre-vingt-onze"` becomes `quatre - vingt - onze`, so the
# model sees the parts it is built from), and give each distinct token an index. Chapter
# 09 cut text into byte-pair tokens instead; words keep this chapter's sequences short
# and its attention maps readable.
#
# Four indices are special: `<pad>` fills the end of short sentences so a batch is a
# rectangle, `<bos>` ("beginning of sentence") is the decoder's first input, `<eos>`
# ("end of sentence") is how the decoder says it has finished, and `<unk>` stands for
# a word too rare to have its own index (it appeared fewer than `min_count` times in
# training).


# %%
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def tokenize(text):
    """Lower-cased words and single punctuation marks: "Va !" -> ["va", "!"]."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def detokenize(tokens):
    """Tokens back to readable text: hyphens and apostrophes rejoin their words."""
    return re.sub(r" ?([-']) ?", r"\1", " ".join(tokens))


class Vocabulary:
    """The tokens a model knows, each with an index; rare tokens map to <unk>."""

    def __init__(self, sentences, min_count=2):
        counts = {}
        for sentence in sentences:
            for token in tokenize(sentence):
                counts[token] = counts.get(token, 0) + 1
        kept = sorted(token for token, count in counts.items() if count >= min_count)
        self.tokens = SPECIALS + kept
        self.index = {token: number for number, token in enumerate(self.tokens)}

    def __len__(self):
        return len(self.tokens)

    def encode(self, sentence):
        """A sentence as a list of indices, without <bos> and <eos>."""
        return [self.index.get(token, UNK) for token in tokenize(sentence)]

    def decode(self, indices):
        """Indices back to tokens, stopping at the first <eos> and dropping padding."""
        tokens = []
        for number in indices:
            if number == EOS:
                break
            if number not in (PAD, BOS):
                tokens.append(self.tokens[number])
        return tokens


# %% [markdown]
# ### Batches of similar length
#
# A batch is a rectangle: `(batch, longest sentence)`, shorter sentences filled with
# `<pad>`. Padding is wasted work, and a model must be told to ignore it (the *mask*,
# `source != PAD`). To waste little, we sort the pairs by length (with a little random
# jitter, so batches differ from epoch to epoch), cut the sorted list into batches and
# shuffle the order of the batches: each batch holds sentences of nearly the same
# length, and training still sees them in random order.
#
# The target is wrapped as `<bos> words <eos>`. The decoder's input is that sequence
# without its last token and its expected output the sequence without its first:
# at every position the decoder learns to predict the next token.


# %%
def encode_pairs(pairs, source_vocab, target_vocab):
    """(source indices, target indices with <bos> and <eos>) for each pair."""
    return [(source_vocab.encode(source), [BOS] + target_vocab.encode(target) + [EOS])
            for source, target in pairs]


def pad_batch(sequences, device):
    """A list of index lists as one (batch, longest) tensor, padded with PAD."""
    longest = max(len(sequence) for sequence in sequences)
    rows = [sequence + [PAD] * (longest - len(sequence)) for sequence in sequences]
    return torch.tensor(rows, dtype=torch.long, device=device)


def make_batches(examples, batch_size, rng):
    """Lists of example indices, each list of similar source and target lengths."""
    jitter = rng.random(len(examples))
    order = sorted(range(len(examples)),
                   key=lambda i: (len(examples[i][0]) + jitter[i], len(examples[i][1])))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples, indices, device):
    """The (source, target) tensors of the examples at `indices`."""
    return (pad_batch([examples[i][0] for i in indices], device),
            pad_batch([examples[i][1] for i in indices], device))


# %% [markdown]
# ## The model: a recurrent encoder-decoder with attention
#
# ### The encoder: a bidirectional GRU
#
# The encoder embeds each source token (a learned vector per vocabulary entry) and runs
# the GRU of chapter 05b over the sentence twice: once left to right, once right to
# left. Concatenating the two hidden states at each position gives a vector that
# summarises the word *and* both of its sides: in "twenty-one thousand", the vector for
# "one" already knows a "thousand" follows.
#
# Padding must change nothing. PyTorch's `pack_padded_sequence` tells the GRU where each
# sentence really ends, so the backward direction starts at the last real word rather
# than at a `<pad>`, and the outputs at padded positions are zeros.
#
# The decoder starts from a summary of the sentence: the two directions' final states,
# through a linear layer and tanh (the "bridge").


# %%
class Encoder(nn.Module):
    def __init__(self, vocab_size, embed_size, hidden_size, dropout):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=PAD)
        self.gru = nn.GRU(embed_size, hidden_size, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(2 * hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, source):
        """source (batch, source length) -> outputs (batch, source length,
        2 * hidden), the decoder's first hidden state (batch, hidden)."""
        # exercise: embed, run the packed bidirectional GRU, bridge both final states
        lengths = (source != PAD).sum(dim=1)  # padding comes last, so this is the length
        embedded = self.dropout(self.embedding(source))  # (batch, length, embed size)
        packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        outputs, final = self.gru(packed)  # final: (2 directions, batch, hidden)
        outputs, _ = nn.utils.rnn.pad_packed_sequence(outputs, batch_first=True,
                                                      total_length=source.shape[1])
        # final[0] has read the sentence left to right, final[1] right to left: together
        # they summarise all of it, and the bridge turns them into the decoder's size.
        hidden = torch.tanh(self.bridge(torch.cat([final[0], final[1]], dim=1)))
        return outputs, hidden
        # end exercise


# %% [markdown]
# ### Additive (Bahdanau) attention
#
# At each output step the decoder holds a state $s$ (its GRU hidden state) and the
# encoder offers one vector $h_j$ per source word. Attention scores each pair with a
# one-hidden-layer network,
#
# $$e_j = v^\top \tanh(W s + U h_j),$$
#
# turns the scores into weights with a softmax, $a_j = e^{e_j} / \sum_k e^{e_k}$, and
# reads the *context* $c = \sum_j a_j h_j$, an average of the source vectors weighted
# by how relevant each is now. Padded positions get a score of $-\infty$, hence a
# weight of exactly zero. $U h_j$ does not depend on the step, so it is computed once
# per sentence (`projected_keys`).
#
# Every operation here is differentiable, so the network learns *where to look* from
# the translation loss alone, without ever being told which words correspond.


# %%
class AdditiveAttention(nn.Module):
    def __init__(self, query_size, key_size, attention_size):
        super().__init__()
        self.query = nn.Linear(query_size, attention_size, bias=False)  # W
        self.key = nn.Linear(key_size, attention_size)                   # U (and a bias)
        self.score = nn.Linear(attention_size, 1, bias=False)            # v

    def forward(self, query, keys, projected_keys, mask):
        """query (batch, query size), keys (batch, source length, key size),
        projected_keys = self.key(keys), mask (batch, source length), True where real.
        Returns the context (batch, key size) and the weights (batch, source length)."""
        # W s is (batch, attention size); [:, None, :] lines it up with every source
        # position of U h, (batch, source length, attention size), by broadcasting.
        # exercise: scores v tanh(W s + U h), padding masked, softmax, weighted sum of keys
        scores = self.score(torch.tanh(self.query(query)[:, None, :] + projected_keys))
        scores = scores.squeeze(-1).masked_fill(~mask, float("-inf"))  # e^-inf = 0
        weights = torch.softmax(scores, dim=-1)
        # (batch, 1, source length) @ (batch, source length, key size): the weighted sum
        context = torch.bmm(weights[:, None, :], keys).squeeze(1)
        return context, weights
        # end exercise


# %% [markdown]
# ### The decoder, one step at a time
#
# One decoder step takes the previous output token and:
#
# 1. attends to the source with its current state $s_{t-1}$, getting a context $c_t$;
# 2. feeds the token's embedding and $c_t$ to a GRU cell, getting the new state $s_t$;
# 3. predicts the next token from $s_t$, $c_t$ and the embedding together (a linear
#    layer to one score, a *logit*, per vocabulary entry).
#
# The model offers this as two methods that the decoding code of this chapter and the
# next both use: `start(source)` encodes the source and returns the decoder's state,
# `step(state, token)` makes one step and returns the logits, the new state and the
# attention weights (for the attention map).
#
# ### Teacher forcing
#
# In training, what does the decoder get as its previous token: the true one, or the
# one it predicted itself? Feeding the truth (*teacher forcing*) makes training fast
# and stable, but then the model never practises recovering from its own mistakes,
# which is all it will see when it translates alone. We start with the truth and feed
# the model its own predictions more and more often: `teacher_forcing` is the
# probability of the true token, and the training loop lowers it from 1 to 0.5 over
# the run (*scheduled sampling*, Bengio et al., 2015).


# %%
class Seq2Seq(nn.Module):
    scheduled_sampling = True  # it can be fed its own predictions while training

    def __init__(self, source_vocab_size, target_vocab_size, embed_size=64,
                 hidden_size=128, dropout=0.1):
        super().__init__()
        self.encoder = Encoder(source_vocab_size, embed_size, hidden_size, dropout)
        self.attention = AdditiveAttention(hidden_size, 2 * hidden_size, hidden_size)
        self.embedding = nn.Embedding(target_vocab_size, embed_size, padding_idx=PAD)
        self.gru = nn.GRUCell(embed_size + 2 * hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size + 2 * hidden_size + embed_size, target_vocab_size)
        self.dropout = nn.Dropout(dropout)

    def start(self, source):
        """Encode `source` (batch, source length); return the decoder's first state."""
        keys, hidden = self.encoder(source)
        return {"keys": keys, "projected_keys": self.attention.key(keys),
                "mask": source != PAD, "hidden": hidden}

    def step(self, state, token):
        """One decoder step from the previous token (batch,): returns the logits
        (batch, target vocabulary), the new state and the attention weights (batch,
        source length)."""
        embedded = self.dropout(self.embedding(token))
        # Attend with the state *before* this step (Bahdanau's choice): the context is
        # what the decoder needs to write the next word.
        context, weights = self.attention(state["hidden"], state["keys"],
                                          state["projected_keys"], state["mask"])
        hidden = self.gru(torch.cat([embedded, context], dim=1), state["hidden"])
        # The output layer sees the new state, the context and the previous word: the
        # context carries *which* source word is being translated, straight through.
        logits = self.output(self.dropout(torch.cat([hidden, context, embedded], dim=1)))
        return logits, {**state, "hidden": hidden}, weights  # a new dict: no side effects

    def forward(self, source, target_input, teacher_forcing=1.0):
        """Logits (batch, target length, vocabulary) for every position of
        `target_input` (<bos> and the target without its last token). With probability
        1 - teacher_forcing a step is fed the model's own previous prediction instead
        of the true token."""
        state = self.start(source)
        token, all_logits = target_input[:, 0], []
        for position in range(target_input.shape[1]):
            logits, state, _ = self.step(state, token)
            all_logits.append(logits)
            if position + 1 < target_input.shape[1]:
                token = target_input[:, position + 1]
                if teacher_forcing < 1.0:  # each sentence tosses its own coin each step
                    own = torch.rand(token.shape, device=token.device) >= teacher_forcing
                    token = torch.where(own, logits.argmax(dim=-1), token)
        return torch.stack(all_logits, dim=1)


def add_model_args(parser):
    """The command-line flags of this chapter's model."""
    parser.add_argument("--hidden-size", type=int, default=128,
                        help="GRU hidden size, in each direction (default 128)")
    parser.add_argument("--embed-size", type=int, default=64,
                        help="size of the token embeddings (default 64)")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="dropout probability, 0 to below 1 (default 0.1)")
    parser.add_argument("--lr", type=float, default=6e-3,
                        help="peak learning rate of Adam (default 0.006)")


def model_checks(args):
    """(condition, message) pairs: the model flags must make a possible model."""
    return [(args.hidden_size >= 1 and args.embed_size >= 1,
             f"--hidden-size and --embed-size must be at least 1 (got {args.hidden_size} "
             f"and {args.embed_size})")]


def build_model(args, source_vocab_size, target_vocab_size):
    """The model the flags ask for."""
    return Seq2Seq(source_vocab_size, target_vocab_size, args.embed_size, args.hidden_size,
                   args.dropout)


# %% [markdown]
# ## Set-up: flags and data (not the lesson)
#
# The code in this section is what the chapter needs but does not teach; in a
# notebook its cells open collapsed, and the flags come from the environment
# variable `ZERO_TO_GPT_ARGS`.
#
# Every chapter shares this command line: `--seed` for repeatable runs, `--data` for a
# local copy of the data, `--quick` for a run of a few seconds (used by the tests) and
# `--out` for where files are written. Its last line of output is `summary:` and a
# line of JSON with the chapter's headline figures, so scripts and tests can read it.
#
# `--time-budget` is the training time in seconds; give chapters 10 and 11 the same
# one to compare them fairly. Timed training depends on how fast the machine is at
# that moment; `--steps` trains a fixed number of steps instead, which repeats exactly.
#
# `--threads` is how many CPU cores PyTorch may use for one operation. The matrices
# here are small, so splitting each product between cores saves little, and on a busy
# machine it costs a lot: every operation then waits for its slowest thread, and a
# thread that the system has paused to run another program can stall it for a whole
# time slice. One thread is the steady default; try `--threads 2` on an idle machine.


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


def save_figure(figure, out_dir, name):
    """Save `figure` as `out_dir/<chapter>_<name>.png` (shown inline in a notebook),
    close it, and return the path."""
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{CHAPTER}_{name}.png")
    show_figure(figure, path)
    plt.close(figure)
    return path


# %% [markdown]
# ## The data: sentence pairs
#
# The real data is the English-French file of the Tatoeba project (sentences
# translated by volunteers, licence CC BY 2.0 FR) as PyTorch's translation tutorial
# packages it: one pair a line, English, a tab, French, e.g. `Go.<TAB>Va !`. The file
# comes inside a zip archive; we download it once into `data/`, take the one file we
# need out of the archive, check that it looks right (big enough, and nearly every line
# a tab-separated pair) and only then rename it into place, so an interrupted download
# never leaves half a file behind. There is no recorded digest for this file, so the
# check is on its format instead. `--data PATH` reads a local file of the same format.
#
# A line that is not a pair (no tab, or an empty side) is *malformed*: we count it,
# skip it and say how many there were, rather than stopping over one bad line in a
# hundred thousand.


# %% jupyter={"source_hidden": true}
PAIRS_URL = "https://download.pytorch.org/tutorial/data.zip"
PAIRS_MEMBER = "data/eng-fra.txt"         # the file we want inside the archive
PAIRS_FILE = os.path.join("data", "eng-fra.txt")
PAIRS_MIN_BYTES = 1_000_000               # the real file is about 9 MB
MIN_PAIRS = 200                           # fewer pairs than this cannot train a model
MAX_TOKENS = 10                           # real pairs longer than this are left out


def download_pairs(url=PAIRS_URL, path=PAIRS_FILE, timeout=30):
    """Fetch the sentence-pair archive, extract the English-French file into `path`.

    Returns True when `path` holds the file (already there, or freshly downloaded and
    checked), False when it could not be had (no network, a broken archive, a file
    that does not look like sentence pairs); the caller then generates data."""
    if os.path.exists(path):
        return True
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    archive_part, text_part = path + ".zip.part", path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, \
                open(archive_part, "wb") as file:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while piece := response.read(1 << 16):
                file.write(piece)
                done += len(piece)
                if total:
                    print(f"\rdownloading {os.path.basename(url)}: {100 * done // total}%",
                          end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        with zipfile.ZipFile(archive_part) as archive:
            content = archive.read(PAIRS_MEMBER)
        lines = content.splitlines()
        paired = sum(line.count(b"\t") >= 1 for line in lines)
        if len(content) < PAIRS_MIN_BYTES or paired < 0.9 * len(lines):
            print(f"download of {url} does not look like sentence pairs; not using it",
                  file=sys.stderr)
            return False
        with open(text_part, "wb") as file:
            file.write(content)
        os.replace(text_part, path)
        return True
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # offline, broken archive
        return False
    finally:
        for leftover in (archive_part, text_part):
            if os.path.exists(leftover):
                os.remove(leftover)


def read_pairs(path):
    """Read a file of `source<TAB>target` lines into a list of (source, target) strings.

    Extra tab-separated fields (some Tatoeba exports add an attribution column) are
    ignored. Returns (pairs, malformed) where `malformed` counts the skipped lines."""
    if not os.path.isfile(path):
        raise DataError(f"sentence-pair file {path} does not exist; pass --data with the "
                        f"path of a UTF-8 text file of 'English<TAB>French' lines")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as error:
        raise DataError(f"sentence-pair file {path} is not valid UTF-8 (byte {error.start}); "
                        f"convert it to UTF-8 first")
    pairs, malformed = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue  # blank lines are not errors
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            malformed += 1
            continue
        pairs.append((fields[0].strip(), fields[1].strip()))
    if len(pairs) < MIN_PAIRS:
        raise DataError(f"sentence-pair file {path} has {len(pairs)} tab-separated pairs "
                        f"({malformed} malformed lines); it needs at least {MIN_PAIRS} "
                        f"lines of the form 'English<TAB>French'")
    return pairs, malformed


# %% [markdown]
# ## The offline task: numbers in words
#
# Without a network we still want a task with real grammar, so we generate one: the
# number 91 is "ninety-one" in English and "quatre-vingt-onze" in French. English is
# regular (a word for each ten, hyphen, a word for the unit). French is not, and its
# irregularities are exactly what a translation model has to learn:
#
# - 17, 18, 19 are built from ten: "dix-sept"; 11 to 16 have their own words.
# - 70 is "sixty-ten" (soixante-dix) and 90 is "four-twenties-ten"
#   (quatre-vingt-dix), so 71 is "soixante et onze" and 91 "quatre-vingt-onze".
# - A one after a ten takes "et" ("vingt et un", "soixante et onze") except after
#   eighty ("quatre-vingt-un").
# - "vingt" in eighty and "cent" take a plural *s* when multiplied and last:
#   "quatre-vingts", "deux cents", but "quatre-vingt-un", "deux cent un", and, because
#   "mille" is not a noun, "quatre-vingt mille" and "deux cent mille".
# - "mille" never changes and never takes "un": 1000 is "mille", 2000 "deux mille".
#
# We use the traditional spelling (hyphens only inside the numbers below one hundred,
# as most French texts still write them). English follows the American style without
# "and": 101 is "one hundred one".


# %% jupyter={"source_hidden": true}
ENGLISH_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
                "sixteen", "seventeen", "eighteen", "nineteen"]
ENGLISH_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy",
                "eighty", "ninety"]
FRENCH_ONES = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit",
               "neuf", "dix", "onze", "douze", "treize", "quatorze", "quinze", "seize"]
FRENCH_TENS = ["", "", "vingt", "trente", "quarante", "cinquante", "soixante"]


def english_words(number):
    """`number` (0 to 999,999) in English words: 91 -> "ninety-one"."""
    def below_hundred(n):
        if n < 20:
            return ENGLISH_ONES[n]
        tens, ones = divmod(n, 10)
        return ENGLISH_TENS[tens] + (f"-{ENGLISH_ONES[ones]}" if ones else "")

    def below_thousand(n):
        hundreds, rest = divmod(n, 100)
        words = [f"{ENGLISH_ONES[hundreds]} hundred"] if hundreds else []
        return " ".join(words + ([below_hundred(rest)] if rest or not hundreds else []))

    if not 0 <= number <= 999_999:
        raise ValueError(f"{number} is outside 0 to 999,999")
    thousands, rest = divmod(number, 1000)
    words = [f"{below_thousand(thousands)} thousand"] if thousands else []
    return " ".join(words + ([below_thousand(rest)] if rest or not thousands else []))


def french_words(number):
    """`number` (0 to 999,999) in French words: 91 -> "quatre-vingt-onze"."""
    def below_hundred(n):
        if n <= 16:
            return FRENCH_ONES[n]
        if n < 20:
            return "dix-" + FRENCH_ONES[n - 10]
        tens, ones = divmod(n, 10)
        if tens in (7, 9):  # sixty + 10..19, eighty + 10..19
            if n == 71:
                return "soixante et onze"
            base = "soixante" if tens == 7 else "quatre-vingt"
            return base + "-" + below_hundred(10 + ones)
        if tens == 8:
            return "quatre-vingts" if ones == 0 else "quatre-vingt-" + FRENCH_ONES[ones]
        if ones == 0:
            return FRENCH_TENS[tens]
        return FRENCH_TENS[tens] + (" et un" if ones == 1 else "-" + FRENCH_ONES[ones])

    def below_thousand(n, before_mille):
        hundreds, rest = divmod(n, 100)
        words = []
        if hundreds == 1:
            words.append("cent")
        elif hundreds > 1:  # "deux cents" takes an s only when nothing follows
            plural = rest == 0 and not before_mille
            words.append(FRENCH_ONES[hundreds] + (" cents" if plural else " cent"))
        if rest:
            tail = below_hundred(rest)
            if before_mille and tail.endswith("quatre-vingts"):
                tail = tail[:-1]  # "quatre-vingt mille": mille is not a noun
            words.append(tail)
        return " ".join(words)

    if not 0 <= number <= 999_999:
        raise ValueError(f"{number} is outside 0 to 999,999")
    if number == 0:
        return FRENCH_ONES[0]
    thousands, rest = divmod(number, 1000)
    words = []
    if thousands == 1:
        words.append("mille")  # never "un mille"
    elif thousands > 1:
        words.append(below_thousand(thousands, before_mille=True) + " mille")
    if rest:
        words.append(below_thousand(rest, before_mille=False))
    return " ".join(words)


# %% [markdown]
# ### A fixed held-out set
#
# To measure whether the model *translates* rather than remembers, we keep 1,000
# numbers aside: drawn once from 1,000 to 999,999 with a seed of their own, so they are
# the same whatever `--seed` a learner picks, and removed from everything training may
# draw. Training gets every number below 1,000 (the building blocks: without ever
# seeing "quatre-vingt-dix-sept" the model could not invent it) and a sample of larger
# numbers. Each held-out number is then a new combination of parts the model has seen
# elsewhere, which is what translating a new sentence is.
#
# Numbers are drawn with their digit count uniform (as many 4-digit as 6-digit
# numbers); drawing uniformly from 0 to 999,999 would give 6-digit numbers 90% of the
# time.


# %% jupyter={"source_hidden": true}
HELD_OUT_SEED = 20_141_001    # fixed: the held-out numbers never depend on --seed
HELD_OUT_SIZE = 1000


def draw_numbers(rng, count, exclude=()):
    """`count` distinct numbers of 4 to 6 digits (digit count uniform), none in
    `exclude`."""
    chosen, excluded = [], set(exclude)
    while len(chosen) < count:
        digits = rng.integers(4, 7, size=count)  # a batch of draws at a time: faster
        for number in rng.integers(10 ** (digits - 1), 10 ** digits).tolist():
            if number not in excluded and len(chosen) < count:
                excluded.add(number)
                chosen.append(number)
    return chosen


def held_out_numbers():
    """The fixed held-out numbers, the same on every run."""
    return draw_numbers(np.random.default_rng(HELD_OUT_SEED), HELD_OUT_SIZE)


def number_pairs(numbers):
    """(English, French) sentence pairs for a list of numbers."""
    return [(english_words(number), french_words(number)) for number in numbers]


def generate_number_task(train_size, seed):
    """The offline task: (training pairs, held-out pairs). Training holds every number
    below 1,000 and `train_size - 1000` larger numbers drawn with `seed`, none of them
    held out."""
    held_out = held_out_numbers()
    training = list(range(1000)) + draw_numbers(np.random.default_rng(seed),
                                                train_size - 1000, exclude=held_out)
    return number_pairs(training), number_pairs(held_out)


def split_pairs(pairs):
    """Split real sentence pairs into training and held-out (about 5%).

    The choice hangs on a checksum of the English sentence, so it is the same on every
    run and every machine, and an English sentence with several translations falls
    wholly on one side: the model is never tested on a sentence it trained on."""
    training, held_out = [], []
    for source, target in pairs:
        side = held_out if zlib.crc32(source.lower().encode()) % 20 == 0 else training
        side.append((source, target))
    return training, held_out


def load_pairs(path=None, train_size=50_000, seed=0):
    """The task as (training pairs, held-out pairs, source, malformed lines). `path`
    (from --data) wins; then the downloaded Tatoeba file in data/; then the generated
    number task, announced in one line."""
    if path or download_pairs():
        pairs, malformed = read_pairs(path or PAIRS_FILE)
        short = [(source, target) for source, target in pairs
                 if len(tokenize(source)) <= MAX_TOKENS and len(tokenize(target)) <= MAX_TOKENS]
        training, held_out = split_pairs(short)
        if len(training) < MIN_PAIRS or not held_out:
            raise DataError(f"sentence-pair file {path or PAIRS_FILE} has too few pairs of at "
                            f"most {MAX_TOKENS} words on each side ({len(short)}); it needs "
                            f"at least {MIN_PAIRS} short pairs")
        return training, held_out, path or PAIRS_FILE, malformed
    print("note: could not download the sentence pairs (offline?); translating numbers "
          "written in English words into French words instead", file=sys.stderr)
    training, held_out = generate_number_task(train_size, seed)
    return training, held_out, "generated numbers", 0


# %% jupyter={"source_hidden": true}
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--data", default=None,
                        help="path of a local file of 'English<TAB>French' lines "
                             "(default: download the Tatoeba pairs, else generate numbers)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (100 steps), for tests and a first look")
    parser.add_argument("--out", default="out", help="folder for plots (default out/)")
    parser.add_argument("--time-budget", type=float, default=40.0,
                        help="seconds of training (default 40; --quick: 100 steps instead)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps instead of for a time budget")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="sentence pairs per training step (default 64)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="training pairs of the generated number task, at least 1000 "
                             "(default 50000; --quick: 10000)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for PyTorch (default 1: these models are small, "
                             "and one thread is nearly as fast and far steadier on a busy "
                             "machine)")
    parser.add_argument("--held-out", type=int, default=None,
                        help="how many held-out pairs to evaluate (default all; "
                             "--quick: 50)")
    add_model_args(parser)
    args = parser.parse_args(argv)
    if args.quick:  # quick defaults; flags given explicitly still win
        args.steps = 100 if args.steps is None else args.steps
        args.held_out = 50 if args.held_out is None else args.held_out
        args.train_size = 10_000 if args.train_size is None else args.train_size
    args.train_size = 50_000 if args.train_size is None else args.train_size
    checks = [(args.time_budget > 0, f"--time-budget must be positive (got {args.time_budget})"),
              (args.steps is None or args.steps >= 1,
               f"--steps must be at least 1 (got {args.steps})"),
              (args.batch_size >= 1, f"--batch-size must be at least 1 (got {args.batch_size})"),
              (args.threads >= 1, f"--threads must be at least 1 (got {args.threads})"),
              (args.train_size >= 1000,
               f"--train-size must be at least 1000 (got {args.train_size})"),
              (args.held_out is None or args.held_out >= 1,
               f"--held-out must be at least 1 (got {args.held_out})"),
              (0 <= args.dropout < 1, f"--dropout must be from 0 to below 1 (got {args.dropout})"),
              (args.lr > 0, f"--lr must be positive (got {args.lr})")] + model_checks(args)
    for ok, message in checks:
        if not ok:
            raise DataError(message)
    return args


def print_summary(figures):
    """The chapter's last line: `summary: ` and its headline figures as JSON."""
    print("summary: " + json.dumps(figures))


# %%
if __name__ == "__main__":
    ARGS = chapter_args()
    started = time.perf_counter()
    torch.manual_seed(ARGS.seed)  # weights, dropout and teacher forcing repeat
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(ARGS.threads)
    training, held_out, source, malformed = load_pairs(ARGS.data, ARGS.train_size, ARGS.seed)
    if malformed:
        print(f"skipped {malformed} malformed lines (not two tab-separated sentences)")
    held_out = held_out[:ARGS.held_out]
    # The vocabularies come from the training pairs only: a held-out word never seen in
    # training becomes <unk>, as a new word would in real use.
    source_vocab = Vocabulary(english for english, _ in training)
    target_vocab = Vocabulary(french for _, french in training)
    train_examples = encode_pairs(training, source_vocab, target_vocab)
    held_out_examples = encode_pairs(held_out, source_vocab, target_vocab)
    # Room for a translation a little longer than any seen in training, and no more.
    max_length = max(len(target) for _, target in train_examples) + 5
    print(f"data: {source}, {len(training)} training pairs, {len(held_out)} held-out pairs, "
          f"vocabularies {len(source_vocab)} / {len(target_vocab)} tokens, on {device}")
    model = build_model(ARGS, len(source_vocab), len(target_vocab)).to(device)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")


# %% [markdown]
# The data line says how small this language is: about thirty distinct words on each
# side write every number below a million, so the embeddings (64 numbers a word) and
# the output layer cost little. Of the model's 422,175 parameters (default sizes)
# about three quarters sit in the weight matrices of its three GRUs (encoder forwards
# and backwards, and the decoder), which grow with the square of `--hidden-size`:
# halve it and the model has about a third as many parameters. On real sentences the
# vocabularies hold thousands of words, and the embeddings and the output layer become
# the larger part.


# %% [markdown]
# ## Attention, drawn
#
# Before training, one step of the additive attention above as a picture. The encoder
# has left one vector `h_j` per source word; the decoder brings its state `s`. Each
# pair is scored by the same small network, `e_j = v^T tanh(W s + U h_j)`; a softmax
# over the source turns the scores into weights `a_j` that sum to one (a padded
# position's score is `-inf`, its weight 0); and the context is the weighted sum
# `c = sum_j a_j h_j`. The grey bars under the weights are made up for the picture:
# the attention maps at the end show what a trained model really does. Without
# matplotlib the same step is printed as text.


# %% jupyter={"source_hidden": true}
def draw_attention(model, out_dir, words=("twenty", "-", "one", "<eos>")):
    """Draw one step of `model`'s additive attention (encoder states, decoder state,
    scores, softmax, weighted sum) as a PNG in `out_dir` (or print it as text); returns
    the path, or None."""
    size = next(module.score.in_features for module in model.modules()
                if isinstance(module, AdditiveAttention))
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; one step of additive attention as text:")
        print("    h_1 .. h_S (encoder, one per source word), s (decoder state)")
        print("    e_j = v^T tanh(W s + U h_j) -> a = softmax(e) -> c = sum_j a_j h_j"
              f" -> decoder GRU   (W s and U h_j: {size} numbers each)")
        return None
    weights = np.array([0.15, 0.05, 0.7, 0.1])[:len(words)]  # for the picture only
    figure, axes = plt.subplots(figsize=(10, 5))
    box = dict(ha="center", va="center", fontsize=10)
    last = 2 * len(words)
    state = axes.text(last + 0.6, 1.6, "$s$\ndecoder state", bbox=dict(
        boxstyle="round,pad=0.4", fc="#fdf2e9", ec="#d35400"), **box)
    context = axes.text(last + 0.6, 4.2, "context\n$c = \\sum_j a_j h_j$", bbox=dict(
        boxstyle="round,pad=0.4", fc="#eafaf1", ec="#1e8449"), **box)
    for j, (word, weight) in enumerate(zip(words, weights)):
        x = 2 * j
        source = axes.text(x, 0, f"{word}\n$h_{j + 1}$", bbox=dict(
            boxstyle="round,pad=0.4", fc="#e8f0fe", ec="#3b6fb6"), **box)
        score = axes.text(x, 1.6, f"$e_{j + 1}$", bbox=dict(
            boxstyle="round,pad=0.4", fc="#fef9e7", ec="#b7950b"), **box)
        arrow = dict(arrowstyle="-|>", shrinkA=2, shrinkB=2)
        axes.annotate("", xy=(x, 1.6), xytext=(x, 0), arrowprops=dict(
            **arrow, color="#3b6fb6", patchA=source.get_bbox_patch(),
            patchB=score.get_bbox_patch()))
        axes.annotate("", xy=(x, 1.6), xytext=state.get_position(), arrowprops=dict(
            **arrow, color="#d35400", ls="--", connectionstyle="arc3,rad=-0.2",
            patchA=state.get_bbox_patch(), patchB=score.get_bbox_patch()))
        axes.bar(x, weight, bottom=2.6, width=0.6, color="#999999")
        axes.text(x + 0.4, 2.65, f"$a_{j + 1} = {weight:g}$", fontsize=9, va="bottom")
        axes.annotate("", xy=context.get_position(), xytext=(x, 2.62 + weight),
                      arrowprops=dict(**arrow, color="#1e8449", alpha=0.25 + weight,
                                      patchB=context.get_bbox_patch()))
    axes.text(-0.9, 2.25, "softmax over the source:  $a_j = e^{e_j} / \\sum_k e^{e_k}$",
              fontsize=9, color="#b7950b")
    axes.text(len(words) - 1, 4.75, "one decoder step: the same network scores every "
              f"pair, $e_j = v^T \\tanh(W s + U h_j)$, {size} hidden units", ha="center",
              fontsize=11)
    axes.set(xlim=(-1, last + 1.6), ylim=(-0.6, 5.0))
    axes.axis("off")
    return save_figure(figure, out_dir, "attention_step")


# %%
if __name__ == "__main__":
    path = draw_attention(model, ARGS.out)
    if path:
        print(f"attention drawn in {path}")


# %% [markdown]
# ## Training for a fixed time
#
# The loss is the cross-entropy of chapter 04 between the logits at each target
# position and the true next token, averaged over the real (non-padding) tokens:
# `ignore_index=PAD` leaves padding out of both the sum and the count.
#
# Chapters 10 and 11 are compared at *equal training time*, so the loop runs for
# `--time-budget` seconds (or exactly `--steps` steps, which repeats exactly and is
# what `--quick` uses). Everything that changes over training is a function of
# `progress`, the fraction of the budget spent, from 0 to 1:
#
# - the learning rate rises linearly over the first 5% (*warm-up*: Adam's running
#   averages start empty, and early large steps can wreck a fresh network), then
#   follows half a cosine down to a tenth of its peak;
# - the teacher-forcing probability falls from 1 to 0.5, for a model that can be fed
#   its own predictions (`scheduled_sampling`); chapter 11's model cannot, and stays
#   at 1.
#
# Gradients are clipped to a total norm of 1, as in chapter 05: a cheap guard against
# the occasional huge gradient.
#
# Every fifth of the way the loop stops the clock and measures the exact match on 100
# held-out pairs. These points (`curve` in the summary) show how fast a model learns,
# not only where it ends, which is what "at equal training time" is about.


# %%
def learning_rate(progress, peak, warmup=0.05):
    """Linear warm-up to `peak`, then a half cosine down to a tenth of it."""
    if progress < warmup:
        return peak * progress / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
    return peak * (0.1 + 0.9 * cosine)


def teacher_forcing_ratio(progress):
    """The probability of feeding the true previous token: 1 at the start, 0.5 at
    the end."""
    return 1.0 - 0.5 * progress


def sequence_loss(logits, target_output):
    """Mean cross-entropy over the real (non-padding) target tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_output.reshape(-1),
                           ignore_index=PAD)


def train(model, examples, args, device, monitor):
    """Train `model` on encoded `examples` for args.steps steps, or args.time_budget
    seconds when args.steps is None. Every fifth of the way it reports the loss and
    `monitor(model)`, a held-out exact match, with the clock stopped. Returns (steps,
    seconds, losses, curve) where curve lists (seconds, exact match) pairs."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    started, step, losses, curve, next_report = time.perf_counter(), 0, [], [], 0.2
    model.train()  # dropout on; evaluate() turns it off and back on
    while True:  # one pass of this loop is one epoch over the training pairs
        for indices in make_batches(examples, args.batch_size, rng):
            elapsed = time.perf_counter() - started
            progress = step / args.steps if args.steps else elapsed / args.time_budget
            teacher_forcing = (teacher_forcing_ratio(progress) if model.scheduled_sampling
                               else 1.0)
            finished = step > 0 and progress >= 1.0  # always at least one step
            if step > 0 and (progress >= next_report or finished):
                paused = time.perf_counter()
                curve.append((round(elapsed, 1), round(monitor(model), 3)))
                print(f"step {step:5d}  {elapsed:5.1f}s  loss {np.mean(losses[-50:]):.3f}  "
                      f"teacher forcing {teacher_forcing:.2f}  "
                      f"held-out exact match {curve[-1][1]:.1%}")
                next_report += 0.2
                started += time.perf_counter() - paused  # checking is not training
            if finished:
                return step, elapsed, losses, curve
            for group in optimizer.param_groups:  # the schedule sets each step's rate
                group["lr"] = learning_rate(progress, args.lr)
            source, target = collate(examples, indices, device)
            # The decoder reads <bos> w1 ... wn and must predict w1 ... wn <eos>.
            logits = model(source, target[:, :-1], teacher_forcing)
            loss = sequence_loss(logits, target[:, 1:])
            optimizer.zero_grad()  # gradients add up in PyTorch: clear last step's
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1


# %% [markdown]
# ## Translating: greedy decoding
#
# To translate, the model writes alone: start from `<bos>`, take the most likely next
# token (the *greedy* choice), feed it back, and repeat until the model writes `<eos>`
# or reaches `max_length` tokens (an untrained model may never stop). A sentence that
# has finished gets `<pad>` afterwards while the rest of the batch goes on. Greedy
# decoding is not guaranteed to find the most likely sentence (beam search keeps
# several candidates), but on this task it is close and it is simple.


# %%
@torch.no_grad()
def greedy_decode(model, source, max_length):
    """Translate a batch: returns tokens (batch, steps) and the attention weights
    (batch, steps, source length) of every step."""
    state = model.start(source)  # the source is read once, whatever the output length
    token = torch.full((source.shape[0],), BOS, dtype=torch.long, device=source.device)
    finished = torch.zeros_like(token, dtype=torch.bool)
    tokens, weights = [], []
    for _ in range(max_length):
        logits, state, attention = model.step(state, token)
        token = logits.argmax(dim=-1).masked_fill(finished, PAD)  # greedy: the likeliest
        tokens.append(token)
        weights.append(attention)
        finished |= token == EOS
        if finished.all():  # the whole batch has written <eos>: no need to go on
            break
    return torch.stack(tokens, dim=1), torch.stack(weights, dim=1)


# %% [markdown]
# ## Measuring a translation
#
# Two figures on the held-out pairs:
#
# - **exact match**: the share of sentences whose greedy translation is the reference,
#   token for token. For numbers, this is the figure that matters: one wrong word is a
#   wrong number.
# - **token accuracy**: the share of target tokens predicted right when the model is
#   given the true tokens before them (teacher forcing, no dropout). It rises long
#   before exact match does, so it shows progress early.
#
# Real sentences have many right translations, so on real data exact match is a harsh
# judge (BLEU, which counts shared word groups, is the usual softer one); on numbers
# there is exactly one right answer.


# %%
@torch.no_grad()
def evaluate(model, examples, batch_size, max_length, device):
    """(exact match, token accuracy, predicted index lists in the order of examples)."""
    model.eval()  # no dropout: we measure the model, not a random thinned copy of it
    exact, correct, counted = 0, 0, 0
    predictions = [None] * len(examples)
    # Batches of similar source length waste little padding; `predictions` is filled
    # in the original order so that it lines up with `examples`.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        source, target = collate(examples, indices, device)
        # Token accuracy: one teacher-forced pass, every position at once.
        predicted = model(source, target[:, :-1]).argmax(dim=-1)
        real = target[:, 1:] != PAD
        # <unk> in the reference is a word the model cannot write: never counted right.
        correct += ((predicted == target[:, 1:]) & real & (target[:, 1:] != UNK)).sum().item()
        counted += real.sum().item()
        # Exact match: the model writes alone; compare up to and with its <eos>.
        tokens, _ = greedy_decode(model, source, max_length)
        for row, i in enumerate(indices):
            answer = tokens[row].tolist()
            answer = answer[:answer.index(EOS) + 1] if EOS in answer else answer
            predictions[i] = answer
            reference = examples[i][1][1:]  # without its <bos>
            exact += answer == reference and UNK not in reference
    model.train()
    return exact / len(examples), correct / counted, predictions


if __name__ == "__main__":
    def monitor(model):  # exact match on the first 100 held-out pairs, during training
        return evaluate(model, held_out_examples[:100], 256, max_length, device)[0]

    steps, train_seconds, losses, curve = train(model, train_examples, ARGS, device, monitor)
    exact, token_accuracy, predictions = evaluate(model, held_out_examples, 256, max_length,
                                                  device)
    print(f"trained {steps} steps in {train_seconds:.1f}s; held-out exact match "
          f"{exact:.1%}, token accuracy {token_accuracy:.1%}")
    print("sample translations (held out):")
    for (english, french), predicted in list(zip(held_out, predictions))[:6]:
        answer = detokenize(target_vocab.decode(predicted))
        mark = "right" if answer == detokenize(tokenize(french)) else f"wrong, expected: {french}"
        print(f"  {english}\n    -> {answer}   ({mark})")


# %% [markdown]
# ### Reading the results
#
# Each progress line is one fifth of the training budget. The loss falls fastest in the
# first fifth: the decoder first learns the easy part, which French word goes with
# which English word ("seven" -> "sept"), and only then the hard part, the places where
# French does not translate word for word ("ninety-six" -> "quatre-vingt-seize", twenty
# times four plus sixteen; "one hundred" -> "cent", without "un"). Exact match lags
# behind the loss because one wrong word spoils a whole number, which is why the
# token accuracy of the final line is nearly always the higher of the two figures.
#
# The teacher-forcing column falls from 1 to 0.5 while the exact match keeps rising:
# the model is fed its own guesses more and more often, and learns to recover from
# them, which is exactly what greedy decoding will ask of it. On a 2-core CPU the
# default run reaches 99-100% exact match within its first fifth (about 80 steps of
# 64 pairs); `--quick` stops after 100 steps, typically above 90%, and its curve shows
# the climb from 0 that the default run has already finished by its first report.
#
# The sample translations are held-out numbers, never seen in training: a right answer
# means the model has learned the rules of French numbers, not a table of them. When
# one is wrong, look at where: usually at a spot where the two languages disagree, an
# "et" ("soixante et onze"), a "quatre-vingt", or the plural "cents" of "deux cents". On real Tatoeba
# sentences, expect far lower exact match: a sentence has many right translations and
# the model's may simply be a different one.


# %% [markdown]
# ## Where the model looks: attention maps
#
# For a few held-out sentences we draw the attention weights of every output step: a
# grid with the source tokens across and the output tokens down, dark where the
# decoder looked. A model that has learned the task looks at "ninety" while writing
# "quatre - vingt - dix", and at "thousand" while writing "mille": an alignment between
# the languages that nobody taught it. Without matplotlib the same grid is printed with
# characters, darker characters for larger weights.


# %%
def attention_maps(model, examples, source_vocab, target_vocab, max_length, device):
    """(source tokens, output tokens, weights (output, source)) for each example."""
    maps = []
    model.eval()
    for source_ids, _ in examples:
        source = torch.tensor([source_ids], dtype=torch.long, device=device)
        tokens, weights = greedy_decode(model, source, max_length)
        output = target_vocab.decode(tokens[0].tolist()) + ["<eos>"]
        maps.append(([source_vocab.tokens[i] for i in source_ids], output,
                     weights[0, :len(output)].cpu().numpy()))
    model.train()
    return maps


def show_attention(maps, out_dir):
    """Save the maps as a PNG in `out_dir` (or print them as text); returns the path
    written, or None."""
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; attention maps as text (darker = more weight):")
        shades = " .:-=+*#%@"
        for source_tokens, output_tokens, weights in maps:
            print("    " + " | ".join(source_tokens))
            for token, row in zip(output_tokens, weights):
                cells = "".join(shades[min(9, int(w * 10))] for w in row)
                print(f"    {cells}  {token}")
        return None
    figure, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 5))
    for axis, (source_tokens, output_tokens, weights) in zip(np.atleast_1d(axes), maps):
        axis.imshow(weights, cmap="Greys", vmin=0, vmax=1)
        axis.set_xticks(range(len(source_tokens)), source_tokens, rotation=90)
        axis.set_yticks(range(len(output_tokens)), output_tokens)
    figure.suptitle(f"{CHAPTER}: attention of each output token over the source")
    figure.tight_layout()
    return save_figure(figure, out_dir, "attention")


if __name__ == "__main__":
    maps = attention_maps(model, held_out_examples[:3], source_vocab, target_vocab,
                          max_length, device)
    path = show_attention(maps, ARGS.out)
    if path:
        print(f"attention maps saved to {path}")


# %% [markdown]
# ### Reading the maps
#
# Each row is one output token, each column one source token, and each row sums to
# one. A trained model's maps are mostly a diagonal staircase: French numbers keep the
# English order of thousands, hundreds and units, so the decoder walks along the
# source as it writes. The interesting rows are the exceptions, where one English
# token feeds several French ones (the five tokens of "quatre - vingt - seize" come
# from the three of "ninety - six"), and the final `<eos>` row, which looks at the end
# of the source, where the English stopped. An
# untrained model (try `--steps 2`) spreads every row evenly: it has not yet learned
# where to look. Chapter 11's transformer draws the same picture from its attention
# heads, without a recurrent network to carry the position along.
#
# ### Exercises
# `python tools/exercises.py make 10_seq2seq` cuts these out of a copy, and
# `python tools/exercises.py check 10_seq2seq` grades it:
#
# * `Encoder.forward`: embed, run the packed bidirectional GRU, bridge both final
#   states.
# * `AdditiveAttention.forward`: scores v tanh(W s + U h), padding masked, softmax,
#   weighted sum of keys.
#
# To think about: Why must the attention mask out padding, and what would a test of
# 'padding changes nothing' catch without it?
#
# Answers. Padded positions are not source words. Without the mask some weight goes to
# them and a sentence's translation would depend on how long the other sentences in
# its batch were; packing the GRU and masking the scores make the outputs the same
# with or without padding, which is what the tests check.


# %%
if __name__ == "__main__":
    print_summary({"chapter": CHAPTER, "data": source, "steps": steps,
                   "train_seconds": round(train_seconds, 1),
                   "final_loss": round(float(np.mean(losses[-50:])), 4),
                   "exact_match": round(exact, 4), "token_accuracy": round(token_accuracy, 4),
                   "curve": curve,
                   "seconds": round(time.perf_counter() - started, 1)})
