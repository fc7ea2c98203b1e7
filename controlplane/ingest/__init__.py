"""MQTT ingest: device messages in, validated, batched into the database.

:mod:`.receiver` holds the ingest (:class:`MqttIngest`), which receives
through :mod:`.connection` (its MQTT connection, read and acknowledged in
bulk) speaking :mod:`.wire` (the MQTT v5 packets);
:mod:`.writer_process` validates and writes in a process of its own, through
:mod:`.batch_writer`; :mod:`.decode` turns one raw message into an item;
:mod:`.stats` counts what arrived and what was settled.
"""

from .receiver import MqttAuthError, MqttIngest

__all__ = ["MqttAuthError", "MqttIngest"]
