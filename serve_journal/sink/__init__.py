"""The write path's sink side: what turns journal entries into Parquet files and manifest records.

* ``settings.py``: :class:`SinkSettings` (storage, manifest chain, signer) and ``manifest_hook``;
* ``writer.py``: the one partition file writer, shared by both sinks;
* ``actor.py``: the Ray writer actors of the embedded transport, and their pool;
* ``kafka.py``: the Kafka sink's consumer logic (exactly once, offsets recovered from storage);
* ``kafka_app.py``: the one way to run a Kafka sink (CLI, Serve application, Ray actor), always
  with manifest records.
"""
