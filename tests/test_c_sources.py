"""The C core keeps two rules of STYLE.md that a compiler does not check by itself.

- One file for every ordering primitive: no ``__atomic_*`` builtin and no
  ``atomic_*_explicit`` call outside ``csrc/atomics.h``.
- Results that must be used: every public function of the core that returns a
  status is defined with ``SHMFEED_MUST_USE`` (``warn_unused_result``), so a call
  inside the library that drops one is a compiler warning.
"""

from __future__ import annotations

import re
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def test_every_atomic_primitive_lives_in_atomics_h():
    offenders = []
    for path in sorted(CSRC.glob("*.[ch]")):
        if path.name == "atomics.h":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"__atomic_\w+|\batomic_\w+_explicit\b|__sync_\w+", line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == [], "atomics outside atomics.h:\n" + "\n".join(offenders)


def test_every_public_status_returning_function_is_must_use():
    unmarked = []
    for path in sorted(CSRC.glob("*.c")):
        text = path.read_text()
        # A definition at the start of a line: `int shmfeed_x(...)` followed by its body.
        for match in re.finditer(r"^(SHMFEED_MUST_USE )?int (shmfeed_\w+)\([^;{]*\)\s*\{", text, re.M):
            if not match.group(1):
                unmarked.append(f"{path.name}: {match.group(2)}")
    assert unmarked == [], "status-returning functions without SHMFEED_MUST_USE:\n" + "\n".join(unmarked)
