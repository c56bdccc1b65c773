"""Forget a user in stored data (offline; no Ray needed).

    python -m jobs.forget_user storage.root=<uri> forget.user_id=<id>

Removes the user's rows from every stored table (raw events copied into storage, dataset
versions, feedback shards, evaluation predictions; vocabularies keep a pseudonym), writes the
audit record ``privacy/forgotten/<digest>.json`` (no raw id), and makes every later
``jobs.preprocess`` drop the user's events from the raw logs. A running service also holds the
user's recent events in memory: use ``DELETE /v1/users/{id}`` (admin key) there, which does all
of this and clears the live state.
"""

from __future__ import annotations

import json
from typing import Any, Dict

from components.data import privacy
from components.storage import Storage
from jobs.runtime import run_cli


# What main(cfg) reads: `--help` lists these settings.
CONFIG_SECTIONS = ("storage", "forget")


def main(cfg: Any) -> Dict[str, Any]:
    if not cfg.forget.user_id:
        raise ValueError("forget.user_id: give the id of the user to forget")
    record = privacy.forget_user(Storage.from_config(cfg.storage), str(cfg.forget.user_id))
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    run_cli(main)
