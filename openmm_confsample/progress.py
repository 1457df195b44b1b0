"""Progress bars for long work (tqdm, with rate and ETA), off in quiet mode and in libraries' inner calls."""

from __future__ import annotations


def progress_bar(iterable=None, enabled: bool = True, desc: str = "", unit: str = "it", total: int | None = None,
                 **options):
    """A tqdm bar over ``iterable`` (or a manual bar with ``total``) when ``enabled``; otherwise a silent one.

    tqdm is imported here, on the first bar actually shown.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=not enabled, **options)
