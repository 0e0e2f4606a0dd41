"""`megatron-grpo` console script: train, eval, convert, doctor, make-tiny.

Every subcommand turns a bad input into one `error: ...` line on stderr and a non-zero exit before
any expensive work (process groups, model builds, engine start) begins.
"""
from __future__ import annotations

import argparse
import os
import sys


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (may list `defaults:` to compose)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=10")


def _load(args, *, check_paths: bool):
    from megatron_grpo.config import load_config, to_yaml, validate

    cfg = load_config(args.config, args.overrides)
    facts = validate(cfg, check_paths=check_paths and not args.print_config)
    if args.print_config:
        print(to_yaml(cfg), end="")
    return cfg, facts


def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "SLURM_PROCID" in os.environ and "RANK" in os.environ


def _relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """`megatron-grpo train --nproc-per-node N ...` on one machine = torchrun of the same command
    (``megatron_grpo.launch``: torchrun without its own traceback when a rank fails)."""
    from megatron_grpo.distributed.ports import free_port

    cmd = [sys.executable, "-m", "megatron_grpo.launch", f"--nproc-per-node={nproc}", "--max-restarts=0",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "megatron_grpo.cli", *argv]
    from megatron_grpo.launch import run_forwarding_signals

    return run_forwarding_signals(cmd)  # group signals reach the ranks, not torchrun (launch.py)


def cmd_train(args) -> int:
    cfg, _ = _load(args, check_paths=True)
    if args.print_config:
        return 0
    if os.environ.get("GRPO_ROLE") == "rollout":  # node-split jobs: this rank serves vLLM, it does not train
        from megatron_grpo.errors import INPUT_ERRORS, report
        from megatron_grpo.rollout.server import run_rollout_server

        try:
            return run_rollout_server(cfg)
        except INPUT_ERRORS as e:  # rollout ranks fail alone: every rank reports its own
            return report(e, every_rank=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    if args.check:  # every input check of a start; no process group, model or engine; no run output
        return _check_only(cfg, args.nproc_per_node)
    if args.nproc_per_node > 1 and not _under_launcher():
        from megatron_grpo.config.preflight import check_launch

        check_launch(cfg, args.nproc_per_node)  # in the parent: one line, exit 2, no rank started
        argv = [a for a in sys.argv[1:] if not a.startswith("--nproc-per-node")]
        if "--nproc-per-node" in sys.argv:  # "--nproc-per-node N" form: drop the value too
            i = sys.argv.index("--nproc-per-node")
            argv = sys.argv[1:i] + sys.argv[i + 2:]
        return _relaunch_with_torchrun(args.nproc_per_node, argv)
    from megatron_grpo.trainer import run_training  # imported late: heavy

    return run_training(cfg)


def _check_only(cfg, nproc: int) -> int:
    from megatron_grpo.config.preflight import check_launch
    from megatron_grpo.trainer.inputs import check_inputs

    if nproc > 1:
        check_launch(cfg, nproc)
        if cfg.parallel.world_size is None:
            cfg.parallel.world_size = nproc
    _, data, num_steps, _, run = check_inputs(cfg)
    what = f"resume {run.resume_dir}" if run.resume_dir else "new run"
    print(f"inputs ok: {len(data.train)} train prompts, {num_steps} steps, {what} in {run.out_dir}")
    return 0


def cmd_make_tiny(args) -> int:
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    spec = TinyModelSpec(arch=args.arch, num_layers=args.layers, tie_word_embeddings=args.tied,
                         num_key_value_heads=args.kv_heads, seed=args.seed)
    try:
        out = make_tiny_model(args.out, spec, overwrite=args.force)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    print(f"wrote {out}")
    return 0


def cmd_doctor(args) -> int:
    from megatron_grpo.bridge.doctor import doctor_main

    return doctor_main(args.rest)


def cmd_eval(args) -> int:
    from megatron_grpo.trainer.evaluate import eval_main

    return eval_main(args.rest)


CONVERTERS = {"hf-to-megatron": "convert_hf_to_megatron.py", "megatron-to-hf": "convert_megatron_to_hf.py"}


def cmd_convert(args) -> int:
    """`megatron-grpo convert hf-to-megatron|megatron-to-hf ARGS`: the tools/ converters (run them under
    torchrun for TP/PP > 1)."""
    import runpy
    from pathlib import Path

    if not args.rest or args.rest[0] not in CONVERTERS:
        raise ValueError(f"usage: megatron-grpo convert {{{'|'.join(CONVERTERS)}}} [tool arguments]")
    tool = Path(__file__).resolve().parents[1] / "tools" / CONVERTERS[args.rest[0]]
    if not tool.is_file():
        raise ValueError(f"{tool} not found: the converters ship with the repository (pip install -e .)")
    module = runpy.run_path(str(tool), run_name="megatron_grpo_convert")
    return module["main"](args.rest[1:])


# Subcommands with their own argument parsers: everything after the name is handed over as is.
PASSTHROUGH = {"eval": cmd_eval, "doctor": cmd_doctor, "convert": cmd_convert}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-grpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run GRPO training")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="ranks on this machine (re-launches under torchrun); clusters use slurm/")
    p.add_argument("--check", action="store_true",
                   help="run every input check of a start (config, weights, data, output folder, resume) and exit")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("make-tiny", help="write a tiny random HF model + tokenizer (tests, demo)")
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="qwen2", choices=["llama", "qwen2", "qwen3"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("eval", help="evaluate an HF model folder with vLLM (reward, accuracy, pass@k)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="HF <-> Megatron checkpoint conversion (hf-to-megatron | megatron-to-hf)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("doctor", help="Megatron vs vLLM vs HF logprob parity check", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        args = argparse.Namespace(func=PASSTHROUGH[argv[0]], rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    from megatron_grpo.errors import INPUT_ERRORS, report

    try:
        return int(args.func(args) or 0)
    except INPUT_ERRORS as e:  # all ranks see the same input: rank 0 reports it; once ranks run
        return report(e, every_rank=_ranks_started())  # together, each names itself (one may fail alone)


def _ranks_started() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


if __name__ == "__main__":  # how torchrun, srun and the tests start every rank
    from megatron_grpo.lifetime import exit_without_teardown

    exit_without_teardown(main())
