"""Translation with a transformer: attention is all the model needs.

Chapter 10 translated English into French with recurrent networks and attention. This
chapter keeps its data, training loop, decoding and metrics line for line, and replaces
the model: the recurrence goes, and attention does everything. It is the transformer of
"Attention is all you need" (Vaswani et al., 2017), written from its parts, and the
model that chapters 12 and 13 speed up and grow into a GPT.

New since chapter 10:
- scaled dot-product attention and multi-head attention;
- sinusoidal positional encodings (attention alone does not know word order);
- padding masks and the causal mask that stops the decoder from reading ahead;
- layer normalisation, residual connections, feed-forward blocks and dropout, put
  together into encoder and decoder layers;
- a comparison with chapter 10 at equal training time.

Data: as in chapter 10, the Tatoeba English-French pairs when online; offline (and in
the tests), every number from 0 to 999,999 written in English words and in French words,
with a fixed held-out set that training never sees.

Run it with `python 11_transformer.py` (about a minute on a 2-core CPU: 40 seconds of
training, then evaluation; it reaches 90-100% exact match on the held-out numbers) or
`python 11_transformer.py --quick` (100 steps, 10-20 seconds). Run `python
10_seq2seq.py` with the same `--time-budget` to compare the two `summary:` lines (on a
CPU, at 40 seconds, the recurrent model of chapter 10 wins; see "What to expect");
`diff 10_seq2seq.py 11_transformer.py` shows everything that changed.

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

CHAPTER = "11_transformer"


# %% [markdown]
# # Translation with a transformer
#
# The recurrent model of chapter 10 reads a sentence one word after another: the
# encoder's vector for word 7 exists only once words 1 to 6 have been read, and the
# decoder's state at step 7 only once steps 1 to 6 are done. That order is a chain of
# dependent steps that no amount of hardware can run at once, and information from
# early words must survive many steps of the chain to reach late ones.
#
# Chapter 10 already added attention, which links any output step with any input word
# directly. The transformer's idea is to use attention for *everything*: each encoder
# word attends to all the other source words (*self-attention*), each decoder position
# attends to the positions before it and to the source. Every position of a sentence
# is then computed at the same time, in a few large matrix products, which is what
# GPUs are built for, and any two words are one step apart.
#
# Everything outside the model is chapter 10's, unchanged: `diff 10_seq2seq.py
# 11_transformer.py` reads as "recurrence replaced by attention".


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
# ## The model: a transformer built from its parts
#
# ### Scaled dot-product attention
#
# Chapter 10 scored a query against each key with a small network. The transformer
# uses the cheapest score there is, a dot product. Put the queries of a whole sentence
# in the rows of a matrix $Q$ (one row per position), the keys in $K$ and the values
# (what is read once a position is chosen) in $V$. Then
#
# $$\text{Attention}(Q, K, V) = \text{softmax}\!\left(\frac{Q K^\top}{\sqrt{d}}\right) V.$$
#
# $Q K^\top$ holds every query-key score at once; the softmax runs along each row, so
# each query's weights sum to one; multiplying by $V$ averages the values with those
# weights. Why divide by $\sqrt{d}$, with $d$ the length of a query? If the entries of
# $q$ and $k$ are independent with variance 1, their dot product $\sum_{i=1}^{d} q_i
# k_i$ has variance $d$: long vectors would give huge scores, a softmax close to
# one-hot, and gradients close to zero. Dividing by $\sqrt{d}$ brings the variance back
# to 1.
#
# A *mask* says which keys each query may see: True where allowed. A forbidden score
# becomes $-\infty$ before the softmax, so its weight is exactly zero. Every query here
# always has at least one key it may see, so no row is all $-\infty$.
#
# This function is the attention core: it works on tensors of shape (batch, heads,
# length, head size), and chapter 12 replaces it by a fused GPU kernel (flash
# attention) that computes the same thing without ever storing the score matrix.
# `attention_weights` keeps the weights for the attention maps.


# %%
def attention_weights(q, k, mask):
    """softmax(q kᵀ / √d) with forbidden scores set to -inf: (batch, heads, queries,
    keys). `mask` is True where a query may see a key and broadcasts to that shape."""
    # exercise: softmax(q kᵀ / √d) with the scores the mask forbids set to -inf
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    # end exercise


def scaled_dot_product_attention(q, k, v, mask):
    """The attention core on (batch, heads, length, head size) tensors."""
    return attention_weights(q, k, mask) @ v


# %% [markdown]
# ### Multi-head attention
#
# One attention reads one weighted average: it can look for one thing at a time. In
# "twenty-one thousand", writing "vingt" needs to know the tens word and whether a
# "thousand" follows. *Multi-head* attention runs several attentions side by side, each
# on its own learned projection of the input into a smaller space:
#
# 1. three linear layers turn the inputs into queries, keys and values of size
#    `model_size`;
# 2. each is cut into `heads` pieces of `model_size / heads` numbers, one per head,
#    and arranged as (batch, heads, length, head size);
# 3. every head attends on its own (one call of the core above does all of them);
# 4. the heads' outputs are put side by side again and mixed by a last linear layer.
#
# The cost is the same as one attention of full size, and the heads are free to
# specialise. Queries come from one sequence and keys and values from another
# (`queries`, `keys_values`): the same sequence for self-attention, the encoder's
# output for the decoder's cross-attention. `self.attend` holds the core function, so a
# faster one can be swapped in without touching the rest.


# %%
class MultiHeadAttention(nn.Module):
    def __init__(self, model_size, heads):
        super().__init__()
        if model_size % heads:
            raise ValueError(f"model_size {model_size} is not divisible by heads {heads}")
        self.heads = heads
        self.query = nn.Linear(model_size, model_size)
        self.key = nn.Linear(model_size, model_size)
        self.value = nn.Linear(model_size, model_size)
        self.output = nn.Linear(model_size, model_size)
        self.attend = scaled_dot_product_attention

    def split_heads(self, x):
        """(batch, length, model size) -> (batch, heads, length, head size)."""
        batch, length, model_size = x.shape
        return x.view(batch, length, self.heads, model_size // self.heads).transpose(1, 2)

    def forward(self, queries, keys_values, mask, need_weights=False):
        """Returns the output (batch, query length, model size) and, if asked, the
        attention weights averaged over the heads (batch, query length, key length)."""
        # exercise: project and split into heads, attend, merge the heads, project out
        q = self.split_heads(self.query(queries))
        k = self.split_heads(self.key(keys_values))
        v = self.split_heads(self.value(keys_values))
        mixed = self.attend(q, k, v, mask)
        batch, heads, length, head_size = mixed.shape
        output = self.output(mixed.transpose(1, 2).reshape(batch, length, heads * head_size))
        # end exercise
        weights = attention_weights(q, k, mask).mean(dim=1) if need_weights else None
        return output, weights


# %% [markdown]
# ### Positions
#
# Attention treats its keys as a set: shuffle the source words and every weighted
# average stays the same. Word order matters ("one hundred two" is not "two hundred
# one"), so each position gets a vector added to its word's embedding. The transformer
# paper uses fixed sines and cosines of different wavelengths: for position $p$ and
# dimension pair $i$,
#
# $$PE_{p, 2i} = \sin(p / 10000^{2i/d}), \qquad PE_{p, 2i+1} = \cos(p / 10000^{2i/d}).$$
#
# The first dimensions turn fast (a wavelength of $2\pi$ positions), the last ones very
# slowly, like the hands of a clock, so every position has its own pattern; and the
# vector of $p + k$ is a fixed rotation of that of $p$, which makes relative positions
# easy for attention to read.


# %%
def sinusoidal_positions(length, model_size):
    """The (length, model size) table of sinusoidal position vectors."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, model_size, 2, dtype=torch.float32)
                          * (-math.log(10000.0) / model_size))
    table = torch.zeros(length, model_size)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


