"""KFP component: evaluate the pipeline folder (reconstruction, validation loss, flicker, motion, samples)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], dataset: Input[Dataset], preset: str, overrides: str, tracking_uri: str,
             parent_run_id: str, metrics: Output[Metrics], samples: Output[Artifact], report: Output[HTML]):
    """``easyanimate.evaluate.evaluate`` on the model and the dataset's held-out clips → Metrics (what ``register``
    gates on), the sample MP4s + contact sheet (an artifact here, and in the nested MLflow run), an HTML report."""
    from components import _runtime as rt
    from easyanimate.evaluate import evaluate as run

    cfg, out = rt.config(preset, overrides), rt.workdir(parent_run_id, "evaluate")
    with rt.step_run(tracking_uri, parent_run_id, "evaluate", cfg) as tracker:
        result = run(cfg, model.path, rt.meta_path(dataset), out, tracker=tracker)
        links = rt.sample_links(tracker, result["samples"])
    rt.publish(out, samples, gate_reasons=result["gate_reasons"])
    values = rt.log_kfp_metrics(metrics, result)
    rt.html_report(report, "Evaluation", values, links, result["contact_sheet"], notes=result["gate_reasons"])
