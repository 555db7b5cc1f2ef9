"""KFP component: train (or fine-tune) the MagViT video VAE on the dataset."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_vae(dataset: Input[Dataset], preset: str, overrides: str, tracking_uri: str, parent_run_id: str,
              vae: Output[Model], metrics: Output[Metrics], report: Output[Markdown]):
    """``easyanimate.train.vae.train_vae`` in a per-run work folder (a retried pod resumes from its checkpoints) →
    the VAE folder as a Model artifact; params, metrics and reconstruction MP4s go to the nested MLflow run."""
    from components import _runtime as rt
    from easyanimate.train.vae import train_vae as run

    cfg = rt.config(preset, overrides)
    work = rt.workdir(parent_run_id, "train_vae")
    with rt.step_run(tracking_uri, parent_run_id, "train_vae", cfg) as tracker:
        summary = run(cfg, rt.meta_path(dataset), work, resume="latest", tracker=tracker)
        link = rt.run_link(tracker)
    rt.publish(summary["final"], vae, steps=summary["steps"], mlflow_run=link)
    values = rt.log_kfp_metrics(metrics, summary)
    rt.markdown_report(report, "VAE training", values, links={"MLflow run": link})
