"""Tests for 09_data.py: the BPE tokenizer (a hand-worked example, agreement with
tiktoken, exact round trips), deduplication, the shard format and its tokenizer
identity, streaming a corpus into shards (same ids as encoding it at once, memory
flat in the corpus size, a failed rerun harmless), the streaming loader (no token
skipped or repeated, any number of ranks, exact resume) and bad inputs."""
import json
import os
import shutil

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
    # The pure-Python encoder applies the same merges, earliest learned first.
    assert chapter.bpe_encode(" the bat", ranks) == [ranks[b" the"], ranks[b" b"], ranks[b"at"]]


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
    # <|endoftext|> then takes the next id, 260, not vocab_size - 1 = 279.
    assert chapter.make_encoding(ranks).eot_token == len(ranks) == 260


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
    assert chapter.clean_text("\n \n    indented\u2003\n") == "    indented"   # indentation stays
    assert chapter.clean_documents([("a", "one\n\n\n two\n")]) == ["one", " two"]
    assert chapter.clean_documents([("a", "one\n\ntwo"), ("b", "three")]) == ["one\n\ntwo", "three"]
    assert chapter.split_paragraphs("a\n \t\x00\n\u3000\nb\n\n\n") == ["a", "b"]


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
    # The figures the prose quotes for the chapter's 16 bands of 8 rows.
    assert [round(chapter.candidate_probability(s), digits) for s, digits in
            ((0.5, 2), (0.7, 2), (0.8, 2), (0.9, 5))] == [0.06, 0.61, 0.95, 0.99988]
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

@pytest.mark.parametrize("vocab_size, expected_dtype", [(4096, np.uint16), (65_536, np.uint16),
                                                        (100_000, np.uint32)])
def test_shard_round_trip(tmp_path, vocab_size, expected_dtype):
    tokens = np.random.default_rng(0).integers(0, vocab_size, size=1000)
    path = str(tmp_path / "train_000000.bin")
    digest = bytes(range(16))
    chapter.write_shard(path, tokens, vocab_size, digest)
    back = chapter.read_shard(path, vocab_size, digest)
    assert back.dtype == expected_dtype and np.array_equal(back, tokens)
    raw = open(path, "rb").read()
    assert chapter.SHARD_HEADER.size == 48
    fields = chapter.SHARD_HEADER.unpack(raw[:48])
    assert fields == (chapter.SHARD_MAGIC, 2, np.dtype(expected_dtype).itemsize, 1000,
                      vocab_size, digest)
    assert chapter.read_shard_header(path) == chapter.ShardHeader(*fields[1:])
    assert len(raw) == 48 + 1000 * np.dtype(expected_dtype).itemsize
    assert os.listdir(tmp_path) == ["train_000000.bin"]          # no temporary file left
    chapter.write_shard(path, [], vocab_size)                        # empty shards work too
    assert len(chapter.read_shard(path)) == 0


def test_tokenizer_digest_is_an_identity(tmp_path, trained):
    ranks, encoding = trained
    digest = chapter.tokenizer_digest(encoding)
    assert len(digest) == 16
    # The same training gives the same fingerprint; the saved file loads as the same
    # tokenizer; one merge fewer is another tokenizer.
    text = chapter.python_docs_text()[:60_000]
    assert chapter.tokenizer_digest(chapter.make_encoding(chapter.train_bpe(text, 600))) == digest
    chapter.save_merges(ranks, str(tmp_path / "tok.tiktoken"))
    loaded = chapter.load_tokenizer(str(tmp_path / "tok.tiktoken"))
    assert chapter.tokenizer_digest(loaded) == digest
    fewer = {piece: rank for piece, rank in ranks.items() if rank < len(ranks) - 1}
    assert chapter.tokenizer_digest(chapter.make_encoding(fewer)) != digest
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(chapter.DataError, match="not a tokenizer file"):
        chapter.load_tokenizer(str(tmp_path / "bad.tiktoken"))


