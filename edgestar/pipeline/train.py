"""Train or fine-tune StarNet on an image folder (``root/<class>/<images>``).

A deliberately plain recipe: AdamW, cosine schedule with warm-up, label smoothing, random
crop (with padding) and horizontal flip, stochastic depth. Images are decoded once and kept
in memory as uint8 when they fit (small-image sets such as CIFAR); larger sets are streamed.

Training state (model, optimizer, schedule position, random generators) is saved beside the
checkpoint as ``<out>.state`` after every epoch (``checkpoint_every``), and the same call on the
same inputs resumes from it: the finished checkpoint equals that of an uninterrupted run. The
state file is removed once the checkpoint is written.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgestar.data.decoded import IN_MEMORY_LIMIT_BYTES, DecodedImages, normalize_uint8
from edgestar.data.images import Preprocessing, scan_image_folder
from edgestar.checkpointing import fingerprint, load_state, save_state, tensors_digest
from edgestar.errors import InputError, interrupt_name
from edgestar.files import check_can_create, path_fingerprint
from edgestar.models.checkpoints import build_model_for_finetuning, infer_num_classes, save_checkpoint
from edgestar.models.registry import check_img_size
from edgestar.report.summary import percent


@dataclass
class TrainConfig:
    variant: str
    img_size: int
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_path_rate: float = 0.0
    seed: int = 0
    crop_pct: float = 1.0
    max_steps: int | None = None  # for smoke tests
    checkpoint_every: int = 1  # epochs between saved training states (0: none)

    def validate(self) -> None:
        check_img_size(self.img_size)
        if self.epochs < 1:
            raise InputError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0):
            raise InputError(f"learning rate must be positive, got {self.lr}")
        if self.checkpoint_every < 0:
            raise InputError(f"--checkpoint-every must be 0 (never) or more, got {self.checkpoint_every}")


def state_path_for(out: str | Path) -> Path:
    """Where :func:`train` keeps its training state while it runs: ``<out>.state``."""
    return Path(f"{out}.state")


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop after reflect-padding by 1/8 of the size, and random horizontal flip."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # n,h
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # n,w
    idx_n = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out.contiguous()


@torch.no_grad()
def evaluate_torch(model, loader, pre: Preprocessing) -> float:
    model.eval()
    correct = total = 0
    for imgs, labels in loader:
        pred = model(normalize_uint8(imgs, pre)).argmax(1)
        correct += (pred == labels).sum().item()
        total += len(labels)
    return correct / max(total, 1)


def _initial_model(cfg: TrainConfig, weights: str, n_classes: int, log):
    """The model training starts from: random, or ``weights`` with a new head if needed."""
    model, ckpt, head_replaced = build_model_for_finetuning(
        cfg.variant, weights, n_classes, drop_path_rate=cfg.drop_path_rate)
    if head_replaced:
        had = infer_num_classes(ckpt.state_dict)
        what = f"checkpoint has {had} classes" if had else "checkpoint has no classifier"
        log(f"head replaced: {what}, data has {n_classes}")
    return model


def train(cfg: TrainConfig, *, data: str, out: str | Path, val: str | None = None,
          weights: str = "none", num_classes: int | None = None, half: bool = False,
          overwrite: bool = False, restart: bool = False, progress_factory=None, log=print) -> dict:
    """Train ``cfg.variant`` on the image folder ``data``; write an edgestar checkpoint to ``out``.

    ``weights`` (``none``, ``official``, ``demo`` or a path) is the starting point; when its
    classifier has another class count than ``data``, the classifier is replaced (and logged).
    Returns a summary with the final training loss and (if ``val`` is given) held-out top-1
    as a fraction. An existing ``out`` is refused unless ``overwrite``, before any training.

    A training state left at ``<out>.state`` by an interrupted call with the same settings,
    data and starting weights is resumed from (``restart`` discards it); one of another job
    is refused.
    """
    cfg.validate()
    if Path(out).exists() and not overwrite:
        raise InputError(f"--out {out} already exists; pass --force to overwrite it")
    check_can_create(Path(out), "checkpoint")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    folder = scan_image_folder(data, what="training folder")
    n_classes = num_classes or len(folder.classes)
    if n_classes != len(folder.classes):
        raise InputError(
            f"num_classes {n_classes} but training folder {folder.root} has "
            f"{len(folder.classes)} class folders"
        )
    val_folder = None
    if val is not None:  # checked before any decoding or training
        val_folder = scan_image_folder(val, what="validation folder")
        if val_folder.classes != folder.classes:
            raise InputError(f"validation folder {val} has other classes than {folder.root}")
    pre = Preprocessing(cfg.img_size, crop_pct=cfg.crop_pct)
    model = _initial_model(cfg, weights, n_classes, log)
    model.train()
    key = fingerprint(config={k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"},
                      data=path_fingerprint(data), val=path_fingerprint(val) if val else None,
                      start=tensors_digest(model.state_dict()), classes=folder.classes)
    state_path = state_path_for(out)
    state = load_state(state_path)
    if state is not None and (restart or state["key"] != key):
        if not restart:
            raise InputError(f"{state_path} holds the state of a train run with other settings, data or "
                             "starting weights; pass --restart to discard it, or choose another --out")
        state_path.unlink()
        log(f"discarded the training state {state_path}")
        state = None

    in_memory = len(folder) * cfg.img_size**2 * 3 <= IN_MEMORY_LIMIT_BYTES
    t0 = time.perf_counter()
    train_set = DecodedImages(folder, pre, in_memory)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=len(folder) > cfg.batch_size,
        generator=gen, num_workers=0 if in_memory else 2,
    )
    val_loader = None
    if val_folder is not None:
        val_loader = torch.utils.data.DataLoader(
            DecodedImages(val_folder, pre, True), batch_size=256)
    log(f"decoded {len(folder)} training images in {time.perf_counter() - t0:.1f}s")

    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total // 2)

    def lr_at(step):
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    history, step, start_epoch, seconds_before = [], 0, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        gen.set_state(state["rng"]["loader"])
        history, step, start_epoch = state["history"], state["step"], state["epoch"]
        seconds_before = state["train_seconds"]
        log(f"resuming from {state_path}: epoch {start_epoch} of {cfg.epochs} done")

    def save_state_after(epoch: int, seconds: float) -> None:
        save_state(state_path, key=key, model=model.state_dict(), optimizer=opt.state_dict(),
                   rng={"torch": torch.get_rng_state(), "loader": gen.get_state()},
                   epoch=epoch, step=step, history=history, train_seconds=seconds)

    bar = progress_factory(total, f"training {cfg.variant}") if progress_factory else None
    if bar is not None and step:
        bar.update(step)
    t_train = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if step >= total:
                break
            model.train()
            loss_sum = seen = 0
            for imgs, labels in loader:
                if step >= total:
                    break
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
                x = _augment(normalize_uint8(imgs, pre), gen)
                loss = F.cross_entropy(model(x), labels, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(labels)
                seen += len(labels)
                step += 1
                if bar is not None:
                    bar.update(1)
            record = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1)}
            if val_loader is not None:
                record["val_top1"] = evaluate_torch(model, val_loader, pre)
            history.append(record)
            log("epoch {epoch}: loss {loss:.4f}".format(**record)
                + (f", held-out top-1 {percent(record['val_top1'])}" if "val_top1" in record else ""))
            last = epoch + 1 == cfg.epochs or step >= total
            if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0 and not last:
                save_state_after(epoch + 1, seconds_before + time.perf_counter() - t_train)
    except BaseException as exc:
        if interrupt_name(exc) and state_path.exists():
            exc.resume_hint = (f"the training state after epoch {load_state(state_path)['epoch']} is in "
                               f"{state_path}; the same command with --out {out} resumes from it")
        raise
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    summary = {"config": asdict(cfg), "data": str(Path(data).resolve()), "history": history,
               "train_seconds": round(seconds_before + time.perf_counter() - t_train, 1),
               "resumed_from_epoch": start_epoch or None,
               "final_loss": history[-1]["loss"] if history else None,
               "val_top1": history[-1].get("val_top1") if history else None}
    save_checkpoint(out, model, variant=cfg.variant, preprocessing=pre,
                    class_names=folder.classes, half=half, extra={"train": summary})
    state_path.unlink(missing_ok=True)  # the checkpoint is written: nothing left to resume
    return summary
