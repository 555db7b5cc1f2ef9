"""KFP component: open the pipeline run's parent MLflow run (every step nests its own run under it)."""

from kfp import dsl

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def start_tracking(tracking_uri: str, experiment: str, run_name: str, kfp_run_id: str, preset: str, overrides: list,
                   data: str, num_shards: int, train_vae: bool, lora: bool, model_name: str) -> str:
    """Create the parent run (RUNNING until ``finish_tracking``), log the resolved config and the pipeline
    parameters; returns the parent run id."""
    from components.glue import settings, tracking

    cfg = settings.config(preset, overrides)
    params = {"data": data, "num_shards": num_shards, "train_vae": train_vae, "lora": lora, "model_name": model_name,
              "overrides": overrides}
    return tracking.start_pipeline_run(tracking_uri, experiment, run_name, cfg, params, tags={"kfp_run_id": kfp_run_id})
