"""Fetching `kaggle://` and `hf://` handles (kagglehub / huggingface_hub show progress)."""

import os

from keras_gemma2.io import safetensors_files


class DownloadError(RuntimeError):
    pass


def _cache_roots():
    """kagglehub's and huggingface_hub's download caches (their defaults and variables)."""
    home = os.path.expanduser("~")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    hf_home = os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")
    return [
        os.environ.get("KAGGLEHUB_CACHE") or os.path.join(cache, "kagglehub"),
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
        or os.path.join(hf_home, "hub"),
    ]


def in_download_cache(path):
    """Whether `path` lies in a download cache, where downloading again is the fix for a bad file.

    A folder the user made or saved cannot be downloaded again.
    """
    path = os.path.realpath(path)
    for root in _cache_roots():
        root = os.path.realpath(root)
        if path == root or path.startswith(root + os.sep):
            return True
    return False


def repair_hint(path, missing=False):
    """The fix for a bad or missing file: download again only where it was downloaded."""
    if in_download_cache(path):
        return "Delete the preset's folder from the download cache and download the preset again."
    return safetensors_files.repair_hint(path, missing)


def fetch(handle):
    """Download a handle and return the local directory that holds it."""
    if handle.startswith("kaggle://"):
        try:
            import kagglehub
        except ImportError as error:
            raise DownloadError(
                f"{handle}: kagglehub is not installed (pip install 'keras-gemma2[download]')."
            ) from error
        try:
            return kagglehub.model_download(handle[len("kaggle://") :])
        except Exception as error:  # network, auth, missing model: say what happened
            raise DownloadError(f"{handle}: {type(error).__name__}: {error}") from error
    if handle.startswith("hf://"):
        try:
            import huggingface_hub
        except ImportError as error:
            raise DownloadError(
                f"{handle}: huggingface_hub is not installed (pip install 'keras-gemma2[download]')."
            ) from error
        try:
            return huggingface_hub.snapshot_download(
                handle[len("hf://") :],
                allow_patterns=["*.json", "*.safetensors", "tokenizer.model"],
            )
        except Exception as error:
            raise DownloadError(
                f"{handle}: {type(error).__name__}: {error} (Gemma repos are gated: accept the "
                "license on the Hub and set HF_TOKEN)"
            ) from error
    raise ValueError(f"Unknown handle {handle!r}: expected 'kaggle://...' or 'hf://...'.")


def fetch_any(name, handles):
    """Try each handle in turn; if none works, say what was tried and the offline way."""
    failures = []
    for handle in handles:
        try:
            return fetch(handle)
        except DownloadError as error:
            failures.append(str(error))
    tried = "\n  ".join(failures) or "(no download handle registered)"
    raise DownloadError(
        f"Could not download preset {name!r}. Tried:\n  {tried}\n"
        "To load it without a network, download the files elsewhere and pass the directory: "
        f"from_preset('/path/to/{name}') accepts a KerasHub preset folder (config.json, "
        "model.weights.h5, assets/tokenizer/vocabulary.spm) or a transformers checkpoint folder "
        "(config.json, *.safetensors, tokenizer.model)."
    )
