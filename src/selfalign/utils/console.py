"""The rich consoles every stage prints through: results to stdout, errors to stderr.

On a terminal rich fits its width. Piped to a file (`make all > log`) it would assume 80 columns and cut every
table's cells ("neutra…"); there, unless `COLUMNS` says otherwise, tables get `PIPED_WIDTH` columns.
"""

import os
import sys

from rich.console import Console

PIPED_WIDTH = 200


def _width(stream) -> int | None:
    if os.environ.get("COLUMNS") or stream.isatty():
        return None  # rich reads COLUMNS, or the terminal's size
    return PIPED_WIDTH


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))
