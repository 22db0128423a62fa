"""A raw HTTP/2 client on the h2 library, for tests that must misbehave on purpose: small windows,
slow reading, resets, aborts. Works over any trio stream (memory, TCP, TLS)."""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio


@dataclass
class StreamRecord:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    informational: list[int] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    received: int = 0  # DATA bytes, also when not kept
    ended: bool = False
    reset: int | None = None  # the server's RST_STREAM error code

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


class H2Client:
    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        window: int = 65535,
        auto_ack: bool = True,
        keep_data: bool = True,
        authority: str = "test",
    ) -> None:
        self.stream = stream
        self.auto_ack = auto_ack
        self.keep_data = keep_data
        self.authority = authority
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.streams: dict[int, StreamRecord] = {}
        self.terminated: int | None = None  # GOAWAY error code
        self.closed = False
        self._sending = trio.Lock()

    async def start(self) -> None:
        self.conn.initiate_connection()
        await self.flush()

    async def flush(self) -> None:
        async with self._sending:  # a reader task and the test's task both send
            data = self.conn.data_to_send()
            if data and not self.closed:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.closed = True  # the server went away; what it sent may still be read

    async def request(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        end: bool = True,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":path", path), (":scheme", "http"), (":authority", self.authority)]
        hdrs += headers or []
        raw = [(k.encode(), v.encode()) for k, v in hdrs]
        self.streams[sid] = StreamRecord()
        self.conn.send_headers(sid, raw, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        await self.flush()
        return sid

    async def send_body(self, sid: int, data: bytes, *, end: bool = False) -> None:
        self.conn.send_data(sid, data, end_stream=end)
        await self.flush()

    async def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid)
        await self.flush()

    def ack(self, sid: int, n: int) -> None:
        self.conn.acknowledge_received_data(n, sid)

    async def pump(self) -> bool:
        """Read once and dispatch; False at end of connection."""
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self._on(event)
        await self.flush()
        return True

    def _on(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        rec = self.streams.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived) and rec:
            headers = {k.decode(): v.decode() for k, v in event.headers or []}
            status = int(headers[":status"])
            if isinstance(event, h2.events.InformationalResponseReceived):
                rec.informational.append(status)
            else:
                rec.status, rec.headers = status, headers
        elif isinstance(event, h2.events.DataReceived):
            assert event.data is not None and event.flow_controlled_length is not None
            if rec:
                rec.received += len(event.data)
                if self.keep_data:
                    rec.data += event.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and rec:
            rec.ended = True
        elif isinstance(event, h2.events.StreamReset) and rec:
            rec.reset = int(event.error_code)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = int(event.error_code)  # type: ignore[arg-type]

    async def read_forever(self) -> None:
        """Pump until the connection ends: run it as a task instead of cancelling `pump()`, since a
        TLS stream whose read was cancelled half-way is broken for good."""
        while await self.pump():
            pass

    async def wait(self, sid: int) -> StreamRecord:
        rec = self.streams[sid]
        while not rec.done:
            if not await self.pump():
                break
        return rec

    async def get(self, path: str, **kw: object) -> StreamRecord:
        return await self.wait(await self.request(path, **kw))  # type: ignore[arg-type]
