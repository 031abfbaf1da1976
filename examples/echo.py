"""The smallest useful wirehub app: every line comes back to its sender.

Run it from the repository root, then type lines into ``nc 127.0.0.1 7400``::

    wirehub run examples.echo:app
"""

import wirehub

app = wirehub.App(framing="line")  # or "length": 4-byte big-endian length prefix


@app.on_frame
def echo(conn, frame: bytes):
    conn.send(frame)
