"""Small helpers shared by every script: user-facing errors, atomic writes, seeding, progress."""
import contextlib
import errno
import functools
import hashlib
import json
import os
import pickle
import random
import re
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

from common import dist


class UserError(Exception):
    """Bad input from the user (missing file, corrupt image, wrong checkpoint): run_main prints its
    one-line message instead of a traceback."""


def run_main(main):
    """Run `main()`, turning a UserError into one line on stderr and exit code 2. Before the process
    group starts (checks the same on every rank) only rank 0 prints it; later, every rank prints its
    own (a corrupt image in its shard), with its rank."""
    try:
        main()
    except UserError as e:
        # a DataLoader worker re-raises with the worker's traceback in the message: keep its last
        # line
        msg = str(e).strip().splitlines()[-1].removeprefix(f"{UserError.__module__}.UserError: ")
        rank = dist.rank()
        if rank == 0 or torch.distributed.is_initialized():
            print(f"error: {msg}" if rank == 0 else f"error (rank {rank}): {msg}", file=sys.stderr)
        sys.exit(2)


def _write_error_cause(e, folder):
    """Why a write failed, in words: the OSError behind it (torch.save wraps one in a RuntimeError
    that says 'unexpected pos ...'), or a full disk; None for any other error (a bug, not the user's
    to fix)."""
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return cause.strerror or str(cause)
    with contextlib.suppress(OSError):
        if os.statvfs(folder).f_bavail == 0:
            return os.strerror(errno.ENOSPC)
    return None


def atomic_write(path, write_fn, mode="wb"):
    """Write through a temp file in the same folder, then rename: readers never see half a file. A
    write that fails (a full disk) removes the temp file, keeps the previous file and says so in one
    line."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp makes 0600; the result gets a normal file's permissions
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        os.unlink(tmp)
        cause = _write_error_cause(e, folder)
        if cause is None:
            raise
        kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
        raise UserError(f"{path}: cannot write ({cause}); {kept}") from None
    except BaseException:
        os.unlink(tmp)
        raise


def save_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f), mode="w")


def load_json(path, what="file"):
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Progress:
    """One progress line every `every` iterations: iteration, loss, img/s, ETA."""

    def __init__(self, total, every=20, enabled=True, prefix=""):
        self.total, self.every, self.enabled, self.prefix = total, every, enabled, prefix
        self.t0 = self.last_t = time.time()
        self.count = 0

    def step(self, it, n_images, **values):
        self.count += n_images
        if not self.enabled or (it + 1) % self.every and it + 1 != self.total:
            return
        now = time.time()
        rate = self.count / max(now - self.last_t, 1e-9)
        eta = (self.total - it - 1) * (now - self.t0) / (it + 1)
        vals = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        print(f"{self.prefix}[{it + 1}/{self.total}] {vals} {rate:.1f} img/s eta {eta / 60:.1f} "
              f"min", flush=True)
        self.last_t, self.count = now, 0


def save_checkpoint(path, state):
    """torch.save through a temp file + rename, so a crash never leaves a truncated checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, what="checkpoint"):
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # torch's advice (weights_only=False) runs the file's code: not ours to give
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise UserError(f"{path}: not a readable {what}: it holds Python objects beyond tensors"
                        + (f" ({found.group(1)})" if found else "")
                        + ", which are not loaded, for safety; save a state_dict of tensors"
                        ) from None
    except Exception as e:  # truncated file, not a torch file
        raise UserError(f"{path}: not a readable {what} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]})") from None


