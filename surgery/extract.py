"""Feature extraction: the job of Caffe's ``extract_features`` tool, on the PyTorch export.

:func:`extract_features` exports the net to PyTorch with the requested blobs as outputs
(:func:`surgery.export.torch.to_torch` with ``outputs=``: only the layers they depend on),
runs it over the input's first axis in batches, and returns one array per blob with the
samples stacked. Values are Caffe's, blob by blob: a blob rewritten by an in-place layer is
read after it (``fc7`` after ``relu7``), as ``extract_features`` reads it after the forward
pass; ``<blob>@<layer>`` names an earlier version.

Inputs are arrays (``.npy`` for a one-input net, ``.npz`` with one array per input name) or a
folder of images, read and preprocessed as the net's own data layer does (Caffe's
``DataTransformer`` from :mod:`surgery.data.transform`): :func:`load_inputs`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ._inputs import load_numpy
from .errors import SurgeryError
from .net import Net

__all__ = ["extract_features", "load_inputs", "save_features"]

Progress = Callable[[int, int], None]


def load_inputs(
    path: str | os.PathLike[str], net: Net, phase: str = "TEST",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Read the samples to run: ``X.npy`` (a one-input net), ``X.npz`` (one array per input
    name; one array for a one-input net may have any name) or a folder of images.

    Raises:
        SurgeryError: unreadable file or image, missing input, or a folder for a net without
            a data layer to take the preprocessing from.
    """
    from .verify import net_input_shapes

    names = list(net_input_shapes(net, phase, input_shapes))
    p = Path(path)
    if p.is_dir():
        return _images(p, net, phase, names)
    if p.suffix == ".npy":
        if len(names) != 1:
            raise SurgeryError(f"{p}: a .npy holds one array, but the net has inputs {names}; "
                               "save an .npz with one array per input name")
        arr = load_numpy(p, "input")
        if not isinstance(arr, np.ndarray):
            raise SurgeryError(f"{p}: an .npz archive named .npy; rename it .npz")
        return {names[0]: np.asarray(arr, dtype=np.float32)}
    loaded = load_numpy(p, "input")
    if isinstance(loaded, np.ndarray):
        loaded = {names[0] if len(names) == 1 else "arr_0": loaded}
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in loaded.items()}
    if len(arrays) == 1 and len(names) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise SurgeryError(f"{p}: no array for input(s) {missing}; it holds {sorted(arrays)}")
    return {n: arrays[n] for n in names}


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _images(folder: Path, net: Net, phase: str, names: list[str]) -> dict[str, np.ndarray]:
    """A folder of images, preprocessed as the net's own data layer does.

    Rules:

    1. The preprocessing is the ``transform_param`` of the ``phase`` net's data layer whose
       first top is the net's input (a train_val definition; a deploy net has none and is
       refused): Caffe's ``DataTransformer`` (:class:`surgery.data.transform.Transformer`,
       TEST: centre crop, no mirror unless the layer mirrors), mean file or values, scale.
    2. Images are the folder's files with an image suffix, in name order, read by OpenCV as
       Caffe reads them: BGR (grey with ``is_color: false`` or ``force_gray``), 0-255.
    3. Size before the transform: ImageData's ``new_height``/``new_width``; else the mean
       file's size (the size of the images the mean was computed on); else as read.
    """
    try:
        from .data.mean import read_mean
        from .data.source import resolve_path
        from .data.transform import Transformer, TransformParam
    except ImportError as exc:  # pragma: no cover - an install without surgery.data
        raise SurgeryError(
            f"{folder} is a folder: reading images with the net's own preprocessing needs "
            f"surgery.data ({exc}); preprocess the images yourself and pass X.npy / X.npz"
        ) from None
    from .dataflow import resolve
    from .layers import is_data
    from .net import NetState

    flow = resolve(net, NetState(phase))
    layer = next((n.layer for n in flow.nodes if is_data(n.layer) and n.layer.tops
                  and n.layer.tops[0] in names and n.layer.type in ("Data", "ImageData")),
                 None)
    if layer is None:
        raise SurgeryError(
            f"{folder} is a folder of images, but {net.source or 'the net'} has no Data or "
            f"ImageData layer in {phase} to take the preprocessing from (crop, mean, scale); "
            "pass the train_val definition (same layer names, so the same weights), or "
            "preprocess the images yourself (BGR, 0-255, mean subtracted) into X.npy / X.npz"
        )
    where = f"{net.source or 'net'}: layer {layer.name!r} ({layer.type}): "
    param = TransformParam.from_dict(layer.extra.get("transform_param"), where)
    mean = None
    if param.mean_file is not None:
        r = resolve_path(param.mean_file, "transform_param.mean_file", net_source=net.source,
                         where=where, must_be="file")
        mean = read_mean(r.path)
    transform = Transformer(param, phase, mean=mean, where=where)
    opts = layer.attrs if layer.type == "ImageData" else {}
    grey = param.force_gray or not bool(opts.get("is_color", True))
    size = (int(opts.get("new_height", 0)), int(opts.get("new_width", 0)))
    if not all(size) and mean is not None:
        size = (int(mean.shape[1]), int(mean.shape[2]))
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise SurgeryError(f"{folder}: no image files ({', '.join(_IMAGE_SUFFIXES)})")
    import cv2

    rng = np.random.default_rng(0)  # only used when the layer mirrors
    out = []
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
        if img is None:
            raise SurgeryError(f"{f}: cannot decode the image")
        if all(size) and img.shape[:2] != size:
            img = cv2.resize(img, (size[1], size[0]))
        chw = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
        out.append(transform(chw, rng if transform.random else None, item=str(f)))
    try:
        return {layer.tops[0]: np.stack(out)}
    except ValueError:
        raise SurgeryError(f"{folder}: the images have different sizes after the transform "
                           f"({sorted({o.shape for o in out})}); set crop_size or resize "
                           "them") from None


