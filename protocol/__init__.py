"""slmfleet wire protocol: the one import both the agent and the control plane need.

Pure code: topics, message models, canonical JSON, Ed25519 signing and
verification. No network, no disk, no clock it is not handed.
"""

from .canonical import canonical_json
from .errors import (
    MalformedPayload,
    PayloadTooLarge,
    ProtocolError,
    SchemaMismatch,
    SignatureError,
    TopicError,
)
from .messages import (
    MAX_PAYLOAD_BYTES,
    Accelerator,
    ActiveModel,
    Capabilities,
    CpuInfo,
    DeviceMessage,
    DeviceState,
    Event,
    EventType,
    Hello,
    InferenceStats,
    OsInfo,
    Runtime,
    State,
    Telemetry,
    Tier,
    decode,
    encode,
)
from .signing import PublicKey, SigningKey, key_id_for, verify_value
from .topics import (
    DEVICE_TO_CP,
    TOPIC_ROOT,
    TopicKind,
    check_device_id,
    device_topic,
    is_valid_device_id,
    parse_topic,
    subscription,
)

__all__ = [
    "DEVICE_TO_CP",
    "MAX_PAYLOAD_BYTES",
    "TOPIC_ROOT",
    "Accelerator",
    "ActiveModel",
    "Capabilities",
    "CpuInfo",
    "DeviceMessage",
    "DeviceState",
    "Event",
    "EventType",
    "Hello",
    "InferenceStats",
    "MalformedPayload",
    "OsInfo",
    "PayloadTooLarge",
    "ProtocolError",
    "PublicKey",
    "Runtime",
    "SchemaMismatch",
    "SignatureError",
    "SigningKey",
    "State",
    "Telemetry",
    "Tier",
    "TopicError",
    "TopicKind",
    "canonical_json",
    "check_device_id",
    "decode",
    "device_topic",
    "encode",
    "is_valid_device_id",
    "key_id_for",
    "parse_topic",
    "subscription",
    "verify_value",
]
