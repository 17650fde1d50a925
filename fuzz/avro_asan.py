"""Fuzz the C Avro codec (``pipeline/avro/_avro.c``): mutated records of every schema, decoded
and encoded, optionally in a build with AddressSanitizer and UndefinedBehaviorSanitizer.

    .venv/bin/python -m fuzz.avro_asan --asan --records 1000000   # make fuzz
    .venv/bin/python -m fuzz.avro_asan --records 20000             # the quick run (no ASan)

Decoding: valid records of each schema in ``schemas/`` (random values of the schema, and
the real 2021 capture's ``L2Update``/``Trade``/``RawFrame`` records where
``../shared/data`` is present) are encoded, then mutated: bytes flipped, cut short, huge or
negative varints (lengths, counts, union and enum indexes) inserted or written over,
spliced with other records' bytes. Every mutated record must decode (and then re-encode to
bytes that decode to the same value) or raise ``ValueError`` (what the codec documents;
``UnicodeDecodeError`` is one), which ``pipeline.avro.serde`` turns into a SerdeError and the
consumer dead-letters. Encoding: valid values with one part replaced by a wrong type or an
out-of-range value must encode (and read back) or raise TypeError, ValueError or
OverflowError (what ``serde.Encoder`` catches). Any other exception type fails the run
(exit status 1); under ``--asan`` a memory error or undefined behaviour aborts the process.

``--asan`` builds ``pipeline/avro/_avro.c`` with ``-fsanitize=address,undefined`` into
``build/asan/`` (the normal extension is left alone) and reruns this module in a child
process with ``LD_PRELOAD`` of gcc's libasan, ``PYTHONMALLOC=malloc`` (so every Python
object is its own allocation, with red zones ASan watches) and
``ASAN_OPTIONS=detect_leaks=0:abort_on_error=1``: leak detection is off because CPython
keeps interned strings, caches and module state alive at exit on purpose, so LeakSanitizer
reports thousands of "leaks" that are none. Input bytes are handed to the decoder in
buffers of exactly their length, so reading one byte past the end is caught.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import random
import shlex
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "pipeline" / "_avro.c"
ASAN_DIR = ROOT / "build" / "asan"
SHARED_DATA = ROOT.parent / "shared" / "data"
ASAN_CFLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
               "-fno-omit-frame-pointer", "-g", "-O1"]
DECODE_ERRORS = (ValueError,)  # pipeline/avro/_avro.c: "Bad bytes raise ValueError"
ENCODE_ERRORS = (TypeError, ValueError, OverflowError)  # what serde.Encoder catches
_ENV_MARK = "PIPELINE_AVRO_FUZZ_CHILD"

# Opcodes, as in pipeline/avro/codec.py and pipeline/avro/_avro.c.
(NULL, BOOLEAN, LONG, FLOAT, DOUBLE, BYTES, STRING, RECORD, UNION, ARRAY, MAP, ENUM,
 FIXED) = range(13)


# --------------------------------------------------------------------------- the build


def build_asan(out_dir: Path = ASAN_DIR) -> Path:
    """``pipeline/avro/_avro.c`` built with ASan and UBSan as ``out_dir/_avro<suffix>``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"_avro{sysconfig.get_config_var('EXT_SUFFIX')}"
    if target.exists() and target.stat().st_mtime >= SOURCE.stat().st_mtime:
        return target
    include = sysconfig.get_paths()["include"]
    command = ["gcc", "-shared", "-fPIC", *ASAN_CFLAGS, f"-I{include}", str(SOURCE),
               "-o", str(target)]
    print("building:", shlex.join(command), flush=True)
    subprocess.run(command, check=True)
    return target


