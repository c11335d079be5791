"""Sphinx configuration of the nero-deap documentation.

Build (strict: any warning fails the build)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python docs/check_cli_reference.py

The guides are Markdown (myst-parser); the command-line reference is generated
from ``nero_deap.cli.build_parser`` (sphinx-argparse) and the API reference
from the docstrings (autodoc), so neither can drift from the code.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's package, installed or not

import nero_deap  # noqa: E402

project = "nero-deap"
author = "nero-deap contributors"
copyright = "nero-deap contributors, MIT licence"
release = version = nero_deap.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinxarg.ext",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # show RunConfig's defaults as written (1 / 3, not 0.333...)
autodoc_inherit_docstrings = False  # torch's own docstrings (autograd.Function.forward) are not ours to build

# "--set" must stay two hyphens in the CLI reference's help texts, not become an en dash
smartquotes_action = "qe"

html_theme = "furo"
html_title = f"nero-deap {release}"
html_static_path = []
