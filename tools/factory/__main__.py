"""``python -m tools.factory [NAME ...]``: build the named factory files (default: the light set), print the folder."""
import sys

from tools.factory import LIGHT_SET, ensure

print(ensure(*(sys.argv[1:] or LIGHT_SET)))
