"""Tests of 00_intro.py: the set-up report (without importing triton), the held-out
cut shared with chapters 04 and 13, the bigram model's probabilities and scores, bits
per byte, and the chapter's quick run."""
import collections
import importlib.metadata
import inspect
import math
import os

import numpy as np
import pytest
import torch

from conftest import (ROOT, assert_clean_error, chapter_path, has_matplotlib,
                      load_chapter, run_as_script, run_chapter, without_matplotlib)

chapter = load_chapter("00_intro")


def test_versions_and_triton_mode(monkeypatch):
    # Importing chapter 12 or 13 elsewhere in the test run sets TRITON_INTERPRET=1 for
    # this process; a GPU machine without it compiles, and with it interprets.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    versions = chapter.package_versions()
    assert set(versions) == {"python", "numpy", "torch", "triton", "tiktoken"}
    assert versions["numpy"] == np.__version__
    assert chapter.triton_mode({"triton": "not installed"}, "H100").startswith("unavailable")
    assert chapter.triton_mode({"triton": "3.6.0"}, None).startswith("interpreted")
    assert chapter.triton_mode({"triton": "3.6.0"}, "NVIDIA H100").startswith("compiled")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert chapter.triton_mode({"triton": "3.6.0"}, "NVIDIA H100").startswith("interpreted")


