#!/usr/bin/env python3
"""Generate assets/unicode_nfc.txt.gz: the canonical-composition data sdti's tokenizer
needs to reproduce ``unicodedata.normalize("NFC", ...)`` (which transformers'
BasicTokenizer applies).  Uses only the Python standard library; the Unicode version
is that of the running Python (3.11 -> Unicode 14.0, as used for the fixtures).

Format, one record per line (hex code points):
    # comment
    d <cp> <c1> [<c2>]   one-level canonical decomposition of <cp> (Hangul excluded)
    p <c1> <c2> <cp>     canonical composition: <c1><c2> -> <cp> (primary composites only)
    c <first> <last> <ccc>  canonical combining class for a range (decimal ccc)
"""

import gzip
import os
import sys
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "assets", "unicode_nfc.txt.gz")


def is_hangul_syllable(cp):
    return 0xAC00 <= cp <= 0xD7A3


def main():
    lines = ["# canonical decomposition / composition / combining class data, Unicode %s (Python %s)"
             % (unicodedata.unidata_version, sys.version.split()[0])]
    comps = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF or is_hangul_syllable(cp):
            continue
        d = unicodedata.decomposition(chr(cp))
        if not d or d.startswith("<"):
            continue
        parts = [int(x, 16) for x in d.split()]
        lines.append("d %x %s" % (cp, " ".join("%x" % p for p in parts)))
        if len(parts) == 2:
            pair = chr(parts[0]) + chr(parts[1])
            if unicodedata.normalize("NFC", pair) == chr(cp):
                comps.append("p %x %x %x" % (parts[0], parts[1], cp))
    lines += comps
    start = None
    prev = None
    for cp in range(0x110001):
        ccc = unicodedata.combining(chr(cp)) if cp < 0x110000 and not 0xD800 <= cp <= 0xDFFF else 0
        if start is not None and (ccc != prev or cp != last + 1):
            lines.append("c %x %x %d" % (start, last, prev))
            start = None
        if ccc and start is None:
            start, prev = cp, ccc
        if ccc:
            last = cp
    data = ("\n".join(lines) + "\n").encode("ascii")
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        f.write(data)
    print("wrote %s: %d records, %d bytes raw, %d gz" % (OUT, len(lines) - 1, len(data), os.path.getsize(OUT)))


if __name__ == "__main__":
    main()
