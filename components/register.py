"""KFP component: register the pipeline folder in the MLflow registry; move ``champion`` only if the gates pass."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register(model: Input[Model], metrics: Input[Metrics], dataset: Input[Dataset], preset: str, overrides: list,
             tracking_uri: str, parent_run_id: str, model_name: str,
             report: Output[Markdown]) -> NamedTuple("RegisterOutputs", [("model_version", str), ("champion", bool)]):
    """A new version of ``model_name`` (alias ``challenger``) with lineage tags and the weights' sha256 manifest,
    logged in the nested run "register"; ``promote_if_better`` moves ``champion`` to it when every
    ``evaluate.gate_*`` passes and it is not worse than the current champion."""
    from components.glue import artifacts, data, reports, settings, tracking
    from serving.registry import promote_if_better, register_pipeline

    cfg = settings.config(preset, overrides)
    name, values = model_name or cfg.register.model_name, artifacts.metrics_of(metrics)
    limits, higher = settings.gates(cfg.evaluate)
    with tracking.step_run(tracking_uri, parent_run_id, "register", cfg) as tracker:
        mv = register_pipeline(model.path, tracking_uri=tracking_uri, name=name, run_id=tracker.run_id,
                               tags=data.lineage_tags(cfg, preset, overrides, parent_run_id, dataset),
                               by_reference=cfg.register.by_reference, metrics=values)
        promoted, reasons = promote_if_better(name, mv.version, values, limits, tracking_uri=tracking_uri,
                                              higher_is_better=higher)
        tracker.set_tags({"model_version": mv.version, "champion": promoted})
    tracking.summarize_pipeline_run(tracking_uri, parent_run_id, values, mv.version, promoted)
    reports.markdown_report(report, f"{name} version {mv.version}", {"champion": promoted, **dict(mv.tags)},
                            links={"MLflow run": tracking.run_link(tracker)}, notes=reasons)
    return (str(mv.version), promoted)
