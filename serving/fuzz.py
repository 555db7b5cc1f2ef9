"""A seeded, bounded mutation fuzzer for the KServe v2 endpoint (HTTP JSON, the HTTP binary-tensor extension, gRPC
unary and streaming), loopback only.

``Fuzzer(http="127.0.0.1:P", grpc="127.0.0.1:Q", seed=S)`` turns valid small requests into hostile ones: declared
shapes (2^32, 2^63-1, negative, extra dims), datatypes, data counts and types, binary sizes and BYTES length
prefixes, ``Inference-Header-Content-Length``, encodings (invalid UTF-8, UTF-16, gzip bombs), truncated and
prematurely closed bodies, duplicated and unknown inputs/outputs/JSON keys, shared-memory parameters, non-public
routes, huge headers, URLs and gRPC metadata, random and bit-flipped protobuf. Each case is built from ``seed`` and
its index alone, so a case is reproducible by ``(seed, index)``.

``run(n, max_seconds, batch, check)`` sends cases in batches and calls ``check()`` after each batch (the caller
asserts the server is alive, that a normal request returns the same bytes, that RSS is bounded). The outcome of each
case is counted: ``http:400``, ``grpc:INVALID_ARGUMENT``, ``closed`` (the server closed the connection without an
answer: fine for malformed framing, a crash when the server is gone), ``timeout``.

Only loopback addresses are accepted.
"""

from __future__ import annotations

import copy
import gzip
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MODEL = "easyanimate"
STREAM_MODEL = "easyanimate_stream"
# a small, valid request (one PNG frame, one step): every mutation starts from it
BASE = {"PROMPT": ("BYTES", "a red kite over a hill"), "SEED": ("INT64", 7), "STEPS": ("INT64", 1),
        "NUM_FRAMES": ("INT64", 1), "HEIGHT": ("INT64", 32), "WIDTH": ("INT64", 32), "GUIDANCE": ("FP32", 6.0)}
HUGE_SHAPES = [[4294967296], [2**63 - 1], [2**62], [-1], [-4294967296], [0], [], [1, 1], [2**31, 2**31],
               [65536, 65536], [1, 4294967296], [1.5], ["1"], None, "1", [10**30], [True]]
DATATYPES = ["FP64", "INT32", "BYTES", "INT64", "FP32", "BOOL", "UINT64", "INT8", "FP16", "BF16", "", "int64",
             "X" * 1000, None, 5, "STRING", "TYPE_INT64"]
BAD_VALUES = [-1, 0, 2**63 - 1, -(2**63), 2**64, 10**30, 1.5, -1e308, 1e308, "x", "", None, True, [], {}, [[1]],
              "\udc80", "\x00" * 16]


def _loopback(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"the fuzzer only talks to loopback addresses, got {address!r}")
    return host, int(port)


@dataclass
class Case:
    """One request: ``transport`` (http | grpc | grpc-stream), what was mutated, and the bytes to send."""

    index: int
    transport: str
    mutation: str
    data: bytes = b""  # HTTP: the whole raw request; gRPC: the serialized message
    method: str = "ModelInfer"  # gRPC method
    metadata: tuple[tuple[str, str], ...] = ()
    half_close: bool = False  # HTTP: shut the write side after sending (a body shorter than its Content-Length)


@dataclass
class Report:
    seed: int
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_mutation: dict[str, Counter] = field(default_factory=dict)
    seconds: float = 0.0
    batches: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)  # cases after which check() failed
    server_errors: list[dict[str, Any]] = field(default_factory=list)  # 5xx / INTERNAL / UNKNOWN: (index, mutation)

    def record(self, case: Case, outcome: str) -> None:
        self.cases += 1
        self.outcomes[outcome] += 1
        self.by_mutation.setdefault(case.mutation, Counter())[outcome] += 1
        if outcome.startswith("http:5") and outcome != "http:503" or outcome in ("grpc:INTERNAL", "grpc:UNKNOWN"):
            if len(self.server_errors) < 20:
                self.server_errors.append({"index": case.index, "mutation": case.mutation, "outcome": outcome})

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "cases": self.cases, "seconds": round(self.seconds, 1), "batches": self.batches,
                "outcomes": dict(self.outcomes.most_common()), "mutations": len(self.by_mutation),
                "failures": self.failures, "server_errors": self.server_errors}


