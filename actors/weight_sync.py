"""Weight sync transport, learner rank 0 → every rollout engine: buckets, the object-store form, the collective group.

Two transports carry the same buckets (`rollout.weight_sync`, orchestrator/config.py RolloutConfig):
- `object_store`: learner rank 0 returns its buckets as numpy arrays (`to_transport`); Ray places them in its object
  store and every engine reads them zero-copy through its own Ray call.
- `collective`: a process group of its own (`WeightGroup`) between learner rank 0 (rank 0) and every engine's vLLM
  workers (ranks 1..). It is built from a TCPStore that learner rank 0 hosts on a port the OS picks, with torch's
  ProcessGroupGloo (CPU) or ProcessGroupNCCL (GPU) constructed directly, never as a default group: DeepSpeed's group
  on the learners and vLLM's on the engines are not touched (the standalone-group pattern of OpenRLHF and TRL). A
  sync is one header (the version and the bucket layout, JSON) then one broadcast per bucket. Both sides keep two
  bucket buffers: the sender packs bucket k+1 while bucket k is on the wire, the receivers post the receive of bucket
  k+1 before loading bucket k into vLLM.

Buckets end only at layer edges (`bucket_by_layer`): vLLM's layer-wise reload and the direct load both process a
layer once its tensors have arrived, so a layer must never straddle two buckets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

_LAYER_INDEX = re.compile(r"^(.*?\.layers\.\d+)\.")
_ALIGN = 64  # bytes: every tensor of a bucket buffer starts here, so its dtype view is aligned


def layer_key(name: str) -> str:
    """The unit a weight update must not split: a decoder layer (`...layers.N`), else the top-level module.

    vLLM's layer-wise reload fuses checkpoint tensors into kernel tensors (q/k/v → qkv_proj, gate/up →
    gate_up_proj) and processes a layer as soon as one reload call ends; a layer whose tensors straddle two
    calls is processed half-loaded and its other part is garbage. So buckets end only between layers.
    """
    m = _LAYER_INDEX.match(name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


def bucket_by_layer(named_tensors: Iterable, bucket_mb: float) -> list[list[tuple]]:
    """Group (name, tensor) pairs into buckets of about `bucket_mb`, closing a bucket only at a layer edge.
    Tensors may be on the meta device (only their size counts)."""
    limit = int(bucket_mb * 2**20)
    buckets: list[list[tuple]] = []
    current: list[tuple] = []
    size, key = 0, None
    for name, tensor in named_tensors:
        k = layer_key(name)
        if current and k != key and size >= limit:
            buckets.append(current)
            current, size = [], 0
        current.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        key = k
    if current:
        buckets.append(current)
    return buckets


# ------------------------------------------------------------------------------------------ object store


def to_transport(tensor):
    """A tensor as a numpy array Ray can place in its object store without pickling (zero-copy on read).

    numpy has no bfloat16: 16-bit float tensors travel as int16 views and carry their dtype name."""
    import torch

    t = tensor.detach().cpu().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy(), str(t.dtype).removeprefix("torch.")
    return t.numpy(), None


def from_transport(array, dtype_name):
    import warnings

    import torch

    with warnings.catch_warnings():  # arrays from the object store are read-only; loading copies them anyway
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(array)
    return t.view(getattr(torch, dtype_name)) if dtype_name else t


# -------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in a bucket buffer: `offset` bytes in, `dtype[shape]`."""

    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        import torch

        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


def plan_buckets(named_meta: Iterable[tuple[str, object]], bucket_mb: float) -> list[list[Slot]]:
    """The bucket layout of a sync: (name, tensor or meta tensor) in export order → buckets of `Slot`s, ending at
    layer edges, each tensor at a 64-byte aligned offset of its bucket's buffer."""
    plan = []
    for bucket in bucket_by_layer(named_meta, bucket_mb):
        slots, offset = [], 0
        for name, t in bucket:
            slot = Slot(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset)
            slots.append(slot)
            offset += -(-slot.nbytes // _ALIGN) * _ALIGN
        plan.append(slots)
    return plan


def bucket_nbytes(bucket: list[Slot]) -> int:
    return bucket[-1].offset + bucket[-1].nbytes


def slot_view(buffer, slot: Slot):
    """`slot`'s tensor as a view of a uint8[N] bucket buffer, dtype[shape]."""
    import torch

    return buffer[slot.offset : slot.offset + slot.nbytes].view(getattr(torch, slot.dtype)).view(slot.shape)


# ---------------------------------------------------------------------------------------- collective


def host_store(world_size: int, timeout_s: float):
    """The rendezvous store of a new weight group, hosted here on a port the OS picks (`store.port`)."""
    import torch.distributed as dist

    return dist.TCPStore(
        "0.0.0.0", 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )


def join_store(host: str, port: int, world_size: int, timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))


