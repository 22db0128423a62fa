"""`/push/…`: the binary-cache protocol a pushing `nix copy --to …/push` needs.

Every request but `GET nix-cache-info` needs a push token (HTTP Basic, the password; netrc gives
it to curl). Checks that
need no body come first, so a refused PUT never gets `100 Continue` and sends no body: a bad
token is 401, a declared NAR over `max_nar_bytes` 413. A PUT is never answered 5xx, 408 or 429:
Nix ≤ 2.33.1 then retries it with an empty body and hangs (NixOS/nix #15023); a cache-side
failure (its nix-daemon down) is 424, which Nix reports at once as a final error.

| request                          | answer                                                      |
|----------------------------------|-------------------------------------------------------------|
| GET nix-cache-info               | StoreDir, so the client never PUTs one                      |
| GET <hash>.narinfo               | 200 for a path pushed and still retained, else 404 (upload) |
| HEAD nar/<filehash>.nar[.ext]    | 200 when uploaded and waiting for its narinfo, else 404     |
| PUT nar/<filehash>.nar[.ext]     | streamed to disk, hashed; 400 when its hash is not its name |
| PUT <hash>.narinfo               | checked (Sig, NarHash, references), imported, rooted        |
| PUT <hash>.ls, log/<drv>, realisations/…, build-trace-v2/…, debuginfo/… | accepted (logs kept) |
"""

from __future__ import annotations

import logging
import os
import re

import trio

from ..context import Context
from ..narinfo import cache_info
from ..push.narbody import NarBodyError
from ..push.service import DAEMON_DOWN_STATUS, PushService
from ..push.upload import MAX_NARINFO_BYTES, UploadRefused, check_signed, parse_nar_name, parse_uploaded
from ..storepath import StorePath, StorePathError, is_hash_part
from ..transport.messages import Request, RequestBody, RequestBodyError, Response, error, text

log = logging.getLogger("harmonia.push")

MAX_SIDE_FILE = 64 * 1024 * 1024  # .ls, logs, realisations: read and kept or dropped
_NARINFO = re.compile(r"/(?P<hash>[^/]+)\.narinfo")
_NAR = re.compile(r"/nar/(?P<name>[^/]+)")
_LOG = re.compile(r"/log/(?P<drv>[^/]+)")
_DROPPED = re.compile(r"/(?:[^/]+\.ls|realisations/[^/]+|build-trace-v2/.+|debuginfo/.+|nix-cache-info)")
_OUTCOME_BY_STATUS = {
    400: "bad_request",
    403: "bad_signature",
    409: "conflict",
    413: "too_large",
    424: "daemon_failed",
}


class _Counted:
    """The request body, counting what it delivers into the metrics."""

    def __init__(self, ctx: Context, body: RequestBody) -> None:
        self._ctx = ctx
        self._body = body
        self.length = body.length

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._body.receive(max_bytes)
        self._ctx.metrics.bytes_received(len(data))
        return data


async def handle_push(ctx: Context, request: Request, match: re.Match[str]) -> Response:
    service = ctx.push
    if service is None:
        return error(404, "pushing is not enabled on this cache (set [push] enable = true)")
    rest = match["rest"] or "/"
    if rest == "/nix-cache-info" and request.method in ("GET", "HEAD"):
        # public facts (StoreDir): answered without a token, so a pusher with a wrong token
        # sees our 401 with its reason at its first upload, not "does not appear to be a binary cache"
        return _cache_info(ctx)
    try:
        name = service.tokens.authenticate(request.header("authorization"))
    except Exception as exc:  # an unreadable token file: the operator's problem, said in the log
        log.error("push tokens cannot be read: %s", exc)
        name = None
    if name is None:
        if request.method == "PUT":
            ctx.metrics.push_outcome("unauthorized")
        return error(
            401,
            "pushing needs a push token: put it in netrc as the password (harmonia-cache push-token create NAME)",
            [("WWW-Authenticate", 'Basic realm="harmonia push"')],
        )
    if request.method in ("GET", "HEAD"):
        return await _read(ctx, service, request, rest)
    if request.method != "PUT":
        return error(405, f"method {request.method} not allowed here", [("Allow", "GET, HEAD, PUT")])
    try:
        resp = await _put(ctx, service, request, rest, name)
    except Exception:
        # a fault of ours; a 500 would make Nix ≤ 2.33.1 retry the PUT without its body and hang
        log.exception("push %s %s failed", request.method, request.raw_path)
        resp = error(
            DAEMON_DOWN_STATUS, "the cache failed to take this upload (its log says why); not your fault"
        )
    if resp.status >= 400 and (outcome := _OUTCOME_BY_STATUS.get(resp.status)):
        ctx.metrics.push_outcome(outcome)
    return resp


async def _read(ctx: Context, service: PushService, request: Request, rest: str) -> Response:
    if m := _NARINFO.fullmatch(rest):
        hash_part = m["hash"]
        if not is_hash_part(hash_part):
            return error(400, "a narinfo name is the 32-character hash of a store path")
        resolved = await ctx.resolve(hash_part)
        if resolved is None or not service.retained(resolved.info.path):
            return error(404, "not pushed here (or its retention ended): upload it")
        return text(
            200, ctx.narinfo(resolved).render(), "text/x-nix-narinfo", [("Cache-Control", "no-store")]
        )
    if m := _NAR.fullmatch(rest):
        nar = parse_nar_name(m["name"])
        # a HEAD without ?hash= is Nix asking whether to upload: absent is 404, never 400
        if nar is None or service.pending(nar) is None:
            return error(404, "no such uploaded NAR")
        return text(200, "uploaded; waiting for its narinfo\n", extra=[("Cache-Control", "no-store")])
    return error(404, "not a push endpoint")


