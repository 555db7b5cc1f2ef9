"""KFP component: train the DiT (full or LoRA) → a pipeline folder; in-process, or as a multi-node TrainJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_dit(dataset: Input[Dataset], preset: str, overrides: list, tracking_uri: str, parent_run_id: str,
              lora: bool, launcher: str, trainjob_nodes: int, trainjob_gpus_per_node: int, trainjob_image: str,
              pipeline: Output[Model], metrics: Output[Metrics], report: Output[Markdown], vae: Input[Model] = None):
    """``easyanimate.train.dit.train_dit`` on the dataset (on the freshly trained ``vae`` when given) → the pipeline
    folder as a Model artifact (a LoRA run: base + LoRA merged, LoRA files under ``lora/``). ``launcher``:
    "local" trains in this pod; "trainjob" runs ``accelerate launch … -m easyanimate train-dit`` as a Kubeflow
    Trainer TrainJob (``infra/k8s/trainjob.yaml``) on ``trainjob_nodes`` × ``trainjob_gpus_per_node`` GPUs and waits."""
    from components.glue import artifacts, models, reports, settings, tracking, trainjob
    from easyanimate.train.dit import train_dit as run

    work = artifacts.workdir(parent_run_id, "train_dit")
    cfg = models.pipeline_with_vae(settings.config(preset, overrides), vae.path if vae else None, work)
    with tracking.step_run(tracking_uri, parent_run_id, "train_dit", cfg, tags={"lora": lora}, dataset=dataset,
                           system_metrics=True) as tracker:
        if launcher == "trainjob":
            summary = trainjob.train_dit_trainjob(cfg, preset, overrides, artifacts.meta_path(dataset), work, lora,
                                                  trainjob_nodes, trainjob_gpus_per_node, trainjob_image, tracker)
        else:
            summary = run(cfg, artifacts.meta_path(dataset), work / "run", resume="latest", lora=lora, tracker=tracker)
        link = tracking.run_link(tracker)
    models.export_pipeline(cfg, summary["final"], pipeline, lora, mlflow_run=link)
    values = artifacts.log_kfp_metrics(metrics, summary)
    reports.markdown_report(report, "DiT training", values, links={"MLflow run": link})
