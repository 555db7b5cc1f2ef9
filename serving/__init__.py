"""Serving: the MLflow pyfunc wrapper and registry (``pyfunc.py``, ``registry.py``), Triton adapters and clients."""
