"""``python -m greenify``: run a program greenified (greenify/launch.py)."""
import sys

from greenify.launch import main

sys.exit(main())
