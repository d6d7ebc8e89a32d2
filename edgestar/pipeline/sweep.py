"""``sweep``: ``quantize`` for every (variant, input size, precision) asked, then ``bench`` and
``firmware`` on the models made, then the accuracy-vs-size report -- all through the library.

One run directory per *combination*: ``<variant>-<size>px`` builds FP32, INT8 and the extra
formats asked (FP16, dynamic range) from one conversion, as ``quantize`` does;
``<variant>-<size>px-qat`` is the QAT run for ``int8-qat``. A run is *complete* when its
manifest says it ended (``ok``, or ``failed_gate``) and was made from the same inputs: its
``sweep.key`` (set by the sweep when the run ends) is the hash of the quantize configuration,
the tool versions and the inputs' fingerprints (checkpoint by content; image folders by file
names, sizes and modification times; files by content). A sweep run again does only the
combinations that are not complete: a failed one is removed and redone, an interrupted one
redone in place (its QAT resumes from its saved state).

A combination that fails is recorded as a failed run (the stage and the error in its
manifest, so the report shows it) and the sweep goes on; ``SweepResult.failed`` lists them.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edgestar.errors import EdgestarError, InputError, interrupt_name
from edgestar.files import path_fingerprint
from edgestar.pipeline.rundir import interrupted_run

PRECISIONS = ("fp32", "fp16", "dynamic", "int8", "int8-qat")
SWEEP_FILE = "sweep.json"
SWEEP_VERSION = 1
COMPLETE = ("ok", "failed_gate")


@dataclass(kw_only=True)
class SweepConfig:
    variants: tuple[str, ...]
    out: Path
    precisions: tuple[str, ...] = PRECISIONS
    img_sizes: tuple[int, ...] = (32,)
    weights: str = "demo"  # demo, official, none, a folder of checkpoints (one per variant) or one file
    calib: str = "demo"
    calib_samples: int = 300
    eval: str | None = None
    eval_samples: int | None = None
    labels: str | None = None
    target: str = "cpu"
    train: str | None = None  # QAT images [default: the calib source]
    qat_epochs: int = 1
    qat_steps: int | None = None
    qat_lr: float = 2e-5
    qat_batch: int = 64
    bench: str | None = None  # a bench device: local, ssh://..., adb...
    bench_threads: tuple[int, ...] = (1,)
    bench_runs: int = 50
    remote_python: str = "python3"
    firmware: tuple[str, ...] = ()  # board names (firmware_assets/boards.toml)
    report_formats: tuple[str, ...] | None = None  # None: all
    seed: int = 0
    allow_pickle: bool = False


@dataclass
class SweepResult:
    out: Path
    combinations: list[dict] = field(default_factory=list)  # name, run, status, reused, seconds, error
    bench: dict | None = None
    firmware: list[dict] = field(default_factory=list)
    report_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.combinations if c["status"] not in COMPLETE]

    def to_json(self) -> dict:
        return {"out": str(self.out), "combinations": self.combinations, "bench": self.bench,
                "firmware": self.firmware, "report_files": self.report_files, "seconds": self.seconds,
                "warnings": self.warnings, "failed": [c["name"] for c in self.failed]}


@dataclass(frozen=True)
class Combination:
    name: str
    variant: str
    img_size: int
    qat: bool
    formats: tuple[str, ...]
    weights: str


# --------------------------------------------------------------------------- the plan

def check(config: SweepConfig) -> None:
    """Refuse a bad sweep before any work (one-line InputErrors)."""
    from edgestar.models.registry import VARIANTS, check_img_size

    if not config.variants:
        raise InputError("--variants is empty")
    for v in config.variants:
        if v not in VARIANTS:
            raise InputError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    bad = [p for p in config.precisions if p not in PRECISIONS]
    if bad or not config.precisions:
        raise InputError(f"unknown precision {(bad or [''])[0]!r}; choose from {', '.join(PRECISIONS)}")
    if not config.img_sizes:
        raise InputError("--img-size is empty")
    for size in config.img_sizes:
        check_img_size(size)
    if config.bench is not None:
        from edgestar.deploy.devices import parse_device

        if parse_device(config.bench).kind not in ("local", "ssh"):
            raise InputError("sweep --bench takes local or ssh://...: the Python runner times every model "
                             "in the same rounds (use edgestar bench for adb and vela:)")
        if any(t < 0 for t in config.bench_threads) or config.bench_runs < 1:
            raise InputError("--bench-threads must be 0 (all cores) or more, --bench-runs at least 1")
    if config.firmware:
        from edgestar.deploy.boards import get_board

        for board in config.firmware:
            get_board(board)
    for option, value, words in (("--calib", config.calib, ("demo", "distilled")), ("--eval", config.eval, ("demo",)),
                                 ("--labels", config.labels, ()), ("--train", config.train, ("demo",))):
        if value is not None and value not in words and not Path(value).exists():
            raise InputError(f"{option} {value} does not exist")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")


def plan(config: SweepConfig) -> list[Combination]:
    """The run directories the sweep needs, in the order they run (smallest variant first)."""
    ptq_formats = tuple(p for p in config.precisions if p in ("fp16", "dynamic"))
    wants_ptq = any(p in config.precisions for p in ("fp32", "fp16", "dynamic", "int8"))
    combos = []
    for variant in config.variants:
        weights = weights_for(config.weights, variant, many=len(config.variants) > 1)
        for size in config.img_sizes:
            if wants_ptq:
                combos.append(Combination(f"{variant}-{size}px", variant, size, False, ptq_formats, weights))
            if "int8-qat" in config.precisions:
                combos.append(Combination(f"{variant}-{size}px-qat", variant, size, True, (), weights))
    return combos


def weights_for(spec: str, variant: str, *, many: bool) -> str:
    """``--weights`` for one variant: demo/official/none as they are; a folder: the one
    checkpoint whose name has the variant as a word (``starnet_s1_cifar10.pt`` is s1, not
    s100); a file: only when the sweep has one variant."""
    import re

    if spec in ("demo", "official", "none"):
        if spec != "none":
            from edgestar.models.checkpoints import resolve_weights

            resolve_weights(spec, variant)  # no demo checkpoint, or offline: say so before any work
        return spec
    path = Path(spec)
    if path.is_file():
        if many:
            raise InputError(f"--weights {path} is one checkpoint but the sweep has several variants; "
                             "pass a folder with one checkpoint per variant")
        return str(path)
    if not path.is_dir():
        raise InputError(f"--weights {spec}: not demo, official, none, a checkpoint file or a folder")
    suffixes = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes
                   and variant.lower() in re.split(r"[^a-z0-9]+", p.stem.lower()))
    if len(found) != 1:
        what = "no checkpoint" if not found else f"{len(found)} checkpoints ({', '.join(p.name for p in found)})"
        raise InputError(f"--weights {path}: {what} named for variant {variant} (e.g. starnet_{variant}.pt)")
    return str(found[0])


def check_checkpoints(combos: list[Combination], *, allow_pickle: bool) -> None:
    """Load every checkpoint into its variant once, before any work: a corrupt, code-carrying
    or mismatched checkpoint is a bad input (exit 2), not a failed combination."""
    from edgestar.models.checkpoints import build_model

    for variant, weights in dict.fromkeys((c.variant, c.weights) for c in combos):
        if weights != "none":
            build_model(variant, weights, allow_pickle=allow_pickle)


def quantize_config(config: SweepConfig, combo: Combination):
    from edgestar.pipeline.config import QuantizeConfig

    return QuantizeConfig(
        variant=combo.variant, weights=combo.weights, img_size=combo.img_size, calib=config.calib,
        calib_samples=config.calib_samples, eval=config.eval, eval_samples=config.eval_samples,
        labels=config.labels, target=config.target, formats=combo.formats, qat=combo.qat,
        train=config.train if combo.qat else None, qat_epochs=config.qat_epochs, qat_steps=config.qat_steps,
        qat_lr=config.qat_lr, qat_batch=config.qat_batch, out=Path(config.out) / combo.name,
        allow_pickle=config.allow_pickle, seed=config.seed)


# --------------------------------------------------------------------------- fingerprints

def source_digest(spec: str | None) -> str | None:
    """A fingerprint of an input: a file by content; a folder by the names, sizes and
    modification times of the files below it (hashing every image of a large folder would
    cost more than many runs); ``demo`` by the shipped folder; None and ``distilled`` as such."""
    if spec is None or spec == "distilled":
        return spec
    if spec == "demo":
        from edgestar.data.images import demo_split

        path = demo_split("calib").parent
    else:
        path = Path(spec)
    return path_fingerprint(path)


def weights_digest(weights: str, variant: str) -> str:
    """The checkpoint by content; ``official`` by its release URL (a fixed file, perhaps not
    downloaded yet); ``none`` as such."""
    from edgestar.models.checkpoints import resolve_weights, sha256_file
    from edgestar.models.registry import VARIANTS

    if weights in ("none", "official"):
        return f"{weights}:{VARIANTS[variant].official_url if weights == 'official' else ''}"
    return sha256_file(resolve_weights(weights, variant))


def combination_key(config: SweepConfig, combo: Combination, digests: dict) -> str:
    """The hash that decides whether a finished run can be kept (see the module docstring)."""
    from edgestar.pipeline.config import config_dict
    from edgestar.pipeline.rundir import tool_versions

    inputs = {"weights": weights_digest(combo.weights, combo.variant), **digests}
    text = json.dumps({"config": config_dict(quantize_config(config, combo)), "versions": tool_versions(),
                       "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def is_complete(run: Path, key: str) -> bool:
    from edgestar.report.runs import read_manifest

    if not (run / "manifest.json").is_file():
        return False
    try:
        manifest = read_manifest(run)
    except InputError:
        return False
    return manifest.get("status") in COMPLETE and (manifest.get("sweep") or {}).get("key") == key


# --------------------------------------------------------------------------- the sweep

def sweep(config: SweepConfig, *, log=None, progress_factory=None) -> SweepResult:
    """Run the sweep (see the module docstring) and write the report into ``config.out``."""
    from edgestar.files import atomic_write_json, ensure_writable_dir

    log = log or (lambda msg: None)
    check(config)
    combos = plan(config)
    check_checkpoints(combos, allow_pickle=config.allow_pickle)
    out = ensure_writable_dir(Path(config.out))
    for c in combos:  # never delete a folder the sweep did not make
        run = out / c.name
        if run.exists() and any(run.iterdir()) and not ((run / "manifest.json").exists()
                                                         or (run / ".incomplete").exists()):
            raise InputError(f"{run} exists and is not an edgestar run directory; choose another --out")
    digests = {"calib": source_digest(config.calib), "eval": source_digest(config.eval or "demo"),
               "labels": source_digest(config.labels),
               "train": source_digest(config.train) if "int8-qat" in config.precisions else None}
    t0 = time.perf_counter()
    result = SweepResult(out=out)
    state = {"sweep_version": SWEEP_VERSION, "started": _now(), "config": _config_json(config),
             "plan": [c.name for c in combos], "combinations": result.combinations}
    atomic_write_json(out / SWEEP_FILE, state)
    redone = False
    for i, combo in enumerate(combos, 1):
        key = combination_key(config, combo, digests)
        run = out / combo.name
        entry = {"name": combo.name, "run": combo.name, "variant": combo.variant, "img_size": combo.img_size,
                 "qat": combo.qat, "formats": ["fp32", "int8", *combo.formats], "key": key}
        if is_complete(run, key):
            manifest = json.loads((run / "manifest.json").read_text())
            entry.update(status=manifest["status"], reused=True, error=None,
                         seconds=(manifest.get("timings_s") or {}).get("total"))
            log(f"[{i}/{len(combos)}] {combo.name}: complete, kept (same inputs, configuration and tools)")
        else:
            if run.exists() and not interrupted_run(run):  # quantize redoes an interrupted one in place,
                shutil.rmtree(run)  # resuming its QAT; a failed or outdated run of this sweep goes
            log(f"[{i}/{len(combos)}] {combo.name}: quantize" + (" with QAT" if combo.qat else ""))
            entry.update(_run_combination(config, combo, key, progress_factory, log), reused=False)
            redone = True
        result.combinations.append(entry)
        atomic_write_json(out / SWEEP_FILE, state)
    complete = [out / c["run"] for c in result.combinations if c["status"] in COMPLETE]
    if config.bench and complete:
        result.bench = _bench(config, complete, redone, log, progress_factory, result)
    if config.firmware and complete:
        result.firmware = _firmware(config, complete, log, result)
    from edgestar.report.build import report

    built = report([out], out=out, formats=config.report_formats, precisions=config.precisions)
    result.report_files = [str(p) for p in built.files]
    result.seconds = round(time.perf_counter() - t0, 2)
    state.update(finished=_now(), seconds=result.seconds, bench=result.bench, firmware=result.firmware,
                 warnings=result.warnings,
                 saved_by_resume_s=round(sum(c["seconds"] or 0 for c in result.combinations if c["reused"]), 1))
    atomic_write_json(out / SWEEP_FILE, state)
    return result


def _run_combination(config: SweepConfig, combo: Combination, key: str, progress_factory, log) -> dict:
    """One quantize run; its failure is recorded (in its run directory) instead of raised."""
    from edgestar.pipeline.quantize import quantize

    qc = quantize_config(config, combo)
    t0 = time.perf_counter()
    try:
        res = quantize(qc, progress_factory=progress_factory, log=log)
    except Exception as exc:  # noqa: BLE001  (a bug in one combination must not end the sweep)
        if interrupt_name(exc):  # a signal's exception that library code turned into another
            raise
        error = str(exc) if isinstance(exc, EdgestarError) else f"{type(exc).__name__}: {exc}"
        stage = _failed_stage(Path(qc.out))
    else:
        _stamp(res.out, combo, key)
        return {"status": res.manifest["status"], "error": None, "seconds": round(time.perf_counter() - t0, 1)}
    if stage is None:  # failed before quantize made the folder (an input): record it as a run
        _record_input_failure(qc, combo, key, error)
        stage = "inputs"
    log(f"FAILED {combo.name} at {stage}: {error}")
    return {"status": "failed", "failed_stage": stage, "error": error, "seconds": round(time.perf_counter() - t0, 1)}


def _failed_stage(run: Path) -> str | None:
    from edgestar.report.runs import failed_stage

    if not (run / "manifest.json").is_file():
        return None
    try:
        return failed_stage(json.loads((run / "manifest.json").read_text()))[0] or "unknown"
    except (OSError, ValueError):
        return None


def _stamp(run: Path, combo: Combination, key: str) -> None:
    """Mark a finished run as this sweep's, for ``key`` (written last: a run killed before
    this is redone)."""
    from edgestar.files import atomic_write_json

    manifest = json.loads((run / "manifest.json").read_text())
    manifest["sweep"] = {"name": combo.name, "key": key}
    atomic_write_json(run / "manifest.json", manifest)


def _record_input_failure(qc, combo: Combination, key: str, error: str) -> None:
    from edgestar.pipeline.config import config_dict
    from edgestar.pipeline.rundir import RunDir, tool_versions

    run = RunDir.create(Path(qc.out), tool="edgestar sweep", created=_now(), config=config_dict(qc),
                        versions=tool_versions(), inputs={})
    run.manifest["model"] = {"variant": combo.variant, "img_size": combo.img_size}
    run.manifest["stages"]["inputs"] = {"status": "failed", "error": error}
    run.manifest["sweep"] = {"name": combo.name, "key": None}  # never complete: retried next time
    run.fail()


def _bench(config: SweepConfig, runs: list[Path], redone: bool, log, progress_factory, result) -> dict:
    """Every model of every complete run timed by ``edgestar bench`` in one call: the models
    take turns within each round, so their ratios compare. Skipped when nothing was redone
    and every run has this device's figures already."""
    from edgestar.deploy.bench import BenchConfig, bench
    from edgestar.deploy.devices import KERNELS, parse_device

    device = parse_device(config.bench).name
    have = all(device in (json.loads((r / "manifest.json").read_text()).get("device_latency") or {})
               for r in runs)
    if have and not redone:
        log(f"bench on {device}: every run has its figures already (nothing was redone), kept")
        return {"device": device, "reused": True}
    log(f"bench on {device}: {len(runs)} runs, every model in each of {config.bench_runs} rounds")
    bc = BenchConfig(device=config.bench, threads=config.bench_threads, kernels=KERNELS,
                     runs=config.bench_runs, remote_python=config.remote_python)
    try:
        res = bench([str(r) for r in runs], bc, log=log, progress_factory=progress_factory)
    except EdgestarError as exc:
        result.warnings.append(f"bench on {device} failed: {exc}")
        log(f"WARNING: bench on {device} failed: {exc}")
        return {"device": device, "reused": False, "error": str(exc)}
    result.warnings.extend(res.warnings + res.store_errors)
    return {"device": device, "reused": False, "seconds": res.seconds, "models": len(res.rows)}