def test_bigram_probabilities_count_and_smooth():
    vocabulary = ["a", "b", "c"]
    ids = chapter.encode("abab", vocabulary)
    np.testing.assert_array_equal(ids, [0, 1, 0, 1])
    probabilities = chapter.bigram_probabilities(ids, 3, alpha=1.0)
    # After "a": "b" twice, so (0+1, 2+1, 0+1) / 5; "c" never seen: uniform.
    np.testing.assert_allclose(probabilities[0], [0.2, 0.6, 0.2])
    np.testing.assert_allclose(probabilities[2], [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1)
    sharp = chapter.bigram_probabilities(ids, 3, alpha=1e-9)
    np.testing.assert_allclose(sharp[0], [0, 1, 0], atol=1e-8)
    # A text the counts predict perfectly costs almost nothing; uniform costs log V.
    assert chapter.bits(chapter.bigram_nats(sharp, ids)) < 1e-6
    assert chapter.unigram_nats(ids, np.array([0, 1, 2]), 3, 1e9) == pytest.approx(math.log(3))


def test_held_out_text_is_the_last_tenth_cut_at_a_line_break():
    text = "".join(f"line {number:02d}\n" for number in range(10))   # 10 lines of 8
    train, held_out = chapter.hold_out_validation([text])
    # 90% of 80 characters is 72, which falls at the start of line 09: the cut.
    assert train == [text[:72]] and held_out == [text[72:]] == ["line 09\n"]
    # Mid-line, the cut moves back to the line break before it.
    train, held_out = chapter.hold_out_validation(["ab\ncdefghij"])
    assert train == ["ab\n"] and held_out == ["cdefghij"]
    # No line break at all: the cut stays at 90%.
    assert chapter.hold_out_validation(["x" * 20]) == (["x" * 18], ["xx"])
    # Several documents: the last 10% of all their characters, later documents whole.
    documents = ["a\n" * 30, "b\n" * 10, "c\n" * 10, "d\n" * 5]   # 110 characters
    train, held_out = chapter.hold_out_validation(documents)
    assert train == ["a\n" * 30, "b\n" * 10, "c\n" * 9]             # 99 characters
    assert held_out == ["c\n", "d\n" * 5]


def test_default_text_and_held_out_cut_are_chapter_13s():
    # The scoreboard compares 00, 04 and 13 on the same held-out text only while the
    # three load the same default text and cut it with the same function; 13 is
    # read as text, not imported.
    gpt_source = (ROOT / "13_gpt.py").read_text(encoding="utf-8")
    for function in (chapter.python_docs_text, chapter.load_text, chapter.hold_out_validation):
        assert inspect.getsource(function) in gpt_source, function.__name__
    assert "VALIDATION_FRACTION = 0.1\n" in gpt_source


def test_bits_per_byte_counts_utf8_bytes_and_the_scoreboard_is_ordered():
    assert chapter.bits_per_byte(2.0, "plain ascii") == pytest.approx(2.0)
    # "é" is two bytes in UTF-8 and "→" three: 3 characters, 6 bytes.
    assert chapter.bits_per_byte(2.0, "é→a") == pytest.approx(2.0 * 3 / 6)
    lines = chapter.scoreboard([("bigram", 3.3), ("uniform", 6.7), ("network", 2.4)])
    assert [line.split()[0] for line in lines] == ["uniform", "bigram", "network"]
    assert lines[0].endswith("6.700")


def test_sample_follows_the_counts():
    vocabulary = ["a", "b"]
    probabilities = np.array([[0.0, 1.0], [1.0, 0.0]])
    sample = chapter.sample_bigram(probabilities, vocabulary, "a", 6, np.random.default_rng(0))
    assert sample == "bababa"


def test_quick_run_counting_beats_frequencies(tmp_path):
    # A stand-in triton package that fails on import, first on the path: the set-up
    # check must read triton's version without importing it.
    (tmp_path / "fake" / "triton").mkdir(parents=True)
    (tmp_path / "fake" / "triton" / "__init__.py").write_text(
        "raise ImportError('00_intro.py must not import triton')\n")
    run = run_chapter("00_intro", "--quick", "--out", tmp_path, cwd=tmp_path,
                      env={"PYTHONPATH": str(tmp_path / "fake")})
    assert run.returncode == 0, run
    summary = run.summary
    assert summary["chapter"] == "00_intro" and summary["source"] == "python-docs"
    assert "could not download" in run.stderr
    # The set-up report says what this machine will really do with Triton: here the
    # expectation is worked out from the installed metadata and torch, independently
    # of the chapter's own `triton_mode`.
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    has_gpu = torch.cuda.is_available()
    expected_mode = ("unavailable" if triton_version == "not installed" else
                     "compiled" if has_gpu and os.environ.get("TRITON_INTERPRET") != "1" else
                     "interpreted")
    assert summary["triton_mode"] == expected_mode, run
    assert summary["triton"] == triton_version and summary["torch"] == torch.__version__
    assert (summary["device"] == "cpu") == (not has_gpu)
    # The scoreboard's held-out text: the last 10% of the Python documentation, cut at
    # the line break before the 90% mark, worked out here without the chapter.
    text = chapter.python_docs_text()
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    held_out = text[cut:]
    assert summary["held_out_bytes"] == len(held_out.encode("utf-8")) == 46607
    # The bigram's bits per byte by its definition, with plain counting: add-one
    # smoothed pair counts from the text before the cut, -log2 P(char | previous char)
    # summed over every held-out character, divided by the held-out UTF-8 bytes.
    vocabulary = sorted(set(text))
    pairs = collections.Counter(zip(text[:cut - 1], text[1:cut]))
    followers = collections.Counter(text[:cut - 1])
    total_bits = sum(-math.log2((pairs[previous, character] + 1)
                                / (followers[previous] + len(vocabulary)))
                     for previous, character in zip(text[cut - 1:-1], held_out))
    assert summary["bigram_bits_per_byte"] == pytest.approx(
        total_bits / len(held_out.encode("utf-8")), abs=5e-4)
    # The figures the chapter states: bigram 3.35 bits per byte, unigram 4.66,
    # uniform 6.67 (the held-out text has a few non-ASCII characters, so per byte is
    # a little below per character); counting pairs saves more than a bit.
    assert summary["bigram_bits_per_byte"] == pytest.approx(3.35, abs=0.01)
    assert summary["unigram_bits_per_byte"] == pytest.approx(4.66, abs=0.01)
    assert summary["uniform_bits_per_byte"] == pytest.approx(math.log2(103) * 46521 / 46607,
                                                             abs=1e-3)
    assert summary["bigram_bits_per_byte"] < summary["unigram_bits_per_byte"] - 1.0
    assert summary["bigram_bits_per_byte"] < summary["bigram_bits_per_char"]
    assert "the text scoreboard" in run.stdout and "bigram counts (00)" in run.stdout
    # The course map marks with "*" every chapter file that is in the folder (the
    # folder of the file under test: an exercise copy's folder holds the copies made).
    for path in chapter_path("00_intro").parent.glob("[0-9][0-9]*_*.py"):
        assert f"* {path.name}" in run.stdout, path.name
    # The plot where matplotlib is installed, the text view where it is not.
    if has_matplotlib():
        assert (tmp_path / "00_intro_bigrams.png").is_file(), run
    else:
        assert "matplotlib is not installed" in run.stdout, run


def test_without_matplotlib_prints_a_text_view(tmp_path):
    run = run_chapter("00_intro", "--quick", "--out", tmp_path / "out", cwd=tmp_path,
                      env=without_matplotlib(tmp_path))
    assert run.returncode == 0 and run.summary["chapter"] == "00_intro", run
    assert "matplotlib is not installed" in run.stdout, run
    assert "the likeliest next character" in run.stdout, run
    assert not list(tmp_path.glob("out/*.png")), run


def test_bad_inputs_are_refused(tmp_path):
    missing = run_chapter("00_intro", "--data", tmp_path / "none.txt", cwd=tmp_path)
    assert_clean_error(missing, "does not exist")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00text")
    with pytest.raises(Exception, match="UTF-8") as refused:
        run_as_script("00_intro", "--data", binary, "--out", tmp_path / "out")
    assert type(refused.value).__name__ == "DataError"
    with pytest.raises(chapter.DataError, match="--alpha"):
        chapter.parse_args(["--alpha", "0"])
