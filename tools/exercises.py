"""Try it yourself: exercises cut from the chapters, graded by the chapters' own tests.

The chapters are the solutions. An exercise is a region of a chapter between two
comment lines, the task in one sentence on the first:

    def mse_grad(actual, predicted):
        # exercise: the gradient of the MSE with respect to the predictions
        return 2 * (predicted - actual) / len(actual)
        # end exercise

A region is the body of a function, or a contiguous block inside one. The exercise is
named after the chapter and the function around it (`02_linreg.mse_grad`; a second
region in the same function gets `.2`). Where a later chapter carries the same code, it
carries the same marker lines too, and the exercise stays the earlier chapter's: a region
whose exact text an earlier chapter already holds is not an exercise again.

    python tools/exercises.py list              every exercise and how your copy stands
    python tools/exercises.py make 02_linreg    write exercises/02_linreg.py to fill in
    python tools/exercises.py check 02_linreg   grade it with the chapter's own tests

`make` writes the chapter with every exercise's lines replaced by
`raise NotImplementedError("exercise <name>: <task>")`, markers kept, everything else
unchanged, so the file runs until it reaches the first exercise. It never overwrites a
copy you have edited (it keeps a hash of what it wrote in exercises/.made.json) unless
given --force. `check` runs `pytest tests/test_<chapter>.py --chapter <your copy>`;
a failing test names the exercise it reached.

TESTS below names, for each exercise, one fast test of the chapter that exercises it;
the suite proves that each exercise, stubbed alone, fails that test.
"""
import argparse
import ast
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START = re.compile(r"^(\s*)# exercise: (.+?)\s*$")
END = re.compile(r"^\s*# end exercise\s*$")
STUB_MESSAGE = re.compile(r"exercise (\S+?): ")

# One fast test per exercise: the function's name in tests/test_<chapter>.py. Parametrized
# tests run each parameter set until one fails.
TESTS = {
    "00_intro.bigram_probabilities": "test_bigram_probabilities_count_and_smooth",
    "00_intro.sample_bigram": "test_sample_follows_the_counts",
    "01_linalg.dot": "test_dot_and_matmul_by_loops_match_numpy",
    "01_linalg.matmul_by_loops": "test_dot_and_matmul_by_loops_match_numpy",
    "01_linalg.slope": "test_slope_matches_exact_derivatives",
    "01_linalg.least_squares_line": "test_least_squares_line_recovers_an_exact_line",
    "02_linreg.mse_grad": "test_mse_grad_matches_finite_differences_and_autograd",
    "02_linreg.linear_backward": "test_linear_backward_matches_finite_differences",
    "02_linreg.train": "test_gradient_descent_reaches_least_squares",
    "03_dense.init_dense": "test_init_dense_shapes_and_he_scale",
    "03_dense.dense_forward": "test_forward_is_relu_between_layers_and_linear_at_the_end",
    "03_dense.dense_backward": "test_backpropagation_matches_finite_differences",
    "04_classify.binary_cross_entropy_grad": "test_loss_gradients_through_the_network",
    "04_classify.softmax": "test_sigmoid_and_softmax_are_stable_at_extreme_logits",
    "04_classify.cross_entropy_grad": "test_loss_gradients_through_the_network",
    "04b_cnn.conv_forward": "test_im2col_and_loop_convolutions_agree",
    "04b_cnn.conv_backward": "test_convolution_gradients_against_finite_differences_and_torch",
    "04b_cnn.max_pool_backward": "test_max_pool_against_finite_differences_and_torch",
    "05_rnn.rnn_forward": "test_rnn_forward_and_backward_match_torch_autograd",
    "05_rnn.rnn_backward": "test_rnn_backward_matches_finite_differences",
    "05_rnn.clip_by_global_norm": "test_clip_by_global_norm_keeps_direction_and_caps_length",
    "05b_gru.gru_forward": "test_gru_forward_and_backward_match_torch_autograd",
    "05b_gru.gru_backward": "test_gru_backward_matches_finite_differences",
    "06_autograd.Tensor.__mul__.backward": "test_gradient_matches_torch",
    "06_autograd.Tensor.__matmul__.backward": "test_gradient_matches_torch",
    "06_autograd.Tensor.tanh.backward": "test_gradient_matches_torch",
    "06_autograd.Tensor.backward": "test_worked_example_in_the_text",
    "06_autograd.topological_order": "test_worked_example_in_the_text",
    "07_pytorch.DenseNet.forward": "test_dense_predictions_and_gradients_match_numpy",
    "07_pytorch.train_torch": "test_sgd_replay_trains_like_numpy",
    "08_regularize.dropout": "test_dropout_statistics_match_nn_dropout",
    "08_regularize.layer_norm_forward": "test_layer_norm_forward_and_backward_match_torch",
    "08_regularize.layer_norm_backward": "test_layer_norm_forward_and_backward_match_torch",
    "09_data.train_bpe": "test_train_bpe_reproduces_hand_worked_merges",
    "09_data.bpe_encode": "test_train_bpe_reproduces_hand_worked_merges",
    "10_seq2seq.Encoder.forward": "test_padding_changes_nothing",
    "10_seq2seq.AdditiveAttention.forward": "test_additive_attention_weights_sum_to_one_and_skip_padding",
    "11_transformer.attention_weights": "test_scaled_dot_product_attention_matches_pytorch",
    "11_transformer.MultiHeadAttention.forward": "test_multi_head_attention_matches_torch_with_the_same_weights",
    "11_transformer.Transformer.decode": "test_decoder_cannot_see_the_future",
    "12_triton._softmax_forward_kernel": "test_softmax_one_block_and_online_loop",
    "12_triton._softmax_forward_kernel.2": "test_softmax_one_block_and_online_loop",
    "12_triton._attend_to_blocks": "test_flash_attention_forward_backward",
    "12_triton._matmul_kernel": "test_matmul_forward_backward_and_strided_inputs",
    "13_gpt.apply_rope": "test_rotary_positions_keep_the_dtype_under_bf16_autocast",
    "13_gpt.CausalSelfAttention.forward": "test_kv_cache_gives_the_same_logits_as_a_full_pass",
    "13_gpt.train_step": "test_a_step_in_micro_batches_matches_one_step_on_the_whole_batch",
}


