"""Typed configuration: dataclass defaults <- YAML file <- ``key=value`` overrides.

Every option is documented once, here, next to its default, as the comment above (or beside) its
field: ``--help`` reads it from there (components/config_help.py). OmegaConf merges the three
layers in struct mode, so an unknown key fails with its dotted name (and the closest valid keys)
instead of being silently ignored.
"""

from __future__ import annotations

import difflib
import importlib.resources
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, OmegaConf  # noqa: F401  (MISSING re-exported for configs)
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from components.models.ranker import RankerConfig
from components.online.canary import CanaryConfig, CanaryRule, with_rule
from components.models.retriever import RetrieverConfig
from components.training.retriever import RetrieverTrainConfig
from components.models.text_encoder import TextEncoderConfig

SOURCES = ("synthetic", "movielens", "amazon", "mind", "recbole", "sequences", "files")
SPLITS = ("loo", "temporal")
LOG_ENCODINGS = ("TEXT", "JSON")  # Ray's logging encodings (ray.LoggingConfig, Serve's LoggingConfig)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


@dataclass
class StorageConfig:
    # One root URI for everything the system writes: file:///abs/path (a bare path is taken as
    # local) or s3://bucket/prefix.
    root: str = "storage"
    # S3-compatible endpoint (MinIO, moto, ...). Empty: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL,
    # else AWS itself. Credentials come from the standard AWS chain.
    endpoint_url: Optional[str] = None
    region: Optional[str] = None


@dataclass
class SyntheticConfig:
    # Size of the generated log; users and items scale with it unless given.
    num_events: int = 100_000
    num_users: Optional[int] = None
    num_items: Optional[int] = None
    num_categories: int = 16
    num_shards: int = 8
    # Average events per taste-coherent session (a session stays in one category).
    session_length: float = 4.0
    # Probability that a user's taste mixture drifts to a second mixture over their lifetime.
    drift: float = 0.5
    # Days the log spans.
    days: int = 120


@dataclass
class ColumnMapping:
    # Source column name for each Event field (generic `files` source). Empty: same name.
    user_id: str = "user_id"
    item_id: str = "item_id"
    ts: str = "ts"
    event: str = "event"
    value: str = "value"
    session_id: str = "session_id"
    context: str = "context"


@dataclass
class ItemColumnMapping:
    item_id: str = "item_id"
    title: str = "title"
    text: str = "text"
    categories: str = "categories"
    updated_at: str = "updated_at"


@dataclass
class DataConfig:
    # synthetic | movielens | amazon | mind | recbole | sequences | files
    source: str = "synthetic"
    # Folder with the publisher's files under their original names (or, for `files`, event
    # files, optionally under events/ and items/ subfolders). Local path or s3:// URI.
    path: Optional[str] = None
    # Dataset name under datasets/; empty: the source name.
    name: Optional[str] = None
    seed: int = 42
    # Unit of integer timestamps in generic files: s | ms | us | ns | auto (by magnitude).
    ts_unit: str = "auto"
    # Event type given to rows that carry none (generic files).
    default_event: str = "view"
    # MIND: also store non-clicked impressions as `skip` events.
    mind_include_skips: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    columns: ColumnMapping = field(default_factory=ColumnMapping)
    item_columns: ItemColumnMapping = field(default_factory=ItemColumnMapping)


@dataclass
class PreprocessConfig:
    # loo: per user, last item = test, second-to-last = valid. temporal: global time cut-offs.
    split: str = "loo"
    # Iterative k-core on users and items (0 disables).
    kcore: int = 5
    # Keep only the earliest of repeated (user, item) events. Off for published benchmark files
    # (recbole, sequences presets), whose splits count repeats as they come.
    dedupe: bool = True
    # Users with more raw events than this are treated as bots and dropped (0 disables).
    bot_max_events: int = 50_000
    # temporal split: the newest fractions of the time range that become valid and test.
    valid_frac: float = 0.1
    test_frac: float = 0.1
    # Dataset version; empty: a fingerprint of the input files and these settings, so the
    # same input gives the same version (and identical content).
    version: Optional[str] = None
    # Store keyed pseudonyms (HMAC-SHA256 under $LLMREC_PRIVACY_KEY) instead of user ids in the
    # dataset; serve with the app arg pseudonymize_users: true so feedback matches them.
    pseudonymize_users: bool = False
    # Rows per Ray Data batch when normalising.
    batch_size: int = 200_000
    # ray: validate shards in Ray Data tasks; local: in this process (no Ray; small data, tests).
    engine: str = "ray"
    # Event weights used by training (a rating's weight is scaled by its value when given).
    event_weights: Dict[str, float] = field(
        default_factory=lambda: {
            "view": 1.0, "click": 1.0, "cart": 2.0, "purchase": 3.0, "rate": 1.0, "skip": 0.5,
        }
    )