def read_state_dict(path, what):
    """The state_dict in a weights file: bare, or under 'backbone'/'state_dict'/'model', without a
    'module.' (DDP) or 'backbone.' prefix common to every key. `what` names the file in errors
    ("pretrained backbone")."""
    state = load_checkpoint(path, what=f"{what} file")
    for key in ("backbone", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: does not hold a state_dict of tensors")
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def rng_state():
    """Every RNG a run draws from, for exact resumption."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array travels as a tensor: weights_only loading refuses pickled ndarrays
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def misfit(own, saved):
    """The first tensor of state_dict `own` that `saved` lacks or holds in another shape, or that
    `saved` holds and `own` lacks, in words ("w: expected (2, 4), found (2, 3)"); None: it fits."""
    def shape(state, k):
        return tuple(state[k].shape) if k in state else "nothing"
    wrong = ([k for k in own if shape(saved, k) != shape(own, k)]
             + [k for k in saved if k not in own])
    if not wrong:
        return None
    k = wrong[0]
    more = f"; {len(wrong)} tensors differ" if len(wrong) > 1 else ""
    return f"{k}: expected {shape(own, k)}, found {shape(saved, k)}{more}"


def restore_training(path, ckpt, rank, **states):
    """Resume the training state saved in `ckpt` (read from `path`): each keyword's object
    (model=..., optimizer=..., scaler=...) loads ckpt[keyword], and this rank's RNGs are restored
    (rank 0's where the saved run had fewer ranks). Returns (epoch, iteration) reached. A missing
    or ill-fitting entry is a UserError naming it (for a module, its first ill-fitting tensor)."""
    for key, obj in states.items():
        if not isinstance(ckpt.get(key), dict):
            raise UserError(f"{path}: no {key} in this checkpoint")
        try:
            wrong = misfit(obj.state_dict(), ckpt[key]) if isinstance(obj, nn.Module) else None
            if wrong is None:
                obj.load_state_dict(ckpt[key])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
            wrong = str(e).splitlines()[0][:200]
        if wrong is not None:
            raise UserError(f"{path}: the {key} does not fit this run ({wrong})") from None
    set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    return ckpt["epoch"], ckpt["iteration"]


def check_epochs_left(path, epoch, it, epochs, total_iters):
    """A resumed pretraining run must have training left: its cosine schedule spans --epochs, which
    it keeps, so past the end of --epochs (or of --iters) nothing is."""
    if it >= total_iters or epoch >= epochs:
        raise UserError(f"{path}: the run is complete (epoch {epoch} of {epochs}, iteration {it} "
                        f"of {total_iters}); raise --iters to train on, or start a longer run "
                        f"elsewhere")


def read_log(path, epochs):
    """The entries of log.jsonl for the first `epochs` epochs (a resumed run rewrites the rest)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [e for e in map(json.loads, f.read().splitlines()) if e["epoch"] <= epochs]


def write_log(path, entries):
    """log.jsonl, one JSON object per epoch, written whole through a temp file."""
    atomic_write(path, lambda f: f.write("".join(json.dumps(e) + "\n" for e in entries)),
                 mode="w")


def resume_pretraining(args, keys, total_iters, negated=(), **states):
    """--resume of mscl.py and liftedcl.py: the saved settings named by `keys` checked against this
    run's (check_resume_args), each of `states` loaded in place, this rank's RNGs restored. Returns
    (epoch, iteration, log.jsonl's entries up to that epoch); (0, 0, []) without --resume."""
    if not args.resume:
        return 0, 0, []
    ckpt = load_checkpoint(args.resume)
    check_resume_args(args.resume, ckpt.get("args", {}), args, keys, negated)
    epoch, it = restore_training(args.resume, ckpt, dist.rank(), **states)
    check_epochs_left(args.resume, epoch, it, args.epochs, total_iters)
    if dist.is_main():
        print(f"resumed from {args.resume} at epoch {epoch}, iteration {it}")
    return epoch, it, read_log(os.path.join(args.out, "log.jsonl"), epoch)


def finish_pretraining(out, *modules):
    """The end of mscl.py's and liftedcl.py's main. Under DDP each rank prints the sha1 of the
    `modules`' parameters and buffers, BN statistics aside (each rank updates its own): the same on
    every rank when DDP keeps them in step. Then rank 0 names the exported backbone."""
    if dist.world_size() > 1:
        h = hashlib.sha1()
        for module in modules:
            for name, t in module.state_dict().items():
                if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
        print(f"rank {dist.rank()}/{dist.world_size()}: parameters sha1 {h.hexdigest()}",
              flush=True)
    if dist.is_main():
        print(f"backbone for mrpose.py --pretrained: {os.path.join(out, 'backbone.pth')}")
    dist.cleanup()


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (an empty set where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


@functools.lru_cache(maxsize=None)  # autocast asks every iteration
def native_bf16(device):
    """Whether bf16 runs natively on `device`: CUDA with bf16 support, or a CPU with AVX512-BF16 or
    AMX (elsewhere a CPU emulates bf16, slower than fp32). The one place that decides what --amp
    auto means."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # both need torch's AVX-512 kernels (not forced down by ATEN_CPU_CAPABILITY); the flags say
    # which CPU it is
    capability = torch.backends.cpu.get_cpu_capability()
    return device.type == "cpu" and ("AVX512" in capability or "AMX" in capability) \
        and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def amp_dtype(args, device):
    """The autocast dtype of --amp on `device`, or None for fp32. `auto` is bf16 where native_bf16;
    the environment variable POSE_AMP_AUTO=none makes it fp32 everywhere (the tests set it: same
    results on any CPU)."""
    amp = args.amp
    if amp == "auto":
        amp = ("none" if os.environ.get("POSE_AMP_AUTO") == "none" or not native_bf16(device)
               else "bf16")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def autocast(args, device):
    """--amp: bf16 autocast (`auto`: where the device runs it natively), fp16 (the caller then
    scales the loss with a GradScaler), or none (fp32)."""
    dtype = amp_dtype(args, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def compile_model(model, enabled):
    """--compile: torch.compile's default mode (inductor) on `model`'s forward, in place
    (Module.compile), so module names, state_dict keys and checkpoints do not change. Returns
    `model`."""
    if enabled:
        model.compile()
    return model


def gmacs(fn, size):
    """Multiply-accumulates, in billions (papers' "GFLOPs"), of `fn` on one zero image of `size`
    (H, W): --summary's count."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(torch.zeros(1, 3, *size))
    return counter.get_total_flops() / 2 / 1e9


def check_finite(loss, it, ckpt_path):
    """Stop on a NaN/inf loss before anything is written; the last checkpoint stays as it was."""
    if not torch.isfinite(loss).all():
        raise UserError(f"non-finite loss at iteration {it}; stopped, the last good checkpoint is "
                        f"{ckpt_path}")


def check_resume_args(path, saved, args, keys, negated=()):
    """--resume continues the saved run: the settings named by `keys` (the model and the schedule)
    must not change (--epochs/--iters may grow, which is how an interrupted run is finished). Keys
    in `negated` are store_false flags, named --no-<key> in the message. 'none' and an unset value
    are the same setting (--amp none is fp32, as no --amp)."""
    for k in keys:
        was, now = saved.get(k), getattr(args, k)
        was, now = (list(v) if isinstance(v, (list, tuple)) else None if v == "none" else v
                    for v in (was, now))
        if k in saved and was != now:
            flag = "--" + k.replace("_", "-")
            if k in negated:
                flag, was, now = "--no-" + flag[2:], not was, not now
            raise UserError(f"{path}: saved with {flag} {was}, this run has {now}; "
                            f"resume with the same settings or use another --out")