# ---------------------------------------------------------------------------------------------------------------------
# building requests


def json_request(base: dict[str, tuple[str, Any]] = BASE) -> dict[str, Any]:
    return {"inputs": [{"name": n, "datatype": dt, "shape": [1], "data": [v]} for n, (dt, v) in base.items()],
            "outputs": [{"name": "VIDEO"}, {"name": "METADATA"}]}


def _tensor_bytes(datatype: str, value: Any) -> bytes:
    if datatype == "BYTES":
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return struct.pack("<I", len(raw)) + raw
    return struct.pack({"INT64": "<q", "FP32": "<f"}[datatype], value)


def binary_request(base: dict[str, tuple[str, Any]] = BASE) -> tuple[dict[str, Any], list[bytes]]:
    parts = [_tensor_bytes(dt, v) for dt, v in base.values()]
    header = {"inputs": [{"name": n, "datatype": dt, "shape": [1], "parameters": {"binary_data_size": len(p)}}
                         for (n, (dt, _v)), p in zip(base.items(), parts, strict=True)],
              "outputs": [{"name": "VIDEO", "parameters": {"binary_data": True}}, {"name": "METADATA"}]}
    return header, parts


def grpc_request(model: str = MODEL, base: dict[str, tuple[str, Any]] = BASE):
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    for name, (dt, value) in base.items():
        tensor = request.inputs.add(name=name, datatype=dt, shape=[1])
        {"BYTES": tensor.contents.bytes_contents, "INT64": tensor.contents.int64_contents,
         "FP32": tensor.contents.fp32_contents}[dt].append(value.encode() if dt == "BYTES" else value)
    return request


