"""The documentation's examples run, and its links lead somewhere.

Every ```python block of the README, the getting-started page and the library guide is executed as written,
from the repository folder. A block that loads an experiment file (``Experiment.from_toml``) gets
:func:`tiny_overrides` appended to its overrides, as those pages say: the tiny 2-layer BERT and the 240 keyword
rows of ``conftest.py`` instead of the real model and dataset; its output folder (``runs/<name>`` unless the
block sets one) is moved under the test's tmp_path. Every other line of the block is the page's own, so a
renamed function, a changed attribute or a wrong printed claim checked by the block's ``assert`` fails here.

A block whose first line is ``# not run: <reason>`` (it needs a SuperLink, a GPU, the internet) is compiled
but not executed; each page may have at most :data:`MAX_NOT_RUN` of them. Strategies and client kinds a
block registers are forgotten after it.

The link test reads README.md, CONTRIBUTING.md and every page under docs/ and checks that each relative
link points to an existing file (and, inside docs/, that a ``#fragment`` names a heading of its page).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import REPO

EXAMPLE_PAGES = ("README.md", "docs/getting-started.md", "docs/guides/library.md")
NOT_RUN = re.compile(r"^# not run: \S")
MAX_NOT_RUN = 2
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(page: str) -> list[str]:
    """The ```python blocks of a page, in order."""
    text = (REPO / page).read_text(encoding="utf-8")
    return [body for lang, body in FENCE.findall(text) if lang == "python"]


EXAMPLES = [(page, i) for page in EXAMPLE_PAGES for i in range(len(python_blocks(page)))]


def test_example_pages_have_python_blocks():
    counts = {page: len(python_blocks(page)) for page in EXAMPLE_PAGES}
    assert counts["README.md"] == 1 and counts["docs/getting-started.md"] >= 1, counts
    assert counts["docs/guides/library.md"] >= 10, counts
    for page in EXAMPLE_PAGES:
        skipped = [b for b in python_blocks(page) if NOT_RUN.match(b)]
        assert len(skipped) <= MAX_NOT_RUN, f"{page}: {len(skipped)} blocks marked '# not run:'"
        assert all(b.startswith("# not run:") == bool(NOT_RUN.match(b)) for b in python_blocks(page)), \
            f"{page}: '# not run:' needs a reason"


def test_readme_library_example_is_short():
    """The front page's example stays about ten lines."""
    (block,) = python_blocks("README.md")
    assert len(block.strip().splitlines()) <= 12, block


def tiny_overrides(model_dir: Path, train: Path, evalf: Path) -> list[str]:
    """What the pages say the tests append: tiny model, tiny rows, a few clients, one short epoch."""
    return [
        f'model.name="{model_dir}"', 'data.dataset="files"', f'data.train_file="{train}"',
        f'data.eval_file="{evalf}"', 'data.text_column="text"', 'data.label_column="label"',
        "data.train_size=0", "data.max_length=16", "partition.num_clients=3", 'partition.method="iid"',
        "partition.min_examples=5", "federation.clients_per_round=0", "federation.fraction=1.0",
        "train.batch_size=16", "train.lr=0.02", "train.epochs=1.0", "model.lora.r=4", "eval.batch_size=64",
    ]


@pytest.mark.parametrize(("page", "index"), EXAMPLES, ids=[f"{p.split('/')[-1]}-{i}" for p, i in EXAMPLES])
def test_doc_example_runs(page, index, tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    from fedtune.client import kinds
    from fedtune.config import Experiment
    from fedtune.strategies import base

    code = python_blocks(page)[index]
    compiled = compile(code, f"{page}[python block {index}]", "exec", dont_inherit=True)  # (not our __future__)
    if NOT_RUN.match(code):
        pytest.skip(code.splitlines()[0])
    original = Experiment.from_toml.__func__
    calls = []

    def from_toml(cls, path, overrides=()):
        calls.append(path)
        exp = original(cls, path, [*overrides, *tiny_overrides(tiny_model_dir, *tiny_csv)])
        out = exp.resolved_output_dir
        exp.output_dir = str(out if out.is_absolute() else tmp_path / out)  # runs/<name> -> tmp_path/runs/<name>
        return exp

    monkeypatch.setattr(Experiment, "from_toml", classmethod(from_toml))
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # a block's own strategy is forgotten after it
    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))
    monkeypatch.chdir(REPO)  # the pages' paths (experiments/...) are relative to the repository folder
    exec(compiled, {"__name__": f"docs_example_{index}"})
    if "from_toml(" in code:
        assert calls, "the block loads an experiment file, but not through Experiment.from_toml"
        assert all((REPO / p).is_file() for p in calls), calls


def doc_files() -> list[Path]:
    """README.md, CONTRIBUTING.md and every Markdown page under docs/."""
    return [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md"))]


def heading_ids(path: Path) -> set[str]:
    """The anchors MkDocs gives the page's headings (its toc extension's slugify), outside code fences."""
    from markdown.extensions.toc import slugify

    ids: dict[str, int] = {}
    found = set()
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    for line in text.splitlines():
        m = re.match(r"^#{1,6} (.*)$", line)
        if m:
            s = slugify(m.group(1).replace("`", ""), "-")
            n = ids.get(s)
            ids[s] = 0 if n is None else n + 1
            found.add(s if n is None else f"{s}_{n + 1}")
    return found


def test_relative_links_point_to_existing_files():
    pytest.importorskip("markdown")  # installed with the docs extra (mkdocs)
    broken = []
    docs = REPO / "docs"
    for path in doc_files():
        text = FENCE.sub("", path.read_text(encoding="utf-8"))
        for m in LINK.finditer(text):
            target = m.group(1) or m.group(2)
            if re.match(r"^[a-z]+:", target) or target.startswith("#") and path.parent == REPO:
                continue  # URLs; README anchors are GitHub's own
            file_part, _, fragment = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
            elif fragment and dest.suffix == ".md" and docs in dest.parents and fragment not in heading_ids(dest):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_reach_every_file_in_nav():
    """Every page named in mkdocs.yml's nav exists (the placeholders of pages being written included)."""
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), re.M)
    assert len(nav) > 30
    missing = [p for p in nav if not (REPO / "docs" / p).is_file()]
    assert not missing, missing
    assert os.path.isfile(REPO / ".gitignore") and "site/" in (REPO / ".gitignore").read_text().split()
