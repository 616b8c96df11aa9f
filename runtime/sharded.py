"""ShardedEngine: a sharded OUT (passes/shard.py) run by one process per rank on torch.distributed.

Every rank runs the same two programs on its own weights file (`weights-rank{r}.bin`); the
programs' all-reduces name the placeholder groups of passes/shard.py, bound here to the process
groups of the plan (gloo on CPU, NCCL on CUDA).

Rank 0 is the engine the caller holds (the `Engine` interface: `step` returns logits and a
cache). The other ranks are workers: for each step rank 0 broadcasts the step's inputs and which
of its caches the step continues (an id), every rank runs the program, and each keeps the
present cache under a new id. The latent cache is replicated (the latent projection is), so the
caches never move between processes; caches rank 0 drops are dropped by the workers at the next
message.

Launching: `ShardedEngine.load(OUT)` in a plain process starts world-1 worker processes
(`python -m dscompile.runtime.sharded`) and joins them over a local TCP rendezvous. Under torchrun
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set) every process calls it; ranks other than 0
serve until rank 0 stops, then exit. Every collective of a step has a timeout (120 s, or
$DSCOMPILE_COLLECTIVE_TIMEOUT_S, read at load: tests set a few seconds), and rank 0 watches its
workers: a rank that fails or is killed ends the run with a one-line EngineError naming it, not a
hang. The workers' wait for the next step is a broadcast on the control group, where they have no
practical timeout (CONTROL_TIMEOUT): an engine left idle (a chat between turns) stays up; a rank
that dies while the others wait is still seen (its sockets close, and rank 0's watchdog), and rank
0's side of the broadcast keeps the step's timeout (a worker that hangs ends the step).

Devices: one rank per GPU (NCCL refuses two ranks on one GPU). "cuda" with fewer GPUs than ranks
on this machine is refused in one line; "auto" then runs the ranks on CPU (gloo) and says so in
`notes` (`choose_rank_device`).
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dscompile.errors import EngineError, first_line
from dscompile.runtime.contract import EngineInfo, KVCache
from dscompile.runtime.engine import Engine
from dscompile.runtime.manifest import read_manifest
from dscompile.runtime.torch_engine import choose_device, load_programs, run_programs
from dscompile.runtime.weights import WeightsFile

COLLECTIVE_TIMEOUT_S = 120  # a rank that does not answer within this, during a step, ends the run
TIMEOUT_ENV = "DSCOMPILE_COLLECTIVE_TIMEOUT_S"  # overrides it (seconds), in every rank
# The control group's wait for the next step lasts as long as the user is idle. Gloo has no
# infinite timeout (it adds this to a clock in nanoseconds: ~290 years overflow), so: a year.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


def collective_timeout() -> datetime.timedelta:
    """The timeout of a step's collectives: COLLECTIVE_TIMEOUT_S or $DSCOMPILE_COLLECTIVE_TIMEOUT_S."""
    value = os.environ.get(TIMEOUT_ENV, str(COLLECTIVE_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise EngineError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def choose_rank_device(device: str, world: int) -> tuple[str, str | None]:
    """Every rank's device for `device` (auto, cpu, cuda), and a note when "auto" settled for CPU.

    Ranks on this machine (torchrun's LOCAL_WORLD_SIZE, else all of them) need a GPU each: "cuda"
    with fewer is a one-line EngineError naming both numbers; "auto" runs them on CPU (gloo)."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        gpus = torch.cuda.device_count()
        if gpus >= here:
            return "cuda", None
        if device == "cuda":
            raise EngineError(f"device 'cuda': a sharded engine runs one rank per GPU (NCCL refuses two ranks on "
                              f"one GPU), and {here} ranks run on this machine, which has {gpus} GPU(s); "
                              "run it with --provider cpu (gloo)")
        return "cpu", (f"{here} ranks and {gpus} GPU(s) on this machine (one rank per GPU): the ranks run on "
                       "CPU (gloo)")
    return choose_device(device), None


@dataclass
class ShardedCache(KVCache):
    """Rank 0's cache of a step; the workers hold theirs under `shard_id`."""

    shard_id: int = -1


def rank_manifest(manifest: dict[str, Any], rank: int) -> dict[str, Any]:
    """The manifest as rank `rank` reads it: its weights file and its weights' places."""
    ranks = manifest["sharding"]["ranks"]
    entry = ranks[rank]
    graphs = {phase: {**g, "program_weights": entry["program_weights"][phase]} for phase, g in manifest["graphs"].items()}
    return {**manifest, "weights": entry["weights"], "graphs": graphs}


def check_world(out: Path, manifest: dict[str, Any], world: int) -> None:
    sharding = manifest["sharding"]
    if world != sharding["world_size"]:
        raise EngineError(f"{out}: a sharded engine for {sharding['world_size']} ranks (tp {sharding['tp']} x ep "
                          f"{sharding['ep']}) cannot run with {world} processes")
    for entry in sharding["ranks"]:
        path = out / entry["weights"]["file"]
        if not path.is_file():
            raise EngineError(f"{path}: rank {entry['rank']}'s weights file is missing")


class _Rank:
    """One rank's programs, weights and process groups."""

    def __init__(self, out: Path, manifest: dict[str, Any], rank: int, world: int, device: str):
        import torch.distributed as dist

        self.rank, self.world, self.device = rank, world, device
        self.info = EngineInfo.from_manifest(manifest, str(out / "manifest.json"))
        mine = rank_manifest(manifest, rank)
        self.weights = WeightsFile.open(out, mine)
        groups = {}
        timeout = collective_timeout()
        for key, lists in manifest["sharding"]["groups"].items():
            for ranks in lists:  # every rank creates every group, in the same order
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    groups[key] = group.group_name
        # Control messages go over their own gloo group (CPU objects), whatever the device's backend.
        # A worker waiting there waits for the user (module docstring): no timeout. Rank 0 only
        # sends, and a hung (not dead) worker must not hold that send forever: the step's timeout.
        # (A gloo timeout is each process's own option.)
        self.control = dist.new_group(list(range(world)), backend="gloo",
                                      timeout=timeout if rank == 0 else CONTROL_TIMEOUT)

        def bind(program) -> None:
            for node in program.graph.nodes:
                if node.op == "call_function" and node.target == torch.ops._c10d_functional.all_reduce.default:
                    name = node.args[2]
                    if name not in groups:
                        raise EngineError(f"{out}: a program reduces over the unknown group {name!r}")
                    node.args = (node.args[0], node.args[1], groups[name])
            program.graph_module.recompile()

        self.modules = load_programs(out, mine, self.weights, device, edit=bind)
        self.caches: dict[int, KVCache] = {}

    def run(self, ids, pos, mask, past: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        return run_programs(self.modules, self.info, self.device, ids, pos, mask, past)

    def serve(self) -> None:
        """A worker's loop: run what rank 0 broadcasts until it says stop."""
        import torch.distributed as dist

        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0, group=self.control)
            kind, *body = message[0]
            if kind == "stop":
                return
            freed, past_id, new_id, ids, pos, mask = body
            for i in freed:
                self.caches.pop(i, None)
            self.weights.check()
            _, present = self.run(ids, pos, mask, self.caches.get(past_id) if past_id is not None else None)
            self.caches[new_id] = present


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def _init(rank: int, world: int, address: str, port: int, device: str) -> None:
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    # The rendezvous waits for workers still importing torch: COLLECTIVE_TIMEOUT_S, whatever a test sets.
    dist.init_process_group(_backend(device), init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


class ShardedEngine(Engine):
    """Rank 0 of a sharded OUT (module docstring): the `Engine` a caller steps."""

    def __init__(self, out: Path, manifest: dict[str, Any], rank: _Rank, workers: list[subprocess.Popen],
                 logs: list[Path], notes: tuple[str, ...] = ()):
        self.out_dir, self.manifest, self._rank = out, manifest, rank
        self.notes = notes
        self.info, self.device = rank.info, rank.device
        limits = manifest.get("limits", {})
        self.max_batch, self.max_step_tokens = limits.get("max_batch"), limits.get("max_prompt_tokens")
        self.weights = rank.weights
        self._workers, self._logs = workers, logs
        self._ids = itertools.count()
        self._freed: list[int] = []
        self._failure: str | None = None
        self._closed = False
        self._threads = torch.get_num_threads()  # restored at close (load gives each rank its share of the cores)
        if workers:
            threading.Thread(target=self._watch, daemon=True).start()
        atexit.register(self.close)

    @classmethod
    def load(cls, out_dir: str | Path, device: str = "auto") -> "ShardedEngine":
        out = Path(out_dir)
        manifest = read_manifest(out, check_graphs=False)
        world = int(manifest["sharding"]["world_size"])
        device, note = choose_rank_device(device, world)
        notes = (note,) if note else ()
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # under torchrun: every rank calls load
            check_world(out, manifest, int(os.environ["WORLD_SIZE"]))
            rank = int(os.environ["RANK"])
            _init(rank, world, os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500)),
                  device)
            state = _Rank(out, manifest, rank, world, device)
            if rank != 0:
                state.serve()
                _shutdown()
                raise SystemExit(0)
            return cls(out, manifest, state, [], [], notes)
        check_world(out, manifest, world)
        port = _free_port()
        workers, logs = [], []
        threads = max(1, (os.cpu_count() or 1) // world)
        for r in range(1, world):
            fd, name = tempfile.mkstemp(prefix=f"dscompile-rank{r}-", suffix=".log")
            os.close(fd)
            log = Path(name)
            logs.append(log)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            with open(log, "wb") as f:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "dscompile.runtime.sharded", str(out), str(r), str(world), str(port), device],
                    stdout=subprocess.DEVNULL, stderr=f, env=env))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _init(0, world, "127.0.0.1", port, device)
            state = _Rank(out, manifest, 0, world, device)
        except Exception as err:
            _stop(workers)
            torch.set_num_threads(before)
            raise EngineError(_worker_error(workers, logs) or f"{out}: cannot start the ranks ({first_line(err)})") from None
        engine = cls(out, manifest, state, workers, logs, notes)
        engine._threads = before
        return engine

    def _watch(self) -> None:
        """Notice a worker that exited: stop the others, so rank 0's next or current collective fails
        at once (their sockets close) instead of waiting for the timeout."""
        while not self._closed:
            for r, (p, log) in enumerate(zip(self._workers, self._logs), start=1):
                if p.poll() is not None and not self._closed:
                    self._failure = _worker_error([p], [log], first=r) or f"rank {r} exited with code {p.returncode}"
                    _stop(self._workers)
                    return
            threading.Event().wait(0.2)

    def _step(self, input_ids, position_ids, attention_mask, cache):
        import torch.distributed as dist

        if self._closed:
            raise EngineError(f"{self.out_dir}: the sharded engine was closed")
        if self._failure:
            raise EngineError(self._failure)
        if cache is not None and not isinstance(cache, ShardedCache):
            raise EngineError("a sharded engine continues only caches it returned (its ranks hold them)")
        past_id = cache.shard_id if cache is not None else None
        new_id = next(self._ids)
        freed, self._freed = self._freed, []
        message = [("step", freed, past_id, new_id, input_ids.cpu(), position_ids.cpu(), attention_mask.cpu())]
        try:
            dist.broadcast_object_list(message, src=0, group=self._rank.control)
            logits, present = self._rank.run(input_ids, position_ids, attention_mask, cache)
        except RuntimeError as err:
            _await_exit(self._workers)  # a killed rank's sockets close before the process can be reaped
            self._failure = (self._failure or _worker_error(self._workers, self._logs)
                             or f"a rank failed during the step ({first_line(err)})")
            _stop(self._workers)
            raise EngineError(self._failure) from None
        result = ShardedCache(present.layers, shard_id=new_id)
        weakref.finalize(result, self._freed.append, new_id)  # the workers drop theirs at the next message
        return logits.float(), result

    def close(self) -> None:
        """Stop the workers and leave the process groups (also at exit)."""
        if self._closed:
            return
        import torch.distributed as dist

        self._closed = True
        try:
            if dist.is_initialized() and not self._failure:
                dist.broadcast_object_list([("stop",)], src=0, group=self._rank.control)
        except RuntimeError:
            _stop(self._workers)
        for p in self._workers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        _shutdown()
        torch.set_num_threads(self._threads)
        for log in self._logs:
            log.unlink(missing_ok=True)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _await_exit(workers: list[subprocess.Popen], seconds: float = 5.0) -> None:
    """Wait (up to `seconds`) until one of the workers has exited, so its exit status can be read."""
    deadline = time.monotonic() + seconds
    while workers and all(p.poll() is None for p in workers) and time.monotonic() < deadline:
        time.sleep(0.02)


def _stop(workers: list[subprocess.Popen]) -> None:
    for p in workers:
        if p.poll() is None:
            p.kill()
    for p in workers:
        p.wait()


def _worker_error(workers, logs, first: int = 1) -> str | None:
    """The one-line error a failed worker printed, if any."""
    for r, (p, log) in enumerate(zip(workers, logs), start=first):
        if p.poll() not in (None, 0):
            if p.returncode < 0:
                return f"rank {r} was killed (signal {-p.returncode})"
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("error: ")]
            detail = errors[-1].removeprefix("error: ") if errors else (lines[-1] if lines else f"exit code {p.returncode}")
            return f"rank {r} failed: {detail}"
    return None


def _worker_main(argv: list[str]) -> int:
    out, rank, world, port, device = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    try:
        manifest = read_manifest(out, check_graphs=False)
        _init(rank, world, "127.0.0.1", port, device)
        _Rank(out, manifest, rank, world, device).serve()
    except EngineError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    except RuntimeError as err:  # rank 0 went away: the collectives raise
        sys.stderr.write(f"error: {first_line(err)}\n")
        return 1
    finally:
        _shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
