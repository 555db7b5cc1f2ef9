"""The training pipeline (``train_pipeline.py``) and its drivers: compile, local run, cluster submit (``cli.py``)."""
