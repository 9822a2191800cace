"""`python -m tinyserve ...` is the `tinyserve` command.

`python -m` puts the working directory FIRST on the import path, so a folder there named like an
installed package (a `triton/` directory) would shadow it for every import that follows (torch.export
imports triton).  The working directory moves to the end of the path instead: user modules named
on the command line (`pack mymodel:factory`) are still found, after the installed packages."""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path.append(sys.path.pop(0))

from tinyserve.cli import main  # noqa: E402

sys.exit(main())
