"""KFP component: evaluate the pipeline folder (reconstruction, validation loss, flicker, motion, samples)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], dataset: Input[Dataset], preset: str, overrides: list, tracking_uri: str,
             parent_run_id: str, metrics: Output[Metrics], samples: Output[Artifact], report: Output[HTML]):
    """``easyanimate.evaluate.evaluate`` on the model and the dataset's held-out clips → Metrics (what ``register``
    gates on), the sample MP4s + contact sheet (an artifact here, and in the nested MLflow run), an HTML report."""
    from components.glue import artifacts, reports, settings, tracking
    from easyanimate.evaluate import evaluate as run

    cfg, out = settings.config(preset, overrides), artifacts.workdir(parent_run_id, "evaluate")
    with tracking.step_run(tracking_uri, parent_run_id, "evaluate", cfg, dataset=dataset) as tracker:
        result = run(cfg, model.path, artifacts.meta_path(dataset), out, tracker=tracker)
        links = tracking.sample_links(tracker, result["samples"])
    artifacts.publish(out, samples, gate_reasons=result["gate_reasons"])
    values = artifacts.log_kfp_metrics(metrics, result)
    reports.html_report(report, "Evaluation", values, links, result["contact_sheet"], notes=result["gate_reasons"])
