"""Launch plan for the Slurm scripts: world size, TP/PP/DP split and where every rank runs.

    python slurm/plan.py --config CONFIG --nodes 8 --gpus-per-node 8 [--hosts h1,h2,...]
                         [--rollout-nodes K] [--check] [key=value ...]

Reads the config with the project's own loader (``megatron_grpo.config.load_config``: `defaults:`
composition and ``key=value`` overrides exactly as the trainer sees them) and runs the config's
validation with the launcher's world size, so a world size that TP x PP does not divide, a rollout TP
that does not divide the world, or a batch that does not split over DP fails here, on the login node,
in well under a second, instead of after the job waited in the queue.

Rank layout is megatron-core's default order ``tp-cp-ep-dp-pp`` (TP fastest, then DP, then PP): TP
groups are consecutive ranks, so they stay inside a node whenever TP divides GPUs per node. The
colocated vLLM engine carves the same world into rollout TP groups of consecutive ranks.

With ``--rollout-nodes K`` (disaggregated placement) the first K nodes run the vLLM rollout world and
the remaining nodes the training world; each world numbers its ranks from 0.

``--check`` prints only the summary line (used by submit.sh); exit status 2 with one ``error:`` line
when the config or the split is invalid, 3 when this Python cannot load the project's config code.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def split(world: int, tp: int, pp: int) -> int:
    if world % (tp * pp):
        raise ValueError(f"world size {world} (nodes x GPUs per node) is not divisible by "
                         f"parallel.tp x parallel.pp = {tp} x {pp} = {tp * pp}")
    return world // (tp * pp)


def coords(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """(tp_rank, pp_rank, dp_rank) of a global rank in megatron-core's tp-cp-ep-dp-pp order (cp=ep=1)."""
    return rank % tp, rank // (tp * dp), (rank // tp) % dp


def _validate(cfg, world: int):
    from megatron_grpo.config import validate

    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world)
    try:
        return validate(cfg, check_paths=False)
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--hosts", default="", help="comma-separated node names (inside an allocation)")
    ap.add_argument("--rollout-nodes", type=int, default=0, help="disaggregated: nodes that run vLLM")
    ap.add_argument("--check", action="store_true", help="summary line only")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` is not an error

    try:
        from megatron_grpo.config import ConfigError, load_config
    except ImportError as e:  # e.g. a login node without the project's Python environment
        print(f"plan unavailable: cannot import megatron_grpo.config with {sys.executable} ({e})", file=sys.stderr)
        return 3

    try:
        if a.nodes < 1 or a.gpus_per_node < 1:
            raise ValueError(f"nodes={a.nodes} and gpus per node={a.gpus_per_node} must be >= 1")
        if a.rollout_nodes and not 0 < a.rollout_nodes < a.nodes:
            raise ValueError(f"ROLLOUT_NODES={a.rollout_nodes} must be in [1, {a.nodes - 1}] "
                             f"(at least one node must train)")
        cfg = load_config(a.config, a.overrides)
        tp, pp, rtp = int(cfg.parallel.tp), int(cfg.parallel.pp), int(cfg.rollout.tp)
        train_nodes = a.nodes - a.rollout_nodes
        world = train_nodes * a.gpus_per_node
        dp = split(world, tp, pp)
        if a.rollout_nodes:
            if cfg.rollout.placement != "disaggregated":
                raise ValueError("ROLLOUT_NODES is set but rollout.placement is "
                                 f"{cfg.rollout.placement!r}: pass rollout.placement=disaggregated")
            rworld = a.rollout_nodes * a.gpus_per_node
            if rworld % rtp:
                raise ValueError(f"rollout.tp={rtp} does not divide the rollout world "
                                 f"{a.rollout_nodes} nodes x {a.gpus_per_node} GPUs = {rworld}")
        _validate(cfg, world)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    hosts = [h for h in a.hosts.split(",") if h]
    if hosts and len(hosts) != a.nodes:
        print(f"error: {len(hosts)} host names for {a.nodes} nodes", file=sys.stderr)
        return 2
    hosts = hosts or [f"node{i}" for i in range(a.nodes)]
    placement = "disaggregated" if a.rollout_nodes else str(cfg.rollout.placement)
    summary = (f"world={world} ranks ({train_nodes} nodes x {a.gpus_per_node} GPUs) "
               f"TP={tp} PP={pp} DP={dp}; rollout placement={placement} rollout TP={rtp}")
    if a.rollout_nodes:
        rworld = a.rollout_nodes * a.gpus_per_node
        summary += f" rollout world={rworld} ranks ({a.rollout_nodes} nodes) replicas={rworld // rtp}"
    else:
        summary += f" rollout replicas={world // rtp}"
    print(summary)
    if a.check:
        return 0

    print(f"config: {a.config}" + (f"  overrides: {' '.join(a.overrides)}" if a.overrides else ""))
    print(f"model: {cfg.model.path}  output_dir: {cfg.trainer.output_dir}")
    g = a.gpus_per_node
    if a.rollout_nodes:
        rworld = a.rollout_nodes * g
        print(f"\nrollout world ({rworld} ranks, vLLM TP={rtp}):")
        print(f"{'rank':>5} {'node':>4} {'host':<16} {'local_rank':>10} {'replica':>7}")
        for r in range(rworld):
            print(f"{r:>5} {r // g:>4} {hosts[r // g]:<16} {r % g:>10} {r // rtp:>7}")
        print(f"\ntraining world ({world} ranks):")
    header = f"{'rank':>5} {'node':>4} {'host':<16} {'local_rank':>10} {'tp':>3} {'pp':>3} {'dp':>3}"
    print(header + ("" if a.rollout_nodes else f" {'rollout_replica':>15}"))
    for r in range(world):
        node = a.rollout_nodes + r // g
        t, p, d = coords(r, tp, dp)
        line = f"{r:>5} {node:>4} {hosts[node]:<16} {r % g:>10} {t:>3} {p:>3} {d:>3}"
        print(line + ("" if a.rollout_nodes else f" {r // rtp:>15}"))
    if tp > g or g % tp:
        print(f"warning: TP={tp} groups span nodes ({g} GPUs per node): tensor parallel traffic leaves NVLink")
    return 0


if __name__ == "__main__":
    sys.exit(main())
