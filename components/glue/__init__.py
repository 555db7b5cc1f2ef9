"""What the KFP components share, one concern per module, so that each component body stays a few lines.

A component imports these modules inside its body (it runs in the component image, where ``easyanimate``, MLflow and
torch are installed); the heavy imports are local to the functions that need them.

- ``settings``: preset + overrides (the pipeline's list of ``section.key=value``) → ``Config``; the registry gates;
- ``tracking``: the pipeline's MLflow parent run, one nested run per step, links into the MLflow UI, the dataset record;
- ``data``: lineage — the preprocess fan-out plan, the input's data version (DVC hash), dataset metadata, model tags;
- ``artifacts``: KFP artifacts and folders (meta.json, the per-step work folder, publishing, ``Metrics``);
- ``models``: model assembly between steps (the DiT on the freshly trained VAE; LoRA runs exported merged);
- ``reports``: the Markdown / HTML reports the Kubeflow UI renders;
- ``trainjob``: the multi-node DiT launcher, a Kubeflow Trainer ``TrainJob`` (``infra/k8s/trainjob.yaml``);
- ``replay``: a trainer's JSONL tracking folder replayed into an MLflow run.
"""
