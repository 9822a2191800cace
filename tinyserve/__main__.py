"""`python -m tinyserve ...` is the `tinyserve` command."""

import sys

from tinyserve.cli import main

sys.exit(main())