def test_write_shards_layout(tmp_path, trained):
    _, encoding = trained
    documents = chapter.clean_documents([("docs", chapter.python_docs_text()[:30_000])])
    valid, train = chapter.split_validation(documents, 0.1)
    folder = str(tmp_path / "shards")
    valid_paths, train_paths = chapter.write_shards(valid, train, encoding, folder,
                                                    shard_tokens=2000, workers=1)
    assert [os.path.basename(path) for path in valid_paths] == ["valid_000000.bin"]
    assert os.path.basename(train_paths[0]) == "train_000000.bin"
    lengths = [len(chapter.read_shard(path)) for path in train_paths]
    assert lengths[:-1] == [2000] * (len(lengths) - 1) and 0 < lengths[-1] <= 2000
    stream = np.concatenate([chapter.read_shard(path) for path in valid_paths + train_paths])
    assert int((stream == encoding.eot_token).sum()) == len(documents)
    assert stream[-1] == encoding.eot_token                    # end-of-text after each document
    assert encoding.decode(stream.tolist()) == "".join(document + chapter.END_OF_TEXT
                                                       for document in valid + train)
    # The manifest names the splits and the tokenizer; the saved tokenizer is this one.
    shard_set = chapter.read_manifest(folder, encoding.n_vocab, chapter.tokenizer_digest(encoding))
    assert shard_set["valid"] == valid_paths and shard_set["train"] == train_paths
    assert shard_set["tokenizer"]["end_of_text"] == encoding.eot_token
    saved = chapter.load_tokenizer(shard_set["tokenizer"]["file"])
    assert chapter.tokenizer_digest(saved) == chapter.tokenizer_digest(encoding)
    assert sorted(os.listdir(tmp_path)) == ["shards"]               # no staging folder left


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
    elif kind == "itemsize":
        raw[12] = 4                                # 4-byte ids for a 4,096-token vocabulary
    elif kind == "largest id":
        raw[-2:] = (5000).to_bytes(2, "little")    # an id the vocabulary does not have
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("kind, words", [("truncated", "wrong length"), ("magic", "bad magic"),
                                         ("length", "wrong length"), ("version", "version"),
                                         ("header", "truncated"), ("itemsize", "damaged header"),
                                         ("largest id", "id 5000, not below")])
def test_bad_shards_are_refused(tmp_path, kind, words):
    path = str(tmp_path / "train_000000.bin")
    chapter.write_shard(path, np.arange(100), 4096)
    corrupt(path, kind)
    with pytest.raises(chapter.DataError, match=words):
        chapter.read_shard(path)
    with pytest.raises(chapter.DataError, match=words):
        chapter.ShardLoader([path], batch_size=1, block_size=4)


def test_shards_of_another_tokenizer_are_refused(tmp_path):
    first, second = str(tmp_path / "train_000000.bin"), str(tmp_path / "train_000001.bin")
    chapter.write_shard(first, np.arange(100), 4096, b"A" * 16)
    chapter.write_shard(second, np.arange(100), 4096, b"B" * 16)
    assert len(chapter.read_shard(first, 4096, b"A" * 16)) == 100
    with pytest.raises(chapter.DataError, match="another tokenizer"):
        chapter.read_shard(first, 4096, b"B" * 16)                 # another fingerprint
    with pytest.raises(chapter.DataError, match="another tokenizer"):
        chapter.read_shard(first, 50_257, b"A" * 16)               # another vocabulary
    with pytest.raises(chapter.DataError, match="another tokenizer"):
        chapter.check_shards([first, second])                      # a mixed set
    with pytest.raises(chapter.DataError, match="token ids .* must lie in 0..99"):
        chapter.write_shard(first, [5, 100], 100)                  # refused when written


# ---------------------------------------------------------------- streaming a corpus

