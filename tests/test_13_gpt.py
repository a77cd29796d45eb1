"""Tests for 13_gpt.py: the GPT trainer.

Data parallelism against one process, exact resume, Triton (interpreted) against the
PyTorch path, the KV cache against a full forward pass, bits per byte, the tokenizer's
round trip through a checkpoint, every bad input with its clear error and the
checkpoint left untouched, and a `--quick` run that must beat the unigram baseline.
All on tiny models, so the whole file runs in well under a minute on 2 CPU cores.
"""
import base64
import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (OFFLINE_ENV, ROOT, ChapterRun, assert_clean_error, has_matplotlib,
                      load_chapter, run_chapter)

gpt = load_chapter("13_gpt")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for
    cores); the thread count is put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A tiny model and a short run: 2 layers, width 32, context 16, 4 windows a step.
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "4", "--tokenizer", "bpe", "--vocab-size", "300",
        "--eval-interval", "1000", "--eval-tokens", "256", "--log-interval", "1",
        "--num-tokens", "5", "--warmup-iters", "2", "--learning-rate", "3e-3",
        "--dropout", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 24 KB of real English prose (the Python docs), as a .txt file."""
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text(gpt.python_docs_text()[:24_000], encoding="utf-8")
    return str(path)


def train(corpus, out, *extra):
    """Run the chapter's main() in this process and return its summary."""
    return gpt.main([*TINY, "--data", corpus, "--out", str(out), *extra])


def load_state(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)


def assert_same_weights(first, second, atol):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.allclose(first[name], second[name], atol=atol, rtol=0), name


def run_many(commands, env=None):
    """Start several command lines at once (they mostly wait on imports) and return a
    ChapterRun for each, in order. Each command is (argv, cwd, extra environment)."""
    # PYTHONFAULTHANDLER: a process that dies of a signal prints its Python stack.
    full_env = {**os.environ, **OFFLINE_ENV, "PYTHONHASHSEED": "0",
                "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    processes = [subprocess.Popen(argv, cwd=cwd, env={**full_env, **extra_env},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for argv, cwd, extra_env in commands]
    runs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        runs.append(ChapterRun(subprocess.CompletedProcess(process.args, process.returncode,
                                                           stdout, stderr)))
    return runs


def chapter(*args, cwd, env=None):
    """The command line of a one-process run of the chapter."""
    return [sys.executable, str(ROOT / "13_gpt.py"), *map(str, args)], cwd, env or {}


def torchrun(out, *args):
    """The command line of a 2-process (gloo) run of the tiny model, writing to `out`."""
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", str(ROOT / "13_gpt.py"), *TINY, "--out", str(out),
             *map(str, args)], out.parent, {})


# --- data parallelism and resuming --------------------------------------------------

def test_two_processes_match_one_with_the_same_global_batch(corpus, tmp_path):
    """torchrun with 2 gloo processes of 2 windows each = 1 process of 4 windows, and =
    1 process with 2 micro-batches of 2 (gradient accumulation); with AdamW and with
    Muon (which orthogonalises the gradient that DDP has averaged)."""
    # "auto" and offline: rank 0 alone decides (and says) that GPT-2's tokenizer is out
    # of reach, trains the BPE and hands it to rank 1.
    steps = ["--max-iters", "3", "--tokenizer", "auto"]
    muon = [*steps, "--optimizer", "muon"]
    ddp, ddp_muon = run_many([torchrun(tmp_path / "ddp", "--data", corpus, *steps),
                              torchrun(tmp_path / "ddp_muon", "--data", corpus, *muon)])
    assert ddp_muon.returncode == 0, ddp_muon
    train(corpus, tmp_path / "single_muon", *muon)
    assert_same_weights(load_state(tmp_path / "ddp_muon")["model"],
                        load_state(tmp_path / "single_muon")["model"], 1e-5)
    single = train(corpus, tmp_path / "single", *steps)
    accumulated = train(corpus, tmp_path / "accumulated", *steps, "--micro-batch", "2")
    assert ddp.returncode == 0, ddp
    assert ddp.summary["world_size"] == 2
    # Said twice by rank 0 (the chapter's first look at the data, then the trainer),
    # never by rank 1.
    assert ddp.stderr.count("GPT-2's tokenizer is not available") == 2
    assert single["iterations"] == 3
    parallel = load_state(tmp_path / "ddp")
    assert parallel["loader_positions"][0]["world_size"] == 2
    assert len(parallel["loader_positions"]) == 2
    assert_same_weights(parallel["model"], load_state(tmp_path / "single")["model"], 1e-5)
    assert_same_weights(load_state(tmp_path / "accumulated")["model"],
                        load_state(tmp_path / "single")["model"], 1e-5)
    # Evaluation is sharded too (each rank its share of the windows, then summed):
    # the same weights must score the same.
    assert ddp.summary["val_loss"] == pytest.approx(single["val_loss"], abs=1e-4)


def test_with_dropout_ranks_draw_their_own_masks_and_a_ddp_run_resumes_exactly(corpus,
                                                                               tmp_path):
    """Every rank must drop different units (a generator of its own), and 2 + 2 steps
    with a resume in between must equal 4 steps straight, on both ranks."""
    common = ["--data", corpus, "--dropout", "0.2", "--lr-decay-iters", "4"]
    straight, halves = run_many(
        [torchrun(tmp_path / "straight", *common, "--max-iters", "4"),
         torchrun(tmp_path / "halves", *common, "--max-iters", "2")])
    assert straight.returncode == 0 and halves.returncode == 0, (straight, halves)
    halfway = load_state(tmp_path / "halves")
    first, second = (state["torch"] for state in halfway["rng"])
    assert not torch.equal(first, second)      # the ranks' generators differ
    (resumed,) = run_many([torchrun(tmp_path / "halves", *common, "--max-iters", "4",
                                    "--resume")])
    assert resumed.returncode == 0, resumed
    expected, got = load_state(tmp_path / "straight"), load_state(tmp_path / "halves")
    for name in expected["model"]:
        assert torch.equal(expected["model"][name], got["model"][name]), name
    for mine, theirs in zip(expected["rng"], got["rng"]):
        assert torch.equal(mine["torch"], theirs["torch"])
    assert expected["last_eval"]["val_loss"] == got["last_eval"]["val_loss"]