class WeightGroup:
    """One rank of a weight group: rank 0 sends (`send`), every other rank receives (`receive`).

    Constructing it is a rendezvous: it returns once all `world_size` ranks have joined `store`. Tensors live on
    `device` (gloo for CPU, NCCL for CUDA)."""

    def __init__(self, store, rank: int, world_size: int, device, timeout_s: float):
        import torch
        import torch.distributed as dist

        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.store = store  # the group keeps using it (and rank 0 hosts it)
        timeout = timedelta(seconds=timeout_s)
        if self.device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        self.buffers: list = [None, None]  # two uint8 bucket buffers, grown on demand, kept across syncs

    # ------------------------------------------------------------------------------------------ sender

    def send(self, version: int, plan: list[list[Slot]], tensors: Iterator[tuple[str, object]]) -> dict:
        """Broadcast the header, then every bucket of `plan`, filled from `tensors` ((name, tensor) in plan order).
        On any failure the group is aborted (every receiver's pending call fails too) and the error raised."""
        import time

        import torch

        pending: list = [None, None]
        try:
            header = json.dumps(
                {"version": version, "buckets": [[[s.name, s.dtype, s.shape, s.offset] for s in b] for b in plan]}
            ).encode()
            self._broadcast(torch.tensor([version, len(header)], dtype=torch.int64, device=self.device)).wait()
            self._broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device)).wait()
            pack_s = 0.0
            for k, bucket in enumerate(plan):
                if pending[k % 2] is not None:
                    pending[k % 2].wait()
                start = time.perf_counter()
                buffer = self._bucket_buffer(k % 2, bucket)
                for slot in bucket:
                    name, tensor = next(tensors)
                    if name != slot.name:
                        raise RuntimeError(f"weight sync: tensor {name!r} arrived where the plan has {slot.name!r}")
                    slot_view(buffer, slot).copy_(tensor)
                pack_s += time.perf_counter() - start
                pending[k % 2] = self._broadcast(buffer)
            for work in pending:
                if work is not None:
                    work.wait()
        except BaseException:
            pending.clear()  # a pending op holds the group's connections open
            self.abort()
            raise
        return {"pack_s": pack_s, "bytes": sum(bucket_nbytes(b) for b in plan)}

    # ---------------------------------------------------------------------------------------- receiver

    def receive(self, version: int) -> Iterator[list[tuple[str, object]]]:
        """Yield the buckets of the sync at `version` as [(name, view of the bucket buffer), ...]; a view is valid
        until the next bucket is asked for. A different version from the sender is an error."""
        import torch

        pending: list = [None, None]
        try:
            head = torch.empty(2, dtype=torch.int64, device=self.device)
            self._broadcast(head).wait()
            sent_version, header_len = head.tolist()
            raw = torch.empty(header_len, dtype=torch.uint8, device=self.device)
            self._broadcast(raw).wait()
            header = json.loads(raw.cpu().numpy().tobytes())
            if sent_version != version:
                raise RuntimeError(f"weight sync: the learner sent weight version {sent_version}, expected {version}")
            plan = [[Slot(n, d, tuple(s), o) for n, d, s, o in bucket] for bucket in header["buckets"]]
            pending[0] = self._broadcast(self._bucket_buffer(0, plan[0]))
            for k, bucket in enumerate(plan):
                pending[k % 2].wait()
                if k + 1 < len(plan):  # on the wire while bucket k is loaded
                    pending[(k + 1) % 2] = self._broadcast(self._bucket_buffer((k + 1) % 2, plan[k + 1]))
                yield [(slot.name, slot_view(self.buffers[k % 2], slot)) for slot in bucket]
        except BaseException:
            pending.clear()
            self.abort()
            raise

    # ------------------------------------------------------------------------------------------ common

    def _broadcast(self, tensor):
        import torch.distributed as dist

        if self.pg is None:
            raise RuntimeError("weight sync: this weight group was aborted; a new one must be built")

        options = dist.BroadcastOptions()
        options.rootRank = 0
        return self.pg.broadcast([tensor], options)

    def _bucket_buffer(self, i: int, bucket: list[Slot]):
        """Buffer `i` cut to `bucket`'s size, uint8[nbytes] (grown when a bucket needs more)."""
        import torch

        nbytes = bucket_nbytes(bucket)
        if self.buffers[i] is None or self.buffers[i].numel() < nbytes:
            self.buffers[i] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self.buffers[i][:nbytes]

    def abort(self) -> None:
        """Close the group's connections now, so that peers blocked in one of its collectives fail instead of
        waiting for the timeout. Only dropping the process group closes them (gloo's `abort()` leaves peers
        waiting); its destructor first lets this rank's own pending ops finish, which the live peers complete.
        The group is unusable afterwards: a new one is built to sync again."""
        self.pg = None
