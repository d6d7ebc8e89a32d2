"""The accuracy gate of ``quantize`` (``max_drop``) and, with ``fallback="float"``, the mixed
INT8/float model that may meet it (:mod:`edgestar.quant.fallback`)."""
from __future__ import annotations

from edgestar.pipeline.run import CONVERT_LOG, Run
from edgestar.pipeline.scoring import engine_metrics, evaluate_tflite


def gate(run: Run) -> bool:
    """The ``max_drop`` gate, recorded in the manifest; with ``fallback`` float, a drop beyond
    it first tries a mixed model with the worst tensors kept float. True without a gate."""
    config, m = run.config, run.manifest
    if config.max_drop is None:
        return True
    drop = m["metrics"].get("int8_top1_drop_pt")
    gated = "tflite_int8"
    if drop is not None and drop > config.max_drop and config.fallback == "float":
        if not run.error_rows:
            skipped = m["stages"].get("diagnose", {}).get("skipped", "it was not made")
            why = (f"there is no error table to rank tensors by ({skipped})"
                   if run.error_rows is None else "the error table is empty")
            m["metrics"]["fallback"] = {"ran": False, "why": why}
            run.notes.append(f"--fallback float did not run: {why}")
        else:
            with run.dir.stage("fallback") as rec:
                found = _float_fallback(run, rec)
            if found is not None:
                gated, drop = "tflite_mixed", m["metrics"]["mixed_top1_drop_pt"]
                run.notes.append(
                    f"--fallback float: {run.paths['mixed'].name} keeps {len(found.float_tensors)} "
                    f"tensor(s) in float to meet --max-drop (size x{rec['bytes']['ratio']:.3f}, "
                    f"latency x{rec['latency_ms']['ratio']:.2f} on this machine); the all-INT8 model "
                    "is kept beside it")
            else:
                run.notes.append("--fallback float could not meet --max-drop even with every tensor "
                                 "float; only the all-INT8 model was written")
    passed = drop is not None and drop <= config.max_drop
    m["gate"] = {"max_drop_pt": config.max_drop, "artifact": gated, "int8_top1_drop_pt": drop,
                 "passed": passed}
    run.dir.save()
    return passed


def _float_fallback(run: Run, rec: dict):
    """Build, check and register the mixed INT8/float model (see :mod:`edgestar.quant.fallback`)."""
    from edgestar.convert.deployable import check_deployable
    from edgestar.convert.tflite_file import op_counts, read_metadata
    from edgestar.evaluate.runners import compare_latency
    from edgestar.quant.fallback import float_fallback

    rows = run.error_rows
    mixed = run.dir.staged(run.artifact_name("mixed"))
    metadata = {**read_metadata(run.paths["int8"]), "format": "mixed"}
    rec["tried"] = []
    found = float_fallback(
        run.calibrated, [r["tensor"] for r in rows], ref_top1=run.engines["torch_fp32"]["top1"],
        max_drop=run.config.max_drop, io_type=run.config.io_type, metadata=metadata, out=mixed,
        log_path=run.scratch / CONVERT_LOG, tried=rec["tried"],
        evaluate=lambda path: evaluate_tflite({"tflite_mixed": path}, run.reference, {}, run.pre,
                                              run.eval.folder, None, run.batch)["tflite_mixed"])
    if found is None:
        return None
    check_deployable(mixed, "mixed")
    run.paths["mixed"] = mixed
    int8 = run.paths["int8"]
    latency = compare_latency({"int8": int8, "mixed": mixed})
    where = {r["tensor"]: r["where"] for r in rows}
    rec["float_tensors"] = [where[t] for t in found.float_tensors]
    rec["bytes"] = {"int8": int8.stat().st_size, "mixed": mixed.stat().st_size,
                    "ratio": mixed.stat().st_size / int8.stat().st_size}
    rec["latency_ms"] = {**latency, "ratio": latency["mixed"] / latency["int8"],
                         "how": "median of 30 interleaved single-image runs, XNNPACK, 1 thread"}
    rec["ops"] = dict(sorted(op_counts(mixed).items()))
    run.dir.add_artifact("tflite_mixed", mixed, io_type=run.config.io_type,
                         float_tensors=len(found.float_tensors))
    run.engines["tflite_mixed"] = found.stats
    metrics = run.manifest["metrics"]
    mixed_metrics = engine_metrics(run.engines, len(run.eval.folder), run.eval.labelled, "tflite_mixed")
    metrics["tflite_mixed"] = mixed_metrics["tflite_mixed"]
    metrics["mixed_top1_drop_pt"] = mixed_metrics["int8_top1_drop_pt"]
    metrics["fallback"] = {"ran": True, **{k: rec[k] for k in ("float_tensors", "bytes", "latency_ms")}}
    return found
