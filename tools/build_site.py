"""Build the course as a static web site: every chapter with its outputs and figures,
a course map, and the diff of each chapter against the one it builds on.

    python tools/build_site.py                 # every chapter, default runs (minutes)
    python tools/build_site.py --quick         # every chapter's --quick run (faster)
    python tools/build_site.py --quick --chapters 00_intro,01_linalg --out /tmp/site

Each chapter is executed the way a learner runs it in Jupyter: jupytext turns the file
into a notebook, nbclient runs it top to bottom in a fresh kernel, and the chapter reads
its flags from ZERO_TO_GPT_ARGS. The kernels run in a temporary folder, so the chapters'
`data/` and `out/` never land in the repository. The pages are written only when every
chapter ran: a chapter that fails ends the build with its name and its error on one
line and exit code 1, so no page with a traceback on it is ever published.

The pages are plain HTML with the CSS inline and no script: they open from disk with no
network. Prose is rendered with markdown-it-py, code with Pygments, and each inline
figure is written as a PNG file next to its page.
"""
import argparse
import ast
import base64
import difflib
import html
import json
import os
import re
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Per cell, not per chapter: the longest default-run cell (13_gpt's training) takes a
# couple of minutes on 2 cores; a cell past this limit is taken to have hung.
CELL_TIMEOUT = 1800


class BuildError(Exception):
    """A build that cannot go on; main() prints its one line and exits 1."""


@dataclass
class Chapter:
    """One chapter as the site shows it: its executed notebook and what the pages
    say about it (title, first paragraph, summary figures)."""
    name: str
    source: str
    notebook: object = None
    title: str = ""
    summary: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)   # (file name, PNG bytes)

    @property
    def page(self):
        return f"{self.name}.html"

    @property
    def figure_folder(self):
        return f"{self.name}_files"


# --------------------------------------------------------------------------------------
# Which chapters, in which order, diffed against which


def all_chapters():
    """The chapter files' stems in course order. Sorting the names gives it: an
    optional chapter (04b) sorts straight after the one it extends (04), since "_"
    sorts before the letters."""
    return sorted(path.stem for path in ROOT.glob("[0-9][0-9]*_*.py"))


def select(spec, names):
    """The chapters `--chapters` names (full stems or number prefixes such as 02 or
    04b), in course order; all of them when no list is given."""
    if not spec:
        return names
    chosen = set()
    for wanted in filter(None, (part.strip() for part in spec.split(","))):
        matches = [name for name in names if name == wanted or name.split("_")[0] == wanted]
        if not matches:
            raise BuildError(f"no chapter {wanted!r}; the chapters are {', '.join(names)}")
        chosen.update(matches)
    return [name for name in names if name in chosen]


def number(name):
    """ "04b_cnn" -> "04b": the part of a chapter's name that places it in the course."""
    return name.split("_")[0]


def diff_base(name, names):
    """The chapter whose file `name` grew from, so the diff is the lesson: an optional
    chapter (04b, 05b) against its main-line chapter (04, 05); a main-line chapter
    against the main-line chapter before it (06 against 05, not 05b). None for 00."""
    by_number = {number(other): other for other in names}
    tag = number(name)
    if not tag.isdigit():
        return by_number.get(tag.rstrip("abcdefghijklmnopqrstuvwxyz"))
    return by_number.get(f"{int(tag) - 1:02d}")


# --------------------------------------------------------------------------------------
# Running the chapters


