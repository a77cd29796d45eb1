"""Tests of chapter 11: the transformer's parts against PyTorch's own, its masks (no
peeking at the future, padding changes nothing), step-by-step decoding against the
parallel forward pass, the code shared with chapter 10, and a --quick run."""
import ast
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_clean_error, has_matplotlib, load_chapter, run_as_script,
                      run_chapter, without_matplotlib)

chapter = load_chapter("11_transformer")


def test_scaled_dot_product_attention_matches_pytorch():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(chapter.scaled_dot_product_attention(q, k, v, mask), expected,
                          atol=1e-6)
    weights = chapter.attention_weights(q, k, mask)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(2, 3, 5))
    assert (weights[~mask.expand_as(weights)] == 0).all()


def copy_into_pytorch(ours, model_size, heads):
    reference = torch.nn.MultiheadAttention(model_size, heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([ours.query.weight, ours.key.weight,
                                                  ours.value.weight]))
        reference.in_proj_bias.copy_(torch.cat([ours.query.bias, ours.key.bias,
                                                ours.value.bias]))
        reference.out_proj.weight.copy_(ours.output.weight)
        reference.out_proj.bias.copy_(ours.output.bias)
    return reference.eval()


def test_multi_head_attention_matches_torch_with_the_same_weights():
    torch.manual_seed(0)
    model_size, heads = 16, 4
    ours = chapter.MultiHeadAttention(model_size, heads).eval()
    reference = copy_into_pytorch(ours, model_size, heads)
    # cross-attention with padded keys
    queries, keys_values = torch.randn(2, 5, model_size), torch.randn(2, 6, model_size)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])  # True = <pad>
    output, weights = ours(queries, keys_values, ~padding[:, None, None, :], need_weights=True)
    expected, expected_weights = reference(queries, keys_values, keys_values,
                                           key_padding_mask=padding)
    assert torch.allclose(output, expected, atol=1e-5)
    assert torch.allclose(weights, expected_weights, atol=1e-6)  # both average the heads
    # causal self-attention
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    output, _ = ours(queries, queries, causal[None, None])
    expected, _ = reference(queries, queries, queries, attn_mask=~causal)
    assert torch.allclose(output, expected, atol=1e-5)


def test_layer_norm_and_positions():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 4, 10), torch.randn(10), torch.randn(10)
    assert torch.allclose(chapter.layer_norm(x, weight, bias),
                          F.layer_norm(x, (10,), weight, bias), atol=1e-5)
    table = chapter.sinusoidal_positions(50, 8)
    assert table.shape == (50, 8)
    for position in (0, 3, 49):
        assert table[position, 0] == pytest.approx(math.sin(position), abs=1e-5)
        assert table[position, 1] == pytest.approx(math.cos(position), abs=1e-5)
        assert table[position, 6] == pytest.approx(math.sin(position / 10000 ** (6 / 8)),
                                                   abs=1e-5)


def small_model():
    torch.manual_seed(0)
    return chapter.Transformer(30, 40, model_size=16, heads=2, layers=2, hidden_size=32,
                               dropout=0.1).eval()


def test_decoder_cannot_see_the_future():
    model = small_model()
    source = torch.tensor([[5, 6, 7]])
    target = torch.tensor([[1, 4, 5, 6, 7, 8]])
    changed = target.clone()
    changed[0, 3:] = torch.tensor([20, 21, 22])
    logits, other = model(source, target), model(source, changed)
    assert torch.allclose(logits[:, :3], other[:, :3], atol=1e-6)
    assert not torch.allclose(logits[:, 3:], other[:, 3:])


def test_padding_changes_nothing():
    model = small_model()
    source = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    target = torch.tensor([[1, 4, 5, 6], [1, 7, 8, 0]])
    logits = model(source, target)
    padded = model(torch.cat([source, torch.zeros(2, 3, dtype=torch.long)], dim=1),
                   torch.cat([target, torch.zeros(2, 2, dtype=torch.long)], dim=1))
    assert torch.allclose(logits, padded[:, :4], atol=1e-5)
    alone = model(source[1:, :2], target[1:, :3])  # the short pair with no padding at all
    assert torch.allclose(logits[1, :3], alone[0], atol=1e-5)


def test_dropout_acts_in_training_only():
    model = small_model()
    source, target = torch.tensor([[5, 6, 7]]), torch.tensor([[1, 4, 5]])
    assert torch.equal(model(source, target), model(source, target))
    model.train()
    assert not torch.equal(model(source, target), model(source, target))


