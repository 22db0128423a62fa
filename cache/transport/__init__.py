"""The cache's HTTP transport: neutral messages, the HTTP/1.1 and HTTP/2 servers, one body writer.

- `messages`: Request (with its RequestBody), Response and its bodies: what routes speak;
- `h1codec`: HTTP/1.1 heads and chunked bodies, parsed and written (pure, no sockets);
- `h1server`: HTTP/1.1 connections on trio (sendfile for file regions);
- `h2server`: HTTP/2 connections on the h2 library (h2c and ALPN h2), flow-control bounded;
- `delivery`: the one body writer both servers use (length check, closing, metrics, access log).

The transport knows nothing of routes or the store: it calls a `Handler` (request → response).
"""
