"""``--help`` of every job: the settings it reads, each with its default and the explanation written
beside its dataclass field (components/config_help.py), and no Ray import."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from components.config import AppConfig
from components.config_help import describe_options, field_comments
from components.models.retriever import RetrieverConfig
from jobs.cli import COMMANDS, main
from jobs.runtime import help_text

ROOT = Path(__file__).resolve().parents[2]


def test_explanations_come_from_the_comments_above_and_beside_each_field():
    docs = field_comments(RetrieverConfig)
    assert docs["id_dropout"].startswith("Probability of hiding an item's ID embedding in training, so the text")
    assert docs["num_items"] == "set from the dataset vocabulary"  # beside the field
    assert "temperature" in docs and "text_whiten" in docs
    assert "dim" not in docs and "use_id" not in docs  # fields without a comment get none (not a neighbour's)


def test_describe_options_shows_defaults_and_only_the_sections_asked_for():
    text = describe_options(AppConfig, ["retriever", "train.dataset_version"])
    assert "retriever:\n  retriever.num_items=0\n      set from the dataset vocabulary\n" in text
    assert "\n  train.dataset_version=null\n      Dataset version to train on" in text
    assert "train.num_workers" not in text and "storage." not in text
    assert "preprocess.event_weights={view: 1.0, click: 1.0" in describe_options(AppConfig, ["preprocess"])
    with pytest.raises(KeyError, match="retriever.dimm"):
        describe_options(AppConfig, ["retriever.dimm"])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_lists_the_settings_its_job_reads(name):
    module, schema, _ = COMMANDS[name]
    job = importlib.import_module(module)
    text = help_text(job.main, getattr(job, schema, None) or AppConfig)  # a bad CONFIG_SECTIONS name raises
    assert text.startswith(f"usage: python -m {module} ")
    if schema == "AppConfig":
        assert getattr(job, "CONFIG_SECTIONS", None), f"{module} declares no CONFIG_SECTIONS"
        assert "storage:\n  storage.root=storage\n      One root URI" in text


def test_llmrec_train_help_explains_its_settings_and_leaves_out_the_others(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llmrec train [--address ADDR] [--config FILE]")
    assert "retriever:" in out and "storage:" in out  # what tests/e2e/test_cli.py checks too
    assert "  retriever.dim=64\n" in out and "Probability of hiding an item's ID embedding" in out
    assert "\n  train.retriever:\n" in out  # a nested section, its settings further in
    assert "\n    train.retriever.patience=5\n        Stop after this many evaluations" in out
    for other in ("serve.port", "forget.user_id", "retrain.every", "preprocess.kcore", "data.synthetic"):
        assert other not in out


def test_help_is_fast_it_imports_no_ray():
    code = ("import sys; from jobs.cli import main; assert main(['run', '--help']) == 0; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "serve.enabled=false" in p.stdout and "retrain.epochs=6" in p.stdout
