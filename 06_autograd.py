"""A miniature PyTorch: automatic differentiation (autograd) in numpy.

Chapters 03 and 05 each needed a backward pass derived and written by hand, a page of
calculus per network. This chapter writes, once, the machine that derives them: a
`Tensor` that remembers every operation it takes part in (the computational graph)
and a `.backward()` that walks that graph in reverse, applying the chain rule, so
that every weight ends up holding its gradient. It is the idea at the heart of
PyTorch, JAX and TensorFlow, in a few hundred lines you can read.

New since chapter 05: no backward pass is written by hand any more. The `Tensor`
knows `+ - * / ** @` with numpy broadcasting, sums, means, maxima, reshaping,
indexing, the activations and `cross_entropy`; its backward pass needs no recursion,
so a graph of 100,000 nodes works; `show_graph` prints a graph; SGD (with momentum)
and Adam train with it. The hand-written networks of chapters 03 and 05 are carried
unchanged as the reference: rebuilt on the engine, the same weights give the same
gradients, and training reaches the same figures. Chapter 07 swaps this engine for
PyTorch's, which works the same way.

Run it with `python 06_autograd.py` (about 8 seconds on an idle 2-core CPU) or
`python 06_autograd.py --quick` (about a second). `--bench` times a training step
with the engine, by hand and with PyTorch (set `OMP_NUM_THREADS=1` for steadier
timings); `--data PATH` reads a local copy of the weather table; `--help` lists
every flag. In a notebook (Jupyter, VS Code) the chapter ignores the kernel's command
line and takes its flags from the environment variable ZERO_TO_GPT_ARGS, for example
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

CHAPTER = "06_autograd"


# %% [markdown]
# # Chapter 06: a miniature PyTorch
#
# First the engine: the idea of a computational graph, broadcasting backwards, the
# `Tensor` with the local derivative of each operation, the backward pass in
# topological order without recursion, a text view of a graph, losses and
# optimisers. Then the networks of chapters 03 and 05 rebuilt on it, checked gradient
# for gradient and trained side by side with their hand-written twins; then a graph of
# more than 100,000 nodes, and a benchmark against PyTorch. Everything is numpy:
# PyTorch appears only in the benchmark and in the tests, as the reference the engine
# is measured against.


# %% [markdown]
# ## The idea: remember the computation, then walk it backwards
#
# Chapters 03 and 05 each needed a backward pass written by hand, and each was a page
# of careful calculus that had to be checked against finite differences. Yet every
# one of those pages did the same three things over and over:
#
# 1. break the forward computation into small operations (a matrix product, an
#    addition, a tanh) whose derivative is easy;
# 2. walk the operations in the reverse order of the forward pass;
# 3. at each one, turn "the gradient of the loss with respect to my output" into
#    "the gradient of the loss with respect to each of my inputs" (the chain rule),
#    adding up the contributions when a value was used more than once.
#
# A computer can do all three if, during the forward pass, every operation records
# what it was, which values went in, and how to push a gradient back through itself.
# The record is a **computational graph**: one node per value, an edge from each
# input to the output it helped make. For `loss = mean((x @ w + b - y)^2)`:
#
#     x ──┐
#         @ ── (x@w) ──┐
#     w ──┘            + ── (x@w+b) ── - ── (diff) ── ** 2 ── mean ── loss
#     b ───────────────┘               │
#     y ───────────────────────────────┘
#
# **Reverse-mode automatic differentiation** (backpropagation) starts at `loss`, whose
# gradient with respect to itself is 1, and visits the nodes from the loss back to
# the inputs. A node is visited only after *every* node that used it, so its
# gradient is complete (all contributions summed) before it is passed further back.
# That order is a **topological order** of the graph, reversed.
#
# Each operation needs only its *local* derivative. If `out = f(a, b)` and the loss
# has gradient `g = d loss / d out` (an array of out's shape), then by the chain rule
#
#     d loss / d a = g · (d out / d a)        d loss / d b = g · (d out / d b)
#
# where "·" means whatever the operation's derivative does to `g`: multiply
# elementwise for `*`, a matrix product for `@`, spread it back out for `sum`. The
# list below works out each one. This is exactly what PyTorch's autograd does; the
# class that follows is a miniature of `torch.Tensor`, a few hundred lines of numpy.


# %% [markdown]
# ## Broadcasting, backwards
#
# numpy broadcasting (chapter 01) stretches an array along axes where it has size 1,
# or adds leading axes it lacks: `(rows, 8) + (1, 8)` adds the bias to every row.
# In the backward pass the stretched copies all fed into the loss, so the gradient
# of the original is the **sum** over the copies: the bias's gradient is the
# output gradient summed over the rows (as `dense_backward` does by hand with
# `grad.sum(axis=0, keepdims=True)`). `unbroadcast` does that for any shapes: it sums
# away the leading axes numpy added, then sums with `keepdims` over every axis where
# the original had size 1. The engine calls it whenever a gradient's shape differs
# from its input's, so no operation has to think about broadcasting.

# %%
def unbroadcast(grad, shape):
    """Sum `grad` down to `shape`, undoing numpy broadcasting (see above)."""
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(axis for axis, size in enumerate(shape)
                      if size == 1 and grad.shape[axis] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def expand_reduced(grad, shape, axis, keepdims):
    """Spread the gradient of a reduction (`sum`, `mean`, `max` over `axis`) back to
    the input's `shape`: put back the reduced axes as size 1, then broadcast."""
    if axis is not None and not keepdims:
        grad = np.expand_dims(grad, axis)
    return np.broadcast_to(grad, shape)


# %% [markdown]
# ## The `Tensor`
#
# A `Tensor` wraps a numpy array, `.data`, and adds three things:
#
# * `.requires_grad`: whether the loss's gradient with respect to this tensor is
#   wanted. Weights say yes; the input data and the targets say no. An operation's
#   result requires a gradient when any of its inputs does; a result of constants
#   only is a constant and records nothing, so no time is spent on it.
# * `._parents` and `._backward`: the inputs the tensor was made from, and a small
#   function that takes `d loss / d this tensor` and returns `d loss / d parent` for
#   each parent (or `None` for a parent that needs no gradient). The tensor's
#   operation name, `._op`, is kept for the graph view.
# * `.grad`: after `loss.backward()`, the gradient of the loss with respect to this
#   tensor, an array of the same shape as `.data`.
#
# Every operation below follows one pattern: compute the result with numpy, define
# `backward(grad)` with the local derivative from the table below, and return
# `Tensor.result(value, parents, op, backward)`. Python scalars and numpy arrays
# mixed into an operation are wrapped as constant tensors of the same float type.
#
# **The local derivatives** (with `g` the gradient arriving at the output):
#
#     out = a + b         d/da = g            d/db = g
#     out = a - b         d/da = g            d/db = -g
#     out = a * b         d/da = g * b        d/db = g * a
#     out = a / b         d/da = g / b        d/db = -g * a / b^2 = -g * out / b
#     out = a ** p        d/da = g * p * a^(p - 1)            (p a fixed number)
#     out = a @ b         d/da = g @ b^T      d/db = a^T @ g  (see below)
#     out = exp(a)        d/da = g * out
#     out = log(a)        d/da = g / a
#     out = tanh(a)       d/da = g * (1 - out^2)
#     out = sigmoid(a)    d/da = g * out * (1 - out)
#     out = relu(a)       d/da = g * (a > 0)
#     out = sum(a)        d/da = g copied to every element that was summed
#     out = mean(a)       d/da = g / n copied to each of the n elements averaged
#     out = max(a)        d/da = g at the largest element(s), 0 elsewhere
#     out = a[index]      d/da = zeros, with g added at the positions selected
#
# The matrix product needs one line of algebra. `out[i, j] = sum_k a[i, k] b[k, j]`,
# so `a[i, k]` affects every `out[i, j]` with weight `b[k, j]`:
# `d loss / d a[i, k] = sum_j g[i, j] b[k, j]`, which is `(g @ b^T)[i, k]`. Likewise
# `d loss / d b[k, j] = sum_i a[i, k] g[i, j] = (a^T @ g)[k, j]`. These are the very
# products `dense_backward` writes by hand (`layer_inputs.T @ grad`, `grad @ weight.T`).
#
# **Softmax and log-softmax** (chapter 04) along an axis: with `s = softmax(a)`,
# `d s_i / d a_j = s_i (δ_ij - s_j)`, so the gradient is `s * (g - sum(g * s))`, the
# sum taken along the axis. With `l = log_softmax(a) = a - log(sum(exp(a)))`,
# `d l_i / d a_j = δ_ij - s_j`, so the gradient is `g - s * sum(g)`. Both subtract the
# row's largest value before `exp`, which changes nothing mathematically and keeps
# `exp` from overflowing.
#
# **Speed.** The engine spends its time in numpy's array operations, like PyTorch
# in its kernels; the Python around each operation must stay small or it would
# dominate at small sizes. So the class uses `__slots__` (smaller, faster objects),
# builds results without re-checking their data, records nothing for constants, and
# skips a matrix product in `@`'s backward when an input needs no gradient (the data
# at the bottom of a network never does).

