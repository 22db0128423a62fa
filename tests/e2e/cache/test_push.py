"""`nix copy --to http://…/push` with the real Nix client, into the host store through a real
nix-daemon that trusts no user (as the cache's service user is never trusted).

The pusher's store is a store of its own (`local?root=…`): its paths are built in the host store,
copied there and deleted from the host again, so the cache really imports them. After a push the
pusher's store is thrown away and a fresh client fetches from the cache's root URL.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cache.hashes import nix32_encode
from cache.narinfo import NarInfo, NarLocation
from cache.signing import SecretKey
from tests.support.cache_server import CacheServer, generate_key, start_cache
from tests.support.clients import NixClient, remove_tree
from tests.support.nix import build, run
from tests.support.push import PushDaemon, basic_auth, closure_expr, made_path, untrusting_daemon

pytestmark = pytest.mark.e2e
MAX_NAR = 20_000_000


@dataclass
class Pushing:
    cache: CacheServer
    daemon: PushDaemon
    token: str
    pusher_secret: Path
    pusher_public: str
    stranger_secret: Path
    host_env: dict[str, str]  # the system daemon, where nix-2.8's test paths are built
    tmp: Path

    @property
    def push_url(self) -> str:
        return f"{self.cache.url}/push"

    def metric(self, name: str) -> int:
        text = httpx.get(f"{self.cache.url}/metrics", timeout=10).text
        m = re.search(rf"^{re.escape(name)} (\d+)$", text, re.M)
        assert m is not None, f"{name} not in /metrics"
        return int(m.group(1))


@pytest.fixture(scope="module", params=["db", "daemon"])
def pushing(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, nix_daemon_env: dict[str, str]
) -> Iterator[Pushing]:
    """The cache over each store backend, importing through a daemon that trusts no user."""
    tmp = tmp_path_factory.mktemp(f"push-{request.param}")
    pusher_secret, pusher_public = generate_key(tmp / "keys", "test-pusher-1")
    stranger_secret, _ = generate_key(tmp / "keys", "test-stranger-1")
    with untrusting_daemon(tmp / "daemon", [pusher_public]) as daemon:
        push = {
            "enable": True,
            "trusted_keys": [pusher_public],
            "max_nar_bytes": MAX_NAR,
            "retention_days": 30,
        }
        with start_cache(
            tmp / "cache",
            store_backend=request.param,
            daemon_socket=str(daemon.socket),
            enable_compression=False,
            push=push,
        ) as cache:
            made = run(
                [
                    sys.executable,
                    "-m",
                    "cache",
                    "--config",
                    str(cache.config_file),
                    "push-token",
                    "create",
                    "ci-1",
                ],
                env=nix_daemon_env,
            )
            token = made.stdout.strip()
            tokens = (tmp / "cache" / "state" / "push" / "tokens.json").read_text()
            assert token.startswith("hcp_") and token not in tokens
            yield Pushing(
                cache, daemon, token, pusher_secret, pusher_public, stranger_secret, nix_daemon_env, tmp
            )
            assert token not in cache.log  # never logged
        roots = tmp / "cache" / "state" / "push" / "roots"
        pushed = [os.readlink(p) for p in roots.iterdir()] if roots.exists() else []
        shutil.rmtree(roots, ignore_errors=True)
        if pushed:
            subprocess.run(
                ["nix-store", "--delete", *pushed], env=daemon.env, capture_output=True, check=False
            )


@dataclass
class Pusher:
    """One real client set up to push: its netrc, its key, and a store holding paths the host lacks."""

    client: NixClient
    dir: Path  # a host path the client can use
    p: Pushing

    def env(self, extra: str = "") -> dict[str, str]:
        home = self.dir / f"run-{time.monotonic_ns()}"
        home.mkdir(parents=True)
        netrc = home / "netrc"
        netrc.write_text(f"machine 127.0.0.1 login ci-1 password {self.p.token}\n")
        return self.client.env(home / "xdg", f"netrc-file = {self.client.inside(netrc)}\n{extra}")

    def key(self, secret: Path) -> str:
        """The secret key file, where the client can read it."""
        copy = self.dir / secret.name
        if not copy.exists():
            shutil.copy(secret, copy)
            copy.chmod(0o600)
        return self.client.inside(copy)

    def store_with(self, tag: str, count: int = 1) -> tuple[str | None, list[str]]:
        """Paths the host store does not have, in a store of the pusher: built in the chroot's own
        store (nix-2.26), or built on the host, copied to a `local?root=` store and deleted (nix-2.8)."""
        expr = closure_expr(tag, count)
        if self.client.chrooted:
            out = self.client.run(["nix-build", "-E", expr, "--no-out-link"], env=self.env(), timeout=600)
            return None, out.stdout.split()
        paths = build(expr, self.p.host_env)
        root = self.dir / f"store-{tag}"
        store = f"local?root={root}"
        run(["nix", "copy", "--no-check-sigs", "--to", store, *paths], env=self.p.host_env)
        run(["nix-store", "--delete", *reversed(paths)], env=self.p.host_env)
        return store, paths

    def copy(
        self, store: str | None, paths: list[str], query: str, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        source = ["--from", store] if store else []
        return self.client.run(
            ["nix", "copy", *source, "--to", f"{self.p.push_url}?{query}", *paths],
            env=self.env(),
            check=check,
            timeout=300,
        )

    def forget(self, store: str | None, paths: list[str]) -> None:
        """The pusher side lets the paths go."""
        if store is None:
            self.client.run(["nix-store", "--delete", *reversed(paths)], env=self.env())
        else:
            remove_tree(Path(store.removeprefix("local?root=")))


@pytest.fixture
def pusher(pushing: Pushing, nix_client: NixClient, client_dir: Path) -> Pusher:
    return Pusher(nix_client, client_dir, pushing)


def valid_on_host(p: Pushing, path: str) -> bool:
    probe = subprocess.run(
        ["nix-store", "--check-validity", path], env=p.daemon.env, capture_output=True, check=False
    )
    return probe.returncode == 0


@pytest.mark.parametrize("compression", ["zstd", "xz", "none"])
def test_push_gc_then_fetch_signed_by_both(pusher: Pusher, compression: str) -> None:
    p = pusher.p
    store, paths = pusher.store_with(f"c-{compression}")
    assert not any(valid_on_host(p, path) for path in paths)
    pusher.copy(store, paths, f"compression={compression}&secret-key={pusher.key(p.pusher_secret)}")
    for path in paths:
        assert valid_on_host(p, path)
    # the pusher lets go of the closure; the cache keeps it, rooted
    pusher.forget(store, paths)
    for path in paths:
        refused = subprocess.run(
            ["nix-store", "--delete", path], env=p.daemon.env, capture_output=True, text=True, check=False
        )
        assert refused.returncode != 0 and "alive" in refused.stderr
    top = paths[-1]
    narinfo = httpx.get(f"{p.cache.url}/{Path(top).name[:32]}.narinfo", timeout=10).text
    sigs = [
        line.split(": ", 1)[1].split(":", 1)[0] for line in narinfo.splitlines() if line.startswith("Sig: ")
    ]
    assert sorted(sigs) == ["test-cache-1", "test-pusher-1"]
    # a fresh client trusting only the cache's key fetches the closure from the cache's root URL
    fetch_root = pusher.dir / f"fetch-{compression}"
    client = pusher.client
    env = client.env(
        pusher.dir / "fetch-xdg", f"trusted-public-keys = {p.cache.public_key}\nrequire-sigs = true\n"
    )
    fetch_store = f"local?root={client.inside(fetch_root)}"
    client.run(["nix", "copy", "--from", p.cache.url, "--to", fetch_store, top], env=env)
    fetched = client.run(["nix", "path-info", "--store", fetch_store, "-r", top], env=env).stdout.split()
    assert sorted(fetched) == sorted(paths)


def test_unsigned_and_unknown_key_are_403_then_a_rerun_succeeds(pusher: Pusher) -> None:
    p = pusher.p
    store, paths = pusher.store_with("sig")
    unsigned = pusher.copy(store, paths, "compression=none", check=False)
    assert unsigned.returncode != 0
    assert "403" in unsigned.stderr
    assert "sign it with one of these keys: test-pusher-1" in unsigned.stderr  # Nix shows our answer
    stranger = pusher.copy(
        store, paths, f"compression=none&secret-key={pusher.key(p.stranger_secret)}", check=False
    )
    assert stranger.returncode != 0 and "403" in stranger.stderr
    assert "signed by test-stranger-1, expected one of: test-pusher-1" in stranger.stderr
    assert not valid_on_host(p, paths[0])
    # the NAR of the first path is uploaded and waits; the re-run's narinfo PUT imports it
    pusher.copy(store, paths, f"compression=none&secret-key={pusher.key(p.pusher_secret)}")
    assert all(valid_on_host(p, path) for path in paths)
    assert p.metric('harmonia_push_total{outcome="bad_signature"}') >= 2
    assert p.metric('harmonia_push_total{outcome="imported"}') >= 2


def test_pushing_again_is_idempotent(pusher: Pusher) -> None:
    p = pusher.p
    store, paths = pusher.store_with("again")
    # write-nar-listing: the client also PUTs <hash>.ls, accepted (the cache makes its own)
    query = f"compression=zstd&write-nar-listing=true&secret-key={pusher.key(p.pusher_secret)}"
    pusher.copy(store, paths, query)
    before = p.metric('harmonia_push_total{outcome="imported"}')
    pusher.copy(store, paths, query)  # a fresh narinfo cache: the client asks the cache again
    assert all(valid_on_host(p, path) for path in paths)
    assert p.metric('harmonia_push_total{outcome="imported"}') == before  # nothing imported twice


def test_two_concurrent_pushes_of_one_closure(pusher: Pusher) -> None:
    p = pusher.p
    store, paths = pusher.store_with("concurrent")
    query = f"compression=xz&secret-key={pusher.key(p.pusher_secret)}"
    source = ["--from", store] if store else []
    argv = pusher.client.argv(["nix", "copy", *source, "--to", f"{p.push_url}?{query}", *paths])
    procs = [subprocess.Popen(argv, env=pusher.env(), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert all(valid_on_host(p, path) for path in paths)


def test_fifty_small_paths(pusher: Pusher) -> None:
    p = pusher.p
    store, paths = pusher.store_with("fifty", count=50)
    started = time.monotonic()
    pusher.copy(store, paths, f"compression=zstd&secret-key={pusher.key(p.pusher_secret)}")
    elapsed = time.monotonic() - started
    assert all(valid_on_host(p, path) for path in paths)
    # 51 paths, two PUTs each: a server that never sent 100 Continue would cost a second per PUT
    assert elapsed < 50, f"{len(paths)} paths took {elapsed:.1f} s"
    print(f"{pusher.client.name}: pushed {len(paths)} paths in {elapsed:.2f} s")


# --- refusals seen on the wire ---------------------------------------------------------------


def raw_put(
    url: str, target: str, headers: dict[str, str], body: bytes, *, send_body: bool = True
) -> tuple[int, bool, str]:
    """A PUT with `Expect: 100-continue`; the body goes only after `100 Continue`.
    Returns (final status, whether 100 came, final body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        head = f"PUT {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode())
        buf = b""
        saw_continue = False
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    raise AssertionError(f"connection closed after {buf!r}")
                buf += data
            status_head, _, buf = buf.partition(b"\r\n\r\n")
            status = int(status_head.split()[1])
            if status == 100:
                saw_continue = True
                if send_body:
                    sock.sendall(body)
                continue
            length = int(re.search(rb"(?i)content-length: (\d+)", status_head).group(1))  # type: ignore[union-attr]
            while len(buf) < length:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
            return status, saw_continue, buf[:length].decode()


def test_wrong_token_is_401_and_no_body_is_read(pushing: Pushing) -> None:
    p = pushing
    before = p.metric("harmonia_push_bytes_received_total")
    refused_before = p.metric('harmonia_push_total{outcome="unauthorized"}')
    body = b"x" * 1_000_000
    target = f"/push/nar/{nix32_encode(hashlib.sha256(body).digest())}.nar"
    for auth in ({}, {"Authorization": basic_auth("hcp_wrong")}):
        status, saw_continue, text = raw_put(p.cache.url, target, auth, body)
        assert (status, saw_continue) == (401, False), text
        assert "push token" in text
    assert p.metric("harmonia_push_bytes_received_total") == before
    assert p.metric('harmonia_push_total{outcome="unauthorized"}') == refused_before + 2
    assert httpx.get(f"{p.push_url}/{'0' * 32}.narinfo", timeout=10).status_code == 401
    # nix-cache-info is public (StoreDir), so Nix reaches the upload and shows the 401's reason
    assert httpx.get(f"{p.push_url}/nix-cache-info", timeout=10).status_code == 200


def test_too_large_is_413_before_the_body(pushing: Pushing) -> None:
    p = pushing
    before = p.metric("harmonia_push_bytes_received_total")
    body = b"\0" * (MAX_NAR + 1)
    target = f"/push/nar/{nix32_encode(hashlib.sha256(body).digest())}.nar"
    status, saw_continue, text = raw_put(p.cache.url, target, {"Authorization": basic_auth(p.token)}, body)
    assert (status, saw_continue) == (413, False), text
    assert p.metric("harmonia_push_bytes_received_total") == before


def _put_path(p: Pushing, made, key_name: str = "nar") -> tuple[int, str]:  # type: ignore[no-untyped-def]
    auth = {"Authorization": basic_auth(p.token)}
    packed = lzma.compress(made.nar)
    file_hash = hashlib.sha256(packed).digest()
    name = f"{nix32_encode(file_hash)}.nar.xz"
    status, _, text = raw_put(p.cache.url, f"/push/nar/{name}", auth, packed)
    assert status == 200, text
    narinfo = NarInfo(
        made.info, NarLocation(f"nar/{name}", "xz", file_hash, len(packed)), made.info.sigs
    ).render()
    status, saw_continue, text = raw_put(
        p.cache.url, f"/push/{made.info.hash_part}.narinfo", auth, narinfo.encode()
    )
    assert saw_continue
    return status, text


def test_tampered_nar_is_400(pushing: Pushing) -> None:
    p = pushing
    key = SecretKey.parse(p.pusher_secret.read_text())
    auth = {"Authorization": basic_auth(p.token)}
    made = made_path(p.tmp / "made", "push-tampered", "original\n", key)
    tampered = made.nar.replace(b"original", b"0riginal")
    name = f"{nix32_encode(hashlib.sha256(made.nar).digest())}.nar"
    # bytes changed on the way: their hash is not the name they were PUT under
    status, _, text = raw_put(p.cache.url, f"/push/nar/{name}", auth, tampered)
    assert status == 400 and "changed on the way" in text
    # bytes that match their name, under a narinfo for other bytes
    other = f"{nix32_encode(hashlib.sha256(tampered).digest())}.nar"
    assert raw_put(p.cache.url, f"/push/nar/{other}", auth, tampered)[0] == 200
    narinfo = NarInfo(made.info, NarLocation(f"nar/{other}", "none"), made.info.sigs).render()
    status, _, text = raw_put(p.cache.url, f"/push/{made.info.hash_part}.narinfo", auth, narinfo.encode())
    assert status == 400 and "tampered" in text
    assert not valid_on_host(p, made.info.path)


def test_missing_reference_is_409_naming_it(pushing: Pushing) -> None:
    p = pushing
    key = SecretKey.parse(p.pusher_secret.read_text())
    absent = made_path(p.tmp / "made", "push-absent", "never pushed\n", key)
    top = made_path(p.tmp / "made", "push-needs-absent", "x\n", key, (absent.info.path,))
    status, text = _put_path(p, top)
    assert status == 409 and absent.info.path in text
    assert not valid_on_host(p, top.info.path)
    assert p.metric('harmonia_push_total{outcome="conflict"}') >= 1


def test_head_of_an_absent_nar_is_404_and_side_files_are_accepted(pushing: Pushing) -> None:
    p = pushing
    auth = {"Authorization": basic_auth(p.token)}
    with httpx.Client(base_url=p.push_url, headers=auth, timeout=10) as client:
        for ext in (".nar", ".nar.zst", ".nar.xz"):
            assert client.head(f"/nar/{'0' * 52}{ext}").status_code == 404
        assert client.get(f"/{'0' * 32}.narinfo").status_code == 404
        info = client.get("/nix-cache-info")
        assert info.status_code == 200 and "StoreDir: /nix/store" in info.text
        for target in (f"/{'0' * 32}.ls", f"/realisations/sha256:{'0' * 52}!out.doi", "/debuginfo/abc"):
            assert client.put(target, content=b"{}").status_code == 200


def test_a_pushed_build_log_is_served_by_log(pushing: Pushing) -> None:
    p = pushing
    drv = f"{'1' * 32}-hello-2.12.drv"
    auth = {"Authorization": basic_auth(p.token)}
    status, _, text = raw_put(p.cache.url, f"/push/log/{drv}", auth, b"building hello\nok\n")
    assert status == 200, text
    served = httpx.get(f"{p.cache.url}/log/{drv}", timeout=10)
    assert served.status_code == 200 and served.text == "building hello\nok\n"


def test_push_is_off_unless_enabled(tmp_path: Path, nix_daemon_env: dict[str, str]) -> None:
    with start_cache(tmp_path / "off") as cache:
        status, saw_continue, text = raw_put(cache.url, f"/push/nar/{'0' * 52}.nar", {}, b"x" * 1000)
        assert (status, saw_continue) == (404, False) and "[push] enable = true" in text


def test_retention_ends_then_gc_may_collect(
    tmp_path: Path, nix_daemon_env: dict[str, str], host_nix_client: NixClient
) -> None:
    """A short retention and a fast sweep in the real server: rooted first, collectable after."""
    pusher_secret, pusher_public = generate_key(tmp_path / "keys", "test-pusher-1")
    with untrusting_daemon(tmp_path / "daemon", [pusher_public]) as daemon:
        push = {
            "enable": True,
            "trusted_keys": [pusher_public],
            "retention_days": 3 / 86400,
            "sweep_interval": 0.5,
        }
        with start_cache(tmp_path / "cache", daemon_socket=str(daemon.socket), push=push) as cache:
            token = run(
                [
                    sys.executable,
                    "-m",
                    "cache",
                    "--config",
                    str(cache.config_file),
                    "push-token",
                    "create",
                    "ci-1",
                ],
                env=nix_daemon_env,
            ).stdout.strip()
            p = Pushing(
                cache, daemon, token, pusher_secret, pusher_public, pusher_secret, nix_daemon_env, tmp_path
            )
            client_dir = tmp_path / "client"
            client_dir.mkdir()
            pusher = Pusher(host_nix_client, client_dir, p)
            store, paths = pusher.store_with("retention")
            pusher.copy(store, paths, f"compression=zstd&secret-key={pusher.key(pusher_secret)}")
            assert all(valid_on_host(p, path) for path in paths)
            kept = subprocess.run(
                ["nix-store", "--delete", paths[-1]],
                env=daemon.env,
                capture_output=True,
                text=True,
                check=False,
            )
            assert kept.returncode != 0 and "alive" in kept.stderr
            deadline = time.monotonic() + 30
            while (tmp_path / "cache" / "state" / "push" / "roots").exists() and any(
                (tmp_path / "cache" / "state" / "push" / "roots").iterdir()
            ):
                assert time.monotonic() < deadline, "the sweep did not remove the expired roots"
                time.sleep(0.3)
            assert "retention of" in cache.log
            # the roots are gone: the daemon deletes the paths (only these, not a whole GC)
            run(["nix-store", "--delete", *reversed(paths)], env=daemon.env)
            assert not any(valid_on_host(p, path) for path in paths)


def test_push_over_tls(
    tmp_path: Path, nix_daemon_env: dict[str, str], nix_client: NixClient, client_dir: Path
) -> None:
    """https, as through the sidecar's tailnet node: HTTP/2 for curl's Nix where it negotiates it."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "chain.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(client_dir / "ca.pem"))
    pusher_secret, pusher_public = generate_key(tmp_path / "keys", "test-pusher-1")
    with untrusting_daemon(tmp_path / "daemon", [pusher_public]) as daemon:
        with start_cache(
            tmp_path / "cache",
            daemon_socket=str(daemon.socket),
            tls_cert_path=str(tmp_path / "chain.pem"),
            tls_key_path=str(tmp_path / "key.pem"),
            push={"enable": True, "trusted_keys": [pusher_public]},
        ) as cache:
            assert cache.url.startswith("https://")
            token = run(
                [
                    sys.executable,
                    "-m",
                    "cache",
                    "--config",
                    str(cache.config_file),
                    "push-token",
                    "create",
                    "ci-1",
                ],
                env=nix_daemon_env,
            ).stdout.strip()
            p = Pushing(
                cache, daemon, token, pusher_secret, pusher_public, pusher_secret, nix_daemon_env, tmp_path
            )
            pusher = Pusher(nix_client, client_dir, p)
            store, paths = pusher.store_with("tls", count=3)
            ca_inside = nix_client.inside(client_dir / "ca.pem")
            source = ["--from", store] if store else []
            nix_client.run(
                [
                    "nix",
                    "copy",
                    *source,
                    "--to",
                    f"{p.push_url}?compression=zstd&secret-key={pusher.key(pusher_secret)}",
                    *paths,
                ],
                env={**pusher.env(), "NIX_SSL_CERT_FILE": ca_inside},
            )
            assert all(valid_on_host(p, path) for path in paths)
            # HTTP/2 request bodies reach the routes (streamed, checked) as HTTP/1.1 ones do
            import ssl

            verify = ssl.create_default_context(cafile=str(client_dir / "ca.pem"))
            nar = b"nix-archive-1 " * 10000
            target = f"/push/nar/{nix32_encode(hashlib.sha256(nar).digest())}.nar"
            with httpx.Client(base_url=cache.url, verify=verify, http2=True, timeout=20) as h2:
                refused = h2.put(target, content=nar)
                assert (refused.http_version, refused.status_code) == ("HTTP/2", 401)
                taken = h2.put(target, content=nar, headers={"Authorization": basic_auth(token)})
                assert (taken.http_version, taken.status_code) == ("HTTP/2", 200)
                assert h2.head(target, headers={"Authorization": basic_auth(token)}).status_code == 200
                wrong = h2.put(
                    target.replace(".nar", ".nar.xz"),
                    content=nar,
                    headers={"Authorization": basic_auth(token)},
                )
                assert wrong.status_code == 400
            roots = tmp_path / "cache" / "state" / "push" / "roots"
            for link in roots.iterdir():
                link.unlink()
        subprocess.run(
            ["nix-store", "--delete", *reversed(paths)], env=daemon.env, capture_output=True, check=False
        )


def test_a_daemon_that_is_down_fails_the_copy_at_once(
    tmp_path: Path, nix_daemon_env: dict[str, str], nix_client: NixClient, client_dir: Path
) -> None:
    """424, a final error for Nix: the copy stops with the reason instead of retrying (a 5xx on a
    PUT makes Nix ≤ 2.33.1 retry without a body and hang)."""
    pusher_secret, pusher_public = generate_key(tmp_path / "keys", "test-pusher-1")
    push = {"enable": True, "trusted_keys": [pusher_public]}
    with start_cache(
        tmp_path / "cache", daemon_socket=str(tmp_path / "no-daemon.socket"), push=push
    ) as cache:
        token = run(
            [
                sys.executable,
                "-m",
                "cache",
                "--config",
                str(cache.config_file),
                "push-token",
                "create",
                "ci-1",
            ],
            env=nix_daemon_env,
        ).stdout.strip()
        p = Pushing(cache, None, token, pusher_secret, pusher_public, pusher_secret, nix_daemon_env, tmp_path)  # type: ignore[arg-type]
        pusher = Pusher(nix_client, client_dir, p)
        store, paths = pusher.store_with("nodaemon")
        started = time.monotonic()
        failed = pusher.copy(
            store, paths, f"compression=zstd&secret-key={pusher.key(pusher_secret)}", check=False
        )
        assert failed.returncode != 0
        assert "424" in failed.stderr and "cannot reach its nix-daemon" in failed.stderr
        assert time.monotonic() - started < 60  # no retries: Nix retries transient errors for minutes
        assert p.metric('harmonia_push_total{outcome="daemon_failed"}') == 1


def test_nix_copy_with_a_wrong_token_says_why(pusher: Pusher) -> None:
    p = pusher.p
    store, paths = pusher.store_with("badtoken")
    home = pusher.dir / "bad-token"
    home.mkdir()
    (home / "netrc").write_text("machine 127.0.0.1 login ci-1 password hcp_revoked-or-wrong\n")
    env = pusher.client.env(home / "xdg", f"netrc-file = {pusher.client.inside(home / 'netrc')}\n")
    source = ["--from", store] if store else []
    failed = pusher.client.run(
        ["nix", "copy", *source, "--to", f"{p.push_url}?secret-key={pusher.key(p.pusher_secret)}", *paths],
        env=env,
        check=False,
    )
    assert failed.returncode != 0
    assert "401" in failed.stderr and "push token" in failed.stderr
    assert not any(valid_on_host(p, path) for path in paths)


def test_copy_log_to_the_cache(pusher: Pusher) -> None:
    """`nix store copy-log --to …/push`: the log is kept and `/log/<drv>` serves it."""
    if not pusher.client.chrooted:
        pytest.skip("nix-2.8 builds in the cache's own store, whose logs /log serves already")
    p = pusher.p
    marker = f"log-line-{time.monotonic_ns()}"
    expr = (
        'builtins.derivation { name = "hc-push-log"; system = builtins.currentSystem; builder = "/bin/sh";'
        f' args = [ "-c" "/bin/echo {marker}; /bin/echo done > $out" ]; }}'
    )
    env = pusher.env()
    out = pusher.client.run(["nix-build", "-E", expr, "--no-out-link"], env=env).stdout.split()[-1]
    drv = pusher.client.run(["nix-store", "-q", "--deriver", out], env=env).stdout.strip()
    pusher.client.run(["nix", "store", "copy-log", "--to", p.push_url, drv], env=env)
    served = httpx.get(f"{p.cache.url}/log/{Path(drv).name}", timeout=10)
    assert served.status_code == 200 and marker in served.text
