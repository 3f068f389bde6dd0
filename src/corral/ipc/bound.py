"""How much memory a msgpack body can decode into, bounded before it is decoded. Sans-IO.

Covers: an upper bound on what decoding a msgpack body into builtins (msgspec, untyped:
lists, dicts, str, bytes, int, float, ``Ext``) allocates on 64-bit CPython, computed
only as far as it takes to compare it with a limit. Does not cover: deciding what the
limit is or what to do beyond it (:class:`corral.ipc.framing.FrameDecoder` refuses the
frame), nor decoding itself.

Why: msgspec has no limit on depth or element counts, and msgpack lets one byte stand
for a large object: an empty array (``0x90``) becomes a 56-byte list plus its slot in the
parent, an empty map a 64-byte dict, a one-entry map 224 bytes. A frame of
``[[]] * 8_000_000`` is 8 MB on the wire and over 550 MiB once decoded.

The bound is found in up to three steps, each only if the one before cannot decide:

1. ``len(body) * MAX_WEIGHT <= limit``: no byte decodes into more than ``MAX_WEIGHT``
   bytes (the caller checks this inline; small bodies never get here).
2. A C-speed count of the bytes by the largest object an item whose header is that byte
   can make (``bytes.translate``): every item has a header byte of its own, so weighing
   every byte as if it were a header bounds the whole. A count in a header with no items
   behind it costs nothing (msgspec grows lists and dicts as their items arrive, and checks
   a length against the bytes left), so a lying header cannot make a byte cost more.
3. A walk of the items, skipping str/bin/ext bodies by their lengths, charging each
   item what it makes (a container also its slots, ahead of its items: a lying count
   is only overstated) and stopping as soon as the total passes the limit. A run of
   one-byte items in an array, or an array of fixed-width scalars with one header
   (``[[]] * n``, ``[0.5] * n``, ``[7] * n``), is weighed at C speed.

Every cost is rounded up to the allocator's 16-byte blocks, so the bound holds for what
the process really takes, not only for ``sys.getsizeof``. A malformed or truncated body
gets the bound of the part before the fault (msgspec stops there too).
"""

from __future__ import annotations

import re
import struct

__all__ = ["DECODE_BUDGET_FACTOR", "MAX_WEIGHT", "decoded_size_bound"]

DECODE_BUDGET_FACTOR = 8
"""The supervisor refuses a worker's frame whose decoded objects could take more than this
many times ``max_frame_bytes``. Bytes, long strings, floats and 64-bit ints decode into at
most about 5 times their size on the wire, so a frame of them may be as large as the frame
cap; arrays of small ints or short strings take 8-13 times theirs, records of a few fields
about 10-20 times (as estimated here), nests of empty containers up to 72 times."""

# -- what one item costs, by its header byte ----------------------------------------------------
#
# Decoded sizes on 64-bit CPython (measured on 3.11), rounded up to the allocator's 16-byte
# blocks (and 16 bytes of malloc's own beyond 512), not counting the item's slot in its
# container (the container is charged for its slots):
#   list of n: 56, and its items' array, which msgspec grows as items arrive (so a count
#              with no items behind it allocates nothing): up to 9n + 48  -> 64 if n == 0
#              else 128 + 9n
#   dict of n: 64; 224 for 1-5 entries, 352 for 6-10, 632 for 11-21 (any keys; str keys
#              take less), and under 176 + 64n at every size (at most 60 more per entry
#              just after a resize)   -> the table below for n < 16, else 176 + 64n
#   str of L bytes: "" and one ASCII character are cached; ASCII 49 + L -> 64 + L;
#              otherwise at most 76 + 4L (UCS-4)  -> 96 + 4L
#   bytes of L: 33 + L -> 48 + L; Ext: 32 + its bytes -> 80 + L (a timestamp: a 48-byte datetime)
#   int: -5..256 are cached (fixints, uint8); up to 32 bits 28..32 -> 32; 64 bits up to 36 -> 48
#   float: 24 -> 32; None, True, False: 0
_LIST, _LIST_EMPTY, _SLOT = 128, 64, 9
_DICT, _DICT_EMPTY, _ENTRY = 176, 64, 64
_FIXMAP = (_DICT_EMPTY, *[240] * 5, *[368] * 5, *[648] * 5)  # by entries, 0..15
_ASCII, _STR, _PER_CHAR = 64, 96, 4
_BIN, _EXT = 48, 80
_INT, _INT32, _FLOAT, _NEG = 48, 32, 32, 32

