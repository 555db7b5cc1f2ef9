"""KFP component: merge the preprocessed shards into one training dataset (and log the preprocessing run)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def merge(shards: Input[list[Dataset]], preset: str, overrides: str, tracking_uri: str, parent_run_id: str,
          dataset: Output[Dataset], report: Output[Markdown]):
    """The shard folders (``dsl.Collected`` from the fan-out) → one dataset folder with meta.json; the nested
    MLflow run "preprocess" gets the config, the merged counts and every shard's summary/rejects."""
    from components import _runtime as rt
    from easyanimate.preprocess.run import merge_outputs

    cfg = rt.config(preset, overrides)
    with rt.step_run(tracking_uri, parent_run_id, "preprocess", cfg) as tracker:
        summary = merge_outputs([s.path for s in shards], dataset.path)
        rt.log_dataset(tracker, dataset.path, shards, summary)
        dataset.metadata.update(rt.dataset_metadata(dataset.path, shards, summary))
        rt.markdown_report(report, "Dataset", dict(dataset.metadata), links={"MLflow run": rt.run_link(tracker)})
