"""The export's process group under torchrun, and the protocol that fails every rank together or none.

``joined(device)`` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``): without it (or with ``WORLD_SIZE`` 1) it yields None and nothing changes. Otherwise it joins
(or reuses) the default process group: gloo on the CPU, NCCL with ``--device cuda`` (one GPU per local rank).

Failures: every rank runs its work inside ``run_everywhere``, which exchanges each rank's outcome before any
result moves, so a rank's error fails every rank (all exit non-zero, naming that rank and its error) and nothing
is gathered or written. Work that steps in lockstep with the other ranks (a shared model) calls
``Lockstep.check`` at each batch, so an image one rank cannot read stops every rank at that batch instead of
leaving them waiting in a collective. An error inside a synchronised step itself (not a read) is seen by the
others only at the process group's timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import traceback
from typing import Any, Callable, Iterator, Mapping, TypeVar

import attrs
import torch
import torch.distributed as dist

T = TypeVar("T")


class DistributedError(Exception):
    """torchrun's environment is inconsistent or the process group cannot be joined."""


class PeerFailed(Exception):
    """Another rank failed (seen at a lockstep check); its own error is reported by ``run_everywhere``."""


class RankFailed(Exception):
    """A rank's error, raised on every rank: its ``rank`` (None: every rank failed alike), exit ``code`` and the
    line the command prints for it (prefixed with the rank); ``shown`` on the rank that prints it."""

    def __init__(self, rank: int | None, world: int, code: int, line: str, shown: bool) -> None:
        where = "" if rank is None else f"error: rank {rank} of {world} failed: "
        super().__init__(line if rank is None else where + line.removeprefix("error: "))
        self.rank, self.code, self.shown = rank, code, shown


@attrs.frozen
class World:
    """This process's place in the process group: its rank, the world size, its local rank, backend, device."""

    rank: int
    size: int
    local_rank: int
    backend: str
    device: str


def _int(environ: Mapping[str, str], name: str, default: str | None = None) -> int:
    text = environ.get(name, default)
    try:
        return int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DistributedError(f"torchrun's {name} must be an integer, got {text!r}") from None