class ExerciseError(Exception):
    """A problem the learner can fix (a bad chapter name, an edited copy): one sentence."""


class Exercise:
    """One region: where it is in its chapter, its name, its task and its lines."""

    def __init__(self, chapter, name, task, start, end, indent, text):
        self.chapter, self.name, self.task = chapter, name, task
        self.start, self.end = start, end      # line indexes of the two marker lines
        self.indent, self.text = indent, text  # the region's text, markers included

    @property
    def stub(self):
        """The line that stands in for the solution: it says which exercise it is."""
        message = f"exercise {self.name}: {self.task}"
        return f"{self.indent}raise NotImplementedError({message!r})\n"

    @property
    def test(self):
        return TESTS.get(self.name)


def chapter_names():
    """The chapters, by file name without `.py`, in course order."""
    return sorted(path.stem for path in ROOT.glob("[0-9][0-9]*_*.py"))


def chapter_path(chapter):
    path = ROOT / f"{chapter}.py"
    if not path.is_file():
        raise ExerciseError(f"there is no chapter {chapter!r}; "
                            f"`python tools/exercises.py list` shows them")
    return path


def enclosing_functions(source):
    """(first line, last line, qualified name) of every function, so that a region is
    named after the function it sits in, not after a number that shifts."""
    spans = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    spans.append((child.lineno, child.end_lineno, name))
                visit(child, name + ".")
            else:
                visit(child, prefix)
    visit(ast.parse(source), "")
    return spans


def find_regions(chapter, source):
    """Every marked region in `source` (a chapter's text, or a learner's copy of it).
    A marker without its end, or a region outside any function, is an error in the
    chapter, reported with its line."""
    lines = source.splitlines(keepends=True)
    spans = enclosing_functions(source)
    regions, counts, open_at = [], {}, None
    for index, line in enumerate(lines):
        if START.match(line):
            if open_at is not None:
                raise ExerciseError(f"{chapter}.py line {index + 1}: an exercise starts "
                                    f"inside the one at line {open_at + 1}")
            open_at = index
        elif END.match(line):
            if open_at is None:
                raise ExerciseError(f"{chapter}.py line {index + 1}: `# end exercise` "
                                    f"without its `# exercise:` line")
            indent, task = START.match(lines[open_at]).groups()
            inside = [span for span in spans if span[0] <= open_at + 1 <= span[1]]
            if not inside:
                raise ExerciseError(f"{chapter}.py line {open_at + 1}: an exercise must "
                                    f"sit inside a function")
            function = max(inside, key=lambda span: span[0])[2]  # the innermost
            counts[function] = counts.get(function, 0) + 1
            name = f"{chapter}.{function}" + (f".{counts[function]}"
                                              if counts[function] > 1 else "")
            regions.append(Exercise(chapter, name, task, open_at, index, indent,
                                    "".join(lines[open_at:index + 1])))
            open_at = None
    if open_at is not None:
        raise ExerciseError(f"{chapter}.py line {open_at + 1}: the exercise has no "
                            f"`# end exercise` line")
    return regions


def exercises_of(chapter):
    """The chapter's own exercises: its regions less those an earlier chapter already
    holds word for word (carried code stays the exercise of the chapter that wrote it)."""
    source = chapter_path(chapter).read_text(encoding="utf-8")
    earlier = [(ROOT / f"{name}.py").read_text(encoding="utf-8")
               for name in chapter_names() if name < chapter]
    return [region for region in find_regions(chapter, source)
            if not any(region.text in text for text in earlier)]


def all_exercises():
    return [exercise for chapter in chapter_names() for exercise in exercises_of(chapter)]


