"""Package scripts (``external_pre_script``, ``external_script``): running and meaning."""
