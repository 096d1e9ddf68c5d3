"""CLI verbs that run a pipeline over many nets: ``convert``.

A thin wrapper over :func:`surgery.convert.run_batch`: the nets are converted in worker
processes, which import torch, onnx and OpenCV; this module and the parent process do not.
Exit codes: 0 every net ok, unsupported, invalid or skipped; 1 a net mismatched or failed;
2 bad arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import CliError

__all__ = ["register", "cmd_convert"]


def _csv(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
    if items == ("none",):
        return ()
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise CliError(f"{what} {value!r}: expected a comma-separated list of "
                       f"{', '.join(allowed)} (or none)")
    return items


def _jobs_list(args: argparse.Namespace) -> tuple[list[Path], list[str]]:
    from ..convert import discover, net_name

    paths: list[Path] = []
    names: list[str] = []
    # one folder: names relative to it (bvlc_alexnet/deploy); else folder/stem
    single = len(args.paths) == 1 and Path(args.paths[0]).is_dir()
    for arg in args.paths:
        p = Path(arg)
        if not p.exists():
            raise CliError(f"{arg}: no such file or folder")
        found = discover([p])
        for f in found:
            name = net_name(f, p if single else None)
            if f in paths:
                continue
            base, n = name, 2
            while name in names:
                name, n = f"{base}~{n}", n + 1
            paths.append(f)
            names.append(name)
    keep = [i for i, n in enumerate(names)
            if (not args.only or any(fnmatch.fnmatch(n, g) for g in args.only))
            and not any(fnmatch.fnmatch(n, g) for g in args.skip)]
    return [paths[i] for i in keep], [names[i] for i in keep]


def _progress_printer(stream: Any) -> Any:
    tty = stream.isatty()

    def minutes(s: float | None) -> str:
        if s is None:
            return "time left unknown"
        return f"~{s / 60:.0f}m left" if s >= 90 else f"~{s:.0f}s left"

    def show(ev: Any) -> None:
        if ev.event == "start":
            if tty:
                stream.write(f"\r\033[K[{ev.done}/{ev.total}] converting "
                             f"{', '.join(ev.running)} ({minutes(ev.eta)})")
                stream.flush()
            return
        r = ev.result
        what = "unchanged, reused" if r.reused else f"{r.seconds:.1f}s"
        running = f"; running {', '.join(ev.running)}" if ev.running else ""
        line = (f"[{ev.done}/{ev.total}] {r.name}: {r.status[:120]} (weights "
                f"{r.weights or '-'}, {what}){running}; {minutes(ev.eta)}")
        stream.write(("\r\033[K" if tty else "") + line + "\n")
        stream.flush()

    return show


def cmd_convert(args: argparse.Namespace) -> int:
    """``surgery convert``."""
    from ..caffe_io import write_text_atomic
    from ..convert import ConvertOptions, counts, markdown_report, parse_shape_rules, run_batch
    from ..convert import table as make_table

    to = _csv(args.to, ("onnx", "torch"), "--to")
    verify_given = args.verify is not None
    verify = list(_csv(args.verify or "onnxruntime,torch,opencv",
                       ("onnxruntime", "torch", "opencv", "caffe"), "--verify"))
    if args.caffe:
        if not os.access(args.caffe, os.X_OK) or Path(args.caffe).is_dir():
            raise CliError(f"--caffe {args.caffe}: not an executable wrapper (e.g. "
                           "refcaffe/pycaffe)")
        if "caffe" not in verify and not verify_given:
            verify.append("caffe")
    elif "caffe" in verify:
        raise CliError("--verify caffe needs --caffe PYCAFFE (the python that imports caffe)")
    if "opencv" in verify and importlib.util.find_spec("cv2") is None:
        if verify_given:
            raise CliError("--verify opencv: OpenCV (cv2) is not installed: "
                           "pip install 'caffe-surgery[all]'")
        verify.remove("opencv")
    if args.jobs is not None and args.jobs < 1:
        raise CliError(f"--jobs {args.jobs}: give 1 or more")
    if args.timeout is not None and args.timeout <= 0:
        raise CliError(f"--timeout {args.timeout}: give a positive number of seconds")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CliError(f"-o {args.output}: a file; give a folder (created if missing)")
    if not out.parent.is_dir():
        raise CliError(f"-o {args.output}: folder {out.parent} does not exist")
    for opt in ("report", "json"):
        value = getattr(args, opt)
        if value and not Path(value).resolve().parent.is_dir():
            raise CliError(f"--{opt} {value}: folder {Path(value).parent} does not exist")
    try:
        rules = parse_shape_rules(args.input_shape)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    paths, names = _jobs_list(args)
    if not paths:
        raise CliError("no net definition found (or every one left out by --only/--skip)")
    opts = ConvertOptions(to=to, verify=tuple(verify), caffe=args.caffe, seed=args.seed,
                          tolerance=args.tolerance, random_weights=args.random_weights,
                          shape_rules=rules, keep_references=args.keep_references)
    print(f"surgery convert: {len(paths)} net(s) -> {out}; exports {', '.join(to) or 'none'}; "
          f"verify {', '.join(verify) or 'none'}", file=sys.stderr, flush=True)
    start = time.monotonic()
    results = run_batch(paths, out, opts, names=names, jobs=args.jobs, timeout=args.timeout,
                        resume=not args.no_resume, progress=_progress_printer(sys.stderr))
    fresh = sum(not r.reused for r in results)
    print(f"surgery convert: {len(results)} net(s) in {time.monotonic() - start:.0f}s "
          f"({fresh} converted, {len(results) - fresh} unchanged)", file=sys.stderr)
    print(make_table(results))
    if args.report:
        write_text_atomic(args.report, markdown_report(results))
    if args.json:
        from dataclasses import asdict

        doc = {"counts": counts(results), "nets": [{**asdict(r), "failed": r.failed}
                                                     for r in results]}
        write_text_atomic(args.json, json.dumps(doc, indent=1, default=str))
    return 1 if any(r.failed for r in results) else 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert many nets (a model zoo) to ONNX and PyTorch, each verified blob by blob",
        description="Convert every net definition under PATH... in worker processes: export "
        "to OUT/NAME/model.onnx and OUT/NAME/torch/, run onnxruntime, torch, OpenCV (and Caffe "
        "with --caffe) on a seeded random input and compare every blob. A rerun reuses the "
        "nets whose inputs and outputs are unchanged (OUT/convert.json). Exit 1 when a net "
        "mismatches or fails.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="prototxt files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--to", default="onnx,torch", help="exports written (default onnx,torch)")
    p.add_argument("--verify", default=None, metavar="BACKENDS",
                   help="backends run and compared: onnxruntime,torch,opencv,caffe or none "
                   "(default onnxruntime,torch,opencv -- opencv when installed -- plus caffe "
                   "with --caffe)")
    p.add_argument("--caffe", metavar="PYCAFFE",
                   help="also compare with the real Caffe run through this python wrapper")
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help="worker processes (default: the CPU count)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds one net may take; its worker is then killed (default: none)")
    p.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="convert only nets whose name (folder/stem) matches; repeatable")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB",
                   help="leave out nets whose name matches; repeatable")
    p.add_argument("--input-shape", action="append", default=[],
                   metavar="[NET_GLOB:]BLOB=N,C,H,W", help="shape of an input blob (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random weights and inputs (default 0)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest relative error of a blob counted as equal (default 1e-4)")
    p.add_argument("--random-weights", action="store_true",
                   help="never use a caffemodel found beside a net")
    p.add_argument("--keep-references", action="store_true",
                   help="keep the files OpenCV/Caffe read (OUT/NAME/net.prototxt, "
                   "weights.caffemodel; default: a temp folder)")
    p.add_argument("--no-resume", action="store_true",
                   help="convert every net again, even those unchanged since the last run")
    p.add_argument("--report", metavar="REPORT.md", help="write the table as Markdown")
    p.add_argument("--json", metavar="J", help="write every row as JSON")
    p.set_defaults(func=cmd_convert)
