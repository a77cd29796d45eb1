"""Tests for 12_triton.py: every kernel, forward and backward, against PyTorch and against
finite differences, at awkward shapes, in Triton's interpreter (fp32); bf16, fp16 and
GPT-2-sized shapes on a GPU (`gpu` marker); the transformer swap; the command line."""
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_clean_error, chapter_path, has_matplotlib, load_chapter,
                      run_as_script, run_chapter)

chapter = load_chapter("12_triton")
# The interpreter computes with numpy, which warns when exp overflows to inf or a masked
# lane computes inf - inf; the kernels are written so those values are never used.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
# Kernels are tested where they run compiled or interpreted: on the GPU where there is
# one, else on the CPU in the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32 = 1e-4  # relative error limit in fp32
# tl.dot on fp32 inputs uses TF32 on a GPU: looser for flash attention and matmul there.
DOT = chapter.TF32_TOLERANCE if DEVICE.type == "cuda" else FP32


def draw(*shape, scale=2.0, seed=0, device=DEVICE):
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(device)


def assert_matches(kernel, reference, inputs, limit=FP32):
    """Forward output and every input gradient of `kernel` within `limit` of PyTorch."""
    forward, backward = chapter.compare(kernel, reference, inputs)
    assert forward < limit and backward < limit, (forward, backward)


def test_kernels_run_compiled_on_a_gpu_else_interpreted():
    assert chapter.triton_runs_on(torch.zeros(1, device=DEVICE))
    assert chapter.INTERPRET == (DEVICE.type == "cpu")


def test_add_spans_blocks_and_a_ragged_end():
    x, y = draw(7, 215), draw(7, 215, seed=1)  # 1,505 elements: two blocks, the last partial
    assert torch.equal(chapter.add(x, y), x + y)
    with pytest.raises(ValueError, match="equal shapes"):
        chapter.add(x, y[:, :3])


@pytest.mark.parametrize("shape", [(6, 77), (3, 5, 300), (2, 128)])
def test_softmax_one_block_and_online_loop(shape):
    # 77 and 128 fit one tile; 300 streams three chunks of 128 in the interpreter.
    assert_matches(chapter.softmax, lambda x: torch.softmax(x, -1), [draw(*shape, scale=4.0)])


def test_softmax_with_leading_masked_chunk_has_no_nan():
    x = draw(4, 300)
    x[:, :150] = float("-inf")  # the whole first chunk is -inf
    x[1, 200:] = float("-inf")
    y = chapter.softmax(x)
    assert not torch.isnan(y).any()
    assert torch.allclose(y, torch.softmax(x, -1), atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 7, 77), (21, 33)])
def test_layer_norm_forward_backward(shape):
    width = shape[-1]
    inputs = [draw(*shape) + 1.0, draw(width, seed=1), draw(width, seed=2)]
    assert_matches(chapter.layer_norm, chapter.torch_layer_norm, inputs)


def test_layer_norm_without_bias_is_layer_norm_not_rms_norm():
    # GPT-2's layout with --no-bias: the mean is still removed, only the shift goes.
    inputs = [draw(6, 77) + 1.0, draw(77, seed=1)]
    assert_matches(lambda x, w: chapter.layer_norm(x, w, None),
                   lambda x, w: F.layer_norm(x, (77,), w, None, 1e-5), inputs)
    x, weight = inputs
    rms = chapter.rms_norm(x, weight, eps=1e-5)
    assert chapter.relative_error(chapter.layer_norm(x, weight, None), rms) > 0.1


def test_rms_norm_forward_backward():
    inputs = [draw(13, 77) + 0.5, draw(77, seed=1)]
    assert_matches(chapter.rms_norm, chapter.torch_rms_norm, inputs)
    # and against RMS norm written out: x / sqrt(mean(x^2) + eps) * weight
    x, weight = inputs
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight
    assert chapter.relative_error(chapter.rms_norm(x, weight), expected) < FP32


def test_norm_rejects_rows_wider_than_a_tile():
    x = torch.zeros(1, chapter.NORM_MAX_COLS + 1, device=DEVICE)
    with pytest.raises(ValueError, match="features"):
        chapter.layer_norm(x, torch.ones_like(x[0]), torch.zeros_like(x[0]))


def test_gelu_and_swiglu_forward_backward_including_large_inputs():
    x = draw(7, 131, scale=4.0)
    x[0, :4] = torch.tensor([-40.0, 40.0, -90.0, 90.0])  # exp would overflow if done naively
    assert_matches(chapter.gelu, chapter.torch_gelu, [x])
    assert_matches(chapter.swiglu, lambda a, b: F.silu(a) * b, [x, draw(7, 131, seed=1)])
    assert torch.isfinite(chapter.gelu(x)).all()


