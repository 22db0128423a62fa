"""`harmonia-cache`: serve (the default, as harmonia), manage keys, pin paths, check a config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, load_config
from .keys import KeyFileError, read_secret_key, write_key_pair

PIN_COMMANDS = ("pin", "unpin", "pins")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmonia-cache",
        description="A harmonia-compatible Nix binary cache. Without a command: serve the store.",
    )
    parser.add_argument("--version", action="version", version=f"harmonia-cache {__version__}")
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="TOML configuration (default: $CONFIG_FILE, else built-in defaults)",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the Nix store over HTTP (the default)")
    sub.add_parser("check-config", help="validate the configuration and signing keys, then exit")

    key = sub.add_parser("key", help="signing keys in Nix's format")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    gen = key_sub.add_parser("generate", help="create a key pair (name:base64)")
    gen.add_argument("name", help="key name, e.g. harmonia-raider-1")
    gen.add_argument("--secret-file", required=True, type=Path)
    gen.add_argument("--public-file", required=True, type=Path)
    pub = key_sub.add_parser("public", help="print the public key of a secret key file")
    pub.add_argument("secret_file", type=Path)

    token = sub.add_parser("push-token", help="tokens that allow pushing (nix copy --to …/push)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="make a token and print it (only once: keep it in netrc)")
    create.add_argument("name", help="who pushes with it, e.g. ci-runner-1")
    token_sub.add_parser("list", help="list the tokens' names and dates")
    revoke = token_sub.add_parser("revoke", help="remove a token: its pushes are refused from now on")
    revoke.add_argument("name")

    for name, text in (
        ("pin", "keep store paths alive across garbage collection"),
        ("unpin", "release pinned store paths"),
        ("pins", "list pinned store paths"),
    ):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PIN_COMMANDS:
        from .gcroots import run_pins_command

        return run_pins_command(argv)
    args = build_parser().parse_args(argv)
    if args.command == "key":
        return _key(args)
    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        print(f"harmonia-cache: {exc}", file=sys.stderr)
        return 2
    if args.command == "push-token":
        return _push_token(args, config)
    from .server import configure_logging, load_signers, run

    configure_logging(config.log_level)
    try:
        signers = load_signers(config)
    except KeyFileError as exc:
        print(f"harmonia-cache: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(
            f"configuration OK: bind {config.bind}, {len(signers)} signing key(s): "
            + ", ".join(s.name for s in signers)
        )
        return 0
    try:
        return run(config)
    except OSError as exc:
        logging.getLogger("harmonia").error("cannot serve on %s: %s", config.bind, exc.strerror or exc)
        return 1
    except KeyFileError as exc:
        print(f"harmonia-cache: {exc}", file=sys.stderr)
        return 2


def _push_token(args: argparse.Namespace, config: Config) -> int:
    from .app import default_state_directory
    from .push.config import tokens_path
    from .push.tokens import TokenError, TokenStore

    store = TokenStore(tokens_path(config.push, default_state_directory(config)))
    try:
        if args.token_command == "create":
            token = store.create(args.name)
            print(token)
            print(
                f"token {args.name!r} created; it is shown only now. In the pusher's netrc "
                "(nix.conf netrc-file, default /etc/nix/netrc):\n"
                f"  machine <cache host> login {args.name} password {token}",
                file=sys.stderr,
            )
        elif args.token_command == "list":
            for entry in store.entries():
                print(
                    f"{entry.name}\tcreated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(entry.created))}"
                )
        else:
            store.revoke(args.name)
            print(f"token {args.name!r} revoked")
    except TokenError as exc:
        print(f"harmonia-cache push-token: {exc}", file=sys.stderr)
        return 1
    return 0


def _key(args: argparse.Namespace) -> int:
    try:
        if args.key_command == "generate":
            public = write_key_pair(args.name, args.secret_file, args.public_file)
            print(public)
        else:
            print(read_secret_key(args.secret_file).public_key())
    except (KeyFileError, ValueError) as exc:
        print(f"harmonia-cache: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
