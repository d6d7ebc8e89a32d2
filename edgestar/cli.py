"""The ``edgestar`` command line: argument parsing and error translation only.

Every command maps its options onto one library call. Domain errors (``EdgestarError``) become
one-line messages here, in ``main``; input errors exit with code 2, stage failures with 1.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from edgestar import __version__
from edgestar.deploy.devices import KERNELS
from edgestar.errors import EdgestarError, Terminated, clear_signals, interrupt_name, note_signal
from edgestar.models.registry import DOWNSAMPLE_FACTOR, VARIANTS
from edgestar.pipeline.config import CALIBRATORS, EXTRA_FORMATS, FALLBACKS, IO_TYPES, PTQ_TECHNIQUES, TARGETS
from edgestar.pipeline.sweep import PRECISIONS as SWEEP_PRECISIONS
from edgestar.report.build import FORMATS as REPORT_FORMATS


class ImageSize(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            size = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if size < DOWNSAMPLE_FACTOR or size % DOWNSAMPLE_FACTOR:
            self.fail(f"{size} is not a positive multiple of {DOWNSAMPLE_FACTOR}", param, ctx)
        return size


class FormatList(click.ParamType):
    """Comma-separated extra formats, e.g. ``fp16,dynamic``."""

    name = "LIST"
    choices = EXTRA_FORMATS

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        bad = [v for v in items if v not in self.choices]
        if bad:
            self.fail(f"unknown format {bad[0]!r}; choose from {', '.join(self.choices)}", param, ctx)
        return tuple(dict.fromkeys(items))


def variant_option(f):
    return click.option("--variant", required=True, type=click.Choice(list(VARIANTS)),
                        help="StarNet variant.")(f)


def quiet_option(f):
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars or log lines.")(f)


def progress_factory(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    def make(total, desc):
        return tqdm(total=total, desc=desc, unit="img" if "images" in desc else "it",
                    leave=False, file=sys.stderr, dynamic_ncols=True)
    return make


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class DomainError(click.ClickException):
    """A domain error shown as ``Error: <message>`` with the error's own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


INTERRUPT_EXIT = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report it


