"""Small ready-made monitor commands (``python -m vigil.probes.http URL``)."""
