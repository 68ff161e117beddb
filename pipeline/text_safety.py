"""Text from outside (prompts, file names, metadata read from images) made safe to print on a terminal.

A prompt or a file name may hold ESC / CSI / OSC sequences (which set the window title, clear the screen,
move the cursor), BEL, CR (which overwrites the line), a newline (which splits a table row), other C0 / C1
controls, or Unicode bidi overrides (which show text reversed).  ``printable`` escapes each of them as
Python writes it (``\\x1b``, ``\\n``, ``\\u202e``), and leaves every other character, backslashes included,
as it is.  Human-readable output goes through it; JSON, JSON Lines and CSV output stay exact.
"""

from __future__ import annotations

import re

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 controls, DEL, C1 controls; the bidi embeddings, overrides, isolates and marks; line / paragraph
# separators; surrogates (an undecodable byte of a file name, as os.fsdecode keeps it, cannot be printed).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the file name's raw byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``str(text)`` with every control character escaped (see the module's docstring); a pure function."""
    return _UNSAFE.sub(_escape, str(text))