@dataclass
class RayConfig:
    # Cluster address; empty: $RAY_ADDRESS (set by `ray job submit`), else a local Ray started
    # on demand.
    address: Optional[str] = None
    # CPUs for a local Ray (empty: all cores).
    num_cpus: Optional[int] = None
    # Log lines of the job's driver and of every Ray task and actor it starts: TEXT, or JSON (one
    # object a line with Ray's job, worker and task ids, for a log collector); passed to
    # ray.init(logging_config=ray.LoggingConfig(encoding=...)). Empty: Ray's own
    # $RAY_LOGGING_CONFIG_ENCODING, else TEXT.
    log_encoding: Optional[str] = None


@dataclass
class LLMFinetuneConfig:
    # Contrastive fine-tuning of the text encoder on (item, next item) text pairs; 0 steps
    # keeps the pretrained encoder frozen.
    steps: int = 20
    batch_size: int = 16
    lr: float = 2e-5
    temperature: float = 0.05


@dataclass
class TrainConfig:
    # Ray Train workers (gloo on CPU, NCCL on GPU) and DeepSpeed settings.
    num_workers: int = 2
    # Workers of the retriever stage (0: num_workers). Its step has a cost that does not shrink
    # with the batch: the full softmax needs every catalog item's vector, the text projection
    # over the whole catalog, and data parallelism repeats it on every worker (plus the gradient
    # exchange). On one 2-core node one worker with both cores trained 1.47x the windows a second
    # of two one-core workers at the same 32 a step on Beauty's short histories, 1.36x on
    # MovieLens' (results/train_layout.json; a first, shorter measurement had MovieLens even).
    # A preset that lowers it raises train.retriever.batch_size (per worker) to keep the step.
    retriever_workers: int = 0
    # CPUs (and torch threads) per worker; 0: the most that still places every worker on the
    # nodes' free CPUs (a 2-CPU node: 1 each for two workers, 2 for one; CPUs held by Serve
    # replicas or other jobs are left to them). GPU workers ask for no CPU unless this is set.
    cpus_per_worker: int = 0
    # A bundle whose catalog has more items than this ships the serving ANN index (ann/, serve/ann.py),
    # built once here, so a replica loads it on a hot swap instead of building it (minutes at
    # 10^6 items). Keep it at or below the Serve arg ann_above; a replica builds the index itself
    # for a bundle without one.
    ann_index_above: int = 200_000
    use_gpu: bool = False
    # Where Ray puts the workers (a placement group): PACK fills a node first (fast gloo/NCCL
    # between them), SPREAD one per node where it can (a node loss takes one worker; what the
    # two-node test runs), STRICT_SPREAD / STRICT_PACK insist.
    placement_strategy: str = "PACK"
    zero_stage: int = 2
    # fp32 | bf16 (bf16 needs hardware support; GPUs)
    precision: str = "fp32"
    # Restarts of the worker group after a worker dies; training resumes from the last checkpoint.
    max_failures: int = 1
    # Seconds a gloo/NCCL collective may wait for its peers before it fails: a stuck rank then
    # becomes a worker error that max_failures restarts from the last checkpoint, not a job that
    # hangs for torch's 30-minute default. Ranks do the same work between collectives, so minutes
    # of waiting mean something is wrong.
    collective_timeout_s: int = 600
    # Dataset version to train on; empty: datasets/<name>/latest.json.
    dataset_version: Optional[str] = None
    # Run id; empty: a new timestamped id.
    run_id: Optional[str] = None
    # Stages run by jobs.train, in order: llm, retriever, ranker.
    stages: List[str] = field(default_factory=lambda: ["llm", "retriever", "ranker"])
    # Fault injection for tests: worker rank 1 exits once when this epoch starts (-1: never).
    fail_at_epoch: int = -1
    # A bundle prefix to start from (jobs.retrain sets the promoted one): the retriever and ranker
    # start from its weights (item rows matched by id), its fine-tuned LLM embeds the catalog and
    # is carried into the new bundle when the llm stage does not run.
    warm_start: Optional[str] = None
    # Extra entries for the bundle's lineage.json (jobs.retrain: the feedback watermark).
    lineage: Dict[str, Any] = field(default_factory=dict)
    retriever: RetrieverTrainConfig = field(default_factory=RetrieverTrainConfig)
    llm: LLMFinetuneConfig = field(default_factory=LLMFinetuneConfig)


