"""Quantization-aware training that simulates the INT8 model TFLite will actually run.

The folded (BatchNorm-free) model is traced with torch.fx and rewritten so that its forward
pass computes what the deployed INT8 graph computes:

- weights of every conv and linear layer: per-output-channel symmetric int8 with scale
  ``max|w| / 127``, the rule TFLite's quantizer applies when it converts;
- activations: per-tensor asymmetric int8 at each tensor the INT8 graph materialises
  (:func:`quantized_nodes`: the input, every conv/linear output, or the ReLU6 after it since
  TFLite fuses the two, every product and sum, the pooled features), with the scale and zero
  point TFLite derives from a ``(min, max)`` range (:func:`tflite_qparams`);
- biases stay float: TFLite stores them as int32 at the accumulator's scale, whose rounding
  is below one accumulator step.

Ranges start from the calibration min/max (exactly the PTQ ranges), follow the batches'
min/max by exponential averaging for the first part of training and are then frozen. The
frozen ranges are what :mod:`edgestar.calibrate` writes into the FP32 flatbuffer before
TFLite quantizes it (onnx2tf would drop QDQ scales, so they are not exported as QDQ): the
deployed model uses the very ranges the model was trained with.

Training distils the float model's logits (KL divergence), so labels are not needed and the
objective is agreement with the model the user trusted. Given a ``state_path``, the training
state is saved every few minutes and after every epoch, and a later call with the same inputs
resumes from it: every random choice (batch order, augmentation) is drawn from (seed, epoch,
image), so a resumed run takes exactly the steps the uninterrupted run would have. Under ``torchrun`` the same function
runs with DistributedDataParallel (gloo on CPU, nccl on GPUs): each process takes a slice of
every global batch, and range statistics are reduced across processes so every process
tracks identical ranges.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgestar.data.images import ImageFolder, Preprocessing
from edgestar.errors import InputError

INT8_MIN, INT8_MAX = -128, 127
WEIGHT_MAX = 127  # symmetric weights use [-127, 127]


@dataclass(frozen=True)
class QATConfig:
    """Fine-tuning options; ``batch_size`` is the global batch, split across processes."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 2e-5
    range_tracking: float = 0.5  # fraction of the steps during which ranges follow the data
    range_momentum: float = 0.02
    max_steps: int | None = None
    augment: bool = True
    seed: int = 0
    checkpoint_minutes: float = 5.0  # training state saved this often and after every epoch (0: every step)

    def validate(self, world_size: int = 1) -> None:
        if self.epochs < 1:
            raise InputError(f"--qat-epochs must be at least 1, got {self.epochs}")
        if self.batch_size < world_size or self.batch_size % world_size:
            raise InputError(f"--qat-batch {self.batch_size} must be a multiple of the "
                             f"{world_size} processes")
        if not self.lr > 0:
            raise InputError(f"--qat-lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"--qat-steps must be at least 1, got {self.max_steps}")
        if not self.checkpoint_minutes >= 0:
            raise InputError(f"--qat-checkpoint-minutes must be 0 or more, got {self.checkpoint_minutes}")


@dataclass
class QATResult:
    model: nn.Module  # the fine-tuned float (folded) model: what is exported
    simulated: nn.Module  # the same weights with fake quantization: what INT8 computes
    ranges: dict[str, tuple[float, float]]  # fx node -> (min, max), handed to the converter
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    world_size: int = 1
    seconds: float = 0.0
    images: int = 0
    resumed_from_step: int | None = None


# --------------------------------------------------------------------------- TFLite's arithmetic

def tflite_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point TFLite's quantizer derives from a recorded ``(min, max)``.

    The range is widened to contain 0, spread over the 256 int8 steps, and the zero point is
    the rounded (nudged) position of 0, so that 0 is exact.
    """
    lo = torch.clamp(lo, max=0.0).double()
    hi = torch.clamp(hi, min=0.0).double()
    scale = torch.where(hi > lo, (hi - lo) / (INT8_MAX - INT8_MIN), torch.ones_like(lo))
    zero_point = torch.clamp(torch.round(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX)
    return scale.float(), zero_point.int()


def _weight_scale(w: torch.Tensor) -> torch.Tensor:
    return (w.detach().abs().flatten(1).amax(1).clamp(min=1e-12) / WEIGHT_MAX).float()


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 (straight-through gradient)."""
    scale = _weight_scale(w)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -WEIGHT_MAX, WEIGHT_MAX)


