"""The manual (docs/) and the README say only what exists: every config key they name is a key of a config, every
config they show loads, every kd command they name answers `--help` and has the options they give it, every
script they run is there, and every relative link and anchor resolves. (The site's own strict build, which checks
the manual's links too, is in the test command: scripts/test.sh.)"""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from kd.cache_config import CacheConfig
from kd.cli import COMMANDS, main
from kd.config import load_config
from kd.train_config import TrainConfig

PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _keys(cls, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every dotted key of a config class, the keys whose values are free-form mappings: anything below goes)."""
    keys, open_ = set(), set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        keys.add(key)
        inner = [t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)]
        if inner:
            sub, sub_open = _keys(inner[0], key + ".")
            keys |= sub
            open_ |= sub_open
        elif dict in (typing.get_origin(tp), *map(typing.get_origin, typing.get_args(tp))):
            open_.add(key)
    return keys, open_


CACHE_KEYS, CACHE_OPEN = _keys(CacheConfig)
TRAIN_KEYS, TRAIN_OPEN = _keys(TrainConfig)
KEYS, OPEN = CACHE_KEYS | TRAIN_KEYS, CACHE_OPEN | TRAIN_OPEN
SECTIONS = {k for k in KEYS if "." not in k}
KEY = re.compile(r"(?<![\w./$-])(" + "|".join(sorted(SECTIONS)) + r")\.([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)")
NOT_KEYS = (".py", ".yaml", ".yml", ".json", ".jsonl", ".md", ".h5", ".npy", ".png", ".txt")


def _code(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(inline code spans outside fenced blocks, fenced blocks as (language, body))."""
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    return re.findall(r"`([^`\n]+)`", FENCE.sub("", text)), blocks


def _named_keys(page: Path) -> set[str]:
    spans, blocks = _code(page.read_text())
    texts = spans + [body for lang, body in blocks if lang in ("bash", "")]
    found = set()
    for text in texts:
        for m in KEY.finditer(text):
            key = f"{m.group(1)}.{m.group(2)}"
            if not key.endswith(NOT_KEYS):
                found.add(key)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_config_key_a_page_names_exists(page):
    def known(key: str) -> bool:
        return key in KEYS or any(key.startswith(k + ".") for k in OPEN)

    missing = sorted(k for k in _named_keys(page) if not known(k))
    assert not missing, f"{page.name} names config keys that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_config_a_page_shows_loads(page, tmp_path):
    """A YAML block whose sections are a config's is loaded as that config: wrong keys and types fail here. A block
    showing some sections only stands in for those sections of the shipped demo config."""
    for lang, body in _code(page.read_text())[1]:
        data = yaml.safe_load(body) if lang == "yaml" else None
        for cls, base in ((CacheConfig, "shakespeare_smollm2"), (TrainConfig, "train_shakespeare")):
            sections = {f.name for f in dataclasses.fields(cls)}
            if isinstance(data, dict) and data and set(data) <= sections:
                full = dict(yaml.safe_load((ROOT / "configs" / f"{base}.yaml").read_text()), **data)
                (tmp_path / "c.yaml").write_text(yaml.safe_dump(full))
                load_config(cls, tmp_path / "c.yaml")


def _command_lines(page: Path) -> list[list[str]]:
    """Each `kd ...` or `python -m kd...` command line a page shows, as words (up to a comment or a shell operator)."""
    spans, blocks = _code(page.read_text())
    lines = [line for lang, body in blocks if lang in ("bash", "") for line in body.splitlines()] + spans
    found = []
    for line in lines:
        for m in re.finditer(r"(?:^|[\s(])((?:kd|python -m kd(?:\.[\w.]+)?) [^#|;&)`]*)", line):
            try:
                words = shlex.split(m.group(1))
            except ValueError:
                words = m.group(1).split()
            found.append(words)
    return found


def _help_of(words: list[str], capsys) -> tuple[str, str]:
    """The command the words name and its `--help` text (run in this process)."""
    if words[:2] == ["python", "-m"]:
        module = words[2]
        command = next(
            (n for n, c in COMMANDS.items() if c.module in (module, module + ".__main__") and not c.prefix), None
        )
        if command is None and module == "kd.cache" and len(words) > 3:
            command = words[3]
        words = ["kd", command or "", *words[3:]]
    name = words[1] if len(words) > 1 else ""
    assert name in COMMANDS, f"{' '.join(words)}: no such kd command (kd --help lists them)"
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    return name, capsys.readouterr().out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_a_page_names_answers_help_with_its_options(page, capsys):
    for words in _command_lines(page):
        if len(words) < 2 or words[0] == "kd" and (words[1].startswith("-") or words[1].isupper()):
            continue  # `kd --help`, `kd -V`, `kd COMMAND --help`
        name, text = _help_of(words, capsys)
        for option in (w.split("=")[0] for w in words if w.startswith("--")):
            assert option == "--help" or option in text, f"{page.name}: `kd {name}` has no option {option}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_script_a_page_runs_is_there(page):
    text = page.read_text()
    scripts = set(re.findall(r"(?:python|bash) ((?:bench|scripts|tests)/[\w/.-]+\.(?:py|sh))", text))
    missing = sorted(s for s in scripts if not (ROOT / s).is_file())
    assert not missing, f"{page.name} runs scripts that do not exist: {missing}"


def _anchors(page: Path) -> set[str]:
    """The heading anchors of a page, as MkDocs' toc extension and GitHub make them."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\s-]", "", heading.replace("`", "").lower()).strip()
        out.add(re.sub(r"[\s]+", "-", slug))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_file(), f"{page.name} links to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name} links to {target}: no such heading in {linked.name}"


def test_the_readme_stays_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move detail into docs/"
    first_block = FENCE.search("\n".join(lines)).group(2).splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_every_page_is_in_the_sites_nav():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {next(iter(entry.values())) for entry in nav}
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}
