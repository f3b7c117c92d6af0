"""Tests of patching (csrc/patch/, greenify/patching/): the ELF reader, slots, patch_library, patch_all."""
