"""Does each method work? Each paper's claim in miniature on the demo, with the controls that say
why: named arms at a fixed budget each, several seeds, a table (mean ± sd over seeds) and a plot.

    python -m eval.efficacy --list                  # the arms and what each one tests
    python -m eval.efficacy                         # every arm, seeds 0 1 2
    python -m eval.efficacy --arms dual-L warm-dual-L --seeds 0 1 2
    python -m eval.efficacy --quick                 # every arm at a tiny budget: a smoke test

Each (arm, seed) trains into OUT/<arm>/seed<k>/ and is marked done by DONE.json: a finished run is
never run again, an interrupted one resumes from its checkpoint, so the study may span sessions.
An arm's prerequisites (the runs it starts from) run first. Methods keep their papers' settings;
the regime (backbone, input size, lr, batch, iterations) is the demo preset's, the same for an arm
and its baseline. The scarce label count L is fixed once, by `scarce_rule` on the supervised
plateaus alone, before any arm at L runs, and written to OUT/L.json.
"""
import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# The demo preset's schedule walked by iterations: 1,000 is about its 5 epochs over 3,288 persons
# at batch 16, the drop at 600 its drop after epoch 3 of 5.
BUDGET, DROP = 1000, 600
WARM, CONT = 500, 500           # warm arms: supervised for WARM, then CONT more of each arm
PRETRAIN_EPOCHS = 10            # pretraining arms: the same images seen by each
LABEL_COUNTS = (30, 100, 300)   # the supervised plateaus (and every demo person: sup-all)
XIE_HARD_VIEW = ["--hard-rot-factor", "30"]  # Xie et al.: N(0, 30°) clipped to ±60°, p 0.8
QUICK = dict(budget=6, drop=4, warm=3, cont=3, pretrain_epochs=1)
COMMON = ["--data", "demo", "--amp", "none"]


def scarce_rule(plateau):
    """L: the larger of 30 and 100 whose mean supervised AP is at most 0.8 x the all-labels mean
    (labels still scarce there), else 30."""
    below = [n for n in (30, 100) if plateau[n] <= 0.8 * plateau["all"]]
    return max(below) if below else 30


@dataclass
class Arm:
    name: str
    what: str
    script: str
    argv: object                                # argv(run context) -> the arm's own flags
    base: str = None                            # the arm it is measured against
    needs: list = field(default_factory=list)   # arms whose runs it starts from
    scarce: bool = False                        # runs at L: only once L is fixed


class Run:
    """What an arm's flags depend on: the seed, the budget, L and where other arms' runs live."""

    def __init__(self, out, seed, seeds, quick, scarce):
        self.out, self.seed, self.scarce = out, seed, scarce
        self.other_seed = seeds[(seeds.index(seed) + 1) % len(seeds)]
        for k, v in dict(budget=BUDGET, drop=DROP, warm=WARM, cont=CONT,
                         pretrain_epochs=PRETRAIN_EPOCHS).items():
            setattr(self, k, QUICK[k] if quick else v)

    def folder(self, arm, seed=None):
        return self.out / arm / f"seed{self.seed if seed is None else seed}"

    def labeled(self, n):
        return [] if n == "all" else ["--labeled", str(self.scarce if n == "L" else n)]


def supervised(n, iters=None):
    return lambda r: ["--iters", str(iters or r.budget), "--lr-steps", str(r.drop)] + r.labeled(n)


def dual(n, backbone=None):
    def argv(r):
        flags = supervised(n)(r) + ["--semi", "dual", "--unlabeled", "rest", *XIE_HARD_VIEW]
        return flags + (["--pretrained", str(r.folder(backbone) / "backbone.pth")] if backbone
                        else [])
    return argv


def continued(semi):
    """CONT more iterations from warm-base-L: network 1 from this seed's run, network 2 from the
    next seed's, so that the two networks differ as the paper's two ImageNet-initialised ones."""
    def argv(r):
        flags = ["--iters", str(r.cont), "--lr-steps", str(r.cont), *r.labeled("L"), "--weights",
                 str(r.folder("warm-base-L") / "checkpoint.pth")]
        return flags + (["--semi", "dual", "--unlabeled", "rest", *XIE_HARD_VIEW, "--weights2",
                         str(r.folder("warm-base-L", r.other_seed) / "checkpoint.pth")]
                        if semi else [])
    return argv


