"""Registered presets: one JSON file each in `presets/` (installed as package data).

An entry holds the exact architecture (`config`), the download handles tried
in order (`handles`), and optionally `local`: a folder of weights shipped
inside `presets/`. Entries without handles or local files are
architecture-only (random weights), e.g. the tiny test presets.
"""

import difflib
import functools
import json
import os


@functools.lru_cache(maxsize=1)
def presets_dir():
    try:  # installed: the `presets/` folder is the package `keras_gemma2.presets`
        from importlib import resources

        return str(resources.files("keras_gemma2.presets"))
    except ModuleNotFoundError:  # running from a source checkout
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return os.path.join(os.path.dirname(package), "presets")


@functools.lru_cache(maxsize=1)
def _entries():
    entries = {}
    root = presets_dir()
    for file_name in sorted(os.listdir(root)):
        if not file_name.endswith(".json"):
            continue
        with open(os.path.join(root, file_name)) as f:
            entry = json.load(f)
        if entry.get("local"):
            entry["local"] = os.path.join(root, entry["local"])
        entries[entry["name"]] = entry
    return entries


def names():
    return list(_entries())


def get(name):
    return dict(_entries()[name])


def list_presets():
    """{name: description} of every registered preset."""
    return {name: entry["description"] for name, entry in _entries().items()}


def unknown_name_message(name):
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"Unknown preset {name!r}.{hint} Registered presets: {', '.join(names())}. "
        "You can also pass a local directory (KerasHub or transformers format) or a "
        "'kaggle://' / 'hf://' handle."
    )
