"""GPU programming with Triton: the transformer's hot operations as fused kernels.

Chapter 11 built a transformer out of PyTorch operations. Each of those operations reads
its inputs from the GPU's main memory and writes its result back, and for most of them
that round trip, not the arithmetic, is what takes the time. This chapter writes the
transformer's hot operations as Triton kernels that do more work per trip to memory:

- `add(x, y)`: the first kernel, to learn program ids, blocks and masks;
- `softmax(x)`: a row-wise fused softmax with an online (running max and sum) loop for
  rows longer than one block, and its backward;
- `layer_norm(x, weight, bias)` (bias may be None, as in `F.layer_norm`) and
  `rms_norm(x, weight)`: forward and backward, with the weight and bias gradients
  reduced across rows;
- `gelu(x)` (tanh approximation) and `swiglu(a, b)`: fused activations, both directions;
- `cross_entropy(logits, targets)`: the loss and its gradient in one kernel, streaming
  the vocabulary in chunks so a 50,257-wide softmax never sits in memory;
- `flash_attention(q, k, v, causal)`: FlashAttention-2, forward and backward;
- `matmul(a, b)`: a tiled, grouped, autotuned matrix multiply, compared with cuBLAS.

Every kernel is a plain function on torch tensors, wrapped in a `torch.autograd.Function`
where training needs its gradient, and checked against PyTorch.

New since chapter 11: the GPU's memory hierarchy, Triton's programming model (programs,
blocks, masks, `tl.constexpr`), kernel fusion, online softmax, recomputation in the
backward pass, tiling for matrix multiplies, and how to measure a kernel (GB/s against
the card's memory bandwidth, TFLOP/s against its arithmetic).

How to run:
    python 12_triton.py           # correctness table for every kernel, then the kernels
                                  # swapped into a transformer (15-30 s on 2 cores)
    python 12_triton.py --quick   # the same at fewer shapes (about 10 s)
    python 12_triton.py --bench   # GPU only: speed against PyTorch at GPT-2-small shapes

Where it runs: on a CUDA GPU the kernels are compiled. Without one the chapter sets
`TRITON_INTERPRET=1` before importing Triton, and the very same kernels run in Triton's
interpreter on the CPU (slowly, so the checks use small shapes). Without Triton installed
(macOS, Windows) the chapter says so and runs PyTorch's versions of every operation.

In a notebook (Jupyter, VS Code) the chapter ignores the kernel's command line and
takes its flags from the environment variable ZERO_TO_GPT_ARGS, for example
`ZERO_TO_GPT_ARGS="--quick"`; without it, the defaults.
"""

import argparse
import json
import math
import os
import shlex
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHAPTER = "12_triton"


# %% [markdown]
# # GPU programming with Triton
#
# ## Why kernels: the memory hierarchy
#
# A GPU is thousands of small arithmetic units fed by a hierarchy of memories, each
# smaller and faster than the one before. On an H100:
#
# | memory | size | bandwidth (roughly) |
# |---|---|---|
# | HBM, the "GPU memory" that `torch.empty` allocates | 80 GB | 3.35 TB/s |
# | L2 cache, shared by the whole chip | 50 MB | ~10 TB/s |
# | shared memory / L1, one per streaming multiprocessor (SM), 132 SMs | 228 KB each | ~30 TB/s in total |
# | registers, private to each thread | 256 KB per SM | faster still |
#
# Arithmetic is cheap by comparison: about 990 TFLOP/s of bf16 matrix multiply. Divide
# one by the other: 990e12 / 3.35e12 is about 300 floating-point operations in the time
# it takes to read one byte from HBM, about 600 per 2-byte number. An operation that
# does fewer than about 300 operations per byte it moves is *memory bound*: its speed
# is set by HBM bandwidth, not by arithmetic. Almost everything in a transformer except the big matrix multiplies is
# memory bound: adding, normalising, activation functions, softmax, the loss.
#
# PyTorch's eager mode runs one operation at a time. `torch.softmax(x)` reads `x` from
# HBM and writes its result; a GELU written as `0.5 * x * (1 + tanh(...))` is half a dozen
# operations, each one a full read and write of the tensor. A *kernel* is one program the
# GPU runs; a *fused* kernel reads its inputs once, does all the arithmetic in registers,
# and writes the result once. For memory-bound work the speed-up is simply the ratio of
# bytes moved.
#
# Two worked examples, on an H100 in bf16 (2 bytes a number):
# - layer norm of 16,384 rows of 768: about 10 operations per number, on 25 MB read and
#   25 MB written. At 3.35 TB/s moving 50 MB takes 15 microseconds; the arithmetic, 126
#   million operations, would take well under one. Memory bound by a factor of hundreds:
#   the only way to be faster is to move fewer bytes.
# - a matrix multiply of two 4,096 x 4,096 matrices: 137 billion operations (a multiply and
#   an add for each of 4,096^3 triples) on 100 MB of inputs and output. The arithmetic
#   takes about 140 microseconds at 990 TFLOP/s, moving the bytes once 30: compute
#   bound, provided each number is fetched from HBM only a few times (section 7).
#
# The same arithmetic as code: a kernel can finish no sooner than its operations allow
# at the chip's peak rate, nor sooner than its bytes allow at HBM's bandwidth, and the
# larger of the two bounds says which one limits it.


# %%
H100_FLOPS = 990e12          # bf16 tensor-core multiply-adds, counted as 2 operations
H100_BYTES_PER_SECOND = 3.35e12


def time_bounds(operations, bytes_moved):
    """Lower bounds on a kernel's run time in microseconds: (arithmetic, memory)."""
    return 1e6 * operations / H100_FLOPS, 1e6 * bytes_moved / H100_BYTES_PER_SECOND


if __name__ == "__main__":
    rows, features, size = 16_384, 768, 4_096
    for name, operations, bytes_moved in [
            ("layer norm, 16,384 x 768", 10 * rows * features, 2 * 2 * rows * features),
            ("matmul, 4,096^3", 2 * size ** 3, 3 * 2 * size * size)]:
        arithmetic, memory = time_bounds(operations, bytes_moved)
        print(f"{name:<26} arithmetic {arithmetic:8.2f} us, memory {memory:6.2f} us: "
              f"{'memory' if memory > arithmetic else 'compute'} bound, "
              f"{operations / bytes_moved:6.1f} operations per byte")


# %% [markdown]
# ## Triton's programming model
#
# CUDA programs one thread at a time. Triton programs one *block* at a time: you write a
# function (a `@triton.jit` kernel) that handles one tile of the data, say 1,024
# elements, with whole-tile operations like numpy's. The GPU launches many copies of it,
# the *programs* of a *grid*; each asks `tl.program_id(0)` which tile is its own. Triton's
# compiler splits the tile across threads, keeps it in registers, stages loads through
# shared memory and issues vectorised memory instructions, which a CUDA programmer would
# write by hand.
#
# In CUDA terms: a Triton *program* is a CUDA thread block, which runs on one SM; Triton
# chooses how its `num_warps` warps (groups of 32 threads that execute in lockstep)
# share the tile. You think in tiles; the compiler handles threads, vector loads,
# shared memory and the tensor-core instructions.
#
# Three rules come from the compiler, and the interpreter used on a CPU does not enforce
# them, so this file respects them everywhere:
# 1. tile shapes are compile-time constants (`tl.constexpr` parameters), and each side
#    is a power of two; a tensor whose size is not a power of two is covered by a
#    bigger tile and a *mask* that switches off the lanes past the end;
# 2. every load and store past the end of a tensor is masked (`mask=`), with `other=`
#    saying what a masked load returns;
# 3. `tl.dot`, the matrix multiply on a tile, needs at least 16 rows and columns on
#    each side, because it runs on the tensor cores, which work on 16-wide fragments.
#
# Triton specialises a kernel for each set of constexpr values, so `BLOCK=64` and
# `BLOCK=128` are two different compiled programs; ordinary arguments (lengths, strides,
# scales) are run-time values.
#
# ## From a kernel to a PyTorch operation
#
# Each kernel below comes with three layers, from the bottom up:
# 1. the `@triton.jit` kernel, which sees raw pointers and numbers, never tensors;
# 2. a *launcher* in Python that checks shapes, makes inputs contiguous (so that element
#    `(row, col)` sits at `row * n_cols + col`, and neighbouring lanes read neighbouring
#    addresses, which the memory system serves in wide, cheap transactions), allocates
#    the outputs, picks the grid, and launches with `kernel[grid](arguments)`;
# 3. a `torch.autograd.Function` whose `forward` runs the forward launcher and saves what
#    the backward needs (`ctx.save_for_backward`), and whose `backward` receives the
#    gradient of the loss with respect to the output and returns one gradient per input
#    of `forward` (None for the ones that are not tensors needing a gradient).
#    `Function.apply` makes the result part of PyTorch's graph, so `loss.backward()`
#    calls our backward kernel exactly where it would have called PyTorch's.
#
# Every kernel loads in whatever dtype the tensor holds (fp32, bf16, fp16), converts to
# fp32 for the arithmetic, and converts back when it stores. Registers are plentiful and
# fp32 arithmetic costs nothing next to memory traffic, while sums and exponentials in
# bf16 would lose most of their digits.


# %% [markdown]
# ## The kernels
#
# This section is self-contained: chapter 13 carries it unchanged. It decides how Triton
# runs (compiled, interpreted, or not at all), then defines each kernel, its launcher and
# its autograd wrapper. Each public function falls back to PyTorch where Triton cannot
# run on its tensors (no Triton, or tensors on the CPU while a GPU compiles the kernels),
# so code that calls these functions runs anywhere.


