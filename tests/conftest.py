"""Test-wide setup.  TRITON_INTERPRET=1 is set before any kernel module can be imported, so Triton
kernels run on the CPU interpreter; hypothesis runs without deadlines (the machine is shared)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("tinyserve", deadline=None, max_examples=50, derandomize=True)
settings.load_profile("tinyserve")
