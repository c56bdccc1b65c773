"""Preprocess raw interaction logs into a dataset version with Ray Data.

    python -m jobs.preprocess data.source=<synthetic|movielens|amazon|mind|files> data.path=<dir> \
        storage.root=<uri>

Ray Data reads and validates every shard in parallel (malformed rows go to quarantine with a
reason); the driver folds the good rows into compact integer codes as they stream in, then runs
the global steps (de-dup, bot filter, k-core, vocabulary, split) and writes
``datasets/<name>/<version>/`` with ``stats.json``, then points ``datasets/<name>/latest.json``
at it.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Optional

import pyarrow as pa

from components import layout
from components.data import privacy
from components.config import to_dict
from components.data.dataset_version import (QuarantineSink, ShardValidator, ValidatedStream, build_dataset,
                                        fingerprint, write_dataset)
from components.data.schemas import ITEM_SCHEMA
from components.data.shards import ShardReader, describe_missing, list_shards
from components.data.sources import RawSource, prepare_source
from components.storage import Storage
from jobs import telemetry
from jobs.progress import stage as progress_stage
from jobs.runtime import ray_session, run_cli

log = logging.getLogger("jobs.preprocess")


def iter_validated_ray(validator: ShardValidator, shards: List[str]) -> Iterator[pa.Table]:
    """Validated tables of all shards, in shard order, computed by Ray Data tasks."""
    import ray
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True  # deterministic row order

    def validate(batch: Dict[str, Any]) -> Iterator[pa.Table]:
        for rel in batch["shard"]:
            yield from validator.validate(str(rel))

    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(validate, batch_size=1, batch_format="numpy")
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def iter_validated_local(validator: ShardValidator, shards: List[str]) -> Iterator[pa.Table]:
    """The same, in this process (the single-process reference and a debugging aid)."""
    for rel in shards:
        yield from validator.validate(rel)


def run(cfg: Any, engine: Optional[str] = None) -> Dict[str, Any]:
    """Preprocess ``cfg.data`` into a dataset version; returns a summary with the stats.
    ``engine``: ray or local (default ``cfg.preprocess.engine``; ray needs an initialised Ray)."""
    t0 = time.perf_counter()
    engine = engine or cfg.preprocess.engine
    storage = Storage.from_config(cfg.storage)
    source = prepare_source(cfg, storage)
    shards = list_shards(source.events, source.events_prefix)
    if not shards:
        raise FileNotFoundError(describe_missing(source.events, source.events_prefix, "event"))
    item_shards = list_shards(source.items, source.items_prefix) if source.items else []

    tombstones = privacy.forgotten(storage)  # users forgotten through DELETE /v1/users or jobs.forget_user
    pseudo = privacy.Pseudonymizer.from_env() if cfg.preprocess.pseudonymize_users else None
    settings = {**_settings(cfg), **({"forgotten": sorted(tombstones.items())} if tombstones else {}),
                **({"pseudonym_key": pseudo.key_id} if pseudo else {})}
    version = cfg.preprocess.version or fingerprint(_listing(source, shards, item_shards), settings)
    prefix = layout.dataset(source.name, version)
    storage.delete(prefix)
    sink = QuarantineSink(storage, layout.join(prefix, layout.QUARANTINE))
    stream = ValidatedStream(sink, forgotten=tombstones, pseudonymize=pseudo)
    now_ms = int(time.time() * 1000)
    events = ShardValidator(ShardReader(source.events, source.columns, cfg.preprocess.batch_size), "events",
                            cfg.data.ts_unit, cfg.data.default_event, now_ms)
    items = ShardValidator(ShardReader(source.items, source.item_columns, cfg.preprocess.batch_size), "items") \
        if source.items else None
    iterate = iter_validated_ray if engine == "ray" else iter_validated_local
    t_read = time.perf_counter()
    try:
        with progress_stage("preprocess", unit="row") as bar:  # rows read and validated (total unknown)
            for table in iterate(events, shards):
                stream.add_events(table)
                bar.update(table.num_rows, kind="events")
            if items is not None and item_shards:
                for table in iterate(items, item_shards):
                    stream.add_items(table)
                    bar.update(table.num_rows, kind="items")
    finally:
        sink.close()
    read_s = time.perf_counter() - t_read
    if stream.log.rows == 0:
        raise ValueError(
            f"no valid events in {len(shards)} shard(s) at {source.events.uri(source.events_prefix)}: "
            f"{stream.rows_in} rows read, quarantined by reason: {dict(sink.reasons) or 'none'}")

    catalog = pa.concat_tables(stream.items) if stream.items else ITEM_SCHEMA.empty_table()
    built = build_dataset(stream.log, catalog, cfg.preprocess)
    built.stats.update({
        "dataset": source.name, "version": version, "engine": engine,
        "raw_rows": stream.rows_in, "event_shards": len(shards), "item_shards": len(item_shards),
        "quarantined": sink.total, "quarantined_by_reason": dict(sink.reasons),
        "pseudonymized_users": pseudo is not None,
        "forgotten_users": len(tombstones), "forgotten_events_dropped": stream.forgotten_rows,
        "read_validate_s": round(read_s, 3), "created_at": datetime.now(timezone.utc).isoformat(),
        "source": {k: v for k, v in source.info.items() if k != "key"},
    })
    write_dataset(storage, prefix, built)
    built.stats["total_s"] = round(time.perf_counter() - t0, 3)
    _publish(storage, source.name, version, prefix, built.stats)
    return {"uri": storage.uri(prefix), "prefix": prefix, "version": version, "stats": built.stats}


def _publish(storage: Storage, name: str, version: str, prefix: str, st: Dict[str, Any]) -> None:
    """stats.json, then the dataset's latest.json pointer (atomically), and the job's row counts."""
    storage.write_json(layout.join(prefix, layout.STATS), st)
    storage.write_json_atomic(layout.dataset_latest(name), {"name": name, "version": version,
                                                            "uri": storage.uri(prefix), "created_at": st["created_at"]})
    telemetry.record_many("llmrec_job_rows", {
        "raw": st.get("raw_rows"), "quarantined": st.get("quarantined"), "interactions": st.get("interactions"),
        "users": st.get("users"), "items": st.get("items"), **{k: v for k, v in (st.get("dropped") or {}).items()}},
        "kind", job="preprocess", run=f"{name}/{version}")


def _listing(source: RawSource, shards: List[str], item_shards: List[str]) -> List[Dict[str, Any]]:
    out = []
    for store, files in ((source.events, shards), (source.items, item_shards)):
        for rel in files:
            info = store.fs.get_file_info(store.path(rel))
            out.append({"uri": store.uri(rel), "size": info.size, "mtime": str(info.mtime)})
    return out


def _settings(cfg: Any) -> Dict[str, Any]:
    pre = to_dict(cfg.preprocess)
    pre.pop("version", None)
    pre.pop("batch_size", None)
    pre.pop("engine", None)  # how, not what: the same input gives the same version either way
    if pre.get("dedupe", True):  # the default, left out so versions made before the key existed stay the same
        pre.pop("dedupe", None)
    data = to_dict(cfg.data)
    return {"preprocess": pre, "columns": data["columns"], "item_columns": data["item_columns"],
            "ts_unit": data["ts_unit"], "default_event": data["default_event"]}


def format_stats(stats: Dict[str, Any]) -> str:
    d = stats.get("dropped", {})
    lines = [
        f"dataset {stats['dataset']} version {stats['version']} ({stats['split']} split)",
        f"  raw rows {stats['raw_rows']:,} in {stats['event_shards']} shard(s); quarantined {stats['quarantined']:,}"
        + (f" {stats['quarantined_by_reason']}" if stats["quarantined"] else ""),
        f"  dropped: duplicates {d.get('duplicates', 0):,}, bots {d.get('bot_events', 0):,}, "
        f"k-core(k={stats['kcore']['k']}) {d.get('kcore', 0):,}",
        f"  users {stats['users']:,}  items {stats['items']:,}  interactions {stats['interactions']:,}",
        f"  train {stats['train']:,}  valid {stats['valid']:,}  test {stats['test']:,}; "
        f"items without metadata {stats['items_without_metadata']:,}",
        f"  took {stats.get('total_s', 0):.1f}s",
    ]
    return "\n".join(lines)


# What main(cfg) reads: `--help` lists these settings.
CONFIG_SECTIONS = ("storage", "data", "preprocess", "ray")


def main(cfg: Any) -> Dict[str, Any]:
    if cfg.preprocess.engine == "ray":
        with ray_session(cfg.ray):
            summary = run(cfg)
    else:
        summary = run(cfg)
    print(format_stats(summary["stats"]))
    print(f"dataset written to {summary['uri']}")
    return summary


if __name__ == "__main__":
    run_cli(main)