def torchrun_env(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables; None without them or for a world of one.

    Args:
      environ: the environment read.
    Returns:
      ``(rank, world_size, local_rank)`` or None.
    Raises:
      DistributedError: the variables are missing or inconsistent."""
    if environ.get("WORLD_SIZE") in (None, "", "1"):
        return None
    size, rank = _int(environ, "WORLD_SIZE"), _int(environ, "RANK")
    local = _int(environ, "LOCAL_RANK", str(rank))
    if size < 1 or not 0 <= rank < size:
        raise DistributedError(f"torchrun's RANK {rank} is not in a world of WORLD_SIZE {size}")
    if local < 0:
        raise DistributedError(f"torchrun's LOCAL_RANK must be >= 0, got {local}")
    return rank, size, local


def _device(device: str, local: int) -> tuple[str, str]:
    """(backend, this rank's device): NCCL on the local rank's GPU for a CUDA device, else gloo on the CPU."""
    if not device.startswith("cuda"):
        return "gloo", device
    if not torch.cuda.is_available() or local >= torch.cuda.device_count():
        raise DistributedError(f"--device {device} under torchrun needs a GPU for LOCAL_RANK {local}")
    torch.cuda.set_device(local)
    return "nccl", f"cuda:{local}"


DIST_TIMEOUT = 60.0
"""Seconds a rank waits for its peers to join (the rendezvous) before it gives up with a line saying what it
waited for (``--dist-timeout``): torch's own wait is 30 minutes of silence."""


def _waited_for(environ: Mapping[str, str], rank: int, size: int, timeout: float) -> str:
    where = f"{environ.get('MASTER_ADDR', '?')}:{environ.get('MASTER_PORT', '?')}"
    return (
        f"rank {rank} of {size} waited {timeout:g} s for the other ranks of the process group at {where} "
        "(MASTER_ADDR:MASTER_PORT) and none came; start every rank (torchrun --nproc_per_node N), or give them "
        "longer with --dist-timeout SECONDS"
    )


def _rendezvous(environ: Mapping[str, str], rank: int, size: int, timeout: float) -> dist.Store:
    """The TCP store of ``MASTER_ADDR:MASTER_PORT`` with every rank connected, waiting ``timeout`` seconds at
    most (rank 0 hosts it unless torchrun's agent does); then the store gets torch's usual timeout, so that the
    collectives of a long run are not cut short. A rank that waited in vain raises DistributedError saying what
    it waited for."""
    host, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    if not host or not port:
        raise DistributedError(f"torchrun's MASTER_ADDR and MASTER_PORT are needed for rank {rank} of {size}")
    hosts = rank == 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    try:
        store = dist.TCPStore(
            host, _int(environ, "MASTER_PORT"), size, is_master=hosts, timeout=datetime.timedelta(seconds=timeout)
        )
    except RuntimeError as e:
        text = str(e).lower()
        if "time" not in text:
            raise
        raise DistributedError(_waited_for(environ, rank, size, timeout)) from None
    store.set_timeout(STORE_TIMEOUT)
    return store


STORE_TIMEOUT = datetime.timedelta(minutes=30)
"""The store's timeout once every rank joined (torch's default for the process group)."""


@contextlib.contextmanager
def joined(
    device: str, environ: Mapping[str, str] = os.environ, timeout: float = DIST_TIMEOUT
) -> Iterator[World | None]:
    """This process's ``World`` in the default process group (joined here and left at the end, or reused when
    already initialised); None outside torchrun.

    Args:
      device: the device asked for (a CUDA rank uses its local GPU).
      environ: the environment read.
      timeout: seconds to wait for the other ranks to join (``DIST_TIMEOUT``).
    Yields:
      The ``World``, or None."""
    env = torchrun_env(environ)
    if env is None:
        yield None
        return
    rank, size, local = env
    backend, device = _device(device, local)
    owner = not dist.is_initialized()
    if owner:
        try:
            store = _rendezvous(environ, rank, size, timeout)
            dist.init_process_group(backend, rank=rank, world_size=size, store=store)
        except (ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(f"cannot join the process group of rank {rank} of {size}: {first}") from None
    elif (dist.get_rank(), dist.get_world_size()) != (rank, size):
        raise DistributedError("the initialised process group is not the one RANK and WORLD_SIZE describe")
    try:
        yield World(rank, size, local, dist.get_backend(), device)
    finally:
        if owner:
            dist.destroy_process_group()


def _flag_device(world: World) -> str:
    return world.device if world.backend == "nccl" else "cpu"


class Lockstep:
    """Failure checks at points every rank reaches together (one all-reduce of a flag each)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.announced = False
        """Whether a failure has been shared at a check (then ``run_everywhere`` makes no final check)."""

    def any_failed(self, failed: bool) -> bool:
        """Share whether this rank failed; True when any rank did.

        Args:
          failed: whether this rank failed.
        Returns:
          Whether any rank failed."""
        flag = torch.tensor([int(failed)], device=_flag_device(self.world))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def check(self, failed: bool = False) -> None:
        """A lockstep point: raises ``PeerFailed`` on the healthy ranks when a rank says it ``failed``.

        Args:
          failed: whether this rank failed (it raises its own error after the check).
        Raises:
          PeerFailed: another rank failed."""
        if self.any_failed(failed):
            self.announced = True
            if not failed:
                raise PeerFailed("another rank failed")


Describe = Callable[[Exception], tuple[int, "str | None"]]
"""``describe(error) -> (exit code, the line printed for it)``: how the command reports an error (None: an error
it does not expect)."""


def _outcome(error: Exception, describe: Describe) -> tuple[int, str]:
    """The exit code and line of this rank's own error; an unexpected one also prints its traceback here."""
    code, line = describe(error)
    if line is None:
        traceback.print_exception(error)
        line = f"error: {type(error).__name__}: {error}"
    return code, line


def run_everywhere(world: World, work: Callable[[Lockstep], T], describe: Describe) -> T:
    """``work(lockstep)`` on this rank, then every rank's outcome shared: if any rank failed, ``RankFailed`` with the
    first failed rank's error is raised on every rank (shown by rank 0 only; without a rank when all failed
    alike). ``describe`` turns an error into its exit code and line.

    Args:
      world: this rank's ``World``.
      work: the work, given the ranks' ``Lockstep``.
      describe: an error -> (exit code, line).
    Returns:
      ``work``'s result on this rank when no rank failed.
    Raises:
      RankFailed: a rank failed."""
    lockstep = Lockstep(world)
    result, mine, peer = None, None, False
    try:
        result = work(lockstep)
    except PeerFailed:
        peer = True
    except Exception as e:  # noqa: BLE001 - every rank's error is reported, by rank, below
        mine = _outcome(e, describe)
    if not lockstep.announced:
        lockstep.any_failed(mine is not None)
    outcomes: list = [None] * world.size
    dist.all_gather_object(outcomes, mine)
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if not failed and not peer:
        return result  # type: ignore[return-value]
    rank, (code, line) = failed[0] if failed else (world.rank, (1, "error: stopped: another rank failed"))
    alike = len(failed) == world.size and len(set(outcomes)) == 1
    raise RankFailed(None if alike else rank, world.size, code, line, shown=world.rank == 0)


def gather_to_root(world: World, value: Any) -> list | None:
    """Every rank's ``value``, in rank order, on rank 0 (None elsewhere).

    Args:
      world: this rank's ``World``.
      value: any picklable value.
    Returns:
      The list of every rank's value on rank 0, None on the others."""
    out = [None] * world.size if world.rank == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def commit(world: World, write: Callable[[], None], describe: Describe) -> None:
    """Rank 0 runs ``write``; every rank learns whether it succeeded (the others raise ``RankFailed`` if not).

    Args:
      world: this rank's ``World``.
      write: the writing, run on rank 0 only.
      describe: an error -> (exit code, line).
    Raises:
      RankFailed: the write failed (on every rank)."""
    error, outcome = None, None
    if world.rank == 0:
        try:
            write()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error, outcome = e, describe(e)
    shared = [outcome]
    dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    if shared[0] is not None:
        code, line = shared[0]
        raise RankFailed(0, world.size, code, line or "error: rank 0 could not write", shown=False)