# %% [markdown]
# ### Layer normalisation and the feed-forward block
#
# Layer normalisation (met in chapter 08) rescales each position's vector to mean 0
# and variance 1 across its features, then applies a learned gain $\gamma$ and bias
# $\beta$:
#
# $$\text{LN}(x) = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta,
# \qquad \mu = \frac{1}{d}\sum_i x_i, \quad \sigma^2 = \frac{1}{d}\sum_i (x_i - \mu)^2.$$
#
# It keeps the numbers in each layer in a steady range however deep the stack. The
# *feed-forward* block is a two-layer network of chapter 03 applied to every position
# on its own: widen (usually four times; twice here), a nonlinearity, narrow back.
# Attention mixes information *between* positions; the feed-forward block computes on
# what each position has gathered. The paper used ReLU; we use GELU, the smooth ReLU
# that GPT uses, so that chapters 12 and 13 find the same model. Both the normalisation
# (`self.normalise`) and the nonlinearity (`self.activation`) are attributes, so
# chapter 12 can swap in its own kernels.


# %%
def layer_norm(x, weight, bias, eps=1e-5):
    """Normalise the last dimension of x to mean 0, variance 1, then scale and shift."""
    mean = x.mean(dim=-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


class LayerNorm(nn.Module):
    def __init__(self, size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))   # the gain γ
        self.bias = nn.Parameter(torch.zeros(size))    # the bias β
        self.eps = eps
        self.normalise = layer_norm

    def forward(self, x):
        return self.normalise(x, self.weight, self.bias, self.eps)