@dataclass
class EmbedConfig:
    # jobs.embed_items writes indexes/<run_id>/ (empty: a new id).
    run_id: Optional[str] = None
    # A fine-tuned text encoder to embed with (a bundle's llm/ part, as a storage prefix); empty:
    # the base encoder of the `text` settings.
    llm: Optional[str] = None
    # Actors of the Ray Data embedding pass (each loads the encoder once).
    concurrency: int = 2
    # Keep the vector of every item whose text the same encoder (same settings and weights) embedded
    # in an earlier pass; embed only new or changed items (jobs/embed_items.py). false: embed all.
    reuse: bool = True
    # Number format of the encoder's weights in the catalog pass (vectors are stored float32):
    # fp32 | bf16 | auto (bf16 where the hardware computes it natively - a CPU with AVX512-BF16
    # or AMX, a GPU that supports it -, else fp32). On a 2-core AVX512-BF16 machine bf16
    # embedded 2.2x the items a second of fp32 (275 vs 127, all-MiniLM-L6-v2, 50-token texts);
    # on a CPU without it bf16 is ~6x slower (results/embed_precision.json, docs/benchmarks.md).
    # Vectors at cosine 0.99995 to fp32's. fp32 stays the default until quality is measured
    # with auto on native-bf16 hardware and a catalog of thousands of items.
    precision: str = "fp32"


@dataclass
class EvaluateConfig:
    # Bundle to evaluate (checkpoints/recommender/<run_id>); empty: the one the pipeline trained.
    run_id: Optional[str] = None
    ks: List[int] = field(default_factory=lambda: [10, 20])
    # Test targets with at most this many training interactions form the rare-item slice;
    # users with at most this many training items the short-history slice.
    rare_item_max: int = 10
    short_history_max: int = 10
    # Score the valid and test targets of at most this many users (a fixed hash of the user picks
    # them, the same in every run, so a retrain's gate compares like with like); None: every user.
    # Evaluation ranks the whole catalog per user: at 10^7 users and 10^6 items a sample of 10^5
    # users bounds it (the confidence intervals widen; predictions.parquet then holds the sample).
    max_users: Optional[int] = None
    # MostPopular and ItemKNN are always computed (the gate needs them). This also trains the
    # ID-only and text-only retrievers in-process: it doubles the evaluation's cost, so the
    # pipeline leaves it to benchmarks.quality (once per dataset version) unless asked.
    baselines: bool = False
    # Also run the new-item variant (last-appearing 10% of items lose their training data). The
    # same share of newest items is made new on valid to fit the fusion of items without interactions.
    new_item_variant: bool = False
    new_item_frac: float = 0.1
    # Promotion gate: NDCG@10 on test must clear the floor and not fall more than the
    # tolerance below the currently promoted model.
    ndcg_floor: float = 0.0
    tolerance: float = 0.005
    # Promote without the gate: an operator's explicit override, read by jobs.quick_train (a
    # servable demo model whatever its figures). jobs.evaluate and the pipeline always gate.
    force_promote: bool = False
    # The promoted run this one was trained from (jobs.retrain): it is mapped onto this run's
    # dataset version and evaluated on the same split, the gate compares with that, and the
    # promotion happens only while the registry still points at it.
    parent: Optional[str] = None


@dataclass
class ServeConfig:
    # After training and promotion, serve on host:port until SIGTERM / Ctrl-C (jobs.pipeline).
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    # Ray Serve config YAML: deployments (replicas, autoscaling, resources) and app args. Fused
    # (models inside the ingress replicas) by default: for small models it saves four hops per
    # request (2.4x the graph's throughput at concurrency 8 in benchmarks/serving.py); the graph
    # (configs/serve.yaml) gives each model its own replicas, for GPU-sized encoders.
    config: str = "configs/serve-fused.yaml"
    # Registry poll interval of every model replica; empty: the YAML's value.
    watch_interval_s: Optional[float] = None
    # Log lines of the Serve controller, proxies and replicas: TEXT, or JSON (one object a line,
    # with the deployment, replica and request ids); empty: the YAML's logging_config.encoding
    # (TEXT unless it says otherwise).
    log_encoding: Optional[str] = None
    # The Serve arg precision (fp32 | fp16, see ServeAppConfig); empty: the YAML's value.
    precision: Optional[str] = None
    # Once serving, show the feedback loop: post simulated clicks through the API, run one
    # jobs.retrain pass with retrain.rollout=canary, drive the canary with simulated visitors
    # until the judge decides, and print the figures and the swap (then keep serving). It writes
    # simulated feedback into storage.root, so it is off unless asked for (`make run` asks).
    demo_feedback: bool = False
    demo_users: int = 40


