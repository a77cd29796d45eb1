"""Every chapter as a learner opens it in Jupyter: converted by jupytext, executed top
to bottom in a real kernel with `ZERO_TO_GPT_ARGS="--quick"`, as "Run All" would.

Each must run without an error cell, print its `summary:` line in the last cell that
prints, show output in at least three code cells under at least three different prose
sections (results under the prose that explains them, not all under the last cell),
and show its figures inline where it plots. A bad flag shows its one sentence under the cell, no traceback.
"""
import os

import pytest

from conftest import ROOT, has_matplotlib

jupytext = pytest.importorskip("jupytext", reason="the README's set-up installs jupytext")
nbclient = pytest.importorskip("nbclient", reason="the README's set-up installs nbclient")

CHAPTERS = sorted(path.stem for path in ROOT.glob("[0-9][0-9]*_*.py"))


def execute(name, flags, folder, notebook=None):
    """The chapter's notebook form, executed in `folder` with ZERO_TO_GPT_ARGS=flags;
    stops at the first cell that fails, as Run All does (CellExecutionError)."""
    notebook = notebook if notebook is not None else jupytext.read(ROOT / f"{name}.py")
    os.environ["ZERO_TO_GPT_ARGS"] = flags
    try:
        client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(folder)}})
        client.execute()
    finally:
        del os.environ["ZERO_TO_GPT_ARGS"]
    return notebook


def printed(cell):
    return "".join(output.get("text", "") for output in cell.get("outputs", [])
                   if output["output_type"] == "stream")


def test_the_chapters_are_all_here():
    assert len(CHAPTERS) == 16, CHAPTERS


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_runs_as_a_notebook(name, tmp_path):
    notebook = execute(name, f"--quick --out {tmp_path / 'out'}", tmp_path)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert not [output for cell in code for output in cell.get("outputs", [])
                if output["output_type"] == "error"]
    last_printed = [printed(cell) for cell in code if printed(cell).strip()][-1]
    assert last_printed.strip().splitlines()[-1].startswith("summary: {"), last_printed[-500:]
    # The title cell holds the docstring and the imports, so it echoes nothing.
    assert not code[0].get("outputs"), code[0]["outputs"]
    with_output = [index for index, cell in enumerate(code) if cell.get("outputs")]
    assert len(with_output) >= 3, f"{name}: only cells {with_output} of {len(code)} show output"
    # Spread over the chapter: results sit under at least three different prose cells,
    # not all together at the end.
    sections, section = set(), 0
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            section += 1
        elif cell.get("outputs"):
            sections.add(section)
    assert len(sections) >= 3, f"{name}: results under only {len(sections)} prose section(s)"
    source = (ROOT / f"{name}.py").read_text(encoding="utf-8")
    if "show_figure(" in source and has_matplotlib():
        images = [output for cell in code for output in cell.get("outputs", [])
                  if "image/png" in output.get("data", {})]
        assert images, f"{name} plots but shows no figure inline"
        assert list((tmp_path / "out").glob("*.png")), f"{name} saved no PNG to --out"


def test_a_bad_flag_shows_one_sentence_under_its_cell(tmp_path):
    notebook = jupytext.read(ROOT / "02_linreg.py")
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        execute("02_linreg", "--quick --epochs 0", tmp_path, notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    failed = [cell for cell in code if "error: " in printed(cell)]
    assert len(failed) == 1, [printed(cell) for cell in code]
    outputs = failed[0]["outputs"]
    assert [output["output_type"] for output in outputs] == ["stream"], outputs
    assert printed(failed[0]).strip() == "error: --epochs must be at least 1, not 0"
    # Run All stops there: no later cell ran.
    later = code[code.index(failed[0]) + 1:]
    assert all(cell.get("execution_count") is None for cell in later)


@pytest.mark.parametrize("name", CHAPTERS)
def test_the_opening_says_how_a_notebook_takes_its_flags(name):
    import ast
    opening = ast.get_docstring(ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8")))
    assert "ZERO_TO_GPT_ARGS" in opening, name
