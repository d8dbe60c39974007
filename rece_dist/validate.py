"""``rece validate``: is a store safe to train on?

Reads everything once: store.json (format), every configuration document (resolves against
the catalog, id matches content and file name), every Parquet file of both tables (schema,
types, nulls, NaN, negative values, time order; see :mod:`rece_dist.schema`), and checks that
every configuration with data has a document. The first problem raises a ``ReceError`` that
names the file, the column and the problem; a clean store returns a :class:`StoreReport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Catalog
from .errors import StoreError
from .schema import TABLES
from .store import STORE_FORMAT, Store


@dataclass(frozen=True)
class StoreReport:
    uri: str
    configs: int
    partitions: dict[str, int]
    rows: dict[str, int]
    dates: tuple[str, ...]
    configs_without_data: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        tables = ", ".join(f"{t}: {self.rows[t]} rows in {self.partitions[t]} partitions" for t in TABLES)
        span = f"{self.dates[0]} .. {self.dates[-1]}" if self.dates else "no dates"
        lines = [f"{self.uri}: valid store, {self.configs} configurations; {tables}; {span}"]
        if self.configs_without_data:
            lines.append(f"  configurations without data: {', '.join(self.configs_without_data)}")
        return "\n".join(lines)


def validate_store(uri: str, catalog: Catalog | None = None) -> StoreReport:
    """Check every file of the store at ``uri``; raise on the first problem."""
    store = Store(uri)
    store.require()
    meta = store.read_json("store.json")
    where = store.file_uri(store.path("store.json"))
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise StoreError(f"{where}: unsupported store format {got!r} (expected {STORE_FORMAT})")
    configs = store.configs(catalog)

    partitions: dict[str, int] = {}
    rows: dict[str, int] = {}
    with_data: set[str] = set()
    dates: set[str] = set()
    for table in TABLES:
        parts = store.partitions(table)
        partitions[table] = len(parts)
        rows[table] = 0
        for part in parts:
            if part.config_id not in configs:
                raise StoreError(
                    f"{store.file_uri(part.files[0])}: configuration {part.config_id} has data but no "
                    f"document configs/{part.config_id}.json"
                )
            rows[table] += len(store.scan(part))
            with_data.add(part.config_id)
            dates.add(part.date)
    return StoreReport(
        uri=store.uri,
        configs=len(configs),
        partitions=partitions,
        rows=rows,
        dates=tuple(sorted(dates)),
        configs_without_data=tuple(sorted(set(configs) - with_data)),
    )
