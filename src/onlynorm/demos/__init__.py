"""Demos run by ``onlynorm demo``: each module exposes ``run(seed, json_path, console) -> bool`` (True = passed)."""
