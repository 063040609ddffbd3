"""Human-readable summary of a result file (``mpilayer info c.h5``).

The summary is built from what the file holds rather than from a fixed schema:
known attributes get a headline and go first, every other /C attribute is still
listed, so results written by newer versions stay describable.
"""

import math

import numpy as np

from mpilayer.io.result_store import _python_value, read_result

__all__ = ["describe_result", "KNOWN_ATTRS"]

#: Attributes listed first, in this order, when present.
KNOWN_ATTRS = (
    "resolution",
    "n_resolutions",
    "exact",
    "error_bound",
    "stopped_by",
    "elapsed_s",
    "deadline_s",
    "inputs",
    "a",
    "b",
    "input_a",
    "input_b",
    "a_dtype",
    "b_dtype",
    "bits",
    "split",
    "components",
    "component_bits",
    "n_ranks",
    "tile_shape",
    "min_tile_resolution",
    "max_tile_error_bound",
    "publish_seq",
    "format",
    "format_version",
)

#: Histograms with more levels than this show only the levels that occur.
MAX_HISTOGRAM_LEVELS = 32
BAR_WIDTH = 40


def describe_result(path):
    """Summarise a published result file.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    str
        Several lines: headline (shape, dtype, resolution reached, exactness,
        certified error bound, stop reason, time), all /C attributes aligned,
        a histogram of tile resolutions and the timeline as a table.

    Raises
    ------
    InputError
        For a missing or corrupt file, or one that is not an mpilayer result.
    """
    if not _has_c(path):
        return describe_other(path)
    result = read_result(path, max_c_bytes=0)
    sections = [
        [f"{path}: mpilayer result"] + _indent(_aligned(_headline(result))),
        ["attributes of /C:"] + _indent(_aligned(_ordered_attrs(result["attrs"]))),
        _histogram(result["tile_resolution"], result["attrs"].get("n_resolutions")),
        _timeline(result["timeline"]),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _has_c(path) -> bool:
    """Whether ``path`` is an HDF5 file with a /C dataset (the others get :func:`describe_other`;
    a missing or unreadable file is left to read_result's one-line error)."""
    import h5py

    from mpilayer.io.h5io import open_h5
    try:
        with open_h5(path, "r") as f:
            return isinstance(f.get("C"), h5py.Dataset)
    except (OSError, RuntimeError, ValueError):
        return True


#: What the other commands write, told apart by a dataset only they write.
OTHER_KINDS = (("items", "stream result (mpilayer stream)"), ("predictions", "inference result (mpilayer infer)"),
               ("per_resolution", "adaptive result (mpilayer adaptive)"))
MAX_TABLE_ROWS = 40


def describe_other(path) -> str:
    """Summary of an output without /C (stream, infer, adaptive): the file's attributes, every
    dataset's shape and type, and each table (a 1-D compound dataset) aligned, its first
    :data:`MAX_TABLE_ROWS` rows."""
    import h5py

    from mpilayer.errors import InputError, one_line
    from mpilayer.io.h5io import open_h5
    try:
        with open_h5(path, "r") as f:
            kind = next((label for name, label in OTHER_KINDS if name in f), None)
            if kind is None:
                raise InputError(f"{path}: not an mpilayer result (no /C dataset)")
            attrs = [(key, _format(_python_value(value))) for key, value in f.attrs.items()]
            datasets, tables = [], []

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    datasets.append((f"/{name}", f"{' x '.join(map(str, obj.shape)) or 'scalar'} {obj.dtype}"
                                     if obj.dtype.names is None else f"{obj.shape[0]} rows"))
                    if obj.dtype.names is not None and obj.ndim == 1:
                        tables.append((f"/{name}", obj[:MAX_TABLE_ROWS], obj.shape[0]))
            f.visititems(visit)
    except (OSError, RuntimeError, ValueError) as err:
        raise InputError(f"{path}: cannot read ({one_line(err)})") from err
    sections = [[f"{path}: mpilayer {kind}"] + _indent(_aligned(attrs)), ["datasets:"] + _indent(_aligned(datasets))]
    for name, table, rows in tables:
        lines = _timeline(table)[1:]
        more = [f"  ... {rows - len(table)} more rows"] if rows > len(table) else []
        sections.append([f"{name}:"] + lines + more)
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _indent(lines, prefix="  "):
    return [prefix + line for line in lines]


def _aligned(pairs):
    """``key  value`` lines with the values in one column."""
    width = max((len(key) for key, _ in pairs), default=0)
    return [f"{key:<{width}}  {value}" for key, value in pairs]


def _headline(result):
    attrs, tiles = result["attrs"], result["tile_resolution"]
    shape = " x ".join(str(n) for n in result["shape"])
    pairs = [("C", f"{shape} {result['dtype']}{_tiling(attrs, tiles)}")]
    n_res = attrs.get("n_resolutions")
    reached = attrs.get("resolution", attrs.get("min_tile_resolution"))
    if reached is not None:
        pairs.append(("resolution", _resolution_text(reached, n_res)))
    if "exact" in attrs:
        pairs.append(("exact", _yes_no(attrs["exact"])))
    bound = attrs.get("error_bound", attrs.get("max_tile_error_bound"))
    if bound is not None:
        pairs.append(("error bound", f"{_format(bound)} (certified max |C - P| over entries, P = the exact "
                                     "product of the quantised operands)"))
    estimate = attrs.get("error_estimate")
    if estimate is not None and np.isfinite(estimate):
        pairs.append(("relative error", f"{float(estimate):.3g} estimated (|C - P|_F / |P|_F; "
                                        "statistical, not certified)"))
    quant = attrs.get("quantization_error_estimate")
    if quant is not None and np.isfinite(quant) and quant > 0:
        pairs.append(("quantisation", f"{float(quant):.3g} estimated (|A B - P|_F / |P|_F for the real "
                                      "inputs, from rounding them to fixed point; statistical)"))
    if "stopped_by" in attrs:
        pairs.append(("stopped by", _format(attrs["stopped_by"])))
    if "elapsed_s" in attrs or "deadline_s" in attrs:
        pairs.append(("time", _time_text(attrs.get("elapsed_s"), attrs.get("deadline_s"))))
    return pairs


def _tiling(attrs, tiles):
    if tiles is None or "tile_shape" not in attrs:
        return ""
    tile = " x ".join(str(n) for n in attrs["tile_shape"])
    return f", {tiles.shape[0]} x {tiles.shape[1]} tiles of {tile}"


def _resolution_text(reached, n_res):
    if isinstance(reached, (int, np.integer)) and reached < 0:
        text = "none completed"
    else:
        text = str(reached)
    if isinstance(n_res, (int, np.integer)):
        text += f" of 0..{n_res - 1}" + (" (final)" if reached == n_res - 1 else "")
    return text


def _yes_no(value):
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return _format(value)


def _time_text(elapsed, deadline):
    parts = []
    if elapsed is not None:
        parts.append(f"elapsed {_format(elapsed)} s")
    if _no_deadline({"deadline_s": deadline}) or deadline in ("none", ""):
        parts.append("no deadline")
    else:
        parts.append(f"deadline {_format(deadline)} s")
    return ", ".join(parts)


#: Attributes that repeat another one under an older name: not listed when they agree.
DUPLICATES = {"resolutions_total": "n_resolutions"}


def _no_deadline(attrs):
    deadline = attrs.get("deadline_s")
    return deadline is None or isinstance(deadline, (int, float, np.number)) and deadline < 0


def _ordered_attrs(attrs):
    shown = {key: value for key, value in attrs.items()
             if not (key in DUPLICATES and _same(value, attrs.get(DUPLICATES[key])))}
    if _no_deadline(attrs):  # stored as -1 (deadline) and 0 (overshoot) when the run had none
        shown.update({key: "none" for key in ("deadline_s", "overshoot_s") if key in attrs})
    known = [key for key in KNOWN_ATTRS if key in shown]
    rest = sorted(key for key in shown if key not in KNOWN_ATTRS)
    return [(key, _format(shown[key])) for key in known + rest]


def _same(a, b):
    try:
        return b is not None and bool(np.all(np.asarray(a) == np.asarray(b)))
    except (TypeError, ValueError):
        return False


def _format(value):
    """Compact text for an attribute or table cell."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    if isinstance(value, (tuple, list, np.ndarray)):
        return ", ".join(_format(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _histogram(tiles, n_res):
    """One bar per resolution level: where the tiles are."""
    if tiles is None:
        return []
    levels, counts = np.unique(tiles, return_counts=True)
    found = dict(zip(levels.tolist(), counts.tolist()))
    shown = sorted(found)
    if isinstance(n_res, int) and n_res <= MAX_HISTOGRAM_LEVELS:
        shown = sorted(set(range(n_res)) | set(found))
    biggest = max(counts.max(), 1)
    rows = []
    for level in shown:
        count = found.get(level, 0)
        bar = "#" * math.ceil(BAR_WIDTH * count / biggest)
        rows.append(("none" if level < 0 else str(level), f"{count:>{len(str(tiles.size))}}  {bar}".rstrip()))
    return [f"tile resolutions ({tiles.size} tiles):"] + _indent(_aligned([("resolution", "tiles")] + rows))


def _timeline(table):
    """The timeline as an aligned table: numbers right, text left."""
    if table is None or len(table) == 0:
        return []
    names = list(table.dtype.names)
    cells = [[_format(row[name]) for name in names] for row in table]
    widths = [max(len(name), *(len(r[i]) for r in cells)) for i, name in enumerate(names)]
    numeric = [table.dtype[name].kind in "iufb" for name in names]

    def line(values):
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    return ["timeline:"] + _indent([line(names)] + [line(r) for r in cells])