def write_corpus(path, megabytes, seed=0, duplicate_every=50):
    """A generated corpus of `megabytes` (within a paragraph), one .txt file:
    paragraphs of 50 to 500 random words from a vocabulary of 3,000 made-up words, one
    blank line between them, and every `duplicate_every`-th paragraph a copy of an
    earlier one. Returns the number of copies."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, size=rng.integers(2, 9)))
                      for _ in range(3000)])
    paragraphs, size, copies = [], 0, 0
    while size < megabytes * 1e6:
        if paragraphs and len(paragraphs) % duplicate_every == 0:
            paragraph = paragraphs[int(rng.integers(len(paragraphs)))]
            copies += 1
        else:
            paragraph = " ".join(words[rng.integers(0, len(words), rng.integers(50, 500))]) + "."
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n\n".join(paragraphs) + "\n")
    return copies


def test_file_paragraphs_cut_as_the_whole_text_is_cut(tmp_path):
    # Blank lines of every kind that cleaning empties (spaces, tabs, exotic spaces,
    # control characters, Windows line endings), indented paragraphs and trailing
    # spaces: read a few characters at a time, the cut must be the whole text's.
    rng = np.random.default_rng(3)
    pieces = ["word", " ", "  ", "\t", "\n", "\n\n", "\n \n", "\n\t\x00\n", "\r\n\r\n",
              "\n\u00a0\u3000\n", "\n\n\n\n", "  indented", "trailing   ", "é", "e\u0301",
              "\x1b", "\u2028", "<|endoftext|>"]
    for trial in range(20):
        text = "".join(rng.choice(pieces, size=200))
        path = tmp_path / f"corpus{trial}.txt"
        path.write_bytes(text.encode("utf-8"))
        whole = chapter.split_paragraphs(open(path, encoding="utf-8").read())
        for size in (1, 7, 64):
            assert list(chapter.stream_documents(str(path), piece_characters=size)) == whole


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """A 1 MB generated corpus with 2% exact copies: (path, number of copies)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    return str(path), write_corpus(str(path), 1.0)


@pytest.mark.parametrize("workers", [1, 2])
def test_shard_documents_round_trip(tmp_path, trained, corpus_file, workers):
    _, encoding = trained
    path, copies = corpus_file
    folder = str(tmp_path / "shards")
    result = chapter.shard_documents(chapter.stream_documents(path), encoding, folder,
                                     shard_tokens=30_000, valid_fraction=0.1, workers=workers)
    assert result["exact_duplicates"] == copies
    # The streamed shards hold exactly the ids of encoding each split's documents at
    # once, in order, with <|endoftext|> after every document.
    counts = chapter.Counter()
    routed = list(chapter.route_documents(chapter.stream_documents(path), 0.1, counts))
    shard_set = chapter.read_manifest(folder, encoding.n_vocab, chapter.tokenizer_digest(encoding))
    for split in ("train", "valid"):
        documents = [document for where, document in routed if where == split]
        tokens = np.concatenate([chapter.read_shard(name) for name in shard_set[split]])
        assert np.array_equal(tokens, chapter.encode_documents(encoding, documents)), split
        assert int((tokens == encoding.eot_token).sum()) == len(documents)
        assert result[split + "_documents"] == len(documents)
        assert result[split + "_tokens"] == len(tokens)
    lengths = [len(chapter.read_shard(name)) for name in shard_set["train"]]
    assert lengths[:-1] == [30_000] * (len(lengths) - 1)
    assert 0.05 < result["valid_documents"] / (result["valid_documents"]
                                                + result["train_documents"]) < 0.15
    assert counts["exact_duplicates"] == copies and result["mb_s"] > 0


def test_failed_rerun_leaves_the_shards_alone(tmp_path, trained, corpus_file):
    _, encoding = trained
    folder = str(tmp_path / "shards")
    chapter.shard_documents(chapter.stream_documents(corpus_file[0]), encoding, folder,
                            20_000, 0.1)
    before = {name: open(os.path.join(folder, name), "rb").read()
              for name in os.listdir(folder)}
    # A rerun that fails after encoding (no document falls into validation) ...
    with pytest.raises(chapter.DataError, match="no document went to the validation"):
        chapter.shard_documents(iter(["a short document", "another one"]), encoding,
                                folder, 20_000, 1e-12)
    # ... and one stopped half-way by an error in the input, after shards were written.
    def broken():
        yield from chapter.stream_documents(corpus_file[0])
        raise OSError("disk gone")
    with pytest.raises(OSError):
        chapter.shard_documents(broken(), encoding, folder, 1_000, 0.1)
    after = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    assert after == before and sorted(os.listdir(tmp_path)) == ["shards"]
    # A successful rerun replaces the set whole: no shard of the old one is left.
    chapter.shard_documents(iter(["one document here", "and another"] * 3), encoding,
                            folder, 20_000, 0.5)
    assert sorted(os.listdir(folder)) == ["manifest.json", "tokenizer.tiktoken",
                                          "train_000000.bin", "valid_000000.bin"]