def test_cross_entropy_loss_is_float32_under_autocast_like_pytorch():
    # Under autocast F.cross_entropy runs in fp32; a bf16 loss would keep only 3 digits.
    logits = draw(9, 301, scale=3.0).to(torch.bfloat16)
    targets = torch.randint(0, 301, (9,), generator=torch.Generator().manual_seed(3))
    targets = targets.to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = chapter.cross_entropy(logits, targets)
        expected = F.cross_entropy(logits, targets)
    assert loss.dtype == expected.dtype == torch.float32
    assert abs(loss.item() - expected.item()) < 1e-4 * abs(expected.item())
    assert chapter.cross_entropy(logits, targets).dtype == torch.bfloat16  # no autocast


@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_cross_entropy_chunks_and_ignored_rows(ignore_index):
    # A vocabulary of 301 streams in chunks of 128: the last one is ragged.
    logits = draw(9, 301, scale=3.0)
    targets = torch.randint(0, 301, (9,), generator=torch.Generator().manual_seed(3))
    targets[::3] = ignore_index
    targets[1] = 300  # the very last class
    targets = targets.to(DEVICE)
    assert_matches(lambda x: chapter.cross_entropy(x, targets, ignore_index),
                   lambda x: F.cross_entropy(x, targets, ignore_index=ignore_index), [logits])
    grad_logits = logits.clone().requires_grad_()
    chapter.cross_entropy(grad_logits, targets, ignore_index).backward()
    assert torch.all(grad_logits.grad[::3] == 0)  # ignored rows get no gradient
    with torch.no_grad():  # the loss without the gradient sweep is the same number
        assert chapter.relative_error(chapter.cross_entropy(logits, targets, ignore_index),
                                      F.cross_entropy(logits, targets, ignore_index=ignore_index)) < FP32


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len, kv_len, head_dim", [(37, 37, 24), (19, 45, 16), (45, 19, 64)])
def test_flash_attention_forward_backward(causal, q_len, kv_len, head_dim):
    # 37 and 45 are not multiples of the 32x16 blocks; 24 pads to 32 inside the kernel;
    # unequal lengths are cross-attention (causal: query i sees keys 0..i, like SDPA).
    q = draw(2, 2, q_len, head_dim, seed=1)
    k, v = draw(2, 2, kv_len, head_dim, seed=2), draw(2, 2, kv_len, head_dim, seed=3)
    assert_matches(lambda q, k, v: chapter.flash_attention(q, k, v, causal=causal),
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                   [q, k, v], limit=DOT)


def test_flash_attention_custom_scale_and_bad_head_size():
    q, k, v = (draw(1, 1, 20, 32, seed=s) for s in range(3))
    assert_matches(lambda q, k, v: chapter.flash_attention(q, k, v, causal=True, scale=0.3),
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                  scale=0.3), [q, k, v], DOT)
    with pytest.raises(ValueError, match="head_dim"):
        chapter.flash_attention(*(torch.zeros(1, 1, 4, 8) for _ in range(3)))
    # Mixed dtypes (say fp32 queries after a rotation, bf16 values) are refused up front,
    # as SDPA refuses them, instead of failing inside the compiler.
    with pytest.raises(ValueError, match="one dtype"):
        chapter.flash_attention(q, k, v.to(torch.float64))


def test_matmul_forward_backward_and_strided_inputs():
    a, b = draw(37, 29), draw(29, 45, seed=1)
    assert_matches(chapter.matmul, torch.matmul, [a, b], DOT)
    wide = draw(45, 29, seed=2)
    assert chapter.relative_error(chapter.matmul(a, wide.t()), a @ wide.t()) < DOT  # a view


@pytest.mark.parametrize("name", ["softmax", "layer_norm", "rms_norm", "gelu", "swiglu",
                                  "cross_entropy", "flash_attention", "matmul"])
def test_gradients_against_finite_differences(name):
    """d/dh L(x + h d) at h = 0, by a central difference, against <grad L, d> from the
    kernels' backward passes, where L = sum(output * fixed random weights). On the CPU,
    in fp32 without TF32's rounding, which a difference quotient would magnify."""
    cpu = torch.device("cpu")
    targets = torch.tensor([3, -100, 0, 10, 5])
    functions = {
        "softmax": (chapter.softmax, [(5, 150)]),
        "layer_norm": (chapter.layer_norm, [(5, 33), (33,), (33,)]),
        "rms_norm": (chapter.rms_norm, [(5, 33), (33,)]),
        "gelu": (chapter.gelu, [(5, 33)]),
        "swiglu": (chapter.swiglu, [(5, 33), (5, 33)]),
        "cross_entropy": (lambda x: chapter.cross_entropy(x, targets), [(5, 140)]),
        "flash_attention": (chapter.flash_attention, [(1, 1, 21, 16)] * 3),
        "matmul": (chapter.matmul, [(17, 19), (19, 18)]),
    }
    function, shapes = functions[name]
    inputs = [draw(*shape, scale=1.0, seed=i, device=cpu).requires_grad_()
              for i, shape in enumerate(shapes)]
    output = function(*inputs)
    weights = draw(*output.shape, scale=1.0, seed=9, device=cpu)
    (output * weights).sum().backward()
    directions = [draw(*shape, scale=1.0, seed=20 + i, device=cpu) for i, shape in enumerate(shapes)]
    analytic = sum((x.grad * d).sum() for x, d in zip(inputs, directions)).item()
    step = 1e-2
    with torch.no_grad():
        def loss_at(h):
            moved = [x + h * d for x, d in zip(inputs, directions)]
            return (function(*moved).double() * weights).sum().item()
        numeric = (loss_at(step) - loss_at(-step)) / (2 * step)
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)


