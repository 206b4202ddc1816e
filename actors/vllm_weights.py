"""Weights into a running vLLM engine: the worker extension every rollout engine is built with.

`WeightSyncExtension` is mixed into vLLM's worker class (`worker_extension_cls`); the rollout actor reaches it through
`collective_rpc`. It takes buckets [(checkpoint name, tensor), ...] from either transport (actors/weight_sync.py):
as an argument (object store) or from its weight group (collective), and loads each bucket in one of two ways:

- **Direct** (`DirectLoader`), where the model allows it (a model class whose loading is plain copies, tensor
  parallel size 1, unquantized linear layers): every tensor is copied straight into its vLLM parameter (q/k/v and
  gate/up as row blocks of the fused qkv_proj / gate_up_proj). On CPU vLLM keeps no usable `.weight` for a linear
  layer: it packs the weight into a oneDNN handle of its own (a blocked layout in memory that no Python code can
  reach) and leaves an empty `[0]` parameter. There the layer's fused weight is assembled in a staging buffer (one
  bucket's worth, reused) and packed again by the layer's own `quant_method.process_weights_after_loading`, exactly
  as vLLM packs it at start-up. The output head keeps a packed copy next to its weight and is re-packed the same way,
  also when it is tied to the embedding and only the embedding arrived. The pack is the floor of a CPU sync: oneDNN
  reads the weight transposed, ~2 GB/s on one thread and ~4-5 GB/s on the engine's two (`rollout.omp_threads`;
  about 3x a copy of the same bytes); the layer-wise reload pays ~50 % more on top, re-creating every layer. vLLM's
  plain `F.linear` path would need no pack, but the engine generates ~19 % slower on it (bench/weight_sync.py's row
  in the README). On GPU the parameters are plain tensors: copying is all.
- **Layer-wise reload** (vLLM's `reload_weights`), for anything else: a name the direct loader cannot place, tensor
  parallelism, quantized layers. It re-creates each layer, loads it through vLLM's weight loaders and re-packs it;
  an output head tied to the embedding is left stale by it and re-packed here afterwards.

Both give the engine the same packed weights from the same tensors (tested against each other and against a
transformers forward pass on a tied-embedding model).
"""

from __future__ import annotations

import time

import torch

from actors.weight_sync import WeightGroup, from_transport, join_store

# vLLM model classes whose own `load_weights` only copies checkpoint tensors into place (q/k/v and gate/up as row
# blocks of the fused layers, nothing transposed or permuted), so that the direct load does what it does. Qwen2 is
# tested here (tests/test_weight_sync.py, tests/test_rollout.py); Qwen3 and Llama load through the same
# AutoWeightsLoader path with the same stacked-parameter table (vLLM 0.32). Any other class takes the layer-wise
# reload: a loader that transforms a tensor of unchanged shape (GPT-2's transposed Conv1D weights, say) would
# otherwise be copied wrong without any error.
DIRECT_LOAD_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM")