def test_stream_documents_jsonl_folders_and_bad_files(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "First\r\n\r\nstill first"}) + "\n\n"
                                      + json.dumps({"text": "Second", "id": 2}) + "\n"
                                      + "not json\n" + json.dumps({"text": "lost"}) + "\n")
    (tmp_path / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "sub" / "c.txt").write_text("One file,\n\nthree  \n\nparagraphs, one document.\n")
    (tmp_path / "notes.md").write_text("not read")
    documents = list(chapter.stream_documents(str(tmp_path)))
    assert documents == ["First\n\nstill first", "Second",
                         "One file,\n\nthree\n\nparagraphs, one document."]
    errors = capsys.readouterr().err
    assert "a.jsonl: line 4" in errors and "b.txt" in errors and "UTF-8" in errors
    (tmp_path / "empty").mkdir()
    with pytest.raises(chapter.DataError, match="no .txt or .jsonl"):
        chapter.corpus_files(str(tmp_path / "empty"))


def shard_corpus(tmp_path, corpus, *flags):
    return run_chapter("09_data", "--shard-corpus", corpus, "--out", tmp_path / "out",
                       "--workers", "1", *flags, cwd=tmp_path)


def test_shard_corpus_command_line(tmp_path, corpus_file):
    path, copies = corpus_file
    run = shard_corpus(tmp_path, path, "--vocab-size", "600", "--bpe-sample-mb", "0.3",
                       "--shard-tokens", "50000")
    assert run.returncode == 0, run
    figures = run.summary
    assert figures["mode"] == "shard-corpus" and figures["tokenizer"] == "course-bpe"
    assert figures["exact_duplicates"] == copies and figures["vocab_size"] == 600
    assert figures["shard_mb_s"] > 0 and "MB/s" in run.stdout
    folder = tmp_path / "out" / "shards"
    tokenizer_file = folder / "tokenizer.tiktoken"
    assert figures["train_shards"] == len(list(folder.glob("train_*.bin")))
    # A second corpus sharded with the saved tokenizer file carries the same identity,
    # and the --shards run checks and streams the set.
    again = run_chapter("09_data", "--shard-corpus", path, "--tokenizer", tokenizer_file,
                        "--out", tmp_path / "again", "--workers", "1", cwd=tmp_path)
    assert again.returncode == 0, again
    assert again.summary["tokenizer_digest"] == figures["tokenizer_digest"]
    assert again.summary["tokenizer"] == "course-bpe"          # the manifest's name
    inspected = run_chapter("09_data", "--shards", folder, cwd=tmp_path)
    assert inspected.returncode == 0, inspected
    assert inspected.summary["tokens"] == figures["train_tokens"] + figures["valid_tokens"]
    # A damaged shard, or a tokenizer file swapped for another, is refused there.
    chapter.save_merges({bytes([value]): value for value in range(256)}, str(tokenizer_file))
    assert_clean_error(run_chapter("09_data", "--shards", folder, cwd=tmp_path),
                       "fingerprint differs")
    corrupt(str(folder / "train_000001.bin"), "largest id")
    assert_clean_error(run_chapter("09_data", "--shards", folder, cwd=tmp_path), "not below")


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    # The same run on 2 MB and on 20 MB of text: the tokenizer is trained on the same
    # 0.5 MB sample and the shards are 100,000 tokens, so only the set of document
    # fingerprints may grow (about 70 bytes for each of some 9,000 more documents).
    peaks = {}
    for megabytes in (2, 20):
        corpus = tmp_path / f"corpus{megabytes}.txt"
        write_corpus(str(corpus), megabytes, seed=megabytes)
        (tmp_path / str(megabytes)).mkdir()
        run = shard_corpus(tmp_path / str(megabytes), corpus, "--vocab-size", "1024",
                           "--bpe-sample-mb", "0.5", "--shard-tokens", "100000")
        assert run.returncode == 0, run
        assert run.summary["bytes"] > megabytes * 1e6 * 0.99
        peaks[megabytes] = run.summary["peak_memory_mb"]
        print(f"{megabytes} MB: {run.summary['shard_mb_s']} MB/s, peak {peaks[megabytes]} MB")
        shutil.rmtree(tmp_path / str(megabytes))
    if peaks[2] is None:
        pytest.skip("no resource module here (Windows): peak memory is not measured")
    assert peaks[20] <= 1.2 * peaks[2], peaks
    assert peaks[20] - peaks[2] < 0.25 * 18, peaks      # far less than the 18 MB more text


