"""The ``mtprl`` command line: ``train``, ``sft``, ``generate``, ``eval``, ``demo``, ``plan``,
``config show|presets|docs``.

Config overrides are positional ``key=value`` / ``+key=value`` arguments after the subcommand, as
in verl; ``--config-name`` picks a preset by name (``mtprl/config/presets``) or YAML path.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from mtprl.config import ConfigError, load_config, to_yaml

OVERRIDE_HELP = "config overrides: key=value, +key=value (verl / Hydra syntax), e.g. data.train_batch_size=16"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-name", "-c", dest="preset", default=None,
                   help="preset name (see `mtprl config presets`) or path to a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDE_HELP)


def _cmd_config(args: argparse.Namespace) -> int:
    if args.config_cmd == "presets":
        from mtprl.config.loader import PRESET_DIR

        for p in sorted(PRESET_DIR.glob("*.yaml")):
            first = next((ln[1:].strip() for ln in p.read_text().splitlines() if ln.startswith("#")), "")
            print(f"{p.stem:20s} {first}")
        return 0
    if args.config_cmd == "docs":
        from mtprl.config.docs import render

        if args.out:
            with open(args.out, "w") as f:
                f.write(render())
        else:
            print(render(), end="")
        return 0
    cfg = load_config(args.preset, args.overrides)
    print(to_yaml(cfg), end="")
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from mtprl.trainer.sft import run_sft

    final = run_sft(load_config(args.preset, args.overrides))
    print(f"SFT checkpoint: {final}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mtprl.trainer.loop import train

    cfg = load_config(args.preset, args.overrides)
    world = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    if world > 1 and "WORLD_SIZE" not in os.environ:  # not under torchrun or a Ray worker: start the ranks
        import yaml

        from mtprl.distributed.ray_launcher import run_with_ray

        runtime_env = None
        if args.runtime_env:
            if not os.path.isfile(args.runtime_env):
                raise FileNotFoundError(f"--runtime-env {args.runtime_env}: no such file")
            runtime_env = yaml.safe_load(open(args.runtime_env)) or {}
        run_with_ray(cfg, runtime_env=runtime_env)
    else:
        train(cfg)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from mtprl.trainer.loop import evaluate

    metrics = evaluate(load_config(args.preset, args.overrides))
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mtprl.demo import run_demo

    run_demo(args.out, overrides=args.overrides, quick=args.quick, ablation=args.ablation, seeds=args.seeds,
             preset=args.preset or "tiny_cpu")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from mtprl.distributed.memory_plan import plan_memory

    print(plan_memory(load_config(args.preset, args.overrides), usable_gib=args.gpu_memory_gib).describe())
    return 0


def _cmd_check_rollout(args: argparse.Namespace) -> int:
    from mtprl.rollout.check_cli import run_check

    return run_check(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from mtprl.rollout.cli import run_generate

    return run_generate(args)


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "train": ("run DAPO / GRPO training with MTP", _cmd_train),
    "sft": ("supervised fine-tuning / MTP warm-up (sft.freeze_trunk=True: MTP layers only)", _cmd_sft),
    "generate": ("generate completions with the native engine or vLLM (MTP speculative decoding optional)",
                 _cmd_generate),
    "check-rollout": ("test that a rollout back-end (vllm / native) samples the model's distribution, speculation on",
                      _cmd_check_rollout),
    "eval": ("run validation on a checkpoint (actor_rollout_ref.model.path, data.val_files)", _cmd_eval),
    "demo": ("the main job on the embedded default: data, tokenizer, SFT, DAPO+MTP, report", _cmd_demo),
    "plan": ("per-GPU memory plan of a config (model shapes from model.path's config.json; nothing loaded)",
             _cmd_plan),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtprl",
        description="RL post-training for LLM reasoning with native multi-token prediction.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "generate":
            from mtprl.rollout.cli import add_generate_args

            add_generate_args(p)
            continue
        if name == "check-rollout":
            from mtprl.rollout.check_cli import add_check_args

            add_check_args(p)
            continue
        _add_config_args(p)
        if name == "train":
            p.add_argument("--runtime-env", default=None, metavar="FILE",
                           help="Ray runtime env YAML (env_vars, working_dir, excludes) for multi-rank runs; merged "
                                "over ray_kwargs.ray_init.runtime_env")
        if name == "plan":
            p.add_argument("--gpu-memory-gib", type=float, default=78.5, metavar="GIB",
                           help="usable memory per GPU (default 78.5: an 80 GB card after CUDA context and NCCL)")
        if name == "demo":
            p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
            p.add_argument("--quick", action="store_true", help="a few steps of everything (CI-sized)")
            p.add_argument("--ablation", action="store_true",
                           help="also run RL with the MTP layers frozen and plot accepted length for both")
            p.add_argument("--seeds", type=int, default=1, metavar="N",
                           help="run the RL stage N times (trainer.seed / data.seed 1..N) from the same SFT "
                                "checkpoint and report the validation-accuracy gain of each, mean and std")
    p = sub.add_parser("config", help="inspect the configuration", description="inspect the configuration")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="action")
    show = csub.add_parser("show", help="print the fully resolved config as YAML")
    _add_config_args(show)
    csub.add_parser("presets", help="list the bundled presets")
    docs = csub.add_parser("docs", help="print the configuration reference (docs/config.md) from the schema's comments")
    docs.add_argument("--out", default=None, metavar="FILE", help="write it to FILE (e.g. docs/config.md)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mtprl.distributed.ray_launcher import WorkerFailed

    args = build_parser().parse_args(argv)
    handler = _cmd_config if args.command == "config" else COMMANDS[args.command][1]
    try:
        return handler(args)
    except ConfigError as e:
        for line in str(e).splitlines():
            print(f"config error: {line}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FloatingPointError, OSError, ImportError, WorkerFailed) as e:
        if os.environ.get("MTPRL_TRACEBACK"):
            raise
        print(f"error: {e} (MTPRL_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
