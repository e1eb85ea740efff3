"""Print a pylock.toml's pins as requirements (``name==version ; marker``), one a line.

``make lock`` constrains the smaller locks to the test lock with them (uv reads constraints
only in requirements format); ``make test-latest`` compares them with the newest releases.
Usage: python requirements/pins.py pylock.toml
"""

import sys
import tomllib

with open(sys.argv[1], "rb") as lock:
    for package in tomllib.load(lock)["packages"]:
        marker = package.get("marker")
        print(f"{package['name']}=={package['version']}" + (f" ; {marker}" if marker else ""))