def http_bytes(path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST",
               content_length: int | str | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if method == "POST" or body:
        lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


INFER = f"/v2/models/{MODEL}/infer"


class Fuzzer:
    """Seeded mutation cases against ``http`` and ``grpc`` (``host:port``, loopback) and a sender for them."""

    def __init__(self, http: str, grpc: str, seed: int = 0, timeout: float = 60.0):
        self.http = _loopback(http)
        self.grpc_address = f"{_loopback(grpc)[0]}:{_loopback(grpc)[1]}"
        self.seed = seed
        self.timeout = timeout
        self._channel = None
        self._http_mutations = [self._m_shape, self._m_datatype, self._m_data, self._m_duplicate_input,
                                self._m_unknown_input, self._m_missing_input, self._m_duplicate_key,
                                self._m_fields, self._m_outputs, self._m_parameters, self._m_encoding,
                                self._m_truncate, self._m_half_close, self._m_headers, self._m_routes,
                                self._m_framing, self._m_nesting]
        self._binary_mutations = [self._b_size, self._b_header_length, self._b_bytes_prefix, self._b_truncate,
                                  self._b_shape, self._b_extra]
        self._grpc_mutations = [self._g_shape, self._g_datatype, self._g_contents, self._g_raw, self._g_inputs,
                                self._g_outputs, self._g_parameters, self._g_model, self._g_bytes, self._g_metadata]

    # -- cases ----------------------------------------------------------------------------------------------------

    def case(self, index: int) -> Case:
        """The case number ``index`` of this seed (deterministic)."""
        rng = random.Random(f"{self.seed}:{index}")
        family = rng.choices(["http", "binary", "grpc", "grpc-stream"], weights=[5, 3, 3, 2])[0]
        if family == "http":
            mutate = rng.choice(self._http_mutations)
            case = mutate(rng)
        elif family == "binary":
            mutate = rng.choice(self._binary_mutations)
            case = mutate(rng)
        else:
            mutate = rng.choice(self._grpc_mutations)
            case = mutate(rng, stream=family == "grpc-stream")
        case.index = index
        return case

    def _http_case(self, mutation: str, body: bytes, *, path: str = INFER, headers: dict[str, str] | None = None,
                   method: str = "POST", content_length: int | str | None = None, half_close: bool = False) -> Case:
        headers = {"Content-Type": "application/json", **(headers or {})}
        return Case(0, "http", mutation, http_bytes(path, body, headers, method, content_length),
                    half_close=half_close)

    def _pick(self, rng: random.Random, request: dict[str, Any]) -> dict[str, Any]:
        return rng.choice(request["inputs"])

    def _m_shape(self, rng):
        r = json_request()
        self._pick(rng, r)["shape"] = copy.deepcopy(rng.choice(HUGE_SHAPES))
        return self._http_case("json.shape", _dumps(r))

    def _m_datatype(self, rng):
        r = json_request()
        self._pick(rng, r)["datatype"] = rng.choice(DATATYPES)
        return self._http_case("json.datatype", _dumps(r))

    def _m_data(self, rng):
        r = json_request()
        item = self._pick(rng, r)
        choice = rng.randrange(4)
        if choice == 0:
            item["data"] = [rng.choice(BAD_VALUES)]
        elif choice == 1:
            item["data"] = [item["data"][0]] * rng.choice([0, 2, 3, 1000, 50000])
        elif choice == 2:
            item["data"] = rng.choice([None, 7, "x", {"a": 1}, [[[[[[[[[[1]]]]]]]]]]])
        else:
            item.pop("data")
        return self._http_case("json.data", _dumps(r))

    def _m_duplicate_input(self, rng):
        r = json_request()
        item = copy.deepcopy(self._pick(rng, r))
        if rng.random() < 0.5:
            item["shape"] = rng.choice(HUGE_SHAPES[:4])
        r["inputs"].insert(rng.randrange(len(r["inputs"]) + 1), item)
        return self._http_case("json.duplicate_input", _dumps(r))

    def _m_unknown_input(self, rng):
        r = json_request()
        r["inputs"].append({"name": rng.choice(["FOO", "", "PROMPT ", "prompt", "A" * 5000, "../../etc"]),
                            "datatype": "INT64", "shape": rng.choice([[1], [4294967296]]), "data": [1]})
        return self._http_case("json.unknown_input", _dumps(r))

    def _m_missing_input(self, rng):
        r = json_request()
        r["inputs"] = [i for i in r["inputs"] if i["name"] != "PROMPT"] if rng.random() < 0.5 else []
        if rng.random() < 0.3:
            r.pop("inputs")
        return self._http_case("json.missing_input", _dumps(r))

    def _m_duplicate_key(self, rng):
        body = _dumps(json_request()).decode()
        key = rng.choice(['"shape": [1]', '"datatype": "INT64"', '"name": "SEED"'])
        evil = {'"shape": [1]': '"shape": [4294967296], "shape": [1]', '"datatype": "INT64"':
                '"datatype": "BYTES", "datatype": "INT64"', '"name": "SEED"': '"name": "FOO", "name": "SEED"'}[key]
        body = body.replace(key, evil, 1) if rng.random() < 0.5 else body.replace(key, evil)
        if rng.random() < 0.3:
            body = body.replace('{"inputs"', '{"inputs": [], "inputs"', 1)
        return self._http_case("json.duplicate_key", body.encode())

    def _m_fields(self, rng):
        r = json_request()
        choice = rng.randrange(4)
        if choice == 0:
            r[rng.choice(["id", "parameters", "outputs", "inputs"])] = rng.choice(BAD_VALUES)
        elif choice == 1:
            r["extra" + str(rng.randrange(9))] = 1
        elif choice == 2:
            r["id"] = "x" * rng.choice([300, 100000])
        else:
            self._pick(rng, r)["extra"] = {"shape": [4294967296]}
        return self._http_case("json.fields", _dumps(r))

    def _m_outputs(self, rng):
        r = json_request()
        r["outputs"] = rng.choice([[{"name": "NOPE"}], [{"name": "VIDEO"}] * 3,
                                   [{"name": "VIDEO", "parameters": {"classification": 4294967296}}],
                                   [{"name": "VIDEO", "parameters": {"binary_data": "yes"}}],
                                   [{"name": "VIDEO", "parameters": {"shared_memory_region": "x",
                                                                     "shared_memory_byte_size": 2**40}}],
                                   "VIDEO", [None], [{"name": "PROGRESS"}]])
        return self._http_case("json.outputs", _dumps(r))

    def _m_parameters(self, rng):
        r = json_request()
        params = rng.choice([{"shared_memory_region": "r", "shared_memory_byte_size": 2**40,
                              "shared_memory_offset": 0}, {"binary_data_size": 4294967296},
                             {"binary_data_size": -1}, {"foo": 1}, {"timeout": -5}, {"priority": 2**64},
                             {"binary_data_output": "x"}, {"sequence_id": 1, "sequence_start": True}])
        if rng.random() < 0.5:
            self._pick(rng, r)["parameters"] = params
        else:
            r["parameters"] = params
        return self._http_case("json.parameters", _dumps(r))

    def _m_encoding(self, rng):
        body = _dumps(json_request())
        choice = rng.randrange(5)
        headers = {}
        if choice == 0:
            body = body.replace(b"a red kite", b"a red \xff\xfe kite")
        elif choice == 1:
            body = body.decode().encode("utf-16")
        elif choice == 2:
            body = b"\xef\xbb\xbf" + body
        elif choice == 3:  # a gzip bomb: 64 MiB of zeros in ~64 KiB
            body = gzip.compress(b"0" * (64 << 20), compresslevel=9)
            headers["Content-Encoding"] = "gzip"
        else:
            body = gzip.compress(body)[: rng.randrange(5, 40)]
            headers["Content-Encoding"] = rng.choice(["gzip", "deflate", "br", "x-unknown"])
        return self._http_case("http.encoding", body, headers=headers)

    def _m_truncate(self, rng):
        body = _dumps(json_request())
        return self._http_case("http.truncate", body[: rng.randrange(len(body))])

    def _m_half_close(self, rng):
        body = _dumps(json_request())
        cut = rng.randrange(len(body))
        return self._http_case("http.half_close", body[:cut], content_length=len(body) + rng.choice([0, 100, 2**31]),
                               half_close=True)

    def _m_headers(self, rng):
        body = _dumps(json_request())
        choice = rng.randrange(4)
        if choice == 0:
            return self._http_case("http.huge_header", body, headers={"X-Big": "a" * rng.choice([9000, 100000])})
        if choice == 1:
            return self._http_case("http.many_headers", body, headers={f"X-H{i}": "v" for i in range(500)})
        if choice == 2:
            return self._http_case("http.huge_url", body, path=INFER + "?" + "a" * rng.choice([9000, 100000]))
        return self._http_case("http.header_length", body, headers={
            "Inference-Header-Content-Length": rng.choice(["-1", "abc", str(2**63), "99999999999999999999", ""])})

    def _m_routes(self, rng):
        path, body = rng.choice([
            ("/v2/repository/models/easyanimate/unload", b"{}"), ("/v2/repository/models/easyanimate/load", b"{}"),
            ("/v2/repository/index", b"{}"),
            ("/v2/systemsharedmemory/region/r/register",
             b'{"key": "/dev/shm/x", "offset": 0, "byte_size": 4294967296}'),
            ("/v2/cudasharedmemory/region/r/register", b'{"raw_handle": {"b64": "AAAA"}, "device_id": 0, '
                                                       b'"byte_size": 4294967296}'),
            ("/v2/models/easyanimate/generate", b'{"PROMPT": "x"}'), ("/v2/trace/setting", b'{"trace_level": ["TIMESTAMPS"]}'),
            ("/v2/logging", b'{"log_verbose_level": 10}'), ("/v2/models/stats", b""),
            ("/v2/models/nope/infer", _dumps(json_request())), ("/v2/models/easyanimate/versions/99/infer",
                                                                 _dumps(json_request())),
            ("/v2/models/easyanimate_stream/infer", _dumps(json_request())),
            ("/v2/models/" + "a" * 5000 + "/infer", b"{}")])
        method = rng.choice(["POST", "POST", "GET", "PUT", "DELETE"])
        return self._http_case("http.route", body, path=path, method=method)

    def _m_framing(self, rng):
        body = _dumps(json_request())
        choice = rng.randrange(3)
        if choice == 0:
            return self._http_case("http.framing", body, content_length=rng.choice(["-1", "abc", "1e9", str(2**64)]))
        if choice == 1:
            raw = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                   "FFFFFFFFFFFF\r\n").encode() + body[:50]
            return Case(0, "http", "http.framing", raw, half_close=True)
        return Case(0, "http", "http.framing", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
                    half_close=True)

    def _m_nesting(self, rng):
        depth = rng.choice([1000, 100000])
        body = b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"
        return self._http_case("json.nesting", body)

    # binary extension

    def _binary_case(self, mutation, header, parts, header_length=None):
        head = _dumps(header)
        body = head + b"".join(parts)
        length = str(len(head)) if header_length is None else header_length
        return self._http_case(mutation, body, headers={"Content-Type": "application/octet-stream",
                                                        "Inference-Header-Content-Length": length})

    def _b_size(self, rng):
        header, parts = binary_request()
        item = self._pick(rng, header)
        size = item["parameters"]["binary_data_size"]
        item["parameters"]["binary_data_size"] = rng.choice([0, size - 1, size + 1, size * 1000, 4294967296, -1,
                                                             2**63, "8", None])
        return self._binary_case("binary.size", header, parts)

    def _b_header_length(self, rng):
        header, parts = binary_request()
        head_len = len(_dumps(header))
        return self._binary_case("binary.header_length", header, parts, str(rng.choice(
            [0, 1, head_len - 1, head_len + 1, head_len + 10**6, 2**32, 2**64, -1])))

    def _b_bytes_prefix(self, rng):
        header, parts = binary_request()
        n = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 2**31, 1 << 20, 23, 0])
        parts[0] = struct.pack("<I", n) + parts[0][4:]
        if rng.random() < 0.5:  # declared sizes consistent with the lie
            header["inputs"][0]["parameters"]["binary_data_size"] = len(parts[0])
        return self._binary_case("binary.bytes_prefix", header, parts)

    def _b_truncate(self, rng):
        header, parts = binary_request()
        blob = b"".join(parts)
        head = _dumps(header)
        cut = rng.randrange(len(blob))
        body = head + blob[:cut]
        return self._http_case("binary.truncate", body, headers={"Content-Type": "application/octet-stream",
                                                                 "Inference-Header-Content-Length": str(len(head))})

    def _b_shape(self, rng):
        header, parts = binary_request()
        i = rng.randrange(len(parts))
        header["inputs"][i]["shape"] = copy.deepcopy(rng.choice(HUGE_SHAPES))
        if rng.random() < 0.5:
            header["inputs"][i]["datatype"] = rng.choice(DATATYPES[:9])
        return self._binary_case("binary.shape", header, parts)

    def _b_extra(self, rng):
        header, parts = binary_request()
        parts.append(bytes(rng.randrange(1, 5000)))
        if rng.random() < 0.5:
            header["inputs"].append({"name": "SEED", "datatype": "INT64", "shape": [1],
                                     "parameters": {"binary_data_size": 8}})
            parts.append(struct.pack("<q", 1))
        return self._binary_case("binary.extra", header, parts)

    # gRPC

    def _grpc_case(self, mutation, request, stream, raw: bytes | None = None, metadata=()):
        return Case(0, "grpc-stream" if stream else "grpc", ("grpc-stream." if stream else "grpc.") + mutation,
                    raw if raw is not None else request.SerializeToString(),
                    "ModelStreamInfer" if stream else "ModelInfer", tuple(metadata))

    def _base(self, stream):
        return grpc_request(STREAM_MODEL if stream else MODEL)

    def _g_shape(self, rng, stream):
        r = self._base(stream)
        t = rng.choice(r.inputs)
        del t.shape[:]
        t.shape.extend(rng.choice([[4294967296], [2**63 - 1], [-1], [-(2**63)], [0], [], [1, 1], [2**31, 2**31],
                                   [65536, 65536, 65536]]))
        return self._grpc_case("shape", r, stream)

    def _g_datatype(self, rng, stream):
        r = self._base(stream)
        rng.choice(r.inputs).datatype = rng.choice([d for d in DATATYPES if isinstance(d, str)])
        return self._grpc_case("datatype", r, stream)

    def _g_contents(self, rng, stream):
        r = self._base(stream)
        t = rng.choice(r.inputs)
        choice = rng.randrange(4)
        if choice == 0:
            t.contents.int64_contents.extend([1] * rng.choice([1, 2, 100000]))
        elif choice == 1:
            t.contents.bytes_contents.extend([b"x" * rng.choice([1, 1000])] * rng.choice([2, 100]))
        elif choice == 2:
            t.ClearField("contents")
        else:
            t.contents.fp64_contents.extend([float("nan")])
        return self._grpc_case("contents", r, stream)

    def _g_raw(self, rng, stream):
        r = self._base(stream)
        raws = []
        for t in r.inputs:
            if t.datatype == "BYTES":
                raws.append(_tensor_bytes("BYTES", t.contents.bytes_contents[0]))
            elif t.datatype == "INT64":
                raws.append(_tensor_bytes("INT64", t.contents.int64_contents[0]))
            else:
                raws.append(_tensor_bytes("FP32", t.contents.fp32_contents[0]))
            t.ClearField("contents")
        choice = rng.randrange(5)
        i = rng.randrange(len(raws))
        if choice == 0:
            raws[i] = raws[i][: rng.randrange(len(raws[i]))]
        elif choice == 1:
            raws[i] = raws[i] + bytes(rng.choice([1, 8, 100000]))
        elif choice == 2:
            raws.pop()
        elif choice == 3:
            raws[0] = struct.pack("<I", rng.choice([0xFFFFFFFF, 2**31, 1000])) + raws[0][4:]
        else:
            r.inputs[i].shape[0] = rng.choice([4294967296, 2**62, 2])
        r.raw_input_contents.extend(raws)
        return self._grpc_case("raw", r, stream)

    def _g_inputs(self, rng, stream):
        r = self._base(stream)
        choice = rng.randrange(3)
        if choice == 0:
            r.inputs.append(r.inputs[rng.randrange(len(r.inputs))])
        elif choice == 1:
            t = r.inputs.add(name=rng.choice(["FOO", "", "x" * 5000]), datatype="INT64", shape=[1])
            t.contents.int64_contents.append(1)
        else:
            del r.inputs[0]
        return self._grpc_case("inputs", r, stream)

    def _g_outputs(self, rng, stream):
        r = self._base(stream)
        out = r.outputs.add(name=rng.choice(["NOPE", "VIDEO", "PROGRESS"]))
        if rng.random() < 0.5:
            out.parameters["classification"].int64_param = 4294967296
        if rng.random() < 0.5:
            r.outputs.add(name=out.name)
        return self._grpc_case("outputs", r, stream)

    def _g_parameters(self, rng, stream):
        r = self._base(stream)
        target = rng.choice([r.parameters, rng.choice(r.inputs).parameters])
        key = rng.choice(["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "foo",
                          "priority", "timeout", "sequence_id"])
        if key == "shared_memory_region":
            target[key].string_param = "r"
        else:
            target[key].int64_param = rng.choice([-1, 2**40, 2**63 - 1])
        return self._grpc_case("parameters", r, stream)

    def _g_model(self, rng, stream):
        r = self._base(stream)
        choice = rng.randrange(3)
        if choice == 0:
            r.model_name = rng.choice(["nope", "", "x" * 10000, MODEL if stream else STREAM_MODEL])
        elif choice == 1:
            r.model_version = rng.choice(["2", "-1", "99999999999999999999", "x"])
        else:
            r.id = "i" * rng.choice([300, 100000])
        return self._grpc_case("model", r, stream)

    def _g_bytes(self, rng, stream):
        raw = bytearray(self._base(stream).SerializeToString())
        choice = rng.randrange(3)
        if choice == 0:
            raw = raw[: rng.randrange(len(raw))]
        elif choice == 1:
            for _ in range(rng.randrange(1, 8)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        else:
            raw = bytearray(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        return self._grpc_case("bytes", None, stream, raw=bytes(raw))

    def _g_metadata(self, rng, stream):
        r = self._base(stream)
        metadata = rng.choice([[("x-big", "a" * 100000)], [(f"x-h{i}", "v" * 100) for i in range(300)],
                               [("triton-grpc-protocol-x", "a" * 9000)]])
        return self._grpc_case("metadata", r, stream, metadata=metadata)

    # -- sending --------------------------------------------------------------------------------------------------

    def send(self, case: Case) -> str:
        """Send one case → its outcome (``http:400``, ``grpc:INVALID_ARGUMENT``, ``closed``, ``timeout``)."""
        if case.transport == "http":
            return self._send_http(case)
        return self._send_grpc(case)

    def _send_http(self, case: Case) -> str:
        try:
            with socket.create_connection(self.http, timeout=self.timeout) as sock:
                try:
                    sock.sendall(case.data)
                    if case.half_close:
                        sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the server may answer (and close) before reading everything: read what it said
                answer = b""
                while len(answer) < 64 and b"\r\n" not in answer:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
        except TimeoutError:
            return "timeout"
        except OSError:
            return "closed"
        line = answer.split(b"\r\n", 1)[0].split()
        if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit():
            return f"http:{int(line[1])}"
        return "closed"

    def _grpc_channel(self):
        import grpc

        if self._channel is None:
            self._channel = grpc.insecure_channel(self.grpc_address, options=[
                ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        return self._channel

    def _send_grpc(self, case: Case) -> str:
        import grpc

        channel = self._grpc_channel()
        path = f"/inference.GRPCInferenceService/{case.method}"
        try:
            if case.method == "ModelStreamInfer":
                from tritonclient.grpc import service_pb2

                call = channel.stream_stream(path)(iter([case.data]), timeout=self.timeout,
                                                   metadata=case.metadata or None)
                errors = []
                for raw in call:
                    response = service_pb2.ModelStreamInferResponse.FromString(raw)
                    if response.error_message:
                        errors.append(response.error_message)
                return "grpc:stream-error" if errors else "grpc:OK"
            channel.unary_unary(path)(case.data, timeout=self.timeout, metadata=case.metadata or None)
            return "grpc:OK"
        except grpc.RpcError as exc:
            code = exc.code()
            return f"grpc:{code.name if code is not None else 'UNKNOWN'}"

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self, n: int, max_seconds: float, batch: int = 25, check: Callable[[Report, list[Case]], None]
            | None = None, on_case: Callable[[Case, str], None] | None = None, start: int = 0) -> Report:
        """Send up to ``n`` cases (stopping after ``max_seconds``) in batches; ``check(report, batch_cases)`` after
        each batch (raise to stop: the failure is recorded in the report, then re-raised)."""
        report = Report(self.seed)
        begin = time.monotonic()
        index = start
        try:
            while index < start + n and time.monotonic() - begin < max_seconds:
                cases = []
                for _ in range(min(batch, start + n - index)):
                    case = self.case(index)
                    index += 1
                    outcome = self.send(case)
                    report.record(case, outcome)
                    cases.append(case)
                    if on_case is not None:
                        on_case(case, outcome)
                    if time.monotonic() - begin >= max_seconds:
                        break
                report.batches += 1
                if check is not None:
                    try:
                        check(report, cases)
                    except Exception as exc:
                        report.failures.append({"after_case": index - 1, "error": str(exc)[:500],
                                                "mutations": sorted({c.mutation for c in cases})})
                        raise
        finally:
            report.seconds = time.monotonic() - begin
        return report





# ---------------------------------------------------------------------------------------------------------------------
# the harness the test and bench/fuzz_serve.py share


def _rss(pid: int | None, children: bool = True) -> int:
    import psutil

    if pid is None:
        return 0
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)] if children else [proc]
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


def fuzz_endpoint(endpoint, *, seed: int = 0, cases: int = 200, seconds: float = 90.0, batch: int = 25,
                  target: str = "front", rss_growth_limit: int = 512 << 20, ready_timeout: float = 120.0,
                  start: int = 0) -> dict[str, Any]:
    """Fuzz a started ``serving.supervisor.Endpoint``: ``target="front"`` (the public ports: nothing may crash) or
    ``"triton"`` (tritonserver's own loopback ports, to find what kills it: each death is recorded with the case
    that caused it, and the supervisor restarts it).

    After each batch: tritonserver alive and ready, a normal request returns the same bytes as before the run,
    RSS (tritonserver + stubs, and this process with the front) within ``rss_growth_limit`` of the start."""
    import os

    from serving import client
    from serving.request import to_inputs

    normal = to_inputs(BASE["PROMPT"][1], seed=BASE["SEED"][1], steps=1, num_frames=1, height=32, width=32)
    front_http = endpoint.http_url.removeprefix("http://")
    reference = client.infer_http(front_http, normal).data
    rss0 = {"triton": _rss(endpoint.pid), "front": _rss(os.getpid(), children=False)}
    rss_max = dict(rss0)
    crashes: list[dict[str, Any]] = []
    restarts0 = len(endpoint.restarts)
    state = {"pid": endpoint.pid}
    if target == "front":
        http, grpc_address = front_http, endpoint.grpc_url
    else:
        http, grpc_address = endpoint.server.http_url.removeprefix("http://"), endpoint.server.grpc_url
    fuzzer = Fuzzer(http, grpc_address, seed=seed)

    def wait_ready() -> None:
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if endpoint.state == "serving" and endpoint.server.proc is not None and endpoint.server.is_ready():
                return
            if endpoint.gave_up:
                raise AssertionError(f"the supervisor gave up: {endpoint.gave_up}")
            time.sleep(0.2)
        raise AssertionError(f"tritonserver not ready {ready_timeout:.0f} s after a crash")

    def on_case(case: Case, outcome: str) -> None:
        proc = endpoint.server.proc
        if proc is None or proc.poll() is not None or endpoint.pid != state["pid"]:
            time.sleep(0.5)
            crashes.append({"index": case.index, "mutation": case.mutation, "outcome": outcome,
                            "code": proc.returncode if proc is not None else None})
            if target == "triton":
                fuzzer.close()
                wait_ready()
                state["pid"] = endpoint.pid
                fuzzer.http = _loopback(endpoint.server.http_url.removeprefix("http://"))
                fuzzer.grpc_address = endpoint.server.grpc_url

    def check(report: Report, _cases: list[Case]) -> None:
        if target == "front":
            assert not crashes, f"tritonserver died during the batch: {crashes}"
            assert len(endpoint.restarts) == restarts0, f"tritonserver restarted: {endpoint.restarts[restarts0:]}"
            assert endpoint.server.is_live() and endpoint.server.is_ready(), "tritonserver is not live and ready"
        else:
            wait_ready()
        again = client.infer_http(front_http, normal).data
        assert again == reference, "a normal request returned different bytes for the same seed"
        for key, pid, children in (("triton", endpoint.pid, True), ("front", os.getpid(), False)):
            rss = _rss(pid, children)
            rss_max[key] = max(rss_max[key], rss)
            if target == "front":
                assert rss - rss0[key] <= rss_growth_limit, \
                    f"{key} RSS grew by {(rss - rss0[key]) >> 20} MiB (limit {rss_growth_limit >> 20} MiB)"

    refused0 = Counter(endpoint.front.stats.refused)
    try:
        report = fuzzer.run(cases, seconds, batch=batch, check=check, on_case=on_case, start=start)
    finally:
        fuzzer.close()
    out = report.as_dict()
    out.update({
        "target": target, "crashes": len(crashes), "crash_cases": crashes,
        "restarts": len(endpoint.restarts) - restarts0,
        "refused_by_reason": dict((Counter(endpoint.front.stats.refused) - refused0).most_common()),
        "rss_mib": {k: {"start": rss0[k] >> 20, "max": rss_max[k] >> 20} for k in rss0},
        "same_bytes_checks": report.batches,
    })
    return out
__all__ = ["BASE", "Case", "Fuzzer", "Report", "binary_request", "fuzz_endpoint", "grpc_request", "http_bytes", "json_request"]
