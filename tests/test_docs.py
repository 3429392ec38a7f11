"""The documentation keeps up with the code: its links lead somewhere, the files and Python names it cites exist,
and every `python scripts/NAME.py ...` command it shows is one that script's argument parser accepts."""

from __future__ import annotations

import argparse
import dataclasses
import pkgutil
import re
import shlex
from pathlib import Path

import pytest
from helpers import ROOT, load_script
from ttl_core.run_config import DataConfig, TrainConfig

DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
CITED_PATH = re.compile(r"`((?:scripts|configs|tests|docs|ttl_core|ttl_kernels|benchmarks)/[\w.*/-]+)`")
PYTHON_NAME = re.compile(r"\b(?:ttl_core|ttl_kernels)(?:\.\w+)+")
CITED_SETTING = re.compile(r"`(?:--set )?(train|data)\.(\w+)")
FILE_SUFFIXES = {"bin", "json", "jsonl", "png", "py", "txt"}  # `train.bin` is a file, not a setting
SHELL_AFTER_COMMAND = re.compile(r"\s+(?:\|&?|;|&&|\d?>>?)")
SCRIPT_COMMAND = re.compile(r"(?:^|&&|;)\s*(?:python|torchrun|srun python)\b.*?\b(scripts/\w+\.py\b.*)")


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = CODE_BLOCK.sub("", path.read_text(encoding="utf-8"))
    return {heading_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def documented_commands(path: Path) -> list[str]:
    """The `python scripts/NAME.py ...` lines of the page's shell blocks (also under torchrun or srun), with
    continuation lines joined, the launcher dropped and what follows a pipe, a redirection or a `;` or `&&` cut off;
    a line with an elided `...` shows no whole command."""
    commands = []
    for language, body in CODE_BLOCK.findall(path.read_text(encoding="utf-8")):
        if language != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            match = SCRIPT_COMMAND.search(line.split(" #")[0].strip())
            command = match and SHELL_AFTER_COMMAND.split(match.group(1))[0]
            if command and " ... " not in f"{command} ":
                commands.append(command)
    return commands


@pytest.mark.parametrize("page", DOCS, ids=doc_id)
def test_relative_links_lead_to_a_file_and_heading_that_exist(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://")):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        assert linked.exists(), f"{doc_id(page)} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{doc_id(page)} links to {target}: no such heading"


@pytest.mark.parametrize("page", DOCS, ids=doc_id)
def test_cited_files_exist(page):
    for cited in CITED_PATH.findall(page.read_text(encoding="utf-8")):
        if cited.startswith("benchmarks/results"):  # what a GPU run writes
            continue
        assert list(ROOT.glob(cited)) or (page.parent / cited).exists(), f"{doc_id(page)} cites {cited}"


@pytest.mark.parametrize("page", DOCS, ids=doc_id)
def test_cited_python_names_exist(page):
    for name in sorted(set(PYTHON_NAME.findall(page.read_text(encoding="utf-8")))):
        try:
            pkgutil.resolve_name(name)  # imports the modules the dotted name goes through
        except (ImportError, AttributeError) as e:
            pytest.fail(f"{doc_id(page)} cites {name}: {e}")


@pytest.mark.parametrize("page", DOCS, ids=doc_id)
def test_cited_settings_are_config_fields(page):
    """A `train.KEY` or `data.KEY` a page cites is a field of the config (a misspelt one is refused by --set)."""
    fields = {"train": TrainConfig, "data": DataConfig}
    for section, key in CITED_SETTING.findall(page.read_text(encoding="utf-8")):
        if key not in FILE_SUFFIXES:
            assert key in {f.name for f in dataclasses.fields(fields[section])}, f"{doc_id(page)} cites {section}.{key}"


class _Parsed(Exception):
    """Raised in place of the work a script would do once its arguments are parsed."""


@pytest.mark.parametrize("page", DOCS, ids=doc_id)
def test_documented_commands_are_accepted_by_their_scripts(page, monkeypatch, capsys):
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        parser.allow_abbrev = False  # a page should name an option in full
        parse_args(parser, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for command in documented_commands(page):
        script, *argv = shlex.split(command)
        try:
            load_script(Path(script).stem).main(argv)
        except _Parsed:
            continue
        except SystemExit:  # argparse's refusal
            pytest.fail(f"{doc_id(page)} shows `python {command}`, which its script refuses: "
                        f"{capsys.readouterr().err.strip().splitlines()[-1]}")
        pytest.fail(f"`python {command}` ran without parsing its arguments")
