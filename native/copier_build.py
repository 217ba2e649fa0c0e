"""cffi out-of-line build of the native copier into ``host_agent.storage._copier``.

Named in ``setup.py``'s ``cffi_modules``; ``pip install .`` compiles it and
links Debian's libcrypto (libssl-dev) and libzstd (libzstd-dev).

The C API is declared once, in ``copier.h``: the cdef is that header without the lines
only the C compiler needs, so a function added there is all it takes to call it from Python.
"""
import re
from pathlib import Path

from cffi import FFI

HEADER = Path(__file__).resolve().with_name("copier.h")

# cffi's cdef takes declarations, comments and "#define NAME <integer>" as they stand, but no other
# preprocessor line: the include guard and the #includes go.
_COMPILER_ONLY = re.compile(r"^[ \t]*#[ \t]*(?:ifndef|endif|include)\b.*$"
                            r"|^[ \t]*#[ \t]*define[ \t]+HYPERBACK_COPIER_H[ \t]*$", re.MULTILINE)


def cdef_from_header(text: str) -> str:
    """The cdef of a header: its compiler-only lines blanked, so cffi's line numbers are the header's."""
    return _COMPILER_ONLY.sub("", text)


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(HEADER.read_text()))
ffibuilder.set_source(
    "host_agent.storage._copier",
    '#include "copier.h"',
    # relative to the project root, where setuptools runs this script
    sources=["native/copier.c"],
    include_dirs=["native"],
    libraries=["crypto", "zstd", "pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