@dataclass
class ServeAppConfig:
    # The Serve application's args (applications[].args in configs/serve*.yaml, "app args"):
    # defaults <- the YAML's args <- overrides (serve.runner.start), loaded by
    # serve.settings.load_settings. ServeConfig above is how jobs.pipeline starts that application.
    storage_root: str = "storage"
    storage_endpoint: Optional[str] = None
    # graph: ingress -> UserEncoder -> Retriever -> Ranker deployments, each scaled on its own.
    # fused: the ingress replicas hold encoder, retriever and ranker in-process (the same
    # classes, hot swap included) and scale as one; saves four Ray Serve hops per request
    # (configs/serve-fused.yaml). TextEmbedder and EventStore stay deployments in both.
    mode: str = "graph"
    model: str = "recommender"
    # Seconds between registry polls in every model replica (promotion -> serving latency).
    watch_interval_s: float = 2.0
    # How long a replica waits for a first promoted model before failing its start.
    startup_timeout_s: float = 120.0
    # Retriever candidates passed to the ranker.
    candidates: int = 100
    # Events per user kept in the live state (and fed to the user encoder).
    history_len: int = 200
    # Users whose live state stays in the event store's memory; the least recently active beyond
    # that are spilled to a local SQLite file and read back on their next request or event.
    live_users_max: int = 100_000
    # Users that spill file holds; beyond it the least recently spilled are dropped from the live
    # state (their events stay in the feedback log and return at the next rebuild), which bounds
    # the file: a full history (history_len 200) takes ~7 KB, so at most ~7 GB, far less typically.
    live_spill_users_max: int = 1_000_000
    # Live co-visits (what /v1/events adds to the co-visitation channel between retrains), per
    # event-store shard: only items of the served catalog (the model's and those upserted through
    # PUT /v1/items) are counted; each item keeps its live_covisit_neighbours most co-visited
    # partners, and past live_covisit_max_pairs pairs in all the weaker half is dropped (measured
    # ~40 bytes a pair, so well under 100 MB at the default; the trim takes ~1 s, once per 500k
    # new pairs).
    live_covisit_neighbours: int = 200
    live_covisit_max_pairs: int = 1_000_000
    # Group commit of /v1/events: events arriving during a write form the next shard (at most
    # feedback_max_events); linger > 0 waits that long to gather more (fewer S3 objects). A write
    # starts within linger + one write time of an event (well under 200 ms on local disk or S3).
    feedback_linger_ms: float = 0.0
    feedback_max_events: int = 1024
    # Access (serve/auth.py): keys from LLMREC_WRITE_KEY / LLMREC_ADMIN_KEY / LLMREC_READ_KEY and
    # this secret file; recommend/health/docs need a key only with require_read_key.
    keys_file: Optional[str] = None
    require_read_key: bool = False
    # Requests per key (per client address without one) and ingress replica, "N/second|minute";
    # null turns it off. rate_limit_storage "redis://host:port" shares the count across replicas.
    rate_limit: Optional[str] = "300/second"
    rate_limit_storage: str = "memory://"
    # Store and look up users by keyed pseudonym (HMAC under $LLMREC_PRIVACY_KEY): must match
    # the dataset's preprocess.pseudonymize_users (a mismatch is logged at rebuild).
    pseudonymize_users: bool = False
    # Live state sharded by user (crc32 of the stored user id): EventStore0..N-1, each the holder
    # of its users' histories, live co-visits and feedback writes, rebuilt from the shared
    # feedback log after a restart. 1 = the single EventStore deployment.
    live_state_shards: int = 1
    # Canary rollout (POST /v1/admin/canary or retrain.rollout=canary; serve/rollout.py): the
    # decision rule's thresholds and the memory bounds of its metrics (components/online/canary.py
    # CanaryConfig documents each), and how often the judge applies the rule.
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    canary_check_s: float = 5.0
    # Catalogs with more items than this are served from an approximate candidate pool (faiss IVF
    # over item and text vectors, co-visited and popular items; serve/ann.py) instead of scoring
    # every item per request; at or below it every item is scored exactly.
    ann_above: int = 200_000
    # Precision of the served item tables: fp16 (the LLM text vectors, a replica's largest table
    # and what every request's text scores read whole, kept in float16: half the memory and bytes
    # read; scores, the retriever's vectors and every model stay float32), or fp32. fp16 is the
    # default: valid NDCG@10 within 0.1% of fp32 on both shared datasets (benchmarks/precision.py),
    # the exact path 2-2.4x faster and a 10^6-item replica 2.2 GB smaller
    # (benchmarks/catalog_scale.py); no speed change at the shared datasets' sizes.
    precision: str = "fp16"


