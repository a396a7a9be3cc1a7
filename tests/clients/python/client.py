"""A ws-notify client built on the `websockets` library (PyPI), driven by
tests/real_clients.rs. Prints one JSON object per line on stdout:

    {"event": "open", "subprotocol": ..., "extensions": [...]}
    {"event": "message", "data": <the server's JSON message>}
    {"event": "close", "code": ..., "reason": ...}

and exits 0 after the close.

Usage: python client.py <ws-url> <token>
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


def emit(obj):
    print(json.dumps(obj), flush=True)


async def main(url, token):
    async with connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=5,
        # The server pings; websockets answers. Its own keepalive pings are
        # answered by the server too, so leave them on.
    ) as ws:
        extensions = [type(e).__name__ for e in ws.protocol.extensions]
        emit({"event": "open", "subprotocol": ws.subprotocol, "extensions": extensions})
        try:
            async for raw in ws:
                emit({"event": "message", "data": json.loads(raw)})
        except ConnectionClosed:
            pass  # reported below from the close frame
        close = ws.protocol.close_rcvd
        emit(
            {
                "event": "close",
                "code": close.code if close else None,
                "reason": close.reason if close else None,
            }
        )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