def _on_signal(signum, frame):
    name = signal.Signals(signum).name
    note_signal(name)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class EdgestarGroup(click.Group):
    def invoke(self, ctx):
        clear_signals()
        previous = {}
        if _main_thread():
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_signal)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when SIGINT is ignored
                previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
        try:
            return super().invoke(ctx)
        except BaseException as exc:  # Ctrl-C or SIGTERM: the clean-up has run on the way here
            name = interrupt_name(exc) if not isinstance(exc, (click.exceptions.Exit, click.ClickException,
                                                               SystemExit)) else None
            if name:
                run_dir = getattr(exc, "run_dir", None)
                where = f"; {run_dir} is marked interrupted" if run_dir else ""
                hint = getattr(exc, "resume_hint", None) or "run the command again to redo or resume"
                raise DomainError(f"interrupted by {name}{where}; {hint}", INTERRUPT_EXIT[name]) from None
            if isinstance(exc, EdgestarError):
                raise DomainError(str(exc), exc.exit_code) from None
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@click.group(cls=EdgestarGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgestar")
def cli():
    """StarNet from a PyTorch checkpoint to a validated INT8 TFLite model, offline."""


@cli.command()
@variant_option
@click.option("--data", required=True, metavar="DIR|demo",
              help="Image folder with one sub-folder per class; 'demo' = the shipped demo set.")
@click.option("--val", metavar="DIR|demo", default=None,
              help="Held-out image folder to report top-1 on after each epoch.")
@click.option("--img-size", type=ImageSize(), default=32, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05, show_default=True)
@click.option("--drop-path", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--crop-pct", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Resize to img_size/crop_pct, then center crop (1.0 = resize only).")
@click.option("--weights", default="none", show_default=True, metavar="none|official|demo|PATH",
              help="Initial weights to fine-tune from; a classifier for another number of classes "
                   "is replaced by a new one for the --data classes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--half", is_flag=True, help="Store the checkpoint in half precision.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, hidden=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint file to write [default: runs/<variant>-train-<time>/model.pt].")
@click.option("--force", is_flag=True, help="Overwrite the --out file if it exists.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=1, show_default=True, metavar="EPOCHS",
              help="Save the training state (<out>.state) after every EPOCHS epochs; the same command "
                   "resumes from it after an interruption. 0: never.")
@click.option("--restart", is_flag=True, help="Discard a training state left at <out>.state and start over.")
@quiet_option
def train(variant, data, val, img_size, epochs, batch_size, lr, weight_decay, drop_path,
          crop_pct, weights, seed, half, max_steps, out, force, checkpoint_every, restart, quiet):
    """Train or fine-tune StarNet on an image folder."""
    from edgestar import TrainConfig, demo_split
    from edgestar import train as run_train
    from edgestar.pipeline.rundir import timestamp
    from edgestar.report.summary import percent

    if data == "demo":
        data = str(demo_split("calib"))
        val = val or "demo"
    if val == "demo":
        val = str(demo_split("eval"))
    # The default folder is made only when the checkpoint is written (after the inputs passed).
    out = Path(out) if out else Path("runs") / f"{variant}-train-{timestamp()}" / "model.pt"
    cfg = TrainConfig(variant=variant, img_size=img_size, epochs=epochs, batch_size=batch_size,
                      lr=lr, weight_decay=weight_decay, drop_path_rate=drop_path, seed=seed,
                      crop_pct=crop_pct, max_steps=max_steps, checkpoint_every=checkpoint_every)
    log = (lambda *_: None) if quiet else (lambda msg: click.echo(msg, err=True))
    summary = run_train(cfg, data=data, out=out, val=val, weights=weights, half=half, overwrite=force,
                        restart=restart, progress_factory=progress_factory(quiet), log=log)
    top1 = summary["val_top1"]
    click.echo(f"wrote {out}" + (f" (held-out top-1 {percent(top1)})" if top1 is not None else ""))


@cli.command()
@click.option("--variant", type=click.Choice(list(VARIANTS)), default=None,
              help="StarNet variant (required unless --from-manifest).")
@click.option("--weights", default="official", show_default=True, metavar="official|demo|none|PATH",
              help="official: the release checkpoint (s1-s4, downloaded once into $EDGESTAR_CACHE); "
                   "demo: the shipped CIFAR-10 model; none: random init; or a checkpoint file.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Classifier size [default: from the checkpoint].")
@click.option("--img-size", type=ImageSize(), default=None,
              help="Input resolution, a multiple of 32 [default: the checkpoint's, else 224].")
@click.option("--calib", default="demo", show_default=True, metavar="DIR|FILE.npy|demo|distilled",
              help="Calibration images: a folder (searched recursively), a .npy array, the demo set, "
                   "or distilled: no images, inputs synthesized from the model's BatchNorm statistics.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--target", type=click.Choice(list(TARGETS)), default=None,
              help="Runtime to shape the graph for: cpu = LiteRT/XNNPACK on phones and boards "
                   "(7x7 depthwise convs split for speed); micro = TFLite Micro "
                   "[default: the --profile's, else cpu].")
@click.option("--profile", default=None, metavar="NAME",
              help="Target profile (edgestar profiles): sets --target and --io unless given.")
@click.option("--calibrator", type=click.Choice(list(CALIBRATORS)), default="edgestar",
              show_default=True,
              help="Where INT8 activation ranges are measured: on the PyTorch model (fast, "
                   "exact ranges), or by TFLite's own calibrator (slow; the baseline).")
@click.option("--ptq", default=None, metavar="all|none|LIST",
              help="Post-training techniques beyond min/max calibration, comma-separated: "
                   f"{', '.join(PTQ_TECHNIQUES)} [default: none, plain min/max; see bench/RESULTS.md].")
@click.option("--eval", "eval_", default=None, metavar="DIR|demo",
              help="Labelled evaluation folder (one sub-folder per class) [default: the demo set].")
@click.option("--labels", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Label file for a flat --eval folder: '<file name> <class index or name>' per "
                   "line, or one class index per line for the images in sorted name order "
                   "(ILSVRC2012 validation ground truth).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=None,
              help="Evaluate on a fixed random subset of this many images [default: all].")
@click.option("--io", "io_type", type=click.Choice(list(IO_TYPES)), default=None,
              help="Input/output type of the INT8 model [default: the --profile's, else int8].")
@click.option("--formats", type=FormatList(), default="", metavar="fp16,dynamic",
              help="Extra formats to build besides FP32 and INT8.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=None, metavar="POINTS",
              help="Exit with code 1 when INT8 top-1 falls more than this many points below "
                   "PyTorch FP32 (the report is still written).")
@click.option("--fallback", type=click.Choice(list(FALLBACKS)), default="none", show_default=True,
              help="With --max-drop: float = when INT8 drops more, keep the tensors with the most "
                   "quantization error (1, 2, 4, ... of them) in float until the drop is within it; "
                   "the report gives the size and latency this cost.")
@click.option("--qat", is_flag=True,
              help="Quantization-aware training first: fine-tune with the INT8 model simulated "
                   "(distilling the float model), then deploy with the ranges it trained with. "
                   "Runs under torchrun with DistributedDataParallel.")
@click.option("--train", default=None, metavar="DIR|demo",
              help="Images for --qat, searched recursively; labels unused [default: the --calib source].")
@click.option("--qat-epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--qat-steps", type=click.IntRange(min=1), default=None,
              help="Stop QAT after this many steps [default: all epochs].")
@click.option("--qat-lr", type=click.FloatRange(min=0, min_open=True), default=2e-5, show_default=True)
@click.option("--qat-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Global QAT batch (split across torchrun processes).")
@click.option("--qat-checkpoint-minutes", type=click.FloatRange(min=0), default=5.0, show_default=True,
              metavar="MINUTES", help="Save the QAT state this often and after every epoch; the same command "
                                      "with the same --out resumes QAT from it after an interruption. 0: every step.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory to create [default: runs/<variant>-<time>].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sample selection.")
@click.option("--unsafe-allow-pickle", is_flag=True,
              help="Load a checkpoint that needs arbitrary pickled code. ONLY for files you trust: "
                   "unpickling can run any code.")
@click.option("--from-manifest", "from_manifest", type=click.Path(), default=None, metavar="RUN_DIR/manifest.json",
              help="Re-run a recorded run with its recorded options (only --out, --json, -q and "
                   "--unsafe-allow-pickle, never taken from the file, may be added) and say whether it reproduced: "
                   "inputs, tool versions, .tflite bytes, top-1.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout at the end.")
@quiet_option
@click.pass_context
def quantize(ctx, variant, weights, num_classes, img_size, calib, calib_samples, target, profile, calibrator, ptq,
             eval_, labels, eval_samples, io_type, formats, max_drop, fallback, qat, train, qat_epochs, qat_steps,
             qat_lr, qat_batch, qat_checkpoint_minutes, out, seed, unsafe_allow_pickle, from_manifest, as_json, quiet):
    """Convert a StarNet checkpoint to validated FP32 and INT8 TFLite models."""
    from click.core import ParameterSource

    from edgestar import QuantizeConfig
    from edgestar import quantize as run_quantize
    from edgestar import summary_table

    recorded = None
    if from_manifest:
        extra = ("out", "as_json", "quiet", "from_manifest", "unsafe_allow_pickle")
        given = [p.opts[0] for p in ctx.command.params if p.name not in extra
                 and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--from-manifest re-runs the recorded options; {given[0]} cannot be added "
                                   "(only --out, --json, -q, --unsafe-allow-pickle)")
        from edgestar.pipeline.reproduce import config_from_manifest

        config, recorded = config_from_manifest(Path(from_manifest), out=Path(out) if out else None,
                                                allow_pickle=unsafe_allow_pickle)
    else:
        if variant is None:
            raise click.UsageError("Missing option '--variant' (or give --from-manifest).")
        chosen = {k: v for k, v in (("target", target), ("io_type", io_type)) if v is not None}
        make = (lambda **kw: QuantizeConfig.for_profile(profile, **kw)) if profile else QuantizeConfig
        config = make(
            variant=variant, weights=weights, num_classes=num_classes, img_size=img_size,
            calib=calib, calib_samples=calib_samples, calibrator=calibrator, ptq=ptq, **chosen,
            eval=eval_, labels=labels, eval_samples=eval_samples, formats=tuple(formats), max_drop=max_drop,
            fallback=fallback, qat=qat, train=train,
            qat_epochs=qat_epochs, qat_steps=qat_steps, qat_lr=qat_lr, qat_batch=qat_batch,
            qat_checkpoint_minutes=qat_checkpoint_minutes,
            out=Path(out) if out else None, allow_pickle=unsafe_allow_pickle, seed=seed)
    log = (lambda *_: None) if quiet else (lambda msg: click.echo(msg, err=True))
    result = run_quantize(config, progress_factory=progress_factory(quiet), log=log)
    if result is None:  # a torchrun QAT process other than rank 0: rank 0 reports
        return
    if recorded is not None:
        from edgestar.pipeline.reproduce import compare

        result.notes.extend(f"reproduction of {from_manifest}: {line}" for line in compare(recorded, result.manifest))
    if not quiet or not as_json:
        click.echo(summary_table(result.manifest, result.out), err=as_json)
        for note in result.notes:
            click.echo(f"note: {note}", err=as_json)
    else:  # -q --json: no table, but a suspect result is never silent
        for warning in result.warnings:
            click.echo(f"WARNING: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    if not result.passed:
        drop = result.manifest["gate"]["int8_top1_drop_pt"]
        click.echo(f"Error: INT8 top-1 drop {drop:.2f} points exceeds --max-drop {max_drop}; "
                   f"report written to {result.out}", err=True)
        sys.exit(1)


class IntList(click.ParamType):
    """Comma-separated non-negative integers, e.g. ``1,2,4``."""

    name = "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",")]
        if not all(v.isascii() and v.isdigit() for v in items):  # "²".isdigit() is True, int("²") fails
            self.fail(f"{value!r} is not a comma-separated list of whole numbers", param, ctx)
        return tuple(dict.fromkeys(int(v) for v in items))


class ChoiceList(click.ParamType):
    name = "LIST"

    def __init__(self, choices):
        self.choices = tuple(choices)

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        bad = [v for v in items if v not in self.choices]
        if bad or not items:
            self.fail(f"unknown value {(bad or [value])[0]!r}; choose from {', '.join(self.choices)}", param, ctx)
        return tuple(dict.fromkeys(items))


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="RUN_DIR|MODEL.tflite...")
@click.option("--device", default=None, metavar="local|ssh://[user@]host[:port]|adb[:SERIAL]|vela:CONFIG",
              help="Where to run [default: the --profile's, else local].")
@click.option("--profile", default=None, metavar="NAME", help="Target profile (edgestar profiles).")
@click.option("--threads", type=IntList(), default=None, metavar="1,2,4",
              help="Thread counts to sweep; 0 = all cores [default: the profile's, else 1 and all cores].")
@click.option("--kernels", type=ChoiceList(KERNELS), default=None, metavar="xnnpack,builtin",
              help="LiteRT kernels: xnnpack (the default delegate) and/or builtin "
                   "[default: both locally, xnnpack on a board].")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed rounds (each runs every model once).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--min-seconds", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Keep timing rounds until this many seconds have passed.")
