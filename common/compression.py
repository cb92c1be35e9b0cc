"""Compressed model updates (strategy.compression). A hospital sends its update (trained minus
the model it received), not its weights, encoded as:

* fp16: the update in float16 (50 % of fp32);
* int8 / int4: blockwise symmetric quantisation: each block of `block` values has one float32
  scale (its largest magnitude / 127 or / 7) and the values as signed 8- or 4-bit codes (two per
  byte); ~25 % / ~13 % of fp32 plus 4 bytes per block;
* optionally top-k first: only the `topk` share of values with the largest magnitudes, with
  their int32 positions, then the codec above on them.

With error feedback (on by default) the hospital keeps what the encoding lost (the residual)
and adds it to the next round's update, so the error does not build up over rounds; the
residual never leaves the hospital. Both sides run the same approved bundle: the server knows
the codec, block size and top-k share from its own config and the shapes from the model it
sent, so a compressed record holds nothing but codes, scales and positions.

Arrays that are not floating point (a batch-norm counter) go as they are. A record that does
not decode to the model's arrays raises CompressionError naming the array."""

from __future__ import annotations

import hashlib
import math

import numpy as np

CODECS = ("none", "fp16", "int8", "int4")
LEVELS = {"int8": 127, "int4": 7}
DOWNLINK = "downlink"  # a task's config record saying how its model arrays are sent (server/engine/downlink.py)


class CompressionError(ValueError):
    """A compressed update that does not decode to the model's arrays."""


def _blocks(flat: np.ndarray, block: int) -> np.ndarray:
    pad = (-len(flat)) % block
    return np.pad(flat, (0, pad)).reshape(-1, block)


