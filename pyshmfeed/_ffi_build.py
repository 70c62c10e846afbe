"""Build step: turn csrc/shmfeed.h into the cffi extension's C source.

Run by CMake (see CMakeLists.txt) as ``python _ffi_build.py HEADER OUT.c``.
The header goes to ``ffi.cdef`` as it is, less its preprocessor lines (cdef
does not run a preprocessor), so the ABI is written down exactly once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cffi


def cdef_text(header: str) -> str:
    return "\n".join(line for line in header.splitlines() if not line.lstrip().startswith("#"))


def main(header_path: str, out_path: str) -> None:
    ffi = cffi.FFI()
    ffi.cdef(cdef_text(Path(header_path).read_text()))
    ffi.set_source("pyshmfeed._shmfeed_cffi", '#include "shmfeed.h"')
    ffi.emit_c_code(out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
