"""bindings/_cdef.h is cffi's hand copy of csrc/tl.h: the same #define
names, the same functions with the same parameters, the same struct fields
in the same order. The build compiles tl.h in, so a different arity or
pointer type already fails there; this catches the rest (a constant or
function left out, fields swapped or renamed)."""

from __future__ import annotations

import os
import re

from thunderlink.bindings import lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TL_H = os.path.join(ROOT, "src", "thunderlink", "csrc", "tl.h")
CDEF = os.path.join(ROOT, "src", "thunderlink", "bindings", "_cdef.h")


def strip(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r'extern "C" \{|^\}\s*$', " ", text, flags=re.M)
    return text


def norm(text: str) -> str:
    """One spelling of a declaration: single spaces, '*' next to the type."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s*\*\s*", " *", text)
    text = re.sub(r"\s*([(),\[\]])\s*", r"\1", text)
    # Array sizes named by constants: the copy spells them as numbers.
    return re.sub(r"\[(TL_\w+)\]", lambda m: f"[{getattr(lib, m.group(1))}]", text)


def defines(text: str) -> set[str]:
    return set(re.findall(r"^\s*#define\s+(TL_\w+)", text, flags=re.M))


def structs(text: str) -> dict[str, list[str]]:
    """typedef struct name { fields } -> the fields, one per declarator."""
    out = {}
    for name, body in re.findall(r"typedef struct (\w+) \{(.*?)\} \w+;", text, flags=re.S):
        fields = []
        for decl in body.split(";"):
            decl = norm(decl)
            if not decl:
                continue
            if "(" in decl:  # a function pointer
                fields.append(decl)
                continue
            base, first = re.match(r"(.*?)\s*(\**\w+(?:\[\w+\])?)$", decl.split(",")[0]).groups()
            fields.append(norm(f"{base} {first}"))
            fields += [norm(f"{base} {more.strip()}") for more in decl.split(",")[1:]]
        out[name] = fields
    return out


def functions(text: str) -> dict[str, str]:
    """Prototypes at the top level: name -> normalised declaration."""
    text = re.sub(r"typedef struct \w+ \{.*?\} \w+;", " ", text, flags=re.S)
    out = {}
    for m in re.finditer(r"([A-Za-z_][\w \*]*?\**\s*\b(tl_\w+)\s*\([^;{]*?\))\s*;", text, flags=re.S):
        out[m.group(2)] = norm(m.group(1))
    return out


def parts(path: str):
    with open(path, encoding="utf-8") as f:
        text = strip(f.read())
    return defines(text), structs(text), functions(text)


def compare(tl_h: str, cdef: str) -> list[str]:
    """Differences between the header and its copy, as sentences."""
    (hd, hs, hf), (cd, cs, cf) = parts(tl_h), parts(cdef)
    problems = []
    hd.discard("TL_H")
    for name in sorted(hd - cd):
        problems.append(f"#define {name} is in tl.h but not in _cdef.h")
    for name in sorted(cd - hd):
        problems.append(f"#define {name} is in _cdef.h but not in tl.h")
    for name, fields in cs.items():
        if name not in hs:
            problems.append(f"struct {name} is in _cdef.h but not in tl.h")
        elif fields != hs[name]:
            problems.append(f"struct {name}: tl.h has {hs[name]}, _cdef.h has {fields}")
    for name in hs:
        if name not in cs and not re.search(rf"typedef struct {name} \w+;", open(cdef).read()):
            problems.append(f"struct {name} is in tl.h but not in _cdef.h")
    for name in sorted(set(hf) | set(cf)):
        if name not in cf:
            problems.append(f"{name} is declared in tl.h but not in _cdef.h")
        elif name not in hf:
            problems.append(f"{name} is declared in _cdef.h but not in tl.h")
        elif hf[name] != cf[name]:
            problems.append(f"{name}: tl.h declares {hf[name]!r}, _cdef.h {cf[name]!r}")
    return problems


def test_the_parser_sees_the_header():
    d, s, f = parts(TL_H)
    assert {"TL_OK", "TL_ERR_INVALID", "TL_OPT_CHOICE", "TL_HOW_RING"} <= d
    assert s["tl_options"][:4] == ["uint64_t job_id", "uint8_t token_key[32]", "int32_t token_set",
                                   "int32_t connect_timeout_ms"]
    assert s["tl_stats"][0] == "uint64_t calls[8]"
    assert "int64_t min" in s["tl_option_info"]
    assert f["tl_all_reduce"] == ("int tl_all_reduce(tl_comm_t *comm,const void *in,void *out,uint64_t count,"
                                  "int dtype,int op)")
    assert f["tl_strerror"] == "const char *tl_strerror(int status)"
    assert len(f) >= 35


def test_cdef_matches_tl_h():
    problems = compare(TL_H, CDEF)
    assert not problems, "\n".join(problems)


def test_a_planted_mismatch_is_found(tmp_path):
    with open(CDEF, encoding="utf-8") as f:
        text = f.read()
    plants = [
        (text.replace("  int32_t pipeline_depth;\n", "").replace(
            "  int32_t conns_per_peer;\n", "  int32_t pipeline_depth;\n  int32_t conns_per_peer;\n"),
         "struct tl_options"),
        (text.replace("#define TL_ERR_CLOSED ...\n", ""), "TL_ERR_CLOSED"),
        (text.replace("int tl_barrier(tl_comm_t *comm);\n", ""), "tl_barrier"),
        (text.replace("int tl_send(tl_comm_t *comm, const void *buf, uint64_t count, int dtype, int peer);",
                      "int tl_send(tl_comm_t *comm, const void *buf, uint64_t count, int peer, int dtype);"),
         "tl_send"),
    ]
    for planted, needle in plants:
        assert planted != text, needle
        path = tmp_path / "cdef.h"
        path.write_text(planted)
        problems = compare(TL_H, str(path))
        assert any(needle in p for p in problems), (needle, problems)


def test_the_build_depends_on_every_header():
    """setuptools rebuilds the core when a file in SOURCES or HEADERS is
    newer than it; a header left out (the options table) would leave a
    stale core after an edit."""
    csrc = os.path.dirname(TL_H)
    on_disk = {os.path.relpath(os.path.join(d, f), csrc) for d, _, fs in os.walk(csrc) for f in fs
               if f.endswith(".h")}
    with open(os.path.join(ROOT, "src", "thunderlink", "bindings", "_build.py"), encoding="utf-8") as f:
        listed = set(re.findall(r'"([\w/]+\.h)"', f.read().split("HEADERS = [", 1)[1].split("]", 1)[0]))
    assert listed == on_disk
