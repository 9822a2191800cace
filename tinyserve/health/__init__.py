"""Health: device monitor, ejection of failing models, health aggregation, Prometheus, structured logs.

docs/health.md describes what each part reports.  The parts are standalone; tinyserve/server.py wires
them together.  Importing this package does not import torch or pynvml (the device monitor imports
pynvml when it first polls, unless given an NVML module).
"""

from tinyserve.health.devices import THROTTLE_REASONS, DeviceMonitor, DeviceReading, host_reading
from tinyserve.health.ejection import (EJECTED, FAILED, FAILURE_CODES, PROBING, SERVING, EjectionConfig,
                                       EjectionPolicy, ModelState, Transition)
from tinyserve.health.logs import EVENTS, JsonFormatter, configure_logging, log_event
from tinyserve.health.prometheus import MetricsServer, TinyserveCollector, make_registry, on_loop
from tinyserve.health.report import DEVICE_FAULT, HealthReport, ModelInput, assess

__all__ = ["DEVICE_FAULT", "EJECTED", "EVENTS", "FAILED", "FAILURE_CODES", "PROBING", "SERVING", "THROTTLE_REASONS",
           "DeviceMonitor", "DeviceReading", "EjectionConfig", "EjectionPolicy", "HealthReport", "JsonFormatter",
           "MetricsServer", "ModelInput", "ModelState", "TinyserveCollector", "Transition", "assess",
           "configure_logging", "host_reading", "log_event", "make_registry", "on_loop"]