class FeedForward(nn.Module):
    def __init__(self, model_size, hidden_size, dropout):
        super().__init__()
        self.expand = nn.Linear(model_size, hidden_size)
        self.contract = nn.Linear(hidden_size, model_size)
        self.dropout = nn.Dropout(dropout)
        self.activation = F.gelu

    def forward(self, x):
        return self.contract(self.dropout(self.activation(self.expand(x))))


# %% [markdown]
# ### Encoder and decoder layers
#
# An encoder layer is self-attention then a feed-forward block. Each is wrapped the
# same way: normalise the input, apply the block, apply dropout, and *add* the result to
# the input (a residual connection, chapter 08):
#
# $$x \leftarrow x + \text{Dropout}(\text{Block}(\text{LN}(x))).$$
#
# The residual path lets the gradient flow straight through a deep stack, and each
# block only has to learn a correction. The paper normalised *after* the addition
# ("post-norm"); normalising the block's input ("pre-norm", as GPT-2 and most later
# models do) trains more stably without a long warm-up, so we use that, with one last
# layer norm at the top of each stack.
#
# A decoder layer has three blocks: *masked* self-attention over the target written so
# far, cross-attention from the target positions to the encoder's output (the part
# that chapter 10's additive attention did), and the feed-forward block.
#
# Dropout (chapter 08) zeroes a random tenth of each block's output in training, and of
# the embeddings; in evaluation (`model.eval()`) it does nothing.


# %%
class EncoderLayer(nn.Module):
    def __init__(self, model_size, heads, hidden_size, dropout):
        super().__init__()
        self.attention_norm = LayerNorm(model_size)
        self.attention = MultiHeadAttention(model_size, heads)
        self.feed_forward_norm = LayerNorm(model_size)
        self.feed_forward = FeedForward(model_size, hidden_size, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        normed = self.attention_norm(x)
        x = x + self.dropout(self.attention(normed, normed, mask)[0])
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))


class DecoderLayer(nn.Module):
    def __init__(self, model_size, heads, hidden_size, dropout):
        super().__init__()
        self.self_attention_norm = LayerNorm(model_size)
        self.self_attention = MultiHeadAttention(model_size, heads)
        self.cross_attention_norm = LayerNorm(model_size)
        self.cross_attention = MultiHeadAttention(model_size, heads)
        self.feed_forward_norm = LayerNorm(model_size)
        self.feed_forward = FeedForward(model_size, hidden_size, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y, memory, target_mask, source_mask, need_weights=False):
        """y: the target positions (batch, target length, model size); memory: the
        encoder's output. Returns the new y and, if asked, the cross-attention weights
        (batch, target length, source length)."""
        normed = self.self_attention_norm(y)
        y = y + self.dropout(self.self_attention(normed, normed, target_mask)[0])
        mixed, weights = self.cross_attention(self.cross_attention_norm(y), memory,
                                              source_mask, need_weights)
        y = y + self.dropout(mixed)
        return y + self.dropout(self.feed_forward(self.feed_forward_norm(y))), weights


# %% [markdown]
# ### The whole transformer, and its masks
#
# Two masks, both True where attention is allowed:
#
# - the **padding mask** hides `<pad>` keys: shape (batch, 1, 1, source length), the
#   same for every head and every query;
# - the **causal mask** hides the future in the decoder: position $t$ may see
#   positions $0 \dots t$ only, a lower-triangular (length, length) matrix. Without it
#   the decoder would learn to copy the next target token, which it is given as input,
#   and would be lost when translating alone. The decoder's self-attention mask is the
#   causal mask *and* the target's padding mask.
#
# Token embeddings start with standard deviation $1/\sqrt{d}$ and are multiplied by
# $\sqrt{d}$ (as in the paper), so words and position vectors enter on the same scale.
#
# **Training is parallel.** Given `<bos>` and the true target, one call computes the
# logits of every position at once: the causal mask makes position $t$ depend on the
# true tokens before it only, exactly as if the decoder had been run step by step with
# teacher forcing. That is where the transformer's speed comes from, and why it always
# trains with teacher forcing: feeding its own predictions back would need one call
# per position again. The `teacher_forcing` argument that the training loop passes is
# therefore accepted and ignored, and `scheduled_sampling = False` tells the training
# loop so (its log then shows a teacher forcing of 1).
#
# **Translating is step by step**, as in chapter 10, through the same `start` and
# `step` methods: `step` appends the newest token to the prefix written so far and runs
# the decoder over the whole prefix, keeping the last position's logits. (Production
# decoders cache the keys and values of earlier positions instead of recomputing them;
# chapter 13 comes back to this.)


