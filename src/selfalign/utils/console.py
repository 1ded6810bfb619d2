"""The rich consoles every stage prints through: results to stdout, errors to stderr."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
