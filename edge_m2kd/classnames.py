"""What a class name may be. One rule for every way a name arrives (an image folder given to
`add-classes`, a name typed into `serve`'s page), because a name becomes a folder in a staging
area, a label in exports and a word in one-line messages. Torch-free, so the server checks names
cheaply."""

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