def test_shard_corpus_bad_inputs(tmp_path, corpus_file):
    path, _ = corpus_file
    # GPT-2's files are not cached in this empty folder and the network is off: one
    # sentence, and nothing written.
    assert_clean_error(shard_corpus(tmp_path, path, "--tokenizer", "gpt2"),
                       "GPT-2's tokenizer", "offline")
    assert not (tmp_path / "out" / "shards").exists()
    assert_clean_error(shard_corpus(tmp_path, tmp_path / "missing.txt"), "does not exist")
    assert_clean_error(shard_corpus(tmp_path, path, "--tokenizer", "no-such-file"),
                       "--tokenizer")
    (tmp_path / "empty").mkdir()
    assert_clean_error(shard_corpus(tmp_path, tmp_path / "empty"), "no .txt or .jsonl")
    foreign = tmp_path / "out" / "shards"
    foreign.mkdir(parents=True)
    (foreign / "notes.md").write_text("mine")
    assert_clean_error(shard_corpus(tmp_path, path), "notes.md", "not a shard")
    assert (foreign / "notes.md").read_text() == "mine"


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
    # Speed is printed (and belongs in benchmarks); what a test checks is that the two
    # encoders agree (identical_ids above) and that both speeds were measured.
    assert figures["tiktoken_mb_s"] > 0 and figures["pure_python_mb_s"] > 0
    assert figures["streamed_exact"], run           # streaming gives the in-memory ids
    if has_matplotlib():
        assert (tmp_path / "compression.png").exists() and (tmp_path / "minhash.png").exists()
    else:
        assert "text view instead" in run.stdout and "bytes/token on training" in run.stdout
    shards = tmp_path / "shards"
    assert (shards / "valid_000000.bin").exists() and (shards / "train_000000.bin").exists()
    assert (shards / "manifest.json").exists() and (shards / "tokenizer.tiktoken").exists()
    # The written shards can be checked and streamed from the command line, and a
    # damaged one is refused there with a clear error.
    ok = run_chapter("09_data", "--shards", shards, cwd=tmp_path)
    assert ok.returncode == 0 and ok.summary["tokens"] == (figures["valid_tokens"]
                                                            + figures["train_tokens"]), ok
    corrupt(str(shards / "train_000001.bin"), "truncated")
    assert_clean_error(run_chapter("09_data", "--shards", shards, cwd=tmp_path),
                       "train_000001.bin", "wrong length")
    corrupt(str(shards / "train_000001.bin"), "magic")
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
    (["--threshold", "0"], "threshold"), (["--block-size", "0"], "--block-size"),
    (["--bpe-sample-mb", "0"], "--bpe-sample-mb"), (["--tokenizer", "gpt2"], "--shard-corpus"),
    (["--shard-corpus", "x.txt", "--shards", "out/shards"], "give one"),
    (["--shard-corpus", "no/such/corpus"], "does not exist")])
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
