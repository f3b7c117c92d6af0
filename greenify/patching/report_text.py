"""The text of the inventory's reports (greenify/patching/inventory.py), as
greenify-inspect prints them and as they print themselves (without
colour).  It reads the reports' attributes only and imports neither side."""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, TextIO


def tls_line(library: Any, tls: Sequence[Any]) -> str:
    where = "; ".join(f"{entry.name} ({', '.join(entry.io_calls)})" for entry in tls)
    return f"TLS: encrypted connections read and write the socket in {where}, not in {library.patch_name}"


@dataclass(frozen=True)
class Painter:
    """ANSI colour, only on a terminal and only without NO_COLOR."""

    enabled: bool

    @classmethod
    def for_stream(cls, stream: TextIO, choice: str) -> "Painter":
        if choice != "auto":
            return cls(choice == "always")
        return cls(stream.isatty() and not os.environ.get("NO_COLOR"))

    def paint(self, text: str, *codes: int) -> str:
        if not self.enabled or not codes:
            return text
        return f"\033[{';'.join(map(str, codes))}m{text}\033[0m"

    def bold(self, text: str) -> str:
        return self.paint(text, 1)

    def good(self, text: str) -> str:
        return self.paint(text, 32)

    def warn(self, text: str) -> str:
        return self.paint(text, 33)

    def dim(self, text: str) -> str:
        return self.paint(text, 2)


def import_table(library: Any, painter: Painter, indent: str = "  ") -> List[str]:
    """Symbol, version, relocation, slot offset, twin (and patched, when known)."""
    with_patched = any(imp.patched is not None for imp in library.imports)
    header = ["symbol", "version", "relocation", "slot", "green twin"] + (["patched"] if with_patched else [])
    rows = []
    for imp in library.imports:
        row = [imp.symbol, imp.version or "-", imp.relocation_type, f"{imp.slot_offset:#x}",
               "yes" if imp.green_twin else "no"]
        if with_patched:
            row.append("yes" if imp.patched else "no")
        rows.append(row)
    widths = [max(len(row[column]) for row in rows + [header]) for column in range(len(header))]

    def line(cells: List[str], styled: List[str]) -> str:
        # pad on the plain text: escape codes take no columns
        padded = [styled[i] + " " * (widths[i] - len(cells[i])) for i in range(len(cells))]
        return (indent + "  ".join(padded)).rstrip()

    lines = [line(header, [painter.bold(cell) for cell in header])]
    for row in rows:
        styled = list(row)
        styled[4] = painter.good(row[4]) if row[4] == "yes" else painter.warn(row[4])
        lines.append(line(row, styled))
    return lines


def verdict_lines(library: Any, painter: Painter, indent: str) -> List[str]:
    """The verdict, wrapped to 80 columns (JSON keeps it on one line)."""
    paint = painter.good if library.can_patch else painter.warn
    return [paint(line) for line in textwrap.wrap(library.verdict, 79, initial_indent=indent,
                                                  subsequent_indent=indent + "  ", break_on_hyphens=False)]


def render_file(target: str, library: Any, painter: Painter, tls: Sequence[Any] = ()) -> List[str]:
    title = library.path if target == library.path else f"{target} -> {library.path}"
    if library.soname and library.soname != os.path.basename(library.path):
        title += f" (soname {library.soname})"
    lines = [painter.bold(title)]
    if library.imports:
        lines += import_table(library, painter)
    lines += verdict_lines(library, painter, "  ")
    if tls:
        lines += textwrap.wrap(tls_line(library, tls), 79, initial_indent="  ", subsequent_indent="    ",
                               break_on_hyphens=False)
    return lines


def _symbols_line(library: Any) -> str:
    network = sorted({imp.symbol for imp in library.imports if imp.network and imp.green_twin})
    other = sorted({imp.symbol for imp in library.imports if not imp.network and imp.green_twin})
    parts = []
    if network:
        parts.append("network: " + " ".join(network))
    if other:
        parts.append("other: " + " ".join(other))
    if library.missing_twins:
        parts.append("no twin: " + " ".join(library.missing_twins))
    return "; ".join(parts)


def render_process(process: Any, painter: Painter, verbose: bool,
                   tls: Optional[Dict[str, List[Any]]] = None,
                   patch_all: Optional[Dict[str, Any]] = None) -> List[str]:
    lines = [painter.bold(f"{process.source}: {process.objects_inspected} objects loaded, "
                          f"{len(process.libraries)} import blocking functions")]
    if process.executable:
        lines.append(painter.dim(process.executable))
    for library in process.libraries:
        name = library.patch_name
        marker = painter.paint(f"* {name}  (recommended)", 1, 32) if library.recommended else "  " + name
        lines += ["", marker, "    " + painter.dim(library.path)]
        if library.imports:
            lines += textwrap.wrap(_symbols_line(library), 78, initial_indent="    ", subsequent_indent="      ")
        if verbose and library.imports:
            lines += import_table(library, painter, indent="    ")
        lines += verdict_lines(library, painter, "    ")
        if (tls or {}).get(library.path):
            lines += textwrap.wrap(tls_line(library, tls[library.path]), 78, initial_indent="    ",
                                   subsequent_indent="      ", break_on_hyphens=False)
        if library.note and not library.recommended:
            lines += textwrap.wrap(library.note, 78, initial_indent="    ", subsequent_indent="    ")
        verdict = (patch_all or {}).get(library.path)
        if verdict is not None:
            paint = painter.good if verdict.patch else painter.dim
            lines += [paint(line) for line in textwrap.wrap("patch_all: " + verdict.text, 78, initial_indent="    ",
                                                            subsequent_indent="      ", break_on_hyphens=False)]
    lines.append("")
    if process.recommended:
        lines.append(painter.paint("recommended:", 1, 32))
        lines += [f'  greenify.patch_library("{library.patch_name}")' for library in process.recommended]
    else:
        lines += [painter.warn(line) for line in textwrap.wrap(
            "nothing to recommend: no loaded library outside Python, gevent and libc is a network client "
            "with calls greenify can patch", 79, subsequent_indent="  ")]
    return lines
