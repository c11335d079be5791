#!/usr/bin/env python
"""Check that the built CLI reference documents every option of every command.

Run after building the docs::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python docs/check_cli_reference.py [docs/_build/html/cli.html]

It builds the parser from :func:`nero_deap.cli.build_parser`, collects every
option string of the top-level parser and of every subcommand, and looks for
each one in the built page: a subcommand's options inside that subcommand's
section (``<section id="nero-deap-COMMAND">``), the top-level options anywhere.
sphinx-argparse renders option names as ``<kbd>`` elements; the help options
(``-h``, ``--help``), which argparse adds to every parser and sphinx-argparse
never lists, are not checked.  Exit status 1, listing what is missing, if
anything is; 0 otherwise.
"""
from __future__ import annotations

import argparse
import sys
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PAGE = ROOT / "docs" / "_build" / "html" / "cli.html"
PROG = "nero-deap"  # the :prog: of the argparse directive in docs/cli.rst


class KbdBySection(HTMLParser):
    """The text of every ``<kbd>`` element, by the id of each ``<section>`` that encloses it."""

    def __init__(self) -> None:
        super().__init__()
        self.open_sections: list = []  # id (or None) of each open <section>, outermost first
        self.kbd_text: list | None = None
        self.found: dict = {}  # section id -> set of kbd texts; "" -> all of them

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.open_sections.append(dict(attrs).get("id"))
        elif tag == "kbd":
            self.kbd_text = []

    def handle_endtag(self, tag):
        if tag == "section" and self.open_sections:
            self.open_sections.pop()
        elif tag == "kbd" and self.kbd_text is not None:
            names = {name.strip() for name in "".join(self.kbd_text).split(",") if name.strip()}
            for section in ["", *filter(None, self.open_sections)]:
                self.found.setdefault(section, set()).update(names)
            self.kbd_text = None

    def handle_data(self, data):
        if self.kbd_text is not None:
            self.kbd_text.append(data)


def option_strings(parser: argparse.ArgumentParser) -> list:
    """Every option string of ``parser``'s own actions, help excepted, in order."""
    return [s for action in parser._actions if not isinstance(action, argparse._HelpAction)
            for s in action.option_strings]


def subcommands(parser: argparse.ArgumentParser) -> dict:
    """``{name: subparser}`` of the parser's subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def missing_options(page: Path) -> tuple:
    """``"COMMAND OPTION"`` for each option the page lacks (``"nero-deap OPTION"`` for top-level ones), and how
    many options were checked."""
    sys.path.insert(0, str(ROOT))
    from nero_deap.cli import build_parser

    parser = build_parser(PROG)
    html = KbdBySection()
    html.feed(page.read_text(encoding="utf-8"))
    missing = [f"{PROG} {s}" for s in option_strings(parser) if s not in html.found.get("", set())]
    checked = len(option_strings(parser))
    for name, sub in subcommands(parser).items():
        documented = html.found.get(f"{PROG}-{name}", set())
        missing += [f"{PROG} {name} {s}" for s in option_strings(sub) if s not in documented]
        checked += len(option_strings(sub))
    return missing, checked


def main(argv: list) -> int:
    page = Path(argv[0]) if argv else DEFAULT_PAGE
    if not page.is_file():
        print(f"{page}: no such file; build the docs first: "
              "python -m sphinx -W --keep-going -b html docs docs/_build/html", file=sys.stderr)
        return 1
    missing, checked = missing_options(page)
    if missing:
        print(f"{page}: {len(missing)} option(s) missing from the CLI reference:", file=sys.stderr)
        for item in missing:
            print(f"  {item}", file=sys.stderr)
        return 1
    print(f"{page}: all {checked} options of every command are documented")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
