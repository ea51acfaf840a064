"""The docs' links into the code name what they point at by symbol, never by line: `[`name`](../file.py)` must
name an identifier of that file's code (a def or class, an assignment, an `Args` field, a name used inside a
function: any name token, but not a word in a comment or a string), and a link to a whole file has the file's
path as its text. Line anchors (`#L120-L140`) are refused: they drift whenever code moves, so a fork's first
edit would break the docs; a symbol only breaks when it is renamed or removed, which is when the docs are wrong."""

import functools
import glob
import io
import os
import re
import shutil
import tokenize

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_LINK = re.compile(r"\[([^\]]*)\]\(([^)#\s]+\.py)(#[^)\s]*)?\)")
SCRIPTS = ["refuel.py", "rebel.py", "dpo_multiturn.py", "ma_ppo.py"]


def docs(root):
    """The markdown files whose code links are checked: docs/*.md and README.md under `root`."""
    return sorted(glob.glob(os.path.join(root, "docs", "*.md"))) + [os.path.join(root, "README.md")]


def code_links(doc):
    """(link, text, target path, anchor or None) for each markdown link from `doc` into a .py file."""
    return [(m.group(0), m.group(1), os.path.normpath(os.path.join(os.path.dirname(doc), m.group(2))), m.group(3))
            for m in CODE_LINK.finditer(read(doc))]


def read(path):
    with open(path) as f:
        return f.read()


@functools.cache  # a doc links to the same few files a hundred times; keyed by the source, so edits are seen
def identifiers(source):
    """The name tokens of Python code: its defs, classes, assignments, fields and every name it uses."""
    return {t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.NAME}


def broken_links(doc, root):
    """What is wrong with each of `doc`'s code links: a line anchor, a missing file, or text that is neither the
    file's path nor a `symbol` of its code."""
    wrong = []
    for link, text, path, anchor in code_links(doc):
        symbol = re.fullmatch(r"`([A-Za-z_][A-Za-z0-9_]*)`", text)
        if anchor is not None:
            wrong.append(f"{link}: drop the {anchor} anchor; the link text names the symbol")
        elif not os.path.isfile(path):
            wrong.append(f"{link}: no file {os.path.relpath(path, root)}")
        elif symbol is None and text.strip("`") != os.path.relpath(path, root):
            wrong.append(f"{link}: the link text must be the `symbol` it points at (or the file's path)")
        elif symbol is not None and symbol.group(1) not in identifiers(read(path)):
            wrong.append(f"{link}: `{symbol.group(1)}` is not a name in {os.path.relpath(path, root)}")
    return wrong


def copy_of_the_docs(root):
    """Copies docs/, README.md, the four scripts and every other .py file the docs link to under `root`."""
    targets = {os.path.relpath(path, REPO) for doc in docs(REPO) for _, _, path, _ in code_links(doc)}
    shutil.copytree(os.path.join(REPO, "docs"), os.path.join(root, "docs"))
    shutil.copy(os.path.join(REPO, "README.md"), root)
    for target in targets | set(SCRIPTS):
        os.makedirs(os.path.join(root, os.path.dirname(target)), exist_ok=True)
        shutil.copy(os.path.join(REPO, target), os.path.join(root, target))


@pytest.mark.parametrize("doc", docs(REPO), ids=os.path.basename)
def test_every_code_link_names_a_symbol_of_its_file(doc):
    wrong = broken_links(doc, REPO)
    assert not wrong, "\n".join(wrong)


def test_the_docs_link_into_every_script():
    # guards the check itself: a pattern that stopped matching would pass every doc vacuously
    linked = {os.path.relpath(path, REPO) for doc in docs(REPO) for _, _, path, _ in code_links(doc)}
    assert set(SCRIPTS) <= linked


def test_links_survive_a_line_added_at_the_top_of_every_script(tmp_path):
    copy_of_the_docs(tmp_path)
    for script in SCRIPTS:
        path = tmp_path / script
        source = path.read_text()
        docstring_end = source.index('"""', 3) + 3
        path.write_text(source[:docstring_end] + "\n# a fork's first edit" + source[docstring_end:])
    wrong = [w for doc in docs(tmp_path) for w in broken_links(doc, tmp_path)]
    assert not wrong, "\n".join(wrong)


def test_a_renamed_symbol_breaks_its_links(tmp_path):
    copy_of_the_docs(tmp_path)
    path = tmp_path / "refuel.py"
    path.write_text(re.sub(r"\brefuel_loss\b", "refuel_objective", path.read_text()))
    wrong = broken_links(tmp_path / "docs" / "refuel.md", tmp_path)
    assert wrong and all("`refuel_loss` is not a name in refuel.py" in w for w in wrong)


def test_a_line_anchor_is_refused(tmp_path):
    copy_of_the_docs(tmp_path)
    doc = tmp_path / "docs" / "refuel.md"
    doc.write_text("[`refuel_loss`](../refuel.py#L1-L9)\n")
    assert broken_links(doc, tmp_path) == ["[`refuel_loss`](../refuel.py#L1-L9): drop the #L1-L9 anchor; the link "
                                           "text names the symbol"]
