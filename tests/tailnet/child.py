"""``python -m tests.tailnet.child module:function '<json kwargs>'`` (see :mod:`.netns`).

Runs the function (``async`` ones with ``trio.run``) and prints ``NETNS-RESULT <json>`` as the last
stdout line. Logging goes to stderr at INFO.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import sys
from typing import Any

import trio

from .netns import RESULT_PREFIX


def main(argv: list[str]) -> int:
    if len(argv) != 2 or ":" not in argv[0]:
        print("usage: python -m tests.tailnet.child module:function '<json kwargs>'", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    module_name, _, func_name = argv[0].partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    kwargs: dict[str, Any] = json.loads(argv[1])
    is_async = inspect.iscoroutinefunction(func)
    result = trio.run(lambda: func(**kwargs)) if is_async else func(**kwargs)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