def load_extension(path: Path):
    """Import the extension at ``path`` as ``pipeline.avro._avro``, before ``pipeline.avro.codec``
    imports the normal build, so everything in this process uses it."""
    loader = importlib.machinery.ExtensionFileLoader("pipeline.avro._avro", str(path))
    spec = importlib.util.spec_from_file_location("pipeline.avro._avro", str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["pipeline.avro._avro"] = module
    return module


def libasan() -> str:
    return subprocess.run(["gcc", "-print-file-name=libasan.so"], check=True,
                          capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- values


_TEXTS = ["", "a", "BTCUSD", "34000.00", "0.00000001", "é", "日本", "\u0000", "🙂", "x" * 300]
_LONGS = [0, 1, -1, 63, 64, -64, -65, 2**31 - 1, -2**31, 2**53, 2**63 - 1, -2**63]
_INTS = [0, 1, -1, 2**31 - 1, -2**31]
_FLOATS32 = [0.0, -0.0, 1.0, -2.5, 0.15625, float("inf"), float("-inf"), 3.4028234663852886e38]
_DOUBLES = _FLOATS32 + [1e308, 5e-324, 0.1]


def random_value(prog: tuple, rng: random.Random, depth: int = 0) -> Any:
    """A valid value for a compiled program (what fastavro returns for its schema)."""
    op = prog[0]
    if op == NULL:
        return None
    if op == BOOLEAN:
        return rng.random() < 0.5
    if op == LONG:
        if len(prog) > 1:
            return rng.choice(_INTS) if rng.random() < 0.3 else rng.randint(-2**31, 2**31 - 1)
        return rng.choice(_LONGS) if rng.random() < 0.3 else rng.randint(-2**63, 2**63 - 1)
    if op == FLOAT:
        return rng.choice(_FLOATS32)
    if op == DOUBLE:
        return rng.choice(_DOUBLES) if rng.random() < 0.5 else rng.uniform(-1e9, 1e9)
    if op == BYTES:
        return rng.randbytes(rng.choice([0, 1, 5, 40]))
    if op == STRING:
        if rng.random() < 0.7:
            return rng.choice(_TEXTS)
        return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0xD7FF),
                                       rng.randint(0xE000, 0x10FFFF)]))
                       for _ in range(rng.randint(0, 12)))
    if op == RECORD:
        return {name: random_value(p, rng, depth + 1) for name, p in zip(prog[1], prog[2])}
    if op == UNION:
        return random_value(rng.choice(prog[1]), rng, depth + 1)
    if op == ARRAY:
        return [random_value(prog[1], rng, depth + 1)
                for _ in range(rng.choice([0, 1, 2, 5, 70] if depth == 0 else [0, 1, 2, 5])
                               if depth < 4 else 0)]
    if op == MAP:
        return {rng.choice(_TEXTS) + str(i): random_value(prog[1], rng, depth + 1)
                for i in range(rng.choice([0, 1, 3]) if depth < 4 else 0)}
    if op == ENUM:
        return rng.choice(prog[1])
    if op == FIXED:
        return rng.randbytes(prog[1])
    raise ValueError(f"opcode {op}")


def real_values(schema: str) -> list[dict]:
    """Records of the real 2021 capture for the market-data schemas (none without it)."""
    capture = SHARED_DATA / "gemini_v2_l2_capture_2021-06-24.txt"
    if schema not in ("L2Update", "Trade", "RawFrame") or not capture.exists():
        return []
    from pipeline.gemini.marketdata import FrameError, V2Normalizer

    normalizer, out = V2Normalizer("fuzz0000000"), []
    for i, line in enumerate(capture.read_text().splitlines()):
        head, sep, body = line.partition(": ")
        if not sep or not body.startswith("{") or "<-" in head:
            continue
        received_us = int(float(head) * 1e6)
        if schema == "RawFrame":
            out.append({"url": "wss://api.gemini.com/v2/marketdata", "connection_id": "fuzz",
                        "sequence": i, "received_ts_us": received_us, "text": body})
            continue
        try:
            records = normalizer.normalize_text(body, received_us)
        except FrameError:
            continue
        topic = {"L2Update": "md.l2", "Trade": "md.trades"}[schema]
        out.extend(r.value for r in records if r.topic == topic)
    return out


# --------------------------------------------------------------------------- mutations


def zigzag_varint(n: int) -> bytes:
    """Avro's encoding of the long ``n`` (zigzag, then base-128 varint)."""
    z = (n << 1) ^ (n >> 63) if n < 0 else n << 1
    z &= (1 << 64) - 1
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