def test_a_finished_run_waits_for_every_rank_before_leaving_the_group(corpus, tmp_path,
                                                                    monkeypatch):
    """Rank 0 ends a run alone (checkpoint, plot, sample): the other ranks must wait at a
    barrier before the group is torn down, or a rank that left early can make gloo
    abort rank 0. After an error nobody waits (the other ranks may never come)."""
    calls = []
    monkeypatch.setattr(gpt.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(gpt.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(gpt.dist, "destroy_process_group", lambda: calls.append("leave"))
    gpt.leave_process_group(True)
    gpt.leave_process_group(False)
    assert calls == ["barrier", "leave", "leave"]
    monkeypatch.undo()
    left = []
    monkeypatch.setattr(gpt, "leave_process_group", left.append)
    train(corpus, tmp_path / "finished", "--max-iters", "1")
    gpt.main(["--bench", "--bench-iters", "1", *TINY])
    with pytest.raises(gpt.DataError):
        train(corpus, tmp_path / "finished", "--max-iters", "1", "--resume",
              "--batch-size", "8")              # another configuration: refused
    monkeypatch.setattr(gpt, "train", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(corpus, tmp_path / "broken", "--max-iters", "1")
    assert left == [True, True, False, False]


def test_the_gpt2_preset_trains_evaluates_resumes_and_samples_in_micro_batches(tmp_path,
                                                                              monkeypatch):
    """GPT-2's batch geometry (512 windows of 1,024 tokens a step, micro-batches of 32)
    at a tiny width: evaluation must go through micro-batches too, never a whole batch
    at once (on one GPU that would be about 50 GB of logits)."""
    text = tmp_path / "corpus.txt"
    docs = gpt.python_docs_text()[:400_000]
    text.write_text("\n\n".join([docs] * 3), encoding="utf-8")  # 770,000 tokens of 300
    rows_seen = {True: set(), False: set()}     # windows per forward pass, by model.training
    forward = gpt.GPT.forward

    def counting_forward(self, idx, *args, **kwargs):
        rows_seen[self.training].add(idx.shape[0])
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(gpt.GPT, "forward", counting_forward)
    tiny = ["--preset", "gpt2", "--n-layer", "1", "--n-head", "1", "--n-embd", "16",
            "--tokenizer", "bpe", "--vocab-size", "300", "--eval-interval", "1",
            "--eval-tokens", "65536", "--num-tokens", "8", "--data", str(text),
            "--out", str(tmp_path / "out")]
    summary = gpt.main([*tiny, "--max-iters", "1"])
    assert summary["iterations"] == 1 and summary["tokens_seen"] == 512 * 1024
    assert rows_seen[True] == {32}                      # 16 micro-batches a step
    assert max(rows_seen[False] - {1}) == 32            # evaluation: micro-batches too
    assert math.isfinite(summary["val_bpb"])
    summary = gpt.main([*tiny, "--max-iters", "2", "--resume"])
    assert summary["iterations"] == 2 and summary["weights_from_step"] == 2
    assert max(rows_seen[False] - {1}) == 32


def test_a_time_budget_stops_every_rank_at_the_same_step(corpus, tmp_path):
    """Each rank has its own clock; they must agree when to stop, or one would wait
    forever in the next step's all-reduce for the other."""
    (run,) = run_many([torchrun(tmp_path / "budget", "--data", corpus, "--time-budget", "2",
                                "--max-iters", "1000000", "--eval-interval", "1000000")])
    assert run.returncode == 0, run
    positions = load_state(tmp_path / "budget")["loader_positions"]
    assert len(positions) == 2 and positions[0] == positions[1]
    assert 0 < run.summary["iterations"] < 1000000


def test_newton_schulz_orthogonalises_like_the_svd():
    """Five quintic rounds bring every singular value that is not tiny near 1 (0.7 to
    1.2 is the design), whatever its size before, and point the same way as U V^T."""
    generator = torch.Generator().manual_seed(0)
    for shape in [(64, 64), (48, 128), (128, 32)]:
        rank = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], rank, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(shape[1], rank, generator=generator))
        spread = torch.logspace(0, -2, rank)      # a dominant direction, a hundredfold range
        gradient = 7.0 * u @ torch.diag(spread) @ v.T
        result = gpt.newton_schulz(gradient)
        assert result.shape == gradient.shape
        values = torch.linalg.svdvals(result)
        assert values.min() > 0.6 and values.max() < 1.25, values
        u, _, vh = torch.linalg.svd(gradient, full_matrices=False)
        exact = u @ vh
        cosine = (result * exact).sum() / (result.norm() * exact.norm())
        assert cosine > 0.95, cosine


def test_muon_steps_vectors_exactly_as_adamw_does():
    """The groups Muon leaves to AdamW get torch's AdamW step, to rounding."""
    torch.manual_seed(0)
    first = torch.nn.Parameter(torch.randn(10))
    second = torch.nn.Parameter(first.detach().clone())
    mine = gpt.Muon([{"params": [first], "weight_decay": 0.1}], lr=1e-2, betas=(0.8, 0.99))
    theirs = torch.optim.AdamW([second], lr=1e-2, betas=(0.8, 0.99), eps=1e-8,
                               weight_decay=0.1)
    for step in range(3):
        gradient = torch.randn(10)
        first.grad, second.grad = gradient.clone(), gradient.clone()
        mine.step()
        theirs.step()
    assert torch.allclose(first, second, atol=1e-7, rtol=0)


def test_muon_trains_and_resumes_exactly(corpus, tmp_path):
    """With --optimizer muon: 4 steps straight = 2, save, resume, 2 more (the momentum
    is in the checkpoint); and the loss falls. Resuming with the other optimiser is
    refused in one sentence."""
    muon = ["--optimizer", "muon", "--lr-decay-iters", "4"]
    straight = train(corpus, tmp_path / "straight", "--max-iters", "4", *muon)
    train(corpus, tmp_path / "halves", "--max-iters", "2", *muon)
    train(corpus, tmp_path / "halves", "--max-iters", "4", *muon, "--resume")
    expected, got = load_state(tmp_path / "straight"), load_state(tmp_path / "halves")
    for name in expected["model"]:
        assert torch.equal(expected["model"][name], got["model"][name]), name
    assert any("momentum" in state for state in got["optimizer"]["state"].values())
    assert straight["val_loss"] < math.log(320)
    assert_clean_error(run_chapter("13_gpt", *TINY, "--data", corpus, "--out",
                                   tmp_path / "halves", "--resume", "--max-iters", "5",
                                   cwd=tmp_path), "optimizer")


def test_resume_continues_exactly(corpus, tmp_path):
    """4 steps straight = 2 steps, save, resume, 2 more steps: identical weights and
    optimiser state (the schedule spans 4 steps in both). With dropout, so the random
    generators' states must be restored too."""
    train(corpus, tmp_path / "straight", "--max-iters", "4", "--dropout", "0.1")
    train(corpus, tmp_path / "halves", "--max-iters", "2", "--lr-decay-iters", "4",
          "--dropout", "0.1")
    halfway = load_state(tmp_path / "halves")
    assert halfway["step"] == 2 and halfway["tokens_seen"] == 2 * 4 * 16
    summary = train(corpus, tmp_path / "halves", "--max-iters", "4", "--lr-decay-iters", "4",
                    "--dropout", "0.1", "--resume")
    assert summary["iterations"] == 4
    straight, resumed = load_state(tmp_path / "straight"), load_state(tmp_path / "halves")
    for name in straight["model"]:
        assert torch.equal(straight["model"][name], resumed["model"][name]), name
    for key, state in straight["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], resumed["optimizer"]["state"][key][name])
    assert straight["loader_positions"] == resumed["loader_positions"]


def test_a_job_restarted_by_torchrun_resumes_by_itself(corpus, tmp_path, monkeypatch):
    train(corpus, tmp_path, "--max-iters", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")   # what torchrun sets on restart
    summary = train(corpus, tmp_path, "--max-iters", "2")
    assert summary["iterations"] == 2 and summary["tokens_seen"] == 2 * 4 * 16


# --- the model --------------------------------------------------------------------------

@pytest.mark.parametrize("switches", [
    dict(),                                                         # GPT-2's layout
    dict(bias=False),                                    # LayerNorm without a bias
    dict(rope=True, rmsnorm=True, swiglu=True, bias=False),         # the upgrades
    dict(rope=True, rmsnorm=True, swiglu=False, bias=True),  # RMSNorm, biased layers
    dict(rope=True, rmsnorm=True, relu2=True, qk_norm=True, softcap=15.0, bias=False,
         value_embeddings=True),
])
def test_triton_kernels_match_pytorch_loss_and_every_gradient(switches):
    """The same tiny model on chapter 12's kernels (Triton's interpreter on the CPU) and
    on PyTorch's operations: same loss, same gradient for every parameter."""
    device = "cuda" if torch.cuda.is_available() else "cpu"   # compiled, or interpreted
    assert gpt.triton_runs_on(torch.empty(1, device=device))
    config = gpt.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32,
                           **switches)
    torch.manual_seed(0)
    reference = gpt.GPT(config, gpt.TorchKernels).to(device)
    with torch.no_grad():   # non-trivial norm gains and biases, so their gradients count
        for name, parameter in reference.named_parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    triton_model = copy.deepcopy(reference)
    triton_model.kernels = gpt.TritonKernels
    inputs = torch.randint(0, 64, (2, 16), device=device)
    targets = torch.randint(0, 64, (2, 16), device=device)
    _, loss = reference(inputs, targets)
    loss.backward()
    _, triton_loss = triton_model(inputs, targets)
    triton_loss.backward()
    # Interpreted kernels compute in full fp32. Compiled on a GPU, `tl.dot` on fp32 uses
    # TF32 tensor cores (10-bit mantissa), so there the agreement is to about 1e-2.
    tolerance = 1e-5 if device == "cpu" else 2e-2
    assert abs(loss.item() - triton_loss.item()) < tolerance
    for (name, mine), theirs in zip(reference.named_parameters(), triton_model.parameters()):
        assert theirs.grad is not None, name
        assert torch.allclose(mine.grad, theirs.grad, atol=tolerance, rtol=10 * tolerance), name


@pytest.mark.parametrize("rope", [False, True])
def test_kv_cache_gives_the_same_logits_as_a_full_pass(rope):
    # With rotary positions, also the speed-run switches: QK-norm, ReLU^2, soft-capping
    # and value embeddings.
    config = gpt.GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=16,
                           rope=rope, rmsnorm=rope, swiglu=rope, bias=not rope,
                           qk_norm=rope, relu2=rope, softcap=10.0 if rope else 0.0,
                           value_embeddings=rope)
    torch.manual_seed(1)
    model = gpt.GPT(config).eval()
    tokens = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        full, _ = model(tokens)
        caches = [{} for _ in model.blocks]
        first, _ = model(tokens[:, :5], caches=caches)
        steps = [model(tokens[:, i:i + 1], caches=caches)[0] for i in range(5, 12)]
    cached = torch.cat([first] + steps, dim=1)
    assert torch.allclose(full, cached, atol=1e-5)
    # Past the block size the context is cropped and generation goes on.
    out = model.generate(tokens[:, :3], 25, temperature=1.0, top_k=5,
                         generator=torch.Generator().manual_seed(0), allowed=40)
    assert out.shape == (1, 28) and int(out[0, 3:].max()) < 40


def test_a_step_in_micro_batches_matches_one_step_on_the_whole_batch():
    """train_step with 2 micro-batches of 2 windows: the same mean loss and the same
    gradient as one pass over all 4 windows, the gradient norm measured before clipping
    and the gradient clipped to `grad_clip` afterwards."""
    config = gpt.GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(2)
    model = gpt.GPT(config)
    reference = copy.deepcopy(model)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 50, (4, 8)), rng.integers(0, 50, (4, 8))

    class OneBatch:
        def next_batch(self):
            return batch

    _, loss = reference(*(torch.from_numpy(array) for array in batch))
    loss.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in reference.parameters())).item()
    grad_clip = norm / 2                                   # so clipping halves it
    mean_loss, grad_norm = gpt.train_step(model, model, None, OneBatch(), 2, "cpu",
                                          gpt.contextlib.nullcontext(), grad_clip)
    assert mean_loss == pytest.approx(loss.item(), rel=1e-5)
    assert grad_norm == pytest.approx(norm, rel=1e-4)
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(mine.grad, theirs.grad / 2, atol=1e-6, rtol=1e-4), name