def extract_features(
    net: Net,
    blobs: Sequence[str],
    inputs: Mapping[str, np.ndarray] | np.ndarray,
    *,
    batch: int | None = None,
    phase: str = "TEST",
    progress: Progress | None = None,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Run ``net`` on every sample of ``inputs`` and return the values of ``blobs``.

    Rules:

    1. Each blob name is the blob's last version (Caffe's value after the forward pass: after
       an in-place ReLU); ``<blob>@<layer>`` the version ``<layer>`` wrote. Unknown names are
       an error with the closest names. Only the layers the blobs depend on need weights.
    2. The samples are the first axis of the inputs (every input the same count). They run in
       batches of ``batch`` (default: the net's own batch size, as ``extract_features`` uses
       the data layer's), at most the sample count; a short last batch is padded with zeros
       and the padding's results dropped (TEST-phase layers treat samples independently).
    3. The export is built for ``(batch, *sample shape)``, so shape inference checks the
       sample shape against the weights (a wrong image size is named, not broadcast).
    4. The result holds one float32 array per blob, ``(samples, *blob shape[1:])``.

    Args:
        net: the net, with weights.
        blobs: blob names.
        inputs: arrays by input name, or one array for a one-input net.
        batch: samples per forward pass.
        phase: the phase whose layers run (TEST).
        progress: called with (samples done, total) after each batch.
        device: torch device for the forward passes ("cpu", "cuda").

    Returns:
        ``{blob name: array}`` in the order of ``blobs``.

    Raises:
        SurgeryError: unknown blobs or inputs, inconsistent sample counts, a bad batch size,
            or the export's errors (unsupported layers, missing weights, shape mismatch).
    """
    import torch

    from .export.torch import to_torch
    from .verify import net_input_shapes

    phase = phase.upper()
    names = list(dict.fromkeys(blobs))
    declared = net_input_shapes(net, phase)
    if not isinstance(inputs, Mapping):
        if len(declared) != 1:
            raise SurgeryError(f"one array given, but the net has inputs {list(declared)}")
        inputs = {next(iter(declared)): inputs}
    missing = [n for n in declared if n not in inputs]
    if missing:
        raise SurgeryError(f"no array for input(s) {missing}; the net's inputs are "
                           f"{list(declared)}")
    arrays = {n: np.ascontiguousarray(inputs[n], dtype=np.float32) for n in declared}
    counts = {n: (a.shape[0] if a.ndim else 0) for n, a in arrays.items()}
    total = next(iter(counts.values()), 0)
    if any(c != total for c in counts.values()) or total == 0:
        raise SurgeryError(f"every input needs the same, non-zero number of samples on its "
                           f"first axis; got {counts}")
    for n, a in arrays.items():
        want = declared[n]
        if want is not None and len(want) != a.ndim:
            raise SurgeryError(f"input {n!r} has shape {a.shape}; the net expects {len(want)} "
                               f"axes like {tuple(want)} (samples on the first axis)")
    if batch is None:
        own = [s[0] for s in declared.values() if s]
        batch = own[0] if own else 1
    if batch <= 0:
        raise SurgeryError(f"batch must be positive, got {batch}")
    batch = min(batch, total)
    shapes = {n: (batch, *a.shape[1:]) for n, a in arrays.items()}
    model = to_torch(net, phase, shapes, outputs=names).to(device)
    model.train(False)  # TEST semantics: Dropout off, BatchNorm global statistics
    order = list(model.input_names)
    chunks: dict[str, list[np.ndarray]] = {b: [] for b in names}
    done = 0
    with torch.inference_mode():
        while done < total:
            n = min(batch, total - done)
            args = []
            for name in order:
                x = arrays[name][done:done + n]
                if n < batch:  # rule 2: pad the last batch
                    x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
                args.append(torch.from_numpy(x).to(device))
            out = model(*args)
            for b in names:
                chunks[b].append(out[b][:n].float().cpu().numpy())
            done += n
            if progress is not None:
                progress(done, total)
    return {b: np.concatenate(chunks[b]) for b in names}


def save_features(path: str | os.PathLike[str], features: Mapping[str, np.ndarray]) -> None:
    """Write ``{blob: array}`` to an ``.npz`` atomically (temp file + rename).

    Raises:
        SurgeryError: the file cannot be written (``path`` is left untouched).
    """
    import io

    from .caffe_io import write_bytes_atomic

    buf = io.BytesIO()
    np.savez(buf, **dict(features))
    write_bytes_atomic(path, buf.getvalue())