# %%
# Triton's interpreter runs kernels with numpy on the CPU: each program of the grid in
# turn, each tile a numpy array. It is switched on by an environment variable that Triton
# reads when a kernel is defined, so it must be set before `import triton`. A learner who
# sets it themselves keeps their choice (TRITON_INTERPRET=1 on a GPU machine is a handy
# way to debug a kernel with print statements).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # macOS and Windows: no Triton wheels
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for `triton` and `triton.language` when Triton is not installed:
        the decorators leave each kernel a plain Python function that is never called,
        so this file still imports and every public function takes its PyTorch path."""
        constexpr = None

        @staticmethod
        def jit(function):
            return function

        @staticmethod
        def autotune(configs, key):
            return lambda function: function

        @staticmethod
        def Config(*args, **kwargs):
            return None

    triton = tl = _NoTriton()

INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
# Why the kernels cannot run, when they cannot: no Triton, or Triton 3.6's interpreter
# with NumPy 2.4 or newer (it reads scalars with a conversion NumPy 2.4 removed, so every
# kernel with a loop fails; Triton 3.7 fixed it). Either way each public function takes
# its PyTorch path.
TRITON_UNAVAILABLE = None if HAS_TRITON else "Triton is not installed"
if INTERPRET and triton.__version__.startswith("3.6.") and \
        tuple(int(part) for part in np.__version__.split(".")[:2]) >= (2, 4):
    TRITON_UNAVAILABLE = ("Triton 3.6's interpreter fails with NumPy 2.4 or newer: "
                          "pip install 'triton>=3.7' (or 'numpy<2.4')")
    HAS_TRITON = INTERPRET = False
if INTERPRET:
    # The interpreter computes with numpy, which warns when an exp overflows to inf or a
    # masked lane computes inf - inf. The compiled kernels meet the same values silently,
    # and every formula below is written so that such a value is never used.
    warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)


def triton_runs_on(tensor):
    """True when the Triton kernels can process `tensor`: compiled for a CUDA tensor, or
    interpreted (any tensor, on the CPU) when TRITON_INTERPRET=1."""
    return HAS_TRITON and (tensor.is_cuda or INTERPRET)


def backend_name():
    """One phrase saying how the kernels run in this process."""
    if not HAS_TRITON:
        return f"PyTorch reference path ({TRITON_UNAVAILABLE})"
    if INTERPRET:
        return f"Triton {triton.__version__} interpreter on the CPU"
    return f"Triton {triton.__version__} compiled for {torch.cuda.get_device_name()}"


# Autotuning compiles every candidate for every new shape and dtype, about a second
# each: minutes for a run that meets many shapes, like the correctness checks. With
# ZERO_TO_GPT_AUTOTUNE=0 each kernel compiles its first candidate only (the tests set
# this; their question is whether the kernels are right, not which tile is fastest).
AUTOTUNE = os.environ.get("ZERO_TO_GPT_AUTOTUNE", "1") != "0"


def tuning_configs(gpu_configs, interpreter_config):
    """Autotuning candidates. On a GPU Triton times every candidate the first time it
    meets a new shape and keeps the fastest. In the interpreter timing means nothing and
    each run is slow, so there is one fixed, small candidate (and no timing at all)."""
    if INTERPRET:
        return [interpreter_config]
    return gpu_configs if AUTOTUNE else gpu_configs[:1]


def row_block(n_cols, limit):
    """The tile width for a row of `n_cols`: the next power of two, at most `limit`."""
    return min(triton.next_power_of_2(n_cols), limit)


def row_warps(block):
    """Warps (groups of 32 threads) for a program that holds `block` numbers of a row:
    more threads for wider tiles, so each thread keeps a few dozen values in registers."""
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


# Widest row tile. On a GPU 8,192 numbers of a row fit in registers (8 warps of 32
# threads, 32 numbers each); the interpreter uses small tiles so that modest test shapes
# already exercise the loop over a long row.
ROW_BLOCK_LIMIT = 128 if INTERPRET else 8192
# Numbers per tile in the norm backward pass (section 3); small in the interpreter, so
# that the test shapes run several programs, each over several tiles.
NORM_BACKWARD_TILE = 256 if INTERPRET else 4096
# Widest feature dimension for the norms, which keep one whole row in one tile.
NORM_MAX_COLS = 16384
# Elements per program for the element-wise kernels.
ELEMENTWISE_BLOCK = 1024


def rows_of(x):
    """View `x` as a contiguous (rows, last dimension) matrix, the shape the row-wise
    kernels work on."""
    return x.contiguous().view(-1, x.shape[-1])


# %% [markdown]
# ### 1. `add`: programs, blocks and masks
#
# The simplest kernel. The grid has `ceil(n / BLOCK)` programs; program `p` handles
# elements `p * BLOCK ... p * BLOCK + BLOCK - 1`. The last program's tile hangs over the
# end of the tensor unless `n` is a multiple of `BLOCK`, so a mask switches those lanes
# off: a masked load reads nothing and a masked store writes nothing. Pointers are plain
# addresses: `x_ptr + offsets` is a tile of addresses, one per lane.
#
# Memory traffic: read `x` and `y`, write the sum: 3 numbers per element, the minimum
# possible, which is why even this kernel reaches nearly the full HBM bandwidth.
#
# `BLOCK` is a `tl.constexpr`: the compiler must know the tile's size to lay it out in
# registers. With 1,024 elements and the default 4 warps (128 threads), each thread holds
# 8 of them, which it loads with a few wide vector instructions. Why not one program for
# the whole tensor? A program runs on one SM; the GPU needs thousands of programs in
# flight to keep all 132 SMs busy and to hide the memory latency (hundreds of cycles per
# load) behind other programs' work.


# %%
@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    # 64-bit program id: with 32-bit offsets a tensor over 2**31 elements would wrap.
    pid = tl.program_id(0).to(tl.int64)
    # tl.arange(0, BLOCK) is the tile [0, 1, ..., BLOCK - 1]; shifted, it numbers this
    # program's elements.
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements  # False for the lanes past the end of the tensor
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


def add(x, y):
    """`x + y` for two tensors of the same shape and dtype, by a Triton kernel."""
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"add needs equal shapes and dtypes, got {tuple(x.shape)} {x.dtype} "
                         f"and {tuple(y.shape)} {y.dtype}")
    if not triton_runs_on(x):
        return x + y
    x, y = x.contiguous(), y.contiguous()  # the kernel indexes memory as one flat array
    out = torch.empty_like(x)  # uninitialised: the kernel writes every element
    n_elements = out.numel()
    # The grid: how many programs to launch, ceil(n / BLOCK) of them.
    grid = (triton.cdiv(n_elements, ELEMENTWISE_BLOCK),)
    # Tensors passed to a kernel arrive as pointers to their first element.
    _add_kernel[grid](x, y, out, n_elements, BLOCK=ELEMENTWISE_BLOCK)
    return out


# %% [markdown]
# ### 2. Softmax: one row per program, online for long rows
#
# `softmax(x)_j = exp(x_j - m) / sum_k exp(x_k - m)`, with `m = max_k x_k` subtracted so
# that no `exp` overflows. Eager PyTorch composes it from a max, a subtract, an exp, a sum
# and a divide, each a trip through HBM; a fused kernel gives each row to one program,
# which loads the row once, does everything in registers and stores the result once.
#
# A row wider than one tile (more than `ROW_BLOCK_LIMIT` numbers) cannot sit in registers.
# The *online softmax* streams it in chunks keeping two numbers: the running maximum `m`
# and the running sum `s = sum exp(x_k - m)` of the chunks seen so far. When a chunk
# raises the maximum from `m` to `m'`, the old sum is rescaled,
#
#     s' = s * exp(m - m') + sum_{k in chunk} exp(x_k - m'),
#
# because `exp(x_k - m) * exp(m - m') = exp(x_k - m')`. One sweep gives `m` and `s`; a
# second sweep writes `exp(x_j - m) / s`. (The rescaling trick is also the heart of flash
# attention below and of the cross-entropy kernel.)
#
# Masked lanes load `-inf`: `exp(-inf) = 0` adds nothing to a sum and `-inf` never wins
# a max. An input may hold `-inf` itself (a masked attention score): while every number
# seen so far is `-inf`, the running max is `-inf` too and `exp(m - m')` would be the
# undefined `exp(-inf - (-inf))`, so the loop subtracts 0 instead in that case. (A row
# that is *all* `-inf` has no softmax; the result is NaN, as in PyTorch.)
#
# Backward. With `y = softmax(x)` and incoming gradient `dy`,
# `dy_j/dx_k = y_j (delta_jk - y_k)`, so
#
#     dx_k = sum_j dy_j y_j (delta_jk - y_k) = y_k (dy_k - sum_j dy_j y_j),
#
# one dot product per row and an element-wise step: again one program per row, reading
# `y` (saved by the forward pass) and `dy` once each when the row fits in a tile.
#
# Traffic per element: forward reads `x` and writes `y` (2 numbers), backward reads `y`
# and `dy` and writes `dx` (3), the minimum. A row that needs the loop is read twice in
# each direction, but the second read of a row this program has just streamed comes
# mostly from the L2 cache, not HBM.
#
# `ONE_BLOCK` is a constexpr, so the `if` is decided when the kernel is compiled: a row
# width that fits gets a kernel with no loop at all, a wider one a kernel with only the
# loop. `_row_max_and_sum` is a `@triton.jit` function called from kernels: Triton inlines
# it, so helpers cost nothing and keep each idea in one place.


# %%
@triton.jit
def _row_max_and_sum(row_ptr, n_cols, BLOCK: tl.constexpr):
    """Online softmax statistics of one row: its maximum m and sum(exp(x - m)), streaming
    the row in chunks of BLOCK. Shared by the softmax and cross-entropy kernels."""
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # While every number so far is -inf (a chunk fully masked by the caller), subtract
        # 0 instead: exp(-inf - 0) = 0, where exp(-inf - (-inf)) would be NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(x - safe_max), axis=0)
        running_max = new_max
    return running_max, running_sum


@triton.jit
def _softmax_forward_kernel(x_ptr, y_ptr, n_cols, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    # One program per row; the row starts n_cols elements after the previous one.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    y_row = y_ptr + row * n_cols
    if ONE_BLOCK:
        # The whole row fits in one tile: read once, write once.
        # exercise: softmax of a row that fits in one tile: load, subtract max, exp, divide, store
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        # tl.max and tl.sum reduce the tile to one number: the threads of the program
        # combine their partial results through registers and shared memory.
        numerator = tl.exp(x - tl.max(x, axis=0))
        y = numerator / tl.sum(numerator, axis=0)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        # end exercise
    else:
        # Sweep 1: running max and sum. Sweep 2: normalise and write.
        # exercise: a row wider than a tile: running max and sum, then normalise and write
        row_max, row_sum = _row_max_and_sum(x_row, n_cols, BLOCK)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            y = tl.exp(x - row_max) / row_sum
            tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        # end exercise


@triton.jit
def _softmax_backward_kernel(y_ptr, dy_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr,
                             ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * n_cols
    dy_row = dy_ptr + row * n_cols
    dx_row = dx_ptr + row * n_cols
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        dx = y * (dy - tl.sum(y * dy, axis=0))
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        # Sweep 1: the dot product sum_j dy_j y_j. Sweep 2: dx.
        dot = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(y * dy, axis=0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_row + cols, (y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=mask)


class _Softmax(torch.autograd.Function):
    """Softmax over the last dimension: forward and backward kernels, one program a row.
    The backward pass needs only the output y, which the forward pass saves."""

    @staticmethod
    def forward(ctx, x):
        x_rows = rows_of(x)  # any leading dimensions become rows
        n_rows, n_cols = x_rows.shape
        block = row_block(n_cols, ROW_BLOCK_LIMIT)
        y = torch.empty_like(x_rows)
        # One program per row. Whether the row fits in one tile is a compile-time choice.
        _softmax_forward_kernel[(n_rows,)](x_rows, y, n_cols, BLOCK=block,
                                           ONE_BLOCK=n_cols <= block, num_warps=row_warps(block))
        ctx.save_for_backward(y)  # the backward needs only the output
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        n_rows, n_cols = y.shape
        block = row_block(n_cols, ROW_BLOCK_LIMIT)
        dy_rows = rows_of(dy)
        dx = torch.empty_like(y)
        _softmax_backward_kernel[(n_rows,)](y, dy_rows, dx, n_cols, BLOCK=block,
                                            ONE_BLOCK=n_cols <= block, num_warps=row_warps(block))
        return dx.view(dy.shape)


def softmax(x):
    """Softmax over the last dimension of `x`, forward and backward in Triton."""
    if not triton_runs_on(x):
        return torch_softmax(x)
    return _Softmax.apply(x)


def torch_softmax(x):
    """PyTorch's softmax over the last dimension: the reference, and the path where
    Triton cannot run."""
    return torch.softmax(x, dim=-1)


# %% [markdown]
# ### 3. Layer norm and RMS norm: a row per program forward, rows reduced backward
#
# Layer norm of a row `x` of width `n`: `mean = sum(x) / n`,
# `rstd = 1 / sqrt(sum((x - mean)^2) / n + eps)`, `xhat = (x - mean) * rstd`, and
# `y = weight * xhat + bias`. RMS norm (used by chapter 13) skips the mean and the bias:
# `rstd = 1 / sqrt(sum(x^2) / n + eps)`, `xhat = x * rstd`, `y = weight * xhat`. One kernel
# serves both (the constexpr `RMS` removes the mean and bias at compile time). The forward
# pass keeps a whole row in registers: read `x` once, write `y` once, and save the two
# per-row numbers `mean` and `rstd` for the backward pass, so it need not recompute them.
#
# Backward. Write `g = weight * dy`, the gradient reaching `xhat`. For layer norm,
# differentiating `xhat_i = (x_i - mean) * rstd` through both `mean` and `rstd`: with
# `d mean / d x_j = 1/n` and `d rstd / d x_j = -rstd^3 (x_j - mean) / n = -rstd^2 xhat_j / n`,
#
#     dx_j = sum_i g_i d xhat_i / d x_j
#          = rstd * g_j - rstd / n * sum_i g_i - rstd / n * xhat_j * sum_i g_i xhat_i,
#
# that is
#
#     dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
#
# and for RMS norm, with no mean, `dx = rstd * (g - xhat * mean(g * xhat))`.
# (`mean` here averages over the row.) These are per-row, like the forward pass.
#
# The weight and bias gradients are sums *down the rows*: `dweight = sum_rows dy * xhat`,
# `dbias = sum_rows dy`. Adding 16,384 rows into one vector from 16,384 programs would
# need atomic additions, which serialise and make the result depend on their order. Instead
# a fixed number of programs (up to 8 per SM) each walk a run of consecutive rows,
# accumulate their partial sums in registers, and write one partial row each; a small
# second kernel adds the partial rows up, column by column. The result is deterministic,
# and the only extra memory traffic is about a thousand partial rows.
#
# A program that handled one row per step would spend most of its time waiting: load a
# row, reduce it, store it, then only start the next load. So each step takes a tile of
# several rows (about 4,096 numbers: four rows of GPT-2's 768, padded to 1,024), which
# puts four rows' loads in flight together. On an H100 that took layer norm's forward
# plus backward at 16,384 x 768 from 0.305 ms (one row per step) to 0.232 ms; most of
# what remains is the time to launch three kernels, not memory (see the benchmark).
#
# The norms keep a whole row in one tile (up to `NORM_MAX_COLS` features), so the
# forward and backward passes read each input once. A transformer's rows are a few
# hundred to a few thousand wide, far below that limit.
#
# Traffic: forward reads `x`, writes `y` (plus 8 bytes per row for `mean` and `rstd`);
# backward reads `x` and `dy`, writes `dx`. PyTorch's own `F.layer_norm` is also a fused
# kernel, so here the point is less speed than seeing how such a kernel, and its
# cross-row reduction, is built.


# %%
@triton.jit
def _norm_forward_kernel(x_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr, n_cols, eps,
                         BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    # Masked lanes load 0, which adds nothing to the sums below.
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # Every program reads the same weight vector: after the first few it comes from L2.
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        y = x * rstd * weight
    else:
        mean = tl.sum(x, axis=0) / n_cols
        # Masked lanes hold 0, and 0 - mean is not 0: zero them before the variance.
        centred = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
        y = centred * rstd * weight
        if HAS_BIAS:  # layer norm may come without a bias (GPT-2's layout with --no-bias)
            y += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(x_ptr, weight_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr,
                          weight_partial_ptr, bias_partial_ptr, n_rows, n_cols,
                          rows_per_program, BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                          RMS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # This program's partial sums of dweight and dbias, one per (row slot, column): kept
    # as tiles and added down the rows once at the end, not at every step.
    weight_sum = tl.zeros([BLOCK_ROWS, BLOCK], dtype=tl.float32)
    bias_sum = tl.zeros([BLOCK_ROWS, BLOCK], dtype=tl.float32)
    # This program takes a run of `rows_per_program` consecutive rows, BLOCK_ROWS at a
    # time: a (BLOCK_ROWS, BLOCK) tile per step keeps many loads in flight at once.
    first_row = pid * rows_per_program
    for start in range(first_row, first_row + rows_per_program, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        # Offsets of the tile's elements, in 64 bits (rows * n_cols can pass 2^31).
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)[:, None]
        g = weight[None, :] * dy  # 0 in masked lanes, where dy was loaded as 0
        # The two row means in the formula, sum(g) / n and sum(g * xhat) / n, are
        # reductions along each row of the tile: the rows are in registers, so they cost
        # no extra memory traffic.
        if RMS:
            xhat = x * rstd
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
        else:
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)[:, None]
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            dx = rstd * (g - (tl.sum(g, axis=1) / n_cols)[:, None]
                         - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
            bias_sum += dy
        weight_sum += dy * xhat
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    # One partial row per program; `column_sum` adds them up afterwards.
    tl.store(weight_partial_ptr + pid * n_cols + cols, tl.sum(weight_sum, axis=0), mask=col_mask)
    if not RMS:
        tl.store(bias_partial_ptr + pid * n_cols + cols, tl.sum(bias_sum, axis=0), mask=col_mask)


@triton.jit
def _column_sum_kernel(partial_ptr, out_ptr, n_rows, n_cols, BLOCK_ROWS: tl.constexpr,
                       BLOCK_COLS: tl.constexpr):
    """out[c] = sum over r of partial[r, c]: each program adds up BLOCK_COLS columns."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    # A 2-D tile: BLOCK_ROWS partial rows by BLOCK_COLS columns, summed down the rows.
    # [:, None] and [None, :] turn the two index vectors into a column and a row that
    # broadcast into the tile's grid of addresses, as in numpy.
    total = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        total += tl.load(partial_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(total, axis=0).to(out_ptr.dtype.element_ty), mask=cols < n_cols)


