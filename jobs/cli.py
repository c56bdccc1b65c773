"""``llmrec``: one command for every job (a console script; see pyproject.toml).

    llmrec <command> [--address ADDR] [--config FILE] [--preset NAME] key=value ...
    llmrec <command> --help        # the settings the command reads: defaults and explanations

Each command runs the same ``main(cfg)`` as ``python -m jobs.<module>`` (that contract stays): in
this process on a local Ray, or, with ``--address`` (or $LLMREC_ADDRESS), submitted to a Ray
cluster as ``ray job submit --address ADDR --working-dir . -- python -m jobs.<module> ...``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from typing import List, Optional

from components.config import hardware_presets

# command -> (module, its config schema (in the module or components.config), what it does)
COMMANDS = {
    "run": ("jobs.pipeline", "AppConfig", "preprocess -> embed -> train -> evaluate -> promote (-> serve)"),
    "preprocess": ("jobs.preprocess", "AppConfig", "raw logs -> a validated, versioned dataset (Ray Data)"),
    "embed": ("jobs.embed_items", "AppConfig", "LLM text embeddings of the catalog (Ray Data)"),
    "train": ("jobs.train", "AppConfig", "LLM + retriever + ranker with Ray Train and DeepSpeed"),
    "evaluate": ("jobs.evaluate", "AppConfig", "score a trained model against baselines; gate and promote"),
    "serve": ("jobs.serve", "AppConfig", "serve the promoted model with Ray Serve (no training)"),
    "retrain": ("jobs.retrain", "AppConfig", "fold new feedback in, retrain, promote if better"),
    "forget-user": ("jobs.forget_user", "AppConfig", "remove a user's events from every stored table"),
    "download": ("jobs.download", "DownloadConfig", "fetch a public dataset (MovieLens, Amazon, MIND)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llmrec <command> [--address ADDR] [--config FILE] [--preset NAME] key=value ...", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {desc}  (python -m {mod})" for name, (mod, _, desc) in COMMANDS.items()]
    lines += ["", f"presets (configs/hardware/, over the data.source preset): {', '.join(hardware_presets())}",
              "llmrec <command> --help lists the settings the command reads, with defaults and explanations."]
    return "\n".join(lines)


def submit(address: str, module: str, args: List[str]) -> int:
    """``ray job submit`` of ``python -m module args`` with this directory as the working dir."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray is None:
        print("error: the `ray` command is not installed in this environment", file=sys.stderr)
        return 2
    cmd = [ray, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", "-m", module, *args]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, schema, _ = COMMANDS[name]
    address = os.environ.get("LLMREC_ADDRESS")
    args: List[str] = []
    it = iter(rest)
    for arg in it:
        if arg == "--address":
            address = next(it, None)
            if not address:
                print("error: --address needs a Ray address (e.g. http://head:8265)", file=sys.stderr)
                return 2
        elif arg.startswith("--address="):
            address = arg.split("=", 1)[1]
        else:
            args.append(arg)
    if address and not any(a in ("-h", "--help") for a in args):
        return submit(address, module, args)
    from components import config
    from jobs.runtime import run_cli

    job = importlib.import_module(module)
    try:
        run_cli(job.main, getattr(job, schema, None) or getattr(config, schema), argv=args,
                prog=f"llmrec {name} [--address ADDR]")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
