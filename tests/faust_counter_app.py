"""A small Faust app for the foundation test: an agent with a table, on the real broker.

It reads words from ``$IN_TOPIC``, counts them in a table (with a changelog topic on the
broker), and writes ``word:count`` to ``$OUT_TOPIC``. Run: ``python tests/faust_counter_app.py worker``.
"""

from __future__ import annotations

import os

import faust

app = faust.App(
    os.environ["APP_ID"],
    broker=f"kafka://{os.environ['BOOTSTRAP']}",
    store="memory://",
    web_enabled=False,
    topic_partitions=1,
    topic_replication_factor=1,
)
words = app.topic(os.environ["IN_TOPIC"], key_type=bytes, value_type=bytes, value_serializer="raw")
out = app.topic(os.environ["OUT_TOPIC"], key_type=bytes, value_type=bytes, value_serializer="raw")
counts = app.Table("counts", default=int, partitions=1)


@app.agent(words)
async def count(stream: faust.StreamT) -> None:
    async for word in stream:
        counts[word] += 1
        await out.send(key=word, value=f"{word.decode()}:{counts[word]}".encode())


if __name__ == "__main__":
    app.main()
