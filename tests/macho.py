"""Just enough of a Mach-O reader for tests/test_macos_build.py: the symbol
table, the libraries an image links and its rpaths, read from a 64-bit
little-endian (arm64 or x86_64) object file, bundle or dylib.

No tool on a Linux machine reads Mach-O reliably (GNU nm does not; llvm-nm
is not always installed), so the test reads the files itself. The layouts
are those of <mach-o/loader.h> and <mach-o/nlist.h>.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MH_MAGIC_64 = 0xFEEDFACF
FAT_MAGICS = (0xCAFEBABE, 0xBEBAFECA, 0xCAFEBABF, 0xBFBAFECA)

LC_SYMTAB = 0x2
LC_RPATH = 0x8000001C
# Every command that adds a library, in order, numbers the libraries that an
# undefined symbol's "library ordinal" refers to (1 = the first).
LC_LIBRARY = {
    0xC,  # LC_LOAD_DYLIB
    0x80000018,  # LC_LOAD_WEAK_DYLIB
    0x8000001F,  # LC_REEXPORT_DYLIB
    0x20,  # LC_LAZY_LOAD_DYLIB
    0x80000023,  # LC_LOAD_UPWARD_DYLIB
}

N_STAB = 0xE0  # debugger entries, not symbols
N_PEXT = 0x10  # private external: global inside the image, not exported
N_TYPE = 0x0E
N_UNDF = 0x0
N_EXT = 0x01


@dataclass
class MachO:
    path: str
    libraries: list[str] = field(default_factory=list)  # install names, ordinal - 1
    rpaths: list[str] = field(default_factory=list)
    defined: set[str] = field(default_factory=set)  # global definitions, exported or not
    exported: set[str] = field(default_factory=set)  # what other images can bind to
    undefined: dict[str, str | None] = field(default_factory=dict)  # name -> library, None: none named

    def undefined_from(self, library_suffix: str) -> set[str]:
        return {n for n, lib in self.undefined.items() if lib and lib.endswith(library_suffix)}

    def unbound(self) -> set[str]:
        """Undefined symbols bound to none of the image's libraries: left for
        the process to provide at load time (-undefined dynamic_lookup)."""
        return {n for n, lib in self.undefined.items() if lib is None}


def read(path: str) -> MachO:
    with open(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack_from(">I", data, 0)
    if magic in FAT_MAGICS:
        raise ValueError(f"{path}: a universal (fat) Mach-O file; only single-architecture files are read")
    (magic, _cpu, _sub, _filetype, ncmds, _size, _flags, _res) = struct.unpack_from("<IiiIIIII", data, 0)
    if magic != MH_MAGIC_64:
        raise ValueError(f"{path}: not a 64-bit little-endian Mach-O file (magic {magic:#x})")

    image = MachO(path)
    symtab = None
    offset = 32  # sizeof(struct mach_header_64)
    for _ in range(ncmds):
        cmd, cmdsize = struct.unpack_from("<II", data, offset)
        if cmd in LC_LIBRARY or cmd == LC_RPATH:
            # dylib_command and rpath_command both start with the offset of
            # their NUL-terminated string, from the start of the command.
            (name_at,) = struct.unpack_from("<I", data, offset + 8)
            text = _cstring(data, offset + name_at)
            (image.libraries if cmd in LC_LIBRARY else image.rpaths).append(text)
        elif cmd == LC_SYMTAB:
            symtab = struct.unpack_from("<IIII", data, offset + 8)
        offset += cmdsize

    if symtab is None:
        return image
    symoff, nsyms, stroff, _strsize = symtab
    for i in range(nsyms):
        strx, ntype, _sect, desc, value = struct.unpack_from("<IBBHQ", data, symoff + 16 * i)
        if ntype & N_STAB or not ntype & N_EXT:
            continue
        name = _cstring(data, stroff + strx)
        if ntype & N_TYPE == N_UNDF and value == 0:  # value != 0: a common symbol, defined
            ordinal = desc >> 8
            # 0 (zig's linker) and 0xFE (DYNAMIC_LOOKUP_ORDINAL, Apple's ld):
            # looked up in the whole process; 0xFF: the main executable.
            named = 1 <= ordinal <= len(image.libraries)
            image.undefined[name] = image.libraries[ordinal - 1] if named else None
        else:
            image.defined.add(name)
            if not ntype & N_PEXT:
                image.exported.add(name)
    return image


def _cstring(data: bytes, at: int) -> str:
    return data[at:data.index(b"\0", at)].decode("utf-8", "replace")