def fake_quant_bias(b: torch.Tensor | None, w: torch.Tensor, input_quant) -> torch.Tensor | None:
    """The bias as TFLite stores it: int32 at scale ``input scale * weight scale`` per channel
    (straight-through gradient). Its rounding is small, but where it tips an output over a
    rounding boundary the difference propagates, so it is simulated too."""
    if b is None or input_quant is None:
        return b
    scale = tflite_qparams(input_quant.lo, input_quant.hi)[0] * _weight_scale(w)
    return b + (torch.round(b.detach() / scale) * scale - b.detach())


class QConv2d(nn.Conv2d):
    """A conv computing with its int8-rounded weights (shares the original's parameters)."""

    input_quant = None  # the ActQuant of the conv's input, set by simulate()

    def forward(self, x):
        return self._conv_forward(x, fake_quant_weight(self.weight),
                                  fake_quant_bias(self.bias, self.weight, self.input_quant))


class QLinear(nn.Linear):
    input_quant = None

    def forward(self, x):
        return F.linear(x, fake_quant_weight(self.weight),
                        fake_quant_bias(self.bias, self.weight, self.input_quant))


def _quantized_copy(module: nn.Module) -> nn.Module:
    cls = QConv2d if isinstance(module, nn.Conv2d) else QLinear
    q = copy.copy(module)  # same parameters, same hyper-parameters
    q.__class__ = cls
    return q


class ActQuant(nn.Module):
    """Per-tensor asymmetric int8 fake quantization with a tracked, then frozen, range."""

    def __init__(self, lo: float, hi: float, momentum: float):
        super().__init__()
        self.register_buffer("lo", torch.tensor(float(lo)))
        self.register_buffer("hi", torch.tensor(float(hi)))
        self.momentum = momentum
        self.tracking = False

    def forward(self, x):
        if self.training and self.tracking:
            with torch.no_grad():
                stats = torch.stack([-x.min(), x.max()]).float()
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
                m = self.momentum
                self.lo.mul_(1 - m).add_(-stats[0] * m)
                self.hi.mul_(1 - m).add_(stats[1] * m)
        scale, zero_point = tflite_qparams(self.lo, self.hi)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, INT8_MIN, INT8_MAX)


# --------------------------------------------------------------------------- graph rewriting

def quantized_nodes(gm) -> list[str]:
    """The fx nodes whose values the INT8 TFLite graph stores as int8 tensors.

    Every computed float value is one, except a conv/linear output consumed only by a ReLU6
    or ReLU (TFLite fuses the activation; the activation's output is the stored tensor) and
    value-preserving modules (identity, flatten), which share their input's tensor.
    """
    from edgestar.models.anatomy import fusable_activations
    from edgestar.quant.ranges import aliases

    modules = dict(gm.named_modules())
    alias = aliases(gm)
    names = []
    for node in gm.graph.nodes:
        if node.op in ("output", "get_attr"):
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        if node.name in alias:
            continue
        users = list(node.users)
        if (isinstance(module, (nn.Conv2d, nn.Linear)) and len(users) == 1
                and users[0].op == "call_module" and isinstance(modules.get(users[0].target), fusable_activations())):
            continue
        names.append(node.name)
    return names


