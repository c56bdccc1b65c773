"""The main job: everything that exists so far, end to end, on the configured data.

    python -m jobs.pipeline [data.source=... data.path=... storage.root=...]

Today: generate or load the data, preprocess it with Ray Data, print the dataset's stats.
Training, evaluation, promotion and serving join this job as they land.
"""

from __future__ import annotations

from typing import Any, Dict

from jobs import preprocess
from jobs.runtime import ray_session, run_cli


def main(cfg: Any) -> Dict[str, Any]:
    with ray_session(cfg.ray):
        summary = preprocess.run(cfg, engine="ray")
    print(preprocess.format_stats(summary["stats"]))
    print(f"dataset written to {summary['uri']}")
    return {"preprocess": summary}


if __name__ == "__main__":
    run_cli(main)
