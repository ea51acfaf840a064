"""The docs' links into the code name what they point at, and point at it: `[`name`](../file.py#La-Lb)` must have
`name` within lines a..b of that file. Line links drift whenever code moves; this catches it."""

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[([^\]]*)\]\(([^)#\s]+\.py)#L(\d+)(?:-L(\d+))?\)")
DOCS = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")) + [os.path.join(REPO, "README.md")])


def line_links(doc):
    with open(doc) as f:
        text = f.read()
    return [(m.group(0), m.group(1), m.group(2), int(m.group(3)), int(m.group(4) or m.group(3)))
            for m in LINK.finditer(text)]


@pytest.mark.parametrize("doc", DOCS, ids=os.path.basename)
def test_every_line_link_names_a_symbol_found_in_its_lines(doc):
    wrong = []
    for link, text, target, first, last in line_links(doc):
        name = re.fullmatch(r"`([^`]+)`", text)
        path = os.path.normpath(os.path.join(os.path.dirname(doc), target))
        if name is None:
            wrong.append(f"{link}: the link text must be the `symbol` it points at")
            continue
        with open(path) as f:
            lines = f.read().splitlines()[first - 1 : last]
        if not lines or name.group(1) not in "\n".join(lines):
            wrong.append(f"{link}: `{name.group(1)}` is not in {target} lines {first}-{last}")
    assert not wrong, "\n".join(wrong)