class DirectLoader:
    """Copies checkpoint-format tensors into a vLLM model's parameters in place (tensor parallel size 1).

    `targets(bucket)` says where each name goes, or None when any of them cannot be placed (the caller then uses
    the layer-wise reload); `load(bucket)` writes them and re-packs what vLLM keeps packed on CPU."""

    def __init__(self, model: torch.nn.Module):
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        self.supported = type(model).__name__ in DIRECT_LOAD_ARCHITECTURES
        self.modules = dict(model.named_modules())
        # q_proj → (qkv_proj, 0), k_proj → (qkv_proj, 1), ...: the model's own table of fused layers
        fused = getattr(model, "packed_modules_mapping", None) or {}
        self.part_of = {part: (whole, i) for whole, parts in fused.items() for i, part in enumerate(parts)}
        # (module, parameter name) → every module holding that parameter: a head tied to the embedding holds its weight
        holders: dict[int, list[str]] = {}
        for mod_name, module in self.modules.items():
            for p in module._parameters.values():
                if p is not None:
                    holders.setdefault(id(p), []).append(mod_name)
        self.holders = {
            (mod_name, param_name): holders[id(p)]
            for mod_name, module in self.modules.items()
            for param_name, p in module._parameters.items()
            if p is not None
        }
        self.linear = {
            n
            for n, m in self.modules.items()
            if isinstance(m, LinearBase) and isinstance(m.quant_method, UnquantizedLinearMethod) and m.tp_size == 1
        }
        self.staging: torch.Tensor | None = None  # flat; the packed layers of one bucket are assembled in it

    # ------------------------------------------------------------------------------------------ placing

    def target(self, name: str, tensor) -> tuple[str, str, int, int] | None:
        """(module name, parameter name, first row, rows) that `name` is written to, or None if it has no place."""
        if tensor.dim() == 0:
            return None
        mod_name, _, param_name = name.rpartition(".")
        parent, _, leaf = mod_name.rpartition(".")
        if leaf in self.part_of:
            whole, index = self.part_of[leaf]
            mod_name = f"{parent}.{whole}" if parent else whole
            if mod_name not in self.linear:
                return None
            sizes = self.modules[mod_name].output_partition_sizes
            if len(sizes) <= index or tensor.shape[0] != sizes[index]:
                return None
            first, rows = sum(sizes[:index]), sizes[index]
        else:
            first, rows = 0, tensor.shape[0]
        module = self.modules.get(mod_name)
        if module is None or module._parameters.get(param_name) is None:
            return None
        shape = self.full_shape(mod_name, param_name)
        # rows beyond the checkpoint's (a vocabulary padded by vLLM) keep what vLLM's first load put there (zeros)
        if tuple(tensor.shape[1:]) != tuple(shape[1:]) or first + rows > shape[0]:
            return None
        return mod_name, param_name, first, rows

    def targets(self, bucket) -> list | None:
        if not self.supported:
            return None
        found = [self.target(name, tensor) for name, tensor in bucket]
        if any(t is None for t in found):
            return None
        packed = {t[0] for t in found if self.is_packed(t[0], t[1])}
        for mod_name in packed:  # a packed layer is re-packed from its whole weight: every part must be here
            covered = sum(rows for m, p, _, rows in found if m == mod_name and p == "weight")
            if covered != self.full_shape(mod_name, "weight")[0]:
                raise ValueError(
                    f"weight sync: bucket holds part of {mod_name}.weight only ({covered} rows); "
                    "buckets must end at layer edges (bucket_by_layer)"
                )
        return found

    def is_packed(self, mod_name: str, param_name: str) -> bool:
        """A CPU linear layer whose weight vLLM moved into a packed handle, leaving an empty parameter."""
        return param_name == "weight" and mod_name in self.linear and self.modules[mod_name].weight.numel() == 0

    def full_shape(self, mod_name: str, param_name: str) -> tuple[int, ...]:
        module = self.modules[mod_name]
        if self.is_packed(mod_name, param_name):
            return sum(module.output_partition_sizes), getattr(module, "input_size_per_partition", module.input_size)
        return tuple(getattr(module, param_name).shape)

    # ------------------------------------------------------------------------------------------ loading

    @torch.no_grad()
    def load(self, bucket, found) -> None:
        staged = self.stage([m for m, p, _, _ in found if self.is_packed(m, p)])
        touched: set[str] = set()
        for (_, tensor), (mod_name, param_name, first, rows) in zip(bucket, found):
            param = getattr(self.modules[mod_name], param_name)
            dest = staged[mod_name] if param_name == "weight" and mod_name in staged else param.data
            dest[first : first + rows].copy_(tensor)
            touched.update(self.holders[mod_name, param_name])
        for mod_name, weight in staged.items():
            self.modules[mod_name].weight = torch.nn.Parameter(weight, requires_grad=False)
        for mod_name in touched:
            module = self.modules[mod_name]
            # Packed on CPU at start-up: pack the new weights the same way. An embedding that is not also the output
            # head never reads its packed copy (a tied head holds the same parameter and is re-packed itself).
            if hasattr(module, "cpu_linear") and not self.embedding_only(module):
                module.quant_method.process_weights_after_loading(module)
            if mod_name in staged and module.weight.data_ptr() == staged[mod_name].data_ptr():
                # vLLM kept the staged tensor as the weight (its plain-torch fallback): the next bucket reuses the
                # staging buffer, so the layer gets a copy of its own
                module.weight = torch.nn.Parameter(staged[mod_name].clone(), requires_grad=False)

    @staticmethod
    def embedding_only(module) -> bool:
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

        return isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead)

    def stage(self, packed: list[str]) -> dict[str, torch.Tensor]:
        """A view of the staging buffer per packed layer of one bucket, dtype[rows, cols] in the layer's dtype."""
        shapes = {m: self.full_shape(m, "weight") for m in dict.fromkeys(packed)}
        dtypes = {m: self.modules[m].weight.dtype for m in shapes}
        spans, total = {}, 0
        for m, (rows, cols) in shapes.items():
            nbytes = rows * cols * dtypes[m].itemsize
            spans[m] = (total, nbytes)
            total += -(-nbytes // 64) * 64
        if self.staging is None or self.staging.numel() < total:
            self.staging = torch.empty(total, dtype=torch.uint8)
        return {m: self.staging[o : o + n].view(dtypes[m]).view(shapes[m]) for m, (o, n) in spans.items()}


class WeightSyncExtension:
    """Mixed into vLLM's worker class. Method names must not clash with the Worker's own."""

    rlextra_direct = True  # False: every bucket through vLLM's layer-wise reload (tests compare the two)

    def rlextra_load_weights(self, named_tensors) -> int:
        """Load a bucket [(name, tensor or transport array), ...] into the running model; returns how many."""
        weights = [(n, from_transport(*t) if isinstance(t, tuple) else t) for n, t in named_tensors]
        self.rlextra_load_bucket(weights)
        return len(weights)

    def rlextra_load_bucket(self, weights: list) -> str:
        """Directly where every tensor has a place, else through the layer-wise reload. Returns which."""
        loader = self.rlextra_loader()
        found = loader.targets(weights) if self.rlextra_direct else None
        if found is not None:
            loader.load(weights, found)
            return "direct"
        with torch.no_grad():
            self.reload_weights(weights_iterator=iter(weights))
            self.rlextra_refresh_tied_heads()
        return "reload"

    def rlextra_loader(self) -> DirectLoader:
        if getattr(self, "_rlextra_loader", None) is None:
            self._rlextra_loader = DirectLoader(self.model_runner.get_model())
        return self._rlextra_loader

    def rlextra_set_direct(self, direct: bool) -> None:
        self.rlextra_direct = bool(direct)

    def rlextra_refresh_tied_heads(self) -> None:
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        model = self.model_runner.get_model()
        for module in model.modules():
            if isinstance(module, ParallelLMHead) and hasattr(module, "quant_method"):
                module.quant_method.process_weights_after_loading(module)

    # ------------------------------------------------------------------------------------------ collective

    def rlextra_join_weight_group(self, host: str, port: int, world_size: int, first_rank: int, timeout_s: float):
        """Join a new weight group as rank `first_rank` + this worker's rank (dropping the previous group)."""
        self.rlextra_leave_weight_group()
        rank = first_rank + self.rank
        store = join_store(host, port, world_size, timeout_s)
        self._rlextra_group = WeightGroup(store, rank, world_size, self.device, timeout_s)
        return rank

    def rlextra_leave_weight_group(self) -> None:
        group = getattr(self, "_rlextra_group", None)
        if group is not None:
            group.abort()
        self._rlextra_group = None

    def rlextra_receive_weights(self, version: int) -> dict:
        """Receive the sync at `version` from the weight group and load it bucket by bucket."""
        group = getattr(self, "_rlextra_group", None)
        if group is None:
            raise RuntimeError("weight sync: this engine has no weight group (join_weight_group first)")
        start = time.perf_counter()
        load_s, tensors, ways = 0.0, 0, set()
        try:
            for bucket in group.receive(version):
                t = time.perf_counter()
                ways.add(self.rlextra_load_bucket(bucket))
                load_s += time.perf_counter() - t
                tensors += len(bucket)
        except BaseException:
            self._rlextra_group = None  # aborted by receive(): a new group is needed
            raise
        return {"tensors": tensors, "load_s": load_s, "total_s": time.perf_counter() - start, "ways": sorted(ways)}

    def rlextra_state_dict(self) -> dict:
        """Copies of the model's parameters (for tests): name -> tensor on CPU."""
        model = self.model_runner.get_model()
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
