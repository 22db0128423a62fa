from tests.tailnet.fixtures import local_tailnet  # noqa: F401
