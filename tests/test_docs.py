"""The README's links lead somewhere, and its commands use flags the scripts have."""

import importlib
import re
import shlex

import pytest

from conftest import ROOT
from ink3d.config import build_parser

DOCUMENTS = ["README.md", *sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md"))]


def _anchor(heading: str) -> str:
    """A heading's anchor as GitHub writes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_relative_link_and_anchor_exists(document):
    path = ROOT / document
    for target in re.findall(r"\]\(([^)#\s]+\.(?:md|png))(#[^)]+)?\)", path.read_text()):
        linked = (path.parent / target[0]).resolve()
        assert linked.exists(), f"{document} links to {target[0]}, which does not exist"
        if target[1]:
            anchors = {_anchor(line.lstrip("#")) for line in linked.read_text().splitlines() if line.startswith("#")}
            assert target[1][1:] in anchors, f"{document} links to {target[0]}{target[1]}: no such heading"


def test_the_readme_names_only_docs_that_exist():
    for name in re.findall(r"docs/[\w./-]+\.(?:md|png)", (ROOT / "README.md").read_text()):
        assert (ROOT / name).exists(), name


def _commands(text: str):
    """`python <script>.py ...` commands of the fenced bash blocks, with continuation lines joined."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("  #")[0], comments=True)
            for at, word in enumerate(words):
                if word.endswith(".py") and at and words[at - 1] == "python" and (ROOT / word).exists():
                    yield word, words[at + 1:]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_uses_flags_its_script_has(document):
    for script, words in _commands((ROOT / document).read_text()):
        module = importlib.import_module(script[:-3])
        flags = {action.option_strings[0] for action in build_parser(vars(module))._actions if action.option_strings}
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in flags, f"{document}: `{script} {word}`: no such flag"