HUGE = [zigzag_varint(n) for n in (2**31, 2**31 - 1, 2**32, 2**62, 2**63 - 1, -2**63, -1,
                                   -2, -2**31, -2**62, 10**15, 255, 4096)] + [
    b"\xff" * 9 + b"\x01",  # the largest 10-byte varint
    b"\xff" * 10 + b"\x01",  # 11 bytes: longer than any long
    b"\x80" * 12,  # never ends
    b"\x81\x80\x80\x80\x80\x80\x80\x80\x80\x00",  # overlong 1
]


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """One to three mutations of a valid record's bytes."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.randrange(8)
        at = rng.randint(0, len(out))
        if kind <= 1 and out:  # flip bits of 1-3 bytes
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(out))
                out[i] ^= rng.choice((1, 2, 4, 8, 16, 32, 64, 128, rng.randint(1, 255)))
        elif kind == 2:  # cut short
            del out[at:]
        elif kind == 3:  # a huge/negative varint inserted
            out[at:at] = rng.choice(HUGE)
        elif kind == 4:  # a huge/negative varint written over what was there
            varint = rng.choice(HUGE)
            out[at:at + len(varint)] = varint
        elif kind == 5:  # a splice of another record's bytes
            other = rng.choice(pool)
            i = rng.randint(0, len(other))
            piece = other[i:i + rng.randint(1, 64)]
            if rng.random() < 0.5:
                out[at:at + len(piece)] = piece
            else:
                out[at:at] = piece
        elif kind == 6:  # random bytes inserted
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        else:  # a span deleted or duplicated
            end = min(len(out), at + rng.randint(1, 16))
            if rng.random() < 0.5:
                del out[at:end]
            else:
                out[at:at] = out[at:end]
    return bytes(out)


_WRONG = [None, True, 0, -1, 2**31, -2**31 - 1, 2**63, -2**63 - 1, 2**64, 10**30, 1.5,
          float("nan"), float("inf"), 1e39, -1e309, "", "x", "\ud800", "é", b"", b"\x00" * 3,
          bytearray(b"ab"), [], [1], (), {}, {"a": 1}, {1: 2}, object(), [[[[]]]], {"": None}]


def _slots(value: Any, path: tuple = ()) -> list[tuple]:
    """Every place inside a value (paths into dicts and lists)."""
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out.extend(_slots(item, path + (key,)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.extend(_slots(item, path + (i,)))
    return out


def copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy(v) for v in value]
    return value


def wrong_value(value: Any, rng: random.Random) -> Any:
    """``value`` with one place replaced by a wrong type or out-of-range value, or a key
    removed or added."""
    value = copy(value)
    path = rng.choice(_slots(value))
    if not path:
        return rng.choice(_WRONG)
    parent = value
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    action = rng.randrange(6)
    if action == 0 and isinstance(parent, dict):
        del parent[last]
    elif action == 1 and isinstance(parent, dict):
        parent[rng.choice(["extra", "", 7])] = rng.choice(_WRONG)
    elif action == 2 and isinstance(parent, list):
        parent.append(rng.choice(_WRONG))
    else:
        parent[last] = rng.choice(_WRONG)
    return value


# --------------------------------------------------------------------------- the run


class Unexpected(Exception):
    """An outcome the codec does not document: the run fails."""


def fuzz_schema(name: str, records: int, encodes: int, seed: int, exact_buffers: bool
                ) -> tuple[Counter, Counter, float]:
    """(decode outcomes, encode outcomes, seconds) of ``records`` mutated records of one
    schema and ``encodes`` mutated values."""
    import ctypes
    import faulthandler

    from pipeline.avro import codec, schemas
    from pipeline.avro._avro import decode, encode

    prog = codec.program(schemas.load(name))
    rng = random.Random(f"{seed}:{name}")
    seeds = real_values(name)[:300] + [random_value(prog, rng) for _ in range(200)]
    pool = [encode(prog, value, b"") for value in seeds]
    for value, data in zip(seeds, pool):  # the seeds are valid and read back exactly
        back, end = decode(prog, data, 0)
        if end != len(data) or encode(prog, back, b"") != data:
            raise Unexpected(f"{name}: a valid record does not read back: {value!r}")
    decoded, encoded = Counter(), Counter()
    started = time.perf_counter()
    for i in range(records):
        if i % 20_000 == 0:  # a hang (no progress for 120 s) dumps the stack and exits
            faulthandler.dump_traceback_later(120, exit=True)
        data = mutate(rng.choice(pool), rng, pool)
        buffer = ctypes.create_string_buffer(data, len(data)) if exact_buffers else data
        try:
            value, end = decode(prog, buffer, 0)
        except DECODE_ERRORS as exc:
            decoded[type(exc).__name__] += 1
            if not str(exc):
                raise Unexpected(f"{name}: {type(exc).__name__} without a message "
                                 f"for {data.hex()}") from None
            continue
        except Exception as exc:  # noqa: BLE001 - the very thing this run looks for
            raise Unexpected(f"{name}: decoding {data.hex()} raised {type(exc).__name__}: "
                             f"{exc}") from exc
        if not 0 <= end <= len(data):
            raise Unexpected(f"{name}: decode of {data.hex()} ended at {end}")
        again = encode(prog, value, b"")  # what decodes is a value of the schema
        back, end = decode(prog, again, 0)
        if end != len(again) or encode(prog, back, b"") != again:  # bytes: NaN != NaN
            raise Unexpected(f"{name}: {data.hex()} decoded to a value that does not round-trip")
        decoded["decoded" if end == len(data) else "decoded, trailing bytes"] += 1
    for i in range(encodes):
        if i % 20_000 == 0:
            faulthandler.dump_traceback_later(120, exit=True)
        value = wrong_value(rng.choice(seeds), rng)
        try:
            data = encode(prog, value, b"\x00")
        except ENCODE_ERRORS as exc:
            encoded[type(exc).__name__] += 1
            continue
        except Exception as exc:  # noqa: BLE001
            raise Unexpected(f"{name}: encoding {value!r} raised {type(exc).__name__}: "
                             f"{exc}") from exc
        back, end = decode(prog, data, 1)  # what encodes must read back
        if end != len(data):
            raise Unexpected(f"{name}: {value!r} encoded to bytes that do not read back")
        encoded["encoded"] += 1
    faulthandler.cancel_dump_traceback_later()
    return decoded, encoded, time.perf_counter() - started


def run(names: list[str], records: int, encodes: int, seed: int, exact_buffers: bool,
        out=sys.stdout) -> dict[str, tuple[Counter, Counter, float]]:
    """Fuzz every schema in ``names``, printing a table row per schema as it finishes."""
    results = {}
    print(f"{'schema':<20} {'records':>9} {'decoded':>9} {'ValueError':>10} "
          f"{'UnicodeDec':>10} {'encodes':>8} {'encoded':>8} {'TypeErr':>8} {'ValueErr':>8} "
          f"{'Overflow':>8} {'seconds':>8}", file=out, flush=True)
    for name in names:
        decoded, encoded, seconds = fuzz_schema(name, records, encodes, seed, exact_buffers)
        results[name] = (decoded, encoded, seconds)
        print(f"{name:<20} {records:>9} "
              f"{decoded['decoded'] + decoded['decoded, trailing bytes']:>9} "
              f"{decoded['ValueError']:>10} {decoded['UnicodeDecodeError']:>10} "
              f"{encodes:>8} {encoded['encoded']:>8} {encoded['TypeError']:>8} "
              f"{encoded['ValueError']:>8} {encoded['OverflowError']:>8} {seconds:>8.1f}",
              file=out, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.avro_asan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000,
                        help="mutated records decoded per schema")
    parser.add_argument("--encodes", type=int, default=None,
                        help="mutated values encoded per schema (default: records / 4)")
    parser.add_argument("--seed", type=int, default=None, help="the mutation RNG's seed")
    parser.add_argument("--schema", action="append", help="only these schemas")
    parser.add_argument("--asan", action="store_true",
                        help="build with ASan/UBSan into build/asan/ and run under it")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    encodes = args.encodes if args.encodes is not None else args.records // 4
    names = args.schema or sorted(p.stem for p in (ROOT / "schemas").glob("*.avsc"))
    rerun = (f".venv/bin/python -m fuzz.avro_asan {'--asan ' if args.asan else ''}"
             f"--records {args.records} --encodes {encodes} --seed {seed}"
             + "".join(f" --schema {n}" for n in args.schema or ()))
    if args.asan and os.environ.get(_ENV_MARK) != "1":
        target = build_asan()
        env = dict(os.environ, LD_PRELOAD=libasan(), PYTHONMALLOC="malloc",
                   ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
                   UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
                   PIPELINE_AVRO_FUZZ_BUILD=str(target), **{_ENV_MARK: "1"})
        child = [sys.executable, "-m", "fuzz.avro_asan", "--asan", "--records",
                 str(args.records), "--encodes", str(encodes), "--seed", str(seed),
                 *(a for n in args.schema or () for a in ("--schema", n))]
        return subprocess.run(child, env=env, cwd=ROOT).returncode
    if args.asan:
        module = load_extension(Path(os.environ["PIPELINE_AVRO_FUZZ_BUILD"]))
        print(f"codec: {module.__file__} (ASan+UBSan; LD_PRELOAD={os.environ.get('LD_PRELOAD')},"
              f" ASAN_OPTIONS={os.environ.get('ASAN_OPTIONS')}, PYTHONMALLOC=malloc)")
    else:
        import pipeline.avro._avro as module
        print(f"codec: {module.__file__} (normal build, no sanitizer)")
    print(f"seed {seed}; rerun: {rerun}", flush=True)
    started = time.perf_counter()
    try:
        results = run(names, args.records, encodes, seed, exact_buffers=args.asan)
    except Unexpected as exc:
        print(f"FAILED: {exc}\nrerun: {rerun}", flush=True)
        return 1
    total = sum(args.records + encodes for _ in results)
    print(f"ok: {len(results)} schemas, {total:,} mutated records and values, no unexpected "
          f"outcome, {time.perf_counter() - started:.0f} s; rerun: {rerun}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
