"""The sidecar in its default mode: ``https://harmonia.<domain>`` with a certificate the node got
the way Tailscale nodes do — ACME dns-01 through the control server's ``/machine/set-dns`` — from
pebble on the module's ``acme_tailnet``. One stack per module (tests/e2e/sidecar/https_stack.py):
the real cache, the real ``harmonia-sidecar`` without ``--plaintext``, a tagged arkitekt-mesh
node "builder" (a fleet's server), and the gateway Caddy as its own tsnet node. Both real Nix
clients copy through it inside the namespace with signatures required, trusting only pebble's root
(``NIX_SSL_CERT_FILE``), or only the gateway's CA for the gateway's site."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.e2e.sidecar.https_stack import call
from tests.support.clients import NixClient
from tests.support.fixtures import Fixtures
from tests.support.nix import run
from tests.tailnet.fixtures import AcmeTailnet
from tests.tailnet.netns import READY_PREFIX, Netns, background_in_netns

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("require_real_nodes")]


@pytest.fixture(scope="module")
def stack(
    acme_tailnet: AcmeTailnet,
    store_fixtures: Fixtures,
    nix_daemon_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("https")
    for i, path in enumerate([store_fixtures.tree, store_fixtures.dep]):  # GC roots for the module
        run(
            ["nix-store", "--add-root", str(work / f"gcroot-{i}"), "--indirect", "--realise", path],
            env=nix_daemon_env,
            timeout=120,
        )
    kwargs = {
        "workdir": str(work),
        "host": acme_tailnet.ns.address,
        "control_url": acme_tailnet.control_url,
        "auth_key": acme_tailnet.auth_key,
        "tagged_auth_key": str(acme_tailnet.info["tagged_auth_key"]),
        "domain": acme_tailnet.domain,
        "node_env": acme_tailnet.env,
        "ca_file": str(acme_tailnet.ca_file),
    }
    argv = [sys.executable, "-m", "tests.tailnet.child", "tests.e2e.sidecar.https_stack:https_stack"]
    t0 = time.monotonic()
    with background_in_netns(
        acme_tailnet.ns,
        [*argv, json.dumps(kwargs)],
        ready_prefix=READY_PREFIX,
        log_path=work / "stack.log",
        timeout=150,
    ) as line:
        ready: dict[str, Any] = json.loads(line)
        ready["work"] = str(work)
        print(f"https stack ready in {time.monotonic() - t0:.1f} s: {ready['timings']}")
        print(
            f"first request (certificate): {ready['first']['seconds']} s, second {ready['second']['seconds']} s"
        )
        yield ready


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def _cn(name: x509.Name) -> str:
    return ", ".join(str(a.value) for a in name.get_attributes_for_oid(NameOID.COMMON_NAME))


def test_the_first_request_gets_a_certificate_issued_by_pebble(
    stack: dict[str, Any], acme_tailnet: AcmeTailnet
) -> None:
    first = stack["first"]
    # the handshake trusted only pebble's root: the chain the node serves ends there
    assert first["ok"], first
    assert first["response_head"] == "HTTP/1.1 200 OK"
    assert stack["second"]["ok"] and stack["second"]["leaf_pem"] == first["leaf_pem"]
    # the node's TLS listener negotiates no ALPN (HTTP/1.1 only, as tsnsrv's), and the engine's
    # config says so: Caddy does not warn that it skipped HTTP/2
    assert first["alpn"] is None
    assert call(stack["socket"], {"cmd": "state"})["http_warnings"] == []
    leaf = _cert(first["leaf_pem"])
    root = x509.load_pem_x509_certificate(acme_tailnet.ca_file.read_bytes())
    assert "Pebble Root CA" in _cn(root.subject)
    assert "Pebble Intermediate CA" in _cn(leaf.issuer)
    assert leaf.issuer != leaf.subject  # not self-signed
    assert "Caddy" not in leaf.issuer.rfc4514_string()  # not Caddy's internal CA
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [stack["name"]]


def test_the_certificate_came_through_set_dns_and_one_order(
    stack: dict[str, Any], acme_tailnet: AcmeTailnet
) -> None:
    calls = acme_tailnet.set_dns_calls()
    granted = [c for c in calls if c["granted"]]
    assert granted[:1] == [
        {"node": "harmonia", "name": f"_acme-challenge.{stack['name']}", "type": "TXT", "granted": True}
    ]
    assert len(acme_tailnet.orders()) >= 1
    assert len(acme_tailnet.issued()) >= 1
    node_certs = [Path(f).name for f in stack["cert_files"]]
    assert f"{stack['name']}.crt" in node_certs and f"{stack['name']}.key" in node_certs


def _copy(
    client: NixClient,
    ns: Netns,
    url: str,
    path: str,
    directory: Path,
    public_key: str,
    ca_file: Path,
    **extra: str,
) -> tuple[subprocess.CompletedProcess[str], dict[str, str], str]:
    """``nix copy --from url`` of ``path`` into a fresh store, run by ``client`` inside
    the namespace, signatures required, trusting only ``ca_file`` (copied where it can see it)."""
    trusted = directory / "trusted-ca.pem"
    shutil.copyfile(ca_file, trusted)
    env = client.env(
        directory / "xdg",
        f"require-sigs = true\ntrusted-public-keys = {public_key}\nconnect-timeout = 10\n",
        NIX_SSL_CERT_FILE=client.inside(trusted),
        **extra,
    )
    store = client.inside(directory / "store")
    done = client.run(
        ["nix", "copy", "--from", url, "--to", store, path],
        env=env,
        timeout=200,
        check=False,
        netns=ns.name,
    )
    return done, env, store


def _check_copied(
    client: NixClient,
    env: dict[str, str],
    store: str,
    paths: list[str],
    host_nix_client: NixClient,
    nix_daemon_env: dict[str, str],
) -> None:
    for path in paths:
        copied = client.path_info(path, env, store=store)
        original = host_nix_client.path_info(path, nix_daemon_env)
        assert copied["narHash"] == original["narHash"], path
        assert any(str(s).startswith("test-cache-1:") for s in copied["signatures"]), path


def test_nix_copy_from_the_https_name_through_a_tailnet_node(
    stack: dict[str, Any],
    acme_tailnet: AcmeTailnet,
    store_fixtures: Fixtures,
    nix_client: NixClient,
    client_dir: Path,
    host_nix_client: NixClient,
    nix_daemon_env: dict[str, str],
) -> None:
    done, env, store = _copy(
        nix_client,
        acme_tailnet.ns,
        f"https://{stack['name']}",
        store_fixtures.tree,
        client_dir,
        stack["cache_public_key"],
        acme_tailnet.ca_file,  # pebble's root, nothing else
        https_proxy=stack["proxy_url"],
        HTTPS_PROXY=stack["proxy_url"],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    paths = [store_fixtures.tree, store_fixtures.dep]
    _check_copied(nix_client, env, store, paths, host_nix_client, nix_daemon_env)


def test_nix_copy_through_the_gateway_to_the_https_name(
    stack: dict[str, Any],
    acme_tailnet: AcmeTailnet,
    store_fixtures: Fixtures,
    nix_client: NixClient,
    client_dir: Path,
    host_nix_client: NixClient,
    nix_daemon_env: dict[str, str],
) -> None:
    # the gateway (its own tsnet node) proxies to https://harmonia.<domain>, trusting pebble
    assert "Priority: 60" in stack["gateway_cache_info"]
    done, env, store = _copy(
        nix_client,
        acme_tailnet.ns,
        stack["gateway_url"],
        store_fixtures.tree,
        client_dir,
        stack["cache_public_key"],
        Path(stack["gateway_ca"]),  # the gateway's own (Caddy internal) CA
    )
    assert done.returncode == 0, done.stderr[-3000:]
    paths = [store_fixtures.tree, store_fixtures.dep]
    _check_copied(nix_client, env, store, paths, host_nix_client, nix_daemon_env)


def test_a_name_the_node_does_not_own_gets_no_certificate(
    stack: dict[str, Any], acme_tailnet: AcmeTailnet
) -> None:
    orders, calls = len(acme_tailnet.orders()), len(acme_tailnet.set_dns_calls())
    domain = acme_tailnet.domain
    for sni in (f"builder.{domain}", f"other.{domain}"):
        probe = call(stack["socket"], {"cmd": "tls", "sni": sni})
        assert not probe["ok"], probe  # the node refuses the handshake: no certificate for it
        assert "error" in probe
    # it never asked for one: no order at pebble, no set-dns at the control server
    assert len(acme_tailnet.orders()) == orders
    assert len(acme_tailnet.set_dns_calls()) == calls
    state = call(stack["socket"], {"cmd": "state"})
    assert not [f for f in state["cert_files"] if "builder." in f or "other." in f]


def test_another_node_cannot_set_the_challenge_record_of_a_name_it_does_not_own(
    stack: dict[str, Any], acme_tailnet: AcmeTailnet
) -> None:
    name = f"_acme-challenge.{stack['name']}"
    tried = call(
        stack["socket"],
        {
            "cmd": "intruder-set-dns",
            "name": name,
            "control_url": acme_tailnet.control_url,
            "auth_key": acme_tailnet.auth_key,
            "dns_server": acme_tailnet.info["dns_server"],
        },
    )
    assert tried["status"] == 403, tried
    assert "may only set '_acme-challenge.intruder." in tried["body"]["error"]
    assert tried["after"] == tried["before"]  # the forged value never reaches DNS
    assert not any(v.startswith("forged-") for v in tried["after"])
    assert acme_tailnet.set_dns_calls()[-1] == {
        "node": "intruder",
        "name": name,
        "type": "TXT",
        "granted": False,
    }


def test_a_restarted_sidecar_serves_its_stored_certificate(
    stack: dict[str, Any], acme_tailnet: AcmeTailnet
) -> None:
    orders, issued = len(acme_tailnet.orders()), len(acme_tailnet.issued())
    calls = len(acme_tailnet.set_dns_calls())
    restarted = call(stack["socket"], {"cmd": "restart-sidecar", "sni": stack["name"]})
    assert restarted.get("new_pid") and restarted["new_pid"] != restarted["old_pid"], restarted
    print(f"restart: {restarted['seconds']} s, probes that failed first: {restarted['failed_probes']}")
    probe = restarted["probe"]
    assert probe and probe["ok"], restarted
    assert probe["response_head"] == "HTTP/1.1 200 OK"
    assert probe["leaf_pem"] == stack["first"]["leaf_pem"]  # the same certificate
    assert len(acme_tailnet.orders()) == orders  # no new order
    assert len(acme_tailnet.issued()) == issued
    assert len(acme_tailnet.set_dns_calls()) == calls
