"""Tests of chapter 10: the number task's grammar and held-out split, the sentence-pair
loader, batching and masks, the recurrent model with attention, and a --quick run."""
import io
import os
import urllib.request
import zipfile

import pytest
import torch

from conftest import (assert_clean_error, has_matplotlib, load_chapter, run_as_script,
                      run_chapter, without_matplotlib)

chapter = load_chapter("10_seq2seq")

# Checked by hand against French grammar (traditional spelling): "et" only before un
# and onze and never after quatre-vingt; plural s on vingts and cents only when last
# and not before mille; mille invariable and never "un mille".
FRENCH = {
    0: "zéro", 1: "un", 16: "seize", 17: "dix-sept", 21: "vingt et un", 22: "vingt-deux",
    61: "soixante et un", 70: "soixante-dix", 71: "soixante et onze", 72: "soixante-douze",
    77: "soixante-dix-sept", 80: "quatre-vingts", 81: "quatre-vingt-un",
    90: "quatre-vingt-dix", 91: "quatre-vingt-onze", 99: "quatre-vingt-dix-neuf",
    100: "cent", 101: "cent un", 200: "deux cents", 201: "deux cent un",
    280: "deux cent quatre-vingts", 1000: "mille", 1001: "mille un", 2000: "deux mille",
    21000: "vingt et un mille", 80000: "quatre-vingt mille",
    80080: "quatre-vingt mille quatre-vingts", 100000: "cent mille",
    200000: "deux cent mille", 200200: "deux cent mille deux cents",
    171000: "cent soixante et onze mille",
    999999: "neuf cent quatre-vingt-dix-neuf mille neuf cent quatre-vingt-dix-neuf",
}
ENGLISH = {
    0: "zero", 1: "one", 13: "thirteen", 21: "twenty-one", 70: "seventy",
    99: "ninety-nine", 100: "one hundred", 101: "one hundred one", 1000: "one thousand",
    2000: "two thousand", 21000: "twenty-one thousand", 80000: "eighty thousand",
    100001: "one hundred thousand one",
    999999: "nine hundred ninety-nine thousand nine hundred ninety-nine",
}


@pytest.mark.parametrize("number", sorted(FRENCH))
def test_french_words_match_hand_checked_table(number):
    assert chapter.french_words(number) == FRENCH[number]


@pytest.mark.parametrize("number", sorted(ENGLISH))
def test_english_words_match_hand_checked_table(number):
    assert chapter.english_words(number) == ENGLISH[number]


def test_verbalisers_refuse_numbers_out_of_range():
    for words in (chapter.english_words, chapter.french_words):
        with pytest.raises(ValueError):
            words(1_000_000)
        with pytest.raises(ValueError):
            words(-1)


def test_held_out_set_is_fixed_and_never_in_training():
    training, held_out = chapter.generate_number_task(3000, seed=5)
    _, held_out_again = chapter.generate_number_task(2000, seed=9)
    assert held_out == held_out_again  # fixed whatever the seed and size
    assert len(held_out) == chapter.HELD_OUT_SIZE == len(set(held_out))
    assert len(training) == 3000 == len(set(training))
    assert not set(training) & set(held_out)
    assert not {english for english, _ in training} & {english for english, _ in held_out}
    # every number below 1000 is a building block the model trains on
    assert {chapter.english_words(n) for n in range(1000)} <= {e for e, _ in training}


def test_vocabulary_round_trip_and_unknown_words():
    vocab = chapter.Vocabulary(["quatre-vingt-onze", "vingt et un", "vingt et un"], min_count=1)
    ids = vocab.encode("Quatre-vingt-onze martiens")
    assert ids[-1] == chapter.UNK
    assert chapter.detokenize(vocab.decode(ids[:-1] + [chapter.EOS, 7])) == "quatre-vingt-onze"
    assert len(chapter.Vocabulary(["vingt et un", "vingt"], min_count=2)) == 4 + 1