def column_sum(partial, like):
    """Sum the fp32 matrix `partial` over its rows into a new tensor shaped and typed like
    `like` (a weight or bias)."""
    out = torch.empty_like(like)
    n_rows, n_cols = partial.shape
    _column_sum_kernel[(triton.cdiv(n_cols, 64),)](partial, out, n_rows, n_cols,
                                                   BLOCK_ROWS=32, BLOCK_COLS=64)
    return out


def norm_backward_layout(x, n_rows, block):
    """How the norm backward pass shares out the rows: (programs, rows per program,
    rows per tile). A tile holds about NORM_BACKWARD_TILE numbers (several rows when
    rows are short); a GPU gets up to 8 programs per SM, so every SM has work while the
    partial sums stay few (about a thousand rows of fp32); the interpreter at most four."""
    block_rows = max(1, min(64, NORM_BACKWARD_TILE // block))
    tiles = triton.cdiv(n_rows, block_rows)
    most = 8 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    rows_per_program = block_rows * triton.cdiv(tiles, min(tiles, most))
    return triton.cdiv(n_rows, rows_per_program), rows_per_program, block_rows


class _Norm(torch.autograd.Function):
    """Layer norm (`rms` False, with a bias or without: `bias` None) or RMS norm (`rms`
    True, never a bias) over the last dimension."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        x_rows = rows_of(x)
        n_rows, n_cols = x_rows.shape
        if n_cols > NORM_MAX_COLS:
            raise ValueError(f"the norm kernels keep a row in one tile: at most "
                             f"{NORM_MAX_COLS} features, got {n_cols}")
        block = triton.next_power_of_2(n_cols)
        y = torch.empty_like(x_rows)
        # Per-row statistics, kept in fp32 for the backward pass: 8 bytes a row.
        mean = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        # Without a bias the kernel reads none: the weight stands in for the unused pointer.
        has_bias = bias is not None and not rms
        _norm_forward_kernel[(n_rows,)](x_rows, weight, bias if has_bias else weight, y, mean,
                                        rstd, n_cols, eps, BLOCK=block, RMS=rms,
                                        HAS_BIAS=has_bias, num_warps=row_warps(block))
        ctx.save_for_backward(x_rows, weight, mean, rstd)
        ctx.rms, ctx.has_bias = rms, has_bias
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_rows, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x_rows.shape
        block = triton.next_power_of_2(n_cols)
        programs, rows_per_program, block_rows = norm_backward_layout(x_rows, n_rows, block)
        dx = torch.empty_like(x_rows)
        # One fp32 partial sum per program and column (the kernel writes every entry).
        weight_partial = torch.empty(programs, n_cols, device=dx.device, dtype=torch.float32)
        bias_partial = torch.empty_like(weight_partial)
        _norm_backward_kernel[(programs,)](x_rows, weight, rows_of(dy), dx, mean, rstd,
                                           weight_partial, bias_partial, n_rows, n_cols,
                                           rows_per_program, BLOCK=block, BLOCK_ROWS=block_rows,
                                           RMS=ctx.rms, num_warps=row_warps(block * block_rows))
        dweight = column_sum(weight_partial, weight)
        dbias = column_sum(bias_partial, weight) if ctx.has_bias else None
        # One gradient per input of forward: x, weight, bias, and None for eps and rms.
        return dx.view(dy.shape), dweight, dbias, None, None


def layer_norm(x, weight, bias, eps=1e-5):
    """Layer norm over the last dimension (like `F.layer_norm`), forward and backward in
    Triton."""
    if not triton_runs_on(x):
        return torch_layer_norm(x, weight, bias, eps)
    return _Norm.apply(x, weight, bias, eps, False)


def rms_norm(x, weight, eps=1e-6):
    """RMS norm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`, forward
    and backward in Triton."""
    if not triton_runs_on(x):
        return torch_rms_norm(x, weight, eps)
    return _Norm.apply(x, weight, None, eps, True)


def torch_layer_norm(x, weight, bias, eps=1e-5):
    """PyTorch's layer norm: the reference, and the path where Triton cannot run."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_rms_norm(x, weight, eps=1e-6):
    """RMS norm in PyTorch operations, computed in fp32 like the kernel."""
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (x.float() * rstd).to(x.dtype) * weight


# %% [markdown]
# ### 4. GELU and SwiGLU: fused element-wise activations
#
# GELU, tanh approximation (GPT-2's activation):
#
#     gelu(x) = 0.5 x (1 + tanh(u)),   u = c (x + 0.044715 x^3),   c = sqrt(2 / pi).
#
# Since `0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + exp(-2u))`, the kernel computes
# `x * sigmoid(2u)` with one `exp`; it tends to exactly 0 and 1 at the ends instead of
# overflowing. The derivative, with `t = tanh(u)`:
#
#     gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2).
#
# SwiGLU (chapter 13's feed-forward) gates one projection by another:
# `swiglu(a, b) = silu(a) * b` with `silu(a) = a * sigmoid(a)`. With `s = sigmoid(a)`,
# `silu'(a) = s + a s (1 - s) = s (1 + a (1 - s))`, so
#
#     d(out)/da = dy * b * s (1 + a (1 - s)),   d(out)/db = dy * silu(a).
#
# In eager PyTorch each of these is a string of operations, each reading and writing the
# whole tensor; fused, the forward pass reads the input(s) once and writes once, and the
# backward pass recomputes the cheap activation from the saved input instead of storing
# intermediate tensors.
#
# Count the traffic for GELU written naively in PyTorch, `0.5 * x * (1 + torch.tanh(c *
# (x + 0.044715 * x ** 3)))`: `x ** 3`, two multiplications, an addition, `tanh`, another
# addition and two more multiplications, each reading one or two tensors and writing one;
# about 20 tensor-sized trips through HBM against 2 for the fused kernel. (PyTorch ships
# its own fused `F.gelu`, which is what the benchmark compares against; the gap there is
# small, and shows the compiler doing as well as hand-written CUDA.) The backward
# kernels read the saved inputs and `dy` and write the input gradients: 3 trips for
# GELU, 5 for SwiGLU.


# %%
# The kernels write c = sqrt(2 / pi) = 0.7978845608028654 as a literal: a kernel may only
# read a global if it is a compile-time constant.
@triton.jit
def _gelu_forward_kernel(x_ptr, y_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # c = sqrt(2 / pi)
    y = x / (1.0 + tl.exp(-2.0 * u))
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_backward_kernel(x_ptr, dy_ptr, dx_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    tanh_u = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0
    slope = 0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u * tanh_u) * 0.7978845608028654 * (
        1.0 + 3.0 * 0.044715 * x * x)
    tl.store(dx_ptr + offsets, (dy * slope).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_forward_kernel(a_ptr, b_ptr, y_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(a_ptr, b_ptr, dy_ptr, da_ptr, db_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-a))
    tl.store(da_ptr + offsets, (dy * b * sig * (1.0 + a * (1.0 - sig))).to(da_ptr.dtype.element_ty),
             mask=mask)
    tl.store(db_ptr + offsets, (dy * a * sig).to(db_ptr.dtype.element_ty), mask=mask)


def elementwise_grid(tensor):
    """One program per ELEMENTWISE_BLOCK elements."""
    return (triton.cdiv(tensor.numel(), ELEMENTWISE_BLOCK),)


class _Gelu(torch.autograd.Function):
    """GELU (tanh approximation): saves its input, recomputes the activation backward."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        y = torch.empty_like(x)
        _gelu_forward_kernel[elementwise_grid(x)](x, y, x.numel(), BLOCK=ELEMENTWISE_BLOCK)
        # Save the input, not the output: the derivative is a function of x, and
        # recomputing tanh in the backward kernel is cheaper than storing more tensors.
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        _gelu_backward_kernel[elementwise_grid(x)](x, dy.contiguous(), dx, x.numel(),
                                                   BLOCK=ELEMENTWISE_BLOCK)
        return dx


class _SwiGLU(torch.autograd.Function):
    """silu(a) * b: saves both inputs; the backward kernel writes both gradients in one
    pass over the data."""

    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        y = torch.empty_like(a)
        _swiglu_forward_kernel[elementwise_grid(a)](a, b, y, a.numel(), BLOCK=ELEMENTWISE_BLOCK)
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        da, db = torch.empty_like(a), torch.empty_like(b)
        _swiglu_backward_kernel[elementwise_grid(a)](a, b, dy.contiguous(), da, db, a.numel(),
                                                     BLOCK=ELEMENTWISE_BLOCK)
        return da, db


def gelu(x):
    """GELU, tanh approximation (`F.gelu(x, approximate="tanh")`), in Triton."""
    if not triton_runs_on(x):
        return torch_gelu(x)
    return _Gelu.apply(x)


def swiglu(a, b):
    """`silu(a) * b` for two tensors of the same shape, in Triton."""
    if a.shape != b.shape:
        raise ValueError(f"swiglu needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not triton_runs_on(a):
        return torch_swiglu(a, b)
    return _SwiGLU.apply(a, b)


def torch_gelu(x):
    """PyTorch's tanh-approximated GELU: the reference, and the path where Triton
    cannot run."""
    return F.gelu(x, approximate="tanh")


def torch_swiglu(a, b):
    """SwiGLU in PyTorch operations: the reference, and the path where Triton cannot run."""
    return F.silu(a) * b


# %% [markdown]
# ### 5. Cross-entropy: loss and gradient in one kernel, chunked over the vocabulary
#
# A GPT's last layer gives, for each of `N` positions, a row of `V` logits (GPT-2:
# `V = 50,257`). The loss of a row with target `t` is `lse - x_t`, where
# `lse = log sum_j exp(x_j)` is the log-sum-exp; the mean is taken over the rows whose
# target is not `ignore_index`. Its gradient with respect to the logits is
#
#     dloss/dx_j = (softmax(x)_j - [j == t]) / n_valid,
#
# and 0 for ignored rows. Eager PyTorch materialises `log_softmax(x)`, an N x V tensor
# as big as the logits, then reads it again in the backward pass. Here one program per
# row streams its row twice: sweep 1 computes `lse` with the online max and sum of the
# softmax kernel, sweep 2 writes the gradient chunk by chunk. The second sweep mostly
# hits the L2 cache, the loss costs no extra tensor, and the backward pass has nothing
# left to compute except scaling the stored gradient by the incoming one (1 for a loss
# that is not scaled further).
#
# `n_valid` is counted on the device and read by the kernel from memory, so the host
# never waits for the GPU to learn it.


# %%
@triton.jit
def _cross_entropy_kernel(logits_ptr, targets_ptr, valid_count_ptr, loss_ptr, grad_ptr, n_cols,
                          ignore_index, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * n_cols
    target = tl.load(targets_ptr + row)  # one number: a scalar load
    valid = target != ignore_index
    # Sweep 1 (shared with softmax): lse = log(sum exp(x)) = max + log(sum exp(x - max)).
    row_max, row_sum = _row_max_and_sum(logits_row, n_cols, BLOCK)
    lse = row_max + tl.log(row_sum)
    # The target's logit, one number read straight from memory (not read at all for an
    # ignored row, whose target may be any number, -100 by default).
    target_logit = tl.load(logits_row + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
    if WRITE_GRAD:
        # 1 / n_valid for a row that counts, 0 for an ignored one (whose whole gradient
        # row is then written as zeros).
        scale = tl.where(valid, 1.0 / tl.load(valid_count_ptr).to(tl.float32), 0.0)
        grad_row = grad_ptr + row * n_cols
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
            # softmax(x)_j = exp(x_j - lse); subtract 1 at the target's column.
            grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy whose forward kernel also writes the gradient; the backward
    pass only scales it. Saves the (rows, vocabulary) gradient, in place of the
    log-softmax that eager PyTorch would have saved."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, loss_dtype):
        logits = logits.contiguous()
        targets = targets.contiguous()
        n_rows, n_cols = logits.shape
        # A one-element tensor on the device: the kernel reads it, the host never waits.
        valid_count = (targets != ignore_index).sum()
        losses = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
        # Without a gradient to compute (evaluation, torch.no_grad) skip sweep 2: the
        # constexpr removes it from the compiled kernel.
        write_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if write_grad else losses  # unused without grad
        # Chunks of at most 4,096 logits: 13 chunks for GPT-2's 50,257, each a comfortable
        # tile for 8 warps.
        block = row_block(n_cols, min(ROW_BLOCK_LIMIT, 4096))
        _cross_entropy_kernel[(n_rows,)](logits, targets, valid_count, losses, grad, n_cols,
                                         ignore_index, BLOCK=block, WRITE_GRAD=write_grad,
                                         num_warps=row_warps(block))
        if write_grad:
            ctx.save_for_backward(grad)
        # The mean over the rows that count (each ignored row contributed 0), summed in
        # fp32 and returned in `loss_dtype`.
        return (losses.sum() / valid_count).to(loss_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        # The gradient was computed in the forward pass for a loss used as is; the chain
        # rule scales it by d(final)/d(loss), which is 1 unless the loss is scaled (for
        # example divided over gradient-accumulation steps).
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean cross-entropy of `logits` (rows, vocabulary) against integer `targets` (rows,),
    leaving out rows whose target is `ignore_index` (like `F.cross_entropy`). Targets
    must lie in [0, vocabulary) or equal `ignore_index`; the kernel does not check."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy needs logits (rows, vocabulary) and targets (rows,), "
                         f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if not triton_runs_on(logits):
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    # The loss's dtype is F.cross_entropy's: float32 under autocast (which runs the loss
    # in fp32), else the logits' own. A bf16 loss would be rounded to 3 digits.
    autocast_on = torch.is_autocast_enabled(logits.device.type)
    loss_dtype = torch.float32 if autocast_on else logits.dtype
    return _CrossEntropy.apply(logits, targets, ignore_index, loss_dtype)


# %% [markdown]
# ### 6. Flash attention: attention without the attention matrix
#
# Attention for one head: `S = scale * Q K^T` (seq x seq), `P = softmax(S)` row-wise,
# with the causal mask setting `S_ij = -inf` for `j > i`, and `O = P V`. Eager PyTorch
# writes `S` and `P` to HBM: at sequence 1,024 with 12 heads and batch 8 that is
# 100 million numbers per layer, read and written several times, while `Q`, `K`, `V` and
# `O` hold 6 million numbers each. Flash attention never stores `S` or `P`:
#
# **Forward** (FlashAttention-2). Each program owns a block of `BLOCK_M` query rows and
# keeps them in registers. It loops over blocks of `BLOCK_N` keys and values; for each,
# `S_block = Q_block K_block^T` on the tensor cores, then the online softmax of section 2,
# row by row: a running max `m`, a running sum `l`, and a running output `acc` that is
# rescaled by `exp(m_old - m_new)` whenever the max grows, exactly as the running sum is:
#
#     m' = max(m, rowmax(S_block));   P_block = exp(S_block - m')
#     l' = l * exp(m - m') + rowsum(P_block);   acc' = acc * exp(m - m') + P_block V_block
#
# and at the end `O = acc / l`. HBM traffic: read Q, K, V, write O, whatever the
# sequence length; the work is the same `4 * seq^2 * head_dim` FLOPs per head as before,
# now on data in registers and shared memory. A causal program stops at the diagonal,
# halving the work. Only the key blocks on the diagonal, or past the end of a sequence
# that is not a multiple of the block, need the mask; the loop is split in two so that
# all the other blocks skip its arithmetic (the constexpr `MASKED` compiles two versions
# of the loop body). The kernel works in base 2 (`exp2`, with `log2(e)` folded into the
# scale), which the hardware computes natively.
#
# It also stores, per query row, the log-sum-exp `lse = m + log2(l)` (in base 2): the
# one number per row that lets the backward pass rebuild `P` exactly.
#
# **Backward**, recomputing instead of storing. With `dO` the incoming gradient:
#
#     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D),   dQ = scale * dS K,
#     dK = scale * dS^T Q,   where D_i = sum_j P_ij dP_ij = dO_i . O_i
#
# (the `D` term is the softmax backward of section 2, `D` computed cheaply from `O` and
# `dO` by a small preprocessing kernel). `P` is recomputed block by block from Q, K and
# the saved `lse`: `P_ij = exp2(S_ij * log2(e) - lse_i)`. Doing the matrix multiplies
# again costs less than reading a stored `P` would. One kernel gives each program a block
# of keys and accumulates its `dK` and `dV` over all query blocks; a second gives each
# program a block of queries and accumulates `dQ` over all key blocks. No two programs
# write the same output, so there are no atomics.
#
# Any sequence length works: loads past the end are masked to 0 and those scores to
# `-inf`; any head size from 16 to 128 works, padded up to a power of two inside the
# kernel. The queries may be shorter or longer than the keys (cross-attention); the
# causal mask then lets query `i` see keys `0..i`, like PyTorch's `is_causal`. Every
# query row sees key 0, so the running max is finite after the first block; the kernel
# still guards the `(-inf) - (-inf)` case so a row with nothing to see yields 0, not NaN.
#
# The grid is two-dimensional: axis 0 numbers the query blocks, axis 1 the (batch, head)
# pairs, each an independent attention over its own contiguous `(seq, head_dim)` slice
# of Q, K, V. Block sizes are left to autotuning: bigger query blocks reuse each loaded
# key block for more rows (less traffic from L2) but need more registers; the best
# trade-off depends on the card and on `head_dim`.
#
# The work in numbers, at GPT-2 small's shapes (batch 8, 12 heads, sequence 1,024, head
# size 64, causal): the forward pass's matrix multiplies cost 13 GFLOP, while Q, K, V and
# O are 50 MB in bf16: 260 operations per byte, near the H100's balance point of about
# 300 (990 TFLOP/s over 3.35 TB/s), and more at longer sequences. What limits a good flash
# kernel is the tensor cores and the exponentials of the softmax, not HBM, so it is
# judged in TFLOP/s, as a matmul is.


# %%
LOG2_E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))


@triton.jit
def _load_rows(base_ptr, rows, n_rows, dims, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (len(rows), BLOCK_D) tile of a contiguous (n_rows, HEAD_DIM) matrix, with zeros
    past the last row and, where the head size is padded up to BLOCK_D, past the head
    size. (The column mask is left out when no padding needs it: a mask that varies
    along a row keeps the compiler from loading the row with wide vector instructions.)"""
    if HEAD_DIM == BLOCK_D:
        mask = rows[:, None] < n_rows
    else:
        mask = (rows[:, None] < n_rows) & (dims[None, :] < HEAD_DIM)
    return tl.load(base_ptr + rows[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base_ptr, tile, rows, n_rows, dims, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a tile into the rows of a contiguous (n_rows, HEAD_DIM) matrix, the same way."""
    if HEAD_DIM == BLOCK_D:
        mask = rows[:, None] < n_rows
    else:
        mask = (rows[:, None] < n_rows) & (dims[None, :] < HEAD_DIM)
    tl.store(base_ptr + rows[:, None] * HEAD_DIM + dims[None, :],
             tile.to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _visible(q_rows, kv_cols, q_len, kv_len, CAUSAL: tl.constexpr):
    """Which (query, key) pairs of a block take part: both inside the sequences and,
    when causal, the key not after the query."""
    visible = (q_rows[:, None] < q_len) & (kv_cols[None, :] < kv_len)
    if CAUSAL:
        visible = visible & (kv_cols[None, :] <= q_rows[:, None])
    return visible


@triton.jit
def _key_blocks(first_row, kv_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr):
    """For the queries first_row ... first_row + BLOCK_M - 1: where the whole key blocks
    that every one of them sees end (a multiple of BLOCK_N: no mask needed before it),
    and where the keys that any of them sees end (masked blocks from the first to it)."""
    if CAUSAL:
        seen_by_all = tl.minimum(first_row + 1, kv_len)  # keys 0 .. first_row
        end = tl.minimum(first_row + BLOCK_M, kv_len)  # later keys are hidden from all
    else:
        seen_by_all = kv_len
        end = kv_len
    return (seen_by_all // BLOCK_N) * BLOCK_N, end


@triton.jit
def _attend_to_blocks(acc, row_sum, row_max, q, k_base, v_base, q_rows, dims, start, end,
                      q_len, kv_len, scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """The online-softmax update of (acc, row_sum, row_max) over the key blocks from
    `start` to `end`. With MASKED false every key is visible to every query, and the
    mask's arithmetic is compiled out."""
    for start_n in range(start, end, BLOCK_N):
        # exercise: the online softmax over one key block: scores, mask, new max, rescale, accumulate
        kv_cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, kv_cols, kv_len, dims, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_base, kv_cols, kv_len, dims, HEAD_DIM, BLOCK_D)
        # (BLOCK_M, BLOCK_D) x (BLOCK_D, BLOCK_N) on the tensor cores, accumulated in fp32;
        # the scale includes log2(e) so that exp2 below computes exp.
        scores = tl.dot(q, tl.trans(k)) * scale_log2
        if MASKED:
            scores = tl.where(_visible(q_rows, kv_cols, q_len, kv_len, CAUSAL), scores,
                              float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A row that has seen only masked keys keeps max -inf; subtract 0 instead so
        # exp2 gives 0 rather than exp2(-inf - (-inf)) = NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(row_max - safe_max)
        p = tl.exp2(scores - safe_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        # P goes back to the inputs' dtype (bf16 on a GPU) for the second tensor-core
        # multiply, as every flash attention does; the sum stays fp32.
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        row_max = new_max
        # end exercise
    return acc, row_sum, row_max


@triton.jit
def _flash_forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_len, kv_len, scale_log2,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)  # batch * heads + head
    q_base = q_ptr + head * q_len * HEAD_DIM
    k_base = k_ptr + head * kv_len * HEAD_DIM
    v_base = v_ptr + head * kv_len * HEAD_DIM
    q_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    # This program's queries: loaded once, kept in registers for the whole loop.
    q = _load_rows(q_base, q_rows, q_len, dims, HEAD_DIM, BLOCK_D)
    # Online softmax state per query row: running max m, running sum l, running output.
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Two loops: the key blocks every query sees in full, with no mask at all, then the
    # few blocks on the diagonal (causal) or past the end of the keys, masked.
    full_end, end = _key_blocks(pid_m * BLOCK_M, kv_len, BLOCK_M, BLOCK_N, CAUSAL)
    acc, row_sum, row_max = _attend_to_blocks(
        acc, row_sum, row_max, q, k_base, v_base, q_rows, dims, 0, full_end, q_len, kv_len,
        scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False)
    acc, row_sum, row_max = _attend_to_blocks(
        acc, row_sum, row_max, q, k_base, v_base, q_rows, dims, full_end, end, q_len, kv_len,
        scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True)
    # Divide by the softmax's denominator once at the end, not at every block.
    safe_sum = tl.where(row_sum == 0.0, 1.0, row_sum)
    _store_rows(o_ptr + head * q_len * HEAD_DIM, acc / safe_sum[:, None], q_rows, q_len, dims,
                HEAD_DIM, BLOCK_D)
    tl.store(lse_ptr + head * q_len + q_rows, row_max + tl.log2(safe_sum), mask=q_rows < q_len)


@triton.jit
def _flash_backward_preprocess_kernel(o_ptr, do_ptr, delta_ptr, q_len, HEAD_DIM: tl.constexpr,
                                      BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """D_i = dO_i . O_i for a block of query rows."""
    head = tl.program_id(1).to(tl.int64)
    q_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    offset = head * q_len * HEAD_DIM
    o = _load_rows(o_ptr + offset, q_rows, q_len, dims, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_rows(do_ptr + offset, q_rows, q_len, dims, HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(delta_ptr + head * q_len + q_rows, tl.sum(o * do, axis=1), mask=q_rows < q_len)


@triton.jit
def _recompute_probabilities(q, k, lse, q_rows, kv_cols, q_len, kv_len, scale_log2,
                             CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """P for one (query block, key block) pair, rebuilt from the saved log-sum-exp."""
    p = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None])
    if MASKED:
        p = tl.where(_visible(q_rows, kv_cols, q_len, kv_len, CAUSAL), p, 0.0)
    return p


@triton.jit
def _dkdv_from_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kv_cols, dims,
                      start, end, q_len, kv_len, scale_log2, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                      MASKED: tl.constexpr):
    """Add to dk and dv the contributions of the query blocks from `start` to `end`."""
    for start_m in range(start, end, BLOCK_M):
        q_rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, q_rows, q_len, dims, HEAD_DIM, BLOCK_D)
        do = _load_rows(do_base, q_rows, q_len, dims, HEAD_DIM, BLOCK_D)
        lse = tl.load(lse_base + q_rows, mask=q_rows < q_len, other=0.0)
        delta = tl.load(delta_base + q_rows, mask=q_rows < q_len, other=0.0)
        p = _recompute_probabilities(q, k, lse, q_rows, kv_cols, q_len, kv_len, scale_log2,
                                     CAUSAL, MASKED)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)  # dV = P^T dO, this block's share
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])  # dS = P * (dO V^T - D)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)  # dK = dS^T Q (times scale, below)
    return dk, dv


@triton.jit
def _flash_backward_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                                q_len, kv_len, scale, scale_log2, HEAD_DIM: tl.constexpr,
                                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    pid_n = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    q_base = q_ptr + head * q_len * HEAD_DIM
    do_base = do_ptr + head * q_len * HEAD_DIM
    kv_offset = head * kv_len * HEAD_DIM
    first_key = pid_n * BLOCK_N
    kv_cols = first_key + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_rows(k_ptr + kv_offset, kv_cols, kv_len, dims, HEAD_DIM, BLOCK_D)
    v = _load_rows(v_ptr + kv_offset, kv_cols, kv_len, dims, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # The forward pass's two loops, seen from the keys. Causal: queries before this
    # block's first key see none of it, so start at the query block holding that row;
    # the query blocks that cross the diagonal need the mask; from the first block whose
    # every row comes after the last key on, all queries see all keys. The blocks past
    # the last whole query block, and every block if this key block runs past the keys'
    # end, need the mask too.
    if CAUSAL:
        start = (first_key // BLOCK_M) * BLOCK_M
        diagonal_end = tl.minimum(tl.cdiv(first_key + BLOCK_N - 1, BLOCK_M) * BLOCK_M, q_len)
    else:
        start = 0
        diagonal_end = 0
    whole_end = tl.where(first_key + BLOCK_N <= kv_len, (q_len // BLOCK_M) * BLOCK_M, 0)
    whole_end = tl.maximum(whole_end, diagonal_end)
    lse_base = lse_ptr + head * q_len
    delta_base = delta_ptr + head * q_len
    dk, dv = _dkdv_from_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kv_cols,
                               dims, start, diagonal_end, q_len, kv_len, scale_log2, HEAD_DIM,
                               BLOCK_D, BLOCK_M, CAUSAL, True)
    dk, dv = _dkdv_from_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kv_cols,
                               dims, diagonal_end, whole_end, q_len, kv_len, scale_log2,
                               HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, False)
    dk, dv = _dkdv_from_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kv_cols,
                               dims, whole_end, q_len, q_len, kv_len, scale_log2, HEAD_DIM,
                               BLOCK_D, BLOCK_M, CAUSAL, True)
    # S = scale * Q K^T, so the gradients of Q and K carry the scale once.
    _store_rows(dk_ptr + kv_offset, dk * scale, kv_cols, kv_len, dims, HEAD_DIM, BLOCK_D)
    _store_rows(dv_ptr + kv_offset, dv, kv_cols, kv_len, dims, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_from_blocks(dq, q, do, lse, delta, k_base, v_base, q_rows, dims, start, end, q_len,
                    kv_len, scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """Add to dq the contributions of the key blocks from `start` to `end`."""
    for start_n in range(start, end, BLOCK_N):
        kv_cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, kv_cols, kv_len, dims, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_base, kv_cols, kv_len, dims, HEAD_DIM, BLOCK_D)
        p = _recompute_probabilities(q, k, lse, q_rows, kv_cols, q_len, kv_len, scale_log2,
                                     CAUSAL, MASKED)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)  # dQ = dS K (times scale, in the caller)
    return dq


@triton.jit
def _flash_backward_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, q_len,
                              kv_len, scale, scale_log2, HEAD_DIM: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              CAUSAL: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    q_offset = head * q_len * HEAD_DIM
    k_base = k_ptr + head * kv_len * HEAD_DIM
    v_base = v_ptr + head * kv_len * HEAD_DIM
    q_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr + q_offset, q_rows, q_len, dims, HEAD_DIM, BLOCK_D)
    do = _load_rows(do_ptr + q_offset, q_rows, q_len, dims, HEAD_DIM, BLOCK_D)
    lse = tl.load(lse_ptr + head * q_len + q_rows, mask=q_rows < q_len, other=0.0)
    delta = tl.load(delta_ptr + head * q_len + q_rows, mask=q_rows < q_len, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # The same two loops as the forward pass: unmasked full blocks, then masked ones.
    full_end, end = _key_blocks(pid_m * BLOCK_M, kv_len, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_from_blocks(dq, q, do, lse, delta, k_base, v_base, q_rows, dims, 0, full_end, q_len,
                         kv_len, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False)
    dq = _dq_from_blocks(dq, q, do, lse, delta, k_base, v_base, q_rows, dims, full_end, end,
                         q_len, kv_len, scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True)
    _store_rows(dq_ptr + q_offset, dq * scale, q_rows, q_len, dims, HEAD_DIM, BLOCK_D)


# Autotuning candidates: on a GPU Triton times each the first time it meets a shape
# (the key) and keeps the fastest. A candidate that needs more shared memory than the
# card has fails to compile and is skipped. `num_warps` is the number of 32-thread warps
# per program; `num_stages` how many key blocks the compiler keeps in flight in shared
# memory, loading the next while the tensor cores work on this one. The decorator is
# applied as a function call, not with `@`, so that the plain kernels above stay
# available (and readable) on their own. The first candidate of each list is a modest
# tile that fits every head size and dtype: with ZERO_TO_GPT_AUTOTUNE=0 it is the one used.
def flash_config(tile, swap=False):
    """The autotuning candidate of a (BLOCK_M, BLOCK_N, num_warps, num_stages) tuple.
    `swap` exchanges the two block sizes: for the kernel that owns keys and walks
    queries, the mirror image of one that owns queries and walks keys."""
    block_m, block_n, warps, stages = tile
    if swap:
        block_m, block_n = block_n, block_m
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps,
                         num_stages=stages)


def flash_configs(tiles, interpreter_tile, swap=False):
    """The autotuning candidates of a kernel, from its tiles (`flash_config`)."""
    return tuning_configs([flash_config(tile, swap) for tile in tiles],
                          flash_config(interpreter_tile, swap))


FLASH_FORWARD_TILES = [(64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                       (64, 64, 4, 3), (64, 32, 4, 2)]
FLASH_FORWARD_CONFIGS = flash_configs(FLASH_FORWARD_TILES, (32, 16, 4, 1))
# The dQ kernel owns a block of queries (BLOCK_M) and walks the keys (BLOCK_N); the
# dK/dV kernel owns a block of keys and walks the queries. The usual choice (Triton's
# own tutorial makes it) is the owned block large and the walked one small, so the dQ
# candidates lean that way and the dK/dV kernel gets the same tiles mirrored; the
# autotuner decides.
FLASH_BACKWARD_TILES = [(64, 64, 4, 2), (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3),
                        (64, 32, 4, 3), (64, 64, 8, 3)]
FLASH_DQ_CONFIGS = flash_configs(FLASH_BACKWARD_TILES, (32, 16, 4, 1))
FLASH_DKDV_CONFIGS = flash_configs(FLASH_BACKWARD_TILES, (32, 16, 4, 1), swap=True)
FLASH_TUNING_KEY = ["q_len", "kv_len", "HEAD_DIM", "CAUSAL"]
flash_forward = triton.autotune(FLASH_FORWARD_CONFIGS, key=FLASH_TUNING_KEY)(_flash_forward_kernel)
flash_backward_dkdv = triton.autotune(FLASH_DKDV_CONFIGS,
                                      key=FLASH_TUNING_KEY)(_flash_backward_dkdv_kernel)
flash_backward_dq = triton.autotune(FLASH_DQ_CONFIGS,
                                    key=FLASH_TUNING_KEY)(_flash_backward_dq_kernel)


class _FlashAttention(torch.autograd.Function):
    """FlashAttention-2: forward saves Q, K, V, O and the per-row log-sum-exp; backward
    recomputes the probabilities block by block."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        # Heads split from a (batch, seq, model) tensor are strided views; a contiguous
        # copy gives every (batch, head) pair one dense (seq, head_dim) slice.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[2]
        # The tile's head dimension: a power of two, and at least 16 for tl.dot.
        block_d = max(16, triton.next_power_of_2(head_dim))
        o = torch.empty_like(q)
        lse = torch.empty(batch * heads, q_len, device=q.device, dtype=torch.float32)

        # The grid depends on the block size the autotuner picks, so it is a function of
        # the chosen configuration (`meta`) rather than a fixed tuple.
        def grid(meta):
            return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

        flash_forward[grid](q, k, v, o, lse, q_len, kv_len, scale * LOG2_E, HEAD_DIM=head_dim,
                            BLOCK_D=block_d, CAUSAL=causal)
        # Saved for the backward pass: the inputs, the output and one number per query
        # row, never the (seq x seq) probabilities.
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.block_d = causal, scale, block_d
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[2]
        delta = torch.empty_like(lse)
        preprocess_block = 64
        _flash_backward_preprocess_kernel[(triton.cdiv(q_len, preprocess_block), batch * heads)](
            o, do, delta, q_len, HEAD_DIM=head_dim, BLOCK_D=ctx.block_d, BLOCK_M=preprocess_block)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(HEAD_DIM=head_dim, BLOCK_D=ctx.block_d, CAUSAL=ctx.causal)
        # Two launches: one program per key block for dK and dV, one per query block for dQ.
        flash_backward_dkdv[lambda meta: (triton.cdiv(kv_len, meta["BLOCK_N"]), batch * heads)](
            q, k, v, do, lse, delta, dk, dv, q_len, kv_len, ctx.scale, ctx.scale * LOG2_E, **common)
        flash_backward_dq[lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)](
            q, k, v, do, lse, delta, dq, q_len, kv_len, ctx.scale, ctx.scale * LOG2_E, **common)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal=True, scale=None):
    """Scaled dot-product attention of q (batch, heads, q_len, head_dim) over k and v
    (batch, heads, kv_len, head_dim), causal or not, by FlashAttention-2 in Triton
    (like `F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)`).
    head_dim from 16 to 128; scale defaults to 1 / sqrt(head_dim)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention needs q (batch, heads, q_len, head_dim) and equal k, v "
                         f"(batch, heads, kv_len, head_dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not 16 <= q.shape[-1] <= 128:
        raise ValueError(f"flash_attention supports head_dim 16 to 128, got {q.shape[-1]}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attention needs q, k and v of one dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not triton_runs_on(q):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return _FlashAttention.apply(q, k, v, causal, scale)


# %% [markdown]
# ### 7. Matrix multiply: tiles, grouped ordering, autotuning
#
# `C = A B` with A (M, K) and B (K, N) does `2 M N K` FLOPs on `M K + K N + M N` numbers:
# at 4,096^3 that is 2,731 FLOPs per number, so a good matmul is bound by arithmetic,
# not memory, *if* each number is fetched from HBM only a few times. Each program
# computes one `BLOCK_M x BLOCK_N` tile of C, walking K in steps of `BLOCK_K`: it loads a
# `BLOCK_M x BLOCK_K` tile of A and a `BLOCK_K x BLOCK_N` tile of B into shared memory,
# multiplies them on the tensor cores (`tl.dot`) and accumulates in fp32 registers. Each
# element of A loaded is used `BLOCK_N` times, each of B `BLOCK_M` times: that reuse is
# the whole game. `num_stages` lets the compiler prefetch the next tiles while the
# tensor cores work on these (software pipelining).
#
# *Grouped ordering.* Programs run roughly in order of their id. Numbered row by row,
# consecutive programs share a row of A but each needs a different column of B, so the
# L2 cache churns through all of B. Numbered in groups of `GROUP_M` rows, consecutive
# programs cover a `GROUP_M x (few)` patch of C and reuse both A's rows and B's columns
# from L2.
#
# *Autotuning.* The best tile shape depends on the card and the matrix shapes, so the
# kernel lists candidates and Triton times them on first use. Even so, cuBLAS (what
# `torch.matmul` calls) has years of hand tuning per architecture; the benchmark shows
# how close a page of Triton gets, and why the course then keeps `torch.matmul` for the
# big products and saves Triton for the fusions PyTorch cannot do.
#
# Backward: `dA = dC B^T`, `dB = A^T dC`, the same kernel on transposed views: the
# kernel takes strides, so a transpose is free (no copy).


# %%
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    # Grouped ordering: programs pid = 0, 1, 2, ... walk down a group of GROUP_M tile
    # rows before moving one tile column to the right.
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_tile_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_tile_m, GROUP_M)  # the last group may be short
    tile_m = first_tile_m + (pid % tiles_per_group) % group_rows
    tile_n = (pid % tiles_per_group) // group_rows
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    # Tiles of addresses: element (i, k) of A lives at a_ptr + i * stride_am + k * stride_ak,
    # whatever the layout (a transposed view just swaps the two strides).
    a_ptrs = a_ptr + rows[:, None] * stride_am + inner[None, :] * stride_ak
    b_ptrs = b_ptr + inner[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # exercise: along K: load both tiles with masks, accumulate their product, slide on
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        # The last step may run past K: masked loads give 0, which adds nothing.
        k_left = K - step * BLOCK_K
        a = tl.load(a_ptrs, mask=(rows[:, None] < M) & (inner[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(inner[:, None] < k_left) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)  # acc += a @ b on the tensor cores, in fp32
        # Slide both tiles BLOCK_K further along the shared dimension.
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    # end exercise
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def matmul_config(tile):
    """The autotuning candidate of a (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
    num_stages) tuple."""
    block_m, block_n, block_k, group_m, warps, stages = tile
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                          "GROUP_M": group_m}, num_warps=warps, num_stages=stages)


MATMUL_CANDIDATES = [matmul_config(tile) for tile in [
    (64, 64, 32, 8, 4, 3), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4), (128, 128, 32, 8, 4, 4), (128, 64, 32, 8, 4, 4),
    (64, 128, 32, 8, 4, 4)]]
MATMUL_CONFIGS = tuning_configs(MATMUL_CANDIDATES, matmul_config((32, 32, 16, 2, 4, 1)))
# Tuned once per (M, N, K): the first call at a new shape times every candidate (seconds),
# later calls reuse the winner. The first candidate is small enough for fp32 inputs (4
# bytes a number: 128 x 256 tiles with three stages would need 288 KB of shared memory,
# more than an H100's 227 KB), since it is the one used when autotuning is off.
matmul_tuned = triton.autotune(MATMUL_CONFIGS, key=["M", "N", "K"])(_matmul_kernel)


def matmul_forward(a, b):
    """C = A B for 2-D tensors of any strides, one launch of the tuned kernel."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    matmul_tuned[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                       c.stride(0), c.stride(1))
    return c


class _Matmul(torch.autograd.Function):
    """C = A B; the backward pass is two more products by the same kernel, on transposed
    views (dA = dC B^T, dB = A^T dC)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return matmul_forward(a, b)

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        return matmul_forward(dc, b.t()), matmul_forward(a.t(), dc)


def matmul(a, b):
    """`a @ b` for 2-D tensors a (M, K) and b (K, N) of one dtype, by a tiled Triton
    kernel, forward and backward."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or a.dtype != b.dtype:
        raise ValueError(f"matmul needs a (M, K) and b (K, N) of one dtype, got "
                         f"{tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}")
    if not triton_runs_on(a):
        return a @ b
    return _Matmul.apply(a, b)


# %% [markdown]
# ## Set-up: flags (not the lesson)
#
# The code in this section is what the chapter needs but does not teach; in a
# notebook its cells open collapsed, and the flags come from the environment
# variable `ZERO_TO_GPT_ARGS`.
#
# Without flags the chapter prints the correctness table (one line per kernel, shape and
# dtype), then the transformer comparison, and writes both to `out/12_triton_checks.json`.
# With `--bench` on a GPU it prints one line per benchmark and writes
# `out/12_triton_bench.json`; the first call of each autotuned kernel at a new shape takes
# a few seconds while Triton compiles and times its candidates, which do_bench's warm-up
# absorbs.
#
# The chapter's command line: `--seed` for the random inputs, `--quick` for a run of a few
# seconds (used by the tests), `--out` for where the results are written as JSON (and the
# picture of flash attention's tiles as a PNG), and `--bench` to time the kernels on a GPU
# instead of checking them. (This chapter reads no data set: its inputs are random
# tensors and chapter 11's model.) The last line of output is `summary:` and a line of
# JSON with the headline figures.


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="a run of a few seconds, for tests and a first look")
    parser.add_argument("--out", default="out",
                        help="folder for the results, as JSON, and the tiles picture, as PNG "
                             "(default out/)")
    parser.add_argument("--bench", action="store_true",
                        help="time every kernel against PyTorch on a CUDA GPU instead of "
                             "checking correctness (without a GPU: a message, nothing timed)")
    return parser.parse_args(argv)


def print_summary(figures):
    """The chapter's last line: `summary: ` and its headline figures as JSON."""
    print("summary: " + json.dumps(figures))


def prepare_out(folder):
    """Create the output folder; DataError if the path exists and is not a folder."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DataError(f"--out {folder} is a file, not a folder: give a folder path")
    os.makedirs(folder, exist_ok=True)


def save_json(path, content):
    """Write JSON through a temporary file and a rename, so a crash leaves no half file."""
    temporary = path + ".part"
    with open(temporary, "w") as handle:
        json.dump(content, handle, indent=1)
    os.replace(temporary, path)


def bench_summary(results):
    """Headline figures of the benchmark: the worst memory-bound kernel's share of HBM
    peak, attention TFLOP/s and against SDPA, and the matmul against cuBLAS."""
    def find(kernel, direction):
        return next(row for row in results if row["kernel"] == kernel and row["direction"] == direction)
    memory = [row["peak_percent"] for row in results if row["peak_percent"] is not None]
    forward, both = find("flash_attention", "fwd"), find("flash_attention", "fwd+bwd")
    return {"device": torch.cuda.get_device_name(),
            "min_hbm_percent": round(min(memory), 1) if memory else None,
            "attention_fwd_tflops": round(forward["rate"], 1),
            "attention_fwd_bwd_vs_sdpa": round(both["versus"]["PyTorch SDPA"]["speedup"], 2),
            "matmul_vs_cublas": round(find("matmul", "fwd")["versus"]["PyTorch eager"]["speedup"], 2)}


# %%
if __name__ == "__main__":
    ARGS = chapter_args()
    started = time.perf_counter()
    prepare_out(ARGS.out)
    print(f"kernels: {backend_name()}")
    on_gpu = HAS_TRITON and torch.cuda.is_available() and not INTERPRET
    if not HAS_TRITON and not ARGS.bench:
        print(f"{TRITON_UNAVAILABLE}. Every function runs its PyTorch path, so the table "
              "below compares PyTorch with itself")
    # On a GPU: compiled kernels, three dtypes, and GPT-2-sized shapes besides the small
    # ones. In the interpreter: fp32 only (numpy has no bfloat16), small shapes.
    device = torch.device("cuda" if on_gpu else "cpu")
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if on_gpu else [torch.float32]
    figures = {"chapter": CHAPTER}


# %% [markdown]
# ## Flash attention's tiles, drawn
#
# Section 6's loop bounds as a picture. The score matrix `S` of one head has a row per
# query and a column per key; flash attention never stores it, but it does cut it into
# tiles of `BLOCK_M` queries by `BLOCK_N` keys, and each program walks one row of
# tiles. `flash_tile_plan` works out, with the same arithmetic as `_key_blocks`, what
# the causal forward kernel does with every tile: the tiles left of the diagonal, seen
# in full by every query of the block, run the loop without a mask; the tiles that the
# diagonal crosses run the masked loop; the tiles above it are never loaded at all,
# which is where the causal kernel saves half the work. One program's row is outlined.
# The sizes here are small on purpose (128 queries and keys, tiles of 32 by 16, the
# interpreter's tile) so every tile is visible; a GPU runs tiles of 64 or 128. Without
# matplotlib the plan is printed as a grid of characters.


# %% jupyter={"source_hidden": true}
def flash_tile_plan(q_len, kv_len, block_m, block_n, causal=True):
    """For each block of queries, what the forward kernel does with each block of keys:
    "full" (no mask), "masked" or "skipped", from the loop bounds of `_key_blocks`."""
    plan = []
    for first_row in range(0, q_len, block_m):
        if causal:
            seen_by_all = min(first_row + 1, kv_len)
            end = min(first_row + block_m, kv_len)
        else:
            seen_by_all, end = kv_len, kv_len
        full_end = (seen_by_all // block_n) * block_n
        plan.append(["full" if start < full_end else "masked" if start < end else "skipped"
                     for start in range(0, kv_len, block_n)])
    return plan


def draw_flash_tiles(out_dir, q_len=128, kv_len=128, block_m=32, block_n=16, program=2):
    """Draw the causal forward kernel's tiles (`flash_tile_plan`) with one program's row
    outlined, as a PNG in `out_dir` (or print them as text); returns the path, or None."""
    plan = flash_tile_plan(q_len, kv_len, block_m, block_n)
    try:
        import matplotlib
        if not in_notebook():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch, Rectangle
    except ImportError:
        print(f"matplotlib is not installed; the tiles as text ({block_m} queries x "
              f"{block_n} keys each; # no mask, m masked, . skipped):")
        for row, tiles in enumerate(plan):
            marks = "".join({"full": "#", "masked": "m", "skipped": "."}[tile] for tile in tiles)
            print(f"    queries {row * block_m:>4}-{min(q_len, (row + 1) * block_m) - 1:<4} "
                  f"{marks}" + (f"  <- program {program}" if row == program else ""))
        return None
    colours = {"full": "#5b8dd6", "masked": "#f0b27a", "skipped": "#eeeeee"}
    figure, axes = plt.subplots(figsize=(6.5, 6))
    for row, tiles in enumerate(plan):
        for column, tile in enumerate(tiles):
            axes.add_patch(Rectangle((column * block_n, row * block_m), block_n, block_m,
                                     fc=colours[tile], ec="white", lw=1.5))
    # The causal boundary itself: query i sees keys 0 .. i, left of this line.
    axes.plot([0, min(q_len, kv_len)], [0, min(q_len, kv_len)], color="black", lw=1)
    axes.add_patch(Rectangle((0, program * block_m), kv_len, block_m, fill=False,
                             ec="#c0392b", lw=3))
    counts = {kind: plan[program].count(kind) for kind in colours}
    axes.text(kv_len + 2, (program + 0.5) * block_m,
              f"program {program}:\n{counts['full']} tiles unmasked\n"
              f"{counts['masked']} masked\n{counts['skipped']} skipped",
              va="center", fontsize=9, color="#c0392b")
    axes.set(xlim=(0, kv_len), ylim=(q_len, 0), xlabel="key position (BLOCK_N = "
             f"{block_n})", ylabel=f"query position (BLOCK_M = {block_m})",
             title="causal flash attention: which tiles of S each program computes")
    axes.legend(handles=[Patch(fc=colours["full"], label="every query sees every key: "
                               "no mask"),
                         Patch(fc=colours["masked"], label="on the diagonal: masked"),
                         Patch(fc=colours["skipped"], ec="#999999",
                               label="above the diagonal: never loaded")],
                loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=9)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{CHAPTER}_flash_tiles.png")
    show_figure(figure, path)
    plt.close(figure)
    return path


# %%
if __name__ == "__main__" and not ARGS.bench:
    path = draw_flash_tiles(ARGS.out)
    if path:
        print(f"flash attention's tiles saved to {path}")


# %% [markdown]
# ## Checking every kernel against PyTorch
#
# A kernel is only as good as its check. Each case below builds random inputs, runs the
# kernel and PyTorch's own operation on them, and compares the outputs; then it sends
# the same random gradient backwards through both and compares every input's gradient.
# The shapes are small and deliberately awkward: widths that are not powers of two, rows
# longer than one tile, sequences that are not a multiple of the block, a vocabulary that
# is not a multiple of the chunk, ignored targets, causal and not.
#
# The error reported is the largest absolute difference divided by the largest absolute
# value of the reference, so one limit fits tensors of any scale. PyTorch runs in fp32 on
# fp32 copies of the inputs, so in bf16 and fp16 the figure is the kernel's own rounding
# error. The limits: fp32 agrees to rounding (1e-4); on a GPU, `tl.dot` on fp32 inputs
# uses TF32 tensor cores, which round each input to 11 significant bits (as PyTorch does
# with `torch.backends.cuda.matmul.allow_tf32 = True`), so the kernels that multiply
# matrices get 2e-2 there; bf16 keeps 8 significant bits (about 0.4% per rounding),
# fp16 11.
#
# How to read the result. In fp32 the errors come out around 1e-7, a few units of fp32's
# rounding (6e-8): the kernel adds the same numbers in a different order than PyTorch
# does, and floating-point addition is not associative, so the last bit or two differ.
# That is agreement. A mistake in a kernel shows up as an error of 1e-2 or more: a wrong
# mask, a missing rescale, an off-by-one block. A NaN anywhere makes the error NaN, which
# fails every limit. In bf16 the errors are a few times 1e-3: the output itself is
# rounded to 8 bits, and flash attention also rounds `P` to bf16 before its second
# matrix multiply.
#
# Why test the *backward* pass separately from the forward: the backward kernels are
# different code (recomputation, reductions across rows, the `D` term of attention),
# written from derivations in comments. A forward pass can be right while its gradient
# is silently wrong, and the model would still train, only worse. The tests file also
# checks each backward against finite differences, independently of PyTorch.


# %%
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
TF32_TOLERANCE = 2e-2


def relative_error(result, reference):
    """max |result - reference| / max |reference|: the worst element's error, measured
    against the tensor's own scale (a plain relative error per element would blow up
    wherever the reference happens to be near zero)."""
    scale = reference.detach().float().abs().max().clamp_min(1e-12)
    return ((result.detach().float() - reference.detach().float()).abs().max() / scale).item()


def run_with_gradients(function, inputs, upstream_seed):
    """Call `function` on fresh leaf copies of `inputs`; send a random upstream gradient
    (the same for every call with the same seed) back through it. Returns the output and
    the gradients of the floating-point inputs."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    output = function(*leaves)
    generator = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(output.shape, generator=generator).to(output.device, output.dtype)
    output.backward(upstream)
    return output, [leaf.grad for leaf in leaves if leaf.is_floating_point()]


def compare(kernel, reference, inputs, backward=True):
    """Forward and backward relative errors of `kernel` against `reference` (the latter
    run in fp32). Backward is None for a kernel without one; otherwise it is the worst
    error over the gradients of all floating-point inputs (for layer norm: x, weight and
    bias), each measured on its own scale."""
    fp32_inputs = [x.float() if x.is_floating_point() else x for x in inputs]
    if not backward:
        with torch.no_grad():
            return relative_error(kernel(*inputs), reference(*fp32_inputs)), None
    output, gradients = run_with_gradients(kernel, inputs, upstream_seed=1)
    reference_output, reference_gradients = run_with_gradients(reference, fp32_inputs, 1)
    backward_error = max(relative_error(g, r) for g, r in zip(gradients, reference_gradients))
    return relative_error(output, reference_output), backward_error


def sdpa(q, k, v, causal):
    """PyTorch's attention, for the checks and the benchmark."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# %% [markdown]
# The cases, and what each one is there to catch:
# - widths of 77 and 131: not powers of two, so every row tile has masked lanes;
# - softmax over rows of 300 (and cross-entropy over 301 classes): longer than the
#   interpreter's 128-wide tile, so the online loop runs three chunks, the last ragged;
# - layer norm on a (3, 7, 77) tensor: leading dimensions folded into 21 rows, more rows
#   than the backward pass has programs, so each program sums several rows;
# - every third target ignored in the cross-entropy: zero loss and zero gradient rows,
#   and a mean over the other rows only;
# - attention over 37 positions with blocks of 32 queries and 16 keys: a ragged last
#   block on both sides, masked and unmasked loops, a head size of 24 padded to 32;
#   causal and not; cross-attention with 19 queries over 45 keys, head size 16; and
#   GPT-2's head size of 64 and the largest supported, 128;
# - a (37, 29) by (29, 45) matmul: ragged in all three dimensions, and two program
#   groups in the grouped ordering.
# On a GPU the same cases run in bf16 and fp16 too, then GPT-2-sized ones: the full
# vocabulary, rows of 768, 1,000 positions with 12 heads of 64, a head size of 128.


# %%
def attention_pair(causal):
    """`flash_attention` with a fixed causal flag, and its PyTorch counterpart."""
    return (lambda q, k, v: flash_attention(q, k, v, causal=causal),
            lambda q, k, v: sdpa(q, k, v, causal))


def correctness_cases(quick=False, large=False):
    """(kernel name, input shapes, kernel, reference, has backward, uses tl.dot). Inputs
    are drawn in `check_kernels`: shapes of floats, or ("targets", rows, vocab) for class
    indices with some rows ignored."""
    causal, full = attention_pair(True), attention_pair(False)
    cases = [
        ("add", [(5, 77), (5, 77)], add, torch.add, False, False),
        ("softmax", [(6, 77)], softmax, torch_softmax, True, False),
        ("softmax (online)", [(3, 5, 300)], softmax, torch_softmax, True, False),
        ("layer_norm", [(3, 7, 77), (77,), (77,)], layer_norm, torch_layer_norm, True, False),
        ("layer_norm (no bias)", [(3, 7, 77), (77,)], lambda x, weight: layer_norm(x, weight, None),
         lambda x, weight: torch_layer_norm(x, weight, None), True, False),
        ("rms_norm", [(13, 77), (77,)], rms_norm, torch_rms_norm, True, False),
        ("gelu", [(7, 131)], gelu, torch_gelu, True, False),
        ("swiglu", [(7, 131), (7, 131)], swiglu, torch_swiglu, True, False),
        ("cross_entropy", [(9, 301), ("targets", 9, 301)], cross_entropy, F.cross_entropy,
         True, False),
        ("flash_attention causal", [(2, 3, 37, 24)] * 3, *causal, True, True),
        ("flash_attention", [(2, 3, 37, 24)] * 3, *full, True, True),
        ("flash_attention cross", [(1, 2, 19, 16), (1, 2, 45, 16), (1, 2, 45, 16)], *full,
         True, True),
        ("flash_attention causal", [(1, 2, 70, 64)] * 3, *causal, True, True),
        ("flash_attention", [(1, 1, 33, 128)] * 3, *full, True, True),
        ("matmul", [(37, 29), (29, 45)], matmul, torch.matmul, True, True),
        ("matmul", [(64, 100), (100, 48)], matmul, torch.matmul, True, True),
    ]
    if quick:  # one case per kernel, the flash one the smallest
        keep = {"add", "softmax (online)", "layer_norm", "layer_norm (no bias)", "rms_norm",
                "gelu", "swiglu", "cross_entropy", "flash_attention cross", "matmul"}
        cases = [case for case in cases if case[0] in keep]
    if large:  # GPU sizes: GPT-2-small rows, vocabulary and attention
        cases += [
            ("softmax (online)", [(64, 50257)], softmax, torch_softmax, True, False),
            ("layer_norm", [(4096, 768), (768,), (768,)], layer_norm, torch_layer_norm, True,
             False),
            ("rms_norm", [(4096, 768), (768,)], rms_norm, torch_rms_norm, True, False),
            ("cross_entropy", [(256, 50257), ("targets", 256, 50257)], cross_entropy,
             F.cross_entropy, True, False),
            ("flash_attention causal", [(2, 12, 1000, 64)] * 3, *causal, True, True),
            ("flash_attention", [(1, 4, 777, 128)] * 3, *full, True, True),
            ("matmul", [(1000, 768), (768, 3000)], matmul, torch.matmul, True, True),
        ]
    return cases


def draw_inputs(shapes, dtype, device, generator):
    """Random inputs for one case: floats from N(0, 1) scaled by 2 (so activations and
    softmaxes leave their linear range), targets with every third row ignored. They are
    drawn on the CPU from a seeded generator, so every dtype and device sees the same
    numbers, then moved."""
    inputs = []
    for shape in shapes:
        if shape[0] == "targets":
            _, rows, vocab = shape
            targets = torch.randint(0, vocab, (rows,), generator=generator)
            targets[::3] = -100
            inputs.append(targets.to(device))
        else:
            inputs.append((2 * torch.randn(shape, generator=generator)).to(device, dtype))
    return inputs


def describe_shapes(shapes):
    """The distinct tensor shapes of a case, for the tables."""
    return " ".join(str(tuple(shape)) for shape in dict.fromkeys(map(tuple, shapes))
                    if shape[0] != "targets")


def check_kernels(dtypes, device, quick=False, large=False, seed=0):
    """Run every correctness case in every dtype; one dict per (case, dtype)."""
    rows = []
    for dtype in dtypes:
        for name, shapes, kernel, reference, backward, uses_dot in correctness_cases(quick, large):
            generator = torch.Generator().manual_seed(seed)
            inputs = draw_inputs(shapes, dtype, device, generator)
            forward_error, backward_error = compare(kernel, reference, inputs, backward)
            limit = TOLERANCE[dtype]
            if dtype == torch.float32 and uses_dot and device.type == "cuda":
                limit = TF32_TOLERANCE
            worst = max(forward_error, backward_error or 0.0)
            rows.append({"kernel": name, "shape": describe_shapes(shapes),
                         "dtype": str(dtype).replace("torch.", ""), "forward": forward_error,
                         "backward": backward_error, "limit": limit, "ok": worst <= limit})
    return rows


# %% [markdown]
# The table, one line per case and dtype: the kernel, the input shapes, the dtype, the
# forward and backward errors, the limit and whether both errors are within it.


# %%
def print_check_table(rows):
    """Print the correctness table, one line per (case, dtype)."""
    print(f"{'kernel':24s} {'shape':36s} {'dtype':9s} {'forward':>9s} {'backward':>9s} "
          f"{'limit':>7s}  ok")
    for row in rows:
        backward = "-" if row["backward"] is None else f"{row['backward']:.1e}"
        print(f"{row['kernel']:24s} {row['shape'][:36]:36s} {row['dtype']:9s} "
              f"{row['forward']:9.1e} {backward:>9s} {row['limit']:7.0e}  "
              f"{'yes' if row['ok'] else 'NO'}")


if __name__ == "__main__" and not ARGS.bench:
    print("Every kernel against PyTorch: max |kernel - PyTorch| / max |PyTorch|, forward "
          "output and worst input gradient")
    rows = check_kernels(dtypes, device, quick=ARGS.quick, large=on_gpu and not ARGS.quick,
                         seed=ARGS.seed)
    print_check_table(rows)


# %% [markdown]
# ## The kernels inside chapter 11's transformer
#
# Chapter 11's model was written to be taken apart: every `MultiHeadAttention` calls its
# attention core through `self.attend(q, k, v, mask)`, every `LayerNorm` normalises
# through `self.normalise`, and every `FeedForward` applies `self.activation`. The
# classes below are chapter 11's, unchanged. Only its hand-written `layer_norm` function
# is not carried: the name now belongs to the kernel above, so a `LayerNorm` built here
# already normalises with Triton.
#
# Two copies of one model are compared: one running PyTorch's operations, one running the
# kernels (flash attention, layer norm, GELU, and the cross-entropy loss). Two details:
# - chapter 11 uses the exact GELU, `x * Phi(x)`; the kernel computes the tanh
#   approximation that GPT-2 uses (they differ by up to about 0.0005), so the PyTorch
#   copy is switched to the tanh approximation too, to compare like with like;
# - flash attention takes a causal flag, not an arbitrary mask, so the check uses batches
#   without padding: the encoder's and the cross-attention's masks are then all True and
#   the decoder's is exactly causal. (Padding in the targets is fine: the loss ignores
#   it.) Chapter 13's GPT needs nothing else: it packs text into full-length rows.
# The matrix multiplies stay `nn.Linear`, that is cuBLAS (see the matmul benchmark).
#
# The comparison builds both copies from one random initialisation, feeds them one batch
# of random token ids (the weights are untrained: matching a trained model's outputs
# would prove nothing more), computes the loss, and runs the backward pass. If any kernel
# in the chain were wrong, forward or backward, the logits or some parameter's gradient
# would disagree, because every parameter's gradient flows through several kernels:
# the embeddings' through every layer norm, attention and GELU of the network.


# %%
# Carried from chapter 11 unchanged:
PAD, BOS, EOS, UNK = 0, 1, 2, 3


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


def sinusoidal_positions(length, model_size):
    """The (length, model size) table of sinusoidal position vectors."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, model_size, 2, dtype=torch.float32)
                          * (-math.log(10000.0) / model_size))
    table = torch.zeros(length, model_size)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


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


# End of the code carried from chapter 11.


def flash_attend(q, k, v, mask):
    """Chapter 11's attention core `attend(q, k, v, mask)` on `flash_attention`. The mask
    must let every query see every key, or be exactly causal. (Reading the mask to find
    out costs a little; a model written for flash attention, like chapter 13's, passes
    the causal flag directly.)"""
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if bool(mask.all()):
        return flash_attention(q, k, v, causal=False)
    if bool((mask == causal).all()):
        return flash_attention(q, k, v, causal=True)
    raise ValueError("flash_attention takes no padding mask: use batches without padding")


def use_operations(model, attend, normalise, activation):
    """Point every attention, norm and feed-forward block of `model` at these functions.
    The weights are untouched: the same model computes with other operations."""
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.attend = attend
        elif isinstance(module, LayerNorm):
            module.normalise = normalise
        elif isinstance(module, FeedForward):
            module.activation = activation
    return model


def transformer_batch(source_vocab, target_vocab, batch, source_length, target_length,
                      generator):
    """Random token ids without padding, and targets whose last position is padding."""
    source = torch.randint(4, source_vocab, (batch, source_length), generator=generator)
    target_input = torch.randint(4, target_vocab, (batch, target_length), generator=generator)
    target_output = torch.randint(4, target_vocab, (batch, target_length), generator=generator)
    target_output[:, -1] = PAD
    return source, target_input, target_output


def flatten(tensors):
    """All of `tensors` as one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def check_transformer(quick=False, seed=0, device=torch.device("cpu")):
    """Run chapter 11's transformer with PyTorch operations and with the kernels, from the
    same weights on the same batch; return the relative errors of the logits, the loss
    and the gradients of all parameters together. (Together, because some gradients are
    exactly zero in theory: adding a bias to every key shifts a query's scores all by the
    same amount, which the softmax ignores, so the key biases' gradients are rounding
    noise, and a relative error per parameter would divide noise by noise.)"""
    source_vocab, target_vocab = 37, 41
    size = dict(model_size=32, heads=2, layers=1, hidden_size=64) if quick else \
        dict(model_size=64, heads=4, layers=2, hidden_size=128)
    torch.manual_seed(seed)
    reference = Transformer(source_vocab, target_vocab, dropout=0.0, **size).to(device)
    kernels = Transformer(source_vocab, target_vocab, dropout=0.0, **size).to(device)
    kernels.load_state_dict(reference.state_dict())
    use_operations(reference, scaled_dot_product_attention, torch_layer_norm, torch_gelu)
    use_operations(kernels, flash_attend, layer_norm, gelu)
    generator = torch.Generator().manual_seed(seed)
    batch = [t.to(device) for t in transformer_batch(source_vocab, target_vocab, 3, 13, 11,
                                                     generator)]
    results = []
    # The same forward pass, loss and backward pass through each copy; only the
    # operations inside differ.
    for model, loss_function in ((reference, F.cross_entropy), (kernels, cross_entropy)):
        source, target_input, target_output = batch
        logits = model(source, target_input)
        loss = loss_function(logits.reshape(-1, target_vocab), target_output.reshape(-1),
                             ignore_index=PAD)
        loss.backward()
        results.append((logits, loss, [p.grad for p in model.parameters()]))
    (logits, loss, grads), (kernel_logits, kernel_loss, kernel_grads) = results
    return {"logits": relative_error(kernel_logits, logits),
            "loss": relative_error(kernel_loss, loss),
            "gradients": relative_error(flatten(kernel_grads), flatten(grads)),
            "parameters": sum(p.numel() for p in kernels.parameters())}


if __name__ == "__main__" and not ARGS.bench:
    model = check_transformer(ARGS.quick, ARGS.seed, device)
    print(f"Chapter 11's transformer ({model['parameters']:,} parameters), PyTorch operations "
          f"against the kernels (flash attention, layer norm, GELU, cross-entropy):")
    print(f"  logits {model['logits']:.1e}   loss {model['loss']:.1e}   "
          f"all parameter gradients {model['gradients']:.1e}")
    model_limit = TF32_TOLERANCE if on_gpu else TOLERANCE[torch.float32]
    model_ok = max(model["logits"], model["loss"], model["gradients"]) <= model_limit
    save_json(os.path.join(ARGS.out, "12_triton_checks.json"), {"kernels": rows, "transformer": model})
    # A failed check is reported, not raised: the table shows which kernel and dtype, and
    # the summary counts the failures.
    failed = [f"{row['kernel']} {row['dtype']}" for row in rows if not row["ok"]]
    if failed or not model_ok:
        print(f"\nOUTSIDE THE LIMIT: {', '.join(failed) or 'the transformer'}")
    else:
        print(f"\nall {len(rows)} checks and the transformer within their limits")
    worst_fp32 = max(max(row["forward"], row["backward"] or 0.0)
                     for row in rows if row["dtype"] == "float32")
    figures.update({"backend": backend_name(), "checks": len(rows),
                    "failed": len(failed) + (not model_ok),
                    "worst_fp32_error": float(f"{worst_fp32:.2e}"),
                    "model_logits_error": float(f"{model['logits']:.2e}"),
                    "model_gradient_error": float(f"{model['gradients']:.2e}")})


# %% [markdown]
# ## Benchmarks: how fast, measured against what the card can do
#
# A kernel's speed means little alone; compare it with the card's limits.
# - A memory-bound kernel is judged by its *effective bandwidth*: the bytes it must move
#   at the very least (each input read once, each output written once) divided by its
#   time, as a percentage of the card's HBM peak. 80% or more is about as good as it gets.
# - Attention and matmul are judged by TFLOP/s: a matmul of (M, K) by (K, N) is `2 M N K`
#   floating-point operations; attention's forward pass is two of them per head,
#   `4 * seq^2 * head_dim` (half that when causal), and its backward pass five, 2.5 times
#   the forward.
#
# `triton.testing.do_bench` runs a function repeatedly, flushing the L2 cache between
# runs so no input is served from cache, and returns the mean time unless asked for
# quantiles: `median_ms` below asks for the median, which one slow run (a clock
# change, another process) cannot move. (The GPU runs asynchronously: Python only
# queues the kernels, so timing with `time.time()` around a call measures the
# queueing. do_bench records CUDA events on the GPU's own clock.)
#
# What to expect, and why:
# - element-wise kernels and softmax: near the HBM peak, and faster than eager
#   PyTorch wherever eager needs several operations; against a single fused PyTorch
#   kernel (`F.gelu`, `torch.softmax`) the two are level, both limited by memory;
# - layer norm: PyTorch's is fused and well tuned already; rows of 768 are short, so
#   each program has little work and launch and reduction overheads show;
# - cross-entropy: the fused kernel moves about half the bytes of eager PyTorch, which
#   writes the log-softmax and reads it back;
# - flash attention: far faster than eager attention, which writes the score matrix;
#   PyTorch's `scaled_dot_product_attention` calls its own hand-written flash kernels in
#   CUDA, the real competition;
# - matmul: within a modest margin of cuBLAS at 4,096^3, further behind at awkward
#   shapes. This is why chapter 13 keeps `nn.Linear` (cuBLAS) for the projections and uses
#   Triton where fusion pays: attention, normalisation, activations, the loss.
# These are expectations from the arithmetic above; the table your card prints is what
# counts. The shapes are GPT-2 small's, in bf16 (see `BENCH_SIZES` below).
#
# What one H100 gave (SXM, Triton 3.6, 2026-11-26). As expected: add, softmax, GELU and
# SwiGLU at 83-89% of HBM bandwidth, level with PyTorch's fused kernels and up to 1.8x
# faster than eager chains; flash attention forward at 223 TFLOP/s, 0.87x SDPA and 17x
# eager; the matmul at 0.82x cuBLAS. Less than expected: layer norm forward plus
# backward at 0.66x eager (the forward alone 1.6x): at 16,384 rows the backward pass's
# GPU work is tens of microseconds, less than launching its three kernels from a Python
# autograd function (RMS norm, one launch fewer, was 32 us faster); the cross-entropy
# only level with eager at a quarter of the bandwidth (each program walks its row's
# 13 chunks one after another, twice, with little in flight); and flash attention's
# backward pass, forward plus backward at 0.44x SDPA. Splitting the dK/dV loop at the
# diagonal as the forward pass does, and giving each backward kernel its own tile
# candidates, left that at 0.475 ms against 0.472 before: its time goes elsewhere, and
# a profiler (Nsight Compute's `ncu`) is the next tool. Those three are the places to
# work on next.


# %%
# HBM bandwidth in TB/s by device name; the first entry whose text is in the name wins,
# so the more specific names come first.
HBM_PEAK_TB_S = [
    ("GH200", 4.0), ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35),
    ("B200", 8.0), ("A100-SXM4-80GB", 2.039), ("A100 80GB", 1.935), ("A100", 1.555),
    ("L40S", 0.864), ("L40", 0.864), ("L4", 0.3), ("A10G", 0.6), ("A10", 0.6),
    ("RTX 4090", 1.008), ("RTX 3090", 0.936), ("V100", 0.9), ("T4", 0.32),
]


def hbm_peak(device_name):
    """The card's HBM bandwidth in bytes per second, or None for a card not in the table
    (the benchmark then shows GB/s without a percentage). The figures are the makers'
    data-sheet numbers; no kernel reaches 100% of them, 85-90% is the practical ceiling."""
    for text, terabytes in HBM_PEAK_TB_S:
        if text in device_name:
            return terabytes * 1e12
    return None


def median_ms(function, grad_to_none=None):
    """Median time of `function()` in milliseconds (do_bench returns a one-element list
    or a float depending on the Triton version). `grad_to_none`: tensors whose `.grad` is
    reset before each run, so a backward pass writes fresh gradients instead of adding
    to old ones (an extra read and write that would distort the timing)."""
    from triton.testing import do_bench
    result = do_bench(function, grad_to_none=grad_to_none, quantiles=[0.5])
    return result[0] if isinstance(result, (list, tuple)) else result


def forward_and_backward(function, inputs, upstream):
    """A callable that runs `function(*inputs)` and its backward pass."""
    def run():
        function(*inputs).backward(upstream)
    return run


def eager_attention(q, k, v):
    """Causal attention in eager PyTorch operations: the score matrix in memory."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v


# %% [markdown]
# The minimum bytes per element, which the `work` column below counts (2 bytes each):
# `add` reads two and writes one (3); a forward pass that reads `x` and writes `y`, 2; its
# backward reads the saved input (or output) and `dy` and writes `dx`, 3, so forward plus
# backward is 5; SwiGLU forward plus backward reads `a`, `b` and writes `y`, then reads
# `a`, `b`, `dy` and writes `da`, `db`: 8. Cross-entropy must read the logits and write
# their gradient: 2 (the loss itself is a few bytes per row). Extra reads a kernel makes
# (the second sweep over a long row) are not counted: they cost time, which is the point
# of measuring.


# %%
# GPT-2 small: 16,384 token rows (16 sequences of 1,024) of 768 features, a 3,072-wide
# feed-forward layer, a 50,257-token vocabulary; attention on 8 sequences of 1,024 with
# 12 heads of 64; and the 4,096^3 matmul. `--quick` takes a quarter of the rows.
BENCH_SIZES = dict(rows=16384, width=768, hidden=3072, vocab=50257, batch=8, heads=12,
                   seq=1024, head_dim=64, big=4096)
QUICK_BENCH_SIZES = dict(BENCH_SIZES, rows=4096, batch=2, big=2048)


def benchmark_cases(sizes):
    """(name, shapes, kernel, PyTorch version, direction, work, unit). `work` is the
    minimum bytes moved (unit GB/s) or the FLOPs (unit TFLOP/s) for the given shapes;
    direction is "fwd" or "fwd+bwd"."""
    rows, width, hidden, vocab = sizes["rows"], sizes["width"], sizes["hidden"], sizes["vocab"]
    batch, heads, seq, head_dim = sizes["batch"], sizes["heads"], sizes["seq"], sizes["head_dim"]
    two = 2  # bytes per bf16 number
    attention_flops = 4 * batch * heads * seq * seq * head_dim / 2  # causal: half
    big = sizes["big"]
    return [
        ("add", [(rows, hidden)] * 2, add, torch.add, "fwd", 3 * rows * hidden * two, "GB/s"),
        ("softmax", [(batch * heads * seq, seq)], softmax, torch_softmax,
         "fwd", 2 * batch * heads * seq * seq * two, "GB/s"),
        ("softmax", [(batch * heads * seq, seq)], softmax, torch_softmax,
         "fwd+bwd", 5 * batch * heads * seq * seq * two, "GB/s"),
        ("softmax (online)", [(1024, vocab)], softmax, torch_softmax, "fwd",
         2 * 1024 * vocab * two, "GB/s"),
        ("layer_norm", [(rows, width), (width,), (width,)], layer_norm, torch_layer_norm, "fwd",
         2 * rows * width * two, "GB/s"),
        ("layer_norm", [(rows, width), (width,), (width,)], layer_norm, torch_layer_norm,
         "fwd+bwd", 5 * rows * width * two, "GB/s"),
        ("rms_norm", [(rows, width), (width,)], rms_norm, torch_rms_norm, "fwd+bwd",
         5 * rows * width * two, "GB/s"),
        ("gelu", [(rows, hidden)], gelu, torch_gelu, "fwd", 2 * rows * hidden * two, "GB/s"),
        ("gelu", [(rows, hidden)], gelu, torch_gelu, "fwd+bwd", 5 * rows * hidden * two, "GB/s"),
        ("swiglu", [(rows, hidden)] * 2, swiglu, torch_swiglu, "fwd+bwd",
         8 * rows * hidden * two, "GB/s"),
        ("cross_entropy", [(rows // 2, vocab), ("targets", rows // 2, vocab)], cross_entropy,
         F.cross_entropy, "fwd+bwd", 2 * rows // 2 * vocab * two, "GB/s"),
        ("flash_attention", [(batch, heads, seq, head_dim)] * 3, flash_attention,
         eager_attention, "fwd", attention_flops, "TFLOP/s"),
        ("flash_attention", [(batch, heads, seq, head_dim)] * 3, flash_attention,
         eager_attention, "fwd+bwd", 3.5 * attention_flops, "TFLOP/s"),
        ("matmul", [(big, big), (big, big)], matmul, torch.matmul, "fwd", 2 * big ** 3,
         "TFLOP/s"),
        ("matmul", [(rows, width), (width, hidden)], matmul, torch.matmul, "fwd",
         2 * rows * width * hidden, "TFLOP/s"),
    ]


def time_case(function, inputs, direction):
    """Median milliseconds of one direction of `function` on `inputs`. Forward alone runs
    under `torch.no_grad()`, so neither side saves tensors for a backward pass it will not
    take (our cross-entropy then skips its gradient sweep, PyTorch its bookkeeping).
    Forward plus backward runs both passes, as a training step does."""
    if direction == "fwd":
        with torch.no_grad():
            return median_ms(lambda: function(*inputs))
    leaves = [x.requires_grad_() if x.is_floating_point() else x for x in inputs]
    upstream = torch.randn_like(function(*leaves))
    return median_ms(forward_and_backward(function, leaves, upstream),
                     grad_to_none=[x for x in leaves if x.is_floating_point()])


def run_benchmarks(sizes, seed=0, device=torch.device("cuda")):
    """Time every benchmark case, ours against PyTorch (and SDPA for attention)."""
    peak = hbm_peak(torch.cuda.get_device_name())
    results = []
    for name, shapes, kernel, eager, direction, work, unit in benchmark_cases(sizes):
        generator = torch.Generator().manual_seed(seed)
        inputs = draw_inputs(shapes, torch.bfloat16, device, generator)
        competitors = [("PyTorch eager", eager)]
        if name == "flash_attention":
            competitors.append(("PyTorch SDPA", lambda q, k, v: sdpa(q, k, v, True)))
        # Each side gets its own copy of the inputs, so gradients never mix.
        ours = time_case(kernel, [x.detach().clone() for x in inputs], direction)
        theirs = {label: time_case(function, [x.detach().clone() for x in inputs], direction)
                  for label, function in competitors}
        rate = work / (ours * 1e-3) / (1e9 if unit == "GB/s" else 1e12)
        row = {"kernel": name, "direction": direction,
               "shape": describe_shapes(shapes),
               "ms": ours, "rate": rate, "unit": unit,
               "peak_percent": (100 * work / (ours * 1e-3) / peak
                                if unit == "GB/s" and peak else None),
               "versus": {label: {"ms": ms, "speedup": ms / ours} for label, ms in theirs.items()}}
        results.append(row)
        print_benchmark_row(row)
    return results


def print_benchmark_row(row):
    """One benchmark line: our time and rate (with the share of HBM peak for memory-bound
    kernels), then each PyTorch competitor's time and our speed-up over it."""
    peak = "" if row["peak_percent"] is None else f" {row['peak_percent']:5.1f}% of HBM"
    versus = ", ".join(f"{label} {v['ms']:.3f} ms ({v['speedup']:.2f}x)"
                       for label, v in row["versus"].items())
    print(f"{row['kernel']:16s} {row['direction']:8s} {row['shape'][:40]:40s} "
          f"{row['ms']:8.3f} ms {row['rate']:8.1f} {row['unit']:8s}{peak} | {versus}")


if __name__ == "__main__" and ARGS.bench:
    if not on_gpu:
        print("--bench times compiled kernels on a CUDA GPU with Triton; this machine has "
              "none, so nothing was timed (run without --bench for the correctness table)")
        figures["bench"] = "skipped: no CUDA GPU"
    else:
        print(f"benchmark on {torch.cuda.get_device_name()}, bf16, median of do_bench")
        results = run_benchmarks(QUICK_BENCH_SIZES if ARGS.quick else BENCH_SIZES, ARGS.seed)
        save_json(os.path.join(ARGS.out, "12_triton_bench.json"), results)
        figures.update(bench_summary(results))


# %% [markdown]
# ## What to try
#
# - Remove a mask (say `mask=mask` in `_add_kernel`) and run the checks: the interpreter
#   reports the out-of-bounds access at once; on a GPU it would read whatever lies beyond
#   the tensor, or crash.
# - Change `ROW_BLOCK_LIMIT` to 64 and watch the softmax and cross-entropy checks take the
#   online loop at smaller widths, with the same errors.
# - In `_flash_forward_kernel`, drop the `rescale` of `acc` and see which checks fail
#   (only the cases where a later key block raises a row's maximum).
# - On a GPU, print `flash_forward.best_config` after the benchmark to see which tile shape
#   won on your card, and try adding a candidate of your own.
# - Write a fused `dropout(x, p, seed)` kernel with `tl.rand(seed, offsets)`: the mask is
#   regenerated from the seed in the backward pass instead of being stored.
#
# Chapter 13 carries the kernel section of this file unchanged and trains a GPT on it:
# RMS norm, SwiGLU, flash attention and the fused cross-entropy on a GPU, PyTorch's
# operations on a CPU, with a test that the two paths agree.
#
# ### Exercises
# `python tools/exercises.py make 12_triton` cuts these out of a copy, and
# `python tools/exercises.py check 12_triton` grades it:
#
# * `_softmax_forward_kernel`: softmax of a row that fits in one tile: load, subtract
#   max, exp, divide, store.
# * `_softmax_forward_kernel.2`: a row wider than a tile: running max and sum, then
#   normalise and write.
# * `_attend_to_blocks`: the online softmax over one key block: scores, mask, new max,
#   rescale, accumulate.
# * `_matmul_kernel`: along K: load both tiles with masks, accumulate their product,
#   slide on.
#
# To think about: How can a softmax that sees a row one tile at a time give the same
# answer as one that sees it whole?
#
# Answers. It keeps a running maximum m and a running sum s of exp(x - m). When a
# later tile raises the maximum to m', the sum so far is multiplied by exp(m - m'),
# which turns every earlier term into exp(x - m'); at the end s is exactly the sum
# over the row with its true maximum, up to rounding. Flash attention rescales its
# output the same way.


# %%
if __name__ == "__main__":
    print_summary({**figures, "seconds": round(time.perf_counter() - started, 1)})
