"""Checks and how they are printed: one block per problem (what, where, fix),
one line per passed check, or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = ["Check", "Report", "OK", "WARN", "PROBLEM"]

OK, WARN, PROBLEM = "ok", "warn", "problem"
_ORDER = {PROBLEM: 0, WARN: 1, OK: 2}


@dataclass
class Check:
    status: str  # ok | warn | problem
    check: str  # hostfile, ring, cable, address, interface, port, peer, route, mtu, netns, bridge, subnet, rdma
    title: str  # a few words: "port in use", "MTU mismatch"
    message: str  # what is wrong (or what was found right), naming rank/address/interface
    fix: str | None = None  # a command or hostfile edit
    rank: int | None = None
    address: str | None = None  # ip:port
    iface: str | None = None
    where: str | None = None  # host or namespace the check ran on
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Check":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def key(self) -> tuple:
        return (self.status, self.check, self.message, self.rank, self.address)


def ok(check: str, title: str, message: str, **kw) -> Check:
    return Check(OK, check, title, message, **kw)


def warn(check: str, title: str, message: str, fix: str | None = None, **kw) -> Check:
    return Check(WARN, check, title, message, fix, **kw)


def problem(check: str, title: str, message: str, fix: str | None = None, **kw) -> Check:
    return Check(PROBLEM, check, title, message, fix, **kw)


@dataclass
class Report:
    header: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # JSON-only material (interfaces, facts)
    text_sections: list[str] = field(default_factory=list)  # printed before the checks

    def add(self, c: Check) -> None:
        if not any(c.key() == o.key() for o in self.checks):
            self.checks.append(c)

    def extend(self, cs) -> None:
        for c in cs:
            self.add(c)

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c.status == status)

    @property
    def exit_status(self) -> int:
        return 1 if self.count(PROBLEM) else 0

    # ------------------------------------------------------------------ output

    def to_json(self) -> str:
        out = {
            "ok": self.count(PROBLEM) == 0,
            "problems": self.count(PROBLEM),
            "warnings": self.count(WARN),
            "checks": [c.to_dict() for c in self.checks],
        }
        out.update(self.extra)
        return json.dumps(out, indent=1, default=str)

    def to_text(self, verbose: bool = True) -> str:
        lines = list(self.header)
        for s in self.text_sections:
            if lines:
                lines.append("")
            lines.append(s)
        oks = [c for c in self.checks if c.status == OK]
        bad = sorted((c for c in self.checks if c.status != OK), key=lambda c: _ORDER[c.status])
        if verbose and oks:
            if lines:
                lines.append("")
            for c in oks:
                lines.append(f"ok       {'rank %d: ' % c.rank if c.rank is not None else ''}{c.message}")
        for c in bad:
            lines.append("")
            lines.extend(_block(c))
        n_p, n_w = self.count(PROBLEM), self.count(WARN)
        lines.append("")
        if n_p or n_w:
            parts = []
            if n_p:
                parts.append(f"{n_p} problem{'s' if n_p != 1 else ''}")
            if n_w:
                parts.append(f"{n_w} warning{'s' if n_w != 1 else ''}")
            lines.append(f"{', '.join(parts)}; {len(oks)} check{'s' if len(oks) != 1 else ''} passed")
        else:
            lines.append(f"no problems found ({len(oks)} check{'s' if len(oks) != 1 else ''} passed)")
        return "\n".join(lines) + "\n"


def _block(c: Check) -> list[str]:
    label = "PROBLEM" if c.status == PROBLEM else "WARNING"
    loc = []
    if c.rank is not None:
        loc.append(f"rank {c.rank}")
    if c.address:
        loc.append(c.address)
    if c.iface:
        loc.append(f"interface {c.iface}")
    if c.where:
        loc.append(f"[{c.where}]")
    out = [f"{label}: {c.title}" + (f" -- {', '.join(loc)}" if loc else "")]
    for line in c.message.splitlines():
        out.append(f"  {line}")
    if c.fix:
        fl = c.fix.splitlines()
        out.append(f"  fix: {fl[0]}")
        out.extend(f"       {x}" for x in fl[1:])
    return out
