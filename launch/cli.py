"""`python -m launch`: parse our few options, build the torchrun command and env, run it.

Users should not need to know torchrun. We only decide how many processes, which
module, and a few environment defaults; everything after `--` goes to the module.

Where the processes run (`resolve_procs`): one per GPU where there are GPUs for them, CPU processes
(gloo) otherwise. `--procs N` on a machine with fewer than N GPUs runs N CPU processes and says so
(CUDA is hidden from them, so the engine picks the CPU by itself); `--gpus N` is an explicit request
for GPUs and stays an error there.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from launch import topology

DEFAULT_MODULE = "engine.generate"
_MODULE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

# Environment variables whose effective value the launcher reports (--dry-run) and,
# for some, defaults. Left alone on purpose:
# - NCCL_NVLS_ENABLE: whether NVLink SHARP works depends on the host and fabric;
#   not ours to decide. A value the user (or the site) set passes through.
# - CUDA_DEVICE_MAX_CONNECTIONS: only matters for overlapping compute and comms
#   on several streams; the engine decides if it needs it.
# - TORCH_NCCL_DUMP_ON_TIMEOUT: a hang-debugging switch that writes flight-recorder
#   files per rank (and needs TORCH_NCCL_TRACE_BUFFER_SIZE > 0); where to write
#   them is the user's call, so torch's own default applies.
REPORTED_ENV = (
    "OMP_NUM_THREADS",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "NCCL_NVLS_ENABLE",
    "CUDA_VISIBLE_DEVICES",
)


@dataclass(frozen=True)
class Procs:
    """How many processes, and where they run."""

    n: int
    on_gpu: bool
    note: str = ""
    """One line when they run on the CPU although GPUs are visible (--procs beyond the visible GPUs)."""

    @property
    def hides_gpus(self) -> bool:
        return bool(self.note)


@dataclass
class Plan:
    """Everything needed to run (or show) one launch."""

    nproc: int
    module: str
    module_args: list[str]
    on_gpu: bool
    dry_run: bool
    argv: list[str]  # arguments for torch.distributed.run, without the interpreter
    env: dict[str, str]  # full environment for torchrun
    added_env: dict[str, str] = field(default_factory=dict)  # what we defaulted
    note: str = ""  # why CPU processes on a machine with GPUs (Procs.note)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", *self.argv]

    def shell_line(self) -> str:
        """A copy-pasteable line: the env that matters, then the command."""
        shown = [f"{k}={self.env[k]}" for k in REPORTED_ENV if k in self.env]
        return shlex.join(["env", *shown, *self.command()])

    def summary(self) -> str:
        where = f"{self.nproc} GPU process(es) (nccl)" if self.on_gpu else (
            f"{self.nproc} CPU process(es) (gloo, {'CUDA hidden' if self.note else 'no CUDA visible'})")
        extra = ", ".join(f"{k}={v}" for k, v in self.added_env.items())
        return (f"launch: {self.module} on {where} via torchrun --standalone"
                + (f"; defaults: {extra}" if extra else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch",
        description="Run a shardiff module on N processes of this machine (wraps torchrun).",
        epilog=(
            "Everything after `--` is passed to the module unchanged.\n"
            "Examples:\n"
            "  python -m launch --gpus 4 -- --prompt 'a red fox' --out fox.png\n"
            "  python -m launch --gpus 2 --module engine.bench -- --steps 10\n"
            "  python -m launch --procs 2 -- ...   # fewer than 2 GPUs: 2 CPU processes, gloo"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--gpu` must not silently mean --gpus
    )
    n = p.add_mutually_exclusive_group()
    n.add_argument(
        "--gpus", type=int, metavar="N",
        help="number of processes, one per GPU (default: all visible CUDA GPUs); "
             "more than the visible GPUs is an error. On a machine without CUDA, "
             "N CPU processes using gloo.")
    n.add_argument(
        "--procs", type=int, metavar="N",
        help="number of processes: one per GPU where there are N GPUs, otherwise "
             "N CPU processes using gloo (slow; for testing), also on a machine "
             "with fewer GPUs (said in one line).")
    p.add_argument(
        "--module", default=DEFAULT_MODULE,
        help=f"Python module each process runs with -m (default: {DEFAULT_MODULE}).")
    p.add_argument(
        "--dry-run", action="store_true",
        help="print the torchrun command and environment, then exit 0.")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our options come before the first `--`, the module's after it."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def resolve_procs(gpus: int | None, procs: int | None, visible_gpus: int) -> Procs:
    """The processes `--gpus` / `--procs` ask for on a machine with `visible_gpus` GPUs (ValueError)."""
    requested = gpus if gpus is not None else procs
    if requested is None:
        if visible_gpus == 0:
            raise ValueError(
                "no CUDA GPUs visible; pass --procs N to run N CPU processes with gloo")
        return Procs(visible_gpus, on_gpu=True)
    if requested < 1:
        raise ValueError(f"--gpus/--procs must be at least 1, got {requested}")
    if visible_gpus == 0:
        return Procs(requested, on_gpu=False)
    if requested <= visible_gpus:
        return Procs(requested, on_gpu=True)
    if gpus is not None:
        raise ValueError(
            f"--gpus {requested} asks for more GPUs than the {visible_gpus} visible "
            "(check CUDA_VISIBLE_DEVICES); one process per GPU is required; "
            f"--procs {requested} runs {requested} CPU processes instead")
    them = "GPU" if visible_gpus == 1 else f"{visible_gpus} GPUs"
    return Procs(requested, on_gpu=False, note=(
        f"{requested} processes asked for, {visible_gpus} GPU{'s' if visible_gpus > 1 else ''} visible: "
        f"running {requested} CPU processes (gloo); use --gpus {visible_gpus} for the {them}"))


def check_module_name(module: str) -> None:
    if not _MODULE_RE.match(module):
        raise ValueError(
            f"--module {module!r} is not a dotted module name; pass e.g. "
            "engine.generate, not a file path")


def check_module_importable(module: str) -> None:
    # Fail here once instead of N times with N interleaved tracebacks.
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        raise ValueError(
            f"module {module!r} not found from {os.getcwd()}; run from the repository "
            "root or `pip install -e .` first")


def env_defaults(environ: Mapping[str, str], nproc: int, on_gpu: bool,
                 cpus: int, hide_gpus: bool = False) -> dict[str, str]:
    """Variables to add; a value already in `environ` always wins, but for
    CUDA_VISIBLE_DEVICES when `hide_gpus` (CPU processes on a machine with GPUs)."""
    add: dict[str, str] = {}
    if hide_gpus:
        # The engine (and any module) then finds no GPU and runs on the CPU with gloo, as launched:
        # several processes cannot share the fewer GPUs one per process.
        add["CUDA_VISIBLE_DEVICES"] = ""
    if "OMP_NUM_THREADS" not in environ:
        # torchrun would set 1, starving CPU ops (and CPU runs) of cores;
        # splitting the cores evenly avoids both that and oversubscription.
        add["OMP_NUM_THREADS"] = str(max(1, cpus // nproc))
    if on_gpu and not ({"TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"}
                       & environ.keys()):
        # 3 = tear the process down on a failed/timed-out collective without
        # waiting on ncclCommAbort (which can itself hang); torchrun then stops
        # the other ranks instead of them waiting forever. It is torch's current
        # default; pinned so a changed default cannot turn failures into hangs.
        add["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"
    return add


def plan(argv: Sequence[str], environ: Mapping[str, str] | None = None, *,
         visible_gpus: int | None = None, cpus: int | None = None,
         check_module: bool = True) -> Plan:
    """Parse `argv` (without the program name) into a Plan. Raises ValueError."""
    environ = dict(os.environ if environ is None else environ)
    ours, module_args = split_argv(argv)
    args, unknown = build_parser().parse_known_args(ours)
    if unknown:
        raise ValueError(
            f"unknown launcher option(s) {' '.join(unknown)}; arguments for the "
            "module go after `--`, e.g. python -m launch --gpus 2 -- --prompt ...")
    gpus = topology.visible_gpus() if visible_gpus is None else visible_gpus
    procs = resolve_procs(args.gpus, args.procs, gpus)
    check_module_name(args.module)
    # --dry-run shows the command even if the module is not written yet.
    if check_module and not args.dry_run:
        check_module_importable(args.module)
    added = env_defaults(environ, procs.n, procs.on_gpu,
                         topology.usable_cpus() if cpus is None else cpus, hide_gpus=procs.hides_gpus)
    torchrun_argv = ["--standalone", "--nproc-per-node", str(procs.n),
                     "-m", args.module, *module_args]
    return Plan(nproc=procs.n, module=args.module, module_args=module_args,
                on_gpu=procs.on_gpu, dry_run=args.dry_run, argv=torchrun_argv, env={**environ, **added},
                added_env=added, note=procs.note)


def run(p: Plan) -> int:
    """Become torchrun. Exit code and Ctrl-C handling are then exactly torchrun's:
    it stops every rank when one fails or on SIGINT/SIGTERM. exec also frees any
    CUDA state the topology check created in this process."""
    sys.stdout.flush()
    sys.stderr.flush()
    cmd = p.command()
    if os.name == "posix":
        os.execve(cmd[0], cmd, p.env)  # does not return
    # No real exec on Windows: wait for the child, also across Ctrl-C, which the
    # console delivers to torchrun too.
    proc = subprocess.Popen(cmd, env=p.env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        p = plan(argv)
    except ValueError as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        return 2
    if p.note:
        print(f"launch: {p.note}", file=sys.stderr)
    if p.dry_run:
        print(p.shell_line())
        return 0
    print(p.summary(), file=sys.stderr)
    if p.on_gpu:
        warning = topology.p2p_warning(p.nproc)
        if warning:
            print(f"launch: warning: {warning}", file=sys.stderr)
    return run(p)