def test_batches_cover_every_pair_once_with_similar_lengths():
    import numpy as np
    training, _ = chapter.generate_number_task(2000, seed=0)
    source_vocab = chapter.Vocabulary(english for english, _ in training)
    target_vocab = chapter.Vocabulary(french for _, french in training)
    examples = chapter.encode_pairs(training, source_vocab, target_vocab)
    batches = chapter.make_batches(examples, 64, np.random.default_rng(0))
    assert sorted(i for batch in batches for i in batch) == list(range(len(examples)))

    def padding(batches):  # <pad> cells in the source tensors
        return sum(len(batch) * max(len(examples[i][0]) for i in batch)
                   - sum(len(examples[i][0]) for i in batch) for batch in batches)

    order = np.random.default_rng(0).permutation(len(examples)).tolist()
    shuffled = [order[start:start + 64] for start in range(0, len(order), 64)]
    assert padding(batches) < padding(shuffled) / 5
    source, target = chapter.collate(examples, batches[0], "cpu")
    assert (target[:, 0] == chapter.BOS).all()
    for row, i in enumerate(batches[0]):
        assert (source[row, len(examples[i][0]):] == chapter.PAD).all()
        assert target[row, len(examples[i][1]) - 1] == chapter.EOS


def write_pairs(path, good, bad):
    lines = [f"I have {n} cats.\tJ'ai {n} chats." for n in range(good)]
    lines[5:5] = ["no tab on this line"] * bad + ["\tno English side"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_read_pairs_counts_and_skips_malformed_lines(tmp_path):
    path = tmp_path / "pairs.txt"
    write_pairs(path, 300, 2)
    pairs, malformed = chapter.read_pairs(str(path))
    assert len(pairs) == 300 and malformed == 3
    assert pairs[0] == ("I have 0 cats.", "J'ai 0 chats.")
    training, held_out = chapter.split_pairs(pairs)
    assert held_out and not {s for s, _ in training} & {s for s, _ in held_out}


class FakeResponse(io.BytesIO):
    headers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def zipped(text):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(chapter.PAIRS_MEMBER, text)
    return buffer.getvalue()


def test_download_checks_format_and_renames_into_place(tmp_path, monkeypatch):
    path = str(tmp_path / "data" / "eng-fra.txt")
    assert not chapter.download_pairs(path=path)  # offline: no file, no leftovers
    assert os.listdir(tmp_path / "data") == []
    monkeypatch.setattr(chapter, "PAIRS_MIN_BYTES", 1000)
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda *a, **k: FakeResponse(zipped("no tabs here\n" * 200)))
    assert not chapter.download_pairs(path=path)  # not sentence pairs: refused
    assert os.listdir(tmp_path / "data") == []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda *a, **k: FakeResponse(zipped("Go.\tVa !\n" * 200)))
    assert chapter.download_pairs(path=path)
    assert os.listdir(tmp_path / "data") == ["eng-fra.txt"]
    assert chapter.read_pairs(path)[0][0] == ("Go.", "Va !")


def small_model():
    torch.manual_seed(0)
    return chapter.Seq2Seq(30, 40, embed_size=8, hidden_size=16, dropout=0.0).eval()


def test_additive_attention_weights_sum_to_one_and_skip_padding():
    torch.manual_seed(0)
    attention = chapter.AdditiveAttention(6, 10, 8)
    keys = torch.randn(2, 5, 10)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    context, weights = attention(torch.randn(2, 6), keys, attention.key(keys), mask)
    assert torch.allclose(weights.sum(dim=1), torch.ones(2))
    assert (weights[1, 3:] == 0).all()
    assert torch.allclose(context, (weights[:, :, None] * keys).sum(dim=1), atol=1e-6)


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


def test_decoder_cannot_see_the_future():
    model = small_model()
    source = torch.tensor([[5, 6, 7]])
    target = torch.tensor([[1, 4, 5, 6, 7, 8]])
    changed = target.clone()
    changed[0, 3:] = torch.tensor([20, 21, 22])
    logits, other = model(source, target), model(source, changed)
    assert torch.allclose(logits[:, :3], other[:, :3])
    assert not torch.allclose(logits[:, 3:], other[:, 3:])


