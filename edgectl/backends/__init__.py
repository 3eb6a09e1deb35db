"""The one list of ExecuTorch backends (registry.py), consulted by export and by the runtime."""
