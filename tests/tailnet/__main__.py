"""``python -m tests.tailnet``: serve a local tailnet until SIGINT/SIGTERM.

Prints exactly one JSON line on stdout once listening (``control_url``, ``auth_key`` and the rest of
:meth:`Tailnet.info`); logs go to stderr. Run it inside a test network namespace (docs/tailnet.md).
With ``--acme`` nodes can get HTTPS certificates (pebble, a DNS responder): the line also has
``ca_file`` (pebble's root) and ``env`` (what a node needs to use that ACME server).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path

import trio

from .server import TailnetConfig, serve_tailnet

DEFAULT_DOMAIN = "tailnet.test"
DEFAULT_ACME_DOMAIN = "tail1234.ts.net"  # shaped like Tailscale's: caddy-tailscale wants *.ts.net


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.tailnet", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind and advertise")
    p.add_argument("--control-port", type=int, default=0)
    p.add_argument("--derp-port", type=int, default=0)
    p.add_argument(
        "--domain",
        default=None,
        help=f"tailnet domain for MagicDNS names (default {DEFAULT_DOMAIN}, {DEFAULT_ACME_DOMAIN} with --acme)",
    )
    p.add_argument("--user", default="tester@example.com", help="login of the default user")
    p.add_argument(
        "--ephemeral-grace",
        type=float,
        default=5.0,
        help="seconds an ephemeral node may be offline before it is removed",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="keep nodes (state.json) and the CA certificate (ca.pem) here",
    )
    p.add_argument(
        "--acme",
        action="store_true",
        help="issue HTTPS certificates: pebble (ACME) and a DNS responder for set-dns's TXT records",
    )
    p.add_argument("--dns-port", type=int, default=0, help="UDP port of the DNS responder (with --acme)")
    p.add_argument("--debug", action="store_true", help="log every request")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="tailnet-") as tmp:
        state_dir = args.state_dir or Path(tmp)
        state_dir.mkdir(parents=True, exist_ok=True)
        config = TailnetConfig(
            host=args.host,
            control_port=args.control_port,
            derp_port=args.derp_port,
            domain=args.domain or (DEFAULT_ACME_DOMAIN if args.acme else DEFAULT_DOMAIN),
            user_login=args.user,
            ephemeral_grace=args.ephemeral_grace,
            state_path=state_dir / "state.json" if args.state_dir else None,
            acme=args.acme,
            dns_port=args.dns_port,
            acme_dir=state_dir / "acme" if args.acme else None,
        )
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                tailnet = await nursery.start(serve_tailnet, config)
                ca_path = state_dir / "ca.pem"
                ca_path.write_bytes(tailnet.ca_cert_pem)
                sys.stdout.write(json.dumps(tailnet.info(str(ca_path))) + "\n")
                sys.stdout.flush()
                async for signum in signals:
                    logging.getLogger("tailnet").info("got %s, stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    trio.run(amain, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