@click.option("--eval", "eval_", default=None, metavar="DIR|demo",
              help="Also run these labelled images on the device: top-1, and agreement with this host.")
@click.option("--eval-samples", type=click.IntRange(min=1), default=None,
              help="A fixed random subset of this many evaluation images [default: all].")
@click.option("--remote-python", default="python3", show_default=True,
              help="The board's Python (with ai-edge-litert or tflite-runtime), e.g. ~/venv/bin/python.")
@click.option("--ssh-config", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="An ssh config file to use instead of ~/.ssh/config (ssh -F).")
@click.option("--connect-timeout", type=click.IntRange(min=1), default=10, show_default=True,
              help="Seconds to wait for the ssh connection.")
@click.option("--benchmark-binary", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="TFLite's benchmark_model built for the device: required for adb, optional for ssh.")
@click.option("--cpu-mask", default=None, metavar="HEX",
              help="benchmark_model runs: pin to these cores with taskset (e.g. f0 = big cores).")
@click.option("--op-profile", is_flag=True,
              help="benchmark_model runs: one more run per model with --enable_op_profiling, "
                   "summarized by op type.")
@click.option("--timeout", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="Give up on the device after this long [default: estimated generously].")
@click.option("--no-save", is_flag=True, help="Do not write bench.json / manifest.json in the run directories.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write the result as JSON to FILE.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@quiet_option
def bench(paths, device, profile, threads, kernels, runs, warmup, min_seconds, eval_, eval_samples,
          remote_python, ssh_config, connect_timeout, benchmark_binary, cpu_mask, op_profile, timeout,
          no_save, out, as_json, quiet):
    """Latency (and on-device accuracy) of a run's models on this machine or a board."""
    from edgestar import BenchConfig
    from edgestar import bench as run_bench
    from edgestar.files import atomic_write_json, ensure_writable_dir
    from edgestar.report.bench_table import bench_table

    if out:  # its folder is made (or refused) now, not after a long device run
        if Path(out).is_dir():
            raise click.BadParameter(f"{out} is a directory", param_hint="--out")
        ensure_writable_dir(Path(out).absolute().parent)
    config = BenchConfig(device=device, profile=profile, threads=threads, kernels=kernels, runs=runs,
                         warmup=warmup, min_seconds=min_seconds, eval=eval_, eval_samples=eval_samples,
                         remote_python=remote_python, ssh_config=Path(ssh_config) if ssh_config else None,
                         connect_timeout=connect_timeout,
                         benchmark_binary=Path(benchmark_binary) if benchmark_binary else None,
                         cpu_mask=cpu_mask, op_profile=op_profile, timeout_s=timeout, write=not no_save)
    log = (lambda *_: None) if quiet else (lambda msg: click.echo(msg, err=True))
    result = run_bench(list(paths), config, log=log, progress_factory=progress_factory(quiet))
    data = result.to_json()
    if not (quiet and as_json):
        click.echo(bench_table(data), err=as_json)
        for run_dir in result.written:
            click.echo(f"results written to {Path(run_dir) / 'bench.json'}", err=as_json)
    else:
        for warning in result.warnings:
            click.echo(f"WARNING: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(data))
    if out:
        try:
            atomic_write_json(Path(out), data)
        except OSError as exc:
            raise DomainError(f"cannot write --out {out}: {exc.strerror}", 2) from None
    if result.store_errors:  # shown after the numbers, so a failed save loses nothing measured
        raise DomainError("; ".join(result.store_errors), 1)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def profiles(as_json):
    """List the target profiles (for --profile)."""
    from edgestar.deploy.profiles import PROFILES, profiles_table

    if as_json:
        click.echo(json.dumps({name: p.to_json() for name, p in PROFILES.items()}))
    else:
        click.echo(profiles_table())
        for p in PROFILES.values():
            if p.notes:
                click.echo(f"{p.name}: {p.notes}")


@cli.command()
@click.argument("path", metavar="RUN_DIR|MODEL.tflite")
@click.option("--board", required=True, metavar="NAME",
              help="Target board (firmware_assets/boards.toml: nano33ble, pico, pico2, esp32s3, esp32s3-psram, "
                   "stm32f746-disco, stm32h743, corstone-300, nrf5340).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for the sources [default: firmware-<board> beside the model].")
@click.option("--family", type=click.Choice(["arm-cortex-m", "esp32"]), default=None,
              help="Example application to generate [default: the board's].")
@click.option("--test-image-from", "test_images", default="demo", show_default=True, metavar="DIR|demo",
              help="Labelled images to take the compiled-in test image from.")
@click.option("--rotation", type=click.Choice(["graph", "app"]), default="graph", show_default=True,
              help="graph: keep the model's input REVERSE_V2 (TFLite Micro since mid-2025); app: remove it, "
                   "the application feeds the pixels rotated by 180 degrees (any TFLM version).")
@click.option("--patches", default="none", show_default=True, metavar="none|auto|N[,M]",
              help="Patch-based inference of the first layers: the stem pair in N strips, the first stage's "
                   "star chains in M (0: whole); auto: the counts with the smallest arena. An exact rewrite, "
                   "checked bit-exact against the unpatched model; it lowers the arena and costs instructions.")
@click.option("--build", is_flag=True,
              help="Compile the sources for the board's core with arm-none-eabi-gcc and report flash and RAM "
                   "from the linked ELF.")
@click.option("--tflm-root", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Standalone TFLite Micro tree to build against [default: $EDGESTAR_TFLM_ROOT].")
@click.option("--kernels", type=click.Choice(["cmsis_nn", "reference"]), default="cmsis_nn", show_default=True,
              help="TFLite Micro kernels for --build.")
@click.option("--run", "run_on", type=click.Choice(["qemu"]), default=None,
              help="Build, then run on QEMU's emulated board for the core (Cortex-M55: mps3-an547, M4: "
                   "mps2-an386, M7: mps2-an500) and check the outputs against the host.")
@click.option("--eval-samples", type=click.IntRange(min=1), default=20, show_default=True,
              help="Images --run feeds the firmware (from --test-image-from).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
@quiet_option
def firmware(path, board, out, family, test_images, rotation, patches, build, tflm_root, kernels, run_on,
             eval_samples, as_json, quiet):
    """TensorFlow Lite Micro sources for a run's INT8 model, its measured arena, and whether it fits."""
    from edgestar.deploy.firmware import FirmwareConfig
    from edgestar.deploy.firmware import firmware as run_firmware

    log = (lambda *_: None) if quiet else (lambda msg: click.echo(msg, err=True))
    config = FirmwareConfig(board=board, out=Path(out) if out else None, family=family, test_images=test_images,
                            rotation=rotation, patches=patches, build=build,
                            tflm_root=Path(tflm_root) if tflm_root else None,
                            kernels=kernels, run=run_on, eval_samples=eval_samples)
    result = run_firmware(path, config, log=log)
    if as_json:
        click.echo(json.dumps(result))
        return
    arena = result["arena"]
    click.echo(f"{result['name']}: {result['model_bytes']:,} B of model, arena {arena['total']:,} B measured by "
               f"TFLite Micro's x86 interpreter ({arena['head']:,} activations + {arena['tail']:,} persistent)"
               + (f", {arena['reserve']:,} B reserved (+{arena['margin']})" if arena["reserve_from"] == "host" else ""))
    click.echo(f"ops: {', '.join(f'{k} x{v}' for k, v in sorted(result['ops'].items()))}")
    if result["reverse_v2"]:
        click.echo("note: the graph uses REVERSE_V2 (edgestar's PAD-free rotation); TFLite Micro has it since "
                   "July 2025 (reference kernel only): older TFLM bundles fail with 'Failed to get "
                   "registration from op code REVERSE_V2'; --rotation app moves it into the application")
    elif result["rotation"] == "app":
        click.echo("rotation: the application feeds the pixels rotated by 180 degrees (see model_info.h)")
    t = result["test_image"]
    named = f" ({t['host_top1_name']})" if t["host_top1_name"] else ""
    click.echo(f"compiled-in test image {t['source']}: host top-1 (LiteRT reference kernels) {t['host_top1']}{named}"
               + (f", label {t['label']} ({t['label_name']})" if t["label"] >= 0 else ""))
    p = result["patches"]
    if p and not p["applied"]:
        click.echo(f"patch-based inference: no gain for this model (best {p['arena_after']['total']:,} B vs "
                   f"{p['arena_before']['total']:,} B whole, TFLM x86): the graph stays whole")
    elif p:
        click.echo(f"patch-based inference: stem pair in {p['strips']} strips, {p['star_chains']} star chain(s) in "
                   f"{p['star_strips'] or 'none (whole)'}; TFLM x86 arena {p['arena_before']['total']:,} -> "
                   f"{p['arena_after']['total']:,} B; {p['extra_macs']:,} extra MACs (halo rows); outputs "
                   f"bit-exact with the unpatched model on {p['parity']['images']} images")
    h = result["host_check"]
    click.echo("TFLite Micro vs LiteRT reference kernels: "
               + (f"bit-exact on all {h['images']} images" if h["bit_exact"] else
                  f"NOT bit-exact: {h['bit_exact_images']} of {h['images']} images equal, up to "
                  f"{h['max_abs_diff_lsb']} LSB apart, top-1 agreement {h['top1_agreement']:.0%}"))
    if arena["reserve_from"] == "firmware":
        click.echo(f"arena used inside the firmware: {arena['firmware_used']:,} B; reserved {arena['reserve']:,} B "
                   f"(+{arena['margin']}) in model_info.h")
    elif result["build"] is None:
        click.echo("note: the arena reserve rests on the host's measurement; CMSIS-NN kernels can need more "
                   "(scratch buffers): --run qemu measures it inside the firmware")
    if result["build"]:
        b = result["build"]
        click.echo(f"built {b['elf']} ({b['cpu']}, {b['kernels']} kernels): flash {b['flash_bytes']:,} B "
                   f"(model {result['model_bytes']:,} + code {b['code_bytes']:,}), RAM {b['ram_bytes']:,} B "
                   f"(arena, data, {b['heap_bytes'] // 1024} KiB heap, {b['stack_bytes'] // 1024} KiB stack); "
                   f"{b['note']}")
    click.echo(result["verdict_text"])
    s = result.get("suggestion")
    if s:
        m, e, same = s["measured"], s["estimated"], s["estimated_same_variant"]
        if m:
            click.echo(f"  fits (measured, your runs): {m['variant']} at {m['img_size']} px, {m['model_bytes']:,} B, "
                       f"arena {m['arena_bytes']:,} B ({m['model']})")
        click.echo("  largest that fits (ESTIMATE, not measured): "
                   + (f"{e['variant']} at {e['img_size']} px (~{e['model_bytes']:,} B, arena ~{e['arena_bytes']:,} B)"
                      if e else "no StarNet variant at 32-224 px")
                   + (f"; {same['variant']} up to {same['img_size']} px" if same else
                      f"; no size of {s['variant']} fits"))
    click.echo(f"wrote {len(result['files'])} files to {result['out']}: {', '.join(result['files'])}")
    q = result["qemu"]
    if q:
        same = ("bit-exact on all" if q["bit_exact"] else
                f"NOT bit-exact: {q['bit_exact_images']} of {q['images']} equal, up to {q['max_abs_diff_lsb']} LSB apart on")
        click.echo(f"QEMU {q['machine']}: outputs {same} {q['images']} images vs the host ({q['reference']}); "
                   f"top-1 agreement {q['top1_agreement']:.0%}"
                   + (f", top-1 {q['top1_firmware']:.0%} (host {q['top1_host']:.0%})" if q["top1_firmware"] is not None
                      else ""))
        click.echo(f"QEMU {q['machine']}: {q['instructions_median']:,} instructions per inference (median; QEMU "
                   f"counts instructions, not cycles: not a latency); arena used "
                   f"{q['arena_used_bytes']:,} B of the {arena['reserve']:,} B reserved")
        if not q["bit_exact"]:
            click.echo("WARNING: the firmware does not compute what the host's reference kernels compute")


class NameList(click.ParamType):
    """Comma-separated names (checked by the library), e.g. board names."""

    name = "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = tuple(dict.fromkeys(v.strip() for v in str(value).split(",") if v.strip()))
        if not items:
            self.fail(f"{value!r} names nothing", param, ctx)
        return items


class SizeList(click.ParamType):
    """Comma-separated input sizes, e.g. ``32,64``."""

    name = "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        return tuple(dict.fromkeys(ImageSize().convert(v.strip(), param, ctx) for v in str(value).split(",")))


@cli.command()
@click.option("--variants", type=ChoiceList(VARIANTS), required=True, metavar="s050,s100,...",
              help="StarNet variants, comma-separated.")
@click.option("--precisions", type=ChoiceList(SWEEP_PRECISIONS), default=",".join(SWEEP_PRECISIONS),
              show_default=True, metavar="LIST",
              help="fp32, fp16, dynamic and int8 come from one conversion per variant and size; int8-qat "
                   "is a second run with quantization-aware training.")
@click.option("--img-size", "img_sizes", type=SizeList(), default="32", show_default=True, metavar="32[,64]",
              help="Input sizes, multiples of 32.")
@click.option("--weights", default="demo", show_default=True, metavar="demo|official|none|DIR",
              help="demo: the shipped CIFAR-10 checkpoints; DIR: a folder with one checkpoint per variant, "
                   "the variant a word of its name (starnet_s1_cifar10.pt).")
@click.option("--calib", default="demo", show_default=True, metavar="DIR|FILE.npy|demo|distilled")
@click.option("--calib-samples", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--eval", "eval_", default=None, metavar="DIR|demo",
              help="Labelled evaluation folder [default: the demo set].")
@click.option("--eval-samples", type=click.IntRange(min=1), default=None)
@click.option("--labels", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Label file for a flat --eval folder (as in quantize).")
@click.option("--target", type=click.Choice(list(TARGETS)), default="cpu", show_default=True,
              help="Graph shape, as in quantize.")
@click.option("--train", default=None, metavar="DIR|demo", help="Images for int8-qat [default: the --calib source].")
@click.option("--qat-epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--qat-steps", type=click.IntRange(min=1), default=None)
@click.option("--qat-lr", type=click.FloatRange(min=0, min_open=True), default=2e-5, show_default=True)
@click.option("--qat-batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--bench", "bench_device", default=None, metavar="local|ssh://[user@]host[:port]",
              help="Also time every model there with edgestar bench, all models in the same rounds.")
@click.option("--bench-threads", type=IntList(), default="1", show_default=True, metavar="1[,4]",
              help="Thread counts for --bench (0 = all cores); XNNPACK and LiteRT's builtin kernels both.")
@click.option("--bench-runs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--remote-python", default="python3", show_default=True, help="--bench ssh://: the board's Python.")
@click.option("--firmware", "boards", type=NameList(), default=None, metavar="BOARD,...",
              help="Also run edgestar firmware on every INT8 model for these boards: sources, the arena "
                   "measured in TFLite Micro, and whether it fits.")
@click.option("--format", "formats", type=ChoiceList(REPORT_FORMATS), default=",".join(REPORT_FORMATS),
              show_default=True, metavar="LIST", help="Report files to write.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Sweep folder: one run directory per combination, sweep.json and the report. Run the "
                   "same command again to finish an interrupted sweep: complete runs are kept.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--unsafe-allow-pickle", is_flag=True,
              help="Load checkpoints that need arbitrary pickled code. ONLY for files you trust.")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep's summary as one JSON object on stdout.")
@quiet_option
def sweep(variants, precisions, img_sizes, weights, calib, calib_samples, eval_, eval_samples, labels, target,
          train, qat_epochs, qat_steps, qat_lr, qat_batch, bench_device, bench_threads, bench_runs, remote_python,
          boards, formats, out, seed, unsafe_allow_pickle, as_json, quiet):
    """Quantize every variant x size x precision, then write the accuracy-vs-size report."""
    from edgestar import SweepConfig
    from edgestar import sweep as run_sweep

    config = SweepConfig(variants=variants, precisions=precisions, img_sizes=img_sizes, weights=weights,
                         calib=calib, calib_samples=calib_samples, eval=eval_, eval_samples=eval_samples,
                         labels=labels, target=target, train=train, qat_epochs=qat_epochs, qat_steps=qat_steps,
                         qat_lr=qat_lr, qat_batch=qat_batch, bench=bench_device, bench_threads=bench_threads,
                         bench_runs=bench_runs, remote_python=remote_python, firmware=boards or (),
                         report_formats=formats, out=Path(out), seed=seed, allow_pickle=unsafe_allow_pickle)
    log = (lambda *_: None) if quiet else (lambda msg: click.echo(msg, err=True))
    result = run_sweep(config, log=log, progress_factory=progress_factory(quiet))
    kept = [c for c in result.combinations if c["reused"]]
    lines = [f"{c['name']}: " + ("kept" if c["reused"] else c["status"])
             + (f" ({c['seconds']:.0f} s)" if c.get("seconds") and not c["reused"] else "")
             + (f" -- FAILED at {c.get('failed_stage')}: {c['error']}" if c["status"] not in ("ok", "failed_gate")
                else "") for c in result.combinations]
    lines.append(f"{len(result.combinations)} runs ({len(kept)} kept from before) in {result.seconds:.0f} s")
    lines += [f"WARNING: {w}" for w in result.warnings]
    lines.append(f"report: {', '.join(result.report_files)}")
    for line in lines:
        click.echo(line, err=as_json)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    if result.failed:
        raise DomainError(f"{len(result.failed)} of {len(result.combinations)} combinations failed "
                          f"({', '.join(c['name'] for c in result.failed)}); their rows in the report say why", 1)


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="RUN_DIR|SWEEP_DIR...")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for the report files [default: the one folder given, else ./report].")
@click.option("--format", "formats", type=ChoiceList(REPORT_FORMATS), default=",".join(REPORT_FORMATS),
              show_default=True, metavar="LIST", help="Files to write: md, csv, json, html, png.")
@click.option("--precisions", type=ChoiceList(SWEEP_PRECISIONS + ("fp32-qat",)), default=None, metavar="LIST",
              help="Only these precisions [default: a sweep folder's own, else all].")
def report(paths, out, formats, precisions):
    """Accuracy-vs-size report of run directories, from their manifests alone (nothing is re-run)."""
    from edgestar.report.build import report as build_report

    for p in paths:
        if not Path(p).exists():
            raise click.BadParameter(f"{p} does not exist", param_hint="PATHS")
    if out is None:
        out = paths[0] if len(paths) == 1 and Path(paths[0]).is_dir() else "report"
    rep = build_report(list(paths), out=Path(out), formats=formats, precisions=precisions)
    failed = [r for r in rep.rows if r.get("precision") is None]
    click.echo(f"{len(rep.rows)} rows from {len(rep.runs)} runs" + (f" ({len(failed)} failed)" if failed else ""))
    for f in rep.files:
        click.echo(f"wrote {f}")

if __name__ == "__main__":
    cli()
