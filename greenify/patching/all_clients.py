"""``greenify.patch_all()``: greenify every C client in the process, now and
as it loads, the way ``gevent.monkey.patch_all()`` does Python's sockets.

    import greenify
    report = greenify.patch_all()         # activates the green functions too
    print(report)                         # what was patched, what was left and why
    greenify.unpatch_all()                # puts back exactly what it wrote, stops watching loads

What is patched is decided by greenify.patching.policy (the one rule, also used by
greenify-inspect); the writing is the patcher's (greenify.patching.patcher, one write
path and lock), and objects loaded later reach the same rule through
patch_on_load's dlopen hooks (greenify.patching.onload.watch_loads).
"""
from __future__ import annotations

import logging
import os
import re
import textwrap
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from greenify.patching import loaded
from greenify.patching import patcher
from greenify.patching import policy
from greenify.patching import slots
from greenify.patching.loaded import LoadedObject
from greenify.patching.onload import OnLoadPatch, watch_loads
from greenify.patching.patcher import ObjectReport

log = logging.getLogger("greenify")

Names = "Iterable[Union[str, os.PathLike[str], types.ModuleType]] | str | types.ModuleType | None"


@dataclass
class PatchAllReport:
    """What patch_all() did: the objects it patched (each ObjectReport says
    why, in ``reason``), those it left alone and why, those it could not
    patch, and the same for every object loaded since (``later``: True from
    the first object loaded after the call).  Truthy when something is patched."""

    include: str = ""
    exclude: str = ""
    patched: List[ObjectReport] = field(default_factory=list)
    left: List[Tuple[str, str, str]] = field(default_factory=list)   # (path, kind, reason)
    errors: List[Tuple[str, str]] = field(default_factory=list)      # (path, message)
    objects_looked_at: int = 0
    seconds: float = 0.0                       # the call itself
    later_loads: List[Tuple[int, int, float]] = field(default_factory=list)  # (objects, slots written, seconds)
    active: bool = True

    def __bool__(self) -> bool:
        return any(self.patched)

    @property
    def slots_written(self) -> int:
        return sum(len(obj.patched) for obj in self.patched)

    @property
    def patched_paths(self) -> List[str]:
        return [obj.path for obj in self.patched if obj]

    def decision(self, name_or_path: str) -> Optional[str]:
        """Why the object so named was patched or left (None: not looked at)."""
        for obj in self.patched:
            if name_or_path in (obj.path, os.path.basename(obj.path)):
                return f"patched: {obj.reason}"
        for path, _kind, reason in self.left + [(path, "error", message) for path, message in self.errors]:
            if name_or_path in (path, os.path.basename(path)):
                return reason
        return None

    def __str__(self) -> str:
        state = "in effect" if self.active else "undone"
        lines = [f"greenify.patch_all() ({state}): {self.slots_written} slot(s) in {sum(map(bool, self.patched))} "
                 f"object(s) of {self.objects_looked_at} looked at, in {self.seconds * 1000:.1f} ms"]
        if self.include or self.exclude:
            lines.append(f"  include: {self.include or '-'}; exclude: {self.exclude or '-'}")
        if self.later_loads:
            lines.append(f"  loaded since: {sum(count for count, _slots, _s in self.later_loads)} object(s) in "
                         f"{len(self.later_loads)} load(s), {sum(s for _c, s, _t in self.later_loads)} slot(s) written")
        lines.append("patched:" if self.patched else "patched: nothing")
        for obj in self.patched:
            symbols = sorted({slot.symbol for slot in obj.patched + obj.already_patched})
            count = len(obj.patched) + len(obj.already_patched)
            lines.append(f"  {os.path.basename(obj.path)}  ({count} slot(s): {' '.join(symbols) or 'none'})")
            lines.append(f"      {obj.path}")
            if obj.reason:
                lines += textwrap.wrap(f"why: {obj.reason}", 79, initial_indent="      ",
                                       subsequent_indent="        ", break_on_hyphens=False)
        for path, message in self.errors:
            lines.append(f"  NOT patched {os.path.basename(path)}: {message}")
        # left alone: one line per reason, naming the objects (the no-import ones only counted)
        grouped: Dict[str, List[str]] = {}
        silent = 0
        for path, kind, reason in self.left:
            if kind == policy.NO_BLOCKING and "include=" not in reason:
                silent += 1
                continue
            # _typing.so for _typing.cpython-311-x86_64-linux-gnu.so: the lists stay readable
            grouped.setdefault(reason, []).append(re.sub(r"\.cpython-[^.]*\.so$", ".so", os.path.basename(path)))
        if grouped or silent:
            lines.append("left alone:")
        for reason, names in grouped.items():
            lines += textwrap.wrap(", ".join(names), 79, initial_indent="  ", subsequent_indent="  ",
                                   break_on_hyphens=False)
            lines += textwrap.wrap(f"why: {reason}", 79, initial_indent="      ", subsequent_indent="        ",
                                   break_on_hyphens=False)
        if silent:
            lines.append(f"  {silent} other object(s): they import no blocking call that has a green twin")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<PatchAllReport: {self.slots_written} slot(s) in {sum(map(bool, self.patched))} object(s), "
                f"{len(self.left)} left, {len(self.errors)} error(s)>")


