"""KFP component: merge the preprocessed shards into one training dataset (and log the preprocessing run)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def merge(shards: Input[list[Dataset]], preset: str, overrides: list, tracking_uri: str, parent_run_id: str,
          dataset: Output[Dataset], report: Output[Markdown]):
    """The shard folders (``dsl.Collected`` from the fan-out) → one dataset folder with meta.json; the nested
    MLflow run "preprocess" gets the config, the merged counts, every shard's summary/rejects and the dataset as its
    MLflow input (digest = the data version)."""
    from components.glue import data, reports, settings, tracking
    from easyanimate.preprocess.run import merge_outputs

    cfg = settings.config(preset, overrides)
    with tracking.step_run(tracking_uri, parent_run_id, "preprocess", cfg) as tracker:
        summary = merge_outputs([s.path for s in shards], dataset.path)
        dataset.metadata.update(data.dataset_metadata(dataset.path, shards, summary))
        tracking.log_dataset(tracker, dataset.path, shards, summary, dict(dataset.metadata))
        reports.markdown_report(report, "Dataset", dict(dataset.metadata),
                                links={"MLflow run": tracking.run_link(tracker)})
