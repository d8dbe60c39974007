"""Input files for ``rece ingest``: local paths or ``s3://`` URIs with globs, read as streams.

A source is identified by the SHA-256 of its bytes as stored (before decompression), so the same
file ingested twice, under any name, maps to the same part files. Compressed files (gzip, and
zstd as the Collector's file exporter writes) are recognised by their magic bytes and
decompressed while streaming; chunks are cut at record boundaries of the decompressed stream:
newlines for JSON lines and CSV, the 4-byte big-endian length prefix for OTLP protobuf files.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import IO, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from ..errors import IngestError
from ..objstore import S3Options

_READ = 8 << 20
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass(frozen=True)
class Source:
    uri: str   # what the user named (expanded), used in every message
    path: str  # the filesystem path (bucket/key on S3)
    is_s3: bool

    @property
    def fs(self) -> pafs.FileSystem:
        return S3Options.from_env().pyarrow() if self.is_s3 else pafs.LocalFileSystem()


def expand(patterns: list[str]) -> list[Source]:
    """Every file the patterns name, in order, without duplicates; a pattern matching nothing is an error."""
    out: list[Source] = []
    for pat in patterns:
        found = _expand_s3(pat) if pat.startswith("s3://") else _expand_local(pat)
        if not found:
            raise IngestError(f"{pat}: no file matches")
        out.extend(s for s in found if s not in out)
    return out


def _expand_local(pat: str) -> list[Source]:
    paths = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else ([pat] if os.path.exists(pat) else [])
    files = [p for p in paths if os.path.isfile(p)]
    if len(paths) == 1 and os.path.isdir(paths[0]):
        raise IngestError(f"{pat}: is a folder; name the files (a glob such as {pat.rstrip('/')}/*.jsonl works)")
    return [Source(p, os.path.abspath(p), False) for p in files]


def _expand_s3(pat: str) -> list[Source]:
    path = pat[len("s3://"):]
    fs = S3Options.from_env().pyarrow()
    if not glob.has_magic(path):
        info = _info(fs, path, pat)
        return [Source(pat, path, True)] if info.type == pafs.FileType.File else []
    base = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise IngestError(f"{pat}: cannot list s3://{base} ({str(exc).splitlines()[0]})") from None
    return [Source(f"s3://{i.path}", i.path, True) for i in sorted(infos, key=lambda i: i.path)
            if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)]


def _info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise IngestError(f"{uri}: cannot read ({str(exc).splitlines()[0]})") from None


def _raw(src: Source) -> IO[bytes]:
    try:
        return src.fs.open_input_stream(src.path)
    except FileNotFoundError:
        raise IngestError(f"{src.uri}: not found") from None
    except OSError as exc:
        raise IngestError(f"{src.uri}: cannot read ({str(exc).splitlines()[0]})") from None


def digest(src: Source) -> str:
    """SHA-256 of the stored bytes (one streaming pass through one reused buffer: a fresh block per
    read would cost as much in page faults as the hash itself)."""
    h = hashlib.sha256()
    block = memoryview(bytearray(_READ))
    with _raw(src) as f:
        while n := _read_into(f, block):
            h.update(block[:n])
    return h.hexdigest()


def codec(src: Source) -> str | None:
    """The compression of ``src`` from its magic bytes (``gzip``, ``zstd``), or None."""
    with _raw(src) as raw:
        head = raw.read(4)
    return next((c for m, c in _MAGIC.items() if head.startswith(m)), None)


def open_decoded(src: Source) -> IO[bytes]:
    """The decompressed byte stream of ``src``."""
    kind = codec(src)
    stream = _raw(src)
    return pa.CompressedInputStream(stream, kind) if kind else stream


@dataclass(frozen=True)
class ByteRange:
    """A chunk of a local uncompressed file, which the task that parses it reads itself."""

    source: Source
    offset: int
    length: int

    def read(self) -> pa.Buffer:
        with self.source.fs.open_input_file(self.source.path) as f:
            return f.read_at(self.length, self.offset)


def index_lines(src: Source, chunk_bytes: int) -> tuple[str, list[ByteRange], list[int]] | None:
    """For a local uncompressed file: its SHA-256, the byte ranges of the chunks :func:`line_chunks`
    cuts and their first line numbers, from one read (the hash pass is the chunking pass; the
    tasks then read their own range, so no chunk goes through the driver); None for other files."""
    if src.is_s3:
        return None
    with src.fs.open_input_file(src.path) as f:  # as stored (open_input_stream decompresses by extension)
        if any(f.read(4).startswith(m) for m in _MAGIC):
            return None
    h = hashlib.sha256()
    ranges, firsts, offset = [], [], 0
    for _, first, _, data in line_chunks(src, chunk_bytes):
        h.update(data)
        ranges.append(ByteRange(src, offset, len(data)))
        firsts.append(first)
        offset += len(data)
    return h.hexdigest(), ranges, firsts


def line_chunks(src: Source, chunk_bytes: int, header: bool = False) -> Iterator[tuple[int, int, bytes, memoryview]]:
    """``(index, first line number, header line, bytes of whole lines)`` of about ``chunk_bytes`` each.

    With ``header`` the file's first line (a CSV header) is returned with every chunk and not in any.
    The chunk is a view of one buffer that every chunk reuses (only the partial line at a chunk's
    end is moved, to the front): copy what is kept past the next chunk (``ray.put`` does). Fresh
    chunk-sized buffers would cost more in page faults than reading the bytes.
    """
    with open_decoded(src) as f:
        head = b""
        carry = b""
        line_no = 1
        if header:
            first = b""
            while b"\n" not in first:
                block = f.read(1 << 16)
                if not block:
                    break
                first += block
            head, _, carry = first.partition(b"\n")
            line_no = 2
        buf = bytearray(max(chunk_bytes, len(carry)))
        have = len(carry)
        buf[:have] = carry
        index = 0
        while True:
            capacity = max(chunk_bytes, have)
            end = have + (_read_into(f, memoryview(buf)[have:capacity]) if capacity > have else 0)
            if not end:
                return
            eof = end < capacity
            cut = end - 1 if eof else buf.rfind(b"\n", 0, chunk_bytes)
            if cut < 0:
                cut = buf.find(b"\n", chunk_bytes, end)
            while cut < 0:  # one line longer than a chunk: read to its end
                block = f.read(_READ)
                if not block:
                    eof, cut = True, end - 1
                    break
                nl = block.find(b"\n")
                cut = end + nl if nl >= 0 else -1
                buf = bytearray(buf[:end]) + block  # a new buffer: the caller may still hold a view of the old
                end = len(buf)
            data = memoryview(buf)[:cut + 1]
            if index == 0:
                _check_text(data, src)
            yield index, line_no, head, data
            line_no += buf.count(b"\n", 0, cut + 1)
            index += 1
            if eof:
                return
            have = end - cut - 1
            buf[:have] = buf[cut + 1:end]


def _read_into(f: IO[bytes], view: memoryview) -> int:
    """Fill ``view`` from ``f``; fewer bytes only at the end of the stream."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _check_text(data: memoryview, src: Source) -> None:
    """Fail early on binary input handed to a text format (a protobuf file read as JSON lines)."""
    if b"\x00" in bytes(data[:4096]):
        raise IngestError(f"{src.uri}: binary data where text was expected (an OTLP protobuf file? use --encoding proto)")


def proto_chunks(src: Source, chunk_bytes: int) -> Iterator[tuple[int, int, list[tuple[int, bytes]]]]:
    """``(index, first message number, [(message number, message bytes)])`` from a length-prefixed file."""
    with open_decoded(src) as f:
        index, number, batch, size = 0, 1, [], 0
        first = 1
        while True:
            prefix = f.read(4)
            if not prefix:
                break
            if len(prefix) < 4:
                raise IngestError(f"{src.uri}: message {number}: truncated length prefix (file cut short?)")
            (n,) = struct.unpack(">I", prefix)
            blob = f.read(n)
            if len(blob) < n:
                raise IngestError(f"{src.uri}: message {number}: truncated ({len(blob)} of {n} bytes; file cut short?)")
            batch.append((number, blob))
            size += n
            number += 1
            if size >= chunk_bytes:
                yield index, first, batch
                index, first, batch, size = index + 1, number, [], 0
        if batch:
            yield index, first, batch
