"""The documentation site: it builds with ``mkdocs build --strict`` offline, the pages the
code cites exist, its examples run, and nothing cites a file outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: Sources whose text users and contributors read: they may cite only the project's own docs.
CITING_SOURCES = ("fisher_monitor", "docs", "examples", "benchmarks", "tests", "README.md")
#: Files outside the repository that once held the definitions (built from parts, so that
#: this file does not match itself).
OUTSIDE_FILES = ("DESIGN" + ".md", "shared" + "/", "empirical-fisher" + "-note")

#: Anchors the docstrings are told to cite; renaming one breaks their links.
CITED_ANCHORS = {
    "theory.md": (
        "likelihoods",
        "extra-positions",
        "fisher-and-ef",
        "ggn",
        "exact-mc",
        "blocks",
        "structures",
        "diag",
        "block",
        "kron",
        "damping",
        "metrics",
        "all",
        "keys",
        "numerical-health",
        "optimizer-audit",
        "step-audit",
        "preconditioner-audit",
        "batch-size",
        "estimators",
        "monte-carlo-labels",
        "matrix-free",
        "standard-errors",
        "identities",
        "references",
        "saturated",
        "sketch",
    ),
    "guide/callback.md": (
        "arguments",
        "schedules",
        "probe",
        "logged",
        "tensorboard",
        "summary",
        "failures",
        "optimizer-audit",
        "prefix",
        "ddp",
    ),
    "guide/measure.md": ("arguments", "measurer", "measurement"),
    "guide/report.md": (
        "report-command",
        "summary-command",
        "verdicts",
        "summary-json",
        "exit-codes",
    ),
    "guide/models.md": (
        "backends",
        "backpack-layers",
        "losses",
        "untouched",
        "parametrizations",
        "torch-compile",
        "fallback",
        "memory",
    ),
    "guide/cost.md": ("where", "measured", "choosing"),
}
#: A reference to a documentation page, with an optional anchor, in code or text. An anchor
#: cut short by an ellipsis ("docs/theory.md#est…", a note truncated in a benchmark table) is
#: not a reference to that anchor: only the page is checked.
DOC_LINK = re.compile(r"docs/((?:[\w-]+/)*[\w-]+\.md)(?:#([\w-]+))?(?![\w…-])")


def _text_files(sources=CITING_SOURCES):
    for source in sources:
        path = ROOT / source
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if file.suffix in (".py", ".md", ".yaml", ".yml", ".txt", ".j2", ".toml", ".css"):
                yield file


def test_no_citation_of_files_outside_the_repository():
    this_file = Path(__file__).resolve()
    found = []
    for file in _text_files():
        if file.resolve() == this_file:
            continue
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if any(name in line for name in OUTSIDE_FILES):
                found.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, (
        "These lines cite a file outside the repository, which users and contributors cannot "
        "open. Cite the project's documentation instead (docs/theory.md#<anchor>, "
        "docs/guide/<page>.md#<anchor>):\n" + "\n".join(found)
    )


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        source = attrs.get("src") if tag in ("script", "img", "iframe") else None
        if tag == "link" and attrs.get("rel") not in ("canonical",):
            source = attrs.get("href")
        if source and re.match(r"^(https?:)?//", source):
            self.external.append(f"<{tag}> {source}")


def _page(site: Path, page: str) -> _Ids:
    parser = _Ids()
    parser.feed((site / page.replace(".md", ".html")).read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {
        **os.environ,
        "NO_MKDOCS_2_WARNING": "1",
        # any attempt to fetch from the network during the build fails fast
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        "`mkdocs build --strict` failed (run `make docs` to see it):\n"
        + result.stdout[-4000:]
        + result.stderr[-4000:]
    )
    return out


@pytest.mark.slow
def test_docs_build_strict_offline(site):
    pages = sorted(p.relative_to(DOCS) for p in DOCS.rglob("*.md"))
    assert pages, "no documentation pages"
    for page in pages:
        assert (site / page.with_suffix(".html")).is_file(), f"{page} was not built"
    assert (site / "search" / "search_index.js").is_file() or (
        site / "search" / "search_index.json"
    ).is_file()


@pytest.mark.slow
def test_site_loads_nothing_from_the_network(site):
    external = []
    for page in site.rglob("*.html"):
        parser = _Ids()
        parser.feed(page.read_text(encoding="utf-8"))
        external += [f"{page.relative_to(site)}: {ref}" for ref in parser.external]
    assert not external, "pages load resources from the network:\n" + "\n".join(external)
    styles = "".join(p.read_text(encoding="utf-8") for p in site.rglob("*.css"))
    assert "fonts.googleapis.com" not in styles and "fonts.gstatic.com" not in styles


@pytest.mark.slow
def test_promised_anchors_exist(site):
    missing = [
        f"docs/{page}#{anchor}"
        for page, anchors in CITED_ANCHORS.items()
        for anchor in anchors
        if anchor not in _page(site, page).ids
    ]
    assert not missing, f"anchors the code is told to cite are gone: {missing}"


@pytest.mark.slow
def test_documentation_links_in_the_code_resolve(site):
    broken = []
    sources = ("fisher_monitor", "examples", "benchmarks", "README.md")
    for file in _text_files(sources):
        text = file.read_text(encoding="utf-8")
        for match in DOC_LINK.finditer(text):
            page, anchor = match.groups()
            where = f"{file.relative_to(ROOT)}: docs/{page}" + (f"#{anchor}" if anchor else "")
            if not (DOCS / page).is_file():
                broken.append(where + " (no such page)")
            elif anchor and anchor not in _page(site, page).ids:
                broken.append(where + " (no such anchor)")
    assert not broken, "links to the documentation that do not resolve:\n" + "\n".join(broken)


def _python_examples():
    """Self-contained ``python`` blocks of the docs (a ``<!-- fragment -->`` line before a
    block marks it as an excerpt that is not run)."""
    examples = []
    for page in sorted(DOCS.rglob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() != "```python":
                continue
            if i > 0 and lines[i - 1].strip() == "<!-- fragment -->":
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            examples.append(
                pytest.param("\n".join(lines[i + 1 : end]), id=f"{page.relative_to(DOCS)}:{i + 1}")
            )
    return examples


@pytest.mark.parametrize("code", _python_examples())
def test_python_examples_run(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs__"})  # noqa: S102


def _argument_table(page: str) -> dict[str, str]:
    """``{argument: default text}`` from the "Arguments" table of a guide page.

    A row may name several arguments with as many defaults (`` `fisher`, `mc_samples` ``
    | `` `"exact"`, `1` ``); an empty default cell means a required argument.
    """
    text = (DOCS / page).read_text(encoding="utf-8")
    section = text.split("## Arguments", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`(\w+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1])
        if not defaults:
            table.update(dict.fromkeys(names, ""))
            continue
        assert len(names) == len(defaults), f"{page}: cannot pair {cells[0]!r} with {cells[1]!r}"
        table.update(zip(names, defaults, strict=True))
    return table


@pytest.mark.parametrize(
    ("page", "target"),
    [("guide/callback.md", "FisherMonitor.__init__"), ("guide/measure.md", "measure")],
)
def test_argument_tables_match_the_signatures(page, target):
    """Every argument of the signature is in the guide's table, with its real default."""
    import inspect

    import torch

    import fisher_monitor

    owner, _, attribute = target.partition(".")
    function = getattr(fisher_monitor, owner)
    function = getattr(function, attribute) if attribute else function
    parameters = {
        name: parameter
        for name, parameter in inspect.signature(function).parameters.items()
        if name != "self"
    }
    documented = _argument_table(page)
    assert sorted(documented) == sorted(parameters), (
        f"{page}: the arguments table and the signature of {target} differ: documented only "
        f"{sorted(set(documented) - set(parameters))}, undocumented "
        f"{sorted(set(parameters) - set(documented))}"
    )
    for name, parameter in parameters.items():
        text = documented[name]
        if parameter.default is inspect.Parameter.empty:
            assert text == "", f"{page}: {name} is required, but the table gives {text!r}"
            continue
        value = eval(text, {"torch": torch})  # noqa: S307 - our own documentation
        assert value == parameter.default, (
            f"{page}: the table gives {name}={text}, the code's default is {parameter.default!r}"
        )