@dataclass
class RetrainConfig:
    # Loop period ("30s", "10m", "1h"); empty: one pass and exit (for cron / a Kubernetes RayJob).
    every: Optional[str] = None
    # Skip the pass unless at least this many new feedback events arrived since the watermark.
    min_events: int = 1
    # Warm-start fine-tuning: retriever epochs (the ranker uses ranker.epochs); stages to run.
    epochs: int = 6
    stages: List[str] = field(default_factory=lambda: ["retriever", "ranker"])
    # Gate: the retrained model's test NDCG@10 may be at most this much below the parent's on the
    # same (new) split; 0 = never promote a worse model.
    tolerance: float = 0.0
    # What a model that passes the gate does: "swap" replaces the served model for everyone at
    # once; "canary" serves it to canary_share of the users beside the served one and lets the
    # serving judge promote or roll it back by online metrics (serve/rollout.py; needs the Serve
    # application running to decide: until then the canary waits).
    rollout: str = "swap"
    canary_share: float = 0.1
    # The canary's own decision thresholds (CanaryRule: min_requests, min_recommendations,
    # noninferiority_*, error_rate_margin, latency_p99_ratio_max, confidence); those left null
    # are the serving application's (serve args canary).
    canary_rule: CanaryRule = field(default_factory=CanaryRule)


@dataclass
class ForgetConfig:
    # jobs.forget_user: the user id to remove from every stored table (see components/privacy.py).
    user_id: Optional[str] = None


@dataclass
class SecurityConfig:
    # Let a job run on a Ray cluster (ray.address or $RAY_ADDRESS set) or on s3:// storage without
    # $LLMREC_CHECKPOINT_KEY. Without the key, training checkpoints (whose DeepSpeed files are
    # unpickled on resume) are vouched for by plain sha256 digests that anyone who can write the
    # storage can regenerate, so such jobs refuse to start unless this accepts that. Local runs
    # (no address, file:// storage) need no key.
    allow_unsigned_checkpoints: bool = False


@dataclass
class AppConfig:
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    forget: ForgetConfig = field(default_factory=ForgetConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)


def load_config(
    overrides: Sequence[str] = (),
    yaml_path: Optional[str | os.PathLike] = None,
    schema: type = AppConfig,
    presets: Sequence[str | os.PathLike] = (),
) -> Any:
    """Build a validated config.

    Args:
        overrides: ``key=value`` strings, applied last.
        yaml_path: optional YAML file merged over the dataclass defaults.
        schema: the root dataclass.
        presets: YAML files merged over ``yaml_path``, in order (hardware presets).

    Returns:
        An OmegaConf DictConfig typed by ``schema`` (attribute access, struct mode).

    Raises:
        ConfigError: unknown key, wrong type or invalid value; the message names the key.
    """
    try:
        cfg = OmegaConf.structured(schema)
        if yaml_path is not None:
            path = Path(yaml_path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for preset in presets:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(preset))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got: {' '.join(bad)}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except ConfigKeyError as exc:
        raise ConfigError(unknown_key_message(_key_of(exc), schema, overrides)) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config value for {_key_of(exc)}: {exc.msg}") from None
    validate_config(cfg)
    return cfg


