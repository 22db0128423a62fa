"""The whois directory: node identity (name, tags, ID) of callers, from the Tailscale API.

caddy-tailscale's ``tailscale_auth`` yields only a user's fields and refuses tagged nodes, and
the engine exposes no node name, tags or ID. With API credentials (``--api-key-path`` /
``api_key_path`` / ``$TS_API_KEY``: a ``tskey-api-…`` key or a ``tskey-client-…`` OAuth client
secret) the sidecar keeps an in-memory map from tailnet address to device, fetched from the
device list (``GET /api/v2/tailnet/-/devices``, through the PyPI ``tailscale`` client), refreshed
every ``REFRESH_INTERVAL`` seconds and on a miss: an address no device has asks for a refresh
at most once every ``ADDRESS_RETRY`` seconds, refreshes are at least ``MISS_REFRESH_INTERVAL``
apart, and the request waits at most ``MISS_WAIT`` for it (only tailnet peers reach a node, so
misses are bounded by the tailnet's size).
The engine asks ``GET /whois?addr=<caller's tailnet IP>`` on the sidecar's unix socket for every
request (Caddy's forward_auth pattern, see ``compile``) and copies the ``X-Tailscale-Node*``
answer headers onto the request; an unknown address gets 200 with no node headers.

The pure parts (device records, the address map, header values) are at the top; the
``Directory`` (trio, with the asyncio client on a thread of its own) below.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from common.problems import ConfigError, Problem

from .authkey import SessionFactory, split_client_secret
from .model import ApiKeySource, Secret, api_credentials_problem

log = logging.getLogger(__name__)

REFRESH_INTERVAL = 60.0  # seconds between periodic refreshes of the device list
MISS_REFRESH_INTERVAL = 1.0  # refreshes asked for by misses are at least this far apart
ADDRESS_RETRY = 30.0  # one unknown address asks for a refresh at most this often
MISS_WAIT = 1.5  # how long a lookup of an unknown address waits for that refresh
API_TIMEOUT = 20.0  # one device-list request, end to end

#: The headers the directory answers with, in this order; the engine copies exactly these.
NODE_HEADERS = (
    "X-Tailscale-Node",
    "X-Tailscale-Node-Name",
    "X-Tailscale-Node-Tags",
    "X-Tailscale-Node-StableID",
)

T = TypeVar("T")


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Device:
    """One device of the tailnet, as the directory keeps it."""

    id: str  # the API's "id": the numeric node ID (what tsnsrv sends as X-Tailscale-Node)
    stable_id: str  # the API's "nodeId" (n…CNTRL), the preferred, stable identifier
    name: str  # MagicDNS FQDN, e.g. "server.example.ts.net"
    hostname: str  # the machine's own hostname
    addresses: tuple[str, ...]
    tags: tuple[str, ...]
    user: str  # login of the owner ("tagged-devices" style values for tagged nodes)
    external: bool = False  # shared in from another tailnet

    @property
    def computed_name(self) -> str:
        """The node's name as tsnsrv sends it (Tailscale's ``ComputedName``): the first label of
        its MagicDNS name; the whole name for a device shared in from another tailnet."""
        name = self.name.rstrip(".")
        if not name:
            return self.hostname
        return name if self.external else name.split(".", 1)[0]


def device_from_api(d: Any) -> Device:
    """A ``tailscale.models.Device`` (the PyPI client's parse of one list entry) → ``Device``."""
    return Device(
        id=str(d.device_id),
        stable_id=str(d.node_id or ""),
        name=str(d.name or ""),
        hostname=str(d.hostname or ""),
        addresses=tuple(str(a) for a in d.addresses),
        tags=tuple(str(t) for t in d.tags),
        user=str(d.user or ""),
        external=bool(d.is_external),
    )


def devices_from_json(text: str | bytes) -> list[Device]:
    """The API's ``{"devices": [...]}`` body → devices, parsed by the ``tailscale`` package's own
    models (the same code that reads the live API)."""
    from tailscale.models import Devices

    return [device_from_api(d) for d in Devices.from_json(text).devices.values()]


def normalize_address(text: str) -> str | None:
    """A caller's address as Caddy gives it (``{http.request.remote.host}``) → the canonical
    text of its IP (IPv4-mapped IPv6 as IPv4, no zone, no brackets), or None if not an IP."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def address_map(devices: Iterable[Device]) -> dict[str, Device]:
    """Each tailnet address of each device → that device. An address claimed twice (a stale
    list) goes to neither: a wrong identity is worse than none."""
    out: dict[str, Device] = {}
    clashes: set[str] = set()
    for device in devices:
        for raw in device.addresses:
            # the API lists bare addresses; prefixes ("100.64.0.1/32") are tolerated
            addr = normalize_address(raw.split("/", 1)[0])
            if addr is None:
                continue
            other = out.get(addr)
            if other is not None and other.id != device.id:
                clashes.add(addr)
            out[addr] = device
    for addr in clashes:
        del out[addr]
    return out


def header_value(text: str) -> str:
    """A value safe in an HTTP header: control characters become spaces, edges trimmed."""
    return "".join(" " if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text).strip()


def node_headers(device: Device | None) -> list[tuple[str, str]]:
    """What ``/whois`` answers for a device (tsnsrv's header names and value forms); nothing for
    an unknown caller. ``X-Tailscale-Node-Tags`` only for tagged nodes, joined with ", "."""
    if device is None:
        return []
    values = {
        "X-Tailscale-Node": device.id,
        "X-Tailscale-Node-Name": device.computed_name,
        "X-Tailscale-Node-Tags": ", ".join(device.tags),
        "X-Tailscale-Node-StableID": device.stable_id,
    }
    out: list[tuple[str, str]] = []
    for name in NODE_HEADERS:
        value = header_value(values[name])
        if value:
            out.append((name, value))
    return out


def whois_address(target: str) -> str:
    """The ``addr`` query parameter of a ``/whois?addr=…`` request target ('' if absent)."""
    from urllib.parse import parse_qs, urlsplit

    values = parse_qs(urlsplit(target).query).get("addr")
    return values[0] if values else ""


# --------------------------------------------------------------------------- the API client


class ApiError(Exception):
    pass


class _AsyncioThread:
    """An asyncio loop on a daemon thread of its own, for the asyncio-only ``tailscale`` client:
    one client lives there for the directory's whole life, so an OAuth token is reused (the
    client renews it) instead of being fetched for every refresh."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="whois-api", daemon=True)
        self.thread.start()

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop; cancelling the caller (e.g. ``fail_after``) cancels it."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        finally:
            if not future.done():
                future.cancel()

    async def close(self) -> None:
        """Cancel what is left on the loop, stop it, join the thread and close the loop."""

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.get_running_loop().shutdown_asyncgens()

        try:
            with trio.move_on_after(5):
                await self.call(cancel_the_rest())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            await trio.to_thread.run_sync(self.thread.join, 5)
            if not self.thread.is_alive():
                self.loop.close()


class DeviceSource:
    """The tailnet's device list through the ``tailscale`` package, with an API key or an OAuth
    client secret. The secret stays inside (``Secret``); errors never carry it."""

    def __init__(self, credentials: Secret, session_factory: SessionFactory | None = None) -> None:
        self._credentials = credentials
        self._session_factory = session_factory
        self._runner: _AsyncioThread | None = None
        self._client: Any = None
        self._session: Any = None

    def __repr__(self) -> str:
        return "DeviceSource(credentials=Secret('***'))"

    async def _fetch(self) -> list[Device]:
        from tailscale import Tailscale, TailscaleError

        if self._client is None:
            self._session = self._session_factory() if self._session_factory else None
            secret = self._credentials.reveal()
            if self._credentials.is_oauth_client_secret:
                client_id, value, _ = split_client_secret(secret)
                self._client = Tailscale(
                    oauth_client_id=client_id, oauth_client_secret=value, session=self._session
                )
            else:
                self._client = Tailscale(api_key=secret, session=self._session)
        try:
            found = await self._client.devices()
        except TailscaleError as exc:
            message = str(exc).replace(self._credentials.reveal(), "***")
            raise ApiError(f"{type(exc).__name__}: {message}") from None
        return [device_from_api(d) for d in found.values()]

    async def fetch(self) -> list[Device]:
        if self._runner is None:
            self._runner = _AsyncioThread()
        with trio.fail_after(API_TIMEOUT):
            return await self._runner.call(self._fetch())

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return

        async def close() -> None:
            if self._session is not None:
                await self._session.close()
            if self._client is not None:
                await self._client.close()

        try:
            with trio.move_on_after(5):
                await runner.call(close())
        finally:
            await runner.close()


# --------------------------------------------------------------------------- the directory


@dataclass
class DirectoryState:
    devices: int = 0
    refreshes: int = 0
    failures: int = 0
    last_error: str | None = None
    last_refresh: float | None = None  # trio clock of the last successful refresh
    hits: int = 0  # lookups that named a device
    misses: int = 0  # lookups of an address no device has (or not an address)

    def as_json(self, now: float) -> dict[str, object]:
        age = None if self.last_refresh is None else round(now - self.last_refresh, 1)
        return {
            "devices": self.devices,
            "refreshes": self.refreshes,
            "failures": self.failures,
            "last_error": self.last_error,
            "seconds_since_refresh": age,
            "lookups": {"hit": self.hits, "miss": self.misses},
        }


class Directory:
    """Tailnet address → device, kept fresh in the background (``run``), asked by ``lookup``."""

    def __init__(
        self,
        source: DeviceSource,
        *,
        interval: float = REFRESH_INTERVAL,
        miss_interval: float = MISS_REFRESH_INTERVAL,
        miss_wait: float = MISS_WAIT,
        address_retry: float = ADDRESS_RETRY,
    ) -> None:
        self.source = source
        self.interval = interval
        self.miss_interval = miss_interval
        self.miss_wait = miss_wait
        self.address_retry = address_retry
        self.state = DirectoryState()
        self._map: Mapping[str, Device] = {}
        self._wake = trio.Event()  # a miss asks for a refresh
        self._done = trio.Event()  # set (and replaced) when a refresh ends
        self._started = 0  # refreshes started
        self._completed = 0  # refreshes ended (well or not)
        self._last_attempt: float | None = None
        self._asked: dict[str, float] = {}  # unknown address → when it last asked for a refresh

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh now, then every ``interval`` and when a miss asks; never raises for an API
        failure (logged; the last good map is kept)."""
        task_status.started()
        try:
            while True:
                self._wake = trio.Event()
                self._started += 1
                self._last_attempt = trio.current_time()
                try:
                    await self._refresh()
                finally:
                    self._completed += 1
                    done, self._done = self._done, trio.Event()
                    done.set()
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
                    await trio.sleep_until(self._last_attempt + self.miss_interval)
        finally:
            with trio.CancelScope(shield=True):
                await self.source.aclose()

    async def _refresh(self) -> None:
        try:
            devices = await self.source.fetch()
        except Exception as exc:  # any failure of the API or its client: keep the last good map
            self.state.failures += 1
            if isinstance(exc, trio.TooSlowError):
                self.state.last_error = f"no answer within {API_TIMEOUT:g}s"
            elif isinstance(exc, ApiError):
                self.state.last_error = str(exc)
            else:  # an unexpected error of the client: its type only, never its text
                self.state.last_error = f"{type(exc).__name__} from the Tailscale API client"
            log.warning("whois directory: cannot list the tailnet's devices: %s", self.state.last_error)
            return
        self._map = address_map(devices)
        first = self.state.last_refresh is None
        self.state.devices = len(devices)
        self.state.refreshes += 1
        self.state.last_refresh = trio.current_time()
        self.state.last_error = None
        if first:
            log.info("whois directory: %d device(s) on the tailnet", len(devices))

    async def wait_refreshed(self) -> None:
        """Until the first refresh has ended (well or not)."""
        while self._completed < 1:
            await self._done.wait()

    def known(self, addr: str) -> Device | None:
        key = normalize_address(addr)
        return None if key is None else self._map.get(key)

    async def lookup(self, addr: str) -> Device | None:
        """The device at ``addr``. On a miss, a refresh is asked for (rate-limited) and waited
        for up to ``miss_wait`` seconds; never longer, never an error."""
        device = await self._lookup(addr)
        if device is None:
            self.state.misses += 1
        else:
            self.state.hits += 1
        return device

    async def _lookup(self, addr: str) -> Device | None:
        key = normalize_address(addr)
        if key is None:
            return None
        device = self._map.get(key)
        if device is not None:
            return device
        now = trio.current_time()
        asked = self._asked.get(key)
        if asked is not None and now - asked < self.address_retry:
            return None  # this address asked recently: no refresh, no wait
        if len(self._asked) > 4096:  # old entries only matter for their retry time
            self._asked = {a: t for a, t in self._asked.items() if now - t < self.address_retry}
        self._asked[key] = now
        # wait for a refresh that starts after now (the one in flight may predate the device)
        target = self._started + 1
        self._wake.set()
        with trio.move_on_after(self.miss_wait):
            while self._completed < target:
                await self._done.wait()
        return self._map.get(key)


async def read_api_credentials(source: ApiKeySource) -> Secret:
    """The directory's credentials from their file or the environment; a ``ConfigError`` naming
    the option (never echoing the value) when they are unreadable, empty or not a key."""
    if source.path is None:
        assert source.env_value is not None  # validate() gives one or the other
        return source.env_value
    try:
        text = (await trio.Path(source.path).read_text(encoding="utf-8")).strip()
    except OSError as exc:
        raise ConfigError([Problem("api_key_path", f"cannot read {source.path!r}: {exc.strerror}")]) from None
    if not text:
        raise ConfigError([Problem("api_key_path", f"{source.path!r} is empty")])
    why = api_credentials_problem(text)
    if why is not None:
        raise ConfigError([Problem("api_key_path", f"{source.path!r} {why}")])
    return Secret(text)
