"""Tests for 09_data.py: the BPE tokenizer (a hand-worked example, agreement with
tiktoken, exact round trips), deduplication, the shard format, the streaming loader
(no token skipped or repeated, any number of ranks, exact resume) and bad inputs."""
import json
import os

import numpy as np
import pytest

from conftest import (assert_clean_error, has_matplotlib, load_chapter, run_chapter,
                      without_matplotlib)

chapter = load_chapter("09_data")


@pytest.fixture(scope="module")
def trained():
    """A small tokenizer trained on 60,000 characters of the offline corpus, shared by
    the tests below: (mergeable_ranks, tiktoken encoding)."""
    text = chapter.python_docs_text()[:60_000]
    ranks = chapter.train_bpe(text, 600)
    return ranks, chapter.make_encoding(ranks)


def varied_strings(seed=0, count=40):
    """Random strings mixing many scripts and kinds of character: ASCII words and
    punctuation, accented Latin, Greek, Cyrillic, Arabic, Hebrew, Devanagari, CJK,
    Hangul, emoji, combining marks, digits of several scripts, Unicode spaces and
    control characters. (All from long-standing Unicode blocks, which tiktoken's and
    the regex module's character tables agree on.)"""
    pieces = ["the", " cat", "'s", "'ll", " ", "  ", "\n", "\n\n", "\t", ".", ",", "!?",
              "123", " 42", "x+=1", "<|endoftext|>", "é", "e\u0301", "ñ", "ß", "Ω",
              "λόγος", "слово", "مرحبا", "שלום", "नमस्ते", "漢字", "かな", "한국어", "😀",
              "👨\u200d👩\u200d👧", "🇯🇵", "👍🏽", "\u00a0", "\u3000", "\u2028", "\x00",
              "\x1b", "\x1c", "\x85", "\u0301", "٣", "½", "²", "Ⅻ", "∑", "\ufeff", "\U0001F9EC"]
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(pieces, size=rng.integers(1, 30))) for _ in range(count)]


# ---------------------------------------------------------------- the tokenizer

def test_train_bpe_reproduces_hand_worked_merges():
    # "the cat the hat the bat" pre-tokenises (GPT-2 rule) into the chunks
    #   "the" x1, " the" x2, " cat", " hat", " bat" (x1 each).
    # Pair counts, weighted by chunk counts:
    #   t-h 3, h-e 3, a-t 3, " "-t 2, and 1 each for " "-c c-a " "-h h-a " "-b b-a.
    # Three pairs tie at 3; ties go to the pair of smaller ids: (a=97, t=116) beats
    # (h=104, e=101) beats (t=116, h=104). So merge 1: "at" (id 256).
    # Now t-h 3, h-e 3, " "-t 2, ...: merge 2: "he" (104, 101) < (116, 104): id 257.
    # Chunks now t|he and " "|t|he: t-he 3 is the only pair of count 3: merge 3 "the".
    # Then " "-the 2 (from " the" x2): merge 4 " the".
    # Everything left occurs once: " "-b (32, 98) has the smallest ids: merge 5 " b".
    ranks = chapter.train_bpe("the cat the hat the bat", 262)
    learned = sorted(ranks, key=ranks.get)[256:]
    assert learned == [b"at", b"he", b"the", b" the", b" b"]
    encoding = chapter.make_encoding(ranks)
    assert encoding.eot_token == 261 and encoding.n_vocab == 262
    assert encoding.encode_ordinary(" the bat") == [ranks[b" the"], ranks[b" b"], ranks[b"at"]]


def test_train_bpe_layout_and_special_token_text():
    # The 256 single bytes come first with id = byte value, ranks are 0..n-1, and
    # <|endoftext|> in the training text separates documents: nothing is merged
    # across it or out of it.
    text = ("abcab" + chapter.END_OF_TEXT) * 20 + "zz"
    ranks = chapter.train_bpe(text, 280)
    assert all(ranks[bytes([value])] == value for value in range(256))
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert not any(b"<" in piece or b"|" in piece for piece in ranks if len(piece) > 1)
    # Chunks: "abcab" x20, "zz" x1. Merges: "ab" (40), then "c"+"ab" (20, tied with
    # "ab"+"c" but smaller ids), then "ab"+"cab", then "zz"; then no pair is left, so
    # training stops with 260 tokens although 279 were allowed.
    assert sorted(ranks, key=ranks.get)[256:] == [b"ab", b"cab", b"abcab", b"zz"]


def test_pure_python_and_tiktoken_agree(trained):
    ranks, encoding = trained
    texts = varied_strings() + chapter.HARD_STRINGS + [chapter.python_docs_text()[60_000:80_000]]
    for text in texts:
        assert chapter.bpe_encode(text, ranks) == encoding.encode_ordinary(text), text
    identical, round_trip = chapter.tokenizer_checks(ranks, encoding, texts)
    assert identical and round_trip


