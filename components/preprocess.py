"""KFP component: preprocess ONE shard of the raw videos/images (scene cuts → filters → captions → clips)."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def preprocess(source: str, data_version: str, shard: str, preset: str, overrides: list, shard_data: Output[Dataset],
               report: Output[Markdown]):
    """Shard ``shard`` ("i/n") of the folder (or list file) ``source`` → a partial dataset folder (clips, meta.json,
    scores.parquet, rejects.csv, summary.json). No MLflow run here: it is a pure function of its inputs — among them
    ``data_version`` (from ``plan_shards``) — so KFP may cache it; ``merge`` logs the preprocessing run with every
    shard's summary."""
    from components.glue import artifacts, data, reports, settings
    from easyanimate.preprocess.run import parse_shard, run_preprocess

    cfg = settings.config(preset, overrides)
    summary = run_preprocess(source, shard_data.path, cfg.preprocess, shard=parse_shard(shard), progress=False)
    shard_data.metadata.update({"shard": shard, "source": source, "data_version": data_version,
                                "dvc_data_hash": data.dvc_hash(source), **artifacts.scalars(summary)})
    reports.markdown_report(report, f"Preprocess shard {shard}", artifacts.scalars(summary),
                            notes=[f"source: {source}"])