# %%
class Tensor:
    """An array that remembers how it was computed, so gradients can flow back to it.

    `Tensor(data, requires_grad=False, name="")`: `data` is anything numpy turns into
    an array (integers become floats); `name` labels the tensor in `show_graph`."""

    __slots__ = ("data", "grad", "requires_grad", "name", "_parents", "_backward", "_op")
    # numpy must hand `array * tensor` to Tensor.__rmul__ instead of looping over
    # the tensor as if it were a list of objects.
    __array_ufunc__ = None

    def __init__(self, data, requires_grad=False, name=""):
        if isinstance(data, Tensor):
            data = data.data   # a new leaf holding the same numbers, cut from any graph
        data = np.asarray(data)
        if data.dtype.kind != "f":
            data = data.astype(np.float64)
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.name = name
        self._parents = ()
        self._backward = None
        self._op = ""

    @staticmethod
    def result(data, parents, op, backward):
        """The output of an operation: records `parents` and `backward` only when some
        parent needs a gradient, so computations on constants cost nothing extra."""
        out = Tensor.__new__(Tensor)
        out.data = data if type(data) is np.ndarray else np.asarray(data)
        out.grad = None
        out.name = ""
        out._op = op
        out.requires_grad = False
        out._parents = ()
        out._backward = None
        for parent in parents:
            if parent.requires_grad:
                out.requires_grad = True
                out._parents = parents
                out._backward = backward
                break
        return out

    def lift(self, other):
        """`other` as a Tensor: a number or array becomes a constant of our float type."""
        if isinstance(other, Tensor):
            return other
        return Tensor(np.asarray(other, dtype=self.data.dtype))

    # --- what a tensor is -------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    def item(self):
        """The value of a one-element tensor as a Python float."""
        return self.data.item()

    def zero_grad(self):
        """Forget the gradient. Gradients of leaves add up over `backward()` calls (as
        in PyTorch), so training resets them before every step."""
        self.grad = None

    def __repr__(self):
        label = f", name={self.name!r}" if self.name else ""
        grad = ", requires_grad=True" if self.requires_grad else ""
        if self.data.size <= 6:
            return f"Tensor({np.array2string(self.data, precision=4)}{grad}{label})"
        return f"Tensor(shape={self.shape}, dtype={self.data.dtype}{grad}{label})"

    # --- arithmetic: + - * / ** and unary minus -----------------------------------
    def __add__(self, other):
        other = self.lift(other)

        # Each input moves the sum one for one, so both receive the output's gradient
        # unchanged. If numpy broadcast one of them (a bias added to every row), the
        # engine sums its gradient back to its shape with `unbroadcast`.
        def backward(grad):
            return grad, grad

        return Tensor.result(self.data + other.data, (self, other), "+", backward)

    def __sub__(self, other):
        other = self.lift(other)

        def backward(grad):
            return grad, -grad

        return Tensor.result(self.data - other.data, (self, other), "-", backward)

    def __mul__(self, other):
        other = self.lift(other)

        # Nudging a by a small amount moves a * b by b times that amount: each input's
        # gradient is the output's gradient times the *other* input. The closure keeps
        # both inputs alive until the backward pass needs them.
        def backward(grad):
            # exercise: the product rule: each input gets the gradient times the other input
            return grad * other.data, grad * self.data
            # end exercise

        return Tensor.result(self.data * other.data, (self, other), "*", backward)

    def __truediv__(self, other):
        other = self.lift(other)
        value = self.data / other.data

        # d(a/b)/db = -a / b^2, which is -(a/b) / b: reusing the output saves a power.
        def backward(grad):
            return grad / other.data, -grad * value / other.data

        return Tensor.result(value, (self, other), "/", backward)

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor) or not np.isscalar(exponent):
            raise TypeError("the exponent of ** must be a plain number, e.g. x ** 2")

        # The power rule. (A tensor as exponent would need d(a^b)/db = a^b log a, and
        # a positive a; the networks of this course never need it, so it is refused.)
        def backward(grad):
            return (grad * exponent * self.data ** (exponent - 1),)

        return Tensor.result(self.data ** exponent, (self,), f"**{exponent:g}", backward)

    def __neg__(self):
        def backward(grad):
            return (-grad,)

        return Tensor.result(-self.data, (self,), "neg", backward)

    # `2 * x`, `1 - x` and `y / x` start from a number: Python then asks the tensor on
    # the right, and we lift the number to a constant tensor on the left.
    def __radd__(self, other):
        return self.lift(other) + self

    def __rsub__(self, other):
        return self.lift(other) - self

    def __rmul__(self, other):
        return self.lift(other) * self

    def __rtruediv__(self, other):
        return self.lift(other) / self

    # --- the matrix product ---------------------------------------------------------
    def __matmul__(self, other):
        other = self.lift(other)
        a, b = self.data, other.data
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            raise ValueError(
                f"cannot multiply a tensor of shape {a.shape} by one of shape {b.shape} "
                f"with @: the last axis of the first must match the second-to-last axis "
                f"of the second, and both need at least 2 axes")

        # swapaxes(-1, -2) is the transpose of the last two axes, so the same two
        # lines serve plain matrices (n, k) and batches of them (batch, n, k).
        def backward(grad):
            # exercise: the gradients of a @ b for both inputs, matrices and batches
            grad_a = grad @ b.swapaxes(-1, -2) if self.requires_grad else None
            grad_b = None
            if other.requires_grad:
                if b.ndim == 2:
                    # A batch of matrices (..., n, k) times one matrix (k, m): the
                    # same b serves every matrix of the batch, so its gradient sums
                    # a^T g over the batch; folding the batch into the rows does that
                    # sum inside one matrix product.
                    grad_b = a.reshape(-1, a.shape[-1]).T @ grad.reshape(-1, grad.shape[-1])
                else:
                    grad_b = a.swapaxes(-1, -2) @ grad
            return grad_a, grad_b
            # end exercise

        return Tensor.result(a @ b, (self, other), "@", backward)

    def __rmatmul__(self, other):
        return self.lift(other) @ self

    # --- reductions: sum, mean, max -------------------------------------------------
    def sum(self, axis=None, keepdims=False):
        # Every element that was added moves the sum one for one, so each receives the
        # gradient of the output it went into: the gradient is copied back along the
        # summed axes. `axis` may be None (everything), a number or a tuple of them.
        shape = self.data.shape

        def backward(grad):
            return (expand_reduced(grad, shape, axis, keepdims),)

        return Tensor.result(self.data.sum(axis=axis, keepdims=keepdims), (self,), "sum",
                             backward)

    def mean(self, axis=None, keepdims=False):
        # A mean is a sum divided by the number of elements averaged, `count`, so its
        # backward is the sum's, divided by `count`.
        shape = self.data.shape
        value = self.data.mean(axis=axis, keepdims=keepdims)
        count = self.data.size // max(np.size(value), 1)  # elements averaged per output

        def backward(grad):
            return (expand_reduced(grad / count, shape, axis, keepdims),)

        return Tensor.result(value, (self,), "mean", backward)

    def max(self, axis=None, keepdims=False):
        largest = self.data.max(axis=axis, keepdims=True)

        def backward(grad):
            # Only the largest element moved the output; ties share the gradient
            # equally (as torch.amax does), so the total is kept.
            winners = (self.data == largest).astype(self.data.dtype)
            share = winners / winners.sum(axis=axis, keepdims=True)
            return (expand_reduced(grad, self.data.shape, axis, keepdims) * share,)

        value = largest if keepdims else (largest.reshape(()) if axis is None
                                          else np.squeeze(largest, axis=axis))
        return Tensor.result(value, (self,), "max", backward)

    # --- shapes: reshape, transpose, indexing ---------------------------------------
    def reshape(self, *shape):
        # Reshaping moves no number, it only regroups them; the gradient is regrouped
        # back to the input's shape. Accepts x.reshape(2, 3) and x.reshape((2, 3)).
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        original = self.data.shape

        def backward(grad):
            return (grad.reshape(original),)

        return Tensor.result(self.data.reshape(shape), (self,), "reshape", backward)

    def transpose(self, *axes):
        """Permute the axes (all reversed when none are given), as numpy does."""
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        axes = axes or tuple(reversed(range(self.data.ndim)))
        # Output axis i is input axis axes[i]; the gradient must travel the other way.
        # argsort of a permutation is its inverse: it puts the axes back.
        undo = np.argsort(axes)

        def backward(grad):
            return (grad.transpose(undo),)

        return Tensor.result(self.data.transpose(axes), (self,), "transpose", backward)

    @property
    def T(self):
        return self.transpose()

    def __getitem__(self, index):
        # x[1:3], x[:, 0], x[[0, 2]], x[rows, columns]: numpy's indexing, unchanged. The
        # selected elements pass their gradient back to where they came from; the
        # elements left out had no effect on the output, so their gradient is 0.
        if isinstance(index, Tensor):
            index = index.data.astype(np.intp)

        def backward(grad):
            full = np.zeros_like(self.data)
            # add.at, not `full[index] = grad`: an index may pick the same element
            # twice (x[[0, 0]]), and then both gradients must be added.
            np.add.at(full, index, grad)
            return (full,)

        return Tensor.result(self.data[index], (self,), "index", backward)

    # --- elementwise functions ------------------------------------------------------
    def exp(self):
        # e^x is its own derivative, so the backward pass reuses the output.
        value = np.exp(self.data)

        def backward(grad):
            return (grad * value,)

        return Tensor.result(value, (self,), "exp", backward)

    def log(self):
        def backward(grad):
            return (grad / self.data,)

        return Tensor.result(np.log(self.data), (self,), "log", backward)

    def tanh(self):
        # tanh' = 1 - tanh^2, written with the output as in chapter 05's backward pass.
        value = np.tanh(self.data)

        def backward(grad):
            # exercise: tanh's backward rule, written with its output
            return (grad * (1 - value * value),)
            # end exercise

        return Tensor.result(value, (self,), "tanh", backward)

    def sigmoid(self):
        # 1 / (1 + e^-x), written as exp(-log(1 + e^-x)) so that no large x overflows.
        value = np.exp(-np.logaddexp(0, -self.data))

        def backward(grad):
            return (grad * value * (1 - value),)

        return Tensor.result(value, (self,), "sigmoid", backward)

    def relu(self):
        # Slope 1 where the input was positive, 0 elsewhere (at exactly 0 we take 0,
        # as PyTorch does): the same mask as `dense_backward`'s `(pre_activation > 0)`.
        def backward(grad):
            return (grad * (self.data > 0),)

        return Tensor.result(np.maximum(self.data, 0), (self,), "relu", backward)

    def softmax(self, axis=-1):
        # Probabilities along `axis`: e^a_i / sum_j e^a_j (chapter 04), computed after
        # subtracting the largest a_j; the backward formula is derived above.
        shifted = np.exp(self.data - self.data.max(axis=axis, keepdims=True))
        value = shifted / shifted.sum(axis=axis, keepdims=True)

        def backward(grad):
            return (value * (grad - (grad * value).sum(axis=axis, keepdims=True)),)

        return Tensor.result(value, (self,), "softmax", backward)

    def log_softmax(self, axis=-1):
        # log of the softmax without ever taking the log of a tiny probability:
        # a_i - log(sum_j e^a_j), with the largest a_j subtracted first.
        shifted = self.data - self.data.max(axis=axis, keepdims=True)
        value = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))

        def backward(grad):
            return (grad - np.exp(value) * grad.sum(axis=axis, keepdims=True),)

        return Tensor.result(value, (self,), "log_softmax", backward)

    # --- the backward pass ----------------------------------------------------------
    def backward(self):
        """Fill `.grad` of every tensor this one was computed from: d self / d tensor.

        Starts from a single number (a loss), whose gradient with respect to itself
        is 1, and visits the graph in reverse topological order (see below)."""
        if self.data.size != 1:
            raise ValueError(f"backward() starts from a single number such as a loss; this "
                             f"tensor has shape {self.shape} (reduce it with .sum() or .mean())")
        if not self.requires_grad:
            raise ValueError("backward() needs a tensor computed from at least one tensor "
                             "made with requires_grad=True")
        # Parents come before children in `order`, so walking it backwards visits every
        # node after all the nodes that used it: its gradient is complete when read.
        order = topological_order(self)
        for node in order:
            if node._backward is not None:
                node.grad = None   # gradients of intermediate results start afresh
        self.grad = np.ones_like(self.data)
        # exercise: the chain rule: visit nodes in reverse topological order, adding into parents
        for node in reversed(order):
            if node._backward is None:
                continue           # a leaf: a weight or a constant, nothing to pass on
            # The chain rule, one node at a time: its backward function turns
            # d loss / d node into d loss / d parent for each parent.
            for parent, grad in zip(node._parents, node._backward(node.grad)):
                if grad is None or not parent.requires_grad:
                    continue
                if grad.shape != parent.data.shape:
                    grad = unbroadcast(grad, parent.data.shape)
                if parent.grad is not None:
                    parent.grad = parent.grad + grad     # a second use: add it up
                elif parent._backward is None:
                    # A leaf keeps its own copy, because `grad` may be shared (`+`
                    # hands the same array to both inputs) and optimisers and
                    # clipping change leaf gradients in place.
                    parent.grad = np.array(grad)
                else:
                    parent.grad = grad
        # end exercise