def _firmware(config: SweepConfig, runs: list[Path], log, result) -> list[dict]:
    """``edgestar firmware`` for each complete run's INT8 model and each board (sources, arena
    measured in TFLite Micro, verdict; recorded in the manifest). Kept when the manifest has a
    result for the board from the same model file."""
    from edgestar.deploy.firmware import FirmwareConfig, firmware

    done = []
    for run in runs:
        manifest = json.loads((run / "manifest.json").read_text())
        int8 = (manifest.get("artifacts") or {}).get("tflite_int8")
        if not int8:
            continue
        for board in config.firmware:
            have = (manifest.get("firmware") or {}).get(board) or {}
            entry = {"run": run.name, "board": board}
            if have.get("source_sha256") == int8.get("sha256"):
                done.append({**entry, "reused": True, "fits": have.get("fits")})
                continue
            log(f"firmware {run.name} for {board}: sources, arena in TFLite Micro, fit")
            try:
                fw = firmware(run, FirmwareConfig(board=board, test_images=config.eval or "demo"), log=log)
            except EdgestarError as exc:
                result.warnings.append(f"firmware {run.name} for {board}: {exc}")
                done.append({**entry, "reused": False, "error": str(exc)})
                continue
            done.append({**entry, "reused": False, "fits": fw["verdict"]["fits"], "arena": fw["arena"]["total"]})
    return done


def _config_json(config: SweepConfig) -> dict:
    d = {k: getattr(config, k) for k in config.__dataclass_fields__}
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