def _key_of(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    return str(key) if key else str(exc).splitlines()[0]


def unknown_key_message(key: str, schema: type, overrides: Sequence[str] = ()) -> str:
    """"unknown config key: K; did you mean A, B?": the closest keys of ``schema`` to ``K``.

    ``key`` is the first part OmegaConf could not place (``retreiver`` for ``retreiver.dim=3``);
    the override that holds it, when there is one, is what gets named and matched. Keys are
    matched whole among those as deep (``retriever.dimm`` -> ``retriever.dim``; ``train.retreiver``
    in a YAML file -> the section ``train.retriever``), else by their last part (``dim`` ->
    ``ranker.dim``, ``retriever.dim``)."""
    from components.config_help import option_keys

    given = [o.split("=", 1)[0] for o in overrides]
    key = next((g for g in given if g == key or g.startswith(key + ".")), key)
    keys = option_keys(schema)
    close = difflib.get_close_matches(key, [k for k in keys if k.count(".") == key.count(".")], n=3)
    if not close:
        by_leaf: Dict[str, List[str]] = {}
        for k in keys:
            by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        leaves = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=3)
        close = sorted(k for leaf in leaves for k in by_leaf[leaf])[:5]
    hint = f"did you mean {', '.join(close)}?" if close else "--help lists the valid keys"
    return f"unknown config key: {key}; {hint}"


def retriever_workers(cfg: Any) -> int:
    """The retriever stage's Ray Train workers: ``train.retriever_workers``, or ``train.num_workers``."""
    return cfg.train.retriever_workers or cfg.train.num_workers


def validate_config(cfg: Any) -> None:
    """Check values that types alone cannot; raise ConfigError naming the key."""
    if "data" in cfg:
        if cfg.data.source not in SOURCES:
            raise ConfigError(f"data.source must be one of {', '.join(SOURCES)}; got {cfg.data.source!r}")
        if cfg.data.source != "synthetic" and not cfg.data.path:
            raise ConfigError(f"data.path is required for data.source={cfg.data.source}")
        if cfg.data.ts_unit not in ("s", "ms", "us", "ns", "auto"):
            raise ConfigError(f"data.ts_unit must be s, ms, us, ns or auto; got {cfg.data.ts_unit!r}")
        if cfg.data.synthetic.num_events < 10:
            raise ConfigError("data.synthetic.num_events must be >= 10")
    if "preprocess" in cfg:
        p = cfg.preprocess
        if p.split not in SPLITS:
            raise ConfigError(f"preprocess.split must be one of {', '.join(SPLITS)}; got {p.split!r}")
        if p.kcore < 0:
            raise ConfigError("preprocess.kcore must be >= 0")
        if not (0 < p.valid_frac < 1 and 0 < p.test_frac < 1 and p.valid_frac + p.test_frac < 1):
            raise ConfigError("preprocess.valid_frac and preprocess.test_frac must be in (0, 1) with sum < 1")
        if p.batch_size < 1:
            raise ConfigError("preprocess.batch_size must be >= 1")
        if p.engine not in ("ray", "local"):
            raise ConfigError(f"preprocess.engine must be ray or local; got {p.engine!r}")
    if "retrain" in cfg:
        if cfg.retrain.rollout not in ("swap", "canary"):
            raise ConfigError(f"retrain.rollout must be swap or canary; got {cfg.retrain.rollout!r}")
        if not 0 < cfg.retrain.canary_share < 1:
            raise ConfigError(f"retrain.canary_share must be in (0, 1); got {cfg.retrain.canary_share}")
        try:
            with_rule(CanaryConfig(), cfg.retrain.canary_rule)
        except ValueError as exc:
            raise ConfigError(f"retrain.canary_rule: {exc}") from None
    if "embed" in cfg and cfg.embed.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"embed.precision must be auto, fp32 or bf16; got {cfg.embed.precision!r}")
    if "train" in cfg:
        t = cfg.train
        if t.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3; got {t.zero_stage}")
        if t.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be fp32 or bf16; got {t.precision!r}")
        bad = [s for s in t.stages if s not in ("llm", "retriever", "ranker")]
        if bad:
            raise ConfigError(f"train.stages: unknown stage(s) {bad}; use llm, retriever, ranker")
        if t.num_workers < 1:
            raise ConfigError("train.num_workers must be >= 1")
        if t.collective_timeout_s < 1:
            raise ConfigError(f"train.collective_timeout_s must be >= 1 second; got {t.collective_timeout_s}")
        if t.retriever_workers < 0 or t.cpus_per_worker < 0:
            raise ConfigError("train.retriever_workers and train.cpus_per_worker must be >= 0 (0: automatic)")
        if t.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(f"train.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD; "
                              f"got {t.placement_strategy!r}")
        if t.retriever.schedule not in ("onecycle", "constant"):
            raise ConfigError(f"train.retriever.schedule must be onecycle or constant; got {t.retriever.schedule!r}")
    if "retriever" in cfg and cfg.retriever.loss not in ("auto", "softmax", "sampled"):
        raise ConfigError(f"retriever.loss must be auto, softmax or sampled; got {cfg.retriever.loss!r}")
    if "evaluate" in cfg and cfg.evaluate.max_users is not None and cfg.evaluate.max_users < 1:
        raise ConfigError(f"evaluate.max_users must be >= 1 (or null: every user); got {cfg.evaluate.max_users}")
    if "text" in cfg and cfg.text.pooling not in ("mean", "cls", "last"):
        raise ConfigError(f"text.pooling must be mean, cls or last; got {cfg.text.pooling!r}")
    for section in ("ray", "serve"):
        encoding = cfg[section].log_encoding if section in cfg else None
        if encoding and encoding.upper() not in LOG_ENCODINGS:
            raise ConfigError(f"{section}.log_encoding must be TEXT or JSON; got {encoding!r}")