def simulate(model: nn.Module, ranges: dict[str, tuple[float, float]], *,
             momentum: float = 0.0):
    """A torch.fx copy of the folded ``model`` that computes like the INT8 TFLite model.

    Its conv/linear layers share ``model``'s parameters, so training it trains ``model``.
    ``ranges`` must cover every node of :func:`quantized_nodes`.
    """
    from edgestar.quant.ranges import trace

    gm = trace(model)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(modules[node.target]) in (nn.Conv2d, nn.Linear):
            parent, _, leaf = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, _quantized_copy(modules[node.target]))
    wanted = set(quantized_nodes(gm))
    missing = sorted(wanted - set(ranges))
    if missing:
        raise ValueError(f"no range for {len(missing)} quantized tensors, e.g. {missing[:3]}")
    for node in [n for n in gm.graph.nodes if n.name in wanted]:
        qname = f"act_quant_{node.name}"
        gm.add_submodule(qname, ActQuant(*ranges[node.name], momentum))
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(qname, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, (QConv2d, QLinear)) and node.args[0].op == "call_module":
            source = modules.get(node.args[0].target)
            if isinstance(source, ActQuant):  # a plain reference, not a second registration
                object.__setattr__(module, "input_quant", source)
    gm.recompile()
    return gm


def simulated_ranges(sim) -> dict[str, tuple[float, float]]:
    """fx node -> (min, max) of every activation quantizer of a :func:`simulate` model."""
    prefix = "act_quant_"
    return {name[len(prefix):]: (float(m.lo), float(m.hi)) for name, m in sim.named_modules()
            if isinstance(m, ActQuant)}


# --------------------------------------------------------------------------- training

