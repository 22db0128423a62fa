"""``python -m sidecar`` is ``harmonia-sidecar``."""

from .cli import main

main()
