"""Patching: writing the green twins into other objects' GOT slots.

Data flows one way: a target (path, name, stem, module) -> loaded objects
(loaded.py) -> their blocking imports (elf.py) -> planned slots
(patcher.py; TLS companions: companions.py) -> written, recorded, restored
(slots.py, the one write path) -> a report.  policy.py decides what
patch_all (all_clients.py) patches, now and as objects load (onload.py);
inventory.py tells what each loaded object imports.

May use: greenify.errors, greenify.functions, greenify.originals, the cffi
module.  Never the waiting side: patching writes slots, it never waits.
"""