def test_step_by_step_decoding_equals_the_parallel_pass():
    model = small_model()
    source = torch.tensor([[5, 6, 7], [8, 9, 0]])
    tokens, weights = chapter.greedy_decode(model, source, 6)
    prefix = torch.cat([torch.full((2, 1), chapter.BOS), tokens[:, :-1]], dim=1)
    predicted = model(source, prefix).argmax(dim=-1)
    for row in range(2):
        written = tokens[row].tolist()
        end = written.index(chapter.EOS) + 1 if chapter.EOS in written else len(written)
        assert predicted[row, :end].tolist() == written[:end]
    assert torch.allclose(weights.sum(dim=-1), torch.ones(tokens.shape))
    assert (weights[1, :, 2] == 0).all()


def test_swappable_parts_are_used():
    """Chapter 12 swaps in its own kernels through these attributes."""
    model = small_model()
    source, target = torch.tensor([[5, 6, 7]]), torch.tensor([[1, 4, 5]])
    calls = []

    def counting(q, k, v, mask):
        calls.append(q.shape)
        return chapter.scaled_dot_product_attention(q, k, v, mask)

    for module in model.modules():
        if isinstance(module, chapter.MultiHeadAttention):
            module.attend = counting
        if isinstance(module, chapter.FeedForward):
            module.activation = torch.relu
    model(source, target)
    assert len(calls) == 2 + 2 * 2  # encoder self, decoder self and cross, two layers
    assert calls[0] == (1, 2, 3, 8)


def test_code_outside_the_model_is_chapter_10s():
    """`diff 10_seq2seq.py 11_transformer.py` must show the model and nothing else."""
    previous = load_chapter("10_seq2seq")
    for name in ["DataError", "download_pairs", "read_pairs", "english_words",
                 "french_words", "draw_numbers", "held_out_numbers", "generate_number_task",
                 "split_pairs", "load_pairs", "tokenize", "detokenize", "Vocabulary",
                 "encode_pairs", "pad_batch", "make_batches", "collate", "learning_rate",
                 "teacher_forcing_ratio", "sequence_loss", "train", "greedy_decode",
                 "evaluate", "attention_maps", "show_attention", "parse_args",
                 "print_summary", "in_notebook", "report_data_errors", "chapter_args",
                 "show_figure"]:
        assert inspect.getsource(getattr(chapter, name)) == \
            inspect.getsource(getattr(previous, name)), name
    # The run itself, the cells under `if __name__ == "__main__":`, is the same too.
    assert run_cells(chapter) == run_cells(previous)


def run_cells(module):
    """The source of a chapter's top-level `if __name__ == "__main__":` blocks."""
    source = inspect.getsource(module)
    return [ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, ast.If) and "__main__" in ast.get_source_segment(source, node.test)]


def test_bad_flags_and_files_raise_data_error(tmp_path):
    with pytest.raises(chapter.DataError, match="steps"):
        chapter.parse_args(["--steps", "0"])
    with pytest.raises(chapter.DataError, match="heads"):
        chapter.parse_args(["--model-size", "30", "--heads", "4"])
    with pytest.raises(chapter.DataError, match="layers"):
        chapter.parse_args(["--layers", "0"])
    with pytest.raises(Exception, match="does not exist") as refused:
        run_as_script("11_transformer", "--data", tmp_path / "nothing.txt", "--out", tmp_path)
    assert type(refused.value).__name__ == "DataError"


def test_impossible_model_exits_cleanly(tmp_path):
    run = run_chapter("11_transformer", "--quick", "--heads", "3", cwd=tmp_path)
    assert_clean_error(run, "heads")


def test_quick_run_learns_to_translate_numbers(tmp_path):
    run = run_chapter("11_transformer", "--quick", "--out", tmp_path / "out", cwd=tmp_path)
    assert run.returncode == 0, run
    assert run.summary["chapter"] == "11_transformer"
    assert run.summary["data"] == "generated numbers"
    # 100 steps: nearly all tokens right (chance is about 1 in 30), and many numbers
    # exact; the transformer needs more steps than chapter 10's GRU to get them all
    assert run.summary["token_accuracy"] >= 0.85, run
    assert run.summary["exact_match"] >= 0.3, run
    if has_matplotlib():
        assert (tmp_path / "out" / "11_transformer_attention.png").exists()
        # Multi-head attention's flow, drawn before training.
        assert (tmp_path / "out" / "11_transformer_attention_flow.png").stat().st_size > 0
    else:
        assert "attention maps as text" in run.stdout


def test_without_matplotlib_attention_maps_are_printed_as_text(tmp_path):
    run = run_chapter("11_transformer", "--quick", "--steps", "2", "--out", tmp_path / "out",
                      cwd=tmp_path, env=without_matplotlib(tmp_path))
    assert run.returncode == 0, run
    assert "attention maps as text" in run.stdout, run
    assert not list((tmp_path / "out").glob("*.png"))
    # The flow of multi-head attention as text, with the default 4 heads.
    assert "multi-head attention as text:" in run.stdout, run
    assert "Q K^T / sqrt(d) -> mask: -inf -> softmax" in run.stdout, run
    assert "cut into 4 heads" in run.stdout, run
