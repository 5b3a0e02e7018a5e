"""`python -m fastalign.demo`: the same as `fastalign demo`."""
import sys

from .cli import main

sys.exit(main())