@dataclass
class _InEffect:
    report: PatchAllReport
    include: policy.Selection
    exclude: policy.Selection
    key: Tuple
    registration: Optional[OnLoadPatch] = None
    seen: Dict[Tuple[str, int], None] = field(default_factory=dict)


_in_effect: Optional[_InEffect] = None


def _selection_key(selection: policy.Selection) -> Tuple:
    return tuple(selection.names), tuple(id(module) for module in selection.modules)


def _look_at(state: _InEffect, objects: List[LoadedObject]) -> Tuple[int, int]:
    """Decide and patch ``objects`` (the first call: every loaded object;
    later: those a load added).  Returns (objects looked at, slots written)."""
    report = state.report
    all_objects = loaded.loaded_objects() if report.objects_looked_at else objects
    chosen: List[LoadedObject] = []
    reasons: Dict[str, str] = {}
    fresh = [obj for obj in objects if slots.object_key(obj) not in state.seen]
    for obj in fresh:
        state.seen[slots.object_key(obj)] = None
        decision = policy.decide(obj, state.include, state.exclude, all_objects)
        if decision.patch:
            chosen.append(obj)
            reasons[obj.realpath] = decision.reason
        else:
            report.left.append((obj.path, decision.kind, decision.reason))
    before = report.slots_written
    if chosen:
        done, failed = patcher.patch_objects(chosen, reasons, all_objects)
        patched_now = {os.path.realpath(obj.path) for obj in done}
        # a TLS companion was looked at (and left, kind TLS): it is patched now, as a companion
        report.left = [entry for entry in report.left if os.path.realpath(entry[0]) not in patched_now]
        report.patched += done
        report.errors += failed
    report.objects_looked_at += len(fresh)
    return len(fresh), report.slots_written - before


def patch_all(*, include: Names = None, exclude: Names = None) -> PatchAllReport:
    """Activate the green functions and patch every loaded object that does
    a client's network I/O, by greenify.patching.policy's rule (its docstring lists
    what is never touched and why), with the TLS library that does such a
    client's encrypted I/O; then do the same for every object loaded later,
    as it loads.  ``include=``/``exclude=`` (library names, sonames, stems,
    paths, modules) add objects the rule leaves out, or keep objects out.
    Calling it again with the same arguments returns the report in effect;
    with other arguments, it undoes the first call and starts again.
    Returns a PatchAllReport, readable printed; unpatch_all() undoes it."""
    global _in_effect
    include_sel = policy.Selection(include, "patch_all(include=...)")
    exclude_sel = policy.Selection(exclude, "patch_all(exclude=...)")
    key = (_selection_key(include_sel), _selection_key(exclude_sel))
    with slots.locked():
        if _in_effect is not None:
            if _in_effect.key == key:
                return _in_effect.report
            unpatch_all()
        patcher.ensure_active("patch_all")
        started = time.perf_counter()
        state = _InEffect(PatchAllReport(include_sel.describe(), exclude_sel.describe()), include_sel, exclude_sel,
                          key)
        first = [True]

        def on_new(objects: List[LoadedObject]) -> None:
            if first[0]:
                first[0] = False
                _look_at(state, objects)
                return
            batch_started = time.perf_counter()
            try:
                count, written = _look_at(state, objects)
            except Exception as exc:  # noqa: BLE001 - runs inside a dlopen: the load must not fail
                log.exception("greenify: patch_all could not look at objects loaded now")
                state.report.errors += [(obj.path, f"{type(exc).__name__}: {exc}") for obj in objects]
                return
            if count:
                state.report.later_loads.append((count, written, time.perf_counter() - batch_started))

        state.registration = watch_loads("patch_all", on_new)
        state.report.seconds = time.perf_counter() - started
        _in_effect = state
    report = state.report
    log.info("greenify: patch_all: %d slot(s) in %d object(s): %s", report.slots_written,
             sum(map(bool, report.patched)), ", ".join(os.path.basename(path) for path in report.patched_paths))
    return report


def unpatch_all() -> int:
    """Undo patch_all(): stop patching objects as they load and put back, in
    every object it patched (loaded since included), exactly the value each
    slot held before it wrote it (slots patched by patch_library() before
    stay patched).  Returns how many slots were put back; 0 when patch_all()
    is not in effect."""
    global _in_effect
    with slots.locked():
        state, _in_effect = _in_effect, None
        if state is None:
            return 0
        if state.registration is not None:
            state.registration.cancel()
        restored = 0
        for obj in state.report.patched:
            key = (os.path.realpath(obj.path), obj.base)
            restored += slots.restore(key, obj.path, [slot.slot_address for slot in obj.patched])
        state.report.active = False
    log.info("greenify: unpatch_all: %d slot(s) put back", restored)
    return restored


def in_effect() -> Optional[PatchAllReport]:
    """The report of the patch_all() in effect (None: none)."""
    state = _in_effect
    return None if state is None else state.report
