"""firmware_bridge: gpiozero devices and serial firmware <-> orbcast topics.

Inputs publish readings (:mod:`orbcast.messages`), outputs follow their
topics in canonical order, serial links speak the framing documented in
:mod:`firmware_bridge.serial_link`. Run it with ``firmware-bridge run``.
"""

from .bridge import Bridge
from .config import BridgeConfig, BridgeConfigError, DeviceSpec, SerialSpec, load, loads
from .devices import DS18B20
from .serial_link import FrameDecoder, Record, SerialLink, encode_frame

__all__ = [
           "DS18B20",
           "Bridge",
           "BridgeConfig",
           "BridgeConfigError",
           "DeviceSpec",
           "FrameDecoder",
           "Record",
           "SerialLink",
           "SerialSpec",
           "encode_frame",
           "load",
           "loads",
]
