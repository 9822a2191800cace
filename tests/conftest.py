"""Test-wide setup.  TRITON_INTERPRET=1 is set before any kernel module can be imported, so Triton
kernels run on the CPU interpreter; hypothesis runs without deadlines (the machine is shared)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("tinyserve", deadline=None, max_examples=50, derandomize=True)
settings.load_profile("tinyserve")


import pytest  # noqa: E402


# --- SeaweedFS (tests/s3server.py): one server per kind for the whole session, stopped by pid at exit ---
def _weed(auth: bool):
    import s3server

    why = s3server.available()
    if why:
        pytest.skip(why)
    return s3server.shared(auth=auth)


@pytest.fixture(scope="session")
def weed():
    return _weed(False)


@pytest.fixture(scope="session")
def weed_auth():
    return _weed(True)