async def _put(ctx: Context, service: PushService, request: Request, rest: str, who: str) -> Response:
    body = _Counted(ctx, request.body)
    if m := _NAR.fullmatch(rest):
        nar = parse_nar_name(m["name"])
        if nar is None:
            return error(400, "a NAR is uploaded as nar/<nix32 sha256 of the file>.nar[.xz|.zst|.bz2]")
        if body.length is None:
            return error(411, "a NAR upload needs a Content-Length")
        if body.length > service.config.max_nar_bytes:
            return error(
                413,
                f"this NAR has {body.length} bytes; the cache takes at most {service.config.max_nar_bytes}",
            )
        try:
            received = await service.store_nar(nar, body)
        except (UploadRefused, NarBodyError) as exc:
            message = exc.message if isinstance(exc, UploadRefused) else str(exc)
            log.info("%s: upload of nar/%s refused (%d): %s", who, nar.name, exc.status, message)
            return error(exc.status, message)
        except Exception as exc:
            return _body_failure(exc, "NAR")
        log.debug(
            "%s uploaded nar/%s (%d bytes, NAR %d bytes)",
            who,
            nar.name,
            received.file_size,
            received.nar_size,
        )
        return text(200, "uploaded\n")
    if m := _NARINFO.fullmatch(rest):
        if not is_hash_part(m["hash"]):
            return error(400, "a narinfo name is the 32-character hash of a store path")
        if body.length is not None and body.length > MAX_NARINFO_BYTES:
            return error(413, f"a narinfo is at most {MAX_NARINFO_BYTES} bytes")
        try:
            data = await _read_all(body, MAX_NARINFO_BYTES, service.config.idle_timeout)
        except Exception as exc:
            return _body_failure(exc, "narinfo")
        if data is None:
            return error(413, f"a narinfo is at most {MAX_NARINFO_BYTES} bytes")
        try:
            uploaded = parse_uploaded(data, m["hash"], ctx.config.virtual_nix_store)
            check_signed(uploaded.info, service.config.trusted_keys)
            outcome = await service.import_path(uploaded)
        except UploadRefused as exc:
            log.info("%s: push of %s refused (%d): %s", who, m["hash"], exc.status, exc.message)
            return error(exc.status, exc.message)
        ctx.metrics.push_outcome("imported" if outcome == "imported" else "already_valid")
        log.info("%s pushed %s (%s)", who, uploaded.info.path, outcome)
        return text(200, f"{outcome}: {uploaded.info.path}\n")
    if m := _LOG.fullmatch(rest):
        return await _put_log(service, request, body, m["drv"])
    if _DROPPED.fullmatch(rest):
        try:
            await _read_all(body, MAX_SIDE_FILE, service.config.idle_timeout)
        except Exception as exc:
            return _body_failure(exc, "upload")
        return text(200, "accepted (the cache makes its own)\n")
    return error(404, "not a push endpoint")


async def _put_log(service: PushService, request: Request, body: _Counted, drv: str) -> Response:
    try:
        data = await _read_all(body, MAX_SIDE_FILE, service.config.idle_timeout)
    except Exception as exc:
        return _body_failure(exc, "log")
    try:
        base = StorePath.parse_base_name(drv, "/nix/store").base_name
    except StorePathError:
        return text(200, "accepted; not a derivation name, so dropped\n")
    if data is None or (request.header("content-encoding") or "identity").lower() != "identity":
        return text(200, "accepted; dropped (too large or compressed)\n")
    target = service.log_path(base)
    try:
        await trio.to_thread.run_sync(_write_file, target, data)
    except OSError as exc:
        log.warning("cannot keep the log of %s: %s", base, exc.strerror)
        return text(200, "accepted; dropped (the cache cannot write it)\n")
    return text(200, "log kept\n")


def _write_file(target: os.PathLike[str], data: bytes) -> None:
    path = os.fspath(target)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


async def _read_all(body: _Counted, limit: int, idle_timeout: float) -> bytes | None:
    """The whole body, or None (read to its end) when it is over `limit`."""
    parts: list[bytes] = []
    size = 0
    while True:
        with trio.fail_after(idle_timeout):
            data = await body.receive(65536)
        if not data:
            return b"".join(parts) if size <= limit else None
        size += len(data)
        if size <= limit:
            parts.append(data)
        else:
            parts.clear()


def _cache_info(ctx: Context) -> Response:
    body = cache_info(ctx.config.virtual_nix_store, ctx.config.priority, want_mass_query=False)
    return text(200, body, "text/x-nix-cache-info", [("Cache-Control", "no-store")])


def _body_failure(exc: Exception, what: str) -> Response:
    """A body that broke off, went idle or was too long: the client's side of the wire."""
    if isinstance(exc, trio.TooSlowError):
        return error(400, f"the {what} body stopped arriving (idle timeout)")
    if isinstance(exc, RequestBodyError):
        return error(400, f"the {what} body is incomplete: {exc}")
    raise exc