@contextmanager
def environment(**values):
    """Set environment variables for the kernels this process starts (they inherit
    it), and put the old values back afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(name, quick, work):
    """Run chapter `name`'s notebook form in a fresh kernel inside `work`, as the
    notebook tests do, and return the executed notebook. The chapters share `work`,
    so a data set downloaded by one chapter is reused by the next; each writes its
    --out files to a folder of its own. One thread per kernel: on a small machine
    extra threads mostly wait on each other."""
    import jupytext
    import nbclient
    notebook = jupytext.read(ROOT / f"{name}.py")
    flags = f"{'--quick ' if quick else ''}--out {shlex.quote(str(work / 'out' / name))}"
    with environment(ZERO_TO_GPT_ARGS=flags, OMP_NUM_THREADS="1", PYTHONHASHSEED="0"):
        client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                         resources={"metadata": {"path": str(work)}})
        log_path = work / f"{name}.kernel.log"
        try:
            # The kernel process's own stderr (its start-up chatter, a crash) goes to a
            # log: the build's terminal shows progress, and a dead kernel's last words.
            with open(log_path, "w") as log:
                client.execute(stderr=log)
        except Exception as error:  # any failure: a cell's error, a timeout, a dead kernel
            line = failure_line(notebook, error)
            if type(error).__name__ == "DeadKernelError":
                line += f" ({last_line(log_path.read_text(errors='replace')) or 'no message'})"
            raise BuildError(f"{name} failed: {line}") from None
    tidy_paths(notebook, work, name)
    traceback = [text for cell in notebook.cells for text in cell_texts(cell)
                 if "Traceback (most recent call last)" in text]
    if traceback:
        raise BuildError(f"{name} printed a traceback: "
                         f"{last_line(traceback[0])}")
    return notebook


def tidy_paths(notebook, work, name):
    """Printed paths as a learner's own run prints them: `out/...` and `data/...`,
    not the build's temporary folder."""
    replacements = [(str(work / "out" / name), "out"), (str(work) + os.sep, "")]
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                for old, new in replacements:
                    output["text"] = output["text"].replace(old, new)


def cell_texts(cell):
    """Every piece of text a code cell's outputs show."""
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            yield output.get("text", "")
        elif output.get("output_type") == "error":
            yield "\n".join(output.get("traceback", []))
        else:
            yield output.get("data", {}).get("text/plain", "")