def icon(lam, warm=False):
    def argv(r):
        iters = r.cont if warm else r.budget
        flags = ["--iters", str(iters), "--lr-steps", str(iters if warm else r.drop),
                 "--lambda-p", str(lam)]
        return flags + (["--weights", str(r.folder("icon-0") / "best.pth")] if warm else [])
    return argv


def transfer(backbone):
    return lambda r: supervised("L")(r) + ["--pretrained",
                                           str(r.folder(backbone) / "backbone.pth")]


ARMS = [
    # the supervised plateaus, which fix L
    *[Arm(f"sup-{n}", f"supervised, {n} labeled persons", "mrpose.py", supervised(n))
      for n in LABEL_COUNTS],
    Arm("sup-all", "supervised, every demo person", "mrpose.py", supervised("all")),
    # Xie et al.'s dual networks, from scratch and in the paper's regime in miniature
    Arm("dual-L", "dual networks from scratch, L labeled", "mrpose.py", dual("L"), "sup-L",
        scarce=True),
    Arm("dual-300", "dual networks from scratch, 300 labeled", "mrpose.py", dual(300), "sup-300"),
    Arm("warm-base-L", f"supervised for {WARM} iterations, L labeled: the warm arms' start",
        "mrpose.py", supervised("L", WARM), scarce=True),
    Arm("warm-sup-L", "warm-base-L continued, supervised", "mrpose.py", continued(False),
        needs=["warm-base-L"], scarce=True),
    Arm("warm-dual-L", "warm-base-L continued, dual networks (two seeds' networks)", "mrpose.py",
        continued(True), "warm-sup-L", needs=["warm-base-L"], scarce=True),
    # ICON with every label
    Arm("icon-0", "icon.py without the contrast (λp 0)", "icon.py", icon(0)),
    *[Arm(f"icon-{lam:g}", f"ICON at λp {lam:g}" + (" (the paper's)" if lam == 1 else ""),
          "icon.py", icon(lam), "icon-0") for lam in (1, 0.1, 0.01)],
    Arm("icon-warm-0", "icon-0 continued without the contrast", "icon.py", icon(0, warm=True),
        needs=["icon-0"]),
    Arm("icon-warm-1", "icon-0 continued with the contrast at λp 1", "icon.py",
        icon(1, warm=True), "icon-warm-0", needs=["icon-0"]),
    # pretraining on the demo's images, then transfer at L
    Arm("pre-mscl", "MSCL pretraining", "mscl.py", lambda r: ["--epochs", str(r.pretrain_epochs)]),
    Arm("pre-simsiam", "mscl.py's SimSiam mode (one scale, no FPN)", "mscl.py",
        lambda r: ["--epochs", str(r.pretrain_epochs), "--single-scale", "--no-fpn"]),
    Arm("pre-liftedcl", "LiftedCL pretraining", "liftedcl.py",
        lambda r: ["--epochs", str(r.pretrain_epochs)]),
    *[Arm(f"ft-{m}-L", f"supervised at L from the pre-{m} backbone", "mrpose.py",
          transfer(f"pre-{m}"), "sup-L", needs=[f"pre-{m}"], scarce=True)
      for m in ("mscl", "simsiam", "liftedcl")],
    Arm("dual-mscl-L", "dual networks at L from the pre-mscl backbone (MSCL's protocol)",
        "mrpose.py", dual("L", "pre-mscl"), "dual-L", needs=["pre-mscl"], scarce=True),
]
BY_NAME = {a.name: a for a in ARMS}


def final(folder):
    """The last log entry of a run."""
    return json.loads((folder / "log.jsonl").read_text().splitlines()[-1])


def run(arm, r):
    """Train (arm, seed) unless DONE.json says it finished; resume an interrupted run."""
    folder = r.folder(arm.name)
    if (folder / "DONE.json").exists():
        return json.loads((folder / "DONE.json").read_text())
    argv = [sys.executable, arm.script, *COMMON, "--seed", str(r.seed), *arm.argv(r),
            "--out", str(folder)]
    if (folder / "checkpoint.pth").exists():
        argv.append("--resume")
    print(f"[{arm.name} seed {r.seed}] {' '.join(argv[1:])}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stdout.txt", "a") as log:
        p = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        sys.exit(f"error: {arm.name} seed {r.seed}: exit {p.returncode} (see {folder}/stdout.txt)")
    last = final(folder)
    # pose arms: network 1's AP (the reported model); pretraining arms: the final loss
    result = {"arm": arm.name, "seed": r.seed, "argv": argv[1:],
              "score": last["metrics"]["AP"] if "metrics" in last else last["loss"]}
    result.update({k: last[k]["AP"] for k in ("metrics_net2", "metrics_ensemble") if k in last})
    (folder / "DONE.json").write_text(json.dumps(result, indent=1))
    return result


