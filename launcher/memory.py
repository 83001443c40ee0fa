"""The memory model: each rank's peak bytes during a training step, per backend, before anything runs.

Parts and how they are known (README, "Memory"):
- parameters, gradients, optimizer state: from the model's shapes and dtypes, per backend's sharding rule
  (exact for DDP and FSDP2; ZeRO rows estimated: DeepSpeed's own flat buffers are not modelled in detail).
- activations (with logits and loss): one micro-step (forward, the loop's loss, backward) traced on the meta
  device with PyTorch's MemTracker, at micro-batch 1 and 2 (every activation scales with the micro-batch, so two
  traces give the line for any micro-batch). The model's own code runs: its attention, dtype, gradient
  checkpointing, LoRA and frozen layers (which save fewer tensors) are all in the trace. The meta device has no
  fused attention kernel, so the trace runs attention through the fused kernel's meta function (which saves the
  output and a logsumexp, as the CPU and CUDA kernels do, instead of the seq x seq matrix).
- buffers: DDP's gradient buckets (one copy of the trainable gradients), FSDP2's all-gathered unit (two: the one
  computing and the one prefetched) and reduce-scatter input, ZeRO's configured buckets (estimated).
- peak: the larger of a later micro-step (everything held, gradients already accumulated, optimizer state from
  the previous step) and the optimizer step (AdamW's foreach update makes one temporary the size of a moment).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from launcher.backends.deepspeed_config import zero_stage
from launcher.config import Config, FsdpConfig
from launcher.errors import UsageError
from launcher.formatting import bytes_text
from launcher.models.structure import logits_of, transformer_blocks

GB = 10**9  # memory_budget_gb, --gpu-memory-gb and the tables count decimal gigabytes, as nvidia-smi's product names do not
# usable device memory (total_memory as torch reports it) of common GPUs; --gpu takes these names
GPUS = {
    "H100": 81559 * 2**20,
    "H200": 143771 * 2**20,
    "A100-40": 40960 * 2**20,
    "A100-80": 81920 * 2**20,
    "L40S": 46068 * 2**20,
    "L4": 23034 * 2**20,
    "A10": 23028 * 2**20,
    "A10G": 23028 * 2**20,
    "B200": 183359 * 2**20,
    "V100-16": 16384 * 2**20,
    "V100-32": 32768 * 2**20,
}
BACKENDS = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP2")


@dataclass
class MemoryRow:
    """Bytes per rank under one backend. `peak` is what the device must hold; the parts say where it goes."""

    parameters: int
    gradients: int  # FSDP2 with accumulation: the unsharded gradients of the window (the shards come as they go)
    optimizer: int
    activations: int  # saved tensors and temporaries of one micro-step's forward and backward, logits and loss included
    buffers: int  # communication buffers
    peak: int
    logits: int  # of `activations`: the logits, their fp32 copy and the loss's seq x vocab tensors

    def as_json(self) -> dict:
        return asdict(self)


def model_states(model: nn.Module, world_size: int) -> dict[str, tuple[int, int, int]]:
    """Bytes per rank of the parameters, their gradients and the AdamW state (two moments per trainable element),
    under each backend, from the model's shapes and dtypes (the meta model will do).

    DDP keeps all three whole on every rank. FSDP2 shards each parameter along dim 0, padded to a multiple of the
    world size, and its gradients and moments alike (exact: a test compares a CPU run's allocations). ZeRO-1/2/3
    partition flat buffers evenly and keep an fp32 master copy beside the moments (12 bytes per trainable element
    in the optimizer state)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]

    def whole(ps) -> int:
        return sum(p.numel() * p.element_size() for p in ps)

    def shard(p) -> int:
        shape = p.shape if p.dim() else torch.Size([1])
        rows = -(-shape[0] // world_size)
        return rows * shape[1:].numel() * p.element_size()

    def split(n_bytes: int) -> int:
        return -(-n_bytes // world_size)

    n_trainable = sum(p.numel() for p in trainable)
    return {
        "DDP": (whole(params), whole(trainable), 2 * whole(trainable)),
        "ZeRO-1": (whole(params), whole(trainable), split(12 * n_trainable)),
        "ZeRO-2": (whole(params), split(whole(trainable)), split(12 * n_trainable)),
        "ZeRO-3": (split(whole(params)), split(whole(trainable)), split(12 * n_trainable)),
        "FSDP2": (sum(shard(p) for p in params), sum(shard(p) for p in trainable), 2 * sum(shard(p) for p in trainable)),
    }


def checkpoint_bytes(model: nn.Module, deepspeed: bool, mixed_precision: str) -> int:
    """A checkpoint's size: the weights and AdamW's two fp32 moments; DeepSpeed under bf16/fp16 also saves fp32 masters."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights + trainable * (12 if deepspeed and mixed_precision != "no" else 8)


class _FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention through the fused (flash) kernel's meta function: the meta device would otherwise
    take the math path, which saves the seq x seq attention matrix that no CPU or CUDA run keeps."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__bool__, torch.Tensor.item) and args[0].is_meta:
            # a value test on the meta device (Hugging Face's "are these rows packed?" on the position ids) has no
            # value to read: answer as for the traced batch, one sequence per row
            return True
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, *rest = args
        options = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), rest)) | kwargs
        if not q.is_meta or not _fused_on_cpu(q, options):
            return func(*args, **kwargs)  # the math path, as a CPU run takes it (attention dropout, some masks)
        if options.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
            repeat = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, options.get("dropout_p", 0.0), options.get("is_causal", False), attn_mask=options.get("attn_mask"), scale=options.get("scale")
        )[0]


def _fused_on_cpu(q: torch.Tensor, options: dict) -> bool:
    """Whether PyTorch's CPU kernel choice for these options is the fused (flash) kernel: asked with a small real query."""
    small = torch.empty(1, q.shape[-3], 2, q.shape[-1], dtype=q.dtype, requires_grad=q.requires_grad)
    mask = options.get("attn_mask")
    mask = torch.ones(1, 1, 2, 2, dtype=mask.dtype) if mask is not None else None
    dropout_p, is_causal = options.get("dropout_p", 0.0), options.get("is_causal", False)
    return torch._fused_sdp_choice(small, small, small, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal) != 0


def _meta_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """The model on the meta device (a copy: the caller's model keeps its gradients and mode)."""
    on_meta = all(p.is_meta for p in model.parameters())
    meta = copy.deepcopy(model) if on_meta else copy.deepcopy(model).to("meta")
    return meta.to(dtype) if dtype is not None else meta


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of every tensor storage created while the mode is on and still alive, and their peak: the memory
    accounting of one thread's tensors (a view or an in-place result shares its input's storage: counted once).
    `resizes`: also follow storages resized in place, which no operator reports (FSDP2 frees a unit's gathered
    parameters by resizing their storage to 0 bytes after its forward and backward, and regrows it at the next
    all-gather); each new tensor then re-reads the size of every live storage (slower, for measuring real steps)."""

    def __init__(self, resizes: bool = False):
        super().__init__()
        self.now = self.peak = 0
        self.resizes = resizes
        self._refs: dict[int, weakref.ref] = {}
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count_tensor(tensor)
        return out

    def _count_tensor(self, tensor: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(tensor):
            # a wrapper (FSDP2's DTensor parameters, gradients and AdamW moments) owns no memory: its storage reports
            # the whole logical size, while the bytes are its local shard's, made inside the subclass's own dispatch
            # where this mode is off. Counting the wrapper put the full-size moments and weights of every rank into
            # the FSDP2 measurement (38.97 MB measured for the 2-rank GPT, 7 MB of it wrappers).
            attrs, _ = tensor.__tensor_flatten__()
            for inner in (getattr(tensor, attr) for attr in attrs):
                if isinstance(inner, torch.Tensor):  # (the flattened attributes may name a device mesh too)
                    self._count_tensor(inner)
            return
        self._count(tensor.untyped_storage())

    def _count(self, storage) -> None:
        key = id(storage)
        if key in self._refs:
            return
        if self.resizes:
            for other, ref in list(self._refs.items()):
                alive = ref()
                if alive is not None:
                    size = alive.nbytes()
                    self.now += size - self._sizes[other]
                    self._sizes[other] = size
        self._sizes[key] = storage.nbytes()
        self.now += self._sizes[key]
        self.peak = max(self.peak, self.now)
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))

    def _free(self, key: int) -> None:
        self._refs.pop(key, None)
        self.now -= self._sizes.pop(key, 0)


def traced_activations(model: nn.Module, micro_batch_size: int, seq_len: int, compute_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(activation bytes, logits bytes) of one micro-step (forward, the loop's fp32 cross-entropy, backward) at this
    micro-batch, traced on the meta device: the peak of everything the step allocates, with the gradients already
    there (a later micro-step of a window, or any step after the first). `compute_dtype`: the dtype mixed precision
    computes in (the trace casts the model to it; autocast does not run on the meta device)."""
    from torch.autograd import Variable

    meta = _meta_copy(model, compute_dtype)
    meta.train()
    with LiveTensorBytes() as live, _FusedAttention():
        # the gradients inside the accounting: autograd may replace one instead of adding into it, freeing the old
        for p in meta.parameters():
            if p.requires_grad:
                p.grad = torch.empty_like(p)
        # the weights inside the accounting too, though made before it: a view of one (nn.Linear's weight.t()) would
        # otherwise count its storage as a new tensor, and keep counting it while the weight lives (the built-in
        # GPT's activations came out larger by about its linear weights' bytes, 3.1 MB of 22.8 MB)
        for tensor in (*meta.parameters(), *meta.buffers()):
            live._count(tensor.untyped_storage())
        held = live.now
        input_ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device="meta")  # the batch counts too
        logits = logits_of(meta(input_ids))
        loss = F.cross_entropy(logits.float().flatten(0, 1), input_ids.flatten(), ignore_index=-100, reduction="sum")
        # the engine directly: Tensor.backward would pass through the mode's handler, which runs it with the mode off
        # (and gradient checkpointing's recompute in the backward needs the fused attention too)
        Variable._execution_engine.run_backward((loss,), (torch.ones_like(loss),), False, False, (), True, True)
        vocab, logits_size = logits.shape[-1], logits.element_size()
        del logits, loss
    tokens = micro_batch_size * seq_len
    # the logits, their fp32 copy (none when already fp32), the log-softmax the loss saves, and the logits' gradient
    logits_bytes = tokens * vocab * (2 * logits_size + (4 if logits_size != 4 else 0) + 4)
    return live.peak - held, logits_bytes