# %%
class Transformer(nn.Module):
    scheduled_sampling = False  # always teacher forcing: see above

    def __init__(self, source_vocab_size, target_vocab_size, model_size=64, heads=4,
                 layers=2, hidden_size=256, dropout=0.1, max_positions=256):
        super().__init__()
        self.model_size = model_size
        self.source_embedding = nn.Embedding(source_vocab_size, model_size, padding_idx=PAD)
        self.target_embedding = nn.Embedding(target_vocab_size, model_size, padding_idx=PAD)
        for embedding in (self.source_embedding, self.target_embedding):
            nn.init.normal_(embedding.weight, std=model_size ** -0.5)
            embedding.weight.data[PAD] = 0
        self.register_buffer("positions", sinusoidal_positions(max_positions, model_size),
                             persistent=False)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(model_size, heads, hidden_size, dropout) for _ in range(layers))
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(model_size, heads, hidden_size, dropout) for _ in range(layers))
        self.encoder_norm = LayerNorm(model_size)
        self.decoder_norm = LayerNorm(model_size)
        self.output = nn.Linear(model_size, target_vocab_size)
        self.dropout = nn.Dropout(dropout)

    def embed(self, embedding, tokens):
        """Token embeddings, scaled by √d, plus position vectors, with dropout."""
        scaled = embedding(tokens) * math.sqrt(self.model_size)
        return self.dropout(scaled + self.positions[:tokens.shape[1]])

    def encode(self, source):
        """source (batch, source length) -> the encoder's output (batch, source
        length, model size) and the source padding mask."""
        mask = (source != PAD)[:, None, None, :]
        x = self.embed(self.source_embedding, source)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    def decode(self, memory, source_mask, target_input, need_weights=False):
        """Logits (batch, target length, vocabulary) for every target position, and
        the last layer's cross-attention weights if asked."""
        length = target_input.shape[1]
        # exercise: the decoder's mask: each position sees itself and earlier ones, no padding
        causal = torch.ones(length, length, dtype=torch.bool, device=target_input.device).tril()
        target_mask = causal[None, None] & (target_input != PAD)[:, None, None, :]
        # end exercise
        y = self.embed(self.target_embedding, target_input)
        for number, layer in enumerate(self.decoder_layers):
            last = number == len(self.decoder_layers) - 1
            y, weights = layer(y, memory, target_mask, source_mask, need_weights and last)
        return self.output(self.decoder_norm(y)), weights

    def forward(self, source, target_input, teacher_forcing=1.0):
        """Logits (batch, target length, vocabulary) for every position of
        `target_input`, all at once. Always teacher forcing: `teacher_forcing` is
        ignored (see above)."""
        memory, source_mask = self.encode(source)
        return self.decode(memory, source_mask, target_input)[0]

    def start(self, source):
        """Encode `source`; the decoder's state is the encoding and an empty prefix."""
        memory, mask = self.encode(source)
        return {"memory": memory, "mask": mask,
                "prefix": source.new_zeros((source.shape[0], 0))}

    def step(self, state, token):
        """Append `token` (batch,) to the prefix, run the decoder over it: returns the
        last position's logits, the new state and its attention weights over the
        source (batch, source length)."""
        prefix = torch.cat([state["prefix"], token[:, None]], dim=1)
        logits, weights = self.decode(state["memory"], state["mask"], prefix,
                                      need_weights=True)
        return logits[:, -1], {**state, "prefix": prefix}, weights[:, -1]


def add_model_args(parser):
    """The command-line flags of this chapter's model."""
    parser.add_argument("--model-size", type=int, default=64,
                        help="width of every position's vector, even (default 64)")
    parser.add_argument("--heads", type=int, default=4,
                        help="attention heads; must divide --model-size (default 4)")
    parser.add_argument("--layers", type=int, default=2,
                        help="encoder layers, and as many decoder layers (default 2)")
    parser.add_argument("--hidden-size", type=int, default=256,
                        help="width of the feed-forward blocks (default 256)")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="dropout probability, 0 to below 1 (default 0.1)")
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="peak learning rate of Adam (default 0.01)")


