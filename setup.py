# setuptools reads cffi_modules only from setup(); everything else is in pyproject.toml.
from setuptools import Extension, setup

setup(
    cffi_modules=["build_ffi.py:ffibuilder"],
    # the demo's ordinary blocking C client, loaded with ctypes (not a Python module)
    ext_modules=[Extension("greenify._demo_client", ["csrc/demo/demo_client.c"])],
)
