"""The OS side of vigil: processes, process groups, services, monitors.

``spawner`` is the only module that starts processes; everything else goes through it.
This package's ``__init__`` imports nothing so that ``python -m vigil.supervise.sentinel``
stays small.
"""