@dataclass(frozen=True)
class ActivationLine:
    """Activation bytes as a function of the micro-batch: `base + per_sample * micro_batch_size` (two traces)."""

    base: int
    per_sample: int
    logits_per_sample: int

    def at(self, micro_batch_size: int) -> tuple[int, int]:
        return self.base + self.per_sample * micro_batch_size, self.logits_per_sample * micro_batch_size


def activation_line(cfg: Config, model: nn.Module) -> ActivationLine:
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    one, logits = traced_activations(model, 1, cfg.data.seq_len, compute)
    two, _ = traced_activations(model, 2, cfg.data.seq_len, compute)
    return ActivationLine(max(0, 2 * one - two), two - one, logits)


def _backend_buffers(name: str, model: nn.Module, world_size: int, ds_config: dict | None, param_bytes: int) -> int:
    """Communication buffers per rank: DDP's buckets, FSDP2's gathered units, ZeRO's buckets (estimated)."""

    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if name == "DDP":
        return trainable_bytes if world_size > 1 else 0  # the buckets: a second copy of every gradient
    if name == "FSDP2":
        units = [sum(p.numel() * param_bytes for p in block.parameters()) for block in transformer_blocks(model)]
        largest = max(units, default=0)
        return 3 * largest if world_size > 1 else 0  # gathered unit + prefetched next + the reduce-scatter input
    zero = (ds_config or {}).get("zero_optimization", {})
    elements = int(zero.get("reduce_bucket_size", 5e8) if isinstance(zero.get("reduce_bucket_size"), (int, float)) else 5e8)
    elements += int(zero.get("allgather_bucket_size", 5e8) if isinstance(zero.get("allgather_bucket_size"), (int, float)) else 5e8)
    return min(elements * 2, 2 * trainable_bytes)  # 16-bit buckets, never more than the gradients they carry