# %% [markdown]
# ## Using it
#
# A tiny example, worked by hand so you can follow every number. One row of inputs
# `x = [1, 2]`, weights `w = [0.5, -1]` (a column), target 3:
#
#     x = Tensor([[1.0, 2.0]])
#     w = Tensor([[0.5], [-1.0]], requires_grad=True)
#     loss = ((x @ w - 3) ** 2).mean()      # x @ w = 0.5 - 2 = -1.5; (-1.5 - 3)^2 = 20.25
#     loss.backward()
#     w.grad                                # [[-9.], [-18.]]
#
# By hand: `d loss / d (x @ w) = 2 (-1.5 - 3) = -9`, and `x @ w` grows by `x_i` when
# `w_i` grows by one, so `d loss / d w = -9 * [1, 2] = [-9, -18]`. The engine got
# there by visiting `mean`, `** 2`, `-` and `@` in turn, each applying its own line
# of the table above. `show_graph(loss)` prints those nodes.


# %% [markdown]
# ## The order of the backward pass, without recursion
#
# micrograd and most textbook versions find the topological order with a recursive
# depth-first search: "before a node, list all its parents". Python allows about a
# thousand nested calls, so a recurrent network unrolled over a few hundred days
# (five or six nodes a day) would crash with `RecursionError`. Here the search keeps
# its own stack instead of Python's call stack, so a graph of any size works.
#
# Each node goes on the stack twice: first to be *opened* (its parents are pushed on
# top of it), then, once every parent has been dealt with, to be *closed*, which
# appends it to the order. So a node always lands in the order after all its parents:
# that is a topological order. The `seen` set ensures each node is opened once even
# when many nodes use it (the shared weights of an RNN are used at every step).

# %%
def topological_order(root):
    """Every tensor `root` was computed from, parents before children, root last."""
    # exercise: every tensor the root came from, parents before children, without recursion
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, closing = stack.pop()
        if closing:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for parent in node._parents:
            if parent not in seen:
                stack.append((parent, False))
    return order
    # end exercise


# %% [markdown]
# ## Looking at a graph
#
# A graph is easier to trust when you can see it. `show_graph` lists the nodes in
# topological order, one a line: its number, its operation (or its name for a leaf
# such as a weight), its shape, which nodes went into it, and, after `backward()`,
# the typical size of its gradient (the mean absolute value). Long graphs show their
# first and last lines.

# %%
def show_graph(root, limit=40):
    """A text view of the graph that produced `root`, as a string."""
    # Number the nodes in topological order, so every line refers only to lines
    # above it; a leaf has no inputs, and a constant never gets a gradient.
    order = topological_order(root)
    number = {node: index for index, node in enumerate(order)}
    lines = [f"graph of {len(order)} nodes, inputs before the nodes they feed:",
             f"{'node':>6}  {'operation':<12} {'shape':<14} {'inputs':<14} mean |grad|"]
    shown = order if len(order) <= limit else order[:limit // 2] + [None] + order[-(limit // 2):]
    for node in shown:
        if node is None:
            lines.append(f"{'...':>6}  ({len(order) - 2 * (limit // 2)} more nodes)")
            continue
        if node._backward is not None:
            operation = node._op
        else:
            operation = node.name or ("weight" if node.requires_grad else "constant")
        inputs = " ".join(f"#{number[parent]}" for parent in node._parents)
        grad = "-" if node.grad is None else f"{np.abs(node.grad).mean():.3g}"
        lines.append(f"{'#' + str(number[node]):>6}  {operation:<12} {str(node.shape):<14} "
                     f"{inputs:<14} {grad}")
    return "\n".join(lines)


# %% [markdown]
# ## Losses on tensors
#
# With the engine, a loss is just more operations: the mean squared error of chapter
# 02 is `((predictions - targets) ** 2).mean()`, and the cross-entropy of chapter 04
# is the mean, over the rows, of minus the log-probability that the softmax gives the
# right class. `log_softmax` computes all the log-probabilities stably; indexing with
# `[rows, targets]` picks out the right one in each row. Neither needs a backward
# pass of its own: the engine derives it from the operations.

# %%
def tensor_mse(predictions, targets):
    """Mean squared error of a Tensor of predictions against targets."""
    return ((predictions - targets) ** 2).mean()


def cross_entropy(logits, targets):
    """Mean cross-entropy of `logits` (rows, classes), a Tensor, against `targets`, one
    class number per row, as torch.nn.functional.cross_entropy computes it."""
    targets = np.asarray(targets)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy needs logits of shape (rows, classes) and one "
                         f"target class per row; got logits {logits.shape} and targets "
                         f"{targets.shape}")
    log_probabilities = logits.log_softmax(axis=1)
    return -log_probabilities[np.arange(len(targets)), targets.astype(np.intp)].mean()


