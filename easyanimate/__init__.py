"""EasyAnimate V2 text-to-video: models, pipeline, data and training library.

The library never imports the MLOps stack (kfp, mlflow, tritonclient, dvc); drivers do.
Heavy submodules load lazily so `import easyanimate` stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {
    "EasyAnimatePipeline": "easyanimate.pipeline",
    "Transformer3DModel": "easyanimate.models.transformer3d",
    "AutoencoderKLMagvit": "easyanimate.models.autoencoder_magvit",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'easyanimate' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