def parse_duration(text: str) -> float:
    """Seconds in "30s", "10m", "1h", "1d" or a plain number of seconds (retrain.every)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*", str(text))
    if not m:
        raise ValueError(f"retrain.every must look like 30s, 10m, 1h or 1d; got {text!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: Any) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _configs_dir() -> Path:
    """``configs/``: package data of the ``configs`` package (a folder in a checkout and in an
    installed wheel alike); next to this package when that one is not importable."""
    try:
        return Path(str(importlib.resources.files("configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"


PRESETS = _configs_dir()
HARDWARE = PRESETS / "hardware"  # --preset NAME: configs/hardware/NAME.yaml


def packaged_config(path: str | Path) -> Path:
    """A config file named as in the repository (``configs/serve-fused.yaml``): as given when it
    exists from here (or is absolute), else from the installed ``configs`` package."""
    p = Path(path)
    return p if p.is_absolute() or p.is_file() else PRESETS.parent / p


def hardware_presets() -> List[str]:
    return sorted(p.stem for p in HARDWARE.glob("*.yaml"))


def hardware_preset(name: str) -> Path:
    path = HARDWARE / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(hardware_presets())}")
    return path


def preset_for(overrides: Sequence[str]) -> Optional[Path]:
    """The preset YAML for the ``data.source=X`` among ``overrides`` (``configs/X.yaml``), if any."""
    sources = [o.split("=", 1)[1] for o in overrides if o.startswith("data.source=")]
    if not sources or sources[-1] not in SOURCES:
        return None
    path = PRESETS / f"{sources[-1]}.yaml"
    return path if path.is_file() else None


def parse_cli(argv: List[str], schema: type = AppConfig, default_yaml: Optional[str] = None) -> Any:
    """``[--config FILE] [--preset NAME ...] key=value ...`` -> validated config (see load_config).

    Without ``--config``, ``data.source=X`` applies the preset for that source
    (``configs/X.yaml``: the best settings the project knows for that kind of data); the
    ``key=value`` settings still override it. The choice is logged. ``--preset NAME`` (tiny,
    cpu, gpu-1, gpu-cluster: ``configs/hardware/``) merges the settings for that hardware over
    the data's, in the order given, before the ``key=value`` settings."""
    yaml_path = default_yaml
    presets: List[Path] = []
    rest: List[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            yaml_path = next(it, None)
            if yaml_path is None:
                raise ConfigError("--config needs a file path")
        elif arg.startswith("--config="):
            yaml_path = arg.split("=", 1)[1]
        elif arg == "--preset":
            name = next(it, None)
            if name is None:
                raise ConfigError(f"--preset needs a name: {', '.join(hardware_presets())}")
            presets.append(hardware_preset(name))
        elif arg.startswith("--preset="):
            presets.append(hardware_preset(arg.split("=", 1)[1]))
        else:
            rest.append(arg)
    if yaml_path is None:
        preset = preset_for(rest)
        if preset is not None:
            yaml_path = str(preset)
            logging.getLogger("jobs").info("data.source preset: %s (--config FILE chooses another)",
                                           preset.relative_to(PRESETS.parent))
    return load_config(rest, yaml_path, schema, presets)
