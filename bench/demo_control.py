"""Is the demo's gain GRPO's own? Supervised steps instead of GRPO, evaluated like the demo.

Starting from the demo's warm-started model, run as many extra supervised steps as the demo runs GRPO
steps (``trainer.max_steps``, the warm start's batch size and learning rate, the same training
problems), then evaluate on the same held-out prompts with the demo's own evaluation:

* ``more warm start``: the demo's warm start continued (answers a random number of the prompt);
* ``gold SFT``: the same number of steps with the correct answers (supervision GRPO never sees).

    python bench/demo_control.py [--only start,more,gold] [key=value overrides of configs/grpo_demo_cpu.yaml]

Prints held-out reward, accuracy and pass@1 for the starting model and both controls; the demo's own
run prints the GRPO column. Numbers are recorded in README ("The demo").
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from megatron_grpo.demo import CONFIG, _cli, held_out_eval_args


def main(argv: list[str]) -> int:
    from megatron_grpo.config import load_config, validate
    from megatron_grpo.data.loading import load_prompt_dataset
    from megatron_grpo.trainer.assets import _training_rows, prepare_assets
    from megatron_grpo.trainer.warm_start import sft_warm_start

    only = {"start", "more", "gold"}
    if argv[:1] == ["--only"]:
        only, argv = set(argv[1].split(",")), argv[2:]
    cfg = load_config(CONFIG, argv)
    validate(cfg)
    prepare_assets(cfg)
    out = Path(cfg.trainer.output_dir) / "control"
    out.mkdir(parents=True, exist_ok=True)
    rows = _training_rows(cfg, load_prompt_dataset)
    steps = int(cfg.trainer.max_steps)
    results = {}
    for key, name, answer in (("start", "starting model", None), ("more", "more warm start", cfg.model.warm_start_answer),
                              ("gold", "gold SFT", "gold")):
        if key not in only:
            continue
        model = Path(cfg.model.path)
        t0 = time.monotonic()
        if answer is not None:
            model = out / name.replace(" ", "_")
            sft_warm_start(cfg.model.path, model, rows, steps=steps, lr=cfg.model.warm_start_lr,
                           seed=cfg.trainer.seed + 1, system_prompt=cfg.data.system_prompt, answer=answer)
        js = out / f"{model.name}.json"
        _cli("eval", "--model", str(model), *held_out_eval_args(cfg), "--out", str(js), log=out / f"{model.name}.log")
        results[name] = json.loads(js.read_text())
        print(f"{name}: {time.monotonic() - t0:.0f} s", flush=True)
    print(f"\n{steps} extra supervised steps instead of {steps} GRPO steps; held-out prompts:")
    print(f"  {'model':18s} {'reward':>7s} {'accuracy':>9s} {'pass@1':>7s}")
    for name, r in results.items():
        print(f"  {name:18s} {r['eval/reward_mean']:7.3f} {r['eval/accuracy']:9.3f} {r['eval/pass@1']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