def last_line(text):
    """The last non-blank line of `text`, without terminal colour codes."""
    lines = [line.strip() for line in ANSI.sub("", text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def failure_line(notebook, error):
    """One line for a failed chapter: the chapter's own `error: ...` sentence where it
    printed one, else the exception's type and message, else what nbclient said."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"{output.get('ename')}: {ANSI.sub('', output.get('evalue', ''))}"
            text = output.get("text", "") if output.get("output_type") == "stream" else ""
            sentences = [line for line in text.splitlines() if line.startswith("error: ")]
            if sentences:
                return sentences[-1][len("error: "):]
    return f"{type(error).__name__}: {last_line(str(error)) or 'no message'}"


# --------------------------------------------------------------------------------------
# Reading a chapter: title, summary, figures


def docstring_parts(source):
    """The module docstring and the line its closing quotes are on, from the file's
    syntax tree (the title cell is the docstring followed by the imports)."""
    tree = ast.parse(source)
    first = tree.body[0] if tree.body else None
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str):
        return ast.get_docstring(tree), first.end_lineno
    return "", 0


def chapter_title(name, source):
    """What the chapter builds, in one sentence: its docstring's first paragraph,
    without a leading "Chapter 05:" (the map already says which chapter it is)."""
    docstring, _ = docstring_parts(source)
    paragraph = " ".join(docstring.split("\n\n")[0].split()) if docstring else name
    paragraph = re.sub(r"^(Zero to GPT, )?chapter \w+:\s*", "", paragraph, flags=re.I)
    return paragraph[:1].upper() + paragraph[1:]


def find_summary(notebook):
    """The figures on the chapter's `summary:` line (the last line it prints)."""
    for cell in reversed(notebook.cells):
        for output in reversed(cell.get("outputs", [])):
            if output.get("output_type") != "stream":
                continue
            for line in reversed(output.get("text", "").splitlines()):
                if line.startswith("summary: "):
                    try:
                        return json.loads(line[len("summary: "):])
                    except ValueError:
                        return {}
    return {}


def headline(summary, most=6):
    """The summary's first figures as short text for the course map: numbers first
    (a chapter's results), then words (which data, which device); `chapter` and
    `seconds` left out (the map has columns for those), and lists (curves) too. A
    chapter may report a dozen figures or more: the map shows the first few, and the
    chapter's page has the whole line."""
    numbers, words = [], []
    for key, value in summary.items():
        if key in ("chapter", "seconds") or isinstance(value, (dict, list)):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        else:
            words.append(f"{key} {value}")
    parts = numbers + words
    if len(parts) > most:
        parts = parts[:most] + [f"… {len(parts) - most} more on its page"]
    return parts


# --------------------------------------------------------------------------------------
# Rendering prose and code


def markdown_renderer():
    """CommonMark with tables, raw HTML off (prose is text; a stray tag must not become
    markup), and an id on every heading so the contents list can link to it."""
    from markdown_it import MarkdownIt
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def render_markdown(text, md, headings, prefix=""):
    """Prose as HTML. Headings get ids (collected in `headings` as (level, id, text)
    for the page's contents). The course writes its maths as indented plain text,
    which CommonMark shows as a preformatted block: exactly what it needs."""
    tokens = md.parse(text)
    for index, token in enumerate(tokens):
        if token.type == "heading_open":
            words = tokens[index + 1].content
            slug = prefix + (re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-") or "section")
            while any(slug == seen for _, seen, _ in headings):
                slug += "-"
            token.attrSet("id", slug)
            headings.append((int(token.tag[1]), slug, words))
    return md.renderer.render(tokens, md.options, {})


def render_code(source, hidden=False):
    """A code cell, syntax highlighted. Cells the chapter marks hidden (helpers the
    prose does not walk through) are folded, as Jupyter folds them."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    if not source.strip():
        return ""
    code = highlight(source, PythonLexer(), HtmlFormatter(cssclass="highlight"))
    if not hidden:
        return code
    lines = source.count("\n") + 1
    first = html.escape(source.strip().splitlines()[0])
    return (f'<details class="hidden-code"><summary>code: <code>{first}</code> '
            f"… ({lines} lines)</summary>{code}</details>")


def terminal_text(text):
    """Printed text as a terminal leaves it: colour codes gone, and a line that was
    rewritten with a carriage return (a progress line) showing its last version."""
    text = ANSI.sub("", text)
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def render_outputs(cell, chapter):
    """A code cell's outputs in order: printed text as preformatted blocks, and each
    PNG figure saved for the page's folder and shown with a relative <img>. Rich HTML
    outputs are shown by their plain-text form, so no output can pull in a script."""
    parts, pending = [], []

    def flush():
        if pending:
            kind = pending[0][0]
            text = terminal_text("".join(text for _, text in pending))
            parts.append(f'<pre class="output {kind}">{html.escape(text)}</pre>')
            pending.clear()

    for output in cell.get("outputs", []):
        kind = output.get("output_type")
        if kind == "stream":
            if pending and pending[0][0] != output.get("name"):
                flush()
            pending.append((output.get("name", "stdout"), output.get("text", "")))
            continue
        flush()
        data = output.get("data", {})
        if "image/png" in data:
            parts.append(figure_html(data["image/png"], chapter))
        elif "text/plain" in data:
            parts.append(f'<pre class="output result">{html.escape(terminal_text(data["text/plain"]))}</pre>')
    flush()
    return "".join(parts)


def figure_html(encoded, chapter):
    """Decode an inline figure, keep it for writing next to the page, and return the
    <img> that shows it. A figure that is not a PNG stops the build: the site must
    show every picture the chapter showed."""
    payload = base64.b64decode("".join(encoded) if isinstance(encoded, list) else encoded)
    if not payload.startswith(PNG_MAGIC):
        raise BuildError(f"{chapter.name} showed an image/png output that is not a PNG")
    file_name = f"figure-{len(chapter.figures) + 1:02d}.png"
    chapter.figures.append((file_name, payload))
    src = f"{chapter.figure_folder}/{file_name}"
    return (f'<figure><img src="{html.escape(src)}" alt="{chapter.name}, figure '
            f'{len(chapter.figures)}" loading="eager"></figure>')


# --------------------------------------------------------------------------------------
# Pages


STYLE = """
body { font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d1f21; background: #fdfdfc; margin: 0; }
main { max-width: 58rem; margin: 0 auto; padding: 1rem 1.5rem 4rem; }
nav.pager { display: flex; justify-content: space-between; gap: 1rem; flex-wrap: wrap;
            border-bottom: 1px solid #ddd; padding: .6rem 0; font-size: .95rem; }
nav.pager.bottom { border-top: 1px solid #ddd; border-bottom: 0; margin-top: 3rem; }
a { color: #1657a8; }
h1 { font-size: 1.9rem; line-height: 1.25; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #eee; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: .9em;
       background: #f2f2ee; padding: .05em .25em; border-radius: 3px; }
pre { overflow-x: auto; padding: .6rem .8rem; border-radius: 4px; font-size: .85rem;
      line-height: 1.4; }
pre code { background: none; padding: 0; }
p code, li code, td code { white-space: nowrap; }
.prose pre { background: #f6f6f1; border-left: 3px solid #c9c9b8; }
.highlight pre { background: #f7f8fa; border: 1px solid #e3e5e8; margin: .8rem 0 .2rem; }
pre.output { background: #fff; border: 1px solid #e3e5e8; border-left: 3px solid #7fa650;
             margin: 0 0 .8rem; white-space: pre-wrap; }
pre.output.stderr { border-left-color: #c98b2a; background: #fffaf2; }
details.hidden-code > summary { cursor: pointer; color: #555; font-size: .9rem; margin: .6rem 0; }
figure { margin: .6rem 0 1.2rem; } figure img { max-width: 100%; height: auto;
         border: 1px solid #eee; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .93rem; }
th, td { border: 1px solid #ddd; padding: .35rem .55rem; vertical-align: top; text-align: left; }
th { background: #f4f4f0; }
td.num, td.name, th.num { white-space: nowrap; } td.num { text-align: right; }
td.what { width: 38%; }
td.figures { font-size: .85rem; color: #333; }
nav.contents { font-size: .92rem; background: #f7f7f3; padding: .4rem 1rem; border-radius: 4px; }
nav.contents ul { margin: .2rem 0; padding-left: 1.2rem; }
pre.diff { border: 1px solid #e3e5e8; background: #fff; padding: 0; line-height: 1.35; }
pre.diff span { display: block; padding: 0 .6rem; }
pre.diff .add { background: #e6f7e6; } pre.diff .del { background: #fbe9e9; }
pre.diff .hunk { background: #eef3fb; color: #3b5b8a; margin-top: .5rem; }
pre.diff .file { background: #f1f1f1; font-weight: bold; }
pre.diff ins { background: #b9ebb9; text-decoration: none; }
pre.diff del { background: #f5c2c2; text-decoration: none; }
.meta { color: #666; font-size: .9rem; }
"""


def page(title, body):
    """A whole HTML page: the course's CSS and Pygments' colours inline, no script, no
    external font or style, so it reads the same opened from disk with no network."""
    from pygments.formatters import HtmlFormatter
    colours = HtmlFormatter(style="friendly").get_style_defs(".highlight")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}\n{colours}</style>\n"
            f"</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


def pager(previous, following, middle, bottom=False):
    """The previous / course map / next links at the top and foot of a page."""
    def link(chapter, arrow):
        if chapter is None:
            return "<span></span>"
        text = f"{chapter.name} {arrow}" if arrow == "→" else f"{arrow} {chapter.name}"
        return f'<a href="{chapter.page}" rel="{"next" if arrow == "→" else "prev"}">{text}</a>'
    return (f'<nav class="pager{" bottom" if bottom else ""}">{link(previous, "←")}'
            f"{middle}{link(following, '→')}</nav>")


def render_chapter(chapter, previous, following, base, quick):
    """A chapter's page: title and opening from its docstring, then every cell in
    order, prose as formatted text, code highlighted, outputs and figures under the
    code that made them, a contents list of its sections, and links around."""
    md, headings, cells = markdown_renderer(), [], []
    docstring, end_line = docstring_parts(chapter.source)
    for index, cell in enumerate(chapter.notebook.cells):
        if cell.cell_type == "markdown":
            cells.append(f'<section class="prose">{render_markdown(cell.source, md, headings)}</section>')
            continue
        source = cell.source
        if index == 0 and docstring:   # the title cell: docstring as prose, imports as code
            lines = source.splitlines()
            source = "\n".join(lines[end_line:]).strip("\n")
            opening = docstring.split("\n", 1)
            cells.append(f"<h1>{html.escape(opening[0])}</h1>")
            cells.append(f'<section class="prose">{render_markdown(opening[1] if len(opening) > 1 else "", md, [])}</section>')
        hidden = bool(cell.get("metadata", {}).get("jupyter", {}).get("source_hidden"))
        cells.append(render_code(source, hidden) + render_outputs(cell, chapter))
    contents = "".join(f'<li><a href="#{slug}">{html.escape(text)}</a></li>'
                       for level, slug, text in headings if level == 2)
    diff = f' · <a href="{diff_page(base, chapter)}">diff against {base.name}</a>' if base else ""
    run = "--quick run" if quick else "default run"
    middle = f'<span><a href="index.html">course map</a>{diff}</span>'
    body = (pager(previous, following, middle)
            + f'<p class="meta">{chapter.name}.py, executed as a notebook ({run}, '
            f'{chapter.summary.get("seconds", "?")} s).</p>'
            + cells[0] + (f'<nav class="contents"><strong>Sections</strong><ul>{contents}</ul></nav>'
                          if contents else "")
            + "\n".join(cells[1:]) + pager(previous, following, middle, bottom=True))
    return page(f"{chapter.name}: {chapter.title}", body)


def diff_page(old, new):
    """The file name of the page showing what `new` changes in `old`."""
    return f"diff_{number(old.name)}_{number(new.name)}.html"


def render_diff(old, new, context=3):
    """What a chapter adds to the one it builds on: a unified diff of the two files
    with a few lines of context, removed and added lines coloured, and inside a
    changed line the changed characters marked. A few lines of context keep even the
    largest pair's page a sensible size."""
    old_lines = old.source.splitlines()
    new_lines = new.source.splitlines()
    lines = list(difflib.unified_diff(old_lines, new_lines, f"{old.name}.py", f"{new.name}.py",
                                      n=context, lineterm=""))
    added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
    body = (f'<nav class="pager"><a href="{old.page}">← {old.name}</a>'
            f'<a href="index.html">course map</a><a href="{new.page}">{new.name} →</a></nav>'
            f"<h1>From {old.name} to {new.name}</h1>"
            f'<p class="meta">{new.name}: {html.escape(new.title)}<br>'
            f"{added} lines added, {removed} removed "
            f"({len(new_lines)} lines in {new.name}.py, {len(old_lines)} in {old.name}.py); "
            f"{context} lines of context around each change.</p>"
            f'<pre class="diff">{diff_lines_html(lines)}</pre>')
    return page(f"diff {old.name} → {new.name}", body)


def diff_lines_html(lines):
    """Unified-diff lines as coloured spans. A run of removed lines followed by as many
    added lines is a rewrite of those lines: their changed characters are marked."""
    out, index = [], 0
    while index < len(lines):
        line = lines[index]
        if line.startswith(("---", "+++")) and index < 2:
            out.append(f'<span class="file">{html.escape(line)}</span>')
        elif line.startswith("@@"):
            out.append(f'<span class="hunk">{html.escape(line)}</span>')
        elif line.startswith("-"):
            removed = [line]
            while index + len(removed) < len(lines) and lines[index + len(removed)].startswith("-"):
                removed.append(lines[index + len(removed)])
            after = index + len(removed)
            added = []
            while after + len(added) < len(lines) and lines[after + len(added)].startswith("+"):
                added.append(lines[after + len(added)])
            out.extend(paired_lines(removed, added))
            index = after + len(added)
            continue
        elif line.startswith("+"):
            out.append(f'<span class="add">{html.escape(line)}</span>')
        else:
            out.append(f"<span>{html.escape(line)}</span>")
        index += 1
    return "".join(out)


def paired_lines(removed, added):
    """Removed and added lines; where they pair one for one and a pair is an edit of
    the same line, the characters that differ are wrapped in <del> and <ins>."""
    if len(removed) != len(added):
        return ([f'<span class="del">{html.escape(line)}</span>' for line in removed]
                + [f'<span class="add">{html.escape(line)}</span>' for line in added])
    old_spans, new_spans = [], []
    for old, new in zip(removed, added):
        a, b = old[1:], new[1:]
        matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
        if matcher.ratio() < 0.6:   # a different line, not an edit: marks would be noise
            old_spans.append(f'<span class="del">{html.escape(old)}</span>')
            new_spans.append(f'<span class="add">{html.escape(new)}</span>')
            continue
        old_html, new_html = ["-"], ["+"]
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                old_html.append(html.escape(a[i1:i2]))
                new_html.append(html.escape(b[j1:j2]))
                continue
            if i2 > i1:
                old_html.append(f"<del>{html.escape(a[i1:i2])}</del>")
            if j2 > j1:
                new_html.append(f"<ins>{html.escape(b[j1:j2])}</ins>")
        old_spans.append(f'<span class="del">{"".join(old_html)}</span>')
        new_spans.append(f'<span class="add">{"".join(new_html)}</span>')
    return old_spans + new_spans


def render_index(chapters, bases, quick, seconds):
    """The course map: each chapter, what it builds, its headline figures and run time
    from its summary line, and links to its page and to its diff."""
    rows = []
    for chapter in chapters:
        figures = "; ".join(html.escape(part) for part in headline(chapter.summary))
        base = bases.get(chapter.name)
        diff = f'<a href="{diff_page(base, chapter)}">from {base.name}</a>' if base else "—"
        rows.append(f'<tr><td class="name"><a href="{chapter.page}">{chapter.name}</a></td>'
                    f'<td class="what">{html.escape(chapter.title)}</td>'
                    f'<td class="figures">{figures}</td>'
                    f'<td class="num">{chapter.summary.get("seconds", "?")} s</td><td>{diff}</td></tr>')
    run = "--quick" if quick else "default"
    body = ("<h1>Zero to GPT</h1>"
            "<p>From no deep learning to training your own GPT on GPU kernels you wrote "
            "yourself: one runnable Python file a chapter, read top to bottom. Each page "
            "below is the chapter executed as a notebook, with its printed output and its "
            "figures in place; each diff shows exactly what a chapter adds to the one it "
            "builds on.</p>"
            "<table><thead><tr><th>chapter</th><th>what you build</th><th>headline figures</th>"
            f'<th class="num">run time<br>({run})</th><th>diff</th></tr></thead><tbody>'
            + "\n".join(rows) + "</tbody></table>"
            f'<p class="meta">Built {time.strftime("%Y-%m-%d %H:%M")} with the chapters\' '
            f"{run} runs in {seconds:.0f} s.</p>")
    return page("Zero to GPT: the course map", body)


# --------------------------------------------------------------------------------------
# The build


def build(names, quick, out):
    """Execute the chapters, then write every page. Nothing is written until all of
    them ran, so a failed build leaves the last good site as it was."""
    start = time.time()
    chapters = [Chapter(name, (ROOT / f"{name}.py").read_text(encoding="utf-8")) for name in names]
    with tempfile.TemporaryDirectory(prefix="zero-to-gpt-site-") as work:
        for chapter in chapters:
            began = time.time()
            print(f"running {chapter.name} ...", end=" ", flush=True, file=sys.stderr)
            chapter.notebook = execute(chapter.name, quick, Path(work))
            chapter.title = chapter_title(chapter.name, chapter.source)
            chapter.summary = find_summary(chapter.notebook)
            print(f"{time.time() - began:.0f} s", file=sys.stderr)
    by_name = {chapter.name: chapter for chapter in chapters}
    bases = {chapter.name: by_name.get(diff_base(chapter.name, names)) for chapter in chapters}
    bases = {name: base for name, base in bases.items() if base is not None}
    pages = {}
    for index, chapter in enumerate(chapters):
        previous = chapters[index - 1] if index > 0 else None
        following = chapters[index + 1] if index + 1 < len(chapters) else None
        pages[chapter.page] = render_chapter(chapter, previous, following,
                                             bases.get(chapter.name), quick)
    for name, base in bases.items():
        pages[diff_page(base, by_name[name])] = render_diff(base, by_name[name])
    pages["index.html"] = render_index(chapters, bases, quick, time.time() - start)
    write_site(out, pages, chapters)
    return pages, chapters


def write_site(out, pages, chapters):
    """Write the pages and the figure files; a chapter's old figures go first, so a
    rebuild that shows fewer figures leaves none stale."""
    out.mkdir(parents=True, exist_ok=True)
    for chapter in chapters:
        folder = out / chapter.figure_folder
        if folder.is_dir():
            for old in folder.glob("figure-*.png"):
                old.unlink()
        if chapter.figures:
            folder.mkdir(exist_ok=True)
        for file_name, payload in chapter.figures:
            (folder / file_name).write_bytes(payload)
    for name, text in pages.items():
        (out / name).write_text(text, encoding="utf-8")


def parse_args(argv=None):
    """The builder's command line; `--help` explains every flag."""
    parser = argparse.ArgumentParser(
        description="Execute every chapter as a notebook and write the course as static "
                    "HTML pages (chapter pages, course map, diffs) that open offline.")
    parser.add_argument("--quick", action="store_true",
                        help="run each chapter with --quick (seconds each) instead of its defaults")
    parser.add_argument("--out", type=Path, default=ROOT / "site",
                        help="folder to write the site to (default: site/ in the repository)")
    parser.add_argument("--chapters", default="",
                        help="comma-separated chapters to build, e.g. 00_intro,01_linalg or 00,01 "
                             "(default: all)")
    return parser.parse_args(argv)


def main(argv=None):
    """Build the site; exit 0 with one line saying where it is, 1 with one line naming
    the chapter that failed, 2 for a chapter list that names no chapter."""
    args = parse_args(argv)
    try:
        names = select(args.chapters, all_chapters())
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        start = time.time()
        pages, chapters = build(names, args.quick, args.out.resolve())
    except BuildError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    figures = sum(len(chapter.figures) for chapter in chapters)
    print(f"wrote {len(pages)} pages and {figures} figure{'s' * (figures != 1)} to {args.out} in "
          f"{time.time() - start:.0f} s; open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
