"""Every Python example a user can paste from the README and the documentation
runs: each ```python block of README.md, ARCHITECTURE.md, CONTRIBUTING.md and
docs/*.md is executed, as a file of its own, in a fresh interpreter, against
the suite's servers (tests/support/servers.py).

The examples read their connection settings from the environment with
defaults a reader would change (``os.environ.get("MYSQL_PORT", "3306")``);
the test sets those variables to the suite's MariaDB (MYSQL_HOST, MYSQL_PORT,
MYSQL_USER, MYSQL_PASSWORD, MYSQL_DATABASE) and PostgreSQL (libpq's own
PGHOST, PGPORT, PGUSER, PGDATABASE).

A block that cannot run on its own (a fragment, a gunicorn config file, a
setup.py) is marked, on the line right before its fence, with
``<!-- not-run: the reason -->``; a mark without a reason fails.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import pytest


def _repo_root() -> str:
    folder = os.path.dirname(os.path.abspath(__file__))
    while not os.path.exists(os.path.join(folder, "pyproject.toml")):
        parent = os.path.dirname(folder)
        if parent == folder:
            raise RuntimeError(f"no pyproject.toml above {__file__}")
        folder = parent
    return folder


REPO = _repo_root()
EXAMPLE_TIMEOUT_S = 120
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(.*?)-->\s*$")


@dataclass
class Block:
    path: str           # relative to the repository
    line: int           # the opening fence's line, 1-based
    language: str
    code: str
    not_run: Optional[str]   # None: runs; else the reason given ("" when none)

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line}"


def documents() -> List[str]:
    names = ["README.md", "ARCHITECTURE.md", "CONTRIBUTING.md"]
    docs = os.path.join(REPO, "docs")
    if os.path.isdir(docs):
        names += sorted(os.path.join("docs", name) for name in os.listdir(docs) if name.endswith(".md"))
    return [name for name in names if os.path.isfile(os.path.join(REPO, name))]


def code_blocks(path: str) -> List[Block]:
    """The fenced blocks of one Markdown file; an unclosed fence raises."""
    with open(os.path.join(REPO, path)) as document:
        lines = document.read().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence, language = opening.groups()
        previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        mark = NOT_RUN.match(previous)
        body, end = [], index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence[0] * len(fence)):
            body.append(lines[end][len(indent):] if lines[end].startswith(indent) else lines[end])
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path}:{index + 1}: a code fence that is never closed")
        blocks.append(Block(path, index + 1, language.lower(), "\n".join(body) + "\n",
                            mark.group(1).strip() if mark else None))
        index = end + 1
    return blocks


def python_blocks(documents_with_unclosed_fences_too: bool = False) -> List[Block]:
    """Every ```python block; a document with an unclosed fence raises, or,
    at collection, counts as having none (the fence test then fails)."""
    blocks = []
    for path in documents():
        try:
            blocks += [block for block in code_blocks(path) if block.language == "python"]
        except AssertionError:
            if not documents_with_unclosed_fences_too:
                raise
    return blocks


def test_every_code_fence_is_closed():
    for path in documents():
        code_blocks(path)  # raises naming the file and line


def test_every_example_that_does_not_run_says_why():
    marked = [block for block in python_blocks() if block.not_run is not None]
    without_reason = [block.name for block in marked if not block.not_run]
    assert not without_reason, f"<!-- not-run: ... --> without a reason before: {without_reason}"
    print("\n".join(f"not run: {block.name}: {block.not_run}" for block in marked))


def _slug(heading: str) -> str:
    """A heading's anchor, as MkDocs (toc) and GitHub make it."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_readme_links_name_existing_files_and_headings():
    """The site's build checks the pages' links (mkdocs --strict); the
    README is not one of its pages, so its links are checked here."""
    with open(os.path.join(REPO, "README.md")) as readme:
        links = re.findall(r"\]\(([^)#\s]+\.md)(?:#([^)\s]+))?\)", readme.read())
    broken = []
    for target, anchor in links:
        path = os.path.join(REPO, target)
        if not os.path.isfile(path):
            broken.append(f"{target}: no such file")
            continue
        if anchor:
            with open(path) as page:
                headings = {_slug(line.lstrip("#")) for line in page.read().splitlines() if re.match(r"#+ ", line)}
            if anchor not in headings:
                broken.append(f"{target}#{anchor}: no such heading")
    assert links and not broken, broken


@pytest.fixture(scope="module")
def example_environment(mariadb, postgres, MySQLdb, psycopg2) -> dict:  # noqa: N803 - the fixture's name
    """The environment the examples read their settings from: the suite's servers."""
    import greenify

    env = dict(os.environ)
    # the greenify this session tests (the checkout's, or make sanitize's build)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(greenify.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH", "")]))
    env.update(MYSQL_HOST=mariadb.host, MYSQL_PORT=str(mariadb.port), MYSQL_USER=mariadb.user,
               MYSQL_PASSWORD=mariadb.password, MYSQL_DATABASE=mariadb.database,
               PGHOST=postgres.host, PGPORT=str(postgres.port), PGUSER=postgres.user,
               PGDATABASE=postgres.database)
    return env


RUNNABLE = [block for block in python_blocks(documents_with_unclosed_fences_too=True) if block.not_run is None]


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_example_runs_as_pasted(block: Block, example_environment: dict, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(block.code)
    try:
        finished = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=example_environment,
                                  capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"{block.name}: still running after {EXAMPLE_TIMEOUT_S} s\n{expired.stdout}\n{expired.stderr}")
    print(f"{block.name}:\n{finished.stdout}")
    assert finished.returncode == 0, (f"{block.name} failed (exit status {finished.returncode}):\n"
                                      f"{block.code}\n--- stdout\n{finished.stdout}\n--- stderr\n{finished.stderr}")
