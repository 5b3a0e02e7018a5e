"""`python -m fastalign`: the same as the `fastalign` command."""
import sys

from .cli import main

sys.exit(main())