def test_bits_per_byte_of_a_model_that_knows_nothing():
    """A model whose logits are all zero predicts uniformly: ln(vocab) nats per token,
    and bits per byte = tokens * ln(vocab) / (ln 2 * bytes), special tokens left out."""
    config = gpt.GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16,
                           rmsnorm=True, bias=False)
    model = gpt.GPT(config)
    with torch.no_grad():
        model.token_embedding.weight.zero_()
    token_bytes = np.array([0] + [1, 2, 3] * 21)   # id 0 special, others 1-3 bytes
    values = np.random.default_rng(0).integers(0, 64, size=8 * 5 + 1)
    loss, bpb = gpt.evaluate(model, [values], token_bytes, 8, 2, 1000, torch.device("cpu"),
                             gpt.contextlib.nullcontext())
    targets = np.concatenate([values[1 + 8 * w: 9 + 8 * w] for w in range(5)])
    counted = targets[token_bytes[targets] > 0]
    assert loss == pytest.approx(math.log(64), rel=1e-5)
    assert bpb == pytest.approx(len(counted) * math.log(64)
                                / (math.log(2) * token_bytes[counted].sum()), rel=1e-5)


@pytest.mark.gpu
def test_on_a_gpu_triton_and_pytorch_kernels_train_alike_under_bf16(corpus, tmp_path):
    """On CUDA, with bf16 autocast: 5 steps on each kernel set, and on Triton's compiled
    by torch.compile, end at the same validation loss to within bf16's rounding, far
    less than what the 5 steps moved it."""
    runs = [("triton",), ("torch",), ("triton", "--compile")]
    figures = [train(corpus, tmp_path / "-".join(run), "--max-iters", "5", "--kernels",
                     *run, "--device", "cuda") for run in runs]
    assert [figure["kernels"] for figure in figures] == ["triton", "torch", "triton"]
    start = math.log(320)          # a uniform guess over the table of 300 ids padded to 320
    for figure in figures[1:]:
        assert figure["val_loss"] == pytest.approx(figures[0]["val_loss"], abs=5e-3)
    assert start - figures[0]["val_loss"] > 0.1


