"""The codec rules of docs/format.md sections 3, 5, 6 and 7 that a chunk can break: one table, from
which both codec backends build their error messages, so the same broken rule gives the same
exception class and the same text in each (tests/test_codec_agreement.py checks it).

Pure data and one formatter; the rule numbers are csrc/ts_rules.h's ``enum ts_rule``.  The C decoders
report (rule, plane, a, b, c); the pure-Python twin raises through :func:`fail` with the same values.
"""

from __future__ import annotations

from tinyserve import errors

# rule -> (exception class, template over a, b, c)
RULES: dict[int, tuple[type, str]] = {
    1: (errors.LayoutError, "raw chunk size {a} must equal {b} x {c} (rule raw-size)"),
    2: (errors.UnsupportedError, "codec {a} is not a known codec (0..4) (rule plane-codec)"),
    3: (errors.LimitError, "stored size {a} exceeds the plane's {b} decoded bytes (rule plane-size)"),
    4: (errors.LayoutError, "codec stored needs size == {b}, got size {a} (rule stored-size)"),
    5: (errors.LayoutError, "codec fill needs size == 1, got size {a} (rule fill-size)"),
    6: (errors.LayoutError, "stored size 0 (every plane holds at least 1 byte) (rule plane-size)"),
    7: (errors.LayoutError, "plane sizes add up to {a} bytes, the chunk holds {b} (rule plane-sum)"),
    8: (errors.ChecksumError, "checksum mismatch (stored {a:#018x}, computed {b:#018x}) (rule checksum)"),
    10: (errors.CorruptDataError, "zstd stream of {a} bytes is shorter than a frame magic number (rule zstd-frame)"),
    11: (errors.CorruptDataError, "zstd stream starts with {a:#010x}, not the frame magic number 0xfd2fb528 "
                                  "(rule zstd-frame)"),
    12: (errors.CorruptDataError, "zstd frame header needs {a} bytes, the stream holds {b} (rule zstd-frame)"),
    13: (errors.CorruptDataError, "zstd frame header descriptor {a:#04x} sets the reserved bit (rule zstd-frame)"),
    14: (errors.CorruptDataError, "zstd frame names dictionary {a}; frames use no dictionary (rule zstd-dict)"),
    15: (errors.CorruptDataError, "zstd frame does not declare its content size ({b} expected) "
                                  "(rule zstd-content-size)"),
    16: (errors.CorruptDataError, "zstd frame declares content size {a}, the plane holds {b} "
                                  "(rule zstd-content-size)"),
    17: (errors.CorruptDataError, "zstd block {a} has the reserved block type 3 (rule zstd-blocks)"),
    18: (errors.CorruptDataError, "zstd block {a} has Block_Size {b}, more than Block_Maximum_Size {c} "
                                  "(rule zstd-blocks)"),
    19: (errors.CorruptDataError, "zstd frame runs past the end of its {b}-byte stream (after {a} blocks) "
                                  "(rule zstd-one-frame)"),
    20: (errors.CorruptDataError, "zstd frame ends at byte {a}, {b} bytes are left over after it "
                                  "(rule zstd-one-frame)"),
    21: (errors.CorruptDataError, "zstd frame does not decode (libzstd refuses it) (rule zstd-decode)"),
    22: (errors.CorruptDataError, "zstd frame decoded to {a} bytes, {b} expected (rule zstd-decode)"),
    30: (errors.CorruptDataError, "huffman stream of {a} bytes is shorter than its 140-byte header "
                                  "(rule huffman-header)"),
    31: (errors.CorruptDataError, "huffman code length {a} of symbol {b} exceeds 11 (rule huffman-lengths)"),
    32: (errors.CorruptDataError, "huffman code lengths table has {a} symbol(s), at least 2 are required "
                                  "(rule huffman-lengths)"),
    33: (errors.CorruptDataError, "huffman code lengths do not form a complete prefix code (Kraft sum {a}, "
                                  "must be 2048) (rule huffman-kraft)"),
    34: (errors.CorruptDataError, "huffman sub-stream sizes add up to {a}, more than the {b} bytes after the "
                                  "stream header (rule huffman-sizes)"),
    35: (errors.CorruptDataError, "huffman sub-stream {a} ends before its {b} symbols are decoded ({c} bytes) "
                                  "(rule huffman-substream)"),
    36: (errors.CorruptDataError, "huffman sub-stream {a} has {b} byte(s) left over after its symbols ({c} "
                                  "bytes used) (rule huffman-substream)"),
    40: (errors.CorruptDataError, "rans frequency table runs past the end of the {b}-byte stream (at symbol "
                                  "{a}) (rule rans-table)"),
    41: (errors.CorruptDataError, "rans frequency of symbol {a} is a non-minimal varint (rule rans-table)"),
    42: (errors.CorruptDataError, "rans frequency {b} of symbol {a} exceeds 4096 (rule rans-table)"),
    43: (errors.CorruptDataError, "rans frequencies sum to {a}, must be 4096 (rule rans-table)"),
    44: (errors.CorruptDataError, "rans stream ends inside its 8 initial states ({a} of 32 bytes) "
                                  "(rule rans-states)"),
    45: (errors.CorruptDataError, "rans initial state {a} is {b}, below 2^16 (rule rans-states)"),
    46: (errors.CorruptDataError, "rans words take {a} bytes, an odd number (rule rans-words)"),
    47: (errors.CorruptDataError, "rans stream runs out of words before its {a} symbols are decoded "
                                  "(rule rans-words)"),
    48: (errors.CorruptDataError, "rans stream has {a} unread word(s) left over after its {b} symbols "
                                  "(rule rans-words)"),
    49: (errors.CorruptDataError, "rans state {a} ends at {b}, not 2^16 (rule rans-final-states)"),
    60: (errors.ChecksumError, "decoded checksum mismatch (stored {a:#018x}, computed {b:#018x}) "
                               "(rule decoded-checksum)"),
}