def test_transformer_with_kernels_matches_pytorch():
    model = chapter.check_transformer(quick=True, seed=1, device=DEVICE)
    assert model["logits"] < DOT and model["loss"] < DOT and model["gradients"] < DOT, model


def test_flash_attend_refuses_padding_masks():
    q = torch.zeros(1, 1, 4, 16, device=DEVICE)
    padding = torch.tensor([True, True, True, False], device=DEVICE)[None, None, None, :]
    with pytest.raises(ValueError, match="padding"):
        chapter.flash_attend(q, q, q, padding)


def test_pytorch_path_without_triton(monkeypatch):
    """Where Triton is not installed the file still imports and every function falls back
    to PyTorch's operation."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("chapter_12_no_triton",
                                                  chapter_path("12_triton"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.HAS_TRITON and "not installed" in module.backend_name()
    x = draw(3, 40, device="cpu")
    assert torch.equal(module.softmax(x), torch.softmax(x, -1))
    q = draw(1, 2, 9, 16, device="cpu")
    assert torch.allclose(module.flash_attention(q, q, q),
                          F.scaled_dot_product_attention(q, q, q, is_causal=True))
    rows = module.check_kernels([torch.float32], torch.device("cpu"), quick=True)
    assert all(row["ok"] for row in rows)


def test_bench_without_gpu_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a laptop
    run_as_script("12_triton", "--bench", "--out", tmp_path)
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("no" in line.lower() and "gpu" in line.lower() for line in lines[:-1])
    assert '"bench": "skipped: no CUDA GPU"' in lines[-1]


def test_quick_run_prints_a_passing_table(tmp_path):
    run = run_chapter("12_triton", "--quick", "--out", tmp_path, cwd=tmp_path)
    assert run.returncode == 0, run
    assert run.summary["chapter"] == "12_triton" and run.summary["failed"] == 0, run
    assert run.summary["worst_fp32_error"] < DOT
    assert run.summary["model_gradient_error"] < DOT
    assert (tmp_path / "12_triton_checks.json").exists()
    if has_matplotlib():
        assert (tmp_path / "12_triton_flash_tiles.png").stat().st_size > 0
    else:
        assert "the tiles as text" in run.stdout


@pytest.mark.parametrize("q_len, kv_len, block_m, block_n",
                         [(128, 128, 32, 16), (100, 100, 32, 16), (64, 96, 16, 32),
                          (96, 40, 32, 32)])
def test_flash_tile_plan_matches_the_causal_mask(q_len, kv_len, block_m, block_n):
    # The diagram's plan, tile by tile, against the mask itself: a skipped tile holds no
    # visible (query, key) pair, an unmasked one only visible pairs, and every visible
    # pair lies in a tile that the kernel computes.
    rows = torch.arange(q_len)[:, None]
    cols = torch.arange(kv_len)[None, :]
    visible = cols <= rows
    plan = chapter.flash_tile_plan(q_len, kv_len, block_m, block_n)
    assert len(plan) == -(-q_len // block_m) and len(plan[0]) == -(-kv_len // block_n)
    for row, tiles in enumerate(plan):
        for column, tile in enumerate(tiles):
            block = visible[row * block_m:(row + 1) * block_m,
                            column * block_n:(column + 1) * block_n]
            if tile == "skipped":
                assert not block.any(), (row, column)
            if tile == "full":
                # Whole key blocks only (rows past the end are never stored anyway).
                assert block.all() and block.shape[1] == block_n, (row, column)
    assert chapter.flash_tile_plan(64, 64, 16, 16, causal=False) == [["full"] * 4] * 4


def test_flash_tiles_without_matplotlib_are_a_grid_of_characters(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    assert chapter.draw_flash_tiles("unused") is None
    lines = capsys.readouterr().out.splitlines()
    assert "matplotlib is not installed" in lines[0]
    assert lines[1:] == ["    queries    0-31   mm......",
                         "    queries   32-63   ##mm....",
                         "    queries   64-95   ####mm..  <- program 2",
                         "    queries   96-127  ######mm"]


def test_out_path_that_is_a_file_is_a_clean_error(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    run = run_chapter("12_triton", "--quick", "--out", blocker, cwd=tmp_path)
    assert_clean_error(run, "--out", "folder")
    assert blocker.read_text() == "keep me"


# GPU: bf16, fp16 and GPT-2-sized shapes, compiled.

@pytest.mark.gpu
def test_every_kernel_on_gpu_in_every_dtype_and_large_shapes():
    rows = chapter.check_kernels([torch.float32, torch.bfloat16, torch.float16],
                                 torch.device("cuda"), large=True)
    bad = [row for row in rows if not row["ok"]]
    assert not bad, bad


@pytest.mark.gpu
def test_transformer_with_kernels_on_gpu():
    model = chapter.check_transformer(seed=2, device=torch.device("cuda"))
    assert max(model["logits"], model["loss"], model["gradients"]) < chapter.TF32_TOLERANCE, model


@pytest.mark.gpu
def test_flash_attention_bf16_gpt2_shape_against_sdpa():
    inputs = [torch.randn(2, 12, 1024, 64, generator=torch.Generator().manual_seed(seed))
              .to("cuda", torch.bfloat16) for seed in range(3)]
    forward, backward = chapter.compare(chapter.flash_attention,
                                        lambda q, k, v: chapter.sdpa(q, k, v, True), inputs)
    assert forward < 2e-2 and backward < 2e-2, (forward, backward)


def autotuned_kernels():
    """(name of the autotuned kernel, its plain kernel, every candidate config)."""
    tiles = chapter.FLASH_BACKWARD_TILES
    return [
        ("flash_forward", chapter._flash_forward_kernel, chapter.FLASH_TUNING_KEY,
         [chapter.flash_config(tile) for tile in chapter.FLASH_FORWARD_TILES]),
        ("flash_backward_dq", chapter._flash_backward_dq_kernel, chapter.FLASH_TUNING_KEY,
         [chapter.flash_config(tile) for tile in tiles]),
        ("flash_backward_dkdv", chapter._flash_backward_dkdv_kernel, chapter.FLASH_TUNING_KEY,
         [chapter.flash_config(tile, swap=True) for tile in tiles]),
        ("matmul_tuned", chapter._matmul_kernel, ["M", "N", "K"], chapter.MATMUL_CANDIDATES),
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_autotuning_candidate_matches_pytorch(dtype, monkeypatch):
    """The autotuner may pick any candidate on some GPU and shape, so each one is run
    alone (an autotuner with a single candidate) against PyTorch. A candidate that
    needs more shared memory than this GPU has fails to compile, and the autotuner
    skips it too; every other must be right."""
    import triton
    limit = chapter.TF32_TOLERANCE if dtype == torch.float32 else 3e-2
    cases = {"flash": [(2, 3, 200, 64), (1, 2, 77, 128)], "matmul": [(300, 200), (200, 260)]}
    ran = {}
    for name, kernel, key, configs in autotuned_kernels():
        ran[name] = 0
        for config in configs:
            monkeypatch.setattr(chapter, name, triton.autotune([config], key=key)(kernel))
            try:
                if name == "matmul_tuned":
                    inputs = [draw(*shape, scale=1.0, seed=seed).to(dtype)
                              for seed, shape in enumerate(cases["matmul"])]
                    errors = chapter.compare(chapter.matmul, torch.matmul, inputs)
                else:
                    errors = []
                    for shape in cases["flash"]:
                        inputs = [draw(*shape, scale=1.0, seed=seed).to(dtype) for seed in range(3)]
                        for causal in (True, False):
                            errors += chapter.compare(*chapter.attention_pair(causal), inputs)
            except triton.runtime.errors.OutOfResources:
                continue
            assert max(errors) < limit, (name, config, errors)
            ran[name] += 1
    assert all(ran.values()), ran


def test_the_opening_examples_are_memory_and_compute_bound_as_the_prose_says():
    # Layer norm of 16,384 x 768 in bf16: ~15 us to move its bytes, far more than its
    # arithmetic; a 4,096^3 matmul: ~140 us of arithmetic, ~30 us of bytes.
    arithmetic, memory = chapter.time_bounds(10 * 16_384 * 768, 4 * 16_384 * 768)
    assert memory == pytest.approx(15.0, rel=0.01) and arithmetic < memory / 100
    arithmetic, memory = chapter.time_bounds(2 * 4_096 ** 3, 6 * 4_096 ** 2)
    assert arithmetic == pytest.approx(139, rel=0.01) and memory == pytest.approx(30, rel=0.01)
