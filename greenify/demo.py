"""``python -m greenify.demo``: see greenify make a blocking C library
cooperative (the demo itself is greenify/tools/demo.py)."""
import sys

from greenify.tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
