"""`python -m fastalign.demo`: `fastalign demo`, its handling of an interrupt included (Ctrl-C and SIGTERM end it
with a message and 130 or 143, its temporary files removed)."""
import sys

from fastalign.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