# %% [markdown]
# ## Optimisers
#
# An optimiser holds the list of tensors to train and updates their `.data` from
# their `.grad`: the step that chapter 05's `train` wrote inline. Both below follow
# PyTorch's definitions, so they give the same numbers as `torch.optim`.
#
# * **SGD** (stochastic gradient descent) with optional momentum `μ`: a velocity
#   `v ← μ v + g` (just `g` on the first step) remembers the recent direction, and
#   the step is `w ← w - lr v`. With `μ = 0` it is the plain `w ← w - lr g`.
# * **Adam** keeps, for every number, a running mean of the gradient `m` and of its
#   square `v`, and divides one by the square root of the other, so each weight gets
#   a step of about `lr` whatever the scale of its gradient:
#
#       m ← β1 m + (1 - β1) g          v ← β2 v + (1 - β2) g²
#       m̂ = m / (1 - β1^t)             v̂ = v / (1 - β2^t)        (t = step number)
#       w ← w - lr m̂ / (√v̂ + ε)
#
#   The corrections `1 - β^t` undo the pull towards zero of `m` and `v`, which
#   start at zero.

# %%
class Optimizer:
    """What every optimiser shares: its list of tensors, and forgetting their grads."""

    def __init__(self, parameters, learning_rate):
        self.parameters = list(parameters)
        self.learning_rate = learning_rate

    def zero_grad(self):
        for parameter in self.parameters:
            parameter.zero_grad()


class SGD(Optimizer):
    """Stochastic gradient descent, with optional momentum."""

    def __init__(self, parameters, learning_rate, momentum=0.0):
        super().__init__(parameters, learning_rate)
        self.momentum = momentum
        self.velocities = [None] * len(self.parameters)

    def step(self):
        for index, parameter in enumerate(self.parameters):
            if parameter.grad is None:
                continue
            # Without momentum the step follows this batch's gradient alone; with it,
            # an exponentially fading sum of the recent gradients, which smooths out
            # the noise of single batches and speeds up along consistent directions.
            direction = parameter.grad
            if self.momentum:
                previous = self.velocities[index]
                direction = direction if previous is None else self.momentum * previous + direction
                self.velocities[index] = direction
            parameter.data -= self.learning_rate * direction


