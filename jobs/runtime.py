"""What every job shares: the command line and the Ray session."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional

from components.config import AppConfig, ConfigError, parse_cli
from components.storage import StorageError

log = logging.getLogger("jobs")

# Failures caused by input or configuration: reported as one clear line, exit code 1.
USER_ERRORS = (ConfigError, StorageError, FileNotFoundError, ValueError)


def run_cli(main: Callable[[Any], Any], schema: type = AppConfig, argv: Optional[List[str]] = None) -> None:
    """Parse ``[--config FILE] key=value ...``, run ``main(cfg)``, map user errors to exit codes."""
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m {main.__module__} [--config FILE] key=value ...\n\ndefaults:\n")
        from components.config import load_config, to_yaml

        print(to_yaml(load_config([], None, schema)))
        return
    try:
        cfg = parse_cli(argv, schema)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        main(cfg)
    except USER_ERRORS as exc:
        log.debug("failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


@contextmanager
def ray_session(ray_cfg: Any) -> Iterator[None]:
    """Connect to the configured cluster ($RAY_ADDRESS under ``ray job submit``) or start a local
    Ray; shut down only what this call started."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or None
    # The dashboard stays on (127.0.0.1): Ray Train's controller is monitored through its state API.
    kwargs = {} if address else {"num_cpus": ray_cfg.num_cpus}
    if not address:  # a Ray we start: with Serve's fast path (serve/runner.py, read at start)
        from serve.runner import apply_serve_env

        apply_serve_env()
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