def test_greedy_decoding_matches_teacher_forced_logits_and_stops():
    model = small_model()
    source = torch.tensor([[5, 6, 7], [8, 9, 0]])
    tokens, weights = chapter.greedy_decode(model, source, max_length=6)
    assert tokens.shape[1] <= 6 and weights.shape[:2] == tokens.shape
    assert torch.allclose(weights.sum(dim=-1), torch.ones(tokens.shape))
    assert (weights[1, :, 2] == 0).all()
    # feeding the greedy tokens back with teacher forcing predicts the same tokens
    # (up to and including each sentence's <eos>; after it comes padding)
    prefix = torch.cat([torch.full((2, 1), chapter.BOS), tokens[:, :-1]], dim=1)
    predicted = model(source, prefix).argmax(dim=-1)
    for row in range(2):
        written = tokens[row].tolist()
        end = written.index(chapter.EOS) + 1 if chapter.EOS in written else len(written)
        assert predicted[row, :end].tolist() == written[:end]
        assert all(token == chapter.PAD for token in written[end:])


def test_learning_rate_and_teacher_forcing_schedules():
    assert chapter.learning_rate(0.0, 1.0) == 0.0
    assert chapter.learning_rate(0.05, 1.0) == pytest.approx(1.0)
    assert chapter.learning_rate(1.0, 1.0) == pytest.approx(0.1)
    assert chapter.teacher_forcing_ratio(0.0) == 1.0
    assert chapter.teacher_forcing_ratio(1.0) == 0.5


def test_real_pair_file_trains_and_reports_malformed_lines(tmp_path, capsys):
    path = tmp_path / "pairs.txt"
    write_pairs(path, 400, 2)
    run_as_script("10_seq2seq", "--data", path, "--steps", "2", "--out", tmp_path / "out",
                  "--hidden-size", "8", "--embed-size", "8")
    output = capsys.readouterr().out
    assert "skipped 3 malformed lines" in output
    assert output.strip().splitlines()[-1].startswith("summary: ")


def test_bad_flags_and_files_raise_data_error(tmp_path):
    with pytest.raises(chapter.DataError, match="time-budget"):
        chapter.parse_args(["--time-budget", "0"])
    with pytest.raises(chapter.DataError, match="dropout"):
        chapter.parse_args(["--dropout", "1.5"])
    with pytest.raises(chapter.DataError, match="hidden-size"):
        chapter.parse_args(["--hidden-size", "-4"])
    no_tabs = tmp_path / "no_tabs.txt"
    no_tabs.write_text("just one language here\n" * 300, encoding="utf-8")
    with pytest.raises(Exception, match="tab-separated") as refused:
        run_as_script("10_seq2seq", "--data", no_tabs, "--out", tmp_path)
    assert type(refused.value).__name__ == "DataError"


def test_missing_file_exits_cleanly(tmp_path):
    run = run_chapter("10_seq2seq", "--data", tmp_path / "nothing.txt", cwd=tmp_path)
    assert_clean_error(run, "does not exist")


def test_quick_run_learns_to_translate_numbers(tmp_path):
    run = run_chapter("10_seq2seq", "--quick", "--out", tmp_path / "out", cwd=tmp_path)
    assert run.returncode == 0, run
    assert run.summary["chapter"] == "10_seq2seq"
    assert run.summary["data"] == "generated numbers"
    # 100 steps: nearly every token right, and most numbers translated exactly
    assert run.summary["token_accuracy"] >= 0.95, run
    assert run.summary["exact_match"] >= 0.8, run
    if has_matplotlib():
        assert (tmp_path / "out" / "10_seq2seq_attention.png").exists()
        # One step of additive attention, drawn before training.
        assert (tmp_path / "out" / "10_seq2seq_attention_step.png").stat().st_size > 0
    else:
        assert "attention maps as text" in run.stdout


def test_without_matplotlib_attention_maps_are_printed_as_text(tmp_path):
    run = run_chapter("10_seq2seq", "--quick", "--steps", "2", "--out", tmp_path / "out",
                      cwd=tmp_path, env=without_matplotlib(tmp_path))
    assert run.returncode == 0, run
    assert "attention maps as text" in run.stdout, run
    assert not list((tmp_path / "out").glob("*.png"))
    # One step of additive attention as text: scores, softmax, weighted sum.
    assert "one step of additive attention as text:" in run.stdout, run
    assert "-> a = softmax(e) -> c = sum_j a_j h_j" in run.stdout, run
