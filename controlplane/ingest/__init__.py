"""MQTT ingest: device messages in, validated, batched into the database.

:mod:`.receiver` holds the MQTT client (:class:`MqttIngest`);
:mod:`.writer_process` validates and writes in a process of its own, through
:mod:`.batch_writer`; :mod:`.decode` turns one raw message into an item;
:mod:`.stats` counts what arrived and what was settled.
"""

from .receiver import MqttAuthError, MqttIngest

__all__ = ["MqttAuthError", "MqttIngest"]
