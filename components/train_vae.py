"""KFP component: train (or fine-tune) the MagViT video VAE on the dataset."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_vae(dataset: Input[Dataset], preset: str, overrides: list, tracking_uri: str, parent_run_id: str,
              vae: Output[Model], metrics: Output[Metrics], report: Output[Markdown]):
    """``easyanimate.train.vae.train_vae`` in a per-run work folder (a retried pod resumes from its checkpoints) →
    the VAE folder as a Model artifact; params, metrics and reconstruction MP4s go to the nested MLflow run."""
    from components.glue import artifacts, reports, settings, tracking
    from easyanimate.train.vae import train_vae as run

    cfg = settings.config(preset, overrides)
    work = artifacts.workdir(parent_run_id, "train_vae")
    with tracking.step_run(tracking_uri, parent_run_id, "train_vae", cfg, dataset=dataset,
                           system_metrics=True) as tracker:
        summary = run(cfg, artifacts.meta_path(dataset), work, resume="latest", tracker=tracker)
        link = tracking.run_link(tracker)
    artifacts.publish(summary["final"], vae, steps=summary["steps"], mlflow_run=link)
    values = artifacts.log_kfp_metrics(metrics, summary)
    reports.markdown_report(report, "VAE training", values, links={"MLflow run": link})
