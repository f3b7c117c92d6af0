"""``python -m greenify``: run a program greenified, or print the C API's
compiler flags (greenify/tools/launch.py)."""
import sys

from greenify.tools.launch import main

sys.exit(main())
