"""What a class name may be. One rule for every way a name arrives (an image folder given to
`add-classes`, a name typed into `serve`'s page), because a name becomes a folder in a staging
area, a label in exports and a word in one-line messages. Torch-free, so the server checks names
cheaply.

A new name is also compared with the classes already known (`check_new_class_name`): it is
stored in NFC, so `café` typed on a Mac (NFD) and on a phone (NFC) is one class, and a name that
only a close look tells from a known one (other case, a Cyrillic `а` for a Latin `a`, a
full-width `ｃａｔ`) is refused: the two would be two classes the user cannot tell apart in a
report."""

from __future__ import annotations

import unicodedata

from edge_m2kd.errors import UserError

MAX_CLASS_NAME_LENGTH = 64


def check_class_name(name: str) -> str:
    """``name`` itself if it is a usable class name, else a UserError naming the rule it breaks.

    Refused: empty; longer than MAX_CLASS_NAME_LENGTH; path separators or ``..`` (the server
    makes a folder of it, which must stay where it is put); control and other invisible
    characters (they hide in file names and would break one-line messages); a leading dot (the
    image-folder loader skips hidden folders, so the class would silently have no images);
    surrounding spaces (two names that look the same); a comma (``--classes`` splits on it).
    """
    shown = repr(name)
    if not isinstance(name, str) or not name:
        raise UserError("a class name is empty; give each class a name")
    if len(name) > MAX_CLASS_NAME_LENGTH:
        raise UserError(f"class name {shown[:40]}... is {len(name)} characters long; "
                        f"use at most {MAX_CLASS_NAME_LENGTH}")
    if "/" in name or "\\" in name or ".." in name:
        raise UserError(f"class name {shown} contains a path separator or '..'; use a plain name such as 'cat'")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise UserError(f"class name {shown} contains a control or invisible character; use printable characters")
    if name.startswith("."):
        raise UserError(f"class name {shown} starts with a dot (a hidden folder, whose images are skipped); "
                        "drop the dot")
    if name != name.strip():
        raise UserError(f"class name {shown} starts or ends with a space; drop the spaces")
    if "," in name:
        raise UserError(f"class name {shown} contains a comma (--classes separates names with commas); "
                        "use another character")
    return name


# Letters of other scripts drawn like a Latin one (a subset of Unicode's confusables.txt, UTS #39:
# the letters of Cyrillic, Greek and Armenian that share a Latin letter's shape). Keyed by case,
# since an upper-case Greek Eta looks like H but its lower case like n; compared after casefold.
_LOOKALIKES = str.maketrans({
    # Cyrillic
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "У": "Y", "Х": "X", "Ѕ": "S", "І": "I", "Ј": "J", "Ԛ": "Q", "Ԝ": "W", "Ү": "Y", "Ӏ": "I", "Ѵ": "V",
    "Һ": "H", "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "ѕ": "s", "і": "i",
    "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l", "ѵ": "v", "ү": "y", "к": "k",
    # Greek
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "α": "a", "ο": "o", "ρ": "p", "ι": "i", "κ": "k", "ν": "v",
    "υ": "u", "χ": "x",
    # Armenian, and Latin letters drawn like another Latin one
    "օ": "o", "ս": "u", "ց": "g", "ı": "i", "ɑ": "a", "ɡ": "g", "ꞵ": "b",
})


def look_alike_key(name: str) -> str:
    """What a reader sees of ``name``: equal for two names that differ only by case, Unicode form
    (NFC/NFD), compatibility forms (full-width, ligatures, mathematical letters: NFKD) or letters
    of another script drawn like a Latin one. Digits stay apart from letters (EMNIST has both
    `0` and `O`), and accents stay (`Käfer` is not `Kafer`)."""
    folded = unicodedata.normalize("NFKD", name).translate(_LOOKALIKES)
    return unicodedata.normalize("NFKD", folded.casefold())


def check_new_class_name(name: str, known: list[str]) -> str:
    """``name`` in NFC if it may be a new class next to ``known`` (the classes learned so far and
    the names given before it in the same step), else a one-line UserError.

    The rules of `check_class_name`, then: refused if it differs from a known name only by case,
    Unicode form or look-alike characters (`look_alike_key`). A name equal to a known one (in NFC)
    is returned as it is: refusing a class already learned is the learner's, whose line names
    the step that learned it.
    """
    check_class_name(name)
    nfc = unicodedata.normalize("NFC", name)
    check_class_name(nfc)  # NFC can only compose, but keep every rule true of what is stored
    key = look_alike_key(nfc)
    for other in known:
        if other == nfc:
            return nfc
        if look_alike_key(other) != key:
            continue
        if unicodedata.normalize("NFC", other) == nfc:
            raise UserError(f"class name {name!r} is the known class {other!r} in another Unicode form; "
                            "use that class's name as it is")
        odd = next((ch for ch in nfc if ch not in other), None)
        hint = f" ({odd!r} is U+{ord(odd):04X} {unicodedata.name(odd, 'unnamed')})" if odd else ""
        raise UserError(f"class name {name!r} differs from the known class {other!r} only by case or "
                        f"look-alike characters{hint}; use a name that reads differently")
    return nfc