# --- precision ----------------------------------------------------------------------

def test_precision_on_a_cpu_is_float32_unless_asked_and_notes_a_missing_amx(
        tmp_path, monkeypatch, capsys):
    """On a CPU auto is float32, with AMX or without; bfloat16 asked for is kept, with a
    note where AMX (in /proc/cpuinfo's flags; AVX-512's bf16 instructions alone are not
    it) is missing; Triton's interpreter refuses bfloat16 with a clear error."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert gpt.cpu_has_amx(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert not gpt.cpu_has_amx(cpuinfo)
    assert not gpt.cpu_has_amx(tmp_path / "missing")
    cpu = torch.device("cpu")
    for amx in (True, False):
        monkeypatch.setattr(gpt, "cpu_has_amx", lambda: amx)
        for kernels in (gpt.TorchKernels, gpt.TritonKernels):
            assert gpt.choose_precision("auto", cpu, kernels) == "float32"
        capsys.readouterr()
        for explicit in ("float32", "bfloat16"):
            assert gpt.choose_precision(explicit, cpu, gpt.TorchKernels) == explicit
        assert ("no AMX" in capsys.readouterr().err) == (not amx)
    with pytest.raises(gpt.DataError, match="needs a GPU"):
        gpt.choose_precision("bfloat16", cpu, gpt.TritonKernels)


def test_on_a_cpu_bfloat16_queries_and_keys_are_attended_in_float32():
    """PyTorch's bfloat16 attention is the slower one on a CPU: the kernel set widens
    the inputs and gives float32 attention's result, under autocast too."""
    q, k, v = torch.randn(3, 2, 2, 12, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = gpt.TorchKernels.attention(q, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(),
                                                                v.float(), is_causal=True)
    assert output.dtype == torch.float32
    assert torch.allclose(output, expected, atol=1e-6)


def test_bfloat16_on_the_cpu_learns_as_float32_does_resumes_exactly_and_runs_ddp(
        corpus, tmp_path):
    """`--precision bfloat16` on the CPU (a fifth faster a step with AMX): 20 steps
    end where float32's end, to within bfloat16's rounding, far less than what the
    steps moved the loss; resuming is bit-exact; 2 processes match 1 to within the
    rounding of their differently split gradient sums."""
    bfloat16 = ["--precision", "bfloat16"]
    plain = train(corpus, tmp_path / "float32", "--max-iters", "20")
    rounded = train(corpus, tmp_path / "bfloat16", "--max-iters", "20", *bfloat16)
    assert (plain["precision"], rounded["precision"]) == ("float32", "bfloat16")
    assert rounded["val_loss"] == pytest.approx(plain["val_loss"], abs=0.03)
    assert math.log(320) - rounded["val_loss"] > 0.5
    train(corpus, tmp_path / "straight", "--max-iters", "4", *bfloat16)
    train(corpus, tmp_path / "halves", "--max-iters", "2", "--lr-decay-iters", "4", *bfloat16)
    train(corpus, tmp_path / "halves", "--max-iters", "4", "--lr-decay-iters", "4", *bfloat16,
          "--resume")
    straight, resumed = load_state(tmp_path / "straight"), load_state(tmp_path / "halves")
    for name in straight["model"]:
        assert torch.equal(straight["model"][name], resumed["model"][name]), name
    (ddp,) = run_many([torchrun(tmp_path / "ddp", "--data", corpus, "--max-iters", "3",
                                *bfloat16)])
    assert ddp.returncode == 0 and ddp.summary["precision"] == "bfloat16", ddp
    train(corpus, tmp_path / "single", "--max-iters", "3", *bfloat16)
    parallel, single = load_state(tmp_path / "ddp"), load_state(tmp_path / "single")
    torch.manual_seed(0)                      # the weights both runs started from
    start = gpt.GPT(gpt.GPTConfig(**single["config"]["model"])).state_dict()
    for name, weight in single["model"].items():
        moved = (weight - start[name]).norm().item()
        gap = (parallel["model"][name] - weight).norm().item()
        assert gap <= 0.05 * moved, name                 # measured: 1-2%


# --- tokens -------------------------------------------------------------------------

def test_tokenizer_survives_a_checkpoint_round_trip(tmp_path):
    text = gpt.python_docs_text()[:20_000]
    encoding = gpt.make_encoding(gpt.train_bpe(text, 400), "bpe400")
    path = tmp_path / "tokenizer.pt"       # a pathlib.Path, as a user may well pass
    gpt.save_checkpoint(path, {"tokenizer": gpt.tokenizer_to_dict(encoding)})
    with pytest.raises(gpt.DataError, match="not one of this chapter's checkpoints"):
        gpt.load_checkpoint(path)          # whole, but not a training checkpoint
    loaded = gpt.tokenizer_from_dict(torch.load(path, weights_only=True)["tokenizer"])
    sample = "Unicode too: naïve café, 3.14 and <|endoftext|> as plain text."
    assert loaded.encode_ordinary(text[:3000]) == encoding.encode_ordinary(text[:3000])
    assert loaded.decode(loaded.encode_ordinary(sample)) == sample
    assert loaded.n_vocab == 400 and loaded.eot_token == 399
    # The bytes table adds up to the text's length in UTF-8 bytes.
    table = gpt.token_byte_counts(loaded, gpt.pad_vocabulary(loaded.n_vocab))
    assert table[loaded.encode_ordinary(sample)].sum() == len(sample.encode("utf-8"))
    assert table[loaded.eot_token] == 0


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """A shard set written by chapter 09's streaming path, as the README's GPT-2 recipe
    does (there with GPT-2's tokenizer; here, offline, the course's BPE)."""
    folder = tmp_path_factory.mktemp("sharded")
    (folder / "corpus.txt").write_text(gpt.python_docs_text()[:60_000], encoding="utf-8")
    run = run_chapter("09_data", "--shard-corpus", folder / "corpus.txt", "--tokenizer", "bpe",
                      "--vocab-size", "300", "--workers", "1", "--out", folder / "out",
                      cwd=folder)
    assert run.returncode == 0, run
    return folder / "out"


def test_trains_on_a_shard_set_of_chapter_09_and_resumes(shard_set, tmp_path):
    summary = train(str(shard_set), tmp_path / "out", "--max-iters", "2")
    assert summary["tokenizer"] == "course-bpe" and summary["iterations"] == 2
    assert math.isfinite(summary["val_bpb"]) and summary["val_bpb"] < 8.5
    summary = train(str(shard_set / "shards"), tmp_path / "out", "--max-iters", "3",
                    "--resume")
    assert summary["iterations"] == 3


def test_refuses_shards_of_another_tokenizer_or_without_a_manifest(shard_set, corpus,
                                                                   tmp_path):
    # The shards' own tokenizer file swapped for another BPE's: the fingerprint differs.
    import shutil
    copied = tmp_path / "copied"
    shutil.copytree(shard_set / "shards", copied)
    other = gpt.make_encoding(gpt.train_bpe(gpt.python_docs_text()[:5_000], 300))
    with open(copied / "tokenizer.tiktoken", "w") as file:
        for piece, rank in sorted(other._mergeable_ranks.items(), key=lambda item: item[1]):
            file.write(f"{base64.b64encode(piece).decode()} {rank}\n")
    assert_clean_error(run_chapter("13_gpt", *TINY, "--data", copied, "--out", tmp_path / "a",
                                   cwd=tmp_path), "fingerprint")
    # Resuming a run of one tokenizer on the shards of another.
    train(corpus, tmp_path / "b", "--max-iters", "1")
    assert_clean_error(run_chapter("13_gpt", *TINY, "--data", shard_set, "--out",
                                   tmp_path / "b", "--resume", "--max-iters", "2",
                                   cwd=tmp_path), "another tokenizer")
    # Shards without their manifest: which are for validation is not guessed from names.
    (copied / "manifest.json").unlink()
    assert_clean_error(run_chapter("13_gpt", *TINY, "--data", copied, "--out", tmp_path / "c",
                                   cwd=tmp_path), "manifest")


def test_a_folder_of_text_skips_a_file_that_is_not_utf8(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(gpt.python_docs_text()[:20_000], encoding="utf-8")
    (folder / "b.txt").write_bytes(b"caf\xe9 " * 100)     # Latin-1, not UTF-8
    run = run_chapter("13_gpt", *TINY, "--data", folder, "--out", tmp_path / "out",
                      "--max-iters", "1", cwd=tmp_path)
    assert run.returncode == 0, run
    assert "skipping a file" in run.stderr and "b.txt" in run.stderr


def test_bench_reports_speed_only(tmp_path):
    summary = gpt.main(["--bench", "--bench-iters", "2", "--n-layer", "1", "--n-head", "2",
                        "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
                        "--tokenizer", "bpe", "--vocab-size", "300", "--out", str(tmp_path),
                        "--peak-tflops", "1"])
    assert summary["tokens_per_second"] > 0 and summary["iterations"] == 2
    assert 0 < summary["mfu"] < 1
    assert not os.listdir(tmp_path)                  # a benchmark writes nothing


# --- bad inputs ---------------------------------------------------------------------

def test_every_bad_input_is_one_clear_error_and_the_checkpoint_survives(corpus, tmp_path):
    out = tmp_path / "run"
    train(corpus, out, "--max-iters", "2")
    checkpoint = out / "ckpt.pt"
    original = checkpoint.read_bytes()
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "ckpt.pt").write_bytes(original[:len(original) // 2])
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    short = tmp_path / "short.txt"
    short.write_text("A short text.\n" * 30, encoding="utf-8")
    base = [*TINY, "--data", corpus, "--out", out]
    cases = [  # (arguments, extra environment, words the error must contain)
        ([*base, "--resume", "--n-layer", "3"], {}, ["another configuration", "n_layer"]),
        ([*TINY, "--data", corpus, "--out", truncated, "--resume"], {}, ["truncated"]),
        ([*TINY, "--data", tmp_path / "missing.txt", "--out", out], {}, ["does not exist"]),
        ([*TINY, "--data", empty, "--out", out], {}, ["empty"]),
        ([*TINY, "--data", short, "--out", out, "--block-size", "512"], {}, ["block size"]),
        ([*base, "--batch-size", "3"], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
         ["does not divide", "2 ranks"]),
        ([*base, "--resume", "--max-iters", "8", "--learning-rate", "1e30",
          "--warmup-iters", "0"], {}, ["NaN", "kept"]),
        ([*base, "--beta2", "1.5"], {}, ["--beta2", "[0, 1)"]),
        ([*base, "--beta1", "-0.1"], {}, ["--beta1", "[0, 1)"]),
        ([*base, "--patience", "-1"], {}, ["--patience", "negative"]),
    ]
    runs = run_many([chapter(*arguments, cwd=tmp_path, env=env) for arguments, env, _ in cases])
    for (arguments, _, words), run in zip(cases, runs):
        assert_clean_error(run, *words)
    assert checkpoint.read_bytes() == original
    assert (truncated / "ckpt.pt").read_bytes() == original[:len(original) // 2]


# --- the chapter as a learner runs it ----------------------------------------------

def test_quick_run_beats_the_unigram_baseline_and_samples(tmp_path):
    run = run_chapter("13_gpt", "--quick", "--out", tmp_path / "out", cwd=tmp_path,
                      env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run
    summary = run.summary
    assert summary["chapter"] == "13_gpt"
    for key in ("val_loss", "val_bpb", "tokens_per_second", "iterations", "seconds"):
        assert key in summary
    # The unigram model predicts each byte by its frequency alone (about 4.7 bits per
    # byte on this text); a transformer that uses context must do clearly better.
    assert summary["val_loss"] < summary["unigram_loss"] - 0.3, summary
    assert summary["val_bpb"] < 4.3, summary
    assert "sample" in run.stdout
    # The scoreboard: chapter 00's rungs, recounted here on the same held-out 10% of
    # the documentation, must be 00's own figures (its summary: uniform 6.674,
    # unigram 4.662, bigram 3.346 bits per byte), and the GPT must sit below the
    # token unigram.
    board = run.stdout[run.stdout.index("the text scoreboard"):].splitlines()[1:7]
    rungs = {line.rsplit(None, 1)[0].strip(): float(line.split()[-1]) for line in board
             if line.startswith("  ")}
    assert rungs["uniform guessing (00)"] == pytest.approx(6.674, abs=1e-3)
    assert rungs["unigram frequencies (00)"] == pytest.approx(4.662, abs=1e-3)
    assert rungs["bigram counts (00)"] == pytest.approx(3.346, abs=1e-3)
    assert rungs["GPT (13)"] == pytest.approx(summary["val_bpb"], abs=1e-3)
    assert rungs["GPT (13)"] < rungs["token unigram (13)"]
    # The looks at the pieces print before the trainer, each under its own cell.
    for words in ("bytes per token", "distance 3", "first loss", "a uniform guess"):
        assert words in run.stdout, words
    if has_matplotlib():
        assert (tmp_path / "out" / "loss.png").is_file()
    else:
        assert "matplotlib is not installed" in run.stdout
    sampled = gpt.main(["--sample", "The list", "--num-tokens", "20",
                        "--out", str(tmp_path / "out")])
    assert sampled["sampled_tokens"] == 20
    assert sampled["val_bpb"] == pytest.approx(summary["val_bpb"], abs=1e-4)


def test_rotary_positions_keep_the_dtype_under_bf16_autocast():
    """Under autocast the fp32 rotation tables would turn bf16 queries and keys into
    fp32 while the values stay bf16; attention needs one dtype (this failed on a GPU)."""
    config = gpt.GPTConfig(vocab_size=50, block_size=12, n_layer=1, n_head=2, n_embd=16,
                           rope=True, rmsnorm=True, swiglu=True, bias=False)
    cos, sin = gpt.rope_tables(12, 8)
    x = torch.randn(1, 2, 12, 8, dtype=torch.bfloat16)
    assert gpt.apply_rope(x, cos, sin).dtype == torch.bfloat16
    torch.manual_seed(0)
    model = gpt.GPT(config)
    tokens = torch.randint(0, 50, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(tokens, tokens)
    loss.backward()
    assert torch.isfinite(loss)


def test_patience_stops_a_memorising_run_and_keeps_the_best_weights(tmp_path):
    """A wide model on 3 KB of text memorises it within a few dozen steps: validation
    loss turns up, the run stops after `patience` evaluations without a new best, and
    both the checkpoint and the final evaluation are of the best weights."""
    text = tmp_path / "small.txt"
    text.write_text(gpt.python_docs_text()[:3_000], encoding="utf-8")
    out = tmp_path / "run"
    summary = train(str(text), out, "--n-embd", "96", "--learning-rate", "1e-2",
                    "--max-iters", "400", "--eval-interval", "10", "--eval-tokens", "100000",
                    "--patience", "2")
    best_step = summary["weights_from_step"]
    assert best_step < summary["iterations"] < 400
    state = load_state(out)
    assert state["step"] == best_step
    history = state["history"]
    assert state["best_loss"] == min(history["val_loss"])
    # Every validation window is read by both evaluations, so the final one, of the
    # restored weights, gives the best loss again.
    assert summary["val_loss"] == pytest.approx(state["best_loss"], abs=1e-4)


def test_cpu_preset_sizes_vocabulary_and_dropout_to_the_corpus(tmp_path):
    """A small corpus gets the smaller BPE and dropout 0.1, a large one 1,024 tokens and
    no dropout; a flag given wins over both."""
    assert gpt.corpus_settings(gpt.SMALL_CORPUS_BYTES - 1) == (512, 0.1)
    assert gpt.corpus_settings(gpt.SMALL_CORPUS_BYTES) == (1024, 0.0)
    path = tmp_path / "docs.txt"
    path.write_text(gpt.python_docs_text()[:30_000], encoding="utf-8")
    corpus = gpt.load_corpus(str(path), "bpe", None)
    assert corpus["encoding"].n_vocab == 512
    size = len(path.read_bytes())
    assert 0.85 * size < corpus["train_bytes"] < 0.95 * size   # the 90% kept for training
    args = gpt.parse_args(["--preset", "cpu", "--data", str(path), "--dropout", "0.05"])
    run = gpt.read_and_check(args, gpt.join_processes(args))
    assert gpt.settings(args, corpus["train_bytes"]) == (512, 0.05)
    assert run.config["vocab_size"] == 512 and run.model_config.dropout == 0.05
    assert (args.vocab_size, args.dropout) == (None, 0.05)   # the flags are left as given


def test_betas_reach_adamw():
    model = torch.nn.Linear(3, 2)
    optimizer = gpt.make_optimizer(model, 1e-3, 0.1, torch.device("cpu"), beta1=0.8,
                                   beta2=0.99)
    assert all(group["betas"] == (0.8, 0.99) for group in optimizer.param_groups)
    cpu, gpt2 = gpt.parse_args(["--preset", "cpu"]), gpt.parse_args(["--preset", "gpt2"])
    assert (cpu.beta1, cpu.beta2) == (0.8, 0.99)
    assert (gpt2.beta1, gpt2.beta2) == (0.9, 0.95)
    assert (cpu.schedule, gpt2.schedule) == ("wsd", "cosine")   # measured on the cpu preset only
    assert gpt.parse_args(["--preset", "cpu", "--beta1", "0.85"]).beta1 == 0.85


def test_without_matplotlib_the_losses_are_printed_as_a_table(corpus, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` fails
    train(corpus, tmp_path, "--max-iters", "2")
    printed = capsys.readouterr().out
    assert "matplotlib is not installed; validation loss by step" in printed
    assert not list(tmp_path.glob("*.png"))


# --- the speed-run switches ------------------------------------------------------------

def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """With --qk-norm, multiplying the query and key weights by 10 changes nothing (each
    head's q and k are brought to unit root mean square); without it, it changes the
    output."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    outputs = {}
    for qk_norm in (True, False):
        config = gpt.GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=32,
                               qk_norm=qk_norm, bias=False, rope=True)
        attention = gpt.CausalSelfAttention(config)
        tables = gpt.rope_tables(8, 16)
        before = attention(x, gpt.TorchKernels, tables)
        with torch.no_grad():
            attention.qkv.weight[:64] *= 10       # the query and key rows of qkv
        outputs[qk_norm] = (before, attention(x, gpt.TorchKernels, tables))
    assert torch.allclose(*outputs[True], atol=1e-5)
    assert not torch.allclose(*outputs[False], atol=1e-2)


def test_relu2_mlp_is_two_matrices_and_a_squared_relu():
    config = gpt.GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16,
                           relu2=True, swiglu=True, bias=False)     # relu2 wins over swiglu
    mlp = gpt.MLP(config)
    assert mlp.up.weight.shape == (64, 16) and mlp.down.weight.shape == (16, 64)
    x = torch.randn(3, 16)
    expected = torch.clamp(x @ mlp.up.weight.T, min=0) ** 2 @ mlp.down.weight.T
    assert torch.allclose(mlp(x, gpt.TorchKernels), expected, atol=1e-5)


def test_softcap_bounds_the_logits_and_leaves_small_ones_alone():
    torch.manual_seed(0)
    config = gpt.GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16,
                           bias=False)
    plain = gpt.GPT(config)
    with torch.no_grad():
        plain.token_embedding.weight.mul_(40)     # logits far beyond the cap
    capped = copy.deepcopy(plain)
    capped.config = gpt.GPTConfig(**{**gpt.asdict(config), "softcap": 5.0})
    tokens = torch.randint(0, 50, (2, 8))
    raw, _ = plain(tokens)
    squashed, _ = capped(tokens)
    assert raw.abs().max() > 20 and squashed.abs().max() <= 5.0
    assert torch.allclose(squashed, 5.0 * torch.tanh(raw / 5.0), atol=1e-4)
    small = raw.abs() < 0.5
    assert torch.allclose(squashed[small], raw[small], atol=0.01)


def test_value_embeddings_reach_the_values_and_start_from_the_plain_model():
    """Zeroed value tables give exactly the model without them; trained (non-zero)
    ones change the logits. They are lookups: not counted in the FLOPs per token."""
    torch.manual_seed(0)
    config = gpt.GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16,
                           bias=False, rope=True)
    plain = gpt.GPT(config)
    with_tables = gpt.GPT(gpt.GPTConfig(**{**gpt.asdict(config), "value_embeddings": True}))
    missing, _ = with_tables.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(name.startswith("value_embeddings.") for name in missing)
    assert gpt.flops_per_token(with_tables) == gpt.flops_per_token(plain)
    tokens = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        for table in with_tables.value_embeddings:
            table.weight.zero_()
        assert torch.allclose(with_tables(tokens)[0], plain(tokens)[0], atol=1e-6)
        with_tables.value_embeddings[1].weight.normal_()
        assert not torch.allclose(with_tables(tokens)[0], plain(tokens)[0], atol=1e-3)


def test_wsd_holds_the_peak_then_falls_in_a_line_to_zero():
    rate = gpt.learning_rate_at
    assert rate(0, 0.0, 1.0, 10, "wsd") == rate(0, 0.0, 1.0, 10) == 0.1     # warm-up alike
    assert rate(50, 0.3, 1.0, 10, "wsd", 0.4) == 1.0
    assert rate(50, 0.6, 1.0, 10, "wsd", 0.4) == 1.0
    assert math.isclose(rate(50, 0.8, 1.0, 10, "wsd", 0.4), 0.5)
    assert rate(50, 1.0, 1.0, 10, "wsd", 0.4) == 0.0
    assert math.isclose(rate(50, 1.0, 1.0, 10), 0.1)                 # the cosine ends at a tenth


def test_switches_train_resume_exactly_and_must_match_on_resume(corpus, tmp_path):
    """The speed-run switches and the wsd schedule: 2 + 2 steps with a resume equal 4
    straight; a resume with the schedule or a switch changed is refused; a checkpoint
    written before a switch existed resumes as its default."""
    switches = ["--relu2", "--qk-norm", "--softcap", "15", "--value-embeddings",
                "--schedule", "wsd", "--lr-decay-iters", "4"]
    train(corpus, tmp_path / "straight", "--max-iters", "4", *switches)
    train(corpus, tmp_path / "halves", "--max-iters", "2", *switches)
    train(corpus, tmp_path / "halves", "--max-iters", "4", *switches, "--resume")
    expected, got = load_state(tmp_path / "straight"), load_state(tmp_path / "halves")
    for name in expected["model"]:
        assert torch.equal(expected["model"][name], got["model"][name]), name
    # The last of two opposite flags wins, so each change follows the switches.
    for changed, word in ((["--schedule", "cosine"], "schedule"), (["--no-qk-norm"], "qk_norm")):
        assert_clean_error(run_chapter("13_gpt", *TINY, "--data", corpus, "--out",
                                       tmp_path / "halves", "--resume", "--max-iters", "5",
                                       *switches, *changed, cwd=tmp_path), word)
    old = copy.deepcopy(expected["config"])
    for key in ("relu2", "qk_norm", "softcap", "value_embeddings"):
        del old["model"][key]
    del old["schedule"], old["cooldown"]
    current = copy.deepcopy(old)
    current["model"].update(relu2=False, qk_norm=False, softcap=0.0, value_embeddings=False)
    current.update(schedule="cosine", cooldown=0.4)
    gpt.check_same_configuration(old, current, "ckpt.pt")     # no error: the defaults