def memory_table(
    cfg: Config, model: nn.Module, world_size: int, micro_batch_size: int, ds_config: dict | None = None, line: ActivationLine | None = None
) -> dict[str, MemoryRow]:
    """Each backend's per-rank bytes for a run of `cfg` with this micro-batch (FSDP2 as cfg.fsdp sets it)."""
    line = line or activation_line(cfg, model)
    activations, logits = line.at(micro_batch_size)
    states = model_states(model, world_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    mixed = cfg.train.mixed_precision != "no"
    fsdp = cfg.fsdp
    accumulating = cfg.train.gradient_accumulation_steps != 1 if isinstance(cfg.train.gradient_accumulation_steps, int) else True
    rows = {}
    for name in BACKENDS:
        params, grads, optimizer = states[name]
        buffers = _backend_buffers(name, model, world_size, ds_config, 2 if mixed else 4)
        step_temp = optimizer // 2  # AdamW's foreach update: one moment-sized temporary
        if name == "FSDP2":
            if fsdp is not None and fsdp.sync_every_micro_step is not True and accumulating:
                # the window's unsharded gradients, held until its last backward, *instead of* the shards: the loop
                # sets gradients to None after each step, so no shard exists until that backward reduce-scatters a
                # unit, which frees the unit's unsharded gradients as its shards appear (the two were added before,
                # 1.7 MB too many for the 2-rank GPT, 2 GB for the 8B shape on 16 ranks)
                grads = max(grads, trainable_bytes)
            if fsdp is not None and not fsdp.reshard_after_forward:
                buffers += sum(p.numel() * (2 if mixed else 4) for p in model.parameters())  # every unit stays gathered
            if fsdp is not None and fsdp.cpu_offload:
                params, grads, optimizer, step_temp = 0, 0, 0, 0
        if name.startswith("ZeRO") and ds_config is not None:
            zero = ds_config.get("zero_optimization", {})
            width = next(model.parameters()).element_size()
            if mixed and width > 2:  # the engine holds 16-bit parameters and gradients; the fp32 masters are optimizer state
                params, grads = params * 2 // width, grads * 2 // width
            if (zero.get("offload_optimizer") or {}).get("device") == "cpu":
                optimizer, step_temp = 0, 0
                if int(name[-1]) >= 2:
                    grads = 0  # the gradient partitions are moved to the CPU; the GPU keeps the buckets (buffers)
            if (zero.get("offload_param") or {}).get("device") == "cpu" and name == "ZeRO-3":
                params = 0  # the parameter partitions live on the CPU; the layers gathered for compute are buffers
        micro_step = params + grads + optimizer + buffers + activations
        step = params + grads + optimizer + buffers + step_temp
        rows[name] = MemoryRow(params, grads, optimizer, activations, buffers, max(micro_step, step), logits)
    return rows


def chosen_backend(cfg: Config, ds_config: dict | None) -> str:

    if ds_config is not None:
        stage = zero_stage(ds_config)
        return f"ZeRO-{stage}" if stage else "DDP"
    return "FSDP2" if cfg.fsdp is not None else "DDP"


def device_memory() -> int | None:
    """This machine's GPU memory (bytes), or None on a machine without one."""
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def budget_bytes(cfg: Config) -> int:
    if cfg.train.memory_budget_gb is not None:
        return int(cfg.train.memory_budget_gb * GB)
    found = device_memory()
    if found is None:
        raise UsageError("train.micro_batch_size: auto needs the device's memory, and this machine has no GPU; set train.memory_budget_gb")
    return found


def resolve_auto(cfg: Config, model: nn.Module, world_size: int, ds_config: dict | None = None) -> list[str]:
    """`train.micro_batch_size: auto` and `fsdp.sync_every_micro_step: auto`, decided once from the prediction (the
    config and the model's shapes: the same on every rank) and written into `cfg`, so config.yaml records them.
    Returns the lines that say what was chosen. The global batch stays `train.global_batch_size`: any split of it
    trains the same weights."""
    train = cfg.train
    auto_micro = train.micro_batch_size == "auto"
    auto_sync = cfg.fsdp is not None and cfg.fsdp.sync_every_micro_step == "auto"
    if not (auto_micro or auto_sync):
        return []
    budget = budget_bytes(cfg)
    line = activation_line(cfg, model)
    backend = chosen_backend(cfg, ds_config)
    if auto_micro:
        global_batch = train.global_batch_size
        if global_batch is None:
            raise UsageError("train.micro_batch_size: auto divides train.global_batch_size, which is not set; set train.global_batch_size")
        if global_batch % world_size:
            raise UsageError(
                f"train.global_batch_size: {global_batch} samples cannot be split over {world_size} ranks (no micro-batch reaches it);"
                f" set it to a multiple of {world_size}"
            )
        candidates = [b for b in range(global_batch // world_size, 0, -1) if (global_batch // world_size) % b == 0]
    else:
        candidates = [train.micro_batch_size]
    syncs = [False, True] if auto_sync else [cfg.fsdp.sync_every_micro_step if cfg.fsdp is not None else False]
    for micro in candidates:
        for sync in syncs:
            trial = _with_split(cfg, micro, world_size, sync)
            peak = memory_table(trial, model, world_size, micro, ds_config, line)[backend].peak
            if peak <= budget:
                _apply(cfg, trial)
                accumulation = cfg.train.gradient_accumulation_steps
                return [
                    f"chosen for a memory budget of {budget / GB:.1f} GB per rank: micro-batch {micro} x accumulation {accumulation}"
                    f" x world size {world_size}"
                    + (f", fsdp.sync_every_micro_step {str(sync).lower()}" if auto_sync else "")
                    + f"; predicted peak {peak / GB:.2f} GB per rank ({backend})"
                ]
    smallest = memory_table(_with_split(cfg, candidates[-1], world_size, syncs[-1]), model, world_size, candidates[-1], ds_config, line)[backend].peak
    key = "train.micro_batch_size" if auto_micro else "fsdp.sync_every_micro_step"
    raise UsageError(
        f"{key}: auto found nothing that fits {budget / GB:.1f} GB per rank: micro-batch {candidates[-1]} needs {smallest / GB:.2f} GB"
        f" ({backend}); see `launcher plan --gpu-memory-gb` for what would fit (gradient checkpointing, FSDP2, more ranks)"
    )


def _with_split(cfg: Config, micro: int, world_size: int, sync: bool) -> Config:
    trial = cfg.model_copy(deep=True)
    trial.train.micro_batch_size = micro
    if cfg.train.micro_batch_size == "auto":
        trial.train.gradient_accumulation_steps = cfg.train.global_batch_size // (world_size * micro)
    if trial.fsdp is not None:
        trial.fsdp.sync_every_micro_step = sync
    return trial


def _apply(cfg: Config, trial: Config) -> None:
    cfg.train.micro_batch_size = trial.train.micro_batch_size
    cfg.train.gradient_accumulation_steps = trial.train.gradient_accumulation_steps
    if cfg.fsdp is not None:
        cfg.fsdp.sync_every_micro_step = trial.fsdp.sync_every_micro_step


def suggestions(
    cfg: Config, model: nn.Module, world_size: int, budget: int, ds_config: dict | None, line: ActivationLine, checkpointed: nn.Module | None
) -> list[str]:
    """What would make a run that does not fit fit, each with its predicted peak (the same global batch).
    `checkpointed`: the model built with model.gradient_checkpointing (None: no such suggestion)."""

    backend = chosen_backend(cfg, ds_config)
    micro, accumulation = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    per_rank = micro * accumulation
    out = []

    def add(text: str, trial: Config, name: str, micro_batch: int, trial_line: ActivationLine = line) -> None:
        peak = memory_table(trial, model, world_size, micro_batch, ds_config, trial_line)[name].peak
        out.append(f"  {text}: {bytes_text(peak)}{' (fits)' if peak <= budget else ''}")

    for smaller in (b for b in range(micro - 1, 0, -1) if per_rank % b == 0):
        trial = cfg.model_copy(deep=True)
        trial.train.micro_batch_size, trial.train.gradient_accumulation_steps = smaller, per_rank // smaller
        add(f"train.micro_batch_size={smaller} train.gradient_accumulation_steps={per_rank // smaller}", trial, backend, smaller)
        break
    if checkpointed is not None:
        trial = cfg.model_copy(deep=True)
        trial.model.gradient_checkpointing = True
        add("model.gradient_checkpointing=true", trial, backend, micro, activation_line(trial, checkpointed))
    if backend != "FSDP2" and cfg.deepspeed is None:
        trial = cfg.model_copy(deep=True)
        trial.fsdp = FsdpConfig()
        add("fsdp={} (FSDP2 instead of DDP)", trial, "FSDP2", micro)
        trial.fsdp.sync_every_micro_step = True
        add("fsdp={sync_every_micro_step: true}", trial, "FSDP2", micro)
    if backend == "FSDP2" and cfg.fsdp.sync_every_micro_step is not True and accumulation > 1:
        trial = cfg.model_copy(deep=True)
        trial.fsdp.sync_every_micro_step = True
        add("fsdp.sync_every_micro_step=true", trial, backend, micro)
    if backend == "FSDP2" and not cfg.fsdp.cpu_offload:
        trial = cfg.model_copy(deep=True)
        trial.fsdp.cpu_offload = True
        add("fsdp.cpu_offload=true", trial, backend, micro)
    return out
