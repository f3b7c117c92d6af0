"""What the tests need to know about the slots greenify writes, without
reaching into greenify.patching.slots' private state: one place to change when the
internals do."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, List, Optional, Tuple

from greenify.patching import elf
from greenify.patching import slots
from greenify.errors import GreenifyError
from greenify.patching.loaded import LoadedObject
from greenify.patching.slots import PatchedSlot


def recorded_slots(purpose: Optional[str] = None) -> Dict[Tuple[str, int], Dict[int, PatchedSlot]]:
    """Every slot greenify has written and not put back, as it records them."""
    return slots.written_slots(purpose=purpose)


def no_slot_recorded(path) -> bool:
    """Whether greenify holds no record of any slot of the file at ``path``."""
    real = os.path.realpath(path)
    return not any(key[0] == real for key in recorded_slots())


def hooked_slots() -> List[Tuple[str, PatchedSlot]]:
    """(real path, slot) of every dlopen/dlmopen slot hooked now."""
    return [(key[0], slot) for key, record in recorded_slots(slots.DLOPEN_HOOK).items() for slot in record.values()]


def imports_matching_the_loaded_object(obj: LoadedObject):
    """The blocking imports of ``obj``'s file, or None when the file is not
    the loaded object (a test replaced it on purpose)."""
    try:
        imports = elf.read_blocking_imports(obj.path)
        slots.check_object(obj, imports)
    except GreenifyError:
        return None
    return imports


def rewrite_slot(slot_address: int, value: int) -> None:
    """Store ``value`` into a slot behind greenify's records (as another
    hooking library would), with the page protection put back."""
    with slots.locked():
        ((writes, error),) = slots.write_slots([[(slot_address, value, 0)]])
    assert writes is not None, error


@contextlib.contextmanager
def slot_lock_held_by_another_thread() -> Iterator[threading.Thread]:
    """A thread that holds greenify's one slot lock until the block ends."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with slots.locked():
            taken.set()
            release.wait()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(10), "the lock holder never got the lock"
    try:
        yield thread
    finally:
        release.set()
        thread.join()
