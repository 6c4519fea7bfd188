"""Where the work runs: the device, torch threads, training precision and evaluation shards.

The algorithms never choose a device: they make every tensor on their input's device. This module
resolves `runtime.device` once per process (an unavailable device is one line, exit 2, before any
work), sets the torch thread count so that N processes on C cores do not oversubscribe OpenMP
(N processes with C threads each slowed each other ~100× on 2 cores), and runs evaluation shards.

Per-sample determinism: evaluation draws its random numbers from :func:`block_generator`, a
generator seeded from (run seed, index of the first sample of the block), so a sample's random
stream depends on where it is in the test split, not on which process evaluates it or in what
order. One process and N shards therefore give identical per-sample results and metrics.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.errors import UsageError
from pipeline.results import KERNEL_VARIABLES


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # float32 | bf16 | fp16 (training autocast only)
    threads: int
    processes: int
    workers: int = 0  # training data-loader worker processes per training process

    def autocast(self):
        """The training forward's autocast context: a no-op in float32."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def record(self) -> dict:
        """What shaped the figures besides params and seed: the thread count changes the order of
        floating-point reductions (a 1-thread and a 2-thread run train numerically different models),
        and the CPU kernel set and torch build change them too."""
        return {"device": str(self.device), "threads": self.threads, "processes": self.processes,
                "precision": self.precision, "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu_identity(),
                "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                "environment": kernel_environment()}

    def grad_scaler(self):
        """float16 gradients underflow without loss scaling; bf16 and float32 need none."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None


# Variables that change which kernels or thread pools compute, hence the figures, without changing
# what torch reports: MKL_CBWR=AVX2 or ONEDNN_MAX_CPU_ISA=AVX2 each trained another model from the
# default params on one processor (bench/results/runtime.md).
def kernel_environment() -> dict[str, str]:
    """Those of :data:`KERNEL_VARIABLES` this process has set (none: an empty mapping)."""
    return {name: os.environ[name] for name in KERNEL_VARIABLES if os.environ.get(name)}


@functools.cache
def cpu_identity() -> str:
    """The processor, as precisely as the OS tells: vendor, family, model and stepping, its name, and a
    digest of its instruction-set flags. torch's kernel set (AVX2, AVX512) is too coarse to name the
    figures' machine: MKL's GEMM picks its code path and blocking by processor, and the default params
    trained a different model on two machines that both report AVX512 (bench/results/runtime.md)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if not key:
                break  # the first processor is enough: they are alike
            fields.setdefault(key, value.strip())
    except OSError:
        pass
    if not fields:
        return f"{platform.machine()} {platform.processor()}".strip()
    identity = (f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')} "
                f"stepping {fields.get('stepping', '?')} ({fields.get('model name', '?')})")
    flags = " ".join(sorted(fields.get("flags", "").split()))
    return f"{identity}, flags {hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a named device this machine lacks is refused."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"runtime.device = {name!r}: no CUDA device on this machine (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"runtime.device = {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"runtime.device = {name!r}: MPS is not available on this machine (use auto or cpu)")
    return device


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(processes: int) -> int:
    """The cores (or OMP_NUM_THREADS, when set) shared out among the processes."""
    available = int(os.environ.get("OMP_NUM_THREADS") or 0) or cores()
    return max(1, available // max(1, processes))


def start(cfg, processes: int | None = None) -> Runtime:
    """Resolve `runtime` params for this process and apply its thread count."""
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device.type == "cpu":
        raise UsageError("runtime.precision = 'fp16': float16 autocast needs a GPU; use bf16 or float32 on cpu")
    processes = cfg.processes if processes is None else processes
    threads = cfg.threads or default_threads(processes)
    torch.set_num_threads(threads)
    return Runtime(device, cfg.precision, threads, processes, cfg.workers)


def block_generator(seed: int, first_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for the block of samples starting at `first_index`: a function of the run seed
    and the sample index only (SeedSequence mixes the pair, so neighbouring blocks do not share streams)."""
    state = int(np.random.SeedSequence([seed, first_index]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.Generator(device=device).manual_seed(state)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of data-parallel rank `rank` (a 32-bit value, as numpy's seed requires)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def shard_ranges(n: int, shards: int, block: int) -> list[tuple[int, int]]:
    """`shards` contiguous [start, stop) ranges covering 0..n, cut on multiples of `block` so every
    shard sees the very batches one process would; refused when there are fewer blocks than shards."""
    blocks = -(-n // block)
    if shards > blocks:
        raise UsageError(f"runtime.processes = {shards}: more processes than batches of samples ({blocks} batch(es) "
                         f"of {block} for {n} sample(s)); lower runtime.processes")
    cuts = [round(i * blocks / shards) * block for i in range(shards + 1)]
    return [(cuts[i], min(cuts[i + 1], n)) for i in range(shards)]


def release_freed_memory() -> None:
    """Hand memory freed by the last batch back to the operating system (Linux/glibc; a no-op
    elsewhere). glibc raises its mmap threshold after large blocks are freed, so a batch's freed
    activations stay in the heap and the resident size grew with every batch: the attack stage on
    10,000 MNIST images peaked 228 MiB above 2,000; trimmed after each batch, 70 MiB (its inputs and
    its outputs), at no measurable cost (bench/memory_scaling.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def run_shards(task: Callable, shard_args: Sequence[tuple], threads: int) -> list:
    """Run `task(*args)` for each shard and return the results in shard order: the first shard in
    this process (which would otherwise wait idle, while the others start), every other in its own
    spawned process. A shard whose process dies (killed, out of memory) is re-run alone, once."""
    if len(shard_args) == 1:
        return [task(*shard_args[0])]
    context = torch.multiprocessing.get_context("spawn")
    pools = [ProcessPoolExecutor(1, mp_context=context, initializer=_worker_init, initargs=(threads,))
             for _ in shard_args[1:]]
    try:
        futures = [pool.submit(task, *args) for pool, args in zip(pools, shard_args[1:])]
        results = [_run_here(task, shard_args[0], threads)]
        for args, future in zip(shard_args[1:], futures):
            try:
                results.append(future.result())
            except BrokenProcessPool:
                with ProcessPoolExecutor(1, mp_context=context, initializer=_worker_init,
                                         initargs=(threads,)) as retry:
                    results.append(retry.submit(task, *args).result())
        return results
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)


def _run_here(task: Callable, args: tuple, threads: int):
    """One shard in this process, under the settings a worker process has (_worker_init)."""
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    _worker_init(threads)
    try:
        return task(*args)
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job: torch's DistributedDataParallel for the training step,
    and the few collectives the loop needs to take rank 0's decisions."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def data_parallel(self, step: torch.nn.Module) -> torch.nn.Module:
        """`step` (pipeline.training.loop.TrainingStep: forward computes the whole objective) under
        DistributedDataParallel: its construction gives every rank rank 0's weights and buffers, and
        each backward averages the gradients over the ranks. The inputs are on the model's device
        already (device_ids=None: DDP moves nothing)."""
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(step, device_ids=None)

    def from_main(self, value):
        """Rank 0's `value` on every rank (so that every rank takes the same decisions)."""
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        torch.distributed.barrier()


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(runtime: Runtime) -> tuple[Distributed | None, Runtime]:
    """Join the torchrun job this process was started in (gloo on CPU, nccl on CUDA); outside one,
    (None, runtime). On CUDA each rank takes the device of its local rank."""
    if not under_torchrun():
        return None, runtime
    rank, world, local = (int(os.environ[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = runtime.device
    if device.type == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world, local), replace(runtime, device=device, processes=world)


class ShardedShuffle:
    """The epoch's training order of one rank: DistributedSampler's shuffle (seeded from the run seed,
    so every rank draws the same permutation) split across ranks; the same number of batches on each."""

    def __init__(self, n: int, distributed: Distributed, seed: int):
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(range(n), num_replicas=distributed.world, rank=distributed.rank,
                                          shuffle=True, seed=seed)

    def __len__(self) -> int:
        return self.sampler.num_samples

    def order(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        self.sampler.set_epoch(epoch)
        return torch.tensor(list(self.sampler), dtype=torch.int64)


def torchrun_command(processes: int, argv: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run` (torchrun) on this machine, re-running this CLI command."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "pipeline", *argv]