def _quantise(values: np.ndarray, codec: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) of a float vector."""
    levels = LEVELS[codec]
    rows = _blocks(values.astype(np.float32), block)
    scales = np.abs(rows).max(axis=1) / levels
    safe = np.where(scales > 0, scales, 1.0)
    codes = np.clip(np.rint(rows / safe[:, None]), -levels, levels).astype(np.int8).reshape(-1)[:len(values)]
    if codec == "int4":  # two 4-bit codes per byte
        nibbles = (codes + 8).astype(np.uint8)
        if len(nibbles) % 2:
            nibbles = np.append(nibbles, np.uint8(8))
        codes = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    return codes, scales.astype(np.float32)


def _dequantise(codes: np.ndarray, scales: np.ndarray, n: int, codec: str, block: int) -> np.ndarray:
    if codec == "int4":
        if codes.dtype != np.uint8 or len(codes) != (n + 1) // 2:
            raise CompressionError(f"holds {len(codes)} {codes.dtype} codes, {(n + 1) // 2} uint8 expected")
        both = np.empty(len(codes) * 2, dtype=np.int8)
        both[0::2] = (codes & 0x0F).astype(np.int8) - 8
        both[1::2] = (codes >> 4).astype(np.int8) - 8
        values = both[:n]
    else:
        if codes.dtype != np.int8 or len(codes) != n:
            raise CompressionError(f"holds {len(codes)} {codes.dtype} codes, {n} int8 expected")
        values = codes
    blocks = math.ceil(n / block) if n else 0
    if scales.dtype != np.float32 or scales.shape != (blocks,) or not np.all(np.isfinite(scales)):
        raise CompressionError(f"holds {scales.shape} {scales.dtype} scales, ({blocks},) finite float32 expected")
    rows = _blocks(values.astype(np.float32), block) * scales[:, None]
    return rows.reshape(-1)[:n]


def encode(update: dict[str, np.ndarray], codec: str, block: int = 256, topk: float | None = None) -> dict[str, np.ndarray]:
    """The arrays of a compressed update: per array `N`, `q:N` (codes or float16 values),
    `s:N` (int8/int4 scales), `i:N` (top-k positions); `r:N` for a non-float array, as it is."""
    out: dict[str, np.ndarray] = {}
    for name, value in update.items():
        if not np.issubdtype(value.dtype, np.floating):
            out[f"r:{name}"] = value
            continue
        flat = value.astype(np.float32).reshape(-1)
        if topk is not None:
            keep = max(1, int(math.ceil(topk * len(flat))))
            index = np.sort(np.argpartition(np.abs(flat), len(flat) - keep)[len(flat) - keep:]).astype(np.int32)
            out[f"i:{name}"], flat = index, flat[index]
        if codec in ("none", "fp16"):  # none: top-k alone, the kept values as they are
            out[f"q:{name}"] = flat.astype(np.float16 if codec == "fp16" else np.float32)
        else:
            out[f"q:{name}"], out[f"s:{name}"] = _quantise(flat, codec, block)
    return out


def decode(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray], codec: str, block: int = 256,
           topk: float | None = None) -> dict[str, np.ndarray]:
    """The update (in the reference's shapes and dtypes) a compressed record holds;
    CompressionError where it holds anything else or does not fit the model."""
    expected: set[str] = set()
    update: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        if not np.issubdtype(ref.dtype, np.floating):
            key = f"r:{name}"
            expected.add(key)
            raw = arrays.get(key)
            if raw is None or raw.shape != ref.shape or raw.dtype != ref.dtype:
                raise CompressionError(f"{name}: missing or not {ref.dtype}{list(ref.shape)}")
            update[name] = raw
            continue
        keys = [f"q:{name}"] + ([f"s:{name}"] if codec in LEVELS else []) + ([f"i:{name}"] if topk is not None else [])
        expected.update(keys)
        if any(k not in arrays for k in keys):
            raise CompressionError(f"{name}: {', '.join(k for k in keys if k not in arrays)} missing")
        n = ref.size
        count = n
        if topk is not None:
            index = arrays[f"i:{name}"]
            count = max(1, int(math.ceil(topk * n)))
            if index.dtype != np.int32 or index.shape != (count,) or (count and (index.min() < 0 or index.max() >= n)) \
                    or np.any(np.diff(index) <= 0):
                raise CompressionError(f"{name}: its top-k positions are not {count} increasing int32 below {n}")
        try:
            if codec in ("none", "fp16"):
                q, kind = arrays[f"q:{name}"], np.float16 if codec == "fp16" else np.float32
                if q.dtype != kind or q.shape != (count,):
                    raise CompressionError(f"holds {q.dtype}{list(q.shape)}, {np.dtype(kind)}[{count}] expected")
                values = q.astype(np.float32)
            else:
                values = _dequantise(arrays[f"q:{name}"].reshape(-1), arrays[f"s:{name}"].reshape(-1), count, codec, block)
        except CompressionError as exc:
            raise CompressionError(f"{name}: {exc}") from None
        if not np.all(np.isfinite(values)):
            raise CompressionError(f"{name}: holds NaN or Inf")
        if topk is not None:
            full = np.zeros(n, dtype=np.float32)
            full[arrays[f"i:{name}"]] = values
            values = full
        update[name] = values.reshape(ref.shape).astype(ref.dtype)
    extra = sorted(set(arrays) - expected)
    if extra:
        raise CompressionError(f"it holds arrays the model has not: {', '.join(extra[:3])}")
    return update


def compress(trained: dict[str, np.ndarray], received: dict[str, np.ndarray], residual: dict[str, np.ndarray] | None,
             codec: str, block: int = 256, topk: float | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the record to send, the new residual) for a hospital's trained arrays against the model
    it received; `residual`: what the last encoding lost (None: nothing, or no error feedback)."""
    update = {}
    for name, value in trained.items():
        if np.issubdtype(value.dtype, np.floating):
            delta = value.astype(np.float32) - received[name].astype(np.float32)
            if residual is not None and name in residual and residual[name].shape == delta.shape:
                delta = delta + residual[name]
            update[name] = delta
        else:
            update[name] = value
    sent = encode(update, codec, block, topk)
    decoded = decode(sent, update, codec, block, topk)  # what the server will read
    left = {name: update[name] - decoded[name] for name in update if np.issubdtype(update[name].dtype, np.floating)}
    return sent, left


def apply(reference: dict[str, np.ndarray], update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The hospital's trained arrays, as the server sees them: the model it sent plus the update."""
    out = {}
    for name, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            out[name] = (ref.astype(np.float32) + update[name].astype(np.float32)).astype(ref.dtype)
        else:
            out[name] = update[name]
    return out


def digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def reconstruct(arrays: dict[str, np.ndarray], meta: dict, held: dict[str, np.ndarray] | None,
                held_version: int | None) -> dict[str, np.ndarray]:
    """At the hospital: the model a downlink message stands for, from the version it holds.
    CompressionError saying what does not fit (the server then sends the full model)."""
    kind, base, to = str(meta["kind"]), int(meta["base"]), int(meta["to"])
    if kind == "full":
        model = arrays
    elif held is None or held_version != base:
        have = "no model" if held is None else f"model version {held_version}"
        raise CompressionError(f"the server sent the model as {kind} from version {base}, this hospital holds {have}; "
                               "it needs the full model (the server sends it next time)")
    elif kind == "same":
        model = held
    else:
        model = held
        for v in range(base + 1, to + 1):
            prefix = f"{v}/"
            delta = {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}
            model = apply(model, decode(delta, model, str(meta["codec"]), int(meta["block"])))
    if kind != "full" and digest(model) != str(meta["digest"]):
        raise CompressionError(f"the model rebuilt from version {base} to {to} does not match the server's (sha256); "
                               "it needs the full model (the server sends it next time)")
    return model