def fix_scarce(out, seeds, quick):
    """L from the finished plateaus, written once to OUT/L.json and read from there after."""
    path = out / "L.json"
    if path.exists():
        return json.loads(path.read_text())["L"]
    plateau = {n: float(np.mean([run(BY_NAME[f"sup-{n}"], Run(out, s, seeds, quick, None))["score"]
                                 for s in seeds])) for n in (30, 100, "all")}
    L = scarce_rule(plateau)
    path.write_text(json.dumps({"L": L, "plateau_mean_AP": plateau, "seeds": seeds}, indent=1))
    print(f"L = {L} (supervised plateaus, mean AP over seeds: {plateau})", flush=True)
    return L


def with_prerequisites(names):
    seq = []

    def visit(name):
        for need in BY_NAME[name].needs:
            visit(need)
        if BY_NAME[name] not in seq:
            seq.append(BY_NAME[name])
    for name in names:
        visit(name)
    return seq


def summarise(out, seeds, L):
    """Mean ± sd over seeds per arm beside its baseline; a difference is called an effect only
    beyond twice the larger of the two arms' sd."""
    stats = {}
    for arm in ARMS:
        done = [out / arm.name / f"seed{s}" / "DONE.json" for s in seeds]
        x = np.array([json.loads(p.read_text())["score"] for p in done if p.exists()])
        if len(x):
            stats[arm.name] = (x.mean(), x.std(ddof=1) if len(x) > 1 else float("nan"), len(x))
    rows = ["| arm | what | AP (loss: pretraining), mean ± sd (n) | baseline | difference | "
            "effect |", "| --- | --- | --- | --- | --- | --- |"]
    for arm in ARMS:
        if arm.name not in stats:
            continue
        m, sd, n = stats[arm.name]
        base = arm.base and arm.base.replace("sup-L", f"sup-{L}")
        cells = ["", "", ""]
        if base in stats:
            bm, bsd = stats[base][:2]
            spread = max(sd, bsd)
            cells = [f"{base}: {bm:.3f}", f"{m - bm:+.3f}",
                     "yes" if abs(m - bm) > 2 * spread else "no" if spread == spread else "n < 2"]
        rows.append(f"| {arm.name} | {arm.what.replace(' L ', f' {L} ')} | {m:.3f} ± {sd:.3f} "
                    f"({n}) | " + " | ".join(cells) + " |")
    return stats, "\n".join(rows) + "\n"


def plot(path, stats):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [a.name for a in ARMS if a.name in stats and not a.name.startswith("pre-")]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names)), 4))
    ax.bar(range(len(names)), [stats[n][0] for n in names], capsize=3, color="#4c72b0",
           yerr=[np.nan_to_num(stats[n][1]) for n in names])
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_ylabel("val AP, mean ± sd over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", action="store_true", help="list the arms and exit")
    p.add_argument("--arms", nargs="+", default=None, help="these arms (default: every arm)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="a tiny budget, to see every arm run")
    p.add_argument("--out", default=None, help="default: runs/efficacy (--quick: "
                   "runs/efficacy-quick)")
    args = p.parse_args()
    if args.list:
        for a in ARMS:
            print(f"{a.name:13s} {a.what}" + (f" (against {a.base})" if a.base else ""))
        return
    for name in args.arms or []:
        if name not in BY_NAME:
            sys.exit(f"error: --arms: no arm {name} (--list names them)")
    out = Path(args.out or ("runs/efficacy-quick" if args.quick else "runs/efficacy")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    arms = with_prerequisites(args.arms or list(BY_NAME))
    L = fix_scarce(out, args.seeds, args.quick) if any(a.scarce for a in arms) else "L"
    for arm in arms:
        for seed in args.seeds:
            run(arm, Run(out, seed, args.seeds, args.quick, L))
    stats, table = summarise(out, args.seeds, L)
    (out / "table.md").write_text(table)
    plot(out / "efficacy.png", stats)
    print(table + f"written: {out / 'table.md'}, {out / 'efficacy.png'}")


if __name__ == "__main__":
    main()
