"""Read an offline W&B run file (``run-<id>.wandb``) back, without network or account.

The file is a LevelDB-style log (32 KiB blocks, 7-byte record headers) of ``wandb_internal``
protobuf records; this is how the tests check what a run logged.
"""
import struct

from wandb.proto import wandb_internal_pb2 as pb


def read_records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, block, buf, chunks = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - (pos % block)
        if left < 7:
            pos += left
            continue
        _crc, length, typ = struct.unpack("<IHB", data[pos:pos + 7])
        if typ == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if typ == 1:
            chunks.append(chunk)
        elif typ == 2:
            buf = chunk
        elif typ == 3:
            buf += chunk
        elif typ == 4:
            chunks.append(buf + chunk)
            buf = b""
    out = []
    for c in chunks:
        r = pb.Record()
        r.ParseFromString(c)
        out.append(r)
    return out


def _key(item):
    return item.key or "/".join(item.nested_key)


def history(records):
    return [{_key(i): i.value_json for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]


def summary(records):
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for i in r.summary.update:
                out[_key(i)] = i.value_json
    return out


def run_info(records):
    for r in records:
        if r.WhichOneof("record_type") == "run":
            return r.run
    return None