(RAW_SIZE, PLANE_CODEC, PLANE_SIZE_MAX, STORED_SIZE, FILL_SIZE, PLANE_SIZE_ZERO, PLANES_SUM, CHECKSUM) = range(1, 9)
(ZSTD_SHORT, ZSTD_MAGIC, ZSTD_HEADER, ZSTD_RESERVED, ZSTD_DICT, ZSTD_NO_SIZE, ZSTD_SIZE, ZSTD_BLOCK_TYPE,
 ZSTD_BLOCK_SIZE, ZSTD_TRUNCATED, ZSTD_TRAILING, ZSTD_DECODE, ZSTD_LENGTH) = range(10, 23)
HUF_SHORT, HUF_LEN, HUF_FEW, HUF_KRAFT, HUF_SIZES, HUF_EARLY, HUF_LEFTOVER = range(30, 37)
(RANS_TABLE, RANS_VARINT, RANS_FREQ, RANS_SUM, RANS_STATES, RANS_STATE_LOW, RANS_ODD, RANS_WORDS_OUT,
 RANS_WORDS_LEFT, RANS_FINAL) = range(40, 50)
DECODED_CHECKSUM = 60
NO_PLANE = 0xFFFFFFFF


def where(tensor: str, chunk: int, plane: int | None = None) -> str:
    """The place a message names: tensor, chunk and (for a plane rule) plane."""
    w = f"tensor {tensor!r} chunk {chunk}"
    return w if plane is None or plane == NO_PLANE else f"{w} plane {plane}"


def error(rule: int, place: str, a: int = 0, b: int = 0, c: int = 0) -> Exception:
    """The exception for a broken rule at `place` (see :func:`where`)."""
    cls, text = RULES[rule]
    return cls(f"{place}: {text.format(a=a, b=b, c=c)}")


class RuleError(Exception):
    """Raised inside the pure-Python decoders (which do not know the tensor / chunk / plane they decode)
    and turned into the table's exception by the caller that does."""

    def __init__(self, rule: int, a: int = 0, b: int = 0, c: int = 0):
        super().__init__(rule, a, b, c)
        self.rule, self.a, self.b, self.c = rule, a, b, c

    def at(self, place: str) -> Exception:
        return error(self.rule, place, self.a, self.b, self.c)
