"""Tools: the command lines.  inspector.py is greenify-inspect, demo.py the
demo (``python -m greenify.demo``), launch.py ``python -m greenify``.  Tools
print; the library below them logs.

May use: everything in greenify.
"""
