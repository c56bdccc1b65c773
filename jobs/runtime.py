"""What every job shares: the command line and the Ray session."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Mapping, Optional

from components.config import AppConfig, ConfigError, parse_cli
from components.storage import StorageError

log = logging.getLogger("jobs")

# Failures caused by input or configuration: reported as one clear line, exit code 1.
USER_ERRORS = (ConfigError, StorageError, FileNotFoundError, ValueError)


def run_cli(main: Callable[[Any], Any], schema: type = AppConfig, argv: Optional[List[str]] = None,
            prog: Optional[str] = None) -> None:
    """Parse ``[--config FILE] key=value ...``, run ``main(cfg)``, map user errors to exit codes.
    ``-h``/``--help`` prints the settings ``main`` reads instead (``help_text``); ``prog`` names
    the command in it (default ``python -m <main's module>``)."""
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(main, schema, prog))
        return
    try:
        cfg = parse_cli(argv, schema)
        require_checkpoint_key(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        main(cfg)
    except USER_ERRORS as exc:
        if os.environ.get("LOG_LEVEL", "").upper() == "DEBUG":  # Ray's logging config may drop log.debug
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def require_checkpoint_key(cfg: Any, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a job on a Ray cluster (``ray.address`` / $RAY_ADDRESS) or on s3:// storage while
    $LLMREC_CHECKPOINT_KEY is unset, unless ``security.allow_unsigned_checkpoints``.

    Without the key, a training checkpoint's manifest is a plain sha256 list that anyone who can
    write the storage can regenerate for a forged file, which DeepSpeed then unpickles on resume
    (components/checkpoints.py). Local runs (no address, file:// storage) need no key.

    Raises:
        ConfigError: naming the variable and how to set it."""
    if "storage" not in cfg or ("security" in cfg and cfg.security.allow_unsigned_checkpoints):
        return
    from components.checkpoints import CHECKPOINT_KEY_ENV  # imports torch: only when a job runs

    if environ.get(CHECKPOINT_KEY_ENV):
        return
    address = (cfg.ray.address if "ray" in cfg else None) or environ.get("RAY_ADDRESS")
    if address and address != "local":  # "local": ray.init starts a new local Ray
        where = f"on the Ray cluster at {address}"
    elif str(cfg.storage.root).startswith("s3://"):
        where = f"on shared storage {cfg.storage.root}"
    else:
        return
    raise ConfigError(
        f"{CHECKPOINT_KEY_ENV} is not set, and this job runs {where}: without it anyone who can write "
        f"the storage can forge a training checkpoint that a resume unpickles. Set it to the same "
        f"secret on every node: infra/*.yaml read it from the Kubernetes Secret llmrec-checkpoint-key "
        f"(kubectl create secret generic llmrec-checkpoint-key --from-literal=key=$(openssl rand -hex 32)); "
        f"elsewhere export {CHECKPOINT_KEY_ENV}=<that secret> before `ray start` on each node and for "
        f"the job. Or accept unsigned checkpoints with security.allow_unsigned_checkpoints=true.")


def help_text(main: Callable[[Any], Any], schema: type = AppConfig, prog: Optional[str] = None) -> str:
    """Usage and the settings ``main`` reads: the ``CONFIG_SECTIONS`` its module declares (every
    setting of ``schema`` when it declares none), each with its default and explanation."""
    from components.config_help import describe_options

    module = sys.modules.get(main.__module__)
    spec = getattr(module, "__spec__", None)  # under `python -m jobs.x` the module is __main__
    prog = prog or f"python -m {spec.name if spec else main.__module__}"
    doc = (getattr(module, "__doc__", None) or "").strip().split("\n\n")[0]
    return "\n".join([
        f"usage: {prog} [--config FILE] [--preset NAME] key=value ...", "", doc, "",
        "Settings as key=default. Later layers win: the defaults below <- --config FILE (or the",
        "data.source preset) <- --preset NAME <- key=value.", "",
        describe_options(schema, _help_sections(schema, getattr(module, "CONFIG_SECTIONS", None)))])


def _help_sections(schema: type, sections: Optional[tuple]) -> Optional[tuple]:
    """A job's CONFIG_SECTIONS plus ``security``, which run_cli reads for every job
    (require_checkpoint_key)."""
    import dataclasses

    if sections and "security" in {f.name for f in dataclasses.fields(schema)}:
        return (*sections, "security")
    return sections


def ray_log_level() -> str:
    """Level of Ray's own logs (progress, per-step training reports, worker INFO): WARNING unless
    LLMREC_RAY_LOGS=1 or LOG_LEVEL=DEBUG brings them back. The jobs' own progress lines stay."""
    verbose = os.environ.get("LLMREC_RAY_LOGS") == "1" or os.environ.get("LOG_LEVEL", "").upper() == "DEBUG"
    return "INFO" if verbose else "WARNING"


def quiet_worker_logs() -> None:
    """In a Ray Train worker: DeepSpeed's INFO lines, torch's deprecation notes from its comm calls
    and Ray Train's per-report INFO line, unless Ray's logs are asked for (``ray_log_level``)."""
    if ray_log_level() == "INFO":
        return
    import warnings

    import torch

    if not torch.cuda.is_available():  # before DeepSpeed is imported: it picks its accelerator then
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    try:  # Ray Train's "Reporting training result N" INFO line per report (a logger named by file)
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def ray_logging_config(ray_cfg: Any, level: str, environ: Mapping[str, str] = os.environ) -> Any:
    """The ``ray.LoggingConfig`` of a job's Ray session: ``ray.log_encoding`` (TEXT or JSON), else
    Ray's own $RAY_LOGGING_CONFIG_ENCODING, else TEXT; ``level`` as ``ray_log_level`` gives it.
    Ray applies it to the driver and to every task and actor of the job."""
    import ray

    encoding = ray_cfg.log_encoding or environ.get("RAY_LOGGING_CONFIG_ENCODING") or "TEXT"
    return ray.LoggingConfig(encoding=encoding.upper(), log_level=level)


class _AtLeastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


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
    api_env = None
    if not address and not os.environ.get("RAY_API_SERVER_ADDRESS"):
        # A Ray we start: its dashboard on a port chosen here, named in RAY_API_SERVER_ADDRESS for
        # the state API. Without it the state API of a process with no address (Ray Train's
        # placement-group cleaner actor) looks for "the" local Ray and fails with "Found multiple
        # active Ray instances" when another pipeline runs on the machine. The workers inherit the
        # variable from this process (the raylet is started from it).
        port = _free_port()
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
        api_env = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    if not address:  # a Ray we start: with Serve's fast path (serve/runner.py, read at start)
        from serve.runner import apply_serve_env

        apply_serve_env()
    level = ray_log_level()
    if level != "INFO":
        # transformers' "Loading weights" bars (read when it is imported: this process, and the
        # workers of a Ray started here, which inherit the environment).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if level != "INFO":  # Ray Data's progress lines and INFO logs; worker processes' root loggers below
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # "Started Serve", "Application ... is ready": serve.start() re-configures this logger's
        # level in the driver, so a filter (which it keeps) drops its INFO records instead.
        serve_logger = logging.getLogger("ray.serve")
        serve_logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _AtLeastWarning) for f in serve_logger.filters):
            serve_logger.addFilter(_AtLeastWarning())
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
                 logging_config=ray_logging_config(ray_cfg, level), **kwargs)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        if api_env is not None and os.environ.get("RAY_API_SERVER_ADDRESS") == api_env:
            del os.environ["RAY_API_SERVER_ADDRESS"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