# Step 2 weighs a byte as the largest own cost of an item with that header, plus the item's
# share of its container: a list slot is 9 bytes, a dict entry 64 for a key and a value, so
# every item is charged 32. A str body's 4 bytes per byte are covered by its body bytes'
# own weights (each at least 32), and a container's slots by its items' shares.
_SHARE = _ENTRY // 2
_CHEAP = bytes([*range(0x80), 0xC0, 0xC1, 0xC2, 0xC3])  # fixint, nil, (never used), bools
_SCALAR = bytes([0xC4, 0xC5, 0xC6, 0xCA, 0xCB, *range(0xCC, 0xD4), *range(0xE0, 0x100)])
_BIG = bytes([*range(0x90, 0xC0), 0xC7, 0xC8, 0xC9, *range(0xD4, 0xDE)])  # arrays, str, ext
_MAP = bytes([*range(0x80, 0x90), 0xDE, 0xDF])
_WEIGHTS = (  # (bytes, weight over _SHARE): every byte value is in exactly one
    (_CHEAP, 0),
    (_SCALAR, max(_INT, _BIN, _FLOAT, _NEG)),
    (_BIG, max(_LIST, _STR, _EXT)),
    (_MAP, _DICT),
)
MAX_WEIGHT = _SHARE + max(extra for _, extra in _WEIGHTS)
"""No byte of a msgpack body decodes into more than this many bytes (a map header)."""

_CLASS_OF = bytearray(256)
for _cls, (_members, _) in enumerate(_WEIGHTS):
    for _b in _members:
        _CLASS_OF[_b] = _cls
_CLASSES = bytes(_CLASS_OF)
del _cls, _members, _b, _CLASS_OF

# Step 3 dispatches on the header byte's kind. A fixed-width item has a width (header
# included) and an own cost; the other kinds are read field by field.
_FIXED, _FIXSTR, _FIXMAP_K, _FIXARRAY, _STR8, _BIN8, _EXT8, _ARRAY16, _MAP16, _BAD = range(10)
_KIND = [_FIXED] * 256
_WIDTH = [0] * 256
_COST = [0] * 256
for _b in (*range(0x80), 0xC0, 0xC2, 0xC3):
    _WIDTH[_b] = 1
for _b in range(0xE0, 0x100):  # negative fixint: -32..-1 (-5..-1 are cached; charged anyway)
    _WIDTH[_b], _COST[_b] = 1, _NEG
for _b, _w in ((0xCA, 5), (0xCB, 9)):
    _WIDTH[_b], _COST[_b] = _w, _FLOAT
for _b, _w in zip(range(0xCC, 0xD4), (2, 3, 5, 9, 2, 3, 5, 9), strict=True):
    _WIDTH[_b], _COST[_b] = _w, _INT if _w == 9 else _INT32
_COST[0xCC] = 0  # uint8: 0..255, all cached
for _b, _w in zip(range(0xD4, 0xD9), (1, 2, 4, 8, 16), strict=True):  # fixext: type + data
    _WIDTH[_b], _COST[_b] = 2 + _w, _EXT + _w
for _first, _last, _kind in (
    (0x80, 0x8F, _FIXMAP_K),
    (0x90, 0x9F, _FIXARRAY),
    (0xA0, 0xBF, _FIXSTR),
    (0xC1, 0xC1, _BAD),
    (0xC4, 0xC6, _BIN8),
    (0xC7, 0xC9, _EXT8),
    (0xD9, 0xDB, _STR8),
    (0xDC, 0xDD, _ARRAY16),
    (0xDE, 0xDF, _MAP16),
):
    for _b in range(_first, _last + 1):
        _KIND[_b] = _kind
del _b, _w, _first, _last, _kind
_ONE_BYTE = bytes(b for b in range(256) if _WIDTH[b] == 1 or b in (0x80, 0x90, 0xA0))
_ONE_BYTE_FREE = bytes(b for b in _ONE_BYTE if not (b >= 0xE0 or b in (0x80, 0x90)))
_ONE_BYTE_RUN = re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in _ONE_BYTE) + b"]*")
_FAST_MIN = 16  # arrays at least this long are tried for a C-speed weighing of their items

_u8 = struct.Struct(">B").unpack_from
_u16 = struct.Struct(">H").unpack_from
_u32 = struct.Struct(">I").unpack_from
_LENGTH = (_u8, _u16, _u32)  # by the header's offset in its 8/16/32 family
_SKIP = (2, 3, 5)  # header and length field, by the same offset