def learner_source(chapter, only=None):
    """The chapter with its exercises (or just the one named `only`) replaced by stubs.
    The markers stay, so the learner sees where to write and `list` finds the region."""
    lines = chapter_path(chapter).read_text(encoding="utf-8").splitlines(keepends=True)
    chosen = [exercise for exercise in exercises_of(chapter)
              if only is None or exercise.name == only]
    if only is not None and not chosen:
        raise ExerciseError(f"{chapter} has no exercise {only!r}")
    for exercise in reversed(chosen):
        lines[exercise.start + 1:exercise.end] = [exercise.stub]
    source = "".join(lines)
    compile(source, f"{chapter}.py", "exec")  # a region that is no block fails here
    return source


def digest(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make(chapter, out, force=False):
    """Write the learner's copy of `chapter` into `out`. A copy that differs from what
    `make` wrote last time has the learner's work in it: keep it unless forced."""
    out = Path(out)
    target, record_path = out / f"{chapter}.py", out / ".made.json"
    source = learner_source(chapter)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if target.is_file() and not force:
        current = digest(target.read_text(encoding="utf-8"))
        if current not in (record.get(target.name), digest(source)):
            raise ExerciseError(f"{target} has your edits; `make {chapter} --force` "
                                f"replaces it with a fresh copy")
    out.mkdir(parents=True, exist_ok=True)
    target.write_text(source, encoding="utf-8")
    record[target.name] = digest(source)
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return target


def test_node(exercise):
    return f"tests/test_{exercise.chapter}.py::{exercise.test}"


def run_tests(nodes, copies):
    """Run pytest on `nodes` with each chapter in `copies` swapped for the given file;
    returns {test function name: failure text or None}, parameter sets merged."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={report}", *nodes]
        for path in copies:
            command += ["--chapter", str(path)]
        subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if not report.is_file():
            return {}
        results = {}
        for case in ElementTree.parse(report).iter("testcase"):
            name = case.get("name").split("[")[0]
            problem = case.find("failure")
            problem = problem if problem is not None else case.find("error")
            text = None if problem is None else (problem.get("message", "") + (problem.text or ""))
            results[name] = results.get(name) or text
        return results


def status_of(exercise, copy_regions, results):
    """How the learner's copy of one exercise stands, in a word or two."""
    if copy_regions is None:
        return "not made"
    region = copy_regions.get(exercise.name)
    if region is None:
        return "markers missing"
    if region.text.splitlines()[1:-1] == [exercise.stub.rstrip("\n")]:
        return "stub"
    outcome = results.get(exercise.test, "not run")
    if outcome is None:
        return "passes"
    if outcome == "not run":
        return "edited"
    waiting = [name for name in STUB_MESSAGE.findall(outcome) if name != exercise.name]
    return f"fails (needs {waiting[0]} first)" if waiting else "fails"


def list_exercises(out, run=True):
    """One line an exercise. Edited copies are graded with each exercise's own test
    (one pytest run a chapter), so `list` shows what passes already."""
    rows = []
    for chapter in chapter_names():
        exercises = exercises_of(chapter)
        copy = Path(out) / f"{chapter}.py"
        regions, results = {}, {}
        if copy.is_file():
            regions = {region.name: region for region in
                       find_regions(chapter, copy.read_text(encoding="utf-8"))}
            edited = [exercise for exercise in exercises if exercise.name in regions
                      and exercise.stub not in regions[exercise.name].text]
            if run and edited:
                results = run_tests(sorted({test_node(e) for e in edited}), [copy])
        for exercise in exercises:
            state = status_of(exercise, regions if copy.is_file() else None, results)
            short = exercise.name[len(chapter) + 1:]
            rows.append(f"{chapter}: {exercise.task} [{short}]  -- {state}")
    return rows


def check(chapter, out, extra):
    """Grade the learner's copy with the chapter's whole test file."""
    copy = Path(out) / f"{chapter}.py"
    if not copy.is_file():
        raise ExerciseError(f"{copy} is not there yet; `python tools/exercises.py make "
                            f"{chapter}` writes it")
    command = [sys.executable, "-m", "pytest", f"tests/test_{chapter}.py",
               "--chapter", str(copy), *extra]
    return subprocess.run(command, cwd=ROOT).returncode


def main(argv=None):
    """The command line; a problem ends with one sentence and exit code 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every exercise and how your copy stands")
    listing.add_argument("--no-run", action="store_true", help="do not run any test")
    maker = commands.add_parser("make", help="write a chapter's exercise copy")
    maker.add_argument("chapter", nargs="+", help="e.g. 02_linreg, or `all`")
    maker.add_argument("--force", action="store_true", help="overwrite your edits")
    checker = commands.add_parser("check", help="grade your copy with the chapter's tests")
    checker.add_argument("chapter")
    for command in (listing, maker, checker):
        command.add_argument("--out", default=str(ROOT / "exercises"),
                             help="where the copies live (default exercises/)")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "check":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "list":
            print("\n".join(list_exercises(args.out, run=not args.no_run)))
        elif args.command == "make":
            names = chapter_names() if args.chapter == ["all"] else args.chapter
            for chapter in names:
                if exercises_of(chapter):
                    print(f"wrote {make(chapter, args.out, args.force)}")
        else:
            return check(args.chapter, args.out, extra)
    except ExerciseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
