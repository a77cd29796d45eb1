"""Tests of 00_intro.py: the set-up report (without importing triton), the bigram
model's probabilities and scores, and the chapter's quick run."""
import math
import numpy as np
import pytest

from conftest import (assert_clean_error, has_matplotlib, load_chapter, run_as_script,
                      run_chapter, without_matplotlib)

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
    assert summary["triton_mode"] in ("compiled", "interpreted", "unavailable")
    # On the Python documentation: bigram about 3.35 bits, unigram 4.67, uniform 6.69.
    assert summary["bigram_bits_per_char"] < 3.6
    assert summary["bigram_bits_per_char"] < summary["unigram_bits_per_char"] - 1.0
    assert summary["unigram_bits_per_char"] < summary["uniform_bits_per_char"]
    assert "00_intro.py" in run.stdout and "13_gpt.py" in run.stdout  # the course map
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