def model_checks(args):
    """(condition, message) pairs: the model flags must make a possible model."""
    sizes = (args.model_size, args.heads, args.layers, args.hidden_size)
    return [(min(sizes) >= 1, f"--model-size, --heads, --layers and --hidden-size must be "
                              f"at least 1 (got {', '.join(map(str, sizes))})"),
            (min(sizes) < 1 or args.model_size % (2 * args.heads) == 0,
             f"--model-size ({args.model_size}) must be an even multiple of --heads "
             f"({args.heads}): each head gets an equal share, and position vectors come "
             f"in sine-cosine pairs")]


def build_model(args, source_vocab_size, target_vocab_size):
    """The model the flags ask for."""
    return Transformer(source_vocab_size, target_vocab_size, args.model_size, args.heads,
                       args.layers, args.hidden_size, args.dropout)


# %% [markdown]
# ### What to expect against chapter 10
#
# Run both chapters with the same `--time-budget` (40 seconds by default) and compare
# their `summary:` lines, or better, their `curve`: held-out exact match (on the 100
# pairs checked during training) against seconds of training. On a shared 2-core CPU
# we measured, once with the two chapters run one after the other and once side by
# side on a busier machine (so that each had the same share of it):
#
# | model | steps in 40 s | exact match, 1,000 held out | curve at 8 s, 16 s, 24 s |
# |---|---|---|---|
# | 10, GRU + attention (420k weights), alone | 304 | 100.0% | 95%, 100%, 100% |
# | 11, transformer (240k weights), alone | 434 | 99.5% | 59%, 98%, 100% |
# | 10, side by side, busy machine | 125 | 100.0% | 11%, 94%, 97% |
# | 11, side by side, busy machine | 154 | 92.1% | 0%, 10%, 55% |
#
# The transformer makes more steps in the same time, but the GRU learns more from
# each: it is near 99% after about 100 steps, the transformer after about 200. So on
# this task and this hardware the recurrent model wins at equal time, and the
# transformer catches up only when both have had a few hundred steps (then both
# translate almost every held-out number right). Why?
#
# - The sentences are short (at most 19 target tokens), so the GRU's step-by-step
#   loop is short too, and a CPU has few cores to spread the transformer's parallel
#   work over. The transformer's advantage is parallelism: on a GPU, with long
#   sequences and big batches, one of its steps costs little more than one of the
#   GRU's time steps, and that is the setting of chapters 12 and 13.
# - This task is almost monotone: the French words follow the English ones in order.
#   A recurrent model and additive attention find that order by construction; the
#   transformer has to learn it from position vectors.
# - The transformer has fewer built-in assumptions and, given more data and compute,
#   more room to grow: that trade is why today's large language models are
#   transformers.


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
# ## Attention, drawn
#
# Before training, the path that one multi-head attention layer takes, as a picture
# of the sections on scaled dot-product and multi-head attention above. Three linear
# layers make `Q`, `K` and `V`; `split_heads` cuts each into `heads` slices of
# `d = model_size / heads` numbers; inside the dashed box, every head on its own
# scores its queries against its keys (`Q K^T / sqrt(d)`), sets the forbidden scores
# to `-inf` (the mask), turns each row into weights with a softmax and averages its
# values with them; the heads' outputs are put side by side again and mixed by the
# output layer. The dashed box is `scaled_dot_product_attention`, the one function
# chapter 12 swaps for a fused kernel. Without matplotlib the same flow is printed
# as text.


