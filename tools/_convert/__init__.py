"""Helpers of ``tools/convert.py``: image decoding, source listing, DALI / FFCV writers, manifest, read-back check.

One module per job: :mod:`.images` (decode and re-encode one file), :mod:`.pool` (the decode worker processes),
:mod:`.sources` (what to convert, class maps, fingerprints), :mod:`.files` (atomic writes, checksums),
:mod:`.dali_writer` (webdataset tar shards and uint8 arrays), :mod:`.ffcv_writer` (.beton files through FFCV's
DatasetWriter, filled in order by the main process, written by the workers), :mod:`.ffcv_child` (FFCV's reader in
a watched child process, for ``--verify``), :mod:`.verify` (read back with the real DALI / FFCV readers).
"""

TOOL_VERSION = "1.0"