def test_round_trip_on_hard_strings(trained):
    ranks, encoding = trained
    token_bytes = {rank: piece for piece, rank in ranks.items()}
    for text in chapter.HARD_STRINGS + varied_strings(seed=1):
        ids = chapter.bpe_encode(text, ranks)
        assert b"".join(token_bytes[token] for token in ids).decode("utf-8") == text
        assert encoding.decode(encoding.encode_ordinary(text)) == text
    # The special token's text inside a document: tiktoken refuses it unless asked;
    # as ordinary text it is plain characters (no end-of-text id); allowed, it is the
    # one special id. Either way the text decodes back unchanged.
    text = "before<|endoftext|>after"
    with pytest.raises(ValueError):
        encoding.encode(text)
    ordinary = encoding.encode_ordinary(text)
    special = encoding.encode(text, allowed_special={chapter.END_OF_TEXT})
    assert encoding.eot_token not in ordinary
    assert special.count(encoding.eot_token) == 1
    assert encoding.decode(ordinary) == encoding.decode(special) == text


def test_bpe_compresses_held_out_text(trained):
    _, encoding = trained
    held_out = chapter.python_docs_text()[100_000:130_000]
    assert chapter.bytes_per_token(encoding, [held_out]) > 2.0


def test_vocabulary_below_257_is_refused():
    with pytest.raises(chapter.DataError, match="257"):
        chapter.train_bpe("some text", 256)


def test_gpt2_encoding_offline_returns_none_quickly(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))   # nothing cached there
    assert chapter.gpt2_encoding(timeout=10) is None


# ---------------------------------------------------------------- cleaning, dedup

def test_clean_text():
    raw = "Cafe\u0301 line\r\nnext\rthird   \n\n\n\nend\x00\x1b\u00a0here\t\n"
    assert chapter.clean_text(raw) == "Café line\nnext\nthird\n\nend here"
    assert chapter.split_documents([("a", "one\n\n\n two\n")]) == ["one", " two"]
    assert chapter.split_documents([("a", "one\n\ntwo"), ("b", "three")]) == ["one\n\ntwo", "three"]


def test_exact_and_near_duplicates_are_removed():
    rng = np.random.default_rng(0)
    vocabulary = [f"word{index}" for index in range(500)]
    base = list(rng.choice(vocabulary, size=100))
    one_change = base.copy()
    one_change[50] = "different"                      # Jaccard (96-5)/(96+5) = 0.90
    many_changes = base.copy()
    for position in range(0, 100, 5):                 # every shingle touched: far below 0.8
        many_changes[position] = f"other{position}"
    short = "Ay, my good lord."                       # short repeats are language: kept
    documents = [" ".join(base), short, " ".join(one_change), " ".join(base),
                 short, " ".join(many_changes), " ".join(rng.choice(vocabulary, size=80))]
    kept, exact, near = chapter.deduplicate(documents, threshold=0.8, seed=0)
    assert [(index, original) for index, original, _ in exact] == [(3, 0)]
    assert [(index, original) for index, original, _ in near] == [(2, 0)]
    assert 0.85 < near[0][2] < 0.95
    assert kept == [documents[index] for index in (0, 1, 4, 5, 6)]
    assert chapter.candidate_probability(0.8) == pytest.approx(1 - (1 - 0.8**8)**16)
    assert chapter.candidate_probability(0.5) < 0.1 < 0.9 < chapter.candidate_probability(0.8)


