"""KFP v2 components (one per file, thin) and the MLflow ``Tracker``."""
