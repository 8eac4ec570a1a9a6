def first_paragraph(doc: str) -> str:
    """A module docstring's first paragraph on one line: the `--help` description (its first line alone can stop
    mid-sentence)."""
    return " ".join(doc.split("\n\n")[0].split())