def decoded_size_bound(buf: bytes, limit: int, start: int = 0, end: int | None = None) -> int:
    """An upper bound on the bytes that decoding ``buf[start:end]`` into builtins allocates,
    computed only as far as it takes to compare it with ``limit``.

    Returns:
        A bound: at most ``limit`` means decoding takes at most that many bytes; more than
        ``limit`` means it could take more (the walk stopped there: the figure is then
        only a lower estimate of the bound).
    """
    stop = len(buf) if end is None else end
    size = stop - start
    if size * MAX_WEIGHT <= limit:
        return size * MAX_WEIGHT
    if size * _SHARE <= limit:  # else no byte count can be under the limit
        # Over the whole buffer when little of it lies outside the body (more bytes only
        # raise the bound), so that a large body is not copied just to be counted.
        seg = buf if (len(buf) - size) * 16 <= size else buf[start:stop]
        bound = _weigh_bytes(seg)
        if bound <= limit:
            return bound
    return _walk(buf, start, stop, limit)


def _weigh_bytes(seg: bytes) -> int:
    """Step 2: every byte weighed as the header it could be."""
    rest = seg.translate(None, _CHEAP)  # the bytes that weigh more than the least
    total = _SHARE * len(seg)
    if rest:
        classes = rest.translate(_CLASSES)
        for cls in range(1, len(_WEIGHTS)):
            total += _WEIGHTS[cls][1] * classes.count(cls)
    return total


def _walk(buf: bytes, pos: int, end: int, limit: int) -> int:
    """Step 3: charge each item what it makes, in order, until ``limit`` is passed.

    ``todo`` counts the items still to read: a container's items come next in the
    stream, before the rest of its parents', so no stack is needed."""
    kinds, width, cost = _KIND, _WIDTH, _COST
    total, todo = 0, 1
    try:
        while todo:
            if pos >= end or total > limit:
                return total
            b = buf[pos]
            todo -= 1
            kind = kinds[b]
            if kind == _FIXED:
                total += cost[b]
                pos += width[b]
                continue
            if kind == _FIXSTR or kind == _STR8:
                if kind == _FIXSTR:
                    length, pos = b & 0x1F, pos + 1
                else:
                    family = b - 0xD9
                    length, pos = _LENGTH[family](buf, pos + 1)[0], pos + _SKIP[family]
                if length > 1:
                    is_ascii = buf[pos : pos + length].isascii()
                    total += _ASCII + length if is_ascii else _STR + _PER_CHAR * length
                pos += length
                continue
            if kind == _FIXMAP_K or kind == _MAP16:
                if kind == _FIXMAP_K:
                    n, pos = b & 0x0F, pos + 1
                    total += _FIXMAP[n]
                else:
                    n, pos = _LENGTH[b - 0xDD](buf, pos + 1)[0], pos + 1 + 2 * (b - 0xDD)
                    total += _DICT + _ENTRY * n
                todo += 2 * n
                continue
            if kind == _FIXARRAY or kind == _ARRAY16:
                if kind == _FIXARRAY:
                    n, pos = b & 0x0F, pos + 1
                else:
                    n, pos = _LENGTH[b - 0xDB](buf, pos + 1)[0], pos + 1 + 2 * (b - 0xDB)
                total += _LIST + _SLOT * n if n else _LIST_EMPTY
                todo += n
                if n >= _FAST_MIN and pos < end:
                    done = _weigh_array(buf, pos, end, n)
                    if done is not None:
                        pos, items, extra = done
                        total += extra
                        todo -= items
                continue
            if kind == _BAD:  # never used in msgpack: msgspec refuses the body here
                return total
            family = b - (0xC4 if kind == _BIN8 else 0xC7)
            length, pos = _LENGTH[family](buf, pos + 1)[0], pos + _SKIP[family]
            if kind == _BIN8:
                total += _BIN + length
            else:  # ext: a type byte, then the data
                length += 1
                total += _EXT + length
            pos += length
    except struct.error:  # a length field cut off by the end of the buffer
        return total
    return total


def _weigh_array(buf: bytes, pos: int, end: int, n: int) -> tuple[int, int, int] | None:
    """Weigh at C speed the longest run of one-byte items at ``pos`` (up to ``n`` of them),
    or else ``n`` fixed-width scalars with one header: (the position after them, how many
    items they are, their cost), or None if neither is there."""
    run = _ONE_BYTE_RUN.match(buf, pos, min(end, pos + n)).end() - pos  # type: ignore[union-attr]
    if run >= _FAST_MIN:  # each is one byte, so these bytes are the next items
        head = buf[pos : pos + run]
        costly = len(head.translate(None, _ONE_BYTE_FREE))
        if not costly:
            return pos + run, run, 0
        dicts, lists = head.count(0x80), head.count(0x90)
        negatives = costly - dicts - lists
        return pos + run, run, _DICT_EMPTY * dicts + _LIST_EMPTY * lists + _NEG * negatives
    first = buf[pos]
    w = _WIDTH[first]
    if w > 1 and pos + w * n <= end and buf[pos : pos + w * n : w].count(first) == n:
        return pos + w * n, n, _COST[first] * n
    return None
