"""Loading a model from a local folder or the Hugging Face hub: the checks that turn a
missing file or an unreachable hub into one clear line naming the config key, shared by the
diffusion model (models.py), the T5 branch (encoding/t5.py), the rewards and the driver."""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def unloadable(source: str, what: str):
    """An OSError from diffusers or transformers (a file missing from a folder or a hub
    repository) as a ValueError naming `source`, so that commands end with one line and exit
    status 2 instead of a traceback. A hub id that cannot be reached at all is
    `check_hub_model`'s, before loading."""
    try:
        yield
    except OSError as e:
        where = "a local folder" if Path(source).exists() else "a hub id"  # check_hub_model has said the rest
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"{source!r} cannot be loaded as {what} ({where}): {cause}") from e


def check_hub_model(repo_id: str, revision: str | None, key: str = "model.pretrained",
                    filename: str = "model_index.json") -> None:
    """ValueError naming `key`, unless the hub id is in the local hub cache or the hub answers
    for it now: one quick request, instead of a load that retries each file for half a minute
    (on the driver, before any worker would fail the same way)."""
    import huggingface_hub

    if huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision) is not None:
        return
    try:
        huggingface_hub.model_info(repo_id, revision=revision, timeout=10)
    except Exception as e:
        raise ValueError(f"{key}: {repo_id!r} is not a local folder, not in the hub cache, and the hub "
                         f"cannot serve it ({type(e).__name__}: {str(e).splitlines()[0][:200]}); give a local "
                         "folder or download the model first") from None
