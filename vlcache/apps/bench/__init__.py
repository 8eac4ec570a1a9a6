def first_paragraph(doc: str) -> str:
    """A module docstring's first paragraph on one line: the `--help` description (its first line alone can stop
    mid-sentence)."""
    return " ".join(doc.split("\n\n")[0].split())


def fill_flags(args, quick: dict, defaults: dict) -> None:
    """Set each flag the user did not give (still None) to its --quick value or its default: an explicit flag wins
    over --quick, and an explicit bad value (0 too) stays to be refused, not replaced."""
    for key, value in (quick if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def comma_items(p, flag: str, text: str) -> list[str]:
    """The non-empty comma-separated entries of `text`, or the parser's one-line error for `flag` if there are none."""
    out = [x.strip() for x in text.split(",") if x.strip()]
    if not out:
        p.error(f"{flag} is empty: give at least one, comma-separated")
    return out


def token_counts(p, flag: str, text: str) -> list[int]:
    """Comma-separated positive token counts, or the parser's one-line error for `flag` (an empty list is one too)."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{flag} takes comma-separated token counts, got {text!r}")
    if not sizes or min(sizes) < 1:
        p.error(f"{flag} takes positive token counts, got {text!r}")
    return sizes
