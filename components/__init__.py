"""KFP v2 components (one per file, thin) and the MLflow ``Tracker``.

Every component runs in ONE image (``infra/docker/Dockerfile``): ``BASE_IMAGE`` is ``$EASYANIMATE_IMAGE`` when set
(read when a component module is first imported, i.e. before compiling), else ``easyanimate-mlops:<package version>``.
This module imports the standard library only: component files import it at their top, and compiling a pipeline must
not need torch or MLflow.
"""

import os
from importlib import metadata

IMAGE_REPOSITORY = "easyanimate-mlops"


def _package_version() -> str:
    try:
        return metadata.version("easyanimate-mlops")
    except metadata.PackageNotFoundError:  # a bare checkout without `pip install -e .`
        return "latest"


def component_image() -> str:
    """The image every component runs in: ``$EASYANIMATE_IMAGE``, else ``easyanimate-mlops:<package version>``."""
    return os.environ.get("EASYANIMATE_IMAGE") or f"{IMAGE_REPOSITORY}:{_package_version()}"


BASE_IMAGE = component_image()
