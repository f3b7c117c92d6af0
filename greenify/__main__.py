"""``python -m greenify``: run a program greenified, or print the C API's
compiler flags (greenify/launch.py)."""
import sys

from greenify.launch import main

sys.exit(main())