class _Indexed(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, _ = self.base[i]
        return img, i


def _augment(x: torch.Tensor, index: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """Reflect-pad crop and horizontal flip, drawn per image from (seed, epoch, image index):
    the same image gets the same augmentation however batches are split across processes."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(x)
    for i in range(n):
        rng = np.random.default_rng((seed, epoch, int(index[i])))
        dy, dx = (int(v) for v in rng.integers(0, 2 * pad + 1, 2))
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop.flip(2) if rng.random() < 0.5 else crop
    return out


def distributed_context() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else from torchrun's
    environment (initialising the group: nccl with GPUs, gloo on CPU), else (0, 1)."""
    dist = torch.distributed
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _state_key(model, images, pre, ranges, config: QATConfig, world: int) -> str:
    """What a QAT result depends on; a saved state with another key is never resumed."""
    from edgestar.checkpointing import fingerprint, tensors_digest

    options = {k: v for k, v in asdict(config).items() if k != "checkpoint_minutes"}
    return fingerprint(options=options, start=tensors_digest(model.state_dict()), ranges=sorted(ranges.items()),
                       images=[str(path) for path, _ in images.samples], size=pre.img_size, world=world)


def finetune(model: nn.Module, images: ImageFolder, pre: Preprocessing,
             ranges: dict[str, tuple[float, float]], *, config: QATConfig = QATConfig(),
             state_path=None, save_state: bool = True, progress_factory=None, log=None) -> QATResult:
    """Fine-tune the folded float ``model`` with INT8 simulation, distilling its own logits.

    ``ranges`` (fx node -> (min, max), e.g. :func:`edgestar.calibrate.node_ranges` on the
    calibration set) initialise the activation quantizers. ``model`` is not modified.
    With ``state_path``, a state saved there for the same inputs is resumed from, and the
    state is saved there (by the first process only, and when ``save_state``) every
    ``config.checkpoint_minutes`` and after every epoch.
    """
    from edgestar.checkpointing import load_state
    from edgestar.checkpointing import save_state as write_state
    from edgestar.data.decoded import IN_MEMORY_LIMIT_BYTES, DecodedImages, normalize_uint8

    log = log or (lambda msg: None)
    rank, world = distributed_context()
    config.validate(world)
    torch.manual_seed(config.seed)
    key = _state_key(model, images, pre, ranges, config, world) if state_path is not None else None
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model).eval()
    sim = simulate(student, ranges, momentum=config.range_momentum)
    net = sim
    in_memory = len(images) * pre.img_size**2 * 3 <= IN_MEMORY_LIMIT_BYTES
    dataset = _Indexed(DecodedImages(images, pre, in_memory=in_memory))
    per_process = config.batch_size // world
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=config.seed, drop_last=True)
    drop_last = len(dataset) >= config.batch_size

    def epoch_batches(epoch: int) -> list[list[int]]:
        """This process's batches of ``epoch`` (what a DataLoader over ``sampler`` yields)."""
        sampler.set_epoch(epoch)
        order = list(sampler)
        chunks = [order[i:i + per_process] for i in range(0, len(order), per_process)]
        return chunks[:-1] if drop_last and chunks and len(chunks[-1]) < per_process else chunks

    steps_per_epoch = max(1, len(epoch_batches(0)))
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    track_until = int(config.range_tracking * total)
    params = [p for p in sim.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    quantizers = [m for m in sim.modules() if isinstance(m, ActQuant)]

    history, step, start_epoch, position, loss_sum, seen, seconds_before = [], 0, 0, 0, 0.0, 0, 0.0
    state = load_state(state_path) if state_path is not None else None
    resumed = None
    if state is not None and state["key"] == key:
        sim.load_state_dict(state["model"])  # the student's weights too: sim shares them
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        history, step, start_epoch, position = state["history"], state["step"], state["epoch"], state["position"]
        loss_sum, seen, seconds_before = state["loss_sum"], state["seen"], state["seconds"]
        resumed = step
        log(f"QAT resumed from {state_path}: step {step} of {total} done")
    elif state is not None:
        log(f"QAT state {state_path} is for other inputs or settings; QAT starts over")
    writes = state_path is not None and save_state and rank == 0
    if world > 1:
        net = nn.parallel.DistributedDataParallel(sim, broadcast_buffers=False)
    bar = progress_factory(total, "QAT steps") if progress_factory and rank == 0 else None
    if bar is not None and step:
        bar.update(step)
    t0 = last_save = time.perf_counter()

    def checkpoint(epoch: int, position: int) -> None:
        write_state(state_path, key=key, model=sim.state_dict(), optimizer=opt.state_dict(),
                    rng=torch.get_rng_state(), history=history, step=step, epoch=epoch, position=position,
                    loss_sum=loss_sum, seen=seen, seconds=seconds_before + time.perf_counter() - t0)

    for epoch in range(start_epoch, config.epochs):
        if step >= total:
            break
        skip = position if epoch == start_epoch else 0
        if not skip:
            loss_sum, seen = 0.0, 0
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=epoch_batches(epoch)[skip:])
        for position, (imgs, index) in enumerate(loader, start=skip + 1):
            if step >= total:
                break
            for q in quantizers:
                q.tracking = step < track_until
            for group in opt.param_groups:
                group["lr"] = 0.5 * config.lr * (1 + math.cos(math.pi * step / total))
            x = normalize_uint8(imgs, pre)
            if config.augment:
                x = _augment(x, index, epoch, config.seed)
            with torch.no_grad():
                target = F.log_softmax(teacher(x), dim=1)
            net.train()
            loss = F.kl_div(F.log_softmax(net(x), dim=1), target, reduction="batchmean", log_target=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(index)
            seen += len(index)
            step += 1
            if bar is not None:
                bar.update(1)
            if writes and time.perf_counter() - last_save >= 60 * config.checkpoint_minutes:
                checkpoint(epoch, position)
                last_save = time.perf_counter()
        history.append({"epoch": epoch + 1, "kd_loss": loss_sum / max(seen, 1), "steps": step})
        log(f"QAT epoch {epoch + 1}: distillation loss {history[-1]['kd_loss']:.5f}")
        position = 0
        if writes:  # also after the last epoch: a run killed after QAT need not train again
            checkpoint(epoch + 1, 0)
            last_save = time.perf_counter()
    if bar is not None:
        bar.close()
    for q in quantizers:
        q.tracking = False
    sim.eval()
    student.eval()
    return QATResult(student, sim, simulated_ranges(sim), history, asdict(config), world,
                     round(seconds_before + time.perf_counter() - t0, 1), len(images), resumed)
