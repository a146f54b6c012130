"""The base class of every error cocam raises on purpose.

Each specific error also keeps its natural built-in base (``FileNotFoundError`` for a missing dataset,
``ValueError`` for a malformed file, ...), so ``except ValueError`` keeps working; ``CocamError`` lets a
caller — the command line above all — tell "cocam refused, with a message meant for a person" apart from
a bug. The CLI prints a ``CocamError`` as one line, ``cocam <command>: error: <message>``, and exits 1.
"""

from __future__ import annotations


class CocamError(Exception):
    """An error whose message names the problem and the fix; shown to users as one line."""
