"""What a listing leaves out on purpose (hidden names, other extensions, ...): the reasons, the
counter a listing fills, and the counts in the listing table's schema metadata, read back as a dict
or as one summary line."""
from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa

from lrpscale.inputs.names import _extension

# Why a listing left an entry out (not an error: nothing was meant to be read there)
SKIP_REASONS = {
    "hidden": "hidden entries (names starting with a dot)",
    "other_extension": "files whose extension is not one the listing reads",
    "no_sample_key": "tar members without a sample key (no extension)",
    "name_collision": "entries whose percent-encoded name equals another entry's name",
}
SKIPPED_METADATA = b"lrpscale.skipped"  # the listing table's schema metadata key for the skip counts


class _Skipped:
    """What one listing left out on purpose: counts per SKIP_REASONS key, and the extensions of the
    files with other extensions."""

    def __init__(self, wanted: tuple[str, str]):
        self.wanted = wanted  # what the listing reads, one and many: ("an image", "images")
        self.counts: Counter[str] = Counter()
        self.extensions: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    def other_extension(self, name: str) -> None:
        self.counts["other_extension"] += 1
        self.extensions["." + _extension(name) if "." in name else "(none)"] += 1

    def metadata(self) -> bytes:
        """The counts as JSON for the listing's schema metadata (read back by ``skipped_entries``)."""
        counts = {reason: self.counts[reason] for reason in SKIP_REASONS if self.counts[reason]}
        # the most frequent extensions first, ties by name, so the summary line is the same every time
        extensions = dict(sorted(self.extensions.items(), key=lambda item: (-item[1], item[0])))
        return json.dumps({"counts": counts, "extensions": extensions, "wanted": self.wanted}).encode()


def skipped_entries(table: pa.Table) -> dict[str, int]:
    """What a listing skipped: SKIP_REASONS key -> count (only reasons that occurred); {} for a
    table without the listing's metadata."""
    return dict(_skipped_metadata(table).get("counts", {}))


def skipped_summary(table: pa.Table) -> str:
    """The skip counts of a listing as one line: "skipped 3 hidden entries, 2 files that are not
    images (.txt, .json)", or "skipped nothing"."""
    skipped = _skipped_metadata(table)
    one, many = skipped.get("wanted", ("an input", "inputs"))
    parts = []
    for reason, count in skipped.get("counts", {}).items():
        phrase = _SKIP_PHRASES.get(reason, (reason, reason))[count != 1].format(one=one, many=many)
        if reason == "other_extension":
            extensions = list(skipped.get("extensions", {}))
            phrase += f" ({', '.join(extensions[:8])}{f', and {len(extensions) - 8} more' if len(extensions) > 8 else ''})"
        parts.append(f"{count} {phrase}")
    return "skipped " + ", ".join(parts) if parts else "skipped nothing"


# The summary line's words per SKIP_REASONS key, for one and for many; {one}/{many}: what the listing reads
_SKIP_PHRASES = {
    "hidden": ("hidden entry", "hidden entries"),
    "other_extension": ("file that is not {one}", "files that are not {many}"),
    "no_sample_key": ("tar member without a sample key", "tar members without a sample key"),
    "name_collision": ("entry whose percent-encoded name is another entry's", "entries whose percent-encoded name is another entry's"),
}


def _skipped_metadata(table: pa.Table) -> dict:
    return json.loads((table.schema.metadata or {}).get(SKIPPED_METADATA, b"{}"))
