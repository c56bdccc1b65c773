"""The one place that names storage paths and bundle parts.

Everything the system keeps lives under one storage root (``file:///...`` or ``s3://bucket/prefix``)::

    raw/{events,items}/<name>/              staged source shards (jobs.preprocess)
    datasets/<name>/latest.json             pointer to the newest version
    datasets/<name>/<version>/              train/ valid/ test/ sequences/ items/ vocab/ quarantine/ stats.json
    feedback/dt=YYYY-MM-DD/part-*.parquet   events stored by the serving endpoint
    catalog/upserts/                        items added through PUT /v1/items
    indexes/<run_id>/                       text_embeddings.parquet, text.faiss, encoder/ (the LLM used)
    checkpoints/<model>/<run_id>/           a bundle: the parts below, lineage.json, manifest.json
    reports/<run_id>/                       report.md, metrics.json, predictions.parquet, plots
    registry/<model>/latest.json            the promoted bundle (compare-and-swap pointer)
    runs/<run_id>/                          a training run's scratch space (stage inputs, test hooks)
    retrain/<run_id>/input/                 a retraining pass's merged preprocessing input
    ray_train/                              Ray Train's own run folders (worker checkpoints)
    privacy/forgotten/                      tombstones of forgotten users

A bundle is self-contained: serving loads a model from its parts alone.
"""

from __future__ import annotations

MODEL = "recommender"  # the one model family the registry holds today

# -- top-level prefixes ----------------------------------------------------------------------
DATASETS = "datasets"
FEEDBACK = "feedback"
UPSERTS = "catalog/upserts"
INDEXES = "indexes"
CHECKPOINTS = "checkpoints"
REPORTS = "reports"
REGISTRY = "registry"
RUNS = "runs"
RETRAIN = "retrain"
RAY_TRAIN = "ray_train"
FORGOTTEN = "privacy/forgotten"

# -- inside a dataset version ----------------------------------------------------------------
SPLITS = ("train", "valid", "test")
SEQUENCES = "sequences"
ITEMS = "items"  # also a bundle part: the catalog in vocabulary order
VOCAB_USERS = "vocab/users.parquet"
VOCAB_ITEMS = "vocab/items.parquet"
STATS = "stats.json"
QUARANTINE = "quarantine/part-00000.parquet"

# -- inside an index folder ------------------------------------------------------------------
TEXT_EMBEDDINGS = "text_embeddings.parquet"
TEXT_ROW_GROUP = 65_536  # rows per Parquet row group of TEXT_EMBEDDINGS: a replica decodes one at a time
TEXT_INDEX = "text.faiss"
ENCODER = "encoder"

# -- inside a report folder ------------------------------------------------------------------
REPORT = "report.md"
METRICS = "metrics.json"
PREDICTIONS = "predictions.parquet"
TEST_RANKS = "test_ranks.parquet"  # per test user, the target's rank under every model

# -- bundle parts (folders of checkpoints/<model>/<run_id>/) ---------------------------------
RETRIEVER = "retriever"        # weights + config of the sequence retriever
RANKER = "ranker"              # weights + config of the ranker (absent: no ranker)
CHANNELS = "channels"          # fitted candidate channels and fusion weights
LLM = "llm"                    # the fine-tuned text encoder (absent: the configured base encoder)
TEXT = "text"                  # item text embeddings (TEXT_EMBEDDINGS)
INTERACTIONS = "interactions"  # training (item, ts) pairs: popularity and recency features
ANN = "ann"                    # the serving ANN index of a large catalog (serve/ann.py; absent: small catalog)
LINEAGE = "lineage.json"
MANIFEST = "manifest.json"
# inside a weights part
WEIGHTS = "model.safetensors"
CONFIG = "config.json"

# Bundle parts each serving deployment loads (lineage.json always comes along).
ENCODER_PARTS = (RETRIEVER,)
RETRIEVER_PARTS = (RETRIEVER, TEXT, ITEMS, CHANNELS, INTERACTIONS, ANN)
RANKER_PARTS = (RANKER,)
TEXT_PARTS = (LLM,)


def raw(kind: str, name: str) -> str:
    """Staged raw shards of a source: ``kind`` is "events" or "items"."""
    return f"raw/{kind}/{name}"


def dataset(name: str, version: str) -> str:
    return f"{DATASETS}/{name}/{version}"


def dataset_latest(name: str) -> str:
    return f"{DATASETS}/{name}/latest.json"


def index(run_id: str) -> str:
    return f"{INDEXES}/{run_id}"


def bundle(run_id: str, model: str = MODEL) -> str:
    return f"{CHECKPOINTS}/{model}/{run_id}"


def report(run_id: str) -> str:
    return f"{REPORTS}/{run_id}"


def pointer(model: str = MODEL) -> str:
    return f"{REGISTRY}/{model}/latest.json"


def canary_pointer(model: str = MODEL) -> str:
    """The running canary (absent: none): the candidate bundle, its share of users and the control."""
    return f"{REGISTRY}/{model}/canary.json"


def canary_log(model: str = MODEL) -> str:
    """One JSON record per canary decision (start, promote, rollback, end) with its figures."""
    return f"{REGISTRY}/{model}/canary-log"


def run_scratch(run_id: str) -> str:
    return f"{RUNS}/{run_id}"


def retrain_input(run_id: str) -> str:
    return f"{RETRAIN}/{run_id}/input"


def join(prefix: str, *names: str) -> str:
    """``prefix/name/...``: the one way paths inside a prefix are spelled."""
    return "/".join([prefix.rstrip("/"), *names])