# %% jupyter={"source_hidden": true}
def draw_attention(model, out_dir):
    """Draw the flow of `model`'s multi-head attention (projections, the core of each
    head, the concatenation) as a PNG in `out_dir` (or print it as text); returns the
    path, or None."""
    heads = next(module.heads for module in model.modules()
                 if isinstance(module, MultiHeadAttention))
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import FancyBboxPatch
    except ImportError:
        print("matplotlib is not installed; multi-head attention as text:")
        print("    queries     --W_Q--> Q --+")
        print("    keys_values --W_K--> K --+--> Q K^T / sqrt(d) -> mask: -inf -> softmax"
              " --+--> x V -> concat heads -> W_O -> output")
        print("    keys_values --W_V--> V -----------------------------------------------+")
        print(f"    (Q, K and V are cut into {heads} heads; the middle runs once per head)")
        return None
    figure, axes = plt.subplots(figsize=(12, 4))
    nodes = {  # name: (x, y, text, colour)
        "queries": (0, 2, "queries", "#e8f0fe"), "kv": (0, 0.5, "keys_values", "#e8f0fe"),
        "q": (1.8, 2, "$Q = $ queries $W_Q$", "#fdf2e9"),
        "k": (1.8, 1, "$K = $ keys_values $W_K$", "#fdf2e9"),
        "v": (1.8, 0, "$V = $ keys_values $W_V$", "#fdf2e9"),
        "scores": (3.8, 1.5, "$Q K^T / \\sqrt{d}$", "#fef9e7"),
        "mask": (5.3, 1.5, "mask:\nforbidden $\\to -\\infty$", "#fef9e7"),
        "softmax": (7.05, 1.5, "softmax\nalong each row", "#fef9e7"),
        "times_v": (8.4, 0.75, "$\\times V$", "#fef9e7"),
        "concat": (9.8, 0.75, f"concatenate\nthe {heads} heads", "#eafaf1"),
        "output": (11.3, 0.75, "$\\cdot W_O$\noutput", "#eafaf1"),
    }
    boxes = {name: axes.text(x, y, text, ha="center", va="center", fontsize=9,
                             bbox=dict(boxstyle="round,pad=0.4", fc=colour, ec="#555555"))
             for name, (x, y, text, colour) in nodes.items()}
    for start, end in [("queries", "q"), ("kv", "k"), ("kv", "v"), ("q", "scores"),
                       ("k", "scores"), ("scores", "mask"), ("mask", "softmax"),
                       ("softmax", "times_v"), ("v", "times_v"), ("times_v", "concat"),
                       ("concat", "output")]:
        axes.annotate("", xy=nodes[end][:2], xytext=nodes[start][:2],
                      arrowprops=dict(arrowstyle="-|>", shrinkA=2, shrinkB=2,
                                      patchA=boxes[start].get_bbox_patch(),
                                      patchB=boxes[end].get_bbox_patch()))
    axes.add_patch(FancyBboxPatch((3.0, -0.35), 5.95, 2.55, boxstyle="round,pad=0.05",
                                  fill=False, ls="--", ec="#b7950b"))
    axes.text(5.97, 2.4, f"each of the {heads} heads, on its own d = model_size / {heads} "
              "numbers: scaled_dot_product_attention", ha="center", fontsize=9,
              color="#b7950b")
    axes.set(xlim=(-0.7, 12), ylim=(-0.6, 2.8))
    axes.axis("off")
    return save_figure(figure, out_dir, "attention_flow")


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
# ## Where the model looks: attention maps
#
# For a few held-out sentences we draw the attention weights of every output step: a
# grid with the source tokens across and the output tokens down, dark where the
# decoder looked. A model that has learned the task looks at "ninety" while writing
# "quatre - vingt - dix", and at "thousand" while writing "mille": an alignment between
# the languages that nobody taught it. Without matplotlib the same grid is printed with
# characters, darker characters for larger weights.
#
# ### Exercises
# `python tools/exercises.py make 11_transformer` cuts these out of a copy, and
# `python tools/exercises.py check 11_transformer` grades it:
#
# * `attention_weights`: softmax(q kᵀ / √d) with the scores the mask forbids set to
#   -inf.
# * `MultiHeadAttention.forward`: project and split into heads, attend, merge the
#   heads, project out.
# * `Transformer.decode`: the decoder's mask: each position sees itself and earlier
#   ones, no padding.
#
# To think about: Why are the scores divided by √d? Why are forbidden scores set to
# -inf before the softmax, not their weights to 0 after it?
#
# Answers. The dot product of two d-dimensional vectors with unit-variance entries has
# variance d, so without the division wide heads give scores that drive softmax to
# near one-hot, where its gradients vanish. exp(-inf) = 0, so the allowed weights
# still sum to 1; zeroing weights after the softmax leaves rows that sum to less than
# 1.


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


# %%
if __name__ == "__main__":
    print_summary({"chapter": CHAPTER, "data": source, "steps": steps,
                   "train_seconds": round(train_seconds, 1),
                   "final_loss": round(float(np.mean(losses[-50:])), 4),
                   "exact_match": round(exact, 4), "token_accuracy": round(token_accuracy, 4),
                   "curve": curve,
                   "seconds": round(time.perf_counter() - started, 1)})