def test_read_corpus_folder_skips_non_utf8(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("Some good text.\n", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.txt").write_text("More text in a sub-folder.", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a .txt file", encoding="utf-8")
    texts, source = chapter.read_corpus(str(tmp_path))
    assert [os.path.basename(name) for name, _ in texts] == ["good.txt", "more.txt"]
    assert "latin.txt" in capsys.readouterr().err


# ---------------------------------------------------------------- shards

@pytest.mark.parametrize("vocab_size, expected_dtype", [(4096, np.uint16), (100_000, np.uint32)])
def test_shard_round_trip(tmp_path, vocab_size, expected_dtype):
    tokens = np.random.default_rng(0).integers(0, vocab_size, size=1000)
    path = str(tmp_path / "train_000001.bin")
    chapter.write_shard(path, tokens, vocab_size)
    back = chapter.read_shard(path)
    assert back.dtype == expected_dtype and np.array_equal(back, tokens)
    raw = open(path, "rb").read()
    magic, version, itemsize, count = chapter.SHARD_HEADER.unpack(raw[:chapter.SHARD_HEADER.size])
    assert (magic, version, itemsize, count) == (chapter.SHARD_MAGIC, 1,
                                                 np.dtype(expected_dtype).itemsize, 1000)
    assert len(raw) == chapter.SHARD_HEADER.size + 1000 * itemsize
    assert os.listdir(tmp_path) == ["train_000001.bin"]          # no temporary file left
    chapter.write_shard(path, [], vocab_size)                        # empty shards work too
    assert len(chapter.read_shard(path)) == 0


def test_write_shards_layout(tmp_path, trained):
    _, encoding = trained
    documents = chapter.split_documents([("docs", chapter.python_docs_text()[:30_000])])
    valid, train = chapter.split_validation(documents, 0.1)
    valid_paths, train_paths = chapter.write_shards(valid, train, encoding, str(tmp_path),
                                                    shard_tokens=2000, workers=1)
    assert [os.path.basename(path) for path in valid_paths] == ["valid_000000.bin"]
    lengths = [len(chapter.read_shard(path)) for path in train_paths]
    assert lengths[:-1] == [2000] * (len(lengths) - 1) and 0 < lengths[-1] <= 2000
    stream = np.concatenate([chapter.read_shard(path) for path in valid_paths + train_paths])
    assert int((stream == encoding.eot_token).sum()) == len(documents)
    assert encoding.decode(stream.tolist()) == "".join(chapter.END_OF_TEXT + document
                                                       for document in valid + train)


def corrupt(path, kind):
    raw = bytearray(open(path, "rb").read())
    if kind == "truncated":
        raw = raw[:-1]
    elif kind == "magic":
        raw[:8] = b"NOTOURS!"
    elif kind == "length":
        raw += b"\x00\x00"
    elif kind == "version":
        raw[8] = 9
    elif kind == "header":
        raw = raw[:10]
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("kind, words", [("truncated", "wrong length"), ("magic", "bad magic"),
                                         ("length", "wrong length"), ("version", "version"),
                                         ("header", "truncated")])
def test_bad_shards_are_refused(tmp_path, kind, words):
    path = str(tmp_path / "train_000001.bin")
    chapter.write_shard(path, np.arange(100), 4096)
    corrupt(path, kind)
    with pytest.raises(chapter.DataError, match=words):
        chapter.read_shard(path)
    with pytest.raises(chapter.DataError, match=words):
        chapter.ShardLoader([path], batch_size=1, block_size=4)


# ---------------------------------------------------------------- the loader

def numbered_shards(folder, lengths=(37, 50, 13, 64)):
    """Shards whose tokens are their positions in the joined stream 0, 1, 2, ..., so a
    batch shows exactly which stream positions it read."""
    paths, start = [], 0
    for index, length in enumerate(lengths):
        paths.append(str(folder / f"train_{index + 1:06d}.bin"))
        chapter.write_shard(paths[-1], np.arange(start, start + length), 4096)
        start += length
    return paths, start


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("seed", [None, 7])
def test_loader_covers_each_token_once(tmp_path, world_size, seed):
    paths, total = numbered_shards(tmp_path)
    batch_size, block_size = 2, 4
    loaders = [chapter.ShardLoader(paths, batch_size, block_size, rank, world_size, seed)
               for rank in range(world_size)]
    steps = loaders[0].steps_per_epoch
    windows = (total - 1) // block_size                        # 40 windows of 5 tokens
    assert steps == windows // (batch_size * world_size)
    seen = {rank: [] for rank in range(world_size)}
    for _ in range(steps):
        for rank, loader in enumerate(loaders):
            inputs, targets = loader.next_batch()
            assert inputs.shape == targets.shape == (batch_size, block_size)
            assert inputs.dtype == targets.dtype == np.int64
            # Targets are the inputs shifted by one, also where a window crosses a
            # shard boundary (positions 37, 87, 100): nothing skipped inside a window.
            assert np.array_equal(targets, inputs + 1)
            assert np.all(inputs[:, 0] % block_size == 0)   # windows start every block
            seen[rank].extend(inputs.ravel().tolist())
    everything = [position for rank in seen for position in seen[rank]]
    assert len(everything) == len(set(everything))             # no token twice, any rank
    for rank in range(world_size):                              # ranks share nothing
        for other in range(rank + 1, world_size):
            assert not set(seen[rank]) & set(seen[other])
    left_out = windows * block_size - len(everything)
    assert 0 <= left_out < batch_size * world_size * block_size
    if seed is None:                                            # in order: no gap at all
        assert sorted(everything) == list(range(len(everything)))
    # The next call starts epoch 1, in a new order when shuffling.
    following = loaders[0].next_batch()[0]
    assert loaders[0].epoch == 1
    if seed is not None:
        first_of_epoch_0 = chapter.ShardLoader(paths, batch_size, block_size, 0,
                                               world_size, seed).next_batch()[0]
        assert not np.array_equal(following, first_of_epoch_0)


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_loader_resumes_exactly(tmp_path, rank, world_size):
    paths, _ = numbered_shards(tmp_path)
    original = chapter.ShardLoader(paths, 2, 4, rank, world_size, seed=3)
    for _ in range(13):                                   # past an epoch boundary
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # survives a checkpoint file
    resumed = chapter.ShardLoader(paths, 2, 4, rank, world_size, seed=3)
    resumed.load_state_dict(state)
    for _ in range(12):
        expected, got = original.next_batch(), resumed.next_batch()
        assert np.array_equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    changed = chapter.ShardLoader(paths, 3, 4, rank, world_size, seed=3)
    with pytest.raises(chapter.DataError, match="batch_size"):
        changed.load_state_dict(state)


def test_loader_bad_settings(tmp_path):
    paths, _ = numbered_shards(tmp_path)
    with pytest.raises(chapter.DataError, match="rank"):
        chapter.ShardLoader(paths, 2, 4, rank=2, world_size=2)
    with pytest.raises(chapter.DataError, match="too few"):
        chapter.ShardLoader(paths, 100, 64)


# ---------------------------------------------------------------- the chapter

def test_quick_run(tmp_path):
    run = run_chapter("09_data", "--quick", "--out", tmp_path, cwd=tmp_path)
    assert run.returncode == 0, run
    figures = run.summary
    assert figures["chapter"] == "09_data"
    assert figures["identical_ids"] and figures["round_trip"], run
    assert figures["shards_exact"] and figures["resume_exact"], run
    assert figures["vocab_size"] == 512
    assert figures["bytes_per_token"] > 2.0
    assert figures["exact_duplicates"] > 0
    assert figures["tiktoken_mb_s"] > figures["pure_python_mb_s"]
    if has_matplotlib():
        assert (tmp_path / "compression.png").exists() and (tmp_path / "minhash.png").exists()
    else:
        assert "text view instead" in run.stdout and "bytes/token on training" in run.stdout
    shards = tmp_path / "shards"
    assert (shards / "valid_000000.bin").exists() and (shards / "train_000001.bin").exists()
    # The written shards can be checked and streamed from the command line, and a
    # damaged one is refused there with a clear error.
    ok = run_chapter("09_data", "--shards", shards, cwd=tmp_path)
    assert ok.returncode == 0 and ok.summary["tokens"] == (figures["valid_tokens"]
                                                            + figures["train_tokens"]), ok
    corrupt(str(shards / "train_000002.bin"), "truncated")
    assert_clean_error(run_chapter("09_data", "--shards", shards, cwd=tmp_path),
                       "train_000002.bin", "wrong length")
    corrupt(str(shards / "train_000002.bin"), "magic")
    assert_clean_error(run_chapter("09_data", "--shards", shards, cwd=tmp_path), "bad magic")


def test_without_matplotlib_compression_is_printed_as_text(tmp_path):
    run = run_chapter("09_data", "--quick", "--vocab-size", "300", "--out", tmp_path,
                      cwd=tmp_path, env=without_matplotlib(tmp_path))
    assert run.returncode == 0 and run.summary["chapter"] == "09_data", run
    assert "matplotlib is not installed" in run.stdout, run
    assert "vocabulary    256:" in run.stdout, run
    assert not list(tmp_path.glob("*.png"))


def test_bad_inputs_exit_cleanly(tmp_path):
    assert_clean_error(run_chapter("09_data", "--vocab-size", "100", cwd=tmp_path),
                       "vocab-size", "257")
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "empty.txt").write_text("   \n\n", encoding="utf-8")
    (folder / "latin.txt").write_bytes("na\xefve caf\xe9".encode("latin-1"))
    run = run_chapter("09_data", "--data", folder, "--quick", cwd=tmp_path)
    assert_clean_error(run, "empty")
    assert "latin.txt" in run.stderr and "UTF-8" in run.stderr


@pytest.mark.parametrize("flags, words", [
    (["--vocab-size", "255"], "257"), (["--workers", "0"], "--workers"),
    (["--shard-tokens", "-5"], "--shard-tokens"), (["--valid-fraction", "1.0"], "valid-fraction"),
    (["--threshold", "0"], "threshold"), (["--block-size", "0"], "--block-size")])
def test_bad_flags_are_refused_before_any_work(flags, words):
    with pytest.raises(chapter.DataError, match=words):
        chapter.check_args(chapter.parse_args(flags))


def test_bad_single_files(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("r\xe9sum\xe9".encode("latin-1"))
    with pytest.raises(chapter.DataError, match="latin.txt is not valid UTF-8"):
        chapter.read_corpus(str(latin))
    with pytest.raises(chapter.DataError, match="does not exist"):
        chapter.read_corpus(str(tmp_path / "missing.txt"))
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(chapter.DataError, match="empty"):
        chapter.read_corpus(str(blank))
    with pytest.raises(chapter.DataError, match="at least 2"):
        chapter.split_validation(["only one document"], 0.1)
