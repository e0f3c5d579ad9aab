"""The vocabulary of inputs that cannot become model input: the stages and types of error rows,
the ``InputError`` that carries one, and ``error_row`` for the ``errors`` table."""
from __future__ import annotations

ERROR_FIELDS = ("error_stage", "error_type", "error_message")
ERROR_COLUMNS = ("image_id", "uri", "label") + ERROR_FIELDS

ERROR_STAGES = ("list", "read", "decode", "preprocess")
ERROR_TYPES = {
    "invalid_uri": "a manifest row whose uri is empty, or names a store that pyarrow.fs cannot resolve (an unknown scheme)",
    "no_image_member": "a WebDataset sample without an image member",
    "no_image_column": "a Parquet file without an image-bytes column, where other files of the input have one",
    "missing": "the file, Parquet row or tar shard is not there, or the target of a symbolic link or tar hard link",
    "empty": "zero bytes (or null bytes in a Parquet image column)",
    "unreadable": "the file exists but cannot be opened or read (permissions, a directory, a corrupt container)",
    "truncated": "the data ends early: a tar shard or member cut short, or an image file cut off",
    "not_an_image": "bytes PIL cannot identify as any image format",
    "corrupt": "a recognised image format whose data PIL cannot decode",
    "decompression_bomb": "width x height above max_pixels",
    "unconvertible": "decoded, but conversion to the model input failed",
    "outside_root": "a symbolic link to something outside the input folder (followed only with follow_external_links=True)",
    "link_loop": "a folder that leads back into a folder it is inside of, or a chain of symbolic links without an end",
    "not_a_file": "a FIFO, socket or device where a file was expected; never opened, since reading one can block forever",
    "symlink_member": "a symbolic link inside a tar shard; never followed, since it could point anywhere on the reading machine",
}


class InputError(Exception):
    """Why one input could not become model input: a stage (ERROR_STAGES), a type (ERROR_TYPES), a message."""

    def __init__(self, stage: str, error_type: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.error_type = error_type
        self.message = message


def error_row(image_id: str, uri: str, label: str | None, stage: str, error_type: str,
              message: str) -> dict[str, str | None]:
    """One row of the ``errors`` table (columns ERROR_COLUMNS), for problems found outside ``load_batch``."""
    return {"image_id": image_id, "uri": uri, "label": label, "error_stage": stage,
            "error_type": error_type, "error_message": message}