class Adam(Optimizer):
    """Adam: steps scaled by running averages of the gradient and its square."""

    def __init__(self, parameters, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(parameters, learning_rate)
        self.betas, self.eps, self.steps = betas, eps, 0
        self.means = [np.zeros_like(parameter.data) for parameter in self.parameters]
        self.squares = [np.zeros_like(parameter.data) for parameter in self.parameters]

    def step(self):
        self.steps += 1
        beta1, beta2 = self.betas
        for parameter, mean, square in zip(self.parameters, self.means, self.squares):
            if parameter.grad is None:
                continue
            # The running averages are updated in place: they belong to the optimiser,
            # one pair of arrays per parameter, and persist from step to step.
            mean *= beta1
            mean += (1 - beta1) * parameter.grad
            square *= beta2
            square += (1 - beta2) * parameter.grad ** 2
            corrected_mean = mean / (1 - beta1 ** self.steps)
            corrected_square = square / (1 - beta2 ** self.steps)
            parameter.data -= self.learning_rate * corrected_mean / (np.sqrt(corrected_square)
                                                                      + self.eps)


# %% [markdown]
# ## Set-up: flags, data and plots (not the lesson)
#
# What the chapter needs but does not teach; in a notebook these cells open
# collapsed. Every chapter shares its command line: `--seed` for repeatable runs,
# `--data` for a local copy of the data, `--quick` for a run of a few seconds (used by
# the tests) and `--out` for where files are written. This one adds `--bench` (time
# the engine against the hand-written network and PyTorch, and nothing else),
# `--epochs`, `--hidden-size` and `--window` for the recurrent network, and
# `--unroll`, the number of days of the long graph. Bad values are refused before any
# work starts, so a typing mistake costs no time. The last line of output is
# `summary:` and a line of JSON with the chapter's headline figures, so scripts and
# tests can read it.
#
# The data is the weather table every weather chapter (01-08) reads: one row a day
# from 1970-01-01 to 2022-11-26, with the day's highest and lowest temperatures
# (`tmax`, `tmin`, °F), its rainfall (`rain`, inches) and the next day's highest
# temperature (`tmax_tomorrow`), the number to predict. The carried loader downloads
# it once into `data/` and checks it against a recorded SHA-256 digest; without a
# network it generates a stand-in table of the same shape and says so in one line.
# `save_plots` draws the validation curves of the training runs below, or prints
# them as numbers where matplotlib is not installed.


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
    parser.add_argument("--out", default="out", help="folder for plots (default out/)")
    parser.add_argument("--bench", action="store_true",
                        help="only time a training step (engine, by hand, torch) and print ratios")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of each training run (default 20, --quick 2)")
    parser.add_argument("--hidden-size", type=int, default=32,
                        help="hidden units of the recurrent network (default 32)")
    parser.add_argument("--window", type=int, default=14,
                        help="days the recurrent network reads (default 14)")
    parser.add_argument("--unroll", type=int, default=None,
                        help="days of the long unrolled graph (default 8000, about 100,000 "
                             "nodes; --quick 1000)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.quick else 20
    if args.unroll is None:
        args.unroll = 1000 if args.quick else 8000
    if args.epochs < 1:
        raise DataError(f"--epochs must be at least 1, not {args.epochs}")
    if args.window < 1:
        raise DataError(f"--window must be at least 1 day, not {args.window}")
    if args.hidden_size < 1:
        raise DataError(f"--hidden-size must be at least 1, not {args.hidden_size}")
    if args.unroll < 1:
        raise DataError(f"--unroll must be at least 1 day, not {args.unroll}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DataError(f"--out {args.out} is a file; give a folder for the plots")
    return args


def print_summary(figures):
    """The chapter's last line: `summary: ` and its headline figures as JSON."""
    print("summary: " + json.dumps(figures))


# %% jupyter={"source_hidden": true}
def save_plots(out_dir, histories):
    """Save the validation curves as a PNG in `out_dir`; without matplotlib, print a
    compact text view instead. `histories` maps a network's name to its (by hand,
    engine) histories. Returns the files written."""
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plots; the validation MSE by epoch instead:")
        for name, (hand, engine) in histories.items():
            print(f"  {name} by hand: {' '.join(f'{loss:.2f}' for loss in hand['valid_loss'])}")
            print(f"  {name} engine:  {' '.join(f'{loss:.2f}' for loss in engine['valid_loss'])}")
        return []
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{CHAPTER}_training.png")
    figure, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 4))
    for axis, (name, (hand, engine)) in zip(np.atleast_1d(axes), histories.items()):
        epochs = range(1, len(hand["valid_loss"]) + 1)
        axis.plot(epochs, hand["valid_loss"], label="by hand")
        axis.plot(epochs, engine["valid_loss"], "o", label="engine")
        axis.set(xlabel="epoch", ylabel="validation MSE", title=f"{name} network")
        axis.legend()
    figure.tight_layout()
    show_figure(figure, path)
    plt.close(figure)
    return [path]


# %% [markdown]
# ## Carried code: the hand-written networks of chapters 03 and 05
#
# Chapter 03's losses, input scaling and dense network with its hand-written
# backward pass (`mse`, `mae`, `mse_grad`, `standardise`, `init_dense`, `fresh_model`,
# `dense_forward`, `dense_backward`, `diverged`) are carried unchanged, as the
# reference the engine must match.
#
# In a notebook these cells open collapsed, since chapter 03 taught them; open
# `dense_backward` next to the table of local derivatives above to see that every
# line of it is one of the engine's rules (`layer_inputs.T @ grad` is `@`'s rule for
# its right input, `grad.sum(axis=0, keepdims=True)` is broadcasting undone).


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


def fresh_model(train_set, hidden_sizes, rng):
    """A new He-initialised network for these training rows, with the given hidden
    layer sizes and one output, starting from the mean target."""
    layer_sizes = [train_set[0].shape[1], *hidden_sizes, 1]
    return start_from_mean(init_dense(layer_sizes, rng), train_set[1])


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


def diverged(loss):
    """True when a training loss has blown up: overflowed to inf or nan, or grown past
    1e12 °F² (errors of a million degrees), where no later step can recover."""
    return not np.isfinite(loss) or loss > 1e12


# %% [markdown]
# Chapter 05's windows of days, recurrent network with backpropagation through time
# written by hand, gradient clipping and training loop (`make_sequences`, `init_rnn`,
# `rnn_forward`, `rnn_backward`, `parameter_list`, `global_norm`,
# `clip_by_global_norm`, `train`) are carried unchanged too; `train` takes any
# network as a forward and a backward function, which is what lets the engine drive
# it below.
# `rnn_backward`'s loop over the days, backwards, is what the engine's topological
# order finds by itself in the graph of an unrolled recurrent network.


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


def parameter_list(params):
    """A network's weight arrays (or their gradients) in a fixed order: a dict of
    named arrays in the order of its names, or a list of (weight, bias) pairs."""
    if isinstance(params, dict):
        return [params[name] for name in sorted(params)]
    return [array for pair in params for array in pair]


def global_norm(grads):
    """The length of all gradients seen as one vector."""
    return float(np.sqrt(sum(np.sum(grad ** 2) for grad in parameter_list(grads))))


def clip_by_global_norm(grads, max_norm):
    """Scale `grads` in place so their global norm is at most `max_norm` (no clipping
    when max_norm is None or 0). Returns the norm before clipping."""
    # exercise: scale the gradients in place to a global norm of at most max_norm
    norm = global_norm(grads)
    if max_norm and norm > max_norm:
        for grad in parameter_list(grads):
            grad *= max_norm / norm
    return norm
    # end exercise


def train(params, forward, backward, train_set, valid_set, learning_rate, epochs,
          batch_size, rng, max_norm=None):
    """Mini-batch gradient descent on the MSE with clipping, training `params` in place
    and ending with the weights of the epoch with the lowest validation loss. Returns
    the params and the history: train and valid MSE per epoch, gradient norm per step,
    and whether training diverged (then it stops at once)."""
    inputs, targets = train_set
    history = {"train_loss": [], "valid_loss": [], "grad_norm": [], "diverged": False}
    best = [array.copy() for array in parameter_list(params)]
    for _ in range(epochs):
        order = rng.permutation(len(inputs))
        losses = []
        for start in range(0, len(inputs), batch_size):
            batch = order[start:start + batch_size]
            predictions, cache = forward(params, inputs[batch])
            losses.append(mse(predictions, targets[batch]))
            if diverged(losses[-1]):
                history["diverged"] = True
                return params, history  # more steps cannot bring it back
            grads = backward(params, cache, mse_grad(predictions, targets[batch]))
            history["grad_norm"].append(clip_by_global_norm(grads, max_norm))
            for param, grad in zip(parameter_list(params), parameter_list(grads)):
                param -= learning_rate * grad
        history["train_loss"].append(float(np.mean(losses)))
        history["valid_loss"].append(mse(forward(params, valid_set[0])[0], valid_set[1]))
        if history["valid_loss"][-1] <= min(history["valid_loss"]):
            best = [array.copy() for array in parameter_list(params)]
    for array, saved in zip(parameter_list(params), best):
        array[...] = saved
    return params, history


# %% [markdown]
# ## Chapters 03 and 05 rebuilt on the engine
#
# The forward passes are the ones of chapters 03 and 05, written with tensors; there
# is no backward pass to write. `as_tensors` wraps a network's numpy weights (a list
# of `(weight, bias)` pairs, or a dict of named arrays) as tensors that *share* the
# arrays' memory, so an optimiser step on a tensor also updates the numpy weights and
# the hand-written functions can evaluate the very same network. `gradients_of`
# collects the tensors' gradients in the same structure, which is what the carried
# `parameter_list` and `clip_by_global_norm` expect.
#
# One change in the recurrent network: chapter 05 computed `x_t W_x + b` for every
# day in one product before the loop, and sliced out day `t` inside it. On the
# engine, slicing a tensor that needs a gradient costs, in the backward pass, a
# gradient array as large as the whole tensor (zeros, except for the slice), once
# per day: for a window of `N` days that is `N^2` work. So the engine version slices
# the *input* (a constant, which records nothing) and multiplies day by day. The
# result is the same network and, up to rounding, the same numbers.

# %%
def as_tensors(params):
    """A network's numpy weights as Tensors that share their memory and need a gradient."""
    if isinstance(params, dict):
        return {name: Tensor(array, requires_grad=True, name=name)
                for name, array in params.items()}
    return [(Tensor(weight, requires_grad=True, name=f"weight{number}"),
             Tensor(bias, requires_grad=True, name=f"bias{number}"))
            for number, (weight, bias) in enumerate(params, start=1)]


def gradients_of(tensors):
    """The `.grad` arrays of `as_tensors`'s output, in the same structure."""
    if isinstance(tensors, dict):
        return {name: tensor.grad for name, tensor in tensors.items()}
    return [(weight.grad, bias.grad) for weight, bias in tensors]


def tensor_dense_forward(layers, inputs):
    """Chapter 03's dense network on tensors: ReLU after every layer but the last."""
    # Compare with chapter 03's dense_forward: the same loop, without the cache, since
    # each tensor keeps what its own backward pass needs.
    activations = inputs
    for index, (weight, bias) in enumerate(layers):
        activations = activations @ weight + bias
        if index < len(layers) - 1:
            activations = activations.relu()
    return activations


def tensor_rnn_states(params, sequences):
    """The hidden states h_1 .. h_N of chapter 05's recurrent network on tensors, over
    `sequences` (batch, steps, features), a Tensor: h_t = tanh(x_t W_x + b + h_{t-1} W_h)."""
    batch, steps, _ = sequences.shape
    hidden = Tensor(np.zeros((batch, params["hidden_weight"].shape[0]),
                             dtype=sequences.data.dtype))
    states = []
    for step in range(steps):
        hidden = (sequences[:, step] @ params["input_weight"] + params["hidden_bias"]
                  + hidden @ params["hidden_weight"]).tanh()
        states.append(hidden)
    return states


def tensor_rnn_forward(params, sequences):
    """Chapter 05's recurrent network on tensors: the prediction h_N W_y + b_y."""
    last = tensor_rnn_states(params, sequences)[-1]
    return last @ params["output_weight"] + params["output_bias"]


# %% [markdown]
# ## The weather, as chapters 03 and 05 read it
#
# The dense network reads one day at a time: the rows are split in time order (70%
# train, 15% validation, 15% test) and scaled with the training rows' mean and
# spread, as in chapter 03. The recurrent network reads chapter 05's windows of
# `--window` days, with inputs and targets standardised as there. Both are checked
# here, once the table is loaded, because only then is its length known.

# %%
if __name__ == "__main__":
    ARGS = chapter_args()
    started = time.perf_counter()
    figures = {"chapter": CHAPTER}
    # `--bench` only times a training step (near the end); every other cell skips.
    if not ARGS.bench:
        dates, table, source = load_weather(ARGS.data, ARGS.seed)
        figures["source"] = source
        if ARGS.unroll > len(table):
            raise DataError(f"--unroll {ARGS.unroll} is longer than the data ({len(table)} "
                            f"days); use at most {len(table)} days")
        inputs, targets = table[:, :3], table[:, 3:]
        (train_raw, train_targets), (valid_raw, valid_targets), (test_raw, test_targets) = \
            split_data(inputs, targets)
        train_inputs, valid_inputs, test_inputs = standardise(train_raw, valid_raw, test_raw)
        print(f"weather: {len(table)} days from {source} ({dates[0]} to {dates[-1]}); "
              f"{len(train_raw)} train, {len(valid_raw)} valid, {len(test_raw)} test")
        # The weather thread's two yardsticks on these test days, printed beside the
        # networks' figures at the end: "tomorrow = today", and chapter 02's
        # least-squares line (a column of ones for the bias).
        persistence_mae = mae(test_raw[:, :1], test_targets)
        [(weight, bias)] = least_squares(train_inputs, train_targets)
        closed_form_mae = mae(test_inputs @ weight + bias, test_targets)
        figures.update(persistence_mae=round(persistence_mae, 3),
                       closed_form_mae=round(closed_form_mae, 3))
        splits = split_data(*make_sequences(table, ARGS.window))
        if min(len(part_inputs) for part_inputs, _ in splits) < 1:
            raise DataError(f"{len(table)} days make too few windows of {ARGS.window} days "
                            f"to split into train, valid and test; use a shorter --window")
        window_inputs = standardise(*(part_inputs for part_inputs, _ in splits))
        window_targets = standardise(*(part_targets for _, part_targets in splits))


# %% [markdown]
# The data line says where the table came from: the downloaded file, the one given
# with `--data`, or `generated` when there was no network. Every figure of this
# chapter compares the engine with the hand-written code on the *same* data, so the
# checks mean the same on either table; only the test errors in °F depend on which
# it was.


# %% [markdown]
# ## A first real graph
#
# A small graph, to see what the engine records: a network with one hidden layer of
# 4 units on 5 days, its MSE, and every node's gradient after `backward()`. Read the
# view from the top: the leaves come first (the 5 days of data, the weights and
# biases), then each operation in the order the forward pass made it, down to the
# `mean` that is the loss, whose gradient is 1. The constants (the data) show `-`:
# nothing asked for their gradient, so none was computed.

# %%
if __name__ == "__main__" and not ARGS.bench:
    rng = np.random.default_rng(ARGS.seed)
    tiny = as_tensors(init_dense([3, 4, 1], rng))
    loss = tensor_mse(tensor_dense_forward(tiny, Tensor(train_inputs[:5])), train_targets[:5])
    loss.backward()
    print("the MSE of a [3, 4, 1] network on 5 days, after loss.backward():")
    print(show_graph(loss))


# %% [markdown]
# **Reading the graph.** Fourteen nodes: two constants (the 5 days and their
# targets), the four weight arrays, and eight operations, one per line of
# `dense_forward` plus three for the loss. The gradients explain themselves from the
# bottom up. `mean` has gradient 1, by definition. `**2` has 0.2 everywhere: a mean of
# 5 numbers moves by 1/5 when one of them moves by 1. The `-` node has about 24, which
# is `2 (p - t) / 5` with errors of about 60 °F: the untrained network predicts
# numbers near 0 for temperatures near 60. From there the gradient splits at each
# `+` (both inputs get all of it) and changes shape at each `@`, exactly as the table
# of local derivatives says. Nothing here was written for this network: the same
# code walks any graph.


# %% [markdown]
# ### The worked example, drawn from its own graph
#
# The example of "Using it", `loss = ((x @ w - 3) ** 2).mean()`, drawn by walking the
# graph that the engine recorded, not drawn by hand: `draw_graph` takes the nodes
# from `topological_order(loss)` and puts each one in the column of its depth, the
# length of the longest path that reaches it from a leaf, so every arrow points
# right, from an input to the operation that used it. Each box shows the node's
# operation (or a leaf's name), its value and, on its last line, the gradient that
# `backward()` left in it: read the gradients from right to left and you follow the
# backward pass, `1` at the loss, `-9` at `x @ w`, `[-9, -18]` at `w`. The
# constants `x` and `3` have no gradient, since nothing asked for one. Without
# matplotlib the same graph is printed as `show_graph`'s text.


# %% jupyter={"source_hidden": true}
def draw_graph(root, out_dir, name="graph"):
    """Draw the graph that produced `root` (each node's operation, value and gradient,
    laid out by depth) as a PNG in `out_dir`; without matplotlib, print `show_graph`'s
    text view instead. Returns the files written."""
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no drawing; the graph as text instead:")
        print(show_graph(root))
        return []
    order = topological_order(root)
    depth = {}
    for node in order:  # parents come first, so their depths are already known
        depth[node] = 1 + max((depth[parent] for parent in node._parents), default=-1)
    columns = {}
    for node in order:
        columns.setdefault(depth[node], []).append(node)

    def numbers(array):
        return (np.array2string(array.ravel(), precision=3, separator=", ")
                if array.size <= 2 else f"shape {array.shape}")

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{CHAPTER}_{name}.png")
    figure, axes = plt.subplots(figsize=(2.3 * len(columns) + 1, 4.5))
    boxes, places = {}, {}
    for column, nodes in columns.items():
        for row, node in enumerate(nodes):
            places[node] = (column, (len(nodes) - 1) / 2 - row)
            leaf = node._backward is None
            label = node._op if not leaf else node.name or (
                "weight" if node.requires_grad else "constant")
            grad = "grad -" if node.grad is None else f"grad {numbers(node.grad)}"
            boxes[node] = axes.text(*places[node], f"{label}\n{numbers(node.data)}\n{grad}",
                                    ha="center", va="center", fontsize=9,
                                    bbox=dict(boxstyle="round,pad=0.4",
                                              fc="#fdf2e9" if leaf else "#e8f0fe",
                                              ec="#d35400" if leaf else "#3b6fb6"))
    for node in order:
        for parent in node._parents:
            axes.annotate("", xy=places[node], xytext=places[parent],
                          arrowprops=dict(arrowstyle="-|>", shrinkA=2, shrinkB=2,
                                          patchA=boxes[parent].get_bbox_patch(),
                                          patchB=boxes[node].get_bbox_patch()))
    rows = max(len(nodes) for nodes in columns.values())
    axes.set(xlim=(-0.6, len(columns) - 0.4), ylim=(-rows / 2 - 0.2, rows / 2 + 0.2),
             title=f"the engine's graph of {len(order)} nodes: inputs on the left, "
                   "the loss on the right, gradients after backward()")
    axes.axis("off")
    show_figure(figure, path)
    plt.close(figure)
    return [path]


# %%
if __name__ == "__main__" and not ARGS.bench:
    x = Tensor([[1.0, 2.0]], name="x")
    w = Tensor([[0.5], [-1.0]], requires_grad=True, name="w")
    example_loss = ((x @ w - 3) ** 2).mean()
    example_loss.backward()
    print(f"the worked example: loss {example_loss.item():g}, w.grad "
          f"{w.grad.ravel().tolist()}")
    for path in draw_graph(example_loss, ARGS.out, "example_graph"):
        print(f"saved {path}")


# %% [markdown]
# ## Same weights, same gradients
#
# The engine is only useful if it is right. The test: give the hand-written network
# and the engine the same weights and the same batch, and compare every gradient. The
# hand-written gradients were checked against finite differences in chapters 03 and
# 05, so agreement to rounding error (about 1e-15 relative, in 64-bit floats) means
# the engine's are right too. The chapter's tests also compare every single
# operation with `torch.autograd`.

# %%
def gradient_difference(params, forward, backward, tensor_forward, inputs, targets):
    """The largest difference between the hand-written gradients of the MSE and the
    engine's, over every weight array, relative to that array's largest gradient."""
    predictions, cache = forward(params, inputs)
    by_hand = backward(params, cache, mse_grad(predictions, targets))
    tensors = as_tensors(params)
    tensor_mse(tensor_forward(tensors, Tensor(inputs)), targets).backward()
    worst = 0.0
    for hand, engine in zip(parameter_list(by_hand), parameter_list(gradients_of(tensors))):
        scale = max(float(np.abs(hand).max()), 1e-12)
        worst = max(worst, float(np.abs(hand - engine).max()) / scale)
    return worst

if __name__ == "__main__" and not ARGS.bench:
    # A batch of 64 days for chapter 03's network, 64 windows for chapter 05's.
    dense_difference = gradient_difference(
        init_dense([3, 32, 32, 1], rng), dense_forward, dense_backward, tensor_dense_forward,
        train_inputs[:64], train_targets[:64])
    rnn_difference = gradient_difference(
        init_rnn(3, ARGS.hidden_size, rng), rnn_forward, rnn_backward, tensor_rnn_forward,
        window_inputs[0][:64], window_targets[0][:64])
    print(f"largest relative gradient difference, hand-written vs engine: dense "
          f"{dense_difference:.1e}, recurrent {rnn_difference:.1e}")
    figures["dense_gradient_difference"] = float(f"{dense_difference:.1e}")
    figures["rnn_gradient_difference"] = float(f"{rnn_difference:.1e}")


# %% [markdown]
# **Reading the result.** For the dense network the difference is exactly 0: the
# engine performs the very products and sums that `dense_backward` writes by hand,
# in the same order, so even the rounding is the same. For the recurrent network it
# is a few times 1e-16, the size of one rounding step in 64-bit floats: the engine
# computes `x_t W_x` day by day where chapter 05 did it in one product for all days,
# and sums rounded in a different order differ in the last digit. A mistake in a
# local derivative would show up as a difference of 1e-3 or more, not 1e-15.


# %% [markdown]
# ## Training with the engine
#
# Chapter 05's `train` takes any network as two functions, `forward(params, inputs)`
# returning `(predictions, cache)` and `backward(params, cache, output_grad)` returning
# the gradients. `engine_functions` makes that pair from a forward pass written with
# tensors, so the carried `train` drives the engine unchanged: same shuffles, same
# clipping, same steps. From the same starting weights the two must reach the same
# figures; a difference beyond rounding would be a bug in one of them.
#
# The backward function is given `output_grad`, `d loss / d predictions`, an array,
# not a single number. The engine starts from a number, so it runs backward from
# `sum(predictions * output_grad)`: that sum's gradient with respect to the
# predictions is exactly `output_grad`, so from there back the chain rule produces
# exactly the gradients `train` asks for. (PyTorch spells this
# `predictions.backward(output_grad)`.)

# %%
def engine_functions(tensor_forward):
    """Chapter 05's (forward, backward) pair for a network whose forward pass,
    `tensor_forward(tensors, inputs)`, is written with tensors."""
    # The cache is what backward needs: the tensors holding the weights, and the
    # prediction node where the backward pass starts.
    def forward(params, inputs):
        tensors = as_tensors(params)
        predictions = tensor_forward(tensors, Tensor(inputs))
        return predictions.data, (tensors, predictions)

    def backward(params, cache, output_grad):
        tensors, predictions = cache
        (predictions * output_grad).sum().backward()
        return gradients_of(tensors)

    return forward, backward


def compare_training(name, params, forward, backward, tensor_forward, sets, settings, rng):
    """Train two copies of `params` with chapter 05's `train`, one with the hand-written
    backward pass and one with the engine's, from the same weights and on the same
    batches (`rng` is rewound for the second). Returns both trained copies and both
    histories: (hand, engine, hand_history, engine_history)."""
    train_set, valid_set = sets
    epochs, learning_rate, batch_size, max_norm = settings
    # Save the generator's state, and rewind to it before the second run, so both
    # runs draw the same shuffles.
    state = rng.bit_generator.state
    results = []
    for functions in ((forward, backward), engine_functions(tensor_forward)):
        copy = {key: value.copy() for key, value in params.items()} if isinstance(params, dict) \
            else [(weight.copy(), bias.copy()) for weight, bias in params]
        rng.bit_generator.state = state
        started = time.perf_counter()
        _, history = train(copy, *functions, train_set, valid_set, learning_rate, epochs,
                           batch_size, rng, max_norm=max_norm)
        results.append((copy, history, time.perf_counter() - started))
    (hand, hand_history, hand_seconds), (engine, engine_history, engine_seconds) = results
    print(f"  {name}: {epochs} epochs by hand in {hand_seconds:.1f} s, with the engine "
          f"in {engine_seconds:.1f} s")
    return hand, engine, hand_history, engine_history

if __name__ == "__main__" and not ARGS.bench:
    # Chapter 03's dense network (its settings and starting weights) and chapter 05's
    # recurrent one, each trained twice.
    print("training each network twice, by hand and with the engine, from the same "
          "weights on the same batches:")
    dense_sets = ((train_inputs, train_targets), (valid_inputs, valid_targets))
    dense_start = fresh_model(dense_sets[0], [32, 32], np.random.default_rng(ARGS.seed))
    *dense_trained, dense_hand_history, dense_engine_history = compare_training(
        "dense [3, 32, 32, 1]", dense_start, dense_forward, dense_backward,
        tensor_dense_forward, dense_sets, (ARGS.epochs, 0.001, 32, None),
        np.random.default_rng(ARGS.seed))
    dense_maes = [mae(dense_forward(layers, test_inputs)[0], test_targets)
                  for layers in dense_trained]
    rng = np.random.default_rng(ARGS.seed)
    rnn_start = init_rnn(3, ARGS.hidden_size, rng)
    *rnn_trained, rnn_hand_history, rnn_engine_history = compare_training(
        f"recurrent, {ARGS.window} days, {ARGS.hidden_size} hidden", rnn_start, rnn_forward,
        rnn_backward, tensor_rnn_forward,
        ((window_inputs[0], window_targets[0]), (window_inputs[1], window_targets[1])),
        (ARGS.epochs, 0.02, 32, 1.0), rng)
    # The recurrent network predicts standardised temperatures, as in chapter 05:
    # multiply by the training targets' spread and add their mean to get °F back.
    mean, spread = splits[0][1].mean(), splits[0][1].std()
    rnn_maes = [mae(rnn_forward(params, window_inputs[2])[0] * spread + mean, splits[2][1])
                for params in rnn_trained]
    # The strongest check of all: after thousands of steps, the two copies of each
    # network hold the same weights, up to rounding in the last digits.
    weight_difference = max(float(np.abs(hand - engine).max())
                            for pair in (dense_trained, rnn_trained)
                            for hand, engine in zip(*map(parameter_list, pair)))
    print(f"  test MAE, by hand and with the engine: dense {dense_maes[0]:.4f} and "
          f"{dense_maes[1]:.4f} °F, recurrent {rnn_maes[0]:.4f} and {rnn_maes[1]:.4f} °F")
    print(f"  largest difference between the trained weights: {weight_difference:.1e}")
    figures.update({"dense_test_mae_by_hand": round(dense_maes[0], 4),
                    "dense_test_mae_engine": round(dense_maes[1], 4),
                    "rnn_test_mae_by_hand": round(rnn_maes[0], 4),
                    "rnn_test_mae_engine": round(rnn_maes[1], 4),
                    "trained_weight_difference": float(f"{weight_difference:.1e}")})


# %% [markdown]
# **Reading the result.** The test errors agree to every printed digit, and after
# thousands of steps the weights of the two copies differ by about 1e-16, the
# rounding of the last digit: the engine is not an approximation of the hand-written
# networks, it *is* them. It is slower, about twice the time: every operation builds
# a node and the backward pass sorts the graph, work that a hand-written backward
# pass avoids by knowing the network in advance. That is the price of never deriving
# a backward pass again, and the benchmark below measures it at a larger size.


# %% [markdown]
# ## A training loop written for the engine
#
# Written from scratch for the engine, a training loop needs no backward function
# and no update rule of its own: the optimiser owns the update. The step is the one
# every PyTorch program uses, and chapter 07 will write it again with `torch`:
#
#     optimizer.zero_grad()                  # forget the last step's gradients
#     loss = tensor_mse(forward(params, x), y)
#     loss.backward()                        # fill every weight's .grad
#     optimizer.step()                       # move the weights
#
# Swapping `SGD` for `Adam` is then a one-word change; below, Adam trains chapter
# 03's network.

# %%
def train_with_engine(forward, optimizer, train_set, epochs, batch_size, rng):
    """Mini-batch training of a network written with tensors: `forward(inputs)` returns
    predictions, `optimizer` holds its weights. Returns the mean loss of each epoch."""
    inputs, targets = train_set
    epoch_losses = []
    for _ in range(epochs):
        order = rng.permutation(len(inputs))
        losses = []
        for start in range(0, len(inputs), batch_size):
            batch = order[start:start + batch_size]
            # The data and targets are constants: the graph starts at the weights.
            optimizer.zero_grad()
            loss = tensor_mse(forward(Tensor(inputs[batch])), targets[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch_losses.append(float(np.mean(losses)))
    return epoch_losses

if __name__ == "__main__" and not ARGS.bench:
    # The same starting weights and batches as chapter 03's network above; only the
    # optimiser differs.
    tensors = as_tensors(fresh_model(dense_sets[0], [32, 32], np.random.default_rng(ARGS.seed)))
    train_with_engine(lambda batch: tensor_dense_forward(tensors, batch),
                      Adam(parameter_list(tensors), 0.001), dense_sets[0], ARGS.epochs, 32,
                      np.random.default_rng(ARGS.seed))
    adam_mae = mae(tensor_dense_forward(tensors, Tensor(test_inputs)).data, test_targets)
    print(f"dense [3, 32, 32, 1] trained with the engine's Adam: test MAE {adam_mae:.4f} °F")
    figures["adam_test_mae"] = round(adam_mae, 4)
    # The networks trained with the engine beside the yardsticks (the recurrent
    # network's test windows end on the same last 15% of days).
    print("test MAE, lower is better:")
    for name, value in (("'tomorrow = today'", persistence_mae),
                        ("least squares", closed_form_mae),
                        ("dense, engine's SGD", dense_maes[1]),
                        ("dense, engine's Adam", adam_mae),
                        ("recurrent, engine", rnn_maes[1])):
        print(f"  {name:<22} {value:.2f} °F")


# %% [markdown]
# **Reading the result.** Adam's error is close to plain gradient descent's above:
# the weather is an easy problem for this network, and both optimisers find
# about the same solution in so few epochs. What matters here is how little code it
# took. The training loop did not change; only the optimiser object did, because the
# engine puts every gradient where any optimiser can find it, in `.grad`.


# %% [markdown]
# ## A graph of 100,000 nodes
#
# A recurrent network that reads the weather record as one long sequence, day after
# day, and predicts every tomorrow on the way, makes a long, thin graph: about 13
# nodes a day (the cell, the read-out, the squared error and the running total),
# each day depending on the day before. Over 8,000 days that is more than 100,000
# nodes, a hundred times deeper than a recursive search could go. The iterative
# search handles it.
#
# To check the result we need a reference that does not use the engine. Chapter
# 05's `rnn_forward` keeps every hidden state `h_t`, so the same loss,
#
#     loss = (1 / days) * sum over t of (h_t W_y + b_y - tmax_tomorrow_t)^2
#
# is three lines of numpy, and central differences of it give the slope for any
# one weight. We check one weight in each of the five weight arrays.

# %%
def sequence_loss(params, sequence, targets):
    """The every-day loss above, in numpy, from chapter 05's `rnn_forward`."""
    _, cache = rnn_forward(params, sequence)
    predictions = np.concatenate(cache["hiddens"][1:]) @ params["output_weight"] \
        + params["output_bias"]
    return mse(predictions, targets)


def long_unroll(features, targets, days, hidden_size, seed, epsilon=1e-6):
    """Run a small RNN over the first `days` days as one sequence, predicting every
    tomorrow, with the engine. Returns (nodes in the graph, seconds for backward(),
    largest relative difference from central differences on five weights)."""
    rng = np.random.default_rng(seed)
    params = init_rnn(features.shape[1], hidden_size, rng)
    sequence, day_targets = features[None, :days], targets[:days]
    # Build the graph: the loss starts as the number 0 and grows by one squared error
    # a day (0 + tensor works through Tensor.__radd__).
    tensors = as_tensors(params)
    loss = 0
    for day, hidden in enumerate(tensor_rnn_states(tensors, Tensor(sequence))):
        prediction = hidden @ tensors["output_weight"] + tensors["output_bias"]
        loss = loss + ((prediction - day_targets[day]) ** 2).sum()
    loss = loss / days
    nodes = len(topological_order(loss))
    started = time.perf_counter()
    loss.backward()
    seconds = time.perf_counter() - started
    # The check: one randomly chosen weight from each array, nudged up and down in
    # the numpy arrays (the tensors share them, but their gradients are already set).
    worst = 0.0
    for name, array in params.items():
        index = tuple(rng.integers(size) for size in array.shape)
        saved = array[index]
        array[index] = saved + epsilon
        loss_plus = sequence_loss(params, sequence, day_targets)
        array[index] = saved - epsilon
        loss_minus = sequence_loss(params, sequence, day_targets)
        array[index] = saved
        numeric = (loss_plus - loss_minus) / (2 * epsilon)
        engine = tensors[name].grad[index]
        worst = max(worst, abs(engine - numeric) / max(abs(engine), abs(numeric), 1e-12))
    return nodes, seconds, worst

if __name__ == "__main__" and not ARGS.bench:
    # The whole record is scaled with its own mean and spread: this run only measures
    # gradients, nothing is evaluated on it.
    all_inputs = standardise(inputs)[0]
    all_targets = standardise(targets)[0]
    nodes, seconds, unroll_difference = long_unroll(all_inputs, all_targets, ARGS.unroll, 8,
                                                    ARGS.seed)
    print(f"a recurrent network reading {ARGS.unroll} days in a row, predicting each "
          f"tomorrow: {nodes} nodes, backward() in {seconds:.2f} s; largest relative "
          f"difference from finite differences {unroll_difference:.1e}")
    figures["unroll_nodes"] = nodes
    figures["unroll_gradient_difference"] = float(f"{unroll_difference:.1e}")


# %% [markdown]
# **Reading the result.** Thirteen nodes a day, plus a few to start and finish:
# 1,000 days make about 13,000 nodes, 8,000 days about 104,000, far beyond the
# thousand nested calls a recursive search could make. The backward pass takes time
# in proportion to the number of nodes, a fraction of a second here. The difference
# from finite differences, about 1e-9, is the accuracy of central differences with a
# step of 1e-6 (they are exact only for a quadratic), not an error of the engine: the
# gradients of the short networks above matched the hand-written ones to 1e-15.


# %% [markdown]
# ## How fast is it?
#
# `--bench` times one training step (forward, loss, backward, update) of a dense
# network with two hidden layers of 256 units on a batch of 256 rows, three ways:
# by hand (chapter 03's functions), with the engine, and with PyTorch's own autograd
# on the CPU. All three use 32-bit floats and the same starting weights, and the
# steps take turns so that a busy machine slows them alike. We report the fastest
# step of each, the one least disturbed by other programs, and the median, and
# compute the ratios from the fastest.
#
# Most of the time goes into the matrix products, which numpy and PyTorch hand to
# an optimised BLAS library; the rest is Python deciding what to compute next.
# The engine adds a little of that per operation (building the graph, sorting it)
# on top of the hand-written version. Set `OMP_NUM_THREADS=1` for steadier numbers:
# both libraries then use one core.

# %%
def benchmark(batch_size=256, hidden_size=256, repeats=30, seed=0):
    """Milliseconds per training step, {"by hand", "engine", "torch"}: each a pair
    (fastest, median) over `repeats` steps."""
    import torch
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(batch_size, 3)).astype(np.float32)
    targets = rng.normal(size=(batch_size, 1)).astype(np.float32)
    start = [(weight.astype(np.float32), bias.astype(np.float32))
             for weight, bias in init_dense([3, hidden_size, hidden_size, 1], rng)]
    learning_rate = 1e-3

    # By hand: chapter 03's forward and backward passes and a plain gradient step,
    # updating the arrays in place (as the optimisers do) so no time goes to copies.
    hand_layers = [(weight.copy(), bias.copy()) for weight, bias in start]

    def hand_step():
        predictions, cache = dense_forward(hand_layers, inputs)
        grads = dense_backward(hand_layers, cache, mse_grad(predictions, targets))
        for (weight, bias), (weight_grad, bias_grad) in zip(hand_layers, grads):
            weight -= learning_rate * weight_grad
            bias -= learning_rate * bias_grad

    # With the engine: the four lines of every training step, and the engine's SGD.
    tensors = as_tensors([(weight.copy(), bias.copy()) for weight, bias in start])
    optimizer = SGD(parameter_list(tensors), learning_rate)
    tensor_inputs = Tensor(inputs)

    def engine_step():
        optimizer.zero_grad()
        tensor_mse(tensor_dense_forward(tensors, tensor_inputs), targets).backward()
        optimizer.step()

    # With PyTorch: the same network and step written with torch tensors, run eagerly
    # (operation by operation, as the engine does), on the CPU.
    torch_layers = [(torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True))
                    for weight, bias in start]
    torch_inputs, torch_targets = torch.from_numpy(inputs), torch.from_numpy(targets)

    def torch_step():
        activations = torch_inputs
        for index, (weight, bias) in enumerate(torch_layers):
            activations = activations @ weight + bias
            if index < len(torch_layers) - 1:
                activations = torch.relu(activations)
        ((activations - torch_targets) ** 2).mean().backward()
        with torch.no_grad():   # the update itself must not be recorded in a graph
            for parameter in (array for pair in torch_layers for array in pair):
                parameter -= learning_rate * parameter.grad
                parameter.grad = None

    steps = {"by hand": hand_step, "engine": engine_step, "torch": torch_step}
    times = {name: [] for name in steps}
    for step in steps.values():   # warm up: first calls allocate and load code
        step()
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return {name: (1000 * min(seconds), 1000 * float(np.median(seconds)))
            for name, seconds in times.items()}


def run_benchmark(args):
    """`--bench`: time the three training steps and print the ratios."""
    import torch
    batch_size = hidden_size = 256
    repeats = 10 if args.quick else 50
    print(f"one training step of a dense network [3, {hidden_size}, {hidden_size}, 1], batch "
          f"{batch_size}, float32, {repeats} steps each; torch uses {torch.get_num_threads()} "
          f"thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    timings = benchmark(batch_size, hidden_size, repeats, args.seed)
    for name, (fastest, median) in timings.items():
        print(f"  {name:>8}: fastest {fastest:7.3f} ms, median {median:7.3f} ms")
    milliseconds = {name: fastest for name, (fastest, _) in timings.items()}
    ratios = {"engine_vs_torch": milliseconds["engine"] / milliseconds["torch"],
              "engine_vs_hand": milliseconds["engine"] / milliseconds["by hand"],
              "hand_vs_torch": milliseconds["by hand"] / milliseconds["torch"]}
    print(f"fastest steps: engine / torch {ratios['engine_vs_torch']:.2f}x, engine / by hand "
          f"{ratios['engine_vs_hand']:.2f}x, by hand / torch {ratios['hand_vs_torch']:.2f}x")
    return {**{f"{name.replace(' ', '_')}_ms": round(value, 3)
               for name, value in milliseconds.items()},
            **{name: round(value, 2) for name, value in ratios.items()}}

if __name__ == "__main__" and ARGS.bench:
    figures.update(run_benchmark(ARGS))


# %% [markdown]
# **Reading the result** (with `--bench`; a plain run skips this cell). Expect the
# engine within a few tens of percent of the hand-written step, and PyTorch in the
# same range: at this size all three spend most of their time in the same BLAS
# matrix products, so the bookkeeping of building and walking a graph costs little.
# The picture changes with size. On tiny arrays the Python around each operation
# dominates, and the engine, which runs more Python per operation, falls behind;
# on a GPU PyTorch runs the products hundreds of times faster, which no numpy code
# can follow. That, not the idea, is what chapter 07 gains by switching.


# %% [markdown]
# ## Plots
#
# One picture: the validation loss epoch by epoch of each network, trained by hand
# (line) and with the engine (dots). The dots should sit on the line; a dot off it
# would mean the two runs parted, which the weight difference above rules out. (The
# dense network's loss is in °F²; the recurrent network, as in chapter 05, learns
# standardised targets.)

# %%
if __name__ == "__main__" and not ARGS.bench:
    for path in save_plots(ARGS.out, {"dense": (dense_hand_history, dense_engine_history),
                                      "recurrent": (rnn_hand_history, rnn_engine_history)}):
        print(f"saved {path}")


# %% [markdown]
# **Reading the plots.** Both networks' validation losses fall over the first
# epochs and then level off; the dots of the engine cover the lines of the
# hand-written runs at every epoch, which is the weight difference of about 1e-16
# seen from further away. Where matplotlib is not installed the same numbers are
# printed instead, one row per run, and the two rows of each network are identical.


# %% [markdown]
# ## What PyTorch adds
#
# The engine above is, in spirit, how `torch.autograd` works: a graph recorded
# during the forward pass, walked backwards in topological order, with a local
# derivative per operation and gradients summed where values are reused. PyTorch
# adds what a production library needs: operations written in C++ and CUDA that run
# on GPUs, hundreds more operations, `torch.no_grad()` to switch recording off
# during evaluation, freeing each node's saved arrays as soon as the backward pass
# has used them, checks that catch an array changed in place after it was saved,
# and gradients of gradients. Chapter 07 moves the same networks onto it.
#
# The last line is the run's summary: where the data came from, the test errors of
# each network trained by hand and with the engine (equal to rounding), Adam's test
# error, the largest differences between hand-written and engine gradients and
# trained weights (rounding-sized), and the size of the long graph with its
# agreement with finite differences. With `--bench` it holds the benchmark's
# milliseconds and ratios instead.
#
# ### Exercises
# `python tools/exercises.py make 06_autograd` cuts these out of a copy, and
# `python tools/exercises.py check 06_autograd` grades it:
#
# * `Tensor.__mul__.backward`: the product rule: each input gets the gradient times
#   the other input.
# * `Tensor.__matmul__.backward`: the gradients of a @ b for both inputs, matrices and
#   batches.
# * `Tensor.tanh.backward`: tanh's backward rule, written with its output.
# * `Tensor.backward`: the chain rule: visit nodes in reverse topological order,
#   adding into parents.
# * `topological_order`: every tensor the root came from, parents before children,
#   without recursion.
#
# To think about: Why must `backward` visit the nodes in reverse topological order,
# and why does each node add to `.grad` instead of setting it?
#
# Answers. A node may pass its gradient on only once it is complete, that is after
# every node that used it has added its share; reverse topological order guarantees
# that. Adding is the multivariable chain rule: a value used twice (x * x, or a weight
# shared by every time step) gets one contribution from each use, and the sum is its
# gradient.

# %%
if __name__ == "__main__":
    print_summary({**figures, "seconds": round(time.perf_counter() - started, 1)})
